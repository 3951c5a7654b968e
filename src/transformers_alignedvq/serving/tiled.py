"""Serving the any-resolution families (LLaVA-NeXT, LLaVA-OneVision): what differs from LLaVA-1.5's one image of
fixed size is held here, in `TiledImages`, which the engine asks instead of a fixed token count.

* A frame must carry its geometry (`wire_geometry`): one image, its size, its tile count and grid. The server
  checks it against the served model before decoding the payload: the tile count and grid must be what the
  model's own tiling rule (its family adapter, over the config's ``image_grid_pinpoints``, the tile-grid cap
  both ends share) makes for that image size, so a grid outside the pinpoints cannot pass; tokens per tile, the
  per-tile patch grid and CLS token must be the model's. A frame that breaks any of these is a
  ``geometry mismatch`` (422); a frame whose geometry contradicts itself was refused by the decoder (400).
* The prompt holds as many image placeholders as the model's packing makes for that size (un-padding,
  OneVision's downsample, newlines), counted by that packing itself on meta tensors (no memory, no compute), so
  it cannot drift from the model.
* A batch's images are the tiles of all its requests, in order, with their ``image_sizes``.

`FamilyImages` holds what this contract shares with Qwen2.5-VL's (`qwen.QwenImages`).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import torch

from .. import wire
from ..wire_geometry import KIND_TILES, WireGeometry, max_section_bytes, tokens_per_tile


def _mismatch(message: str) -> wire.WireFormatError:
    return wire.WireFormatError(f"geometry mismatch: {message}")


class FamilyImages:
    """What the frame contracts of the families whose images vary share (`TiledImages`, `qwen.QwenImages`): the
    served model and its codes, the common ``/v1/model`` fields, a frame's one image and the edge run here."""

    kind: int  # the `wire_geometry` kind its frames carry
    entropy_coding: bool  # whether its frames may be coded with an entropy model

    def __init__(self, model):
        self.model, self.config, self.adapter = model, model.config, model.model.adapter
        self.codes = self.config.codes_per_token

    def _summary(self, fingerprint: bytes, **fields: Any) -> dict[str, Any]:
        config = self.config
        return {
            "family": self.adapter.name, "split_layer": config.split_layer, "split_site": config.split_site,
            "codebook_size": config.codebook_size, "bits_per_index": wire.bits_per_index(config.codebook_size),
            "num_codebooks": config.num_codebooks, "num_groups": config.num_groups, "codes_per_token": self.codes,
            **fields, "codebook_fingerprint": fingerprint.hex(),
        }

    def _one_image(self, geometry: WireGeometry | None, *, missing: str, other_kind: str):
        """The frame's one image, of this family's kind; a geometry mismatch saying ``missing`` (no section) or
        ``other_kind`` otherwise."""
        if geometry is None:
            raise _mismatch(missing)
        if geometry.kind != self.kind:
            raise _mismatch(other_kind)
        if len(geometry.images) != 1:
            raise _mismatch(f"the frame carries {len(geometry.images)} images; send one per request")
        return geometry.images[0]

    def _encode_edge(self, pixels: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        """The model's edge on the image processor's ``pixels`` and layout tensor, on the model's device."""
        device = self.model.model.alignedvq.quantizer.codebook.device
        return self.model.encode_edge(pixels.to(device), layout.to(device)).cpu()


class TiledImages(FamilyImages):
    """The frame contract of a served any-resolution model (see the module docstring)."""

    kind = KIND_TILES
    entropy_coding = True  # tile by tile, with a model fitted on single tiles

    def __init__(self, model):
        super().__init__(model)
        config = self.config
        vision = config.vision_config
        self.tile_size, self.patch_size = vision.image_size, vision.patch_size
        side = vision.image_size // vision.patch_size
        self.patch_grid = (side, side)
        self.tokens_per_tile = config.tokens_per_tile
        self.has_cls_token = self.tokens_per_tile == side * side + 1
        self.pinpoints = [list(p) for p in config.image_grid_pinpoints]
        self.max_tiles = max((h // self.tile_size) * (w // self.tile_size) for h, w in self.pinpoints) + 1
        self.image_tokens = functools.lru_cache(maxsize=4096)(self._image_tokens)

    @staticmethod
    def serves(model) -> bool:
        """Whether ``model`` is an any-resolution AlignedVQ model (a family adapter and tiles)."""
        return hasattr(getattr(model, "model", None), "adapter") and hasattr(model.config, "tokens_per_tile")

    def summary(self, fingerprint: bytes) -> dict[str, Any]:
        """The edge/cloud contract for ``/v1/model``: ``num_tokens`` and ``grid`` are one tile's."""
        return self._summary(
            fingerprint, num_tokens=self.tokens_per_tile, tokens_per_tile=self.tokens_per_tile,
            grid=list(self.patch_grid), has_cls_token=self.has_cls_token, image_size=self.tile_size,
            patch_size=self.patch_size, image_grid_pinpoints=self.pinpoints, max_tiles_per_image=self.max_tiles)

    def max_frame_bytes(self, *, prompt_bytes: int, entropy_coded: bool) -> int:
        """The largest frame of one image at the model's largest tiling, with a prompt of ``prompt_bytes``."""
        return wire.max_frame_bytes(
            codebook_size=self.config.codebook_size, num_tokens=self.max_tiles * self.tokens_per_tile,
            codes_per_token=self.codes, grid=self.patch_grid,
            prompt_bytes=prompt_bytes, entropy_coded=entropy_coded) + max_section_bytes()

    # -- frames -------------------------------------------------------------------------------------------
    def check(self, *, geometry: WireGeometry | None, num_tokens: int, grid, has_cls_token: bool) -> None:
        """`wire.decode_frame`'s ``check_geometry``: the frame's layout is one this model's preprocessing makes."""
        image = self._one_image(
            geometry, other_kind="the frame carries patch grids; this model takes any-resolution tiles",
            missing=f"this {self.adapter.name} model takes tiled images: the frame must carry its image size, tile "
                    "count and grid (a geometry section)")
        try:
            expected = self.adapter.geometry(self.config, [image.image_size])
        except (ValueError, ArithmeticError) as exc:
            raise _mismatch(f"this model cannot tile an image of {image.image_size}: {exc}") from None
        made = (expected.tiles_per_image[0], tuple(expected.tile_grids[0]))
        if (image.tiles, image.grid) != made:
            raise _mismatch(
                f"an image of {image.image_size[0]}x{image.image_size[1]} is {made[0]} tiles ({made[1][0]}x{made[1][1]} "
                f"grid + base view) under this model's pinpoints, the frame has {image.tiles} ({image.grid[0]}x"
                f"{image.grid[1]}); edge and cloud must tile with the same image_grid_pinpoints")
        per_tile = tokens_per_tile(geometry, num_tokens)
        if per_tile != self.tokens_per_tile:
            raise _mismatch(f"{per_tile} tokens per tile, this model makes {self.tokens_per_tile}; check the vision "
                            "tower and tile size")
        if grid is not None and (tuple(grid), has_cls_token) != (self.patch_grid, self.has_cls_token):
            raise _mismatch(f"patch grid {grid[0]}x{grid[1]} (CLS {has_cls_token}) per tile, this model makes "
                            f"{self.patch_grid[0]}x{self.patch_grid[1]} (CLS {self.has_cls_token})")

    def encode_processed(self, inputs) -> tuple[torch.Tensor, tuple[int, int]]:
        """The edge run in the server on the image processor's output for one image: every tile in the model's
        order ``(tokens, codes)`` and the image's ``(height, width)``."""
        sizes = inputs["image_sizes"]
        indices = self._encode_edge(inputs["pixel_values"], sizes)
        return indices.reshape(-1, *indices.shape[2:]), tuple(int(side) for side in sizes[0])

    def _image_tokens(self, image_size: tuple[int, int]) -> int:
        """Placeholders the model's packing makes for an image of ``image_size``, counted on meta tensors."""
        geometry = self.adapter.geometry(self.config, [image_size])
        strategy = self.config.vision_feature_select_strategy
        tokens = self.tokens_per_tile - (1 if strategy == "default" and self.has_cls_token else 0)
        hidden = self.config.text_config.hidden_size
        features = [torch.empty(geometry.num_tiles, tokens, hidden, device="meta")]
        packed = self.model.model.pack(features, torch.tensor([image_size]), strategy, None)
        return int(packed[0].shape[0])

    # -- batches ------------------------------------------------------------------------------------------
    def generate_inputs(self, indices: Sequence[torch.Tensor], image_sizes: Sequence[tuple[int, int]]) -> dict:
        """``image_indices`` ``(tiles, tokens_per_tile[, codes])`` and ``image_sizes`` of a batch's images."""
        tiles = torch.cat(list(indices)).reshape(-1, self.tokens_per_tile, self.codes)
        return {"image_indices": tiles.squeeze(-1) if self.codes == 1 else tiles,
                "image_sizes": torch.tensor([list(size) for size in image_sizes], dtype=torch.long)}

    def warmup_image(self) -> tuple[torch.Tensor, tuple[int, int]]:
        """Zero indices of a one-tile-size image, for the start-up generate."""
        size = (self.tile_size, self.tile_size)
        tiles = self.adapter.geometry(self.config, [size]).num_tiles
        return torch.zeros(tiles * self.tokens_per_tile, self.codes, dtype=torch.long), size


def refuse_geometry(num_tokens: int):
    """LLaVA-1.5's ``check_geometry``: one image of ``num_tokens`` tokens per frame, no geometry section."""

    def check(*, geometry: WireGeometry | None, **_: Any) -> None:
        if geometry is not None:
            raise _mismatch(f"this model takes one image of {num_tokens} tokens per frame; the frame carries "
                            f"{len(geometry.images)} image(s) with a geometry section")

    return check


__all__ = ["FamilyImages", "TiledImages", "refuse_geometry"]
