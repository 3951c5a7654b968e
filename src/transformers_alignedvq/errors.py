"""The package's error types, one definition each (no imports: the device side imports this file too).

Two families, both `ValueError`s so a caller that catches bad input catches them:

* `CheckpointError`: a checkpoint (model, adapter, edge or quantizer files) cannot be used. Its kinds:
  `CheckpointMismatchError` (tensors do not fit the model, a file is truncated or corrupt, an adapter's base
  has another architecture), `CheckpointSizeError` (a size in a config is beyond sane limits or disagrees with
  the weights, found before anything is built) and `EdgeCheckpointError` (an edge folder lacks files or its
  files do not belong together).
* Input errors: `WireFormatError` (a frame or an entropy model), `ServerConfigError` (settings a server cannot
  start with). Image and sampling input errors live with the code that checks them (`preprocess`,
  `sampling`), where the device imports them without the cloud.
"""


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names what is wrong and what to do."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint does not fit the model it is loaded into, or a file of it cannot be read: missing,
    unexpected, mis-shaped or mis-typed tensors, a truncated or corrupt file, an adapter whose base has another
    architecture. The message names what is wrong."""


class CheckpointSizeError(CheckpointMismatchError):
    """A size in a checkpoint's config is beyond the sane limits or disagrees with its weights."""


class EdgeCheckpointError(CheckpointError):
    """An edge folder is missing files, or they cannot be read, or do not belong together."""


class ServerConfigError(ValueError):
    """The model folder or the server settings cannot be served (raised at start-up, never per request)."""


class WireFormatError(ValueError):
    """A wire frame, an entropy model, or an argument used to build or check either, is invalid."""


__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointSizeError",
    "EdgeCheckpointError",
    "ServerConfigError",
    "WireFormatError",
]
