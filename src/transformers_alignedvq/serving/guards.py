"""uvicorn, bounded against clients that never finish (or never start) a request.

uvicorn brings a keep-alive timeout, a size limit on the request head (h11's ``max_incomplete_event_size``),
a listen backlog and a graceful-shutdown timeout; the server sets all four from `ConnectionLimits`. It has no
cap on open connections and no limit on the time a client takes to send its request: a connection that sends
nothing, or its head or body a byte at a time, is held forever, and enough of them exhaust the process's file
descriptors (then every accept fails, valid clients' too, with a logged traceback each). This module adds what
is missing on top of uvicorn's own classes, and nothing else:

* `GuardedH11Protocol`: the connection cap and the head and body deadlines.
* `GuardedServer`: on SIGTERM a drain step first (the app answers or refuses what it already received, while
  the listening socket stays open so requests already on the wire are read), then uvicorn's own shutdown, all
  within ``shutdown_timeout``.
* `RateLimitFilter`: a flood of one message (one bad request after another, a failing model) cannot fill the
  disk.

Behind a reverse proxy (docs/serving.md) the proxy bounds its clients the same way.
"""

from __future__ import annotations

import copy
import ipaddress
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .auth import API_KEYS_ENV, AccessLogRedaction
from .connection_limits import ConnectionLimits

logger = logging.getLogger(__name__)

# Loggers a client can make write: uvicorn's (bad requests, access lines), asyncio's (accept failures), ours.
FLOODABLE_LOGGERS = ("uvicorn.error", "uvicorn.access", "asyncio", "transformers_alignedvq.serving.app",
                     "transformers_alignedvq.serving.batcher", __name__)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a cap on open connections and deadlines for the request head and body.

    `protocol_class` makes one subclass per server, holding its limits, its open connections, and those
    waiting for a request head, oldest first (the ones closed first when the cap is reached).
    """

    limits: ClassVar[ConnectionLimits]
    live: ClassVar[set]
    waiting: ClassVar[OrderedDict]

    def connection_made(self, transport) -> None:
        self._phase, self._timer = None, None
        super().connection_made(transport)
        self.live.add(self)
        self._track()
        if len(self.live) > self.limits.max_connections:
            victim = next((c for c in self.waiting if c is not self), self)
            logger.warning("%d connections open (max_connections): closing the one that waited longest for a "
                           "request", len(self.live))
            victim.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._track()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track()

    def connection_lost(self, exc) -> None:
        self._enter(None)
        self.live.discard(self)
        super().connection_lost(exc)

    def close(self) -> None:
        self._enter(None)
        self.live.discard(self)
        self.transport.close()

    @property
    def request_incomplete(self) -> bool:
        """A request head or body is (or may be) still arriving."""
        return self._phase is not None

    def _track(self) -> None:
        state = None if self.transport.is_closing() else self.conn.their_state
        self._enter("head" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None)

    def _enter(self, phase: str | None) -> None:
        """Start the deadline of ``phase`` ("head", "body", or None: nothing awaited from the client)."""
        if phase == self._phase:
            return
        if self._timer is not None:
            self._timer.cancel()
        self.waiting.pop(self, None)
        self._phase, self._timer = phase, None
        if phase is not None:
            timeout = self.limits.header_timeout if phase == "head" else self.limits.body_timeout
            self._timer = self.loop.call_later(timeout, self.close)
        if phase == "head":
            self.waiting[self] = None


def protocol_class(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits, "live": set(), "waiting": OrderedDict()})


class GuardedServer(uvicorn.Server):
    """uvicorn's server with a drain step before its own shutdown, both within ``shutdown_timeout``.

    ``drain(deadline)`` (a `time.monotonic` time) answers or refuses the requests the app has received; until it
    returns the listening socket stays open, so requests already sent are read (and refused) rather than reset.
    """

    def __init__(self, config: uvicorn.Config, *, shutdown_timeout: float,
                 drain: Callable[[float], Awaitable[None]] | None = None):
        super().__init__(config)
        self.shutdown_timeout, self.drain = shutdown_timeout, drain

    async def shutdown(self, sockets=None) -> None:
        deadline = time.monotonic() + self.shutdown_timeout
        if self.drain is not None:
            await self.drain(deadline - 0.5)  # leave uvicorn time to send the last answers
        # A request still arriving was never received: close it rather than let it be cancelled into a 500.
        for connection in list(self.server_state.connections):
            if isinstance(connection, GuardedH11Protocol) and connection.request_incomplete:
                connection.close()
        self.config.timeout_graceful_shutdown = max(0.5, deadline - time.monotonic())
        await super().shutdown(sockets)


def make_server(app, *, limits: ConnectionLimits, drain: Callable[[float], Awaitable[None]] | None = None,
                **uvicorn_options) -> GuardedServer:
    """A `GuardedServer` for ``app`` (``uvicorn_options``: host, port, log_level, ssl_certfile, ...)."""
    limits.ensure_fd_limit()
    config = uvicorn.Config(
        app, http=protocol_class(limits), ws="none", lifespan="on", backlog=limits.backlog,
        timeout_keep_alive=limits.keep_alive_timeout, h11_max_incomplete_event_size=limits.max_header_bytes,
        **uvicorn_options,
    )
    install_log_rate_limit()
    install_access_log_redaction()
    return GuardedServer(config, shutdown_timeout=limits.shutdown_timeout, drain=drain)


class RateLimitFilter(logging.Filter):
    """Passes at most ``burst`` records of one kind per ``period`` seconds and drops the rest; the first record
    of a kind let through after some were dropped says how many.

    A kind is the logger, the level and the first line of the unformatted message (a traceback's summary, not
    its details; asyncio puts the varying socket on later lines). uvicorn's access lines are one kind per error
    status; answered requests are never dropped.
    """

    def __init__(self, burst: int = 10, period: float = 60.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.burst, self.period, self.clock = burst, period, clock
        self._windows: dict[tuple, list] = {}  # kind -> [window start, passed, dropped]
        self._lock = threading.Lock()

    @staticmethod
    def kind(record: logging.LogRecord) -> tuple | None:
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            status = record.args[4]
            return None if isinstance(status, int) and status < 400 else (record.name, status)
        return record.name, record.levelno, str(record.msg).split("\n", 1)[0][:200]

    def filter(self, record: logging.LogRecord) -> bool:
        kind = self.kind(record)
        if kind is None:
            return True
        now = self.clock()
        with self._lock:
            window = self._windows.get(kind)
            if window is None or now - window[0] >= self.period:
                if len(self._windows) > 10_000:  # kinds are few; this only stops a pathological logger
                    self._windows.clear()
                dropped = window[2] if window else 0
                self._windows[kind] = [now, 1, 0]
                if dropped:
                    record.msg = f"{record.msg} [{dropped} more like this dropped in {self.period:g} s]"
                return True
            if window[1] < self.burst:
                window[1] += 1
                return True
            window[2] += 1
            return False


_RATE_LIMIT = RateLimitFilter()


def install_log_rate_limit() -> RateLimitFilter:
    """Put the process's one `RateLimitFilter` on each of `FLOODABLE_LOGGERS` (idempotent)."""
    for name in FLOODABLE_LOGGERS:
        if _RATE_LIMIT not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_RATE_LIMIT)
    return _RATE_LIMIT


