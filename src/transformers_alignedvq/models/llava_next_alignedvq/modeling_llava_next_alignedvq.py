"""LLaVA-NeXT with an AlignedVQ split inside its CLIP vision tower.

`LlavaNextAlignedVQForConditionalGeneration` is `LlavaNextForConditionalGeneration` with one extra submodule,
``model.alignedvq``; every base parameter keeps its name. Images travel as indices per tile (base view first,
then the any-resolution grid), ``(num_tiles, tokens_per_tile[, codes])``, with each image's ``image_sizes``;
the shared tile logic is `models/tiled_alignedvq.py`, and un-padding and newlines are LLaVA-NeXT's own code.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextCausalLMOutputWithPast,
    LlavaNextModel,
    LlavaNextMultiModalProjector,
    LlavaNextPreTrainedModel,
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from ..family import FamilyAdapter, FrameGeometry, patch_grid
from ..llava_alignedvq.modeling_alignedvq import with_parent_signature
from ..tiled_alignedvq import TiledAlignedVQGenerationMixin, TiledAlignedVQModelMixin, tile_modules
from .configuration_llava_next_alignedvq import LlavaNextAlignedVQConfig

_PARENT_FORWARD = inspect.signature(LlavaNextForConditionalGeneration.forward)
_HAS_MM_ENCODER_OUTPUTS = "mm_encoder_outputs" in _PARENT_FORWARD.parameters


class LlavaNextAdapter(FamilyAdapter):
    """LLaVA-NeXT: CLIP tiles (base view first, then the any-resolution grid row by row); every image tiled."""

    name = "llava_next"
    parent_classes = ("LlavaNextForConditionalGeneration",)
    model_types = ("llava_next",)

    @classmethod
    def geometry(cls, config, image_sizes: Sequence, batch_num_images: Sequence[int] | None = None) -> FrameGeometry:
        """LLaVA-NeXT's rule (`LlavaNextModel.get_image_features`), with Transformers' own functions."""
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes ((height, width) per image) to lay out its tiles.")
        if batch_num_images is not None:
            raise ValueError("LLaVA-NeXT tiles every image; batch_num_images is a LLaVA-OneVision argument.")
        sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else [list(s) for s in image_sizes]
        if any(len(size) != 2 or min(size) < 1 for size in sizes):
            raise ValueError(f"image_sizes must be (height, width) pairs of positive ints, got {sizes}.")
        tile, pinpoints = config.vision_config.image_size, config.image_grid_pinpoints
        counts = tuple(image_size_to_num_patches(size, pinpoints, tile) for size in sizes)
        grids = tuple(tuple(get_anyres_image_grid_shape(size, pinpoints, tile)) for size in sizes)
        return FrameGeometry(counts, grids, patch_grid(config.vision_config), config.tokens_per_tile)

    @classmethod
    def convert(cls, vlm, **vq_options) -> nn.Module:
        return LlavaNextAlignedVQForConditionalGeneration.from_next(vlm, **vq_options)


@dataclass
class LlavaNextAlignedVQCausalLMOutputWithPast(LlavaNextCausalLMOutputWithPast):
    r"""
    [`LlavaNextCausalLMOutputWithPast`] plus the AlignedVQ terms of [`AlignedVQImageOutput`].

    loss (`torch.FloatTensor` of shape `()`, *optional*):
        `lm_loss + commitment_weight * commitment_loss` when `labels` are given.
    lm_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Next-token loss alone.
    image_indices (`torch.LongTensor` of shape `(num_tiles, tokens_per_tile[, codes_per_token])`):
        What crossed (or would cross) the link, tiles in the tower's order.
    """

    lm_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    codebook_perplexity: torch.FloatTensor | None = None
    codebook_usage: torch.FloatTensor | None = None
    image_indices: torch.LongTensor | None = None


class LlavaNextAlignedVQModel(TiledAlignedVQModelMixin, LlavaNextModel):
    """[`LlavaNextModel`] whose vision tower is split by ``self.alignedvq``."""

    config_class = LlavaNextAlignedVQConfig
    config: LlavaNextAlignedVQConfig
    adapter = LlavaNextAdapter
    projector_class = LlavaNextMultiModalProjector

    def __init__(self, config: LlavaNextAlignedVQConfig):
        LlavaNextPreTrainedModel.__init__(self, config)
        tile_modules(self, config)
        self.post_init()

    def pack(self, projected, image_sizes, strategy: str, aspect_ratio: str | None) -> list:
        packed, _ = self.pack_image_features(projected, image_sizes, vision_feature_select_strategy=strategy,
                                             image_newline=self.image_newline)
        return packed


class LlavaNextAlignedVQForConditionalGeneration(
    TiledAlignedVQGenerationMixin, LlavaNextForConditionalGeneration, GenerationMixin
):
    """LLaVA-NeXT split by AlignedVQ for edge-cloud inference (same entry points as the OneVision variant:
    `encode_edge(pixel_values, image_sizes)`, `forward_from_indices`, `generate(image_indices=...)`)."""

    config_class = LlavaNextAlignedVQConfig
    config: LlavaNextAlignedVQConfig
    parent_class = LlavaNextForConditionalGeneration
    output_class = LlavaNextAlignedVQCausalLMOutputWithPast

    def __init__(self, config: LlavaNextAlignedVQConfig):
        if not _HAS_MM_ENCODER_OUTPUTS:
            raise ImportError("LLaVA-NeXT with AlignedVQ needs transformers>=5.19 (forward's mm_encoder_outputs).")
        LlavaNextPreTrainedModel.__init__(self, config)
        self.model = LlavaNextAlignedVQModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_next(cls, llava_next, *, load_kwargs: dict | None = None, **vq_options):
        """Add AlignedVQ to a `LlavaNextForConditionalGeneration` or a path / Hub id of one (`from_base`)."""
        return cls.from_base(llava_next, load_kwargs=load_kwargs, **vq_options)

    @with_parent_signature(LlavaNextForConditionalGeneration.forward, image_indices=None)
    def forward(self, *args, **kwargs) -> LlavaNextAlignedVQCausalLMOutputWithPast | tuple:
        r"""
        [`LlavaNextForConditionalGeneration.forward`] (same arguments), with the image given as `pixel_values`
        or as `image_indices` `(num_tiles, tokens_per_tile[, codes])`, `image_sizes` `(images, 2)` either way.
        In evaluation mode the result from pixels equals the result from `encode_edge`'s indices exactly.
        """
        return self._split_forward(LlavaNextAlignedVQForConditionalGeneration.forward, args, kwargs)


__all__ = [
    "LlavaNextAdapter",
    "LlavaNextAlignedVQCausalLMOutputWithPast",
    "LlavaNextAlignedVQForConditionalGeneration",
    "LlavaNextAlignedVQModel",
]
