"""Any-resolution tiling for the edge (LLaVA-NeXT, LLaVA-OneVision), with numpy and Pillow only.

It reproduces the families' PIL-backed Transformers image processors (``LlavaNextImageProcessorPil``,
``LlavaOnevisionImageProcessorPil``) step by step: the best-fitting pinpoint (``select_best_resolution``), an
aspect-preserving resize to it, centred black padding, the cut into tiles row by row, the base view squashed to
the tile size in front, and each tile's own resize / crop / rescale / normalisation (`ImagePreprocessing`).
`tests/test_family_edge.py` checks tile counts and pixels against both processors.

Both ends must tile alike: the pinpoints come from the model's ``image_grid_pinpoints`` (capped with
`cap_pinpoints` where the bandwidth asks for it) and travel in the edge folder's ``edge_config.json``
(``"tiling"``), beside the per-tile settings (``"preprocessing"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ImagePreprocessing, load_image

_BICUBIC = 3
# Grid tiles a pinpoint may make (OneVision's largest default is 6 x 6): a bound on what an edge folder can ask a
# device to allocate per image.
MAX_GRID_TILES = 400
# The families' Transformers image processors' class defaults (the reference when a model folder has no saved
# image processor): OneVision squashes every tile to a square, NeXT resizes its shortest edge and centre-crops.
FAMILY_TILE_STEPS = {
    "llava_onevision": lambda tile: ImagePreprocessing({"height": tile, "width": tile}, _BICUBIC, None, 1 / 255,
                                                       OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    "llava_next": lambda tile: ImagePreprocessing({"shortest_edge": tile}, _BICUBIC, (tile, tile), 1 / 255,
                                                  OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
}


def select_best_resolution(size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """The pinpoint ``(height, width)`` that keeps most of an image of ``size`` ``(height, width)`` and wastes least:
    Transformers' rule, ties going to the first listed."""
    height, width = size
    best, most_kept, least_wasted = None, 0, float("inf")
    for target_height, target_width in pinpoints:
        scale = min(target_width / width, target_height / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        wasted = target_width * target_height - kept
        if kept > most_kept or (kept == most_kept and wasted < least_wasted):
            best, most_kept, least_wasted = (int(target_height), int(target_width)), kept, wasted
    return best


def fitted_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """``(height, width)`` of an image of ``size`` resized into ``target`` keeping its aspect ratio (Transformers'
    ``get_patch_output_size``: the scaled side rounded up, never past the target)."""
    (height, width), (target_height, target_width) = size, target
    scale_w, scale_h = target_width / width, target_height / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_height), target_width
    return target_height, min(math.ceil(width * scale_h), target_width)


