"""The server's engines, chosen by name: every backend derives from `AnswerEngine` (`base`), none from another.

``"transformers"`` (`transformers.TransformersAnswerEngine`): Transformers' ``generate`` on static batches.
``"vllm"`` (`vllm.VllmAnswerEngine`): image features computed here in batches, the language model in vLLM with
continuous batching. A backend's module is imported only when it is asked for by name (vLLM's is never imported
by choosing Transformers).
"""

from __future__ import annotations

import importlib

from ...errors import ServerConfigError
from .base import AnswerEngine, GenerationRequest, GenerationResult

# Name -> "module:class", relative to this package.
_BACKENDS = {"transformers": ".transformers:TransformersAnswerEngine", "vllm": ".vllm:VllmAnswerEngine"}
ENGINES = tuple(_BACKENDS)


def get_engine(name: str):
    """The engine class (an `AnswerEngine` subclass) called ``name``; `ServerConfigError` for an unknown name."""
    target = _BACKENDS.get(name)
    if target is None:
        raise ServerConfigError(f"engine={name!r} must be one of {', '.join(ENGINES)}")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module, __name__), cls)


__all__ = ["ENGINES", "AnswerEngine", "GenerationRequest", "GenerationResult", "get_engine"]
