"""Configuration of a LLaVA-OneVision model split by AlignedVQ."""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import LlavaOnevisionConfig

from ..llava_alignedvq.configuration_alignedvq import AlignedVQConfig


@strict
class LlavaOnevisionAlignedVQConfig(LlavaOnevisionConfig):
    r"""
    [`LlavaOnevisionConfig`] plus where and how the SigLIP vision tower is vector-quantized.

    The AlignedVQ arguments (``split_layer``, ``split_site``, ``codebook_size``, ``num_codebooks``,
    ``num_groups``, ``codebook_dim``, ``use_dlp``, ``commitment_weight``, ``ema_decay``,
    ``dead_code_threshold``, ``checkpoint_kind``, ``base_model_name_or_path``, ``base_model_revision``) mean
    what they mean in [`AlignedVQConfig`] and are validated by the same code. Every tile (base view and
    any-resolution tiles) runs through the tower on its own, so a site is local to its tile and one codebook
    serves all tiles. SigLIP has no CLS token and no pre-LayerNorm: a tile makes ``(image_size // patch_size)**2``
    tokens, and the ``patch`` site is the patch convolution's output (bias included) before the positions.

    Defaults: the paper's split (``ln1`` of block 0, 4096 codewords, DLP) on OneVision's own defaults (SigLIP,
    feature layer -1 with the ``full`` strategy, which reads the last block's raw output: the post-LayerNorm is
    never applied, in the cloud as in the stock model).
    """

    model_type = "llava_onevision_alignedvq"

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

    # One definition of the options' rules for every family: the LLaVA config's checks read only the fields
    # above and `vision_config` / `vision_feature_layer`, which OneVision's config has too.
    validate_alignedvq = AlignedVQConfig.validate_alignedvq
    feature_layer_indices = AlignedVQConfig.feature_layer_indices
    codes_per_token = AlignedVQConfig.codes_per_token

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.codebook_dim is None:
            self.codebook_dim = self.vision_config.hidden_size
        self.validate_alignedvq()

    @property
    def tokens_per_tile(self) -> int:
        """Tokens the tower makes per tile, what the edge sends indices for: the patches (SigLIP, OneVision's
        tower, has no CLS token; another tower's counts too)."""
        vision = self.vision_config
        has_cls = vision.model_type != "siglip_vision_model"
        return (vision.image_size // vision.patch_size) ** 2 + int(has_cls)

    @classmethod
    def from_onevision_config(cls, config: LlavaOnevisionConfig, **vq_options) -> "LlavaOnevisionAlignedVQConfig":
        """The config of ``config``'s model with AlignedVQ options ``vq_options`` added."""
        values = config.to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version"):
            values.pop(key, None)
        values.update(vq_options)
        return cls(**values)


__all__ = ["LlavaOnevisionAlignedVQConfig"]
