"""The edge as an ONNX graph (pixels -> indices) for ONNX Runtime, in fp32 or with an int8 front.

`export_onnx` exports the two halves of `edge.AlignedVQEdgeEncoder` separately and joins them:

* the *front*: patch embedding, pre-LayerNorm, the blocks before the split and the split block up to the site,
  ``pixel_values (batch, 3, size, size) -> features (batch, tokens, dim)``;
* the *search*: input DLP folded into the codebook, exact or shortlist search
  (`search.CodewordSearch`), ``features -> indices (batch, tokens[, codes])``, written directly as ONNX
  (`onnx_search`: what ONNX Runtime runs fastest on one thread), one codebook or residual stages; grouped
  codebooks export PyTorch's generic search.

At the ``patch`` site there is no front: the patch convolution is linear, so it is folded into the codebook and
the graph searches raw pixel patches (`onnx_search.patch_edge_model`); ``int8`` has nothing to quantize there.

With ``int8=True`` the front's convolutions and matrix products are quantized to int8 by ONNX Runtime's static
quantizer (QOperator format: `QLinearConv` / `QLinearMatMul` kernels, weights per channel, activation ranges
calibrated on real images); the search stays fp32, so a codeword is still chosen by exact distances among the
candidates. This module runs where the model is (it needs torch, `onnx`, `onnxscript` and `onnxruntime`: the
``export`` extra); the device only needs `onnxruntime` (`edge_runtime`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..models.llava_alignedvq import split
from .onnx_search import foldable_patch_embedding, patch_edge_model, search_model

INPUT_NAME, FEATURES_NAME, OUTPUT_NAME = "pixel_values", "features", "indices"


class _Front(nn.Module):
    def __init__(self, edge):
        super().__init__()
        self.edge = edge

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        settings = self.edge.settings
        return split.edge_forward(self.edge, pixel_values, settings["split_layer"], settings["split_site"])


class _Search(nn.Module):
    def __init__(self, edge):
        super().__init__()
        self.edge = edge

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.edge.search is not None:
            return self.edge.search(features)
        indices = self.edge.alignedvq.encode(features)
        return indices.squeeze(-1) if self.edge.codes_per_token == 1 else indices


def _export(module: nn.Module, example: torch.Tensor, input_name: str, output_name: str, path: Path,
            dynamic: bool) -> None:
    shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic else None
    program = torch.onnx.export(
        module, (example,), input_names=[input_name], output_names=[output_name],
        dynamic_shapes=shapes, dynamo=True, verbose=False,
    )
    program.save(str(path))


def quantizes_front(edge, int8: bool) -> bool:
    """Whether `export_onnx` with ``int8`` writes an int8 front: not where the patch embedding is folded away."""
    return int8 and not foldable_patch_embedding(edge)


def export_onnx(edge, path: str | os.PathLike, *, int8: bool = False,
                calibration: Iterable[np.ndarray] | None = None) -> Path:
    """Write ``edge`` (an `AlignedVQEdgeEncoder` in eval mode) as one ONNX graph ``pixel_values -> indices``.

    Args:
        int8: quantize the front to int8 (see the module docstring); needs ``calibration``. A ``patch``-site
            edge with a folded search has no front (`quantizes_front` says which).
        calibration: pixel arrays ``(batch, 3, size, size)`` float32 of real images, already preprocessed
            (`ImagePreprocessing`); a few hundred images are plenty.
    """
    import onnx
    from onnx import compose

    if int8 and calibration is None:
        raise ValueError("int8 export needs calibration images (real images, preprocessed)")
    path = Path(path)
    if foldable_patch_embedding(edge):
        model = patch_edge_model(edge, input_name=INPUT_NAME, output_name=OUTPUT_NAME)
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
        return path
    vision = edge.vision_config
    # The folded search takes any batch (exported from a batch of 2: with 1, torch.export would make the batch
    # dimension a constant). The generic grouped search loops over chunks of its input, so its graph
    # takes one image at a time; `edge_runtime` runs such a graph image by image.
    dynamic = edge.search is not None
    example = torch.zeros(2 if dynamic else 1, vision.num_channels, vision.image_size, vision.image_size)
    with tempfile.TemporaryDirectory() as scratch, torch.no_grad():
        front_path, search_path = Path(scratch) / "front.onnx", Path(scratch) / "search.onnx"
        _export(_Front(edge).eval(), example, INPUT_NAME, FEATURES_NAME, front_path, dynamic)
        features = _Front(edge).eval()(example)
        if edge.search is None:
            _export(_Search(edge).eval(), features, FEATURES_NAME, OUTPUT_NAME, search_path, dynamic)
        if int8:
            front_path = _quantize_front(front_path, Path(scratch), calibration)
        front = onnx.load(str(front_path))
        if edge.search is None:
            search = onnx.load(str(search_path))
            search = compose.add_prefix(search, prefix="search/", rename_inputs=False, rename_outputs=False)
        else:
            search = search_model(edge.search, features.shape[-1], input_name=FEATURES_NAME, output_name=OUTPUT_NAME,
                                  opset=_opset(front))
            search.ir_version = front.ir_version
        if front.opset_import != search.opset_import:
            search = onnx.version_converter.convert_version(search, _opset(front))
        merged = compose.merge_models(front, search, io_map=[(FEATURES_NAME, FEATURES_NAME)])
    onnx.checker.check_model(merged)
    onnx.save(merged, str(path))
    return path


def export_search(edge, path: str | os.PathLike, features: torch.Tensor) -> Path:
    """The edge's search alone as ONNX, ``features (batch, tokens, dim) -> indices``: to measure it apart
    from the front. ``features`` is an example batch (of at least 2)."""
    import onnx

    if edge.search is not None:
        onnx.save(search_model(edge.search, features.shape[-1], input_name=FEATURES_NAME, output_name=OUTPUT_NAME),
                  str(path))
        return Path(path)
    with torch.no_grad():
        _export(_Search(edge).eval(), features, FEATURES_NAME, OUTPUT_NAME, Path(path), edge.search is not None)
    return Path(path)


def _opset(model) -> int:
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def _quantize_front(path: Path, scratch: Path, calibration: Iterable[np.ndarray]) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}

    prepared, quantized = scratch / "front.pre.onnx", scratch / "front.int8.onnx"
    # ONNX shape inference is enough for these graphs; ORT's symbolic one fails on them in older releases.
    quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True)
    quantize_static(
        str(prepared), str(quantized), Reader(), quant_format=QuantFormat.QOperator,
        op_types_to_quantize=["Conv", "MatMul", "Gemm"], per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        extra_options={"MatMulConstBOnly": True},
    )
    return quantized


__all__ = ["FEATURES_NAME", "INPUT_NAME", "OUTPUT_NAME", "export_onnx", "export_search", "quantizes_front"]
