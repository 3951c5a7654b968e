"""Qwen2.5-VL's edge on the device: an image -> (indices, patch grid), with numpy, Pillow and ONNX Runtime only.

An edge folder written by `export.qwen_edge_onnx.export_qwen_edge` holds ``qwen_edge.onnx`` and
``qwen_edge.json`` (the split, the window size and the preprocessing). The runtime preprocesses the image
(`preprocess_qwen`), lays the patches out window by window (`window_layout`, below) and runs the graph; the
indices come back one per patch in raster order (row by row), the wire's order, with the grid ``(1, h, w)`` the
cloud needs to rebuild windows and positions.

**Why the windows are inputs.** Qwen's windowed attention and 2-D rotary positions depend on the grid, which
changes with every image. Computing them inside the graph would take variable-length loops over windows; here
they are a few lines of integer arithmetic in numpy (`window_layout`), fed to the graph with the raster-order
patches: each patch's ``(row, column)``, where each slot of the fixed-size windows (``side x side`` patches,
padded where the image's edge cuts a window short) takes its patch from, and a key mask that keeps padding out
of every softmax. The per-patch work (patch embedding, norms, projections, MLP) runs on the patches alone; only
attention gathers them into padded windows, one batched product over ``(windows, heads, side², side²)`` that
ONNX Runtime runs as plain matrix products, and scatters the result back. At the ``patch`` site there is no
attention: the graph takes the patches alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .edge_config import QWEN_EDGE_CONFIG, QWEN_EDGE_MODEL
from .edge_runtime import onnx_session
from .errors import EdgeCheckpointError
from .preprocess_qwen import QwenImagePreprocessing

QWEN_EDGE_FORMAT = "qwen2_5_vl_edge"
PATCH_INPUTS = ("patches",)
WINDOW_INPUTS = ("patches", "positions", "padded_from_raster", "key_bias", "raster_from_padded")


@dataclass(frozen=True)
class WindowLayout:
    """Where each patch of a ``(h, w)`` grid sits when the grid is cut into ``side x side``-patch windows.

    Attributes:
        padded_from_raster: ``(windows, side * side)`` int64, the raster index of each window slot's patch; a
            padding slot takes patch 0, which its key mask hides and whose output is never read back.
        positions: ``(h * w, 2)`` int64 ``(row, column)`` of each patch, raster order.
        key_bias: ``(windows, side * side)`` float32, 0 for a patch and ``-inf`` for padding.
        raster_from_padded: ``(h * w,)`` int64, each raster patch's slot in the flattened windows.
    """

    padded_from_raster: np.ndarray
    positions: np.ndarray
    key_bias: np.ndarray
    raster_from_padded: np.ndarray


def window_layout(height: int, width: int, side: int) -> WindowLayout:
    """The windows of Qwen2.5-VL's tower for a grid of ``height x width`` patches: tiles of ``side`` patches
    (``window_size // patch_size``) from the top-left corner, row by row, cut short at the right and bottom
    edges, as Transformers' ``get_vision_window_index`` groups them (the order of patches inside a window does
    not change attention)."""
    rows_of_windows, cols_of_windows = -(-height // side), -(-width // side)
    y = np.arange(rows_of_windows * side).reshape(rows_of_windows, 1, side, 1)
    x = np.arange(cols_of_windows * side).reshape(1, cols_of_windows, 1, side)
    y, x = np.broadcast_arrays(y, x)  # (wy, wx, side, side) each: window row, window column, slot row, slot column
    y, x = y.reshape(-1, side * side), x.reshape(-1, side * side)
    inside = (y < height) & (x < width)
    padded_from_raster = np.where(inside, y * width + x, 0).astype(np.int64)
    raster = np.arange(height * width)
    positions = np.stack([raster // width, raster % width], axis=-1).astype(np.int64)
    key_bias = np.where(inside, 0.0, -np.inf).astype(np.float32)
    slots = np.nonzero(inside.reshape(-1))[0]
    raster_from_padded = np.empty(height * width, np.int64)
    raster_from_padded[padded_from_raster.reshape(-1)[slots]] = slots
    return WindowLayout(padded_from_raster, positions, key_bias, raster_from_padded)


class QwenEdgeRuntime:
    """A loaded Qwen2.5-VL edge: ``runtime(image) -> (indices, grid)``."""

    def __init__(self, session, config: dict, preprocessing: QwenImagePreprocessing, fingerprint: bytes):
        self.session = session
        self.config = config
        self.preprocessing = preprocessing
        self.fingerprint = fingerprint  # the codebook's, which frames carry (the graph has no codebook to hash)

    @property
    def split_site(self) -> str:
        return self.config["split_site"]

    def __call__(self, image) -> tuple[np.ndarray, tuple[int, int, int]]:
        """An image (PIL image, path, encoded bytes or uint8 array) -> indices ``(h * w[, codes])`` int64 in
        raster order and the grid ``(1, h, w)``."""
        patches, grid = self.preprocessing.edge_patches(image)
        return self.encode_patches(patches, grid), grid

    def encode_patches(self, patches: np.ndarray, grid) -> np.ndarray:
        """Raster-order patches ``(h * w, C * P * P)`` (`QwenImagePreprocessing.edge_patches`) -> indices."""
        _, height, width = _grid(grid, self.preprocessing.merge_size)
        patch_dim = self.config["patch_dim"]
        patches = np.asarray(patches, dtype=np.float32)
        if patches.shape != (height * width, patch_dim):
            raise ValueError(f"patches must have shape {(height * width, patch_dim)} for grid {tuple(grid)}, "
                             f"got {patches.shape}")
        if self.split_site == "patch":
            feeds = {"patches": patches}
        else:
            layout = window_layout(height, width, self.config["window_patches"])
            feeds = {"patches": patches, "positions": layout.positions, "padded_from_raster": layout.padded_from_raster,
                     "key_bias": layout.key_bias, "raster_from_padded": layout.raster_from_padded}
        (indices,) = self.session.run(None, feeds)
        return indices


def _grid(grid, merge: int) -> tuple[int, int, int]:
    """``(1, h, w)`` as ints; `ValueError` for anything Qwen's processor cannot make for a still image."""
    try:
        frames, height, width = (int(v) for v in grid)
    except (TypeError, ValueError):
        raise ValueError(f"grid must be three ints (t, h, w), got {grid!r}") from None
    if frames != 1 or height < merge or width < merge or height % merge or width % merge:
        raise ValueError(f"grid {tuple(grid)} is not a still image's: t must be 1 and h, w positive multiples of "
                         f"the merge size {merge}")
    return frames, height, width


