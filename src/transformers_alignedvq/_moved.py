"""Old import paths of modules that moved, kept for one release with a `DeprecationWarning`."""

from __future__ import annotations

import importlib
import warnings


def forward_to(old: str, new: str):
    """A module ``__getattr__`` for ``old`` that answers from ``new`` (imported now), with a warning."""
    module = importlib.import_module(new)
    warnings.warn(f"{old} moved to {new}; the old path works until the next release", DeprecationWarning,
                  stacklevel=3)
    return lambda name: getattr(module, name)
