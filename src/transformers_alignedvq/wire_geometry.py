"""The geometry section of a wire frame: how its indices are laid out over images, tiles and patch grids.

A LLaVA-1.5 frame is one image of a fixed token count, so its header's ``T`` (and grid) say everything. The
any-resolution families (LLaVA-NeXT, LLaVA-OneVision) send a variable number of tiles per image, and
Qwen2.5-VL a variable patch grid; the cloud needs that layout to un-pad, pack and position the features, and
must check it before it decodes a payload whose size it sets. A version-2 frame with flag bit 4 (``0x10``)
carries this section after its coder fields (coder 0: after ``K, T, C`` and the grid; coder 1: after the entropy
model's id) and before the prompt::

    varint kind          1: tiles (any-resolution), 2: patch grids
    varint images        1..MAX_IMAGES
    kind 1, per image:   varint height, width (the original image, pixels), tiles (base view included),
                         rows, cols (the any-resolution grid; 0, 0 for an image sent as its base view only)
    kind 2, per image:   varint t, h, w (the patch grid, as ``image_grid_thw``)

Kind 1: ``tiles == rows * cols + 1`` (or ``1`` with a ``0 x 0`` grid), and the frame's ``T`` tokens are
``sum(tiles) * tokens_per_tile``, tiles in order (image by image, base view first, then the grid row by row);
a recorded grid (flag bit 1) is then one tile's patch grid. Kind 2: ``T == sum(t * h * w)``, no grid flag.

This module depends on nothing but the package's errors: it runs on the edge. Every violation is a
`WireFormatError` whose message starts with ``invalid geometry:`` (a frame that contradicts itself) or
``frame truncated:`` (from the frame reader).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

from .errors import WireFormatError

KIND_TILES = 1
KIND_PATCHES = 2
MAX_IMAGES = 64
# Per frame, whatever the images: LLaVA-OneVision's largest image is 37 tiles, LLaVA-NeXT's 5. The bound keeps
# a decoder's work finite before any model-specific check (a server checks its own, smaller cap first).
MAX_FRAME_TILES = 256
MAX_GRID_SIDE = 32  # tiles along one side of an any-resolution grid (OneVision's largest pinpoint: 6)
MAX_IMAGE_SIDE = 2**16 - 1
MAX_PATCH_SIDE = 2**16 - 1
MAX_PATCH_TOKENS = 2**20  # t * h * w of one image (Qwen2.5-VL's published maximum: 65,536 patches)


def _invalid(message: str) -> WireFormatError:
    return WireFormatError(f"invalid geometry: {message}")


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise _invalid(f"{what} must be an integer, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise _invalid(f"{what} must be an integer, got {type(value).__name__}") from None


def _pair(value: Any, what: str) -> tuple[int, int]:
    try:
        first, second = value
    except (TypeError, ValueError):
        raise _invalid(f"{what} must be a pair, got {value!r}") from None
    return _int(first, what), _int(second, what)


@dataclass(frozen=True)
class TiledImage:
    """One image sent as tiles: ``image_size`` ``(height, width)`` of the original, ``tiles`` (base view
    included) and the any-resolution ``grid`` ``(rows, cols)`` (``(0, 0)``: the base view only)."""

    image_size: tuple[int, int]
    tiles: int
    grid: tuple[int, int]

    def __post_init__(self) -> None:
        height, width = _pair(self.image_size, "image_size")
        rows, cols = _pair(self.grid, "tile grid")
        tiles = _int(self.tiles, "tile count")
        object.__setattr__(self, "image_size", (height, width))
        object.__setattr__(self, "grid", (rows, cols))
        object.__setattr__(self, "tiles", tiles)
        if not (1 <= height <= MAX_IMAGE_SIDE and 1 <= width <= MAX_IMAGE_SIDE):
            raise _invalid(f"image size {height}x{width} needs sides in 1..{MAX_IMAGE_SIDE}")
        if not (0 <= rows <= MAX_GRID_SIDE and 0 <= cols <= MAX_GRID_SIDE) or (rows == 0) != (cols == 0):
            raise _invalid(f"tile grid {rows}x{cols} needs both sides in 1..{MAX_GRID_SIDE}, or both 0 (base view "
                           "only)")
        if tiles != rows * cols + 1:
            raise _invalid(f"{tiles} tiles do not add up to a {rows}x{cols} grid plus the base view "
                           f"({rows * cols + 1})")

    @property
    def layout(self) -> tuple[int, int]:
        """What the cloud arranges this image's features by besides its indices: its size (un-padding)."""
        return self.image_size


