"""Error types shared by several modules (no imports: the edge side may import this file too)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model it is loaded into, or a file of it cannot be read: missing,
    unexpected, mis-shaped or mis-typed tensors, a truncated or corrupt file, an adapter whose base has another
    architecture. The message names what is wrong."""


class ServerConfigError(ValueError):
    """The model folder or the server settings cannot be served (raised at start-up, never per request)."""


class WireFormatError(ValueError):
    """A wire frame, an entropy model, or an argument used to build or check either, is invalid."""


__all__ = ["CheckpointMismatchError", "ServerConfigError", "WireFormatError"]
