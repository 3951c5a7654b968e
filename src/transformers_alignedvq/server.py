"""Cloud server: answers questions about images it never sees, from AlignedVQ frames.

The edge posts one wire frame per request (`transformers_alignedvq.wire`, Content-Type
``application/octet-stream``, the raw bytes as the body) holding the image's codebook indices and the
question as the frame's prompt. The server decodes and checks the frame, turns the question into the
model's chat prompt, and answers: greedy by default, sampled on request (`transformers_alignedvq.sampling`).

Two engines answer behind the same request path: ``"transformers"`` (`AnswerEngine`, Transformers'
``generate`` on static batches) and ``"vllm"`` (`transformers_alignedvq.vllm_engine.VllmAnswerEngine`: the
image features are computed here in batches, the language model runs in vLLM with continuous batching).

Routes:

* ``POST /v1/answer`` -> ``{"answer", "bytes_received", "batch_size", "generated_tokens", "timing_ms":
  {"receive_body", "decode_frame", "queue", "generate", "total"}}``. ``generate`` is the cloud vision part
  (codebook lookup, rest of the vision tower, projector) plus the language model; ``total`` runs from the
  last body byte to the response (receiving the body is transfer time, reported apart as ``receive_body``).
  Query parameters: ``max_new_tokens`` (at most the server's), ``temperature`` (0 = greedy, the default),
  ``top_p``, ``seed``, and ``stream=true`` for server-sent events: ``token`` events ``{"delta"}`` whose
  deltas add up to the answer, then one ``done`` event with the body above, or one ``error`` event
  ``{"error": {"type", "message"}}`` when the answer fails after the stream began.
* ``GET /healthz`` -> ``{"status": "ok" | "unhealthy" | "shutting_down", "last_generate", ...}``, 200 only when
  ``ok``: the last generate (the warm-up, then every batch) succeeded and the server is not stopping.
* ``GET /metrics`` -> Prometheus metrics (`transformers_alignedvq.server_metrics`).
* ``GET /v1/model`` -> the edge/cloud contract (split, codebook size, bits per index, tokens, codebook
  fingerprint, frame bytes) and the serving limits.

With API keys (`transformers_alignedvq.auth`), every route but ``/healthz`` (and ``/metrics`` with
``public_metrics``) needs ``Authorization: Bearer
<key>``. ``/docs`` and ``/openapi.json`` exist only with ``docs=True``.

Errors are JSON ``{"error": {"type": ..., "message": ...}}``:

====  =========================  ==============================================================
code  type                       when
====  =========================  ==============================================================
400   ``empty_body``             no body
400   ``malformed_frame``        not a valid frame: bad magic, truncated, trailing bytes, bad CRC,
                                 unknown version or flags, inconsistent header, bad padding,
                                 prompt not UTF-8
401   ``unauthorized``           API keys are on and the request has none, or an unknown one
404   ``not_found``              unknown route
405   ``method_not_allowed``     wrong HTTP method
409   ``codebook_mismatch``      the frame's codebook fingerprint is not this model's
409   ``entropy_model_mismatch`` a coded frame names an entropy model this server does not hold
409   ``image_not_cached``       a follow-up (`transformers_alignedvq.wire_followup`) names an image this
                                 server does not hold (evicted, never sent, or sent with another key)
413   ``payload_too_large``      body (or its Content-Length) above ``max_body_bytes``, or the
                                 question above ``max_prompt_bytes``
415   ``unsupported_media_type`` Content-Type not ``application/octet-stream``, or a
                                 Content-Encoding other than identity
422   ``incompatible_frame``     a well-formed frame this model cannot use: codebook size, token
                                 count or codes per token differ, an index >= K, a version-1
                                 entropy-coded frame
422   ``invalid_question``       no prompt in the frame, a blank question, or one that contains the
                                 image placeholder token
422   ``invalid_parameter``      an unknown, repeated, malformed or out-of-range query parameter
503   ``overloaded``             the request queue is full (``Retry-After`` says when to retry)
503   ``shutting_down``          the server is stopping
500   ``internal_error``         a bug or a failing model; the message never carries internals (the
                                 log has them)
====  =========================  ==============================================================

Concurrent requests are batched: requests wait in a bounded asyncio queue; one worker takes the first,
collects more until it has ``max_batch_size`` or ``max_wait_ms`` passed, and runs the engine's batch step in
a worker thread, so the event loop keeps accepting (and refusing) requests meanwhile. For Transformers that
step is one left-padded ``generate`` (greedy decoding with an attention mask makes a batched answer equal to
the unbatched one); for vLLM it computes the image features, and each request then joins vLLM's running
batch on its own while the worker collects the next requests. A job whose client disconnects is dropped
before its batch runs, or stopped in vLLM.

Connections are bounded by `transformers_alignedvq.http_guard` (a cap on open connections, deadlines for the
request head and body) when served with `serve` or `BackgroundServer`. On SIGTERM the server stops taking
work: requests already received are answered (or get 503 ``shutting_down`` once ``shutdown_timeout`` is
near), new ones get 503, every response says ``Connection: close``, then the process exits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from transformers import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from . import wire
from .auth import ApiKeys, BearerAuth
from .checkpoint_limits import CheckpointSizeError, check_model_folder
from .connection_limits import ConnectionLimits
from .edge_export import describe
from .errors import ServerConfigError
from .http_guard import exposure_warnings, logging_config, make_server
from .image_cache import ImageCache, scope_of
from .sampling import RowLimits, RowSampler, SamplingError, SamplingOptions, parse_query
from .server_metrics import install_metrics
from .server_schemas import (
    HealthResponse,
    ModelInfo,
    answer_responses,
    answer_route_openapi,
    error_responses,
)
from .wire_followup import decode_followup, image_digest, is_followup

logger = logging.getLogger(__name__)

FRAME_MEDIA_TYPE = "application/octet-stream"
ENGINES = ("transformers", "vllm")
DEFAULT_MAX_NEW_TOKENS = 32
DEFAULT_MAX_PROMPT_BYTES = 2048
# LLaVA-1.5's format, for tokenizers saved without a chat template.
FALLBACK_PROMPT = "USER: {image}\n{question} ASSISTANT:"
# Threads that decode frames and tokenise questions (`DynamicBatcher.off_loop`).
DECODE_THREADS = 2
# After SIGTERM, how long requests already on the wire get to be read before the listening socket closes.
DRAIN_GRACE_S = 0.1
CLOSE = {"Connection": "close"}  # on answers sent before the body is read: the rest of it is not wanted


class ApiError(Exception):
    """An error answered to the client as ``{"error": {"type", "message"}}`` with an HTTP status."""

    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers or {}


# Documented prefixes of `wire.decode_frame` messages (docs/wire-format.md, "Errors") -> (status, type).
# Checked in order; anything else the decoder raises is a malformed frame (400).
_WIRE_ERRORS = (
    ("codebook fingerprint mismatch", 409, "codebook_mismatch"),
    ("codebook size mismatch", 422, "incompatible_frame"),
    ("token count mismatch", 422, "incompatible_frame"),
    ("codes per token mismatch", 422, "incompatible_frame"),
    ("decoded index out of range", 422, "incompatible_frame"),
    ("entropy model mismatch", 409, "entropy_model_mismatch"),
    ("version-1 entropy-coded frames", 422, "incompatible_frame"),
    ("prompt too long", 413, "payload_too_large"),
)


def classify_wire_error(exc: wire.WireFormatError) -> ApiError:
    message = str(exc)
    for prefix, status, type_ in _WIRE_ERRORS:
        if message.startswith(prefix):
            return ApiError(status, type_, message)
    return ApiError(400, "malformed_frame", message)


@dataclass
class GenerationRequest:
    """One answer to compute: ``indices`` ``(tokens, codes_per_token)``, the prompt's ``input_ids`` (image
    placeholder expanded), its decoding ``options``, and ``on_tokens``, called with the answer's token ids so
    far after each step (from any thread) when the answer is streamed. ``cancelled`` is set once nobody waits
    for the answer (its client left): generation stops for that row."""

    indices: torch.Tensor
    input_ids: list[int]
    options: SamplingOptions
    on_tokens: Callable[[list[int]], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    image_digest: bytes | None = None  # set where the server keeps the image for follow-ups


@dataclass(eq=False)
class _Job:
    request: GenerationRequest
    future: asyncio.Future
    enqueued: float
    started: float = 0.0
    batch_size: int = 0


@dataclass
class GenerationResult:
    """One answer: its ``text``, the number of tokens generated (eos excluded), and the seconds its batch step
    (and, with vLLM, its own generation) took."""

    text: str
    generated_tokens: int
    generate_s: float


class _RowStreamer(BaseStreamer):
    """Passes each row's new tokens so far to its callback after every step of a batched ``generate``."""

    def __init__(self, callbacks: Sequence[Callable[[list[int]], None] | None]):
        self.callbacks, self.rows, self.prompt_seen = list(callbacks), [[] for _ in callbacks], False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate's first put is the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            self.rows[row].append(token)
            if self.callbacks[row] is not None:
                self.callbacks[row](list(self.rows[row]))

    def end(self) -> None:
        pass


