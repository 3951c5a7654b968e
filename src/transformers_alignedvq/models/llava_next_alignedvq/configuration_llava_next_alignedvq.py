"""Configuration of a LLaVA-NeXT model split by AlignedVQ."""

from __future__ import annotations

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import LlavaNextConfig

from ..llava_alignedvq.configuration_alignedvq import AlignedVQConfig


@strict
class LlavaNextAlignedVQConfig(LlavaNextConfig):
    r"""
    [`LlavaNextConfig`] plus where and how the vision tower is vector-quantized.

    The AlignedVQ arguments (``split_layer``, ``split_site``, ``codebook_size``, ``num_codebooks``,
    ``num_groups``, ``codebook_dim``, ``use_dlp``, ``commitment_weight``, ``ema_decay``,
    ``dead_code_threshold``, ``checkpoint_kind``, ``base_model_name_or_path``, ``base_model_revision``) mean
    what they mean in [`AlignedVQConfig`] and are validated by the same code. Every tile runs through the CLIP
    tower on its own, so a site is local to its tile; a tile makes ``(image_size // patch_size)**2 + 1`` tokens
    (CLS included, as in LLaVA-1.5), and one codebook serves all tiles.
    """

    model_type = "llava_next_alignedvq"

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

    # One definition of the options' rules for every family (they read only the fields above, `vision_config`
    # and `vision_feature_layer`).
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
        """Tokens the tower makes per tile: the patches, plus a CLS token unless the tower is SigLIP."""
        vision = self.vision_config
        has_cls = vision.model_type != "siglip_vision_model"
        return (vision.image_size // vision.patch_size) ** 2 + int(has_cls)


__all__ = ["LlavaNextAlignedVQConfig"]
