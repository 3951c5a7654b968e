"""Running the app: `serve` (a process until SIGTERM or SIGINT, then drained) and `BackgroundServer` (a thread).

Connections are bounded by `serving.guards` (a cap on open connections, deadlines for the request head and
body). On SIGTERM the server stops taking work: requests already received are answered (or get 503
``shutting_down`` once ``shutdown_timeout`` is near), new ones get 503, every response says
``Connection: close``, then the process exits. SIGHUP reloads API keys read from a file.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import ServerConfigError
from .app import create_app
from .auth import ApiKeys
from .connection_limits import ConnectionLimits
from .engines.base import AnswerEngine
from .guards import exposure_warnings, logging_config, make_server

logger = logging.getLogger(__name__)


@dataclass
class BackgroundServer:
    """Run an ASGI app with uvicorn in a daemon thread (demos, tests, benchmarks), bounded like `serve`.

    The listening socket is bound before the thread starts, so ``port=0`` picks a free port with no race.
    Use as a context manager, or call `start` / `stop` (which drains like SIGTERM does for `serve`).
    """

    app: Any
    host: str = "127.0.0.1"
    port: int = 0
    log_level: str = "warning"
    limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    ssl_certfile: str | os.PathLike | None = None
    ssl_keyfile: str | os.PathLike | None = None
    _server: Any = field(default=None, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.ssl_certfile else 'http'}://{host}:{self.port}"

    def start(self, timeout: float = 60.0) -> "BackgroundServer":
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # proto must say TCP: asyncio sets TCP_NODELAY on accepted connections only then, and without it a
        # keep-alive response written in two parts stalls ~40 ms on the client's delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        drain = getattr(getattr(self.app, "state", None), "drain", None)  # set by `create_app`
        self._server = make_server(self.app, limits=self.limits, drain=drain, log_level=self.log_level,
                                   ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name="alignedvq-uvicorn")
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._server.should_exit = True
                sock.close()
                raise RuntimeError(f"the server did not start on {self.url} within {timeout} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(
    model_dir_or_model,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    limits: ConnectionLimits | None = None,
    api_keys: Sequence[str] | ApiKeys | None = None,
    ssl_certfile: str | os.PathLike | None = None,
    ssl_keyfile: str | os.PathLike | None = None,
    **app_kwargs,
) -> None:
    """Serve until SIGTERM or SIGINT (blocking), then drain and exit. ``app_kwargs`` go to `create_app`.

    ``limits`` bound connections (`ConnectionLimits`); ``api_keys`` turn on bearer-token authentication (an
    `auth.ApiKeys` loaded from a file is read again on SIGHUP);
    ``ssl_certfile`` and ``ssl_keyfile`` (PEM) serve HTTPS.
    """
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise ServerConfigError("HTTPS needs both ssl_certfile and ssl_keyfile")
    limits = limits or ConnectionLimits()
    limits.ensure_fd_limit()  # before the model loads: a limit that cannot hold is a start-up error
    for warning in exposure_warnings(host, auth=bool(api_keys), tls=ssl_certfile is not None):
        logger.warning(warning)
    app = create_app(model_dir_or_model, api_keys=api_keys, **app_kwargs)
    _close_before_signal_exit(app.state.engine)
    if isinstance(api_keys, ApiKeys) and len(api_keys):
        _reload_keys_on_sighup(api_keys)
    try:
        server = make_server(app, limits=limits, drain=app.state.drain, host=host, port=port, log_level=log_level,
                             log_config=logging_config(), ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile)
        server.run()
    finally:
        app.state.engine.close()


def _reload_keys_on_sighup(keys: ApiKeys) -> None:
    """``kill -HUP <pid>`` reads the API keys again (`ApiKeys.reload`); a bad file keeps the old keys."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
        return

    def reload(signum, frame):
        try:
            logger.info("SIGHUP: %d API key(s) loaded", keys.reload())
        except ServerConfigError as exc:
            logger.error("SIGHUP: API keys not reloaded, the previous ones stay: %s", exc)

    signal.signal(signal.SIGHUP, reload)


def _close_before_signal_exit(engine: AnswerEngine) -> None:
    """After draining, uvicorn re-raises SIGTERM/SIGINT into the handler installed before it, which ends the
    process at once, past any ``finally``. Install one that closes the engine first (vLLM's engine processes
    would otherwise outlive the server), then hands the signal on as before."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; `serve`'s finally still closes
    for number in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(number)

        def close_then_exit(signum, frame, previous=previous):
            engine.close()
            signal.signal(signum, previous)
            signal.raise_signal(signum)

        signal.signal(number, close_then_exit)


__all__ = ["BackgroundServer", "serve"]
