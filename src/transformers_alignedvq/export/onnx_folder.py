"""Writing an edge encoder as an ONNX edge folder (``edge_config.json`` + ``edge_model.onnx``): what the
LLaVA-1.5 export (`edge_export`) and the tiled families' (`tiled_edge`) share."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from ..edge_config import EDGE_ONNX_NAME, write_edge_config

EXPORT_FORMATS = ("safetensors", "onnx")


def export_onnx_folder(edge, out_dir: str | os.PathLike, *, int8: bool = False,
                       calibration_images: Iterable | None = None, preprocess: Callable | None = None,
                       config: dict | None = None) -> Path:
    """Write an `AlignedVQEdgeEncoder` as an ONNX edge folder (``edge_config.json`` + ``edge_model.onnx``);
    ``int8`` and ``calibration_images`` as for `export_edge`. ``preprocess`` (default ``edge.preprocessing``)
    makes a calibration image's pixels ``(n, 3, H, W)`` (a tiled edge: every tile); ``config`` (default
    ``edge.edge_config()``) is the ``edge_config.json`` the ONNX entry is added to."""
    from .edge_onnx import export_onnx, quantizes_front

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    calibration = None
    if int8:
        if calibration_images is None:
            raise ValueError("int8 export needs calibration images")
        calibration = [(preprocess or edge.preprocessing)(image) for image in calibration_images]
        if not calibration:
            raise ValueError("int8 export got no calibration images")
    export_onnx(edge, out_dir / EDGE_ONNX_NAME, int8=int8, calibration=calibration)
    config = dict(config if config is not None else edge.edge_config())
    # a patch-site edge folds its only linear layer into the codebook: nothing is left for int8 to quantize
    int8 = quantizes_front(edge, int8)
    config["onnx"] = {"file": EDGE_ONNX_NAME, "int8": int8, "calibration_images": len(calibration or ()) if int8 else 0}
    write_edge_config(out_dir, config)
    return out_dir


__all__ = ["EXPORT_FORMATS", "export_onnx_folder"]
