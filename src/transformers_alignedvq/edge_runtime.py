"""What the device runs: an edge folder loaded for pixels -> indices, behind one small interface.

An edge folder holds ``edge_config.json`` (split settings, vision tower config, image preprocessing, search,
codebook fingerprint) and the edge's weights in one or both forms:

* ``edge_model.onnx``: the edge as one ONNX graph (`export.edge_onnx.export_onnx`), run by ONNX Runtime with numpy,
  without PyTorch or Transformers (``pip install "transformers-alignedvq[edge]"``);
* ``edge_model.safetensors``: the PyTorch `export.edge.AlignedVQEdgeEncoder` (needs torch and transformers).

A full checkpoint folder carries the safetensors form. `load_edge_runtime` picks a backend ("auto": ONNX when
the folder has it and onnxruntime is installed, else PyTorch); the client only sees `EdgeRuntime`. This module
imports numpy only; each backend imports its runtime when it is chosen.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .edge_config import (
    EDGE_CONFIG_NAME,
    EDGE_FORMAT_VERSION,
    EDGE_ONNX_NAME,
    EDGE_SETTINGS,
    EDGE_WEIGHTS_NAME,
    QWEN_EDGE_CONFIG,
    QWEN_EDGE_MODEL,
    frame_geometry,
    read_edge_config,
    write_edge_config,
)
from .entropy import ENTROPY_MODEL_NAME
from .errors import EdgeCheckpointError
from .preprocess import ImagePreprocessing, read_preprocessing

BACKENDS = ("onnx", "torch")
# What a device fetches of a checkpoint, of any family. Transformers 5 keeps the image processor's settings inside
# processor_config.json (older checkpoints: preprocessor_config.json); the LLaVA and tiled edges need them to resize
# and normalise images (Qwen2.5-VL's edge keeps its own in qwen_edge.json).
EDGE_FILES = (
    EDGE_CONFIG_NAME,
    EDGE_WEIGHTS_NAME,
    EDGE_ONNX_NAME,
    QWEN_EDGE_CONFIG,
    QWEN_EDGE_MODEL,
    "processor_config.json",
    "preprocessor_config.json",
    ENTROPY_MODEL_NAME,
)


@dataclass
class EdgeRuntime:
    """A loaded edge: ``encode(pixels)`` plus what frames and servers must agree on.

    Attributes:
        directory: the folder it came from.
        backend: ``"onnx"`` or ``"torch"``.
        preprocessing: image -> pixels.
        codebook_size, codes_per_token, image_size, patch_size: the edge/cloud contract.
        fingerprint: the 16-byte codebook fingerprint frames carry.
        num_bytes: bytes of the weights the backend loaded.
        tiled: the folder is an any-resolution family's per-tile edge (`edge_tiles.load_tiled_edge` cuts its
            images into tiles); `encode_image` refuses it rather than squash an image into one tile.
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
    _encode: Callable[[np.ndarray], np.ndarray]
    tiled: bool = False

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels ``(batch, 3, size, size)`` float32 -> indices ``(batch, tokens, codes_per_token)`` int64."""
        pixels = np.asarray(pixels, dtype=np.float32)
        expected = (3, self.image_size, self.image_size)
        if pixels.ndim != 4 or pixels.shape[1:] != expected:
            raise ValueError(f"pixels must have shape (batch, {', '.join(map(str, expected))}), got {pixels.shape}")
        indices = self._encode(np.ascontiguousarray(pixels))
        return indices.reshape(pixels.shape[0], -1, self.codes_per_token).astype(np.int64, copy=False)

    def encode_image(self, image) -> np.ndarray:
        """One image (anything `preprocess.load_image` takes) -> indices ``(tokens, codes_per_token)``."""
        if self.tiled:
            raise ValueError(f"{self.directory} is a tiled edge: load it with edge_tiles.load_tiled_edge, which "
                             "cuts images into tiles")
        return self.encode(self.preprocessing(image))[0]


# ------------------------------------------------------------------------------------------------------------
def load_edge_runtime(directory: str | os.PathLike, *, backend: str = "auto", threads: int | None = None,
                      device: str = "cpu") -> EdgeRuntime:
    """Load the edge folder ``directory``.

    Args:
        backend: ``"onnx"``, ``"torch"`` or ``"auto"`` (ONNX when the folder has ``edge_model.onnx`` and
            onnxruntime is installed, otherwise PyTorch).
        threads: CPU threads (default: the runtime's choice; PyTorch's is process-wide).
        device: the PyTorch backend's device.
    """
    directory = Path(directory)
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend={backend!r} must be 'auto' or one of {BACKENDS}")
    config = read_edge_config(directory)
    has_onnx = (directory / EDGE_ONNX_NAME).is_file()
    if backend == "auto":
        backend = "onnx" if has_onnx and _importable("onnxruntime") else "torch"
    if backend == "onnx":
        return _onnx_runtime(directory, config, threads)
    if not (directory / EDGE_WEIGHTS_NAME).is_file():
        hint = " (install onnxruntime to run its edge_model.onnx)" if has_onnx else ""
        raise EdgeCheckpointError(f"{directory} has no {EDGE_WEIGHTS_NAME} for the PyTorch backend{hint}")
    if not _importable("torch"):
        raise EdgeCheckpointError(
            f"{directory} holds only the PyTorch edge and torch is not installed; export an ONNX edge "
            "(`alignedvq export-edge --format onnx`) for a device without PyTorch"
        )
    return _torch_runtime(directory, device, threads)


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            return False
        raise
    return True


def _contract(directory: Path, config: dict, preprocessing: ImagePreprocessing) -> dict:
    vision = config["vision_config"]
    return dict(
        directory=directory, preprocessing=preprocessing, codebook_size=int(config["codebook_size"]),
        codes_per_token=int(config["num_codebooks"]) * int(config["num_groups"]),
        image_size=int(vision["image_size"]), patch_size=int(vision["patch_size"]), tiled="tiling" in config,
    )


def onnx_session(path: Path, threads: int | None):
    """An ONNX Runtime CPU session of the graph at ``path`` (``threads``: intra-op threads, None: its default);
    `EdgeCheckpointError` for a graph it cannot load."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types for unreadable or invalid graphs
        raise EdgeCheckpointError(f"{path.name} cannot be loaded: {exc}") from None


