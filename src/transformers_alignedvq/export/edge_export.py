"""What the edge device needs, cut out of a full checkpoint, and a summary of the edge/cloud contract.

* `export_edge(model_dir, out_dir)`: the edge encoder weights (``edge_config.json`` +
  ``edge_model.safetensors``), with the image preprocessing recorded in ``edge_config.json``: all
  `transformers_alignedvq.client.EdgeClient` loads.
* `describe(...)`, `describe_checkpoint(path)`: split point, codebook size, bits per index, tokens, codebook
  fingerprint and frame size, for ``GET /v1/model`` and ``alignedvq info``. `describe_checkpoint` reads
  only the config and the codebook tensor, not the model.

Nothing here imports the language model at module level: the edge client imports this module.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import wire
from ..edge_config import (
    EDGE_CONFIG_NAME,
    EDGE_WEIGHTS_NAME,
    QWEN_EDGE_CONFIG,
    frame_geometry,
)
from ..entropy import ENTROPY_MODEL_NAME
from ..errors import CheckpointError
from ..preprocess import saved_image_processor
from ..settings import FRAME_SETTINGS
from .family_info import FAMILY_MODEL_TYPES, describe_family, describe_qwen_edge, describe_tiled_edge
from .onnx_folder import EXPORT_FORMATS, export_onnx_folder

if TYPE_CHECKING:  # search needs torch; `describe_checkpoint` (alignedvq info) must run on a device without it
    from .search import SearchConfig


# Key of the codebook tensor in a full checkpoint and in an edge checkpoint.
_FULL_CODEBOOK_KEY = "model.alignedvq.quantizer.codebook"
_EDGE_CODEBOOK_KEY = "alignedvq.quantizer.codebook"


def describe(*, settings: dict[str, Any], image_size: int, patch_size: int, fingerprint: bytes) -> dict[str, Any]:
    """The edge/cloud contract as a JSON-ready dict (both sides must agree on all of it)."""
    geometry = frame_geometry(image_size, patch_size)
    codes = settings["num_codebooks"] * settings["num_groups"]
    size = settings["codebook_size"]
    payload = wire.raw_payload_bytes(geometry["num_tokens"], codebook_size=size, codes_per_token=codes)
    return {
        "split_layer": settings["split_layer"],
        "split_site": settings["split_site"],
        "codebook_size": size,
        "bits_per_index": wire.bits_per_index(size),
        "num_codebooks": settings["num_codebooks"],
        "num_groups": settings["num_groups"],
        "codes_per_token": codes,
        "num_tokens": geometry["num_tokens"],
        "grid": list(geometry["grid"]),
        "has_cls_token": geometry["has_cls_token"],
        "image_size": image_size,
        "patch_size": patch_size,
        "codebook_fingerprint": fingerprint.hex(),
        "payload_bytes": payload,
        # A raw frame without a prompt; a prompt adds its UTF-8 bytes and their count as a varint.
        "frame_bytes": wire.max_frame_bytes(codebook_size=size, num_tokens=geometry["num_tokens"],
                                            codes_per_token=codes, grid=geometry["grid"]),
    }


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    keys = FRAME_SETTINGS
    missing = [key for key in keys if key not in config]
    if missing:
        raise CheckpointError(f"config lacks AlignedVQ settings {missing}; is this an AlignedVQ checkpoint?")
    return {key: config[key] for key in keys}


def _read_tensor(weights: list[Path], key: str):
    from safetensors import safe_open

    for path in weights:
        with safe_open(str(path), framework="numpy") as handle:
            if key not in handle.keys():
                continue
            if handle.get_slice(key).get_dtype() != "BF16":
                return handle.get_tensor(key)  # numpy: `alignedvq info` runs on a device without torch
        with safe_open(str(path), framework="pt") as handle:  # numpy has no bfloat16
            return handle.get_tensor(key)
    raise CheckpointError(f"no tensor {key!r} in {', '.join(p.name for p in weights)}")


def describe_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """`describe` for a saved full model folder or an exported edge folder, reading only the config and
    the codebook (no model is built); a family's checkpoint or edge folder by `family_info`."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    # Full checkpoints carry the edge files too, so config.json decides which kind this is.
    if (directory / "config.json").is_file():
        config = json.loads((directory / "config.json").read_text())
        if config.get("model_type") != "llava_alignedvq" and config.get("model_type") not in FAMILY_MODEL_TYPES:
            raise CheckpointError(
                f"{directory / 'config.json'} has model_type {config.get('model_type')!r}, not an AlignedVQ model's "
                f"(llava_alignedvq, {', '.join(FAMILY_MODEL_TYPES)}); convert the model with "
                "transformers_alignedvq.from_vlm first"
            )
        vision = config.get("vision_config", {})
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            shard = json.loads(index.read_text())["weight_map"].get(_FULL_CODEBOOK_KEY)
            if shard is None:
                raise CheckpointError(f"{index.name} does not list {_FULL_CODEBOOK_KEY}")
            weights = [directory / shard]
        else:
            weights = sorted(p for p in directory.glob("*.safetensors") if p.name != EDGE_WEIGHTS_NAME)
        key, kind = _FULL_CODEBOOK_KEY, "full"
    elif (directory / EDGE_CONFIG_NAME).is_file():
        config = json.loads((directory / EDGE_CONFIG_NAME).read_text())
        vision = config.get("vision_config", {})
        weights, key, kind = [directory / EDGE_WEIGHTS_NAME], _EDGE_CODEBOOK_KEY, "edge"
        if "onnx" in config:  # an ONNX edge has no codebook tensor; its config records the fingerprint
            weights, kind = [], "edge (onnx, int8)" if config["onnx"].get("int8") else "edge (onnx)"
        if "tiling" in config:
            return describe_tiled_edge(directory, config, _settings(config), kind)
    elif (directory / QWEN_EDGE_CONFIG).is_file():
        return describe_qwen_edge(directory)
    else:
        raise CheckpointError(f"{directory} holds neither config.json nor {EDGE_CONFIG_NAME} (nor {QWEN_EDGE_CONFIG})")
    if not all(p.is_file() for p in weights) or (not weights and "onnx" not in config):
        raise CheckpointError(f"no safetensors weights found in {directory}")
    if config.get("model_type") in FAMILY_MODEL_TYPES:
        fingerprint = wire.codebook_fingerprint(_read_tensor(weights, key))
        return describe_family(directory, config, _settings(config), fingerprint, config.get("checkpoint_kind", kind))
    try:
        image_size, patch_size = int(vision["image_size"]), int(vision["patch_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"vision_config lacks image_size/patch_size: {exc}") from exc
    summary = describe(
        settings=_settings(config),
        image_size=image_size,
        patch_size=patch_size,
        fingerprint=wire.codebook_fingerprint(_read_tensor(weights, key)) if weights
        else bytes.fromhex(config["codebook_fingerprint"]),
    )
    return {"checkpoint": kind, **summary}


def export_edge(model_dir: str | os.PathLike, out_dir: str | os.PathLike, *, format: str | None = None,
                int8: bool = False, calibration_images: Iterable | None = None,
                search: SearchConfig | None = None) -> Path:
    """Load the full model in ``model_dir`` and write its edge part into ``out_dir``.

    The image preprocessing of the folder's image processor (or, without one, the vision tower family's
    standard one) is recorded in ``edge_config.json``, and the entropy model is copied when the folder has one.
    A LLaVA-OneVision / LLaVA-NeXT checkpoint gets its per-tile edge (`tiled_edge.export_tiled_edge`), a Qwen2.5-VL
    one its windowed ONNX edge (`qwen_edge_onnx.export_qwen_edge`: ONNX only, no int8 front).

    Args:
        format: ``"safetensors"`` (the PyTorch edge, ``edge_model.safetensors``) or ``"onnx"``
            (``edge_model.onnx``, run by onnxruntime without PyTorch; see `edge_onnx`); default: ``"safetensors"``
            for LLaVA-1.5, ``"onnx"`` for the families.
        int8: ONNX only: quantize the edge's convolutions and matrix products to int8, calibrated on
            ``calibration_images`` (real images; anything `preprocess.load_image` takes).
        search: how the edge finds codewords (`search.SearchConfig`; default exact).
    """
    import torch
    from transformers import AutoModel

    from ..preprocess import read_preprocessing

    if format not in (None, *EXPORT_FORMATS):
        raise ValueError(f"format={format!r} must be one of {EXPORT_FORMATS}")
    if int8 and format == "safetensors":
        raise ValueError("int8 export is for the ONNX format")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir} is not a saved model folder (no config.json)")
    if json.loads((model_dir / "config.json").read_text()).get("model_type") == "qwen2_5_vl_alignedvq" and \
            (format == "safetensors" or int8):  # refused before the model is read
        raise CheckpointError("the Qwen2.5-VL edge is exported as fp32 ONNX only (qwen_edge.onnx): drop "
                              f"{'--int8' if int8 else '--format safetensors'}")
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32)
    if hasattr(getattr(model, "model", None), "adapter"):  # a family's model (models/family.py)
        _export_family_edge(model.eval(), model_dir, out_dir, format=format, int8=int8,
                            calibration_images=calibration_images, search=search)
        return _with_entropy_model(model_dir, out_dir)
    format = format or "safetensors"
    if int8 and format != "onnx":
        raise ValueError("int8 export is for the ONNX format")
    if not hasattr(model, "edge_encoder"):
        raise CheckpointError(f"{model_dir} holds a {type(model).__name__}, not an AlignedVQ model")
    try:
        preprocessing = read_preprocessing(model_dir, {"vision_config": model.config.vision_config.to_dict()})
    except ValueError as exc:
        raise CheckpointError(f"{model_dir}: {exc}") from exc
    out_dir.mkdir(parents=True, exist_ok=True)
    edge = model.eval().edge_encoder()
    edge.preprocessing = preprocessing
    edge.refresh_search(search)
    if format == "safetensors":
        edge.save_pretrained(out_dir)
    else:
        export_onnx_folder(edge, out_dir, int8=int8, calibration_images=calibration_images)
    return _with_entropy_model(model_dir, out_dir)


