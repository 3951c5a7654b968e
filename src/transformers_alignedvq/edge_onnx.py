"""Moved to `transformers_alignedvq.export.edge_onnx` (this path works until the next release)."""

from ._moved import forward_to

__getattr__ = forward_to(__name__, "transformers_alignedvq.export.edge_onnx")
