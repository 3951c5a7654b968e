"""Configuration of a Qwen2.5-VL model split by AlignedVQ."""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import Qwen2_5_VLConfig
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

from ..llava_alignedvq.configuration_alignedvq import AlignedVQConfig

# The shared AlignedVQ code reads a tower's block count as ``vision_config.num_hidden_layers``, which Transformers
# aliases to Qwen's ``depth`` from 5.2x on; 5.19 (the release vLLM's CPU build pins) names it only ``depth``. The
# same alias, added where it is missing, lets one model class serve both.
if "num_hidden_layers" not in Qwen2_5_VLVisionConfig.attribute_map:
    Qwen2_5_VLVisionConfig.attribute_map = {**Qwen2_5_VLVisionConfig.attribute_map, "num_hidden_layers": "depth"}

# Sites where everything the edge computes stays inside one attention window (or one patch).
LOCAL_SITES = ("patch", "input", "ln1", "mlp")


def first_full_attention_block(vision_config) -> int:
    """Index of the tower's first full-attention block (its depth when every block is windowed)."""
    full = [int(i) for i in vision_config.fullatt_block_indexes or ()]
    return min(full) if full else vision_config.depth


def check_local_site(vision_config, split_layer: int, split_site: str) -> None:
    """`ValueError` unless the edge's work up to ``split_site`` of block ``split_layer`` stays local to a window.

    Allowed: ``patch`` (the patch embedding, block 0 only), and ``input`` / ``ln1`` / ``mlp`` of a windowed block
    strictly before the first full-attention block. ``mlp`` of the last windowed block is the input of the first
    full-attention block, which the cloud runs. ``attn`` and ``ln2`` are not offered.
    """
    first = first_full_attention_block(vision_config)
    if split_site == "patch" and split_layer == 0:
        return
    if split_site in ("input", "ln1", "mlp") and 0 <= split_layer < first:
        return
    blocks = f"split_layer in [0, {first})" if first else "none: block 0 already attends over the whole image"
    raise ValueError(
        f"Qwen2.5-VL splits only where the edge's work stays inside an attention window: split_site='patch' with "
        f"split_layer=0, or split_site 'input', 'ln1' or 'mlp' of a windowed block before the first full-attention "
        f"block ({first}; fullatt_block_indexes={list(vision_config.fullatt_block_indexes)}), i.e. {blocks}. "
        f"Got split_site={split_site!r}, split_layer={split_layer}."
    )


@strict
class Qwen2_5_VLAlignedVQConfig(Qwen2_5_VLConfig):
    r"""
    [`Qwen2_5_VLConfig`] plus where and how the vision tower is vector-quantized.

    The AlignedVQ arguments (``split_layer``, ``split_site``, ``codebook_size``, ``num_codebooks``,
    ``num_groups``, ``codebook_dim``, ``use_dlp``, ``commitment_weight``, ``ema_decay``,
    ``dead_code_threshold``, ``checkpoint_kind``, ``base_model_name_or_path``, ``base_model_revision``) mean
    what they mean in [`AlignedVQConfig`] and are validated by the same code, plus one rule of this tower: the
    site must keep the edge's work inside an attention window (`check_local_site`): ``patch`` (the patch
    embedding; Qwen's tower adds no absolute positions and has no pre-norm, so it equals ``input`` of block 0),
    or ``input`` / ``ln1`` / ``mlp`` of a block before the first of ``vision_config.fullatt_block_indexes``.
    Everything from there on, the merger included, runs in the cloud. A token is one 14-px patch
    (``patch_size``); the language model sees one token per 2x2 patches after the merger.

    Defaults: the paper's split (``ln1`` of block 0, 4096 codewords, DLP) on Qwen2.5-VL's own defaults.
    """

    model_type = "qwen2_5_vl_alignedvq"

    split_layer: int = 0
    split_site: Literal["patch", "input", "ln1", "attn", "ln2", "mlp"] = "ln1"
    codebook_size: int = 4096
    num_codebooks: int = 1
    num_groups: int = 1
    codebook_dim: int | None = None
    use_dlp: bool = True
    commitment_weight: float = 0.25
    ema_decay: float = 0.99
    dead_code_threshold: float = 0.01
    checkpoint_kind: Literal["full", "adapter"] = "full"
    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None

    codes_per_token = AlignedVQConfig.codes_per_token

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.codebook_dim is None:
            self.codebook_dim = self.vision_config.hidden_size
        self.validate_alignedvq()

    def validate_alignedvq(self) -> None:
        """The options' rules shared by every family (the LLaVA config's code reads the fields above and
        ``vision_config.num_hidden_layers``, Qwen's ``depth``), then the window-locality rule."""
        AlignedVQConfig.validate_alignedvq(self)
        check_local_site(self.vision_config, self.split_layer, self.split_site)

    def feature_layer_indices(self) -> list[int]:
        """The hidden states the cloud reads: the last block's output, which the merger takes (Qwen has no
        ``vision_feature_layer``)."""
        return [self.vision_config.depth]


__all__ = ["LOCAL_SITES", "Qwen2_5_VLAlignedVQConfig", "check_local_site", "first_full_attention_block"]
