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



def forward_names(old: str, new: str, names: dict[str, str]):
    """A module ``__getattr__`` for ``old``, whose names moved to several modules of the package ``new``:
    ``names`` maps each old name to ``"module:attribute"`` under ``new``; imported on first use, warned now."""
    warnings.warn(f"{old} moved to {new}; the old path works until the next release", DeprecationWarning,
                  stacklevel=3)

    def getattr_(name: str):
        target = names.get(name)
        if target is None:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        module, attribute = target.split(":")
        return getattr(importlib.import_module(f"{new}.{module}"), attribute)

    return getattr_