# Query parameters whose values the access log keeps (the answer route's); every other value is blanked.
LOGGED_QUERY_PARAMETERS = ("max_new_tokens", "temperature", "top_p", "seed", "stream")
_REDACTION = AccessLogRedaction(LOGGED_QUERY_PARAMETERS)


def install_access_log_redaction() -> AccessLogRedaction:
    """Put the process's one `auth.AccessLogRedaction` on uvicorn's access logger (idempotent)."""
    access = logging.getLogger("uvicorn.access")
    if _REDACTION not in access.filters:
        access.addFilter(_REDACTION)
    return _REDACTION


def logging_config() -> dict:
    """uvicorn's logging configuration, with our loggers and asyncio's on its stderr handler too."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    for name in ("transformers_alignedvq", "asyncio"):
        config["loggers"][name] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def exposure_warnings(host: str, *, auth: bool, tls: bool) -> list[str]:
    """What to tell the operator about binding to ``host`` with or without keys and TLS."""
    if is_loopback(host):
        return []
    where = "all interfaces" if host in ("0.0.0.0", "::", "") else host
    if not auth:
        return [f"listening on {where} without API keys: anyone who reaches this port can use the model "
                f"(set --api-keys-file or ${API_KEYS_ENV})"]
    if not tls:
        return [f"listening on {where} without TLS: API keys cross the network in clear text unless a TLS proxy "
                f"sits in front (--ssl-certfile/--ssl-keyfile, or docs/serving.md)"]
    return []


__all__ = ["GuardedH11Protocol", "GuardedServer", "RateLimitFilter", "exposure_warnings", "install_log_rate_limit",
           "logging_config", "make_server"]