def _with_entropy_model(model_dir: Path, out_dir: Path) -> Path:
    if (model_dir / ENTROPY_MODEL_NAME).is_file():
        shutil.copyfile(model_dir / ENTROPY_MODEL_NAME, out_dir / ENTROPY_MODEL_NAME)
    return out_dir


def _export_family_edge(model, model_dir: Path, out_dir: Path, *, format: str | None, int8: bool,
                        calibration_images: Iterable | None, search: SearchConfig | None) -> None:
    """A family checkpoint's edge folder, preprocessed by the image processor saved beside the model (or the
    family's defaults)."""
    settings = _saved_image_processor(model_dir)
    if model.model.adapter.name == "qwen2_5_vl":  # fp32 ONNX only, which `export_edge` checked
        from ..preprocess_qwen import QwenImagePreprocessing
        from .qwen_edge_onnx import export_qwen_edge

        preprocessing = QwenImagePreprocessing.from_image_processor(settings) if settings else None
        export_qwen_edge(model, out_dir, search=search, preprocessing=preprocessing)
        return
    from .tiled_edge import export_tiled_edge

    export_tiled_edge(model, out_dir, format=format or "onnx", image_processor=settings, search=search, int8=int8,
                      calibration_images=calibration_images)


def _saved_image_processor(model_dir: Path) -> dict | None:
    """The image processor's settings saved beside a model, None without them."""
    try:
        return saved_image_processor(model_dir)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


