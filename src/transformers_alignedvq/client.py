"""Edge client: image + question -> AlignedVQ frame -> cloud server -> answer.

`EdgeClient` loads only what the device needs, an exported edge folder (see `export_edge`):
``edge_config.json`` + ``edge_model.safetensors`` (`AlignedVQEdgeEncoder`) and ``preprocessor_config.json``
(the image processor). It never builds the language model and never imports the server or FastAPI.

    client = EdgeClient("edge/", "http://cloud:8000")
    answer = client.ask("photo.jpg", "What color is the shape?")
    answer.text, answer.bytes_sent, answer.edge_ms, answer.transfer_ms, answer.cloud_ms

Answering is a pure function of the frame (greedy decoding), so a request is safe to repeat: the client
retries on a refused or dropped connection and on ``503`` (honouring ``Retry-After``), with bounded
exponential backoff.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

from . import wire
from .edge import EDGE_CONFIG_NAME, EDGE_WEIGHTS_NAME, AlignedVQEdgeEncoder
from .edge_export import PREPROCESSOR_CONFIG_NAME, PROCESSOR_CONFIG_NAME, export_edge, frame_geometry

FRAME_MEDIA_TYPE = "application/octet-stream"
# Either holds the image processor; a full checkpoint folder has the edge files and the second one.
_IMAGE_PROCESSOR_FILES = (PREPROCESSOR_CONFIG_NAME, PROCESSOR_CONFIG_NAME)
# Transport failures after which the same request can simply be sent again. Read/write timeouts are not
# among them: the server may still be working on it, and piling on repeats would only add load.
_RETRYABLE = (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ConnectTimeout, httpx.PoolTimeout)

__all__ = ["Answer", "EdgeClient", "EdgeClientError", "ServerError", "ServerUnavailableError", "export_edge"]


class EdgeClientError(RuntimeError):
    """Base class of the edge client's errors."""


class ServerError(EdgeClientError):
    """The server answered with an error status; ``status``, ``type`` and ``message`` come from its JSON."""

    def __init__(self, status: int, type_: str, message: str, body: Any = None):
        super().__init__(f"server answered {status} {type_}: {message}")
        self.status, self.type, self.message, self.body = status, type_, message, body


class ServerUnavailableError(EdgeClientError):
    """No answer after every retry: connection refused or dropped, or the server stayed overloaded."""


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


def _local_edge_folder(path: str | os.PathLike) -> Path:
    directory = Path(path)
    if directory.is_dir():
        if not (directory / EDGE_CONFIG_NAME).is_file() and (directory / "config.json").is_file():
            raise EdgeClientError(
                f"{directory} is a model folder without the edge files; export its edge part first "
                f"(`alignedvq export-edge --model {directory} --output EDGE_DIR`)"
            )
        missing = [name for name in (EDGE_CONFIG_NAME, EDGE_WEIGHTS_NAME) if not (directory / name).is_file()]
        if not any((directory / name).is_file() for name in _IMAGE_PROCESSOR_FILES):
            missing.append(PREPROCESSOR_CONFIG_NAME)
        if missing:
            raise EdgeClientError(f"{directory} is not an exported edge folder: missing {', '.join(missing)}")
        return directory
    if os.path.exists(path) or str(path).startswith((".", "/", "~")):
        raise EdgeClientError(f"edge folder {path} not found")
    # Otherwise a Hub repo id: fetch the edge files only, never the full checkpoint.
    from huggingface_hub import snapshot_download

    from .hub import EDGE_FILES

    try:
        folder = Path(snapshot_download(str(path), allow_patterns=sorted({*EDGE_FILES, *_IMAGE_PROCESSOR_FILES})))
    except Exception as exc:  # the hub raises many types (offline, 404, auth); all mean "cannot get it"
        raise EdgeClientError(f"cannot fetch the edge files of {path!r} from the Hub: {exc}") from exc
    return _local_edge_folder(folder)


def _as_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, (bytes, bytearray)):
        import io

        with Image.open(io.BytesIO(image)) as opened:
            return opened.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(image).convert("RGB")
    raise TypeError(f"image must be a PIL image, a path, encoded bytes or an HxWxC array, got {type(image).__name__}")


