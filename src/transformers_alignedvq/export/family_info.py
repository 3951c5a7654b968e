"""`alignedvq info` for the families (LLaVA-OneVision, LLaVA-NeXT, Qwen2.5-VL): the edge/cloud contract of a full or
adapter checkpoint, or of an edge folder, read from its config (and the checkpoint's codebook) without building a
model or importing torch (`edge_export.describe_checkpoint` dispatches here).

A tiled family sends indices per tile (a fixed patch grid per tile, a tile count that depends on the image); Qwen2.5-VL
one index per patch of a grid that depends on the image. So there is no one token count per image: the contract
gives the per-tile (per-patch) layout, and the raw bytes per tile or per patch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import wire
from ..edge_config import QWEN_EDGE_CONFIG
from ..entropy import load_entropy_model
from ..errors import CheckpointError

# config.json's model_type -> the family adapter's name
FAMILY_MODEL_TYPES = {"llava_onevision_alignedvq": "llava_onevision", "llava_next_alignedvq": "llava_next",
                      "qwen2_5_vl_alignedvq": "qwen2_5_vl"}


def _codes(settings: dict[str, Any]) -> dict[str, Any]:
    size = int(settings["codebook_size"])
    codes = settings.get("codes_per_token") or settings["num_codebooks"] * settings["num_groups"]
    return {"split_layer": settings["split_layer"], "split_site": settings["split_site"], "codebook_size": size,
            "bits_per_index": wire.bits_per_index(size), "codes_per_token": codes}


def _tiles(vision: dict[str, Any], pinpoints: list, codes: dict[str, Any]) -> dict[str, Any]:
    """A tiled family's layout: each tile a fixed patch grid (CLS for a CLIP tower), the tile count per image from
    the any-resolution pinpoints (plus the base view)."""
    try:
        tile, patch = int(vision["image_size"]), int(vision["patch_size"])
        max_tiles = max((int(h) // tile) * (int(w) // tile) for h, w in pinpoints) + 1
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the config lacks a tile size, patch size or pinpoints: {exc!r}") from None
    side = tile // patch
    cls = vision.get("model_type") != "siglip_vision_model"
    tokens = side * side + int(cls)
    return {"tokens_per_tile": tokens, "grid": [side, side], "has_cls_token": cls, "image_size": tile,
            "patch_size": patch, "image_grid_pinpoints": len(pinpoints), "max_tiles_per_image": max_tiles,
            "payload_bytes_per_tile": wire.raw_payload_bytes(tokens, codebook_size=codes["codebook_size"],
                                                             codes_per_token=codes["codes_per_token"])}


def _patches(patch: int, merge: int, codes: dict[str, Any]) -> dict[str, Any]:
    return {"patch_size": patch, "spatial_merge_size": merge,
            "frames": "one index per patch, each image's patch grid (t, h, w) in the geometry section",
            "payload_bits_per_patch": codes["bits_per_index"] * codes["codes_per_token"]}


def describe_family(directory: Path, config: dict[str, Any], settings: dict[str, Any], fingerprint: bytes,
                    kind: str) -> dict[str, Any]:
    """A family checkpoint's contract (``config``: its config.json; ``settings``: its AlignedVQ settings)."""
    family = FAMILY_MODEL_TYPES[config["model_type"]]
    codes, vision = _codes(settings), config.get("vision_config") or {}
    if family == "qwen2_5_vl":
        layout = _patches(int(vision.get("patch_size", 14)), int(vision.get("spatial_merge_size", 2)), codes)
        edge_files = ["qwen_edge.json", "qwen_edge.onnx"]
    else:
        layout = _tiles(vision, config.get("image_grid_pinpoints") or [], codes)
        edge_files = ["edge_config.json", "edge_model.safetensors", "edge_model.onnx"]
    return {"checkpoint": kind, "family": family, **codes, **layout, "codebook_fingerprint": fingerprint.hex(),
            "edge_files": [name for name in edge_files if (directory / name).is_file()],
            **_entropy(directory)}


def describe_tiled_edge(directory: Path, config: dict[str, Any], settings: dict[str, Any], kind: str) -> dict:
    """A tiled family's edge folder (``edge_config.json`` with a ``tiling``)."""
    codes = _codes(settings)
    layout = _tiles(config.get("vision_config") or {}, (config.get("tiling") or {}).get("pinpoints") or [], codes)
    return {"checkpoint": kind, "family": config.get("family"), **codes, **layout,
            "codebook_fingerprint": config.get("codebook_fingerprint"), **_entropy(directory)}


def describe_qwen_edge(directory: Path) -> dict[str, Any]:
    """A Qwen2.5-VL edge folder (``qwen_edge.json``), read by its own runtime's checks."""
    try:
        config = json.loads((directory / QWEN_EDGE_CONFIG).read_text())
        codes = _codes(config)
        pre = config["preprocessing"]
        layout = _patches(int(pre["patch_size"]), int(pre["merge_size"]), codes)
        pixels = {"min_pixels": int(pre["min_pixels"]), "max_pixels": int(pre["max_pixels"])}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{directory / QWEN_EDGE_CONFIG} is not a Qwen2.5-VL edge config: {exc!r}") from None
    return {"checkpoint": "edge (onnx)", "family": "qwen2_5_vl", **codes, **layout, **pixels,
            "codebook_fingerprint": config.get("codebook_fingerprint"), **_entropy(directory)}


def _entropy(directory: Path) -> dict[str, Any]:
    model = load_entropy_model(directory)
    if model is None:
        return {"entropy_model": None}
    return {"entropy_model": model.model_id.hex(),
            "entropy_model_codes": "patch grids" if model.patch_grids else f"grid {list(model.grid)}"}


__all__ = ["FAMILY_MODEL_TYPES", "describe_family", "describe_qwen_edge", "describe_tiled_edge"]
