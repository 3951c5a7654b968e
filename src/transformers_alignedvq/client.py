"""Edge client: image + question -> AlignedVQ frame -> cloud server -> answer.

`EdgeClient` loads only what the device needs, an edge folder (see `edge_runtime`): the edge's weights and
``edge_config.json``, which also records the image preprocessing. It never builds the language model and
never imports the server or FastAPI.

    client = EdgeClient("edge/", "http://cloud:8000")
    answer = client.ask("photo.jpg", "What color is the shape?")
    answer.text, answer.bytes_sent, answer.edge_ms, answer.transfer_ms, answer.cloud_ms
    for piece in client.stream("photo.jpg", "What color is the shape?"):   # as it is generated
        print(piece, end="", flush=True)

Asking has no side effect on the server, so a request is safe to repeat (a greedy answer, the default, or a
sampled one with a seed, is the same every time). The client retries a refused or dropped connection, a
connect/read/write timeout and a ``408``, ``429``, ``502``, ``503`` or ``504`` (honouring ``Retry-After``),
waiting with jittered exponential backoff, for as long as ``retry_window`` seconds (30 by default: about what a
server restart takes). Any other error status, and a TLS failure (an https:// URL for a plain HTTP server, an
untrusted certificate), is final at once.
"""

from __future__ import annotations

import json
import os
import random
import socket
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

import httpx

from . import wire
from .client_edges import DeviceEdge, EncodedImage, is_edge_folder, open_edge
from .edge_runtime import EDGE_CONFIG_NAME, EdgeCheckpointError, download_edge
from .entropy import load_entropy_model
from .wire_followup import encode_followup

DEFAULT_RETRY_WINDOW = 30.0
# Seconds an idle keep-alive connection is kept: below `alignedvq serve`'s --keep-alive-timeout (5 s).
KEEPALIVE_EXPIRY = 2.0
# Transport failures after which the same request can simply be sent again: the request is idempotent, so a
# read timeout (the server may still be computing) is retried too, within the retry window.
_RETRYABLE = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
# Statuses a later attempt can get past: request timeout, rate limit, overload (503), and a proxy in front of
# a server that is restarting (502, 504). Any other error status, and a TLS failure, is final at once.
RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})

__all__ = ["Answer", "AnswerStream", "EdgeClient", "EdgeClientError", "ServerError", "ServerUnavailableError"]


class EdgeClientError(RuntimeError):
    """Base class of the edge client's errors."""


class ServerError(EdgeClientError):
    """The server answered with an error status; ``status``, ``type`` and ``message`` come from its JSON."""

    def __init__(self, status: int, type_: str, message: str, body: Any = None):
        super().__init__(f"server answered {status} {type_}: {message}")
        self.status, self.type, self.message, self.body = status, type_, message, body


class ServerUnavailableError(EdgeClientError):
    """No answer within the retry window: connection refused, dropped or timed out, or the server stayed
    overloaded."""


@dataclass
class Answer:
    """One answer and where the time went.

    ``edge_ms``: preprocessing + edge encoder + framing. ``cloud_ms``: the server's own ``timing_ms.total``
    (decode, queue, generate). ``transfer_ms``: the successful HTTP exchange minus ``cloud_ms``.
    ``total_ms``: wall time of `EdgeClient.ask`, retries and backoff included.
    """

    text: str
    bytes_sent: int
    edge_ms: float
    transfer_ms: float
    cloud_ms: float
    total_ms: float
    server: dict = field(default_factory=dict)
    attempts: int = 1


