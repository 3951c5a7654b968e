"""Moved to `transformers_alignedvq.serving.connection_limits` (this path works until the next release)."""

from ._moved import forward_to

__getattr__ = forward_to(__name__, "transformers_alignedvq.serving.connection_limits")
