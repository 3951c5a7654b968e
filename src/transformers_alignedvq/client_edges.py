"""The edge of each model family, as the client sends it: an image -> the indices a frame carries and the frame's
layout fields. Torch-free: numpy, Pillow and ONNX Runtime (or the PyTorch edge, for a LLaVA folder that has one).

* LLaVA-1.5 (``edge_config.json``): one image of a fixed token count; the frame records the patch grid and CLS.
* LLaVA-OneVision, LLaVA-NeXT (``edge_config.json`` with a ``tiling``, `edge_tiles`): every tile's indices, base
  view first, and a geometry section with the image's size, tile count and grid; the recorded grid is one tile's.
* Qwen2.5-VL (``qwen_edge.json``, `qwen_edge_runtime`): one index per patch in raster order and a geometry
  section with the patch grid ``(1, h, w)``; coded under an entropy model of patch grids.

A folder's entropy model (``entropy_model.safetensors``) must fit its edge's frames (`DeviceEdge.check_entropy_model`):
the same K and codes per token, and the edge's grid (one tile's) or, for Qwen2.5-VL, patch grids.

`open_edge` picks the family from the folder. Each edge also says which fields of the server's ``/v1/model`` must
equal its own (`DeviceEdge.contract`), so `EdgeClient.check_server` can name a mismatch before any frame is sent.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .edge_config import EDGE_CONFIG_NAME, frame_geometry, read_edge_config
from .entropy import EntropyModel
from .errors import EdgeCheckpointError
from .qwen_edge_runtime import QWEN_EDGE_CONFIG
from .wire_followup import image_digest
from .wire_geometry import WireGeometry


@dataclass(frozen=True)
class EncodedImage:
    """What a frame carries for one image: ``indices`` ``(tokens[, codes])`` int64 in wire order, the frame's
    ``geometry`` section (None: LLaVA-1.5), the recorded patch ``grid`` (one tile's; None for patch grids) and
    whether each tile starts with a CLS token."""

    indices: np.ndarray
    geometry: WireGeometry | None
    grid: tuple[int, int] | None
    has_cls_token: bool

    @property
    def layout(self) -> tuple[int, ...] | None:
        """What the server keys a kept image by besides its indices (the tiled image's size, the patch grid; the
        geometry's, `wire_geometry`), None for LLaVA-1.5."""
        return None if self.geometry is None else self.geometry.images[0].layout

    def digest(self, fingerprint: bytes) -> bytes:
        """The digest the server names this image by in its answers (`wire_followup.image_digest`)."""
        return image_digest(self.indices, fingerprint, self.layout)


class DeviceEdge:
    """A loaded edge of one family: ``runtime`` (the family's own object), the codebook contract and `encode`."""

    family = "llava"
    entropy_grid: tuple[tuple[int, int], bool] | None  # the grid and CLS an entropy model must code; None: patch grids

    def __init__(self, runtime, *, codebook_size: int, codes_per_token: int, fingerprint: bytes):
        self.runtime, self.codebook_size, self.codes_per_token = runtime, codebook_size, codes_per_token
        self.fingerprint = fingerprint

    def encode(self, image) -> EncodedImage:
        raise NotImplementedError

    def check_entropy_model(self, model: EntropyModel) -> None:
        """`EdgeCheckpointError` unless ``model`` codes this edge's frames (checked when the folder is opened, so a
        wrong model is named at once rather than at the first frame)."""
        wanted = "patch grids" if self.entropy_grid is None else "grid {} (CLS {})".format(*self.entropy_grid)
        has = "patch grids" if model.patch_grids else f"grid {model.grid} (CLS {model.has_cls_token})"
        if (model.codebook_size, model.codes_per_token, has) != (self.codebook_size, self.codes_per_token, wanted):
            raise EdgeCheckpointError(
                f"the edge folder's entropy model codes K={model.codebook_size}, {model.codes_per_token} codes per "
                f"token, {has}; this {self.family} edge sends K={self.codebook_size}, {self.codes_per_token}, "
                f"{wanted}: fit it again for this edge (or remove it to send raw frames)")

    def contract(self) -> dict[str, Any]:
        """``/v1/model`` fields the server must match for this edge's frames to decode."""
        return {"codebook_fingerprint": self.fingerprint.hex(), "codebook_size": self.codebook_size,
                "codes_per_token": self.codes_per_token}


class LlavaEdge(DeviceEdge):
    def __init__(self, runtime):
        super().__init__(runtime, codebook_size=runtime.codebook_size, codes_per_token=runtime.codes_per_token,
                         fingerprint=runtime.fingerprint)
        self.frame = frame_geometry(runtime.image_size, runtime.patch_size)
        self.entropy_grid = (tuple(self.frame["grid"]), self.frame["has_cls_token"])

    def encode(self, image) -> EncodedImage:
        return EncodedImage(self.runtime.encode_image(image), None, self.frame["grid"], self.frame["has_cls_token"])

    def contract(self) -> dict[str, Any]:
        return {**super().contract(), "num_tokens": self.frame["num_tokens"]}


class TiledDeviceEdge(DeviceEdge):
    def __init__(self, tiled):
        runtime = tiled.runtime
        super().__init__(tiled, codebook_size=runtime.codebook_size, codes_per_token=runtime.codes_per_token,
                         fingerprint=runtime.fingerprint)
        self.family = tiled.family
        side = runtime.image_size // runtime.patch_size
        self.grid, self.has_cls_token = (side, side), tiled.tokens_per_tile == side * side + 1
        self.entropy_grid = (self.grid, self.has_cls_token)

    def encode(self, image) -> EncodedImage:
        sent = self.runtime.encode_image(image)
        geometry = WireGeometry.tiled([sent.image_size], [sent.num_tiles], [sent.grid])
        indices = sent.indices.reshape(-1, *sent.indices.shape[2:])
        return EncodedImage(indices, geometry, self.grid, self.has_cls_token)

    def contract(self) -> dict[str, Any]:
        pinpoints = [list(p) for p in self.runtime.tiling.pinpoints]
        return {**super().contract(), "family": self.family, "tokens_per_tile": self.runtime.tokens_per_tile,
                "image_grid_pinpoints": pinpoints}


class QwenDeviceEdge(DeviceEdge):
    family = "qwen2_5_vl"
    entropy_grid = None  # patch grids of any size

    def __init__(self, runtime):
        config = runtime.config
        super().__init__(runtime, codebook_size=int(config["codebook_size"]),
                         codes_per_token=int(config["codes_per_token"]), fingerprint=runtime.fingerprint)

    def encode(self, image) -> EncodedImage:
        indices, grid = self.runtime(image)
        return EncodedImage(np.asarray(indices, dtype=np.int64), WireGeometry.patch_grids([grid]), None, False)

    def contract(self) -> dict[str, Any]:
        settings = self.runtime.preprocessing
        return {**super().contract(), "family": self.family, "patch_size": settings.patch_size,
                "spatial_merge_size": settings.merge_size, "min_pixels": settings.min_pixels,
                "max_pixels": settings.max_pixels}


def is_family_edge(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds the edge of a family (tiled or Qwen2.5-VL) rather than LLaVA-1.5's."""
    directory = Path(directory)
    return (directory / QWEN_EDGE_CONFIG).is_file() or "tiling" in read_edge_config(directory)


def is_edge_folder(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds an edge of any family."""
    return any((Path(directory) / name).is_file() for name in (EDGE_CONFIG_NAME, QWEN_EDGE_CONFIG))


def open_edge(directory: str | os.PathLike, *, backend: str = "auto", threads: int | None = None,
              device: str = "cpu") -> DeviceEdge:
    """The family's edge in ``directory``; `EdgeCheckpointError` naming what is wrong with the folder."""
    directory = Path(directory)
    if (directory / QWEN_EDGE_CONFIG).is_file():
        return _open_qwen(directory, backend, threads)
    if "tiling" in read_edge_config(directory):
        from .edge_tiles import load_tiled_edge

        return TiledDeviceEdge(load_tiled_edge(directory, backend=backend, threads=threads, device=device))
    from .edge_runtime import load_edge_runtime

    return LlavaEdge(load_edge_runtime(directory, backend=backend, threads=threads, device=device))


def _open_qwen(directory: Path, backend: str, threads: int | None) -> QwenDeviceEdge:
    if backend not in ("auto", "onnx"):
        raise EdgeCheckpointError(f"{directory} is a Qwen2.5-VL edge, which runs with ONNX Runtime only (backend "
                                  f"{backend!r} asked)")
    from .qwen_edge_runtime import load_qwen_edge

    return QwenDeviceEdge(load_qwen_edge(directory, threads=threads))


__all__ = ["DeviceEdge", "EncodedImage", "LlavaEdge", "QwenDeviceEdge", "TiledDeviceEdge", "is_edge_folder",
           "is_family_edge", "open_edge"]