class EdgeClient:
    """Runs the edge part of an AlignedVQ model and asks a cloud server (`transformers_alignedvq.server`).

    Args:
        model_dir: an exported edge folder (`export_edge`), a full checkpoint folder that carries the edge
            files (only those and the image processor are read), or a Hub repo id (only those are fetched).
        server_url: the server's base URL, e.g. ``http://127.0.0.1:8000``.
        timeout: seconds per HTTP attempt (connect, write, read each).
        retries: extra attempts after the first on a refused/dropped connection or a 503.
        backoff: first wait between attempts in seconds, doubled each time, at most ``max_backoff``; a 503's
            ``Retry-After`` replaces it (also capped at ``max_backoff``).
    """

    def __init__(self, model_dir: str | os.PathLike, server_url: str, *, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.2, max_backoff: float = 5.0, device: str | torch.device = "cpu",
                 transport: httpx.BaseTransport | None = None, entropy_coding: bool | None = None):
        from transformers import AutoImageProcessor

        if retries < 0 or backoff < 0 or max_backoff < 0:
            raise ValueError(f"retries, backoff and max_backoff must be >= 0, got {retries}, {backoff}, {max_backoff}")
        directory = _local_edge_folder(model_dir)
        self.encoder = AlignedVQEdgeEncoder.from_pretrained(directory).to(device).eval()
        self.image_processor = AutoImageProcessor.from_pretrained(directory)
        self.device = torch.device(device)
        self.server_url = server_url.rstrip("/")
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        vision = self.encoder.vision_config
        self.geometry = frame_geometry(vision.image_size, vision.patch_size)
        self.codebook_size = self.encoder.settings["codebook_size"]
        self.fingerprint = self.encoder.codebook_fingerprint()
        # Lossless entropy coding needs the index distribution from the edge folder. True: always use it;
        # None (default): per frame, send whichever of the coded and the bit-packed frame is smaller (ANS has
        # a 12-byte header that short frames do not repay); False: never.
        from .hub import load_index_distribution

        distribution = load_index_distribution(directory) if entropy_coding is not False else None
        if entropy_coding and distribution is None:
            raise EdgeClientError(f"{directory} has no index distribution; entropy coding is not available")
        self.entropy_model = distribution
        self.always_entropy_code = bool(entropy_coding)
        if transport is None:
            # httpx writes the headers and the body separately; with Nagle's algorithm on, the small body then
            # waits for the server's delayed ACK (~40 ms on Linux), more than a whole frame takes on the wire.
            transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self._http = httpx.Client(base_url=self.server_url, timeout=timeout, transport=transport)

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
        pixels = self.image_processor(images=_as_image(image), return_tensors="pt")["pixel_values"]
        indices = self.encoder(pixels.to(self.device, dtype=torch.float32))[0].cpu().numpy()
        options = dict(codebook_size=self.codebook_size, codebook_fingerprint=self.fingerprint, prompt=question,
                       grid=self.geometry["grid"], has_cls_token=self.geometry["has_cls_token"])
        if self.entropy_model is None:
            return wire.encode_frame(indices, **options)
        coded = wire.encode_frame(indices, entropy_model=self.entropy_model, **options)
        if self.always_entropy_code:
            return coded
        plain = wire.encode_frame(indices, **options)
        return coded if len(coded) < len(plain) else plain

    def server_info(self) -> dict:
        """``GET /v1/model`` (with the same retries as `ask`)."""
        response, _ = self._send("GET", "/v1/model")
        return response.json()

    def check_server(self) -> dict:
        """Raise `EdgeClientError` unless the server decodes this edge's frames (same codebook and tokens)."""
        info = self.server_info()
        ours = {"codebook_fingerprint": self.fingerprint.hex(), "codebook_size": self.codebook_size,
                "num_tokens": self.geometry["num_tokens"], "codes_per_token": self.encoder.codes_per_token}
        wrong = {k: (v, info.get(k)) for k, v in ours.items() if info.get(k) != v}
        if wrong:
            details = ", ".join(f"{k}: edge {a!r}, server {b!r}" for k, (a, b) in wrong.items())
            raise EdgeClientError(f"this edge and the server at {self.server_url} do not match ({details})")
        return info

    def ask(self, image, question: str) -> Answer:
        """Encode ``image`` on the edge, send the frame with ``question``, return the server's answer."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("question must be a non-empty string")
        start = time.perf_counter()
        frame = self.encode(image, question)
        edge_ms = 1000 * (time.perf_counter() - start)
        response, attempts = self._send("POST", "/v1/answer", content=frame,
                                        headers={"Content-Type": FRAME_MEDIA_TYPE})
        round_trip_ms = response.elapsed.total_seconds() * 1000
        body = response.json()
        cloud_ms = float(body["timing_ms"]["total"])
        return Answer(
            text=body["answer"],
            bytes_sent=len(frame),
            edge_ms=edge_ms,
            transfer_ms=max(0.0, round_trip_ms - cloud_ms),
            cloud_ms=cloud_ms,
            total_ms=1000 * (time.perf_counter() - start),
            server=body,
            attempts=attempts,
        )

    # -------------------------------------------------------------------------------------------------
    def _wait(self, attempt: int, retry_after: str | None) -> None:
        delay = min(self.max_backoff, self.backoff * 2**attempt)
        if retry_after is not None:
            try:
                delay = min(self.max_backoff, max(0.0, float(retry_after)))
            except ValueError:  # an HTTP date: keep the exponential delay
                pass
        time.sleep(delay)

    def _send(self, method: str, path: str, **kwargs) -> tuple[httpx.Response, int]:
        last_problem = "no attempt made"
        for attempt in range(self.retries + 1):
            retry_after = None
            try:
                response = self._http.request(method, path, **kwargs)
            except _RETRYABLE as exc:
                last_problem = f"{type(exc).__name__}: {exc or 'connection failed'}"
            else:
                if response.status_code < 400:
                    return response, attempt + 1
                error = _error_of(response)
                if response.status_code != 503:
                    raise error
                last_problem = str(error)
                retry_after = response.headers.get("retry-after")
            if attempt < self.retries:
                self._wait(attempt, retry_after)
        raise ServerUnavailableError(
            f"{method} {self.server_url}{path} failed after {self.retries + 1} attempt(s): {last_problem}"
        )


def _error_of(response: httpx.Response) -> ServerError:
    try:
        body = response.json()
        error = body["error"]
        return ServerError(response.status_code, str(error["type"]), str(error["message"]), body)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        text = response.text[:200]
        return ServerError(response.status_code, "http_error", text or response.reason_phrase, text)