def cap_pinpoints(pinpoints, tile_size: int, max_grid_tiles: int) -> list[list[int]]:
    """The any-resolution pinpoints whose tile grid has at most ``max_grid_tiles`` tiles (base view not counted).

    The bandwidth lever of these families: the edge sends every tile, so capping the grid caps the indices per
    image (OneVision at 2048x2048: 37 tiles with its 36 default pinpoints, 10 with ``max_grid_tiles=9``). Both
    ends must tile alike: give the result to the model (``from_vlm(..., image_grid_pinpoints=capped)``, which
    the checkpoint's config then carries), to the image processor (``image_grid_pinpoints=capped``) and so to
    the exported edge.
    """
    if not isinstance(max_grid_tiles, int) or max_grid_tiles < 1:
        raise ValueError(f"max_grid_tiles must be a positive int, got {max_grid_tiles!r}.")
    kept = [list(p) for p in pinpoints if (p[0] // tile_size) * (p[1] // tile_size) <= max_grid_tiles]
    if not kept:
        raise ValueError(f"No pinpoint of {pinpoints} has at most {max_grid_tiles} tiles of {tile_size} px.")
    return kept


@dataclass(frozen=True)
class TiledImage:
    """One image cut for the tower.

    Attributes:
        pixels: float32 ``(tiles, 3, tile, tile)``, base view first, then the grid row by row.
        image_size: ``(height, width)`` of the image as given: the ``image_sizes`` row the cloud needs.
        grid: ``(rows, cols)`` of any-resolution tiles; ``(0, 0)`` for an image sent as its base view only.
    """

    pixels: np.ndarray
    image_size: tuple[int, int]
    grid: tuple[int, int]

    @property
    def num_tiles(self) -> int:
        return int(self.pixels.shape[0])


@dataclass(frozen=True)
class TiledPreprocessing:
    """Image -> tiles as the family's image processor makes them; ``__call__`` returns a `TiledImage`.

    Attributes:
        tile: each tile's own steps (resize, crop, rescale, normalisation), as the processor applies them to the
            base view and to every grid tile.
        pinpoints: the any-resolution canvases ``(height, width)``, multiples of the tile size.
    """

    tile: ImagePreprocessing
    pinpoints: tuple[tuple[int, int], ...]

    def __post_init__(self):
        pinpoints = tuple((int(h), int(w)) for h, w in self.pinpoints)
        if not pinpoints:
            raise ValueError("the tiling needs at least one pinpoint")
        size = self.tile_size
        uneven = [list(p) for p in pinpoints if p[0] % size or p[1] % size or min(p) < size]
        if uneven:
            # Transformers' processor and model count the tiles of such a canvas differently (ceil vs floor).
            raise ValueError(f"pinpoints {uneven} are not multiples of the {size}-px tile")
        huge = [list(p) for p in pinpoints if (p[0] // size) * (p[1] // size) > MAX_GRID_TILES]
        if huge:
            raise ValueError(f"pinpoints {huge} make more than {MAX_GRID_TILES} tiles of {size} px")
        object.__setattr__(self, "pinpoints", pinpoints)

    # ----------------------------------------------------------------------------------------------------
    @classmethod
    def for_family(cls, family: str, tile_size: int, pinpoints) -> "TiledPreprocessing":
        """The family's Transformers image processor with its class defaults, at ``tile_size``."""
        if family not in FAMILY_TILE_STEPS:
            raise ValueError(f"no tiling for family {family!r}; known: {sorted(FAMILY_TILE_STEPS)}")
        return cls(FAMILY_TILE_STEPS[family](int(tile_size)), tuple(map(tuple, pinpoints)))

    @classmethod
    def from_image_processor(cls, settings: dict, pinpoints=None) -> "TiledPreprocessing":
        """From a saved LLaVA-NeXT / OneVision image processor's settings; ``pinpoints`` overrides its
        ``image_grid_pinpoints`` (the model's config is what the cloud tiles by)."""
        pinpoints = pinpoints if pinpoints is not None else settings.get("image_grid_pinpoints")
        if not pinpoints:
            raise ValueError("the image processor's settings have no image_grid_pinpoints")
        return cls(ImagePreprocessing.from_image_processor(settings), tuple(map(tuple, pinpoints)))

    def tiling_dict(self) -> dict:
        """What ``edge_config.json`` records under ``"tiling"`` (the tile steps go under ``"preprocessing"``)."""
        return {"pinpoints": [list(p) for p in self.pinpoints], "tile_size": self.tile_size}

    @classmethod
    def from_config(cls, preprocessing: dict, tiling: dict) -> "TiledPreprocessing":
        try:
            return cls(ImagePreprocessing.from_dict(preprocessing), tuple(map(tuple, tiling["pinpoints"])))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"invalid tiling settings {tiling!r}: {exc}") from None

    # ----------------------------------------------------------------------------------------------------
    @property
    def tile_size(self) -> int:
        """The side of a tile: the processor's crop, else its resize target."""
        if self.tile.crop:
            return int(self.tile.crop[0])
        resize = self.tile.resize or {}
        size = resize.get("height", resize.get("shortest_edge"))
        if size is None:
            raise ValueError(f"the tile steps {self.tile} fix no tile size (no crop, no resize)")
        return int(size)

    @property
    def base_size(self) -> tuple[int, int]:
        """``(height, width)`` the whole image is squashed to for the base view."""
        resize = self.tile.resize or {}
        if "height" in resize and "width" in resize:
            return int(resize["height"]), int(resize["width"])
        side = int(resize.get("shortest_edge", self.tile_size))
        return side, side

    def best_resolution(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return select_best_resolution(image_size, self.pinpoints)

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(rows, cols)`` of grid tiles for an image of ``image_size`` ``(height, width)``."""
        height, width = self.best_resolution(image_size)
        return height // self.tile_size, width // self.tile_size

    def num_tiles(self, image_size: tuple[int, int]) -> int:
        """Tiles of an image of ``image_size``, base view included."""
        rows, cols = self.grid(image_size)
        return rows * cols + 1

    # ----------------------------------------------------------------------------------------------------
    def __call__(self, image, *, tiled: bool = True) -> TiledImage:
        """An image (anything `preprocess.load_image` takes) -> its tiles. ``tiled=False`` is OneVision's rule
        for an image of a multi-image prompt: its base view only, padded to a square first."""
        pil = load_image(image)
        size = (pil.height, pil.width)
        if not tiled:
            return TiledImage(self.tile(self._padded_square(pil)), size, (0, 0))
        canvas = self._canvas(pil)
        side = self.tile_size
        rows, cols = canvas.shape[0] // side, canvas.shape[1] // side
        base_height, base_width = self.base_size
        views = [np.asarray(pil.resize((base_width, base_height), resample=self.tile.resample))]
        views += [canvas[r * side:(r + 1) * side, c * side:(c + 1) * side] for r in range(rows) for c in range(cols)]
        pixels = np.concatenate([self.tile(np.ascontiguousarray(view)) for view in views])
        return TiledImage(pixels, size, (rows, cols))

    def _canvas(self, pil: Image.Image) -> np.ndarray:
        """The image resized into its best pinpoint, aspect kept, centred on black: ``(H, W, 3)`` uint8."""
        target = self.best_resolution((pil.height, pil.width))
        new_height, new_width = fitted_size((pil.height, pil.width), target)
        resized = np.asarray(pil.resize((new_width, new_height), resample=self.tile.resample))
        top, left = (target[0] - new_height) // 2, (target[1] - new_width) // 2
        canvas = np.zeros((*target, 3), dtype=np.uint8)
        canvas[top:top + new_height, left:left + new_width] = resized
        return canvas

    def _padded_square(self, pil: Image.Image) -> np.ndarray:
        """OneVision's ``pad_to_square``: centred on the mean colour (``int(mean * 255)`` per channel)."""
        pixels = np.asarray(pil)
        height, width = pixels.shape[:2]
        if height == width:
            return pixels
        mean = self.tile.image_mean or (0.0, 0.0, 0.0)
        side = max(height, width)
        square = np.empty((side, side, 3), dtype=np.uint8)
        square[:] = [int(value * 255) for value in mean]
        top, left = (side - height) // 2, (side - width) // 2
        square[top:top + height, left:left + width] = pixels
        return square


__all__ = [
    "FAMILY_TILE_STEPS",
    "MAX_GRID_TILES",
    "TiledImage",
    "TiledPreprocessing",
    "cap_pinpoints",
    "fitted_size",
    "select_best_resolution",
]
