"""What the device runs: an edge folder loaded for pixels -> indices, behind one small interface.

An edge folder holds ``edge_config.json`` (settings, preprocessing, codebook fingerprint) and the edge's
weights: ``edge_model.safetensors`` (the PyTorch `edge.AlignedVQEdgeEncoder`) and/or ``edge_model.onnx``
(the same computation as an ONNX graph, run by ONNX Runtime without PyTorch or Transformers). A full
checkpoint folder carries the same files. `load_edge_runtime` picks the backend; the client only sees
`EdgeRuntime`.

This module imports numpy only at the top; each backend imports its runtime when it is chosen.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .preprocess import ImagePreprocessing

EDGE_CONFIG_NAME = "edge_config.json"
EDGE_WEIGHTS_NAME = "edge_model.safetensors"
BACKENDS = ("torch",)


class EdgeFolderError(ValueError):
    """An edge folder is missing files, or they cannot be read or do not belong together."""


@dataclass
class EdgeRuntime:
    """A loaded edge: ``encode(pixels)`` plus what frames and servers must agree on.

    Attributes:
        directory: the folder it came from.
        backend: ``"torch"``.
        preprocessing: image -> pixels.
        codebook_size, codes_per_token, image_size, patch_size: the edge/cloud contract.
        fingerprint: the 16-byte codebook fingerprint frames carry.
        num_bytes: bytes of weights the backend holds.
    """

    directory: Path
    backend: str
    preprocessing: ImagePreprocessing
    codebook_size: int
    codes_per_token: int
    image_size: int
    patch_size: int
    fingerprint: bytes
    num_bytes: int
    _encode: object

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels ``(batch, 3, size, size)`` float32 -> indices ``(batch, tokens, codes_per_token)`` int64."""
        return self._encode(pixels)

    def encode_image(self, image) -> np.ndarray:
        """One image (anything `preprocess.load_image` takes) -> indices ``(tokens, codes_per_token)``."""
        return self.encode(self.preprocessing(image))[0]


def frame_geometry(image_size: int, patch_size: int) -> dict:
    """Tokens per image and the grid recorded in frames: CLIP order, CLS token first."""
    side = image_size // patch_size
    return {"grid": (side, side), "has_cls_token": True, "num_tokens": side * side + 1}


def read_edge_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / EDGE_CONFIG_NAME
    if not path.is_file():
        raise EdgeFolderError(f"{EDGE_CONFIG_NAME} not found in {directory}; is this an AlignedVQ edge folder?")
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise EdgeFolderError(f"{path.name} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != "alignedvq-edge":
        raise EdgeFolderError(f"{path.name} is not an AlignedVQ edge config")
    return config


def load_edge_runtime(directory: str | os.PathLike, *, backend: str = "auto", device: str = "cpu") -> EdgeRuntime:
    """Load the edge folder ``directory`` with ``backend`` (``"auto"``: the only one available)."""
    directory = Path(directory)
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend={backend!r} must be 'auto' or one of {BACKENDS}")
    return _torch_runtime(directory, device)


def _torch_runtime(directory: Path, device: str) -> EdgeRuntime:
    import torch

    from .edge import AlignedVQEdgeEncoder, EdgeCheckpointError

    try:
        encoder = AlignedVQEdgeEncoder.from_pretrained(directory).to(device).eval()
    except EdgeCheckpointError as exc:
        raise EdgeFolderError(str(exc)) from exc
    codes = encoder.codes_per_token

    def encode(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            indices = encoder(torch.from_numpy(np.asarray(pixels, dtype=np.float32)).to(device))
        return indices.reshape(indices.shape[0], indices.shape[1], codes).cpu().numpy()

    vision = encoder.vision_config
    return EdgeRuntime(
        directory=directory, backend="torch", preprocessing=encoder.preprocessing,
        codebook_size=encoder.settings["codebook_size"], codes_per_token=codes,
        image_size=vision.image_size, patch_size=vision.patch_size,
        fingerprint=encoder.codebook_fingerprint(), num_bytes=encoder.num_bytes(), _encode=encode,
    )


__all__ = [
    "BACKENDS",
    "EDGE_CONFIG_NAME",
    "EDGE_WEIGHTS_NAME",
    "EdgeFolderError",
    "EdgeRuntime",
    "frame_geometry",
    "load_edge_runtime",
    "read_edge_config",
]