def load_qwen_edge(directory: str | os.PathLike, *, threads: int | None = None) -> QwenEdgeRuntime:
    """Load an edge folder written by `export_qwen_edge`. ``threads``: ONNX Runtime's intra-op threads (None:
    its default). `EdgeCheckpointError` naming the problem for a folder that is not one."""
    directory = Path(directory)
    config_path, model_path = directory / QWEN_EDGE_CONFIG, directory / QWEN_EDGE_MODEL
    for path in (config_path, model_path):
        if not path.is_file():
            raise EdgeCheckpointError(f"{directory} is not a Qwen2.5-VL edge folder: {path.name} is missing")
    try:
        config = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise EdgeCheckpointError(f"{QWEN_EDGE_CONFIG} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != QWEN_EDGE_FORMAT:
        raise EdgeCheckpointError(f"{QWEN_EDGE_CONFIG} does not describe a Qwen2.5-VL edge (format "
                                  f"{QWEN_EDGE_FORMAT!r})")
    missing = [key for key in ("split_site", "patch_dim", "window_patches", "preprocessing") if key not in config]
    if missing:
        raise EdgeCheckpointError(f"{QWEN_EDGE_CONFIG} lacks {missing}")
    try:
        preprocessing = QwenImagePreprocessing.from_dict(config["preprocessing"])
    except ValueError as exc:
        raise EdgeCheckpointError(f"{QWEN_EDGE_CONFIG}: {exc}") from None
    fingerprint = _fingerprint(config)
    if fingerprint is None:
        raise EdgeCheckpointError(f"{QWEN_EDGE_CONFIG} in {directory} records no valid codebook_fingerprint, which "
                                  "frames must carry; export the edge again with export_qwen_edge")
    session = onnx_session(model_path, threads)
    expected = PATCH_INPUTS if config["split_site"] == "patch" else WINDOW_INPUTS
    if tuple(i.name for i in session.get_inputs()) != expected:
        raise EdgeCheckpointError(f"{QWEN_EDGE_MODEL} takes {[i.name for i in session.get_inputs()]}, expected "
                                  f"{list(expected)}")
    return QwenEdgeRuntime(session, config, preprocessing, fingerprint)


def _fingerprint(config: dict) -> bytes | None:
    """The 16-byte codebook fingerprint ``qwen_edge.json`` records, or None when it records none (a folder
    exported before it did) or a malformed one."""
    value = config.get("codebook_fingerprint")
    try:
        fingerprint = bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return fingerprint if fingerprint is not None and len(fingerprint) == 16 else None


__all__ = ["QWEN_EDGE_CONFIG", "QWEN_EDGE_MODEL", "QwenEdgeRuntime", "WindowLayout", "load_qwen_edge",
           "window_layout"]
