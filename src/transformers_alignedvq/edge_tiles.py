"""The device side of the any-resolution families (LLaVA-OneVision, LLaVA-NeXT): image -> tiles -> indices per tile.

An edge folder exported by `export.tiled_edge.export_tiled_edge` is an ordinary edge folder (its graph takes a
batch of tiles, any count) whose ``edge_config.json`` also names the family and the tiling. `load_tiled_edge`
loads it with `edge_runtime.load_edge_runtime` (ONNX Runtime without PyTorch, or the PyTorch edge) and cuts each
image into tiles with numpy and Pillow (`preprocess_tiles`) the way the family's image processor does, so the
cloud gets ``(num_tiles, tokens_per_tile[, codes])`` indices and the ``image_size`` it derives the tiles from.
Imports numpy and Pillow only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .edge_config import EDGE_CONFIG_NAME, read_edge_config
from .edge_runtime import EdgeRuntime, load_edge_runtime
from .errors import EdgeCheckpointError
from .preprocess_tiles import TiledImage, TiledPreprocessing


@dataclass(frozen=True)
class TiledIndices:
    """What the edge sends for one image.

    Attributes:
        indices: int64 ``(num_tiles, tokens_per_tile[, codes_per_token])``, base view first.
        image_size: ``(height, width)``: the cloud's ``image_sizes`` row, from which it derives the tiles.
        grid: ``(rows, cols)`` of any-resolution tiles (``(0, 0)``: base view only).
    """

    indices: np.ndarray
    image_size: tuple[int, int]
    grid: tuple[int, int]

    @property
    def num_tiles(self) -> int:
        return int(self.indices.shape[0])


@dataclass
class TiledEdge:
    """A loaded tiled edge: `encode_image` plus the contract (``runtime`` holds the per-tile one).

    Attributes:
        runtime: the per-tile edge (`EdgeRuntime`: backend, codebook size and fingerprint, tile size).
        tiling: image -> tiles.
        family: ``"llava_onevision"`` or ``"llava_next"``.
        tokens_per_tile: token rows per tile (patches, plus a CLS token for CLIP towers).
    """

    runtime: EdgeRuntime
    tiling: TiledPreprocessing
    family: str
    tokens_per_tile: int

    def tiles(self, image, *, tiled: bool = True) -> TiledImage:
        """An image -> its tiles (``tiled=False``: OneVision's base view only, for multi-image prompts)."""
        if not tiled and self.family != "llava_onevision":
            raise ValueError(f"{self.family} tiles every image; only LLaVA-OneVision sends base views alone")
        return self.tiling(image, tiled=tiled)

    def encode_tiles(self, tiles: TiledImage) -> TiledIndices:
        indices = self.runtime.encode(tiles.pixels)
        if indices.shape[1] != self.tokens_per_tile:
            raise EdgeCheckpointError(f"the edge makes {indices.shape[1]} tokens per tile; {EDGE_CONFIG_NAME} says "
                                      f"{self.tokens_per_tile}")
        if self.runtime.codes_per_token == 1:
            indices = indices[..., 0]
        return TiledIndices(indices, tiles.image_size, tiles.grid)

    def encode_image(self, image, *, tiled: bool = True) -> TiledIndices:
        """One image (anything `preprocess.load_image` takes) -> its indices, tile by tile."""
        return self.encode_tiles(self.tiles(image, tiled=tiled))


def load_tiled_edge(directory: str | os.PathLike, *, backend: str = "auto", threads: int | None = None,
                    device: str = "cpu") -> TiledEdge:
    """Load a tiled edge folder; ``backend``, ``threads`` and ``device`` as for `load_edge_runtime`.
    `EdgeCheckpointError` for a folder without a valid tiling (a LLaVA-1.5 edge: use `load_edge_runtime`)."""
    config = read_edge_config(directory)
    if "tiling" not in config:
        raise EdgeCheckpointError(f"{EDGE_CONFIG_NAME} in {directory} has no tiling: a single-tile edge, which "
                                  "load_edge_runtime runs")
    runtime = load_edge_runtime(directory, backend=backend, threads=threads, device=device)
    try:
        tiling = TiledPreprocessing(runtime.preprocessing, tuple(map(tuple, config["tiling"]["pinpoints"])))
        family, tokens = str(config["family"]), int(config["tokens_per_tile"])
    except (KeyError, TypeError, ValueError) as exc:
        raise EdgeCheckpointError(f"{EDGE_CONFIG_NAME} has an invalid tiling: {exc}") from None
    if tiling.tile_size != runtime.image_size:
        raise EdgeCheckpointError(f"{EDGE_CONFIG_NAME} cuts {tiling.tile_size}-px tiles for a {runtime.image_size}-px "
                                  "tower")
    return TiledEdge(runtime, tiling, family, tokens)


__all__ = ["TiledEdge", "TiledIndices", "load_tiled_edge"]
