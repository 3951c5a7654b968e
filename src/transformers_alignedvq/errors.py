"""Error types shared by several modules (no imports: the edge side may import this file too)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model it is loaded into, or a file of it cannot be read: missing,
    unexpected, mis-shaped or mis-typed tensors, a truncated or corrupt file, an adapter whose base has another
    architecture. The message names what is wrong."""


class ServerConfigError(ValueError):
    """The model folder or the server settings cannot be served (raised at start-up, never per request)."""


__all__ = ["CheckpointMismatchError", "ServerConfigError"]