class _RowCancelled(StoppingCriteria):
    """Row ``i`` is done once ``events[i]`` is set (its client left); when every row is, ``generate`` ends."""

    def __init__(self, events: Sequence[threading.Event]):
        self.events = list(events)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.tensor([event.is_set() for event in self.events], device=input_ids.device)


class AnswerEngine:
    """The model side: question -> prompt token ids, and one batched generate (Transformers)."""

    name = "transformers"
    # The server's second, per-request stage and its bound (`DynamicBatcher`): none here, `run_batch` answers.
    complete: Callable[[GenerationRequest, Any], Awaitable[GenerationResult]] | None = None
    max_in_flight: int | None = None

    def __init__(self, model, tokenizer, *, processor=None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        if max_new_tokens < 1:
            raise ServerConfigError(f"max_new_tokens={max_new_tokens} must be >= 1")
        config = model.config
        for attribute in ("codebook_size", "num_image_tokens", "codes_per_token", "split_layer"):
            if not hasattr(config, attribute):
                raise ServerConfigError(f"{type(model).__name__} is not an AlignedVQ model (config lacks {attribute})")
        self.model, self.tokenizer, self.processor = model.eval(), tokenizer, processor
        self.config = config
        self.fingerprint = model.codebook_fingerprint()
        self.max_new_tokens = max_new_tokens
        self.image_token = (getattr(processor, "image_token", None) or getattr(tokenizer, "image_token", None)
                            or "<image>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id != config.image_token_id:
            raise ServerConfigError(
                f"the tokenizer maps {self.image_token!r} to id {self.image_token_id}, the model expects image "
                f"token id {config.image_token_id}; the processor and the model do not belong together"
            )
        # LLaVA's "default" strategy drops the CLS feature before the language model.
        drops_cls = config.vision_feature_select_strategy == "default"
        self.lm_image_tokens = config.num_image_tokens - (1 if drops_cls else 0)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ServerConfigError("the tokenizer has neither a pad nor an eos token; batched generation needs one")
        eos = model.generation_config.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.eos_token_ids = eos
        template_owner = processor if getattr(processor, "chat_template", None) else tokenizer
        self._template_owner = template_owner if getattr(template_owner, "chat_template", None) else None
        geometry = describe(
            settings={key: getattr(config, key)
                      for key in ("split_layer", "split_site", "codebook_size", "num_codebooks", "num_groups")},
            image_size=config.vision_config.image_size,
            patch_size=config.vision_config.patch_size,
            fingerprint=self.fingerprint,
        )
        if geometry["num_tokens"] != config.num_image_tokens:
            raise ServerConfigError(
                f"frames would carry {geometry['num_tokens']} tokens but the model makes {config.num_image_tokens}"
            )
        self.summary = geometry

    @property
    def device(self) -> torch.device:
        return self.model.model.alignedvq.quantizer.codebook.device

    def prompt_text(self, question: str) -> str:
        if self._template_owner is None:
            return FALLBACK_PROMPT.format(image=self.image_token, question=question)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self._template_owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def input_ids(self, question: str) -> list[int]:
        """Token ids of the chat prompt with the image placeholder expanded, as `LlavaProcessor` makes them."""
        return self._expanded_ids(self.prompt_text(question))

    def chat_input_ids(self, messages: list[dict]) -> list[int]:
        """`input_ids` of a conversation in Transformers' chat format (``{"role", "content": [parts]}``, one
        ``{"type": "image"}`` part in all); without a chat template, only one user turn of text and the image."""
        if self._template_owner is None:
            texts = [part["text"] for message in messages for part in message["content"] if part["type"] == "text"]
            if len(messages) != 1 or messages[0]["role"] != "user":
                raise ApiError(422, "invalid_question", "this model has no chat template: send one user message")
            return self.input_ids("\n".join(texts))
        text = self._template_owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self._expanded_ids(text)

    def _expanded_ids(self, text: str) -> list[int]:
        if text.count(self.image_token) != 1:
            raise ApiError(
                422, "invalid_question",
                f"the question must not contain the image placeholder {self.image_token!r}",
            )
        text = text.replace(self.image_token, self.image_token * self.lm_image_tokens)
        ids = self.tokenizer(text)["input_ids"]
        if sum(1 for i in ids if i == self.image_token_id) != self.lm_image_tokens:
            raise ApiError(
                422, "invalid_question",
                f"the question tokenizes to extra image placeholder tokens (id {self.image_token_id})",
            )
        return list(ids)

    def request(self, indices: torch.Tensor, question: str, **options) -> GenerationRequest:
        """A `GenerationRequest` for ``question`` about the image ``indices``; ``options`` override the
        defaults (greedy, this engine's ``max_new_tokens``)."""
        fields = {"max_new_tokens": self.max_new_tokens, **options}
        return GenerationRequest(indices, self.input_ids(question), SamplingOptions(**fields))

    def answer_tokens(self, tokens: Sequence[int], options: SamplingOptions) -> list[int]:
        """The answer's tokens among ``tokens`` generated: at most ``max_new_tokens``, up to the first eos
        (rows of a batch that finished early are padded after it)."""
        tokens = list(tokens[:options.max_new_tokens])
        end = next((i for i, token in enumerate(tokens) if token in self.eos_token_ids), len(tokens))
        return tokens[:end]

    def answer_text(self, tokens: Sequence[int], options: SamplingOptions) -> str:
        return self.tokenizer.decode(self.answer_tokens(tokens, options), skip_special_tokens=True).strip()

    def result(self, tokens: Sequence[int], options: SamplingOptions, seconds: float) -> GenerationResult:
        return GenerationResult(text=self.answer_text(tokens, options),
                       generated_tokens=len(self.answer_tokens(tokens, options)), generate_s=seconds)

    def generate(self, batch: list[GenerationRequest]) -> list[GenerationResult]:
        """One left-padded generate for the batch. Greedy rows come out exactly as they would alone; sampled
        rows each draw with their own options and generator (`sampling.RowSampler`); each row stops at its
        own ``max_new_tokens``."""
        start = time.perf_counter()
        length = max(len(request.input_ids) for request in batch)
        input_ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, request in enumerate(batch):
            ids = request.input_ids
            input_ids[row, length - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, length - len(ids):] = 1
        device = self.device
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                image_indices=self.stack_indices(batch).to(device), **self._generate_options(batch, length),
            )
        elapsed = time.perf_counter() - start
        return [self.result(row, request.options, elapsed) for row, request in zip(out[:, length:].tolist(), batch)]

    def stack_indices(self, batch: list[GenerationRequest]) -> torch.Tensor:
        """The batch's indices as the model takes them: ``(batch, tokens[, codes_per_token])``."""
        indices = torch.stack([request.indices for request in batch])
        return indices.squeeze(-1) if self.config.codes_per_token == 1 else indices

    def _generate_options(self, batch: list[GenerationRequest], prompt_length: int) -> dict:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        options = [request.options for request in batch]
        limits = [option.max_new_tokens for option in options]
        # A fresh config, not the checkpoint's: its sampling defaults must not leak into serving. Sampled rows
        # draw in `RowSampler`; generate itself stays greedy.
        config = GenerationConfig(max_new_tokens=max(limits), do_sample=False, num_beams=1,
                                  pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_ids or None)
        extra: dict[str, Any] = {"generation_config": config}
        if not all(option.greedy for option in options):
            extra["logits_processor"] = LogitsProcessorList([RowSampler(options)])
        stopping = [_RowCancelled([request.cancelled for request in batch])]
        if len(set(limits)) > 1:
            stopping.append(RowLimits(prompt_length, limits))
        extra["stopping_criteria"] = StoppingCriteriaList(stopping)
        if any(request.on_tokens for request in batch):
            extra["streamer"] = _RowStreamer([request.on_tokens for request in batch])
        return extra

    def run_batch(self, batch: list[GenerationRequest]) -> list[GenerationResult]:
        """The server's batch step: here the whole answer (`generate`)."""
        return self.generate(batch)

    def close(self) -> None:
        """Release what the engine holds beyond the model (nothing here; the vLLM engine stops vLLM)."""


class QueueFull(Exception):
    pass


class EngineHealth:
    """Whether the model answered the last time it was asked: the warm-up, then every batch."""

    def __init__(self):
        self.last_ok: bool | None = None
        self.last_at: float | None = None
        self.consecutive_failures = 0

    def record(self, ok: bool) -> None:
        self.last_ok, self.last_at = ok, time.monotonic()
        self.consecutive_failures = 0 if ok else self.consecutive_failures + 1

    @property
    def ok(self) -> bool:
        return self.last_ok is not False

    def snapshot(self) -> dict:
        return {
            "last_generate": {None: "not_run", True: "ok", False: "failed"}[self.last_ok],
            "seconds_since_last_generate": None if self.last_at is None else time.monotonic() - self.last_at,
            "consecutive_failures": self.consecutive_failures,
        }


class DynamicBatcher:
    """Bounded queue + one worker that runs `run_batch` on up to ``max_batch_size`` queued jobs at once.

    With ``complete`` (the vLLM engine), `run_batch` only prepares each job (image features) and
    ``complete(request, prepared)`` then answers each job on its own, concurrently with the worker collecting
    the next batch; at most ``max_in_flight`` jobs are taken from the queue and not yet answered. Without it,
    `run_batch` returns the answers and ``max_in_flight`` is ``max_batch_size``.
    """

    def __init__(self, run_batch: Callable[[list[_Job]], list], *, max_batch_size: int, max_wait_ms: float,
                 max_queue: int, health: EngineHealth | None = None,
                 complete: Callable[[GenerationRequest, Any], Awaitable[GenerationResult]] | None = None,
                 max_in_flight: int | None = None):
        self.run_batch, self.complete = run_batch, complete
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_ms / 1000.0, max_queue
        self.max_in_flight = max_in_flight if complete is not None and max_in_flight else max_batch_size
        self.health = health or EngineHealth()
        self.queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._decoder: ThreadPoolExecutor | None = None
        self._batch_seconds = 0.0  # moving average, for Retry-After
        self._active: set[_Job] = set()  # jobs taken from the queue and not answered yet
        self._room: asyncio.Event | None = None  # set when fewer than max_in_flight jobs are active
        self._completions: set[asyncio.Task] = set()
        self.batches = 0
        self.requests = 0
        self.abandoned = 0  # jobs dropped (or stopped, in vLLM) because their client left
        self.stopping = False
        self.on_batch: Callable[[int], None] | None = None  # called with each batch's size (metrics)

    @property
    def in_flight(self) -> int:
        return len(self._active)

    async def start(self) -> None:
        # Restartable: the same app may go through several lifespans (tests, embedded servers).
        self.stopping = False
        self.queue = asyncio.Queue(maxsize=self.max_queue)
        self._room = asyncio.Event()
        self._room.set()
        # One thread: batch steps never overlap, so batches are the only parallelism of this process.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alignedvq-generate")
        self._decoder = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="alignedvq-decode")
        self._task = asyncio.create_task(self._worker(), name="alignedvq-batcher")

    async def off_loop(self, function: Callable[..., Any], *args) -> Any:
        """``function(*args)`` in the decode threads: frame decoding and tokenisation stay off the event loop,
        so a flood of costly frames delays the requests behind it in those threads, not every connection."""
        if self._decoder is None:
            raise _shutting_down()
        return await asyncio.get_running_loop().run_in_executor(self._decoder, function, *args)

    async def drain(self, deadline: float) -> None:
        """Take no new jobs; answer the queued and running ones until ``deadline`` (`time.monotonic`), then
        answer what is left with 503."""
        self.stopping = True
        await asyncio.sleep(DRAIN_GRACE_S)
        while (self.queue_depth() or self._active) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._refuse_pending()

    async def stop(self) -> None:
        self.stopping = True
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._refuse_pending()
        if self._completions:
            await asyncio.gather(*self._completions, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._decoder is not None:
            self._decoder.shutdown(wait=True)
            self._decoder = None

    def _refuse_pending(self) -> None:
        # A job's completion task is cancelled when its future is settled here (see `_complete`).
        pending = list(self._active)
        while self.queue is not None and not self.queue.empty():
            pending.append(self.queue.get_nowait())
        for job in pending:
            if not job.future.done():
                job.future.set_exception(_shutting_down())

    def queue_depth(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    def retry_after_seconds(self) -> int:
        """Whole seconds until the queue has likely drained enough to take one more request."""
        batches_ahead = self.queue_depth() / self.max_batch_size + 1
        return max(1, min(60, math.ceil(self._batch_seconds * batches_ahead)))

    def submit(self, job: _Job) -> None:
        if self.stopping or self.queue is None:
            raise _shutting_down()
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull from None

    async def _collect(self) -> list[_Job]:
        assert self.queue is not None and self._room is not None
        while len(self._active) >= self.max_in_flight:
            self._room.clear()
            await self._room.wait()
        size = min(self.max_batch_size, self.max_in_flight - len(self._active))
        taken = [await self.queue.get()]
        self._active.add(taken[0])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(taken) < size:
            if self.queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            else:
                job = self.queue.get_nowait()
            taken.append(job)
            self._active.add(job)
        # A job whose client went away was cancelled: do not spend compute on it.
        dropped = [job for job in taken if job.future.done()]
        self.abandoned += sum(job.future.cancelled() for job in dropped)
        self._release(dropped)
        return [job for job in taken if not job.future.done()]

    def _release(self, jobs: Sequence[_Job]) -> None:
        self._active.difference_update(jobs)
        if self._room is not None and len(self._active) < self.max_in_flight:
            self._room.set()

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            started = time.perf_counter()
            for job in batch:
                job.started, job.batch_size = started, len(batch)
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                prepared = await loop.run_in_executor(self._executor, self.run_batch, batch)
            except Exception:  # a bug or a model failure: every waiting client gets a 500, the server lives
                logger.exception("batched generate failed")
                self.health.record(False)
                for job in batch:
                    _settle(job.future, error=_model_failed())
                self._release(batch)
            else:
                self.health.record(True)
                if self.complete is None:
                    self.abandoned += sum(job.future.cancelled() for job in batch)  # stopped mid-generate
                    for job, result in zip(batch, prepared):
                        _settle(job.future, result=result)
                    self._release(batch)
                else:
                    for job, item in zip(batch, prepared):
                        self._start_completion(job, item)
            seconds = time.perf_counter() - started
            self._batch_seconds = seconds if self.batches == 0 else 0.8 * self._batch_seconds + 0.2 * seconds
            self.batches += 1
            self.requests += len(batch)

    def _start_completion(self, job: _Job, prepared: Any) -> None:
        task = asyncio.create_task(self._complete(job, prepared))
        self._completions.add(task)
        task.add_done_callback(self._completions.discard)
        # The client left, or shutdown answered it: stop computing (vLLM aborts the request).
        job.future.add_done_callback(lambda _: task.cancel())

    async def _complete(self, job: _Job, prepared: Any) -> None:
        assert self.complete is not None
        try:
            result = await self.complete(job.request, prepared)
        except asyncio.CancelledError:
            self.abandoned += job.future.cancelled()
        except Exception:
            logger.exception("generate failed")
            self.health.record(False)
            _settle(job.future, error=_model_failed())
        else:
            self.health.record(True)
            _settle(job.future, result=result)
        finally:
            self._release([job])


def _settle(future: asyncio.Future, *, result: Any = None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _model_failed() -> ApiError:
    return ApiError(500, "internal_error", "the model failed on this request; see the server log")


def _shutting_down() -> ApiError:
    return ApiError(503, "shutting_down", "the server is shutting down; retry (another replica, or after restart)",
                    {"Retry-After": "1"})


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(
        {"error": {"type": error.type, "message": error.message}}, status_code=error.status, headers=error.headers
    )


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        types = {404: "not_found", 405: "method_not_allowed"}
        return _error_response(ApiError(exc.status_code, types.get(exc.status_code, "http_error"), str(exc.detail),
                                        dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        # The exception's text may name files, settings or data: it goes to the log, never to the client.
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        return _error_response(ApiError(500, "internal_error", "internal error; see the server log"))


class _CloseWhileDraining:
    """ASGI middleware: while the server drains for shutdown, every response says ``Connection: close``."""

    def __init__(self, app, *, draining: Callable[[], bool]):
        self.app, self.draining = app, draining

    async def __call__(self, scope, receive, send) -> None:
        async def send_closing(message):
            if message["type"] == "http.response.start" and self.draining():
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_closing if scope["type"] == "http" else send)


async def _read_body(request: Request, max_body_bytes: int) -> bytes:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != FRAME_MEDIA_TYPE:
        raise ApiError(415, "unsupported_media_type",
                       f"send the frame as {FRAME_MEDIA_TYPE}, got Content-Type {media_type or '(none)'!r}", CLOSE)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(415, "unsupported_media_type", f"Content-Encoding {encoding!r} is not supported", CLOSE)
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise ApiError(400, "bad_request", f"invalid Content-Length {declared!r}", CLOSE) from None
        if declared_bytes > max_body_bytes:
            raise ApiError(413, "payload_too_large",
                           f"body of {declared_bytes} bytes exceeds the limit of {max_body_bytes} bytes", CLOSE)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:  # chunked uploads have no Content-Length to check up front
                raise ApiError(413, "payload_too_large", f"body exceeds the limit of {max_body_bytes} bytes", CLOSE)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "client_disconnected", "the client disconnected while sending the body") from None
    body = b"".join(chunks)
    if not body:
        raise ApiError(400, "empty_body", "the body is empty; send one AlignedVQ frame")
    return body


def _cancel_when_client_leaves(request: Request, future: asyncio.Future) -> asyncio.Task:
    """A task that cancels ``future`` the moment the client disconnects (the body must have been read, so
    the next message is the disconnect); cancel the task once it is no longer needed."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        future.cancel()

    return asyncio.ensure_future(watch())


async def _unless_client_leaves(request: Request, future: asyncio.Future):
    """The future's result; if the client disconnects first, the future is cancelled at once (the batcher then
    drops the job unless its batch already runs)."""
    watcher = _cancel_when_client_leaves(request, future)
    try:
        return await future
    except asyncio.CancelledError:
        if not (watcher.done() and future.cancelled()):
            raise  # this handler itself was cancelled
        raise ApiError(400, "client_disconnected", "the client disconnected before the answer was ready") from None
    finally:
        watcher.cancel()


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _delta(sent: str, text: str) -> str:
    """What to send after ``sent`` now that the answer reads ``text``: its new end, without a trailing
    half-decoded character; nothing while ``text`` does not continue ``sent``."""
    if not text.startswith(sent):
        return ""
    return text[len(sent):].rstrip("\ufffd")


async def _stream_events(request: Request, job: _Job, engine, updates: asyncio.Queue,
                         body_of: Callable[[GenerationResult], dict]):
    """Server-sent events of one streamed answer: ``token`` deltas, then ``done`` (or ``error``)."""
    job.future.add_done_callback(lambda _: updates.put_nowait(None))
    watcher = _cancel_when_client_leaves(request, job.future)
    options, sent = job.request.options, ""
    try:
        while (tokens := await updates.get()) is not None:
            delta = _delta(sent, engine.answer_text(tokens, options))
            if delta:
                sent += delta
                yield _sse("token", {"delta": delta})
        if job.future.cancelled():
            return
        error = job.future.exception()
        if error is not None:
            if not isinstance(error, ApiError):
                error = _model_failed()
            yield _sse("error", {"error": {"type": error.type, "message": error.message}})
            return
        result: GenerationResult = job.future.result()
        rest = _delta(sent, result.text)
        if rest:
            yield _sse("token", {"delta": rest})
        yield _sse("done", body_of(result))
    finally:
        watcher.cancel()
        job.future.cancel()  # a no-op once answered; otherwise the client left mid-stream


def _load(model_dir_or_model, processor, device, dtype):
    from transformers import AutoModel, AutoProcessor, AutoTokenizer

    if isinstance(model_dir_or_model, (str, os.PathLike)):
        source = str(model_dir_or_model)
        if os.path.isdir(source):
            try:  # before from_pretrained allocates what config.json asks for
                check_model_folder(source)
            except CheckpointSizeError as exc:
                raise ServerConfigError(str(exc)) from None
        kwargs = {"dtype": dtype} if dtype is not None else {}
        model = AutoModel.from_pretrained(source, **kwargs)
    else:
        model = model_dir_or_model
        source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if device is not None:
        model = model.to(device)
    if processor is None:
        if not source:
            raise ServerConfigError("pass processor= when serving a model object that was not loaded from a folder")
        try:
            processor = AutoProcessor.from_pretrained(source)
        except (OSError, ValueError, TypeError):
            processor = None
        if processor is None or not hasattr(processor, "tokenizer"):
            try:
                processor = AutoTokenizer.from_pretrained(source)
            except (OSError, ValueError) as exc:
                raise ServerConfigError(f"no processor or tokenizer found in {source}: {exc}") from exc
    tokenizer = getattr(processor, "tokenizer", processor)
    return model, (processor if processor is not tokenizer else None), tokenizer


def _build_engine(kind: str, model_dir_or_model, *, processor, device, dtype, max_new_tokens: int,
                  vllm_checkpoint, vllm_args: dict | None, max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
                  max_batch_size: int = 8) -> AnswerEngine:
    if kind == "transformers":
        model, processor, tokenizer = _load(model_dir_or_model, processor, device, dtype)
        return AnswerEngine(model, tokenizer, processor=processor, max_new_tokens=max_new_tokens)
    if kind != "vllm":
        raise ServerConfigError(f"engine={kind!r} must be one of {', '.join(ENGINES)}")
    from .vllm_engine import VllmAnswerEngine

    # Loaded on the CPU: the language model is handed to vLLM and dropped here before the rest moves.
    model, processor, tokenizer = _load(model_dir_or_model, processor, None, dtype)
    return VllmAnswerEngine(model, tokenizer, processor=processor, max_new_tokens=max_new_tokens, device=device,
                            checkpoint=vllm_checkpoint, engine_args=vllm_args, max_prompt_bytes=max_prompt_bytes,
                            max_batch_size=max_batch_size)


def _warm_up(engine: AnswerEngine, health: EngineHealth) -> None:
    summary = engine.summary
    zeros = torch.zeros(summary["num_tokens"], summary["codes_per_token"], dtype=torch.long)
    try:
        engine.generate([engine.request(zeros, "warm up")])
    except Exception as exc:
        raise ServerConfigError(f"the warm-up generate failed, so the model cannot answer: "
                                f"{type(exc).__name__}: {exc}") from exc
    health.record(True)


def _sampling_from(request: Request, max_new_tokens: int) -> tuple[SamplingOptions, bool]:
    query = {name: request.query_params.getlist(name) for name in request.query_params.keys()}
    try:
        return parse_query(query, max_new_tokens=max_new_tokens)
    except SamplingError as exc:
        raise ApiError(422, "invalid_parameter", str(exc), CLOSE) from None


def create_app(
    model_dir_or_model,
    *,
    processor=None,
    engine: str = "transformers",
    max_batch_size: int = 8,
    max_wait_ms: float = 5.0,
    max_queue: int = 64,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    max_prompt_bytes: int = DEFAULT_MAX_PROMPT_BYTES,
    max_body_bytes: int | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    entropy_model: wire.EntropyModel | None = None,
    warmup: bool = True,
    api_keys: Sequence[str] | None = None,
    docs: bool = False,
    metrics: bool = True,
    public_metrics: bool = False,
    served_model_name: str | None = None,
    max_image_bytes: int = 8 * 2**20,
    max_image_pixels: int = 4096 * 4096,
    allow_remote_images: bool = False,
    image_cache_entries: int = 4096,
    image_cache_bytes: int = 64 * 2**20,
    vllm_checkpoint: str | os.PathLike | None = None,
    vllm_args: dict | None = None,
) -> FastAPI:
    """The cloud app for a saved model folder (or Hub id), or a loaded model plus its ``processor``.

    ``engine`` is ``"transformers"`` (default) or ``"vllm"`` (see `transformers_alignedvq.vllm_engine`:
    ``vllm_checkpoint`` is the folder of the exported language model, written there if empty, a temporary
    one if None; ``vllm_args`` are further ``vllm.AsyncEngineArgs`` fields, e.g. ``tensor_parallel_size``).
    The vLLM engine runs until ``app.state.engine.close()`` (`serve` calls it on exit).
    ``max_body_bytes`` defaults to the largest valid frame: the index frame plus a prompt of
    ``max_prompt_bytes`` (or the largest coded one, when an ``entropy_model`` is given). ``warmup`` runs one
    tiny generate before serving, which also proves the processor and the model fit together (a failure is a
    `ServerConfigError`). ``api_keys`` (see `transformers_alignedvq.auth.load_api_keys`) turns bearer-token
    authentication on. ``docs`` serves ``/docs`` and ``/openapi.json``. ``image_cache_entries`` and
    ``image_cache_bytes`` bound the images kept for follow-up questions (`transformers_alignedvq.image_cache`;
    0 entries: none kept). ``metrics`` serves Prometheus metrics at
    ``/metrics`` (`transformers_alignedvq.server_metrics`), behind the API keys unless ``public_metrics``.
    """
    if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0 or max_prompt_bytes < 1:
        raise ServerConfigError(
            f"need max_batch_size >= 1, max_queue >= 1, max_wait_ms >= 0, max_prompt_bytes >= 1; got "
            f"{max_batch_size}, {max_queue}, {max_wait_ms}, {max_prompt_bytes}"
        )
    if entropy_model is None and isinstance(model_dir_or_model, (str, os.PathLike)) and os.path.isdir(model_dir_or_model):
        from .entropy import load_entropy_model

        entropy_model = load_entropy_model(model_dir_or_model)
    answer_engine = _build_engine(engine, model_dir_or_model, processor=processor, device=device, dtype=dtype,
                                  max_new_tokens=max_new_tokens, vllm_checkpoint=vllm_checkpoint,
                                  vllm_args=vllm_args, max_prompt_bytes=max_prompt_bytes,
                                  max_batch_size=max_batch_size)
    try:
        return _make_app(answer_engine, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
                         max_queue=max_queue, max_prompt_bytes=max_prompt_bytes, max_body_bytes=max_body_bytes,
                         entropy_model=entropy_model, warmup=warmup, api_keys=api_keys, docs=docs,
                         metrics=metrics, public_metrics=public_metrics,
                         image_cache=ImageCache(max_entries=image_cache_entries, max_bytes=image_cache_bytes)
                         if image_cache_entries > 0 else None,
                         chat={"model_id": served_model_name or _model_id(model_dir_or_model),
                               "max_image_bytes": max_image_bytes, "max_image_pixels": max_image_pixels,
                               "allow_remote_images": allow_remote_images})
    except BaseException:
        answer_engine.close()
        raise


def _make_app(engine: AnswerEngine, *, max_batch_size: int, max_wait_ms: float, max_queue: int,
              max_prompt_bytes: int, max_body_bytes: int | None, entropy_model: wire.EntropyModel | None,
              warmup: bool, api_keys: Sequence[str] | None, docs: bool, metrics: bool = True,
              public_metrics: bool = False, chat: dict | None = None,
              image_cache: ImageCache | None = None) -> FastAPI:
    summary = engine.summary
    if max_body_bytes is None:
        max_body_bytes = wire.max_frame_bytes(
            codebook_size=summary["codebook_size"], num_tokens=summary["num_tokens"],
            codes_per_token=summary["codes_per_token"], grid=tuple(summary["grid"]), prompt_bytes=max_prompt_bytes,
            entropy_coded=entropy_model is not None)
    _check_entropy_model(entropy_model, summary)
    health = EngineHealth()
    if warmup:
        _warm_up(engine, health)
    batcher = DynamicBatcher(lambda jobs: engine.run_batch([job.request for job in jobs]),
                             max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
                             health=health, complete=engine.complete, max_in_flight=engine.max_in_flight)
    app = _new_app(batcher, api_keys=api_keys, docs=docs,
                   open_paths=("/healthz", "/metrics") if public_metrics else ("/healthz",))
    app.state.engine, app.state.batcher = engine, batcher
    app.state.max_body_bytes, app.state.max_prompt_bytes = max_body_bytes, max_prompt_bytes
    _add_health_route(app, batcher, health)
    info = {
        "model_type": engine.config.model_type,
        "engine": engine.name,
        **summary,
        "lm_image_tokens": engine.lm_image_tokens,
        "vision_feature_select_strategy": engine.config.vision_feature_select_strategy,
        "entropy_model_id": entropy_model.model_id.hex() if entropy_model is not None else None,
        "max_new_tokens": engine.max_new_tokens,
        "max_batch_size": max_batch_size,
        "max_wait_ms": max_wait_ms,
        "max_queue": max_queue,
        "max_body_bytes": max_body_bytes,
        "max_prompt_bytes": max_prompt_bytes,
        "frame_media_type": FRAME_MEDIA_TYPE,
        "image_cache_entries": image_cache.max_entries if image_cache is not None else 0,
    }

    @app.get("/v1/model", responses={200: {"model": ModelInfo}, **error_responses({})},
             summary="The edge/cloud contract and the serving limits")
    async def model_info():
        return info

    app.state.image_cache = image_cache
    _add_answer_route(app, engine, batcher, _request_decoder(engine, entropy_model, max_prompt_bytes, image_cache))
    if chat is not None:
        _add_openai_routes(app, engine, batcher, entropy_model=entropy_model, max_prompt_bytes=max_prompt_bytes,
                           max_body_bytes=max_body_bytes, **chat)
    if metrics:
        install_metrics(app, batcher, health)
    return app


def _model_id(model_dir_or_model) -> str:
    """The id ``/v1/models`` lists: the model folder's name (or the loaded model's), else ``alignedvq``."""
    if not isinstance(model_dir_or_model, (str, os.PathLike)):
        model_dir_or_model = getattr(model_dir_or_model, "name_or_path", "") or ""
    return os.path.basename(os.path.normpath(str(model_dir_or_model))) if str(model_dir_or_model) else "alignedvq"


def _add_openai_routes(app: FastAPI, engine: AnswerEngine, batcher: DynamicBatcher, *, model_id: str,
                       entropy_model, max_prompt_bytes: int, max_body_bytes: int, max_image_bytes: int,
                       max_image_pixels: int, allow_remote_images: bool) -> None:
    from .openai_api import ChatDecoder, ChatLimits, install_openai_routes

    if max_image_bytes < 1 or max_image_pixels < 1:
        raise ServerConfigError(f"need max_image_bytes >= 1 and max_image_pixels >= 1; got {max_image_bytes}, "
                                f"{max_image_pixels}")
    # The largest valid JSON: both base64 payloads, the text escaped (\uXXXX: 6 characters a byte), and room for
    # the rest of the request.
    request_bytes = 4 * (max_image_bytes // 3 + 1) + 4 * (max_body_bytes // 3 + 1) + 6 * max_prompt_bytes + 2**16
    limits = ChatLimits(max_request_bytes=request_bytes, max_image_bytes=max_image_bytes,
                        max_image_pixels=max_image_pixels, allow_remote_images=allow_remote_images)
    decoder = ChatDecoder(engine, entropy_model=entropy_model, max_prompt_bytes=max_prompt_bytes,
                          max_body_bytes=max_body_bytes, limits=limits)
    install_openai_routes(app, engine=engine, batcher=batcher, decoder=decoder, model_id=model_id)


def _check_entropy_model(entropy_model: wire.EntropyModel | None, summary: dict) -> None:
    num_tokens, codes = summary["num_tokens"], summary["codes_per_token"]
    if entropy_model is not None and (entropy_model.codebook_size, entropy_model.num_tokens, codes) != (
            summary["codebook_size"], num_tokens, 1):
        raise ServerConfigError(f"the entropy model ({entropy_model!r}) does not fit this model's frames "
                                f"(K={summary['codebook_size']}, {num_tokens} tokens x {codes} codes)")


def _new_app(batcher: DynamicBatcher, *, api_keys: Sequence[str] | None, docs: bool,
             open_paths: Sequence[str] = ("/healthz",)) -> FastAPI:
    """The FastAPI app whose lifespan runs ``batcher``, with the drain hook, auth and the JSON error handlers."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="AlignedVQ cloud", lifespan=lifespan, docs_url="/docs" if docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if docs else None)
    app.state.drain = batcher.drain  # called by `http_guard.GuardedServer` on SIGTERM
    app.add_middleware(_CloseWhileDraining, draining=lambda: batcher.stopping)
    if api_keys:
        app.add_middleware(BearerAuth, keys=api_keys, open_paths=open_paths)
    _add_error_handlers(app)
    return app


def _add_health_route(app: FastAPI, batcher: DynamicBatcher, health: EngineHealth) -> None:
    @app.get("/healthz", responses={200: {"model": HealthResponse}, 503: {"model": HealthResponse,
             "description": "unhealthy (the last generate failed) or shutting_down"}},
             summary="Health: 200 only while the model answers and the server is not stopping")
    async def healthz():
        status = "shutting_down" if batcher.stopping else "ok" if health.ok else "unhealthy"
        return JSONResponse({
            "status": status,
            **health.snapshot(),
            "queue_depth": batcher.queue_depth(),
            "max_queue": batcher.max_queue,
            "in_flight": batcher.in_flight,
            "batches": batcher.batches,
            "requests": batcher.requests,
            "abandoned": batcher.abandoned,
        }, status_code=200 if status == "ok" else 503)


def _request_decoder(engine: AnswerEngine, entropy_model: wire.EntropyModel | None, max_prompt_bytes: int,
                     cache: ImageCache | None = None):
    """``(body, options, scope) -> GenerationRequest``: the frame checked against the served model (and its
    indices kept in ``cache`` under ``scope``), or a follow-up about a cached image; or an `ApiError`."""
    summary = engine.summary

    def request_of(body: bytes, options: SamplingOptions, scope: bytes = b"") -> GenerationRequest:
        if cache is not None and is_followup(body):
            return _followup_request(body, options, scope)
        try:
            frame = wire.decode_frame(
                body, codebook_size=summary["codebook_size"], codebook_fingerprint=engine.fingerprint,
                num_tokens=summary["num_tokens"], codes_per_token=summary["codes_per_token"],
                entropy_model=entropy_model, max_prompt_bytes=max_prompt_bytes,
            )
        except wire.WireFormatError as exc:
            raise classify_wire_error(exc) from None
        question = frame.prompt
        if question is None or not question.strip():
            raise ApiError(422, "invalid_question", "the frame carries no question; put it in the frame's prompt")
        if len(question.encode("utf-8")) > max_prompt_bytes:
            raise ApiError(413, "payload_too_large", f"the question exceeds {max_prompt_bytes} bytes")
        generation = GenerationRequest(torch.from_numpy(frame.indices.copy()), engine.input_ids(question), options)
        if cache is not None:
            generation.image_digest = image_digest(frame.indices, engine.fingerprint)
            cache.put(scope, generation.image_digest, frame.indices, summary["codebook_size"])
        return generation

    def _followup_request(body: bytes, options: SamplingOptions, scope: bytes) -> GenerationRequest:
        try:
            followup = decode_followup(body, entropy_model=entropy_model, max_prompt_bytes=max_prompt_bytes)
        except wire.WireFormatError as exc:
            raise classify_wire_error(exc) from None
        if not followup.question.strip():
            raise ApiError(422, "invalid_question", "the follow-up carries a blank question")
        indices = cache.get(scope, followup.digest)
        if indices is None:
            raise ApiError(409, "image_not_cached", f"image {followup.digest.hex()} is not (or no longer) held here; "
                           "send its frame again")
        generation = GenerationRequest(torch.from_numpy(indices.astype(np.int64)), engine.input_ids(followup.question),
                                       options)
        generation.image_digest = followup.digest
        return generation

    return request_of


def _add_answer_route(app: FastAPI, engine: AnswerEngine, batcher: DynamicBatcher, request_of) -> None:
    @app.post("/v1/answer", openapi_extra=answer_route_openapi(), responses=answer_responses(),
              summary="Answer the question carried by an AlignedVQ frame")
    async def answer(request: Request):
        t_start = time.perf_counter()
        options, stream = _sampling_from(request, engine.max_new_tokens)
        body = await _read_body(request, app.state.max_body_bytes)
        t_body = time.perf_counter()
        metrics = getattr(app.state, "metrics", None)
        if metrics is not None:
            metrics.frame_bytes.observe(len(body))
        generation = await batcher.off_loop(request_of, body, options, scope_of(request.headers.get("authorization")))
        t_decoded = time.perf_counter()

        loop = asyncio.get_running_loop()
        if stream:
            updates: asyncio.Queue = asyncio.Queue()
            generation.on_tokens = lambda tokens: loop.call_soon_threadsafe(updates.put_nowait, tokens)
        job = _Job(request=generation, future=loop.create_future(), enqueued=t_decoded)
        # Settled early (the client left, or shutdown answered it): a running generate stops this row.
        job.future.add_done_callback(lambda _: generation.cancelled.set())
        try:
            batcher.submit(job)
        except QueueFull:
            retry = batcher.retry_after_seconds()
            raise ApiError(503, "overloaded", f"the request queue is full ({batcher.max_queue}); retry in {retry} s",
                           {"Retry-After": str(retry)}) from None

        def body_of(result: GenerationResult) -> dict:
            if metrics is not None:
                metrics.generated_tokens.inc(result.generated_tokens)
            return {
                "answer": result.text,
                "bytes_received": len(body),
                "batch_size": job.batch_size,
                "generated_tokens": result.generated_tokens,
                "image_digest": generation.image_digest.hex() if generation.image_digest else None,
                "timing_ms": {
                    "receive_body": 1000 * (t_body - t_start),
                    "decode_frame": 1000 * (t_decoded - t_body),
                    "queue": 1000 * (job.started - job.enqueued),
                    "generate": 1000 * result.generate_s,
                    "total": 1000 * (time.perf_counter() - t_body),
                },
            }

        if stream:
            events = _stream_events(request, job, engine, updates, body_of)
            if metrics is not None:
                events = metrics.stream_timer("/v1/answer", t_start)(events)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return body_of(await _unless_client_leaves(request, job.future))


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


__all__ = [
    "ENGINES",
    "FRAME_MEDIA_TYPE",
    "AnswerEngine",
    "ApiError",
    "BackgroundServer",
    "DynamicBatcher",
    "EngineHealth",
    "GenerationRequest",
    "GenerationResult",
    "ServerConfigError",
    "classify_wire_error",
    "create_app",
    "serve",
]
