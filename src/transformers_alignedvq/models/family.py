"""What a VLM family provides to be split by AlignedVQ, and `from_vlm`, the one entry point over families.

A family is the Transformers model class it extends plus a small stateless adapter (`FamilyAdapter`):

* ``edge``: run the vision tower up to the split site for a batch of tiles ``(tiles, channels, size, size)``;
* ``cloud``: continue the tower from recovered site features to the hidden states the projector reads;
* ``geometry``: the frame geometry of a batch of images (tiles per image, tile grid, patches per tile), which
  the edge and the cloud must agree on without sending pixels;
* ``parent_classes`` / ``model_types``: which Transformers classes and checkpoints the family converts, and
  ``convert``, which turns such a model into its AlignedVQ variant.

Every family so far has a CLIP/SigLIP-style pre-norm tower, so ``edge`` and ``cloud`` default to the LLaVA
folder's split functions; a family with another tower (Qwen2.5-VL's windowed ViT) overrides them.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .llava_alignedvq.split import cloud_forward, edge_forward


@dataclass(frozen=True)
class FrameGeometry:
    """How a batch of images is cut into tiles, each sent as ``tokens_per_tile`` rows of indices.

    Attributes:
        tiles_per_image: tiles of each image, base view included, in the tower's batch order.
        tile_grids: ``(rows, cols)`` of each image's any-resolution tiles (base view excluded); ``(0, 0)`` for an
            image sent as its base view only (LLaVA-1.5; OneVision's multi-image prompts).
        patch_grid: ``(rows, cols)`` of patches in one tile; ``(0, 0)`` where each image has its own grid.
        tokens_per_tile: tokens the tower makes per tile (the patches, plus one for a CLS token); 0 where each
            image has its own grid.
        image_patch_grids: ``(t, h, w)`` patches of each image, for a family whose tower takes every image at its
            own resolution as one grid (Qwen2.5-VL: one tile per image); ``None`` for square tiles.
    """

    tiles_per_image: tuple[int, ...]
    tile_grids: tuple[tuple[int, int], ...]
    patch_grid: tuple[int, int]
    tokens_per_tile: int
    image_patch_grids: tuple[tuple[int, int, int], ...] | None = None

    @property
    def num_tiles(self) -> int:
        return sum(self.tiles_per_image)

    @property
    def tokens_per_image(self) -> tuple[int, ...]:
        """Token rows of indices of each image."""
        if self.image_patch_grids is not None:
            return tuple(t * h * w for t, h, w in self.image_patch_grids)
        return tuple(count * self.tokens_per_tile for count in self.tiles_per_image)

    @property
    def num_tokens(self) -> int:
        """Token rows of indices for the whole batch."""
        return sum(self.tokens_per_image)


class FamilyAdapter(ABC):
    """One VLM family's answers to what the split needs; stateless (class methods over a tower and a config)."""

    name: ClassVar[str]
    parent_classes: ClassVar[tuple[str, ...]]
    model_types: ClassVar[tuple[str, ...]]

    @staticmethod
    def edge(tower: nn.Module, pixel_tiles: torch.Tensor, split_layer: int, site: str) -> torch.Tensor:
        """Tiles ``(tiles, channels, size, size)`` -> site features ``(tiles, tokens_per_tile, hidden)``."""
        return edge_forward(tower, pixel_tiles, split_layer, site)

    @staticmethod
    def cloud(
        tower: nn.Module, site_features: torch.Tensor, split_layer: int, site: str, wanted: list[int]
    ) -> dict[int, torch.Tensor]:
        """Recovered site features -> ``{hidden_state_index: (tiles, tokens_per_tile, hidden)}`` for ``wanted``."""
        return cloud_forward(tower, site_features, split_layer, site, wanted)

    @classmethod
    @abstractmethod
    def geometry(cls, config, image_sizes: Sequence, batch_num_images: Sequence[int] | None = None) -> FrameGeometry:
        """The geometry of images of ``image_sizes`` (``(height, width)`` each) under ``config``."""

    @classmethod
    @abstractmethod
    def convert(cls, vlm, **vq_options) -> nn.Module:
        """The AlignedVQ variant of ``vlm`` (a loaded model of a ``parent_classes`` class, or a path/Hub id)."""


def patch_grid(vision_config) -> tuple[int, int]:
    side = vision_config.image_size // vision_config.patch_size
    return side, side


class LlavaAdapter(FamilyAdapter):
    """LLaVA-1.5: one square tile per image, CLS token included."""

    name = "llava"
    parent_classes = ("LlavaForConditionalGeneration",)
    model_types = ("llava",)

    @classmethod
    def geometry(cls, config, image_sizes: Sequence, batch_num_images: Sequence[int] | None = None) -> FrameGeometry:
        grid = patch_grid(config.vision_config)
        count = len(image_sizes)
        return FrameGeometry((1,) * count, ((0, 0),) * count, grid, grid[0] * grid[1] + 1)

    @classmethod
    def convert(cls, vlm, **vq_options) -> nn.Module:
        from .llava_alignedvq.modeling_alignedvq import LlavaAlignedVQForConditionalGeneration

        return LlavaAlignedVQForConditionalGeneration.from_llava(vlm, **vq_options)


# Adapters by dotted path, imported on use so that a family's Transformers classes load only when needed.
FAMILY_ADAPTERS: dict[str, str] = {
    "llava": f"{__name__}:LlavaAdapter",
    "llava_next": f"{__package__}.llava_next_alignedvq.modeling_llava_next_alignedvq:LlavaNextAdapter",
    "llava_onevision": (
        f"{__package__}.llava_onevision_alignedvq.modeling_llava_onevision_alignedvq:LlavaOnevisionAdapter"
    ),
    "qwen2_5_vl": f"{__package__}.qwen2_5_vl_alignedvq.modeling_qwen2_5_vl_alignedvq:Qwen2_5_VLAdapter",
}


def family_adapter(name: str) -> type[FamilyAdapter]:
    module, _, attribute = FAMILY_ADAPTERS[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def _supported() -> str:
    names = [cls for name in FAMILY_ADAPTERS for cls in family_adapter(name).parent_classes]
    return ", ".join(names)


def adapter_for_model(model: nn.Module) -> type[FamilyAdapter]:
    """The adapter whose parent class ``model`` is; `TypeError` naming the supported classes otherwise."""
    inner = getattr(model, "model", None)
    if hasattr(inner, "alignedvq"):
        raise TypeError(f"{type(model).__name__} is already split by AlignedVQ; from_vlm takes the base VLM.")
    names = {klass.__name__ for klass in type(model).__mro__}
    for name in FAMILY_ADAPTERS:
        adapter = family_adapter(name)
        if names.intersection(adapter.parent_classes):
            return adapter
    raise TypeError(f"from_vlm supports {_supported()}; got {type(model).__name__}.")


def adapter_for_checkpoint(path: str | os.PathLike, revision: str | None = None) -> type[FamilyAdapter]:
    """The adapter for the checkpoint at ``path`` (a folder or Hub id), from its config's ``model_type``."""
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(path, revision=revision).model_type
    for name in FAMILY_ADAPTERS:
        adapter = family_adapter(name)
        if model_type in adapter.model_types:
            return adapter
    raise TypeError(f"from_vlm supports {_supported()}; {path} holds a {model_type!r} model.")


def from_vlm(model_or_id, *, load_kwargs: dict | None = None, **vq_options) -> nn.Module:
    """Turn a supported VLM into its AlignedVQ variant.

    Args:
        model_or_id: a loaded model (`LlavaForConditionalGeneration`, `LlavaNextForConditionalGeneration`,
            `LlavaOnevisionForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`; its modules are
            reused, not copied) or a Hub id / local folder holding one.
        load_kwargs: passed to the family's `from_pretrained` when ``model_or_id`` is a name.
        **vq_options: AlignedVQ config fields (``split_layer``, ``split_site``, ``codebook_size``, ...).

    Raises `TypeError` naming the supported families for any other model. The codebook is random: call the
    result's ``init_codebook`` before finetuning.
    """
    if isinstance(model_or_id, (str, os.PathLike)):
        adapter = adapter_for_checkpoint(model_or_id, (load_kwargs or {}).get("revision"))
        return adapter.convert(model_or_id, load_kwargs=load_kwargs, **vq_options)
    if load_kwargs:
        raise TypeError("load_kwargs apply only when from_vlm is given a path or Hub id, not a loaded model.")
    return adapter_for_model(model_or_id).convert(model_or_id, **vq_options)


__all__ = ["FAMILY_ADAPTERS", "FamilyAdapter", "FrameGeometry", "LlavaAdapter", "adapter_for_model", "from_vlm"]