@dataclass(frozen=True)
class PatchGridImage:
    """One image sent as a grid of patches ``grid_thw`` ``(t, h, w)`` (Qwen2.5-VL's ``image_grid_thw``)."""

    grid_thw: tuple[int, int, int]

    def __post_init__(self) -> None:
        try:
            t, h, w = (_int(side, "patch grid") for side in self.grid_thw)
        except (TypeError, ValueError):
            raise _invalid(f"patch grid must be (t, h, w), got {self.grid_thw!r}") from None
        object.__setattr__(self, "grid_thw", (t, h, w))
        if not all(1 <= side <= MAX_PATCH_SIDE for side in (t, h, w)) or t * h * w > MAX_PATCH_TOKENS:
            raise _invalid(f"patch grid {t}x{h}x{w} needs sides in 1..{MAX_PATCH_SIDE} and at most "
                           f"{MAX_PATCH_TOKENS} patches")

    @property
    def tokens(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w

    @property
    def layout(self) -> tuple[int, int, int]:
        """What the cloud arranges this image's features by besides its indices: its patch grid."""
        return self.grid_thw


@dataclass(frozen=True)
class WireGeometry:
    """A frame's layout: one entry per image, all `TiledImage` or all `PatchGridImage`."""

    images: tuple

    def __post_init__(self) -> None:
        images = tuple(self.images)
        object.__setattr__(self, "images", images)
        if not 1 <= len(images) <= MAX_IMAGES:
            raise _invalid(f"a frame holds 1..{MAX_IMAGES} images, got {len(images)}")
        if not (all(isinstance(i, TiledImage) for i in images) or all(isinstance(i, PatchGridImage) for i in images)):
            raise _invalid("images must be all TiledImage or all PatchGridImage")
        if self.kind == KIND_TILES and self.num_tiles > MAX_FRAME_TILES:
            raise _invalid(f"too many tiles: {self.num_tiles} in one frame, at most {MAX_FRAME_TILES}")

    @classmethod
    def tiled(cls, image_sizes, tiles_per_image, tile_grids) -> WireGeometry:
        """From the family adapter's `FrameGeometry` fields (``tiles_per_image``, ``tile_grids``) and the
        ``image_sizes`` ``(height, width)`` they were computed from (lists, tuples or a tensor's ``tolist()``)."""
        sizes, counts, grids = (list(v.tolist() if hasattr(v, "tolist") else v)
                                for v in (image_sizes, tiles_per_image, tile_grids))
        if not len(sizes) == len(counts) == len(grids):
            raise _invalid(f"{len(sizes)} image sizes, {len(counts)} tile counts and {len(grids)} grids differ")
        return cls(tuple(TiledImage(tuple(s), c, tuple(g)) for s, c, g in zip(sizes, counts, grids)))

    @classmethod
    def patch_grids(cls, grids_thw) -> WireGeometry:
        grids = grids_thw.tolist() if hasattr(grids_thw, "tolist") else grids_thw
        return cls(tuple(PatchGridImage(tuple(g)) for g in grids))

    @property
    def kind(self) -> int:
        return KIND_TILES if isinstance(self.images[0], TiledImage) else KIND_PATCHES

    @property
    def num_tiles(self) -> int:
        """Tiles of the whole frame (kind 1); for patch grids, the images."""
        return sum(image.tiles for image in self.images) if self.kind == KIND_TILES else len(self.images)

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        return [image.image_size for image in self.images] if self.kind == KIND_TILES else []

    @property
    def tiles_per_image(self) -> tuple[int, ...]:
        return tuple(image.tiles for image in self.images) if self.kind == KIND_TILES else ()

    @property
    def tile_grids(self) -> tuple[tuple[int, int], ...]:
        return tuple(image.grid for image in self.images) if self.kind == KIND_TILES else ()


def tokens_per_tile(geometry: WireGeometry, num_tokens: int) -> int | None:
    """The tokens of one tile (kind 1), after checking that ``num_tokens`` fits the layout; None for patch
    grids (whose images have their own counts, checked here too)."""
    if geometry.kind == KIND_PATCHES:
        total = sum(image.tokens for image in geometry.images)
        if total != num_tokens:
            raise _invalid(f"the patch grids make {total} tokens, the frame has {num_tokens}")
        return None
    if num_tokens % geometry.num_tiles:
        raise _invalid(f"{num_tokens} tokens do not divide into {geometry.num_tiles} tiles")
    return num_tokens // geometry.num_tiles


def _varint(value: int) -> bytes:
    """LEB128, as every varint of a frame (`wire` writes its own fields with this one too)."""
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_section(geometry: WireGeometry) -> bytes:
    """The section's bytes (see the module docstring)."""
    if not isinstance(geometry, WireGeometry):
        raise WireFormatError(f"geometry must be a WireGeometry, got {type(geometry).__name__}")
    fields = [geometry.kind, len(geometry.images)]
    for image in geometry.images:
        if geometry.kind == KIND_TILES:
            fields += [*image.image_size, image.tiles, *image.grid]
        else:
            fields += list(image.grid_thw)
    return b"".join(_varint(value) for value in fields)


def frame_fields(geometry: WireGeometry | None, num_tokens: int, grid: Any, has_cls_token: Any) -> tuple[bytes, int, int]:
    """For the encoder: the section's bytes, the tile count, and the tokens one tile has (without a section, or
    for patch grids, the frame's): what a recorded grid and an entropy model must match."""
    if geometry is None:
        return b"", 1, num_tokens
    section, per_tile = encode_section(geometry), tokens_per_tile(geometry, num_tokens)
    if per_tile is None:  # patch grids: each image has its own count, so there is no one grid to record
        if grid is not None or has_cls_token:
            raise _invalid("a frame of patch grids records no grid= or CLS token")
        return section, len(geometry.images), num_tokens
    return section, geometry.num_tiles, per_tile


def read_section(reader) -> WireGeometry:
    """The section read by ``reader`` (``reader.varint(what)`` returns one varint or raises), checked as it is
    read so that a bad count stops the work at once."""
    kind = reader.varint("geometry kind")
    if kind not in (KIND_TILES, KIND_PATCHES):
        raise _invalid(f"unknown geometry kind {kind} (1: tiles, 2: patch grids)")
    count = reader.varint("image count")
    if not 1 <= count <= MAX_IMAGES:
        raise _invalid(f"a frame holds 1..{MAX_IMAGES} images, got {count}")
    images, tiles = [], 0
    for index in range(count):
        if kind == KIND_TILES:
            size = (reader.varint(f"image {index} height"), reader.varint(f"image {index} width"))
            image = _image(index, TiledImage, size, reader.varint(f"image {index} tile count"),
                           (reader.varint(f"image {index} grid rows"), reader.varint(f"image {index} grid cols")))
            tiles += image.tiles
            if tiles > MAX_FRAME_TILES:
                raise _invalid(f"too many tiles: more than {MAX_FRAME_TILES} in one frame")
        else:
            image = _image(index, PatchGridImage, tuple(reader.varint(f"image {index} patch grid") for _ in range(3)))
        images.append(image)
    return WireGeometry(tuple(images))


def _image(index: int, klass, *fields):
    try:
        return klass(*fields)
    except WireFormatError as exc:  # say which image
        raise _invalid(f"image {index}: {str(exc).removeprefix('invalid geometry: ')}") from None


def max_section_bytes(geometry_kind: int = KIND_TILES, images: int = 1) -> int:
    """The longest section of ``images`` images of a kind (every varint at its longest for the limits)."""
    per_image = (3 * 3 + 2 * 1) if geometry_kind == KIND_TILES else 3 * 3
    return 1 + 1 + images * per_image


__all__ = [
    "KIND_PATCHES",
    "KIND_TILES",
    "MAX_FRAME_TILES",
    "MAX_IMAGES",
    "PatchGridImage",
    "TiledImage",
    "WireGeometry",
    "encode_section",
    "frame_fields",
    "max_section_bytes",
    "read_section",
    "tokens_per_tile",
]
