"""The edge folder's own files, named and read in one place (standard library only): ``edge_config.json`` (split
settings, vision tower config, preprocessing, search, codebook fingerprint) beside the edge's weights. The device
runtime (`edge_runtime`) and the exporter (`export/`) both read and write it through here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .checkpoint_limits import check_edge_folder
from .errors import CheckpointSizeError, EdgeCheckpointError
from .settings import SPLIT_SETTINGS

EDGE_CONFIG_NAME = "edge_config.json"
EDGE_WEIGHTS_NAME = "edge_model.safetensors"
EDGE_ONNX_NAME = "edge_model.onnx"
# Qwen2.5-VL's edge folder (`qwen_edge_runtime`): its own graph and config, read by that runtime alone.
QWEN_EDGE_MODEL, QWEN_EDGE_CONFIG = "qwen_edge.onnx", "qwen_edge.json"
EDGE_FORMAT_VERSION = 1
EDGE_SETTINGS = SPLIT_SETTINGS


def frame_geometry(image_size: int, patch_size: int) -> dict:
    """Tokens per image and the grid recorded in frames: CLIP order, CLS token first."""
    side = image_size // patch_size
    return {"grid": (side, side), "has_cls_token": True, "num_tokens": side * side + 1}


def read_edge_config(directory: str | os.PathLike) -> dict:
    """``edge_config.json`` of ``directory``, checked for its format and the settings every backend needs."""
    path = Path(directory) / EDGE_CONFIG_NAME
    if not path.is_file():
        raise EdgeCheckpointError(f"{EDGE_CONFIG_NAME} not found in {directory}; is this an AlignedVQ edge folder?")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise EdgeCheckpointError(f"{EDGE_CONFIG_NAME} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != "alignedvq-edge" or config.get(
        "format_version"
    ) != EDGE_FORMAT_VERSION:
        raise EdgeCheckpointError(
            f"{EDGE_CONFIG_NAME} is not an AlignedVQ edge config of format version {EDGE_FORMAT_VERSION}."
        )
    missing = [key for key in ("vision_config", *EDGE_SETTINGS) if key not in config]
    if missing:
        raise EdgeCheckpointError(f"{EDGE_CONFIG_NAME} lacks {missing}.")
    try:  # before any backend builds what the config asks for
        check_edge_folder(directory, config, EDGE_WEIGHTS_NAME)
    except CheckpointSizeError as exc:
        raise EdgeCheckpointError(str(exc)) from None
    return config


def write_edge_config(directory: str | os.PathLike, config: dict) -> Path:
    path = Path(directory) / EDGE_CONFIG_NAME
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


__all__ = [
    "EDGE_CONFIG_NAME",
    "EDGE_FORMAT_VERSION",
    "EDGE_ONNX_NAME",
    "EDGE_SETTINGS",
    "EDGE_WEIGHTS_NAME",
    "frame_geometry",
    "read_edge_config",
    "write_edge_config",
]
