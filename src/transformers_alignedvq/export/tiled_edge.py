"""The edge of an any-resolution family (LLaVA-OneVision, LLaVA-NeXT) as an edge folder a device runs.

Every tile goes through the tower on its own, so the per-tile edge is LLaVA's: `edge.AlignedVQEdgeEncoder`
(tower up to the split site, then the codeword search) copied out of the family model, exported to ONNX with
the tile count as the graph's batch dimension (`edge_onnx.export_onnx`). What the folder adds is the tiling:
``edge_config.json`` records the family, the pinpoints (the model's ``image_grid_pinpoints``, so a capped grid
is capped on the device too) and the tokens per tile, beside each tile's own preprocessing; `edge_tiles` reads
them and cuts images into tiles with numpy and Pillow (`preprocess_tiles`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..edge_config import write_edge_config
from ..preprocess_tiles import TiledPreprocessing
from .edge import AlignedVQEdgeEncoder
from .onnx_folder import EXPORT_FORMATS, export_onnx_folder
from .search import SearchConfig

TILED_FAMILIES = ("llava_onevision", "llava_next")


def model_tiling(model, image_processor=None) -> TiledPreprocessing:
    """The tiling ``model`` (a tiled AlignedVQ model) expects: the family's image processor with its class
    defaults, or ``image_processor`` (a Transformers image processor, or its saved settings) when given, always
    with the model's own pinpoints; `ValueError` when the processor would tile otherwise."""
    family, config = _family(model), model.config
    tile, pinpoints = config.vision_config.image_size, [list(p) for p in config.image_grid_pinpoints]
    if image_processor is None:
        return TiledPreprocessing.for_family(family, tile, pinpoints)
    settings = image_processor if isinstance(image_processor, dict) else image_processor.to_dict()
    theirs = settings.get("image_grid_pinpoints")
    if theirs is not None and [list(p) for p in theirs] != pinpoints:
        raise ValueError(f"the image processor tiles by the pinpoints {theirs} but the model by {pinpoints}; "
                         "give both the same (capped) list")
    tiling = TiledPreprocessing.from_image_processor(settings, pinpoints)
    if tiling.tile_size != tile:
        raise ValueError(f"the image processor makes {tiling.tile_size}-px tiles; the vision tower takes {tile} px")
    return tiling


def tiled_edge_encoder(model, tiling: TiledPreprocessing | None = None,
                       search: SearchConfig | None = None) -> AlignedVQEdgeEncoder:
    """The per-tile edge of ``model`` (its tower up to the split, and the search), each tile preprocessed by
    ``tiling.tile`` (default: `model_tiling`)."""
    tiling = tiling or model_tiling(model)
    return AlignedVQEdgeEncoder.from_model(model.eval(), preprocessing=tiling.tile, search=search)


def tiled_edge_config(model, edge: AlignedVQEdgeEncoder, tiling: TiledPreprocessing) -> dict:
    """``edge_config.json`` of a tiled edge: the LLaVA edge's, plus the family, the tiling and the tokens per tile."""
    return {**edge.edge_config(), "family": _family(model), "tiling": tiling.tiling_dict(),
            "tokens_per_tile": int(model.config.tokens_per_tile)}


def export_tiled_edge(model, out_dir: str | os.PathLike, *, format: str = "onnx", image_processor=None,
                      search: SearchConfig | None = None, int8: bool = False,
                      calibration_images: Iterable | None = None) -> Path:
    """Write the edge folder of a LLaVA-OneVision / LLaVA-NeXT AlignedVQ model into ``out_dir``.

    Args:
        format: ``"onnx"`` (``edge_model.onnx``: tiles -> indices, any tile count, run without PyTorch) or
            ``"safetensors"`` (the PyTorch edge).
        image_processor: the model's image processor (or its settings) when it differs from the family's
            class defaults (a checkpoint's own mean and std); its pinpoints must be the model's.
        search: the codeword search (default exact).
        int8: ONNX only: the front in int8, calibrated on every tile of ``calibration_images``.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"format={format!r} must be one of {EXPORT_FORMATS}")
    if int8 and format != "onnx":
        raise ValueError("int8 export is for the ONNX format")
    tiling = model_tiling(model, image_processor)
    edge = tiled_edge_encoder(model, tiling, search)
    out_dir = Path(out_dir)  # both writers below create it
    config = tiled_edge_config(model, edge, tiling)
    if format == "safetensors":
        edge.save_pretrained(out_dir)
        write_edge_config(out_dir, config)
    else:
        export_onnx_folder(edge, out_dir, int8=int8, calibration_images=calibration_images,
                           preprocess=lambda image: tiling(image).pixels, config=config)
    return out_dir


def tiles_of(model, images, image_processor=None) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Tiles ``(num_tiles, 3, tile, tile)`` and ``image_sizes`` of ``images`` as the model tiles them, for
    ``encode_edge`` on the same pixels the device makes (each image alone in its sample)."""
    tiling = model_tiling(model, image_processor)
    cut = [tiling(image) for image in images]
    return np.concatenate([c.pixels for c in cut]), [c.image_size for c in cut]


def _family(model) -> str:
    adapter = getattr(getattr(model, "model", None), "adapter", None)
    name = getattr(adapter, "name", None)
    if name not in TILED_FAMILIES:
        raise TypeError(f"a tiled edge is exported from a {' or '.join(TILED_FAMILIES)} AlignedVQ model, got "
                        f"{type(model).__name__}")
    return name


__all__ = [
    "TILED_FAMILIES",
    "export_tiled_edge",
    "model_tiling",
    "tiled_edge_config",
    "tiled_edge_encoder",
    "tiles_of",
]