# ------------------------------------------------------------------------------------------------------------
# the edge files every checkpoint carries
# ------------------------------------------------------------------------------------------------------------
CHECKPOINT_EDGE_MODES = ("onnx", "int8", "safetensors")


def write_checkpoint_edge(model, directory: str | os.PathLike, mode: bool | str = True, *,
                          calibration_images: Iterable | None = None) -> None:
    """Write the edge files of a checkpoint beside its weights (`hub.save_checkpoint` calls this for
    ``save_pretrained`` and ``push_to_hub``), so a device can fetch and run the edge alone.

    Args:
        mode: ``True`` or ``"onnx"`` (default): the PyTorch edge (``edge_model.safetensors``) and the fp32 ONNX
            edge (``edge_model.onnx``), which a device runs with ONNX Runtime and no PyTorch; ``"int8"``: the
            ONNX edge's front quantized to int8, calibrated on ``calibration_images``; ``"safetensors"``: the
            PyTorch edge only. Without the ONNX exporter installed (``onnx``, ``onnxscript``: the ``export``
            extra) the default writes the PyTorch edge and warns; ``"int8"`` raises.
        calibration_images: for ``"int8"``: real images the edge will see (anything `preprocess.load_image`
            takes).
    """
    mode = "onnx" if mode is True else mode
    if mode not in CHECKPOINT_EDGE_MODES:
        raise ValueError(f"save_edge={mode!r} must be True, False or one of {CHECKPOINT_EDGE_MODES}")
    if mode == "int8" and calibration_images is None:
        raise ValueError("save_edge='int8' needs edge_calibration_images (real images the edge will see)")
    edge = model.edge_encoder().to("cpu")  # the ONNX graph is exported on the CPU, whatever the model's device
    edge.save_pretrained(directory)
    if mode == "safetensors":
        return
    if not onnx_export_available(directory, mode):
        return
    export_onnx_folder(edge, directory, int8=mode == "int8", calibration_images=calibration_images)


def onnx_export_available(directory, mode: str) -> bool:
    """Whether the ONNX exporter is installed; without it, an ``int8`` edge is an `ImportError` and any other
    mode a loud warning that ``directory`` gets no ONNX edge (a device without PyTorch cannot run it then)."""
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if not missing:
        return True
    message = (f"{' and '.join(missing)} not installed (pip install \"transformers-alignedvq[export]\"): "
               f"{directory} gets no ONNX edge, so a device without PyTorch cannot run it")
    if mode == "int8":
        raise ImportError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=4)
    return False


__all__ = [
    "CHECKPOINT_EDGE_MODES",
    "EXPORT_FORMATS",
    "describe",
    "describe_checkpoint",
    "export_edge",
    "export_onnx_folder",
    "onnx_export_available",
    "write_checkpoint_edge",
]