def _onnx_runtime(directory: Path, config: dict, threads: int | None) -> EdgeRuntime:
    path = directory / EDGE_ONNX_NAME
    if not path.is_file():
        raise EdgeCheckpointError(f"{EDGE_ONNX_NAME} not found in {directory}; export it with "
                                  "`alignedvq export-edge --format onnx`")
    try:
        fingerprint = bytes.fromhex(config["codebook_fingerprint"])
        preprocessing = read_preprocessing(directory, config)
    except (KeyError, ValueError, TypeError) as exc:
        raise EdgeCheckpointError(f"{EDGE_CONFIG_NAME} of an ONNX edge lacks a valid setting: {exc}") from None
    session = onnx_session(path, threads)
    (graph_input,), (graph_output,) = session.get_inputs(), session.get_outputs()
    per_image = graph_input.shape[0] == 1  # a graph exported for one image at a time

    def encode(pixels: np.ndarray) -> np.ndarray:
        if per_image and pixels.shape[0] != 1:
            return np.concatenate([encode(pixels[i : i + 1]) for i in range(pixels.shape[0])])
        return session.run([graph_output.name], {graph_input.name: pixels})[0]

    return EdgeRuntime(backend="onnx", fingerprint=fingerprint, num_bytes=path.stat().st_size, _encode=encode,
                       **_contract(directory, config, preprocessing))


def _torch_runtime(directory: Path, device: str, threads: int | None) -> EdgeRuntime:
    import torch

    from .export.edge import AlignedVQEdgeEncoder

    if threads:
        torch.set_num_threads(threads)
    encoder = AlignedVQEdgeEncoder.from_pretrained(directory).to(device).eval()

    def encode(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return encoder(torch.from_numpy(pixels).to(device)).cpu().numpy()

    return EdgeRuntime(backend="torch", fingerprint=encoder.codebook_fingerprint(), num_bytes=encoder.num_bytes(),
                       _encode=encode, **_contract(directory, read_edge_config(directory), encoder.preprocessing))


__all__ = [
    "BACKENDS",
    "EDGE_CONFIG_NAME",
    "EDGE_FORMAT_VERSION",
    "EDGE_ONNX_NAME",
    "EDGE_SETTINGS",
    "EDGE_WEIGHTS_NAME",
    "EdgeCheckpointError",
    "EdgeRuntime",
    "frame_geometry",
    "load_edge_runtime",
    "onnx_session",
    "read_edge_config",
    "write_edge_config",
]


# ------------------------------------------------------------------------------------------------------------
def download_edge(repo_id: str, *, revision: str | None = None, cache_dir=None, local_dir=None,
                  token=None) -> tuple[Path, int]:
    """Fetch only the edge files (`EDGE_FILES`) of a Hub checkpoint, never the language model: the LLaVA and tiled
    edges' ``edge_config.json`` and weights, or Qwen2.5-VL's ``qwen_edge.json`` and ``qwen_edge.onnx``, with the
    image processor's settings and the entropy model where the checkpoint has them.

    Returns the local folder and the bytes of the edge files in it (the folder may hold more: a snapshot
    folder shared with an earlier full download). Needs ``huggingface_hub`` (the ``edge`` extra), not PyTorch.
    """
    try:
        from huggingface_hub import snapshot_download
    except ModuleNotFoundError as exc:
        raise ImportError('fetching from the Hub needs huggingface_hub: install "transformers-alignedvq[edge]"') from exc
    folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_dir=local_dir,
                                    token=token, allow_patterns=list(EDGE_FILES)))
    size = sum((folder / name).stat().st_size for name in EDGE_FILES if (folder / name).is_file())
    return folder, size
