"""LLaVA-OneVision with an AlignedVQ split inside its SigLIP vision tower.

`LlavaOnevisionAlignedVQForConditionalGeneration` is `LlavaOnevisionForConditionalGeneration` with one extra
submodule, ``model.alignedvq``; every base parameter keeps its name.

A OneVision image is a base view plus any-resolution tiles (the processor picks the tile grid from the image
size and ``image_grid_pinpoints``); the tower runs every tile on its own. The edge therefore sends indices per
tile, ``(num_tiles, tokens_per_tile[, codes])`` for the whole batch, tiles in the tower's order (image by image,
base view first), and the cloud needs each image's ``image_sizes`` to know how many tiles belong to it and how
to lay them out (`LlavaOnevisionAdapter.geometry`).

How it extends OneVision: ``model.get_image_features`` is overridden to run the split tower, from pixels or
from indices; the stock forward calls it for pixels, and images given as indices enter through the parent's
own pre-encoded channel ``mm_encoder_outputs`` (which generation also uses), so the language model, the
packing of tiles (un-padding, the anyres_max_9 downsample, newlines) and the placeholder checks are OneVision's.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionCausalLMOutputWithPast,
    LlavaOnevisionModel,
    LlavaOnevisionMultiModalProjector,
    LlavaOnevisionPreTrainedModel,
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
)

from ..family import FamilyAdapter, FrameGeometry, patch_grid
from ..llava_alignedvq.modeling_alignedvq import with_parent_signature
from ..tiled_alignedvq import TiledAlignedVQGenerationMixin, TiledAlignedVQModelMixin, tile_modules
from .configuration_llava_onevision_alignedvq import LlavaOnevisionAlignedVQConfig

_PARENT_FORWARD = inspect.signature(LlavaOnevisionForConditionalGeneration.forward)
_HAS_MM_ENCODER_OUTPUTS = "mm_encoder_outputs" in _PARENT_FORWARD.parameters


class LlavaOnevisionAdapter(FamilyAdapter):
    """LLaVA-OneVision: SigLIP tiles (base view first, then the any-resolution grid row by row)."""

    name = "llava_onevision"
    parent_classes = ("LlavaOnevisionForConditionalGeneration",)
    model_types = ("llava_onevision",)

    @classmethod
    def geometry(cls, config, image_sizes: Sequence, batch_num_images: Sequence[int] | None = None) -> FrameGeometry:
        """OneVision's own rule (`LlavaOnevisionModel.get_image_features`): an image alone in its sample is
        tiled by the best-fitting pinpoint plus its base view; in a multi-image sample each image is its base
        view only. Counts come from Transformers' own functions, so both ends agree on one release."""
        if image_sizes is None:
            raise ValueError("LLaVA-OneVision needs image_sizes ((height, width) per image) to lay out its tiles.")
        sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else [list(s) for s in image_sizes]
        if any(len(size) != 2 or min(size) < 1 for size in sizes):
            raise ValueError(f"image_sizes must be (height, width) pairs of positive ints, got {sizes}.")
        if batch_num_images is None:
            tiled = [True] * len(sizes)
        else:
            tiled = [n == 1 for n in batch_num_images for _ in range(n)]
        if len(tiled) != len(sizes):
            raise ValueError(f"batch_num_images sums to {len(tiled)} images, image_sizes has {len(sizes)}.")
        tile, pinpoints = config.vision_config.image_size, config.image_grid_pinpoints
        counts = tuple(image_size_to_num_patches(size, pinpoints, tile) if t else 1 for size, t in zip(sizes, tiled))
        grids = tuple(
            tuple(get_anyres_image_grid_shape(size, pinpoints, tile)) if t else (0, 0) for size, t in zip(sizes, tiled)
        )
        return FrameGeometry(counts, grids, patch_grid(config.vision_config), config.tokens_per_tile)

    @classmethod
    def convert(cls, vlm, **vq_options) -> nn.Module:
        return LlavaOnevisionAlignedVQForConditionalGeneration.from_onevision(vlm, **vq_options)


