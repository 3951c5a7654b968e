"""Sizes in a checkpoint's JSON config checked against its weights before anything is built (stdlib only).

Building a model from ``config.json`` or ``edge_config.json`` allocates what the config says (a codebook of
``codebook_size`` rows, ``num_hidden_layers`` blocks) before a single weight is read, so a config that lies
costs memory or start-up time first and errors later: a codebook of 2**31 entries asks for 8 GiB, a million
vision layers take minutes to build. `check_model_folder` and `check_edge_folder` read only the JSON and the
safetensors headers (the tensors' names and shapes, a few KB), and raise `CheckpointSizeError` (a
``ValueError``) naming the setting when a size is beyond `LIMITS` or disagrees with the weights.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Iterable

from .errors import CheckpointSizeError

# Far above any real model (LLaVA-1.5-13B: 40 text layers, hidden 5120; CLIP ViT-L: 24 layers, 577 tokens),
# far below what would exhaust a server.
LIMITS = {
    "codebook_size": 2**20,
    "num_codebooks": 64,
    "num_groups": 256,
    "codebook_dim": 2**16,
    "num_hidden_layers": 512,
    "depth": 512,  # Qwen2.5-VL's vision blocks
    "hidden_size": 2**16,
    "intermediate_size": 2**18,
    "num_attention_heads": 1024,
    "image_size": 4096,
    "vocab_size": 2**22,
}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own bound on its JSON header
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")  # Qwen2.5-VL's tower: model.visual.blocks.N


def safetensors_shapes(paths: Iterable[str | os.PathLike]) -> dict[str, list[int]]:
    """``{tensor name: shape}`` from the headers of safetensors files (their data is not read)."""
    shapes: dict[str, list[int]] = {}
    for path in paths:
        try:
            with open(path, "rb") as file:
                (length,) = struct.unpack("<Q", file.read(8))
                if length > MAX_HEADER_BYTES:
                    raise CheckpointSizeError(f"{Path(path).name}: a header of {length} bytes is not a safetensors "
                                              "file's")
                header = json.loads(file.read(length))
        except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
            if isinstance(exc, CheckpointSizeError):
                raise
            raise CheckpointSizeError(f"{Path(path).name} has no readable safetensors header: {exc}") from None
        shapes.update({name: list(entry.get("shape", [])) for name, entry in header.items()
                       if name != "__metadata__" and isinstance(entry, dict)})
    return shapes


def _bounded(config: dict, where: str) -> None:
    for name, limit in LIMITS.items():
        value = config.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
            raise CheckpointSizeError(f"{where}: {name}={value!r} is not an integer in [0, {limit}]")


def _layers(shapes: dict[str, list[int]], prefix: str, pattern: re.Pattern = _LAYER) -> int:
    found = {int(match.group(1)) for name in shapes if name.startswith(prefix)
             for match in [pattern.search(name[len(prefix):])] if match}
    return max(found) + 1 if found else 0


def _expect(where: str, what: str, config_value: Any, weights_value: Any) -> None:
    if config_value != weights_value:
        raise CheckpointSizeError(f"{where} says {what}={config_value!r} but the weights hold {weights_value!r}; "
                                  "the config and the weights do not belong together")


def _codebook(shapes: dict[str, list[int]], config: dict, where: str, name: str) -> None:
    shape = shapes.get(name)
    if shape is None:
        raise CheckpointSizeError(f"the weights of {where} have no codebook ({name})")
    groups = config.get("num_groups", 1)
    _expect(where, "(num_codebooks, num_groups, codebook_size, codebook_dim / num_groups)",
            [config.get("num_codebooks", 1), groups, config.get("codebook_size"),
             config.get("codebook_dim", 0) // max(1, groups)], shape)


def _vision(shapes: dict[str, list[int]], vision: dict, prefix: str, where: str, *, all_layers: bool,
            feature_layer: Any = None) -> None:
    _bounded(vision, f"{where} vision_config")
    position = shapes.get(f"{prefix}embeddings.position_embedding.weight")
    if position is not None and vision.get("image_size") and vision.get("patch_size"):
        cls = vision.get("model_type") != "siglip_vision_model"  # SigLIP has no CLS token
        tokens = (vision["image_size"] // max(1, vision["patch_size"])) ** 2 + cls
        _expect(where, "(image tokens, vision hidden_size)", [tokens, vision.get("hidden_size")], position)
    if all_layers:
        held, count = _layers(shapes, prefix), vision.get("num_hidden_layers")
        if held not in (count, _feature_layers(count, feature_layer)):
            _expect(where, "vision num_hidden_layers", count, held)


def _feature_layers(count: Any, feature_layer: Any) -> Any:
    """Blocks up to the deepest one the projector reads (``vision_feature_layer``): what a checkpoint saved without
    the unused last blocks holds (Transformers drops them from a stock LLaVA; a quantized model is saved without
    them). ``None`` where that cannot be told."""
    layers = feature_layer if isinstance(feature_layer, list) else [feature_layer]
    if not isinstance(count, int) or not layers or not all(isinstance(v, int) for v in layers):
        return None
    return max(v + 1 if v >= 0 else count + v + 1 for v in layers)


def check_model_folder(folder: str | os.PathLike) -> None:
    """Check a full model folder's ``config.json`` against the limits and its safetensors headers."""
    folder = Path(folder)
    where = f"{folder.name}/config.json"
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointSizeError(f"cannot read {where}: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointSizeError(f"{where} is not a JSON object")
    _bounded(config, where)
    files = sorted(folder.glob("*.safetensors"))
    files = [path for path in files if not path.name.startswith(("edge_", "entropy_"))]
    if not files or config.get("checkpoint_kind", "full") != "full":
        return  # nothing to compare with here (an adapter, or weights from elsewhere): the limits still hold
    shapes = safetensors_shapes(files)
    # LLaVA-1.5 checkpoints keep LLaVA's names; the any-resolution families save Transformers' own.
    modern = any(name.startswith(("model.vision_tower.", "model.visual.")) for name in shapes)
    vision_prefix, text_prefix = ("model.vision_tower.", "model.language_model.") if modern else (
        "vision_tower.", "language_model.model.")
    if "codebook_size" in config:
        _codebook(shapes, config, where, "model.alignedvq.quantizer.codebook")
    if any(name.startswith("model.visual.") for name in shapes) and isinstance(config.get("vision_config"), dict):
        vision = config["vision_config"]  # Qwen2.5-VL: its own tower, `depth` blocks
        _bounded(vision, f"{where} vision_config")
        _expect(where, "vision depth", vision.get("depth"), _layers(shapes, "model.visual.", _BLOCK))
    elif isinstance(config.get("vision_config"), dict):
        _vision(shapes, config["vision_config"], vision_prefix, where, all_layers=True,
                feature_layer=config.get("vision_feature_layer", -2))
    text = config.get("text_config")
    if isinstance(text, dict):
        _bounded(text, f"{where} text_config")
        _expect(where, "text num_hidden_layers", text.get("num_hidden_layers"),
                _layers(shapes, text_prefix))
        embed = shapes.get(f"{text_prefix}embed_tokens.weight")
        if embed is not None:
            _expect(where, "(text vocab_size, text hidden_size)", [text.get("vocab_size"), text.get("hidden_size")],
                    embed)


def check_edge_folder(folder: str | os.PathLike, config: dict, weights_name: str) -> None:
    """Check an edge folder's parsed ``edge_config.json`` against the limits and, when the folder has its
    PyTorch weights ``weights_name``, against their header (the edge holds the blocks up to its split)."""
    where = f"{Path(folder).name}/edge_config.json"
    _bounded(config, where)
    vision = config.get("vision_config")
    if not isinstance(vision, dict):
        raise CheckpointSizeError(f"{where}: vision_config is not a JSON object")
    _bounded(vision, f"{where} vision_config")
    split = config.get("split_layer")
    if not isinstance(split, int) or not 0 <= split < max(1, vision.get("num_hidden_layers") or 0):
        raise CheckpointSizeError(f"{where}: split_layer={split!r} is not a vision block of "
                                  f"{vision.get('num_hidden_layers')!r}")
    weights = Path(folder) / weights_name
    if not weights.is_file():
        return
    shapes = safetensors_shapes([weights])
    _codebook(shapes, config, where, "alignedvq.quantizer.codebook")
    _vision(shapes, vision, "", where, all_layers=False)
    blocks = _layers(shapes, "encoder.")
    if blocks > split + 1:
        raise CheckpointSizeError(f"{where} splits at block {split} but the weights hold {blocks} blocks; the config "
                                  "and the weights do not belong together")


__all__ = ["LIMITS", "CheckpointSizeError", "check_edge_folder", "check_model_folder", "safetensors_shapes"]
