"""What one client connection may hold, and for how long (standard library only, so the CLI can show the
defaults without importing the server).

The server applies these in `transformers_alignedvq.serving.guards`; `alignedvq serve` has a flag for each.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ServerConfigError

# Descriptors the process needs besides client connections: model and tokenizer files, the event loop, logs.
FD_RESERVE = 256


@dataclass(frozen=True)
class ConnectionLimits:
    """Limits on open connections and on the time a client may take to send a request (times in seconds).

    Args:
        max_connections: open client connections at most. When a new one would exceed it, the connection that
            has waited longest for a request head is closed (idle or sending its head slowly, as nginx reuses
            idle connections); if every connection is busy with a request, the new one is closed.
        backlog: the listen backlog, which is also the most connections accepted in one go; at most
            ``max_connections``, so a connection accepted in one round cannot be pushed out in the next one
            before its request is read.
        header_timeout: the request head must be complete this long after the connection opened or after the
            previous response; otherwise the connection is closed.
        body_timeout: the body must be complete this long after the head; otherwise the connection is closed.
        keep_alive_timeout: an idle keep-alive connection is closed after this.
        max_header_bytes: the largest request head; a larger one gets a 400 and the connection is closed.
        shutdown_timeout: on SIGTERM, the most time spent answering requests already received before exiting;
            what is still unanswered then gets a 503.
    """

    max_connections: int = 1024
    backlog: int = 256
    header_timeout: float = 10.0
    body_timeout: float = 20.0
    keep_alive_timeout: float = 5.0
    max_header_bytes: int = 8192
    shutdown_timeout: float = 20.0

    def __post_init__(self):
        problems = []
        if self.max_connections < 1:
            problems.append(f"max_connections={self.max_connections} must be >= 1")
        if not 1 <= self.backlog <= self.max_connections:
            problems.append(f"backlog={self.backlog} must be between 1 and max_connections={self.max_connections}")
        for name in ("header_timeout", "body_timeout", "keep_alive_timeout", "shutdown_timeout"):
            if not getattr(self, name) > 0:
                problems.append(f"{name}={getattr(self, name)} must be > 0")
        if self.max_header_bytes < 1024:
            problems.append(f"max_header_bytes={self.max_header_bytes} must be >= 1024")
        if problems:
            raise ServerConfigError("; ".join(problems))

    @property
    def file_descriptors(self) -> int:
        """Descriptors the process may need at once: every connection, one accept round, and the rest."""
        return self.max_connections + self.backlog + FD_RESERVE

    def ensure_fd_limit(self) -> int | None:
        """Raise this process's soft open-file limit to `file_descriptors` if it is lower; return the limit.

        Raises `ServerConfigError` when the hard limit is lower, so the cap is never above what the process can
        open (running out of descriptors makes every accept fail, valid clients' included). ``None`` where the
        platform has no such limit.
        """
        try:
            import resource
        except ImportError:
            return None
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        needed = self.file_descriptors
        if soft == resource.RLIM_INFINITY or soft >= needed:
            return soft
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise ServerConfigError(
                f"max_connections={self.max_connections} and backlog={self.backlog} need {needed} open files, but "
                f"this process may open at most {hard} (ulimit -Hn); lower --max-connections or raise the limit"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        return needed


__all__ = ["ConnectionLimits"]