@dataclass
class LlavaOnevisionAlignedVQCausalLMOutputWithPast(LlavaOnevisionCausalLMOutputWithPast):
    r"""
    [`LlavaOnevisionCausalLMOutputWithPast`] plus the AlignedVQ terms of [`AlignedVQImageOutput`].

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


class LlavaOnevisionAlignedVQModel(TiledAlignedVQModelMixin, LlavaOnevisionModel):
    """[`LlavaOnevisionModel`] whose vision tower is split by ``self.alignedvq``."""

    config_class = LlavaOnevisionAlignedVQConfig
    config: LlavaOnevisionAlignedVQConfig
    adapter = LlavaOnevisionAdapter
    projector_class = LlavaOnevisionMultiModalProjector

    def __init__(self, config: LlavaOnevisionAlignedVQConfig):
        LlavaOnevisionPreTrainedModel.__init__(self, config)
        tile_modules(self, config)
        self.post_init()

    def pack(self, projected, image_sizes, strategy: str, aspect_ratio: str | None) -> list:
        packed, _ = self.pack_image_features(projected, image_sizes, image_newline=self.image_newline,
                                             vision_aspect_ratio=aspect_ratio or self.config.vision_aspect_ratio)
        return packed


class LlavaOnevisionAlignedVQForConditionalGeneration(
    TiledAlignedVQGenerationMixin, LlavaOnevisionForConditionalGeneration, GenerationMixin
):
    """LLaVA-OneVision split by AlignedVQ for edge-cloud inference.

    Example:

    ```python
    >>> model = LlavaOnevisionAlignedVQForConditionalGeneration.from_onevision(onevision, codebook_size=4096)
    >>> model.init_codebook([{"pixel_values": pixels, "image_sizes": sizes}])
    >>> indices = model.encode_edge(pixels, sizes)               # on the device: (num_tiles, 729) ints
    >>> out = model.forward_from_indices(indices, image_sizes=sizes, input_ids=input_ids)
    >>> tokens = model.generate(input_ids=input_ids, image_indices=indices, image_sizes=sizes)
    ```
    """

    config_class = LlavaOnevisionAlignedVQConfig
    config: LlavaOnevisionAlignedVQConfig
    parent_class = LlavaOnevisionForConditionalGeneration
    output_class = LlavaOnevisionAlignedVQCausalLMOutputWithPast

    def __init__(self, config: LlavaOnevisionAlignedVQConfig):
        if not _HAS_MM_ENCODER_OUTPUTS:
            raise ImportError("LLaVA-OneVision with AlignedVQ needs transformers>=5.19 (forward's mm_encoder_outputs).")
        LlavaOnevisionPreTrainedModel.__init__(self, config)
        self.model = LlavaOnevisionAlignedVQModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_onevision(cls, onevision, *, load_kwargs: dict | None = None, **vq_options):
        """Add AlignedVQ to a `LlavaOnevisionForConditionalGeneration` or a path / Hub id of one (`from_base`)."""
        return cls.from_base(onevision, load_kwargs=load_kwargs, **vq_options)

    @with_parent_signature(LlavaOnevisionForConditionalGeneration.forward, image_indices=None)
    def forward(self, *args, **kwargs) -> LlavaOnevisionAlignedVQCausalLMOutputWithPast | tuple:
        r"""
        [`LlavaOnevisionForConditionalGeneration.forward`] (same arguments), with the image given as
        `pixel_values` (edge and cloud in one pass) or as `image_indices` `(num_tiles, tokens_per_tile[, codes])`
        (cloud only), `image_sizes` `(images, 2)` either way. In evaluation mode the result from pixels equals
        `forward_from_indices(encode_edge(pixel_values, image_sizes), image_sizes=image_sizes)` exactly.
        """
        return self._split_forward(LlavaOnevisionAlignedVQForConditionalGeneration.forward, args, kwargs)


__all__ = [
    "LlavaOnevisionAdapter",
    "LlavaOnevisionAlignedVQCausalLMOutputWithPast",
    "LlavaOnevisionAlignedVQForConditionalGeneration",
    "LlavaOnevisionAlignedVQModel",
]