def check_server_url(url: str) -> str:
    """``url`` without a trailing slash; `EdgeClientError` unless it is an http(s) URL with a host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise EdgeClientError(
            f"server URL {url!r} must start with http:// or https:// and name a host, e.g. http://cloud:8000"
        )
    return url.rstrip("/")


def edge_folder(path: str | os.PathLike) -> Path:
    """The local edge folder for ``path``: an edge folder (of any family, `client_edges`), a full checkpoint
    folder with the edge files, or a Hub repo id (only the edge files are fetched)."""
    directory = Path(path)
    if directory.is_file():
        raise EdgeClientError(f"{path} is a file; give the edge folder (the one holding {EDGE_CONFIG_NAME})")
    if directory.is_dir():
        if not is_edge_folder(directory) and (directory / "config.json").is_file():
            raise EdgeClientError(
                f"{directory} is a model folder without the edge files; export its edge part first "
                f"(`alignedvq export-edge --model {directory} --output EDGE_DIR`)"
            )
        if not is_edge_folder(directory):
            raise EdgeClientError(f"{directory} is not an edge folder: missing {EDGE_CONFIG_NAME} (or, for "
                                  "Qwen2.5-VL, qwen_edge.json)")
        return directory
    if os.path.exists(path) or not _looks_like_repo_id(str(path)):
        raise EdgeClientError(f"edge folder {path} not found")
    try:
        folder, _ = download_edge(str(path))
    except ImportError as exc:
        raise EdgeClientError(f"edge folder {path} not found here, and {exc}") from exc
    except Exception as exc:  # the hub raises many types (offline, 404, auth); all mean "cannot get it"
        reason = " ".join(str(exc).split())[:400] or type(exc).__name__  # the hub's messages span lines
        raise EdgeClientError(f"edge folder {path} not found here, nor as a Hub repo id: {reason}") from exc
    return edge_folder(folder)


def _looks_like_repo_id(text: str) -> bool:
    """``name`` or ``org/name`` as the Hub spells them; a path with more parts, or starting with ``.``, ``/``
    or ``~``, is a mistyped local folder and is never sent to the Hub."""
    parts = text.split("/")
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    return (len(parts) <= 2 and all(parts) and not text.startswith((".", "~"))
            and all(set(part) <= allowed and ".." not in part for part in parts))


class EdgeClient:
    """Runs the edge part of an AlignedVQ model and asks a cloud server (`transformers_alignedvq.serving`).

    Args:
        model_dir: an edge folder (`alignedvq export-edge`, or `model.edge_encoder().save_pretrained(dir)`; for
            LLaVA-OneVision and LLaVA-NeXT `export.tiled_edge.export_tiled_edge`, for Qwen2.5-VL
            `export.qwen_edge_onnx.export_qwen_edge`), a full checkpoint folder that carries the edge files (only
            those are read), or a Hub repo id (only those are fetched). The family comes from the folder
            (`client_edges.open_edge`): tiled and patch-grid frames carry their geometry section.
        server_url: the server's base URL, e.g. ``http://127.0.0.1:8000``.
        timeout: seconds per HTTP attempt (connect, write, read each).
        retry_window: seconds during which failed attempts are retried (0: never retry). Each wait is capped
            by what is left of the window, so an unreachable server fails after about ``retry_window`` (plus
            the last attempt's ``timeout``).
        backoff: first wait between attempts in seconds, doubled each time up to ``max_backoff``; each wait is
            drawn uniformly from [half, all] of that (jitter, so devices that lost the server together do not
            return together). A 503's ``Retry-After`` replaces it.
        backend, threads: the edge runtime (`edge_runtime.load_edge_runtime`): ``"auto"`` runs an ONNX edge
            with onnxruntime when the folder has one, otherwise the PyTorch edge.
        entropy_coding: True: always send the coded frame (indices under the folder's entropy model, the
            question too where that is shorter); None (default): per frame, the smaller of the coded and the
            raw one; False: never code.
        api_key: sent as ``Authorization: Bearer <api_key>`` to a server that has API keys on.
        reuse_images: name an image sent recently by its digest instead of sending its frame again (a
            follow-up of about 20 bytes; the frame is resent once, automatically, if the server dropped it).
    """

    def __init__(self, model_dir: str | os.PathLike, server_url: str, *, timeout: float = 60.0,
                 retry_window: float = DEFAULT_RETRY_WINDOW, backoff: float = 0.2, max_backoff: float = 5.0,
                 backend: str = "auto", threads: int | None = None, device: str = "cpu",
                 transport: httpx.BaseTransport | None = None, entropy_coding: bool | None = None,
                 seed: int | None = None, api_key: str | None = None, reuse_images: bool = True):
        if retry_window < 0 or backoff < 0 or max_backoff < 0 or timeout <= 0:
            raise ValueError(f"need timeout > 0 and retry_window, backoff, max_backoff >= 0; got "
                             f"{timeout}, {retry_window}, {backoff}, {max_backoff}")
        self.server_url = check_server_url(server_url)
        directory = edge_folder(model_dir)
        try:
            self.device_edge: DeviceEdge = open_edge(directory, backend=backend, threads=threads, device=device)
        except EdgeCheckpointError as exc:
            raise EdgeClientError(str(exc)) from exc
        self.edge = self.device_edge.runtime  # the family's own runtime (LLaVA: `EdgeRuntime`)
        self.retry_window, self.backoff, self.max_backoff = retry_window, backoff, max_backoff
        self._random = random.Random(seed)
        self.codebook_size = self.device_edge.codebook_size
        self.fingerprint = self.device_edge.fingerprint
        entropy_model = load_entropy_model(directory) if entropy_coding is not False else None
        if entropy_coding and entropy_model is None:
            raise EdgeClientError(f"{directory} has no entropy model; coded frames are not available")
        if entropy_model is not None:
            try:
                self.device_edge.check_entropy_model(entropy_model)
            except EdgeCheckpointError as exc:
                raise EdgeClientError(str(exc)) from exc
        self.entropy_model = entropy_model
        self.always_entropy_code = bool(entropy_coding)
        self.reuse_images = reuse_images
        self._sent_images: OrderedDict[bytes, None] = OrderedDict()  # digests of images the server keeps
        if transport is None:
            # httpx writes the headers and the body separately; with Nagle's algorithm on, the small body then
            # waits for the server's delayed ACK (~40 ms on Linux), more than a whole frame takes on the wire.
            # An idle connection is dropped before the server's keep-alive timeout (5 s by default) can close it,
            # so a request never goes out on a connection the server is closing at that moment.
            transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                                            limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY))
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._http = httpx.Client(base_url=self.server_url, timeout=timeout, transport=transport, headers=headers)

    # -------------------------------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "EdgeClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------------
    def encode(self, image, question: str) -> bytes:
        """The frame the edge sends for ``image`` and ``question`` (no network)."""
        return self._frame(self.device_edge.encode(image), question)

    def _frame(self, image: EncodedImage, question: str) -> bytes:
        options = dict(codebook_size=self.codebook_size, codebook_fingerprint=self.fingerprint, prompt=question,
                       grid=image.grid, has_cls_token=image.has_cls_token, geometry=image.geometry)
        plain = None if self.always_entropy_code else wire.encode_frame(image.indices, **options)
        if self.entropy_model is None:
            return plain
        coded = wire.encode_frame(image.indices, entropy_model=self.entropy_model, **options)
        return coded if plain is None or len(coded) < len(plain) else plain

    def server_info(self) -> dict:
        """``GET /v1/model`` (with the same retries as `ask`)."""
        response, _ = self._send("GET", "/v1/model")
        return response.json()

    def check_server(self) -> dict:
        """Raise `EdgeClientError` unless the server decodes this edge's frames (same codebook and tokens; for
        the tiled families the same tiling, for Qwen2.5-VL the same patch sizes and pixel limits)."""
        info = self.server_info()
        ours = self.device_edge.contract()
        wrong = {k: (v, info.get(k)) for k, v in ours.items() if info.get(k) != v}
        if wrong:
            details = ", ".join(f"{k}: edge {a!r}, server {b!r}" for k, (a, b) in wrong.items())
            raise EdgeClientError(f"this edge and the server at {self.server_url} do not match ({details})")
        return info

    def save_frame(self, path: str | os.PathLike, image, question: str) -> int:
        """Write the frame `ask` would send for ``image`` and ``question`` to ``path`` (for curl, or to look at
        with `wire.decode_frame`); returns its size in bytes."""
        frame = self.encode(image, _checked_question(question))
        Path(path).write_bytes(frame)
        return len(frame)

    def ask(self, image, question: str, *, max_new_tokens: int | None = None, temperature: float | None = None,
            top_p: float | None = None, seed: int | None = None) -> Answer:
        """Encode ``image`` on the edge, send the frame with ``question``, return the server's answer.

        ``max_new_tokens``, ``temperature``, ``top_p`` and ``seed`` go to the server as they are (None: the
        server's default, greedy); a value it refuses raises `ServerError` (422 ``invalid_parameter``).
        An image this client sent recently (same indices) is named by its digest instead of sent again
        (`wire_followup`, with ``reuse_images``); if the server no longer holds it, the frame goes once more.
        """
        return self.ask_many(image, [question], max_new_tokens=max_new_tokens, temperature=temperature,
                             top_p=top_p, seed=seed)[0]

    def ask_many(self, image, questions: Sequence[str], **sampling) -> list[Answer]:
        """`ask` each of ``questions`` about ``image``, running the edge once: the image's indices cross the
        network once, each further question as a follow-up of a few bytes."""
        questions = [_checked_question(question) for question in questions]
        start = time.perf_counter()
        encoded = self.device_edge.encode(image)
        edge_ms = 1000 * (time.perf_counter() - start)
        params = _sampling(**sampling)
        answers = []
        for question in questions:
            started = time.perf_counter()
            response, attempts, sent = self._post_answer(encoded, question, params, stream=False)
            round_trip_ms = response.elapsed.total_seconds() * 1000
            answers.append(_answer(response.json(), sent, edge_ms, round_trip_ms, started - edge_ms / 1000, attempts))
            edge_ms = 0.0  # the edge ran once, for the first question
        return answers

    def stream(self, image, question: str, *, max_new_tokens: int | None = None, temperature: float | None = None,
               top_p: float | None = None, seed: int | None = None) -> "AnswerStream":
        """Like `ask`, but the answer comes as it is generated: iterate the returned `AnswerStream` for its
        text pieces (they add up to the answer); its ``answer`` is the `Answer` once the stream has ended.

        Connecting is retried as `ask` does; once pieces have arrived nothing is retried (a second attempt
        would repeat them): a stream cut short raises `ServerUnavailableError`, an ``error`` event
        `ServerError`.
        """
        start = time.perf_counter()
        encoded = self.device_edge.encode(image)
        edge_ms = 1000 * (time.perf_counter() - start)
        params = {**_sampling(max_new_tokens, temperature, top_p, seed), "stream": "true"}
        response, attempts, sent = self._post_answer(encoded, _checked_question(question), params, stream=True)
        return AnswerStream(response, bytes_sent=sent, edge_ms=edge_ms, start=start, attempts=attempts,
                            on_done=self._remember)

    def _post_answer(self, image: EncodedImage, question: str, params: dict, *,
                     stream: bool) -> tuple[httpx.Response, int, int]:
        """``(response, attempts, bytes sent)``: a follow-up where the server should hold the image, else (or
        when it does not) the frame."""
        digest = image.digest(self.fingerprint)
        headers = {"Content-Type": wire.FRAME_MEDIA_TYPE}
        if self.reuse_images and digest in self._sent_images:
            body = encode_followup(digest, question, entropy_model=self.entropy_model)
            try:
                response, attempts = self._send("POST", "/v1/answer", stream=stream, content=body, headers=headers,
                                                params=params)
                self._sent_images.move_to_end(digest)
                return response, attempts, len(body)
            except ServerError as error:
                if error.type != "image_not_cached":
                    raise
                self._sent_images.pop(digest, None)
        frame = self._frame(image, question)
        response, attempts = self._send("POST", "/v1/answer", stream=stream, content=frame, headers=headers,
                                        params=params)
        if not stream:
            self._remember(response.json())
        return response, attempts, len(frame)

    def _remember(self, body: dict) -> None:
        """Note the image the server says it keeps (``image_digest``), forgetting the oldest beyond 256."""
        digest = body.get("image_digest") if self.reuse_images else None
        if digest:
            self._sent_images[bytes.fromhex(digest)] = None
            while len(self._sent_images) > 256:
                self._sent_images.popitem(last=False)

    # -------------------------------------------------------------------------------------------------
    def _delay(self, attempt: int, retry_after: str | None, remaining: float) -> float:
        delay = min(self.max_backoff, self.backoff * 2**attempt) * self._random.uniform(0.5, 1.0)
        if retry_after is not None:
            try:
                delay = max(0.0, float(retry_after))
            except ValueError:  # an HTTP date: keep the exponential delay
                pass
        return min(delay, remaining)

    def _send(self, method: str, path: str, *, stream: bool = False, **kwargs) -> tuple[httpx.Response, int]:
        """The first answer below 400, retried as the class docstring says. With ``stream`` the response's
        body is not read yet (the caller reads and closes it)."""
        start, attempt, last_problem = time.monotonic(), 0, "no attempt made"
        while True:
            retry_after = None
            try:
                response = self._http.send(self._http.build_request(method, path, **kwargs), stream=stream)
            except _RETRYABLE as exc:
                if _tls_failure(exc):  # the same handshake fails the same way every time
                    raise EdgeClientError(f"{method} {self.server_url}{path}: TLS failed ({exc}); an https:// URL "
                                          "needs a server with TLS on and a certificate this machine trusts") from exc
                last_problem = f"{type(exc).__name__}: {exc or 'connection failed'}"
            else:
                if response.status_code < 400:
                    return response, attempt + 1
                if stream:
                    response.read()
                    response.close()
                error = _error_of(response)
                if response.status_code not in RETRY_STATUSES:
                    raise error
                last_problem = str(error)
                retry_after = response.headers.get("retry-after")
            attempt += 1
            remaining = self.retry_window - (time.monotonic() - start)
            if remaining <= 0:
                raise ServerUnavailableError(
                    f"{method} {self.server_url}{path} failed after {attempt} attempt(s) in "
                    f"{time.monotonic() - start:.1f} s: {last_problem}"
                )
            time.sleep(self._delay(attempt - 1, retry_after, remaining))


def _tls_failure(exc: BaseException) -> bool:
    """Whether a transport error comes from TLS (wrong protocol, untrusted certificate): httpx wraps the
    `ssl.SSLError` in its own types, so look down the chain of causes."""
    for _ in range(8):
        if exc is None:
            return False
        if isinstance(exc, ssl.SSLError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class AnswerStream:
    """The text pieces of one streamed answer, as the server sends them (iterate once); ``answer`` is the
    `Answer` (the server's final body, ``total_ms`` up to the last piece) once iteration has ended. Use as a
    context manager, or iterate to the end, so the connection is released; `close` stops early (the server
    then stops generating)."""

    def __init__(self, response: httpx.Response, *, bytes_sent: int, edge_ms: float, start: float, attempts: int,
                 on_done: Callable[[dict], None] | None = None):
        self._response, self.bytes_sent, self.edge_ms = response, bytes_sent, edge_ms
        self._start, self.attempts, self._on_done = start, attempts, on_done
        self.answer: Answer | None = None

    def __enter__(self) -> "AnswerStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._response.close()

    def __iter__(self):
        try:
            for event, data in _server_sent_events(self._response):
                if event == "token":
                    yield str(data["delta"])
                elif event == "error":
                    error = data["error"]
                    raise ServerError(200, str(error["type"]), str(error["message"]), data)
                elif event == "done":
                    if self._on_done is not None:
                        self._on_done(data)
                    round_trip_ms = 1000 * (time.perf_counter() - self._start) - self.edge_ms
                    self.answer = _answer(data, self.bytes_sent, self.edge_ms, round_trip_ms, self._start,
                                          self.attempts)
                    return
        except (httpx.TransportError, httpx.RemoteProtocolError) as exc:
            raise ServerUnavailableError(f"the answer stream broke off: {type(exc).__name__}: {exc}") from exc
        finally:
            self.close()
        raise ServerUnavailableError("the answer stream ended without its done event")


def _server_sent_events(response: httpx.Response):
    """``(event, data as JSON)`` of a ``text/event-stream`` body, as its events complete."""
    event, data = "message", []
    for line in response.iter_lines():
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


def _checked_question(question) -> str:
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question must be a non-empty string")
    return question


def _sampling(max_new_tokens=None, temperature=None, top_p=None, seed=None) -> dict:
    sampling = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    return {name: value for name, value in sampling.items() if value is not None}


def _answer(body: dict, bytes_sent: int, edge_ms: float, round_trip_ms: float, start: float,
            attempts: int) -> Answer:
    cloud_ms = float(body["timing_ms"]["total"])
    return Answer(text=body["answer"], bytes_sent=bytes_sent, edge_ms=edge_ms,
                  transfer_ms=max(0.0, round_trip_ms - cloud_ms), cloud_ms=cloud_ms,
                  total_ms=1000 * (time.perf_counter() - start), server=body, attempts=attempts)


def _error_of(response: httpx.Response) -> ServerError:
    try:
        body = response.json()
        error = body["error"]
        return ServerError(response.status_code, str(error["type"]), str(error["message"]), body)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        text = response.text[:200]
        return ServerError(response.status_code, "http_error", text or response.reason_phrase, text)
