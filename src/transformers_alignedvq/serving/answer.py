"""The binary route, ``POST /v1/answer``: one wire frame in, one answer out (JSON, or server-sent events).

The body is read with its media type and size checked first; the frame (or a follow-up naming a cached image)
is decoded and checked against the served model in the batcher's decode threads; the job then waits in the
batcher. Query parameters choose the decoding (`serving.sampling.parse_query`) and ``stream=true``.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.requests import ClientDisconnect

from .. import wire
from ..wire_followup import decode_followup, image_digest, is_followup
from .batcher import DynamicBatcher, Job, QueueFull
from .engines.base import AnswerEngine, GenerationRequest, GenerationResult
from .errors import CLOSE, ApiError, InvalidQuestionError, classify_wire_error, overloaded
from .image_cache import ImageCache, scope_of
from .protocol import FRAME_MEDIA_TYPE, answer_responses, answer_route_openapi
from .sampling import SamplingError, SamplingOptions, parse_query
from .streaming import answer_events, unless_client_leaves


async def read_body(request: Request, max_body_bytes: int) -> bytes:
    """The frame's bytes, once the Content-Type, Content-Encoding and size are checked (413 before reading a
    body whose Content-Length is too big)."""
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


def sampling_from(request: Request, max_new_tokens: int) -> tuple[SamplingOptions, bool]:
    """The decoding options and ``stream`` of the query string; 422 ``invalid_parameter`` otherwise."""
    query = {name: request.query_params.getlist(name) for name in request.query_params.keys()}
    try:
        return parse_query(query, max_new_tokens=max_new_tokens)
    except SamplingError as exc:
        raise ApiError(422, "invalid_parameter", str(exc), CLOSE) from None


def request_decoder(engine: AnswerEngine, entropy_model: wire.EntropyModel | None, max_prompt_bytes: int,
                    cache: ImageCache | None = None):
    """``(body, options, scope) -> GenerationRequest``: the frame checked against the served model (and its
    indices kept in ``cache`` under ``scope``), or a follow-up about a cached image; or an `ApiError`."""
    summary = engine.summary

    def request_of(body: bytes, options: SamplingOptions, scope: bytes = b"") -> GenerationRequest:
        if cache is not None and is_followup(body):
            return _followup_request(body, options, scope)
        try:
            frame = wire.decode_frame(body, entropy_model=entropy_model, max_prompt_bytes=max_prompt_bytes,
                                      **engine.frame_checks())
        except wire.WireFormatError as exc:
            raise classify_wire_error(exc) from None
        question = frame.prompt
        if question is None or not question.strip():
            raise InvalidQuestionError("the frame carries no question; put it in the frame's prompt")
        if len(question.encode("utf-8")) > max_prompt_bytes:
            raise ApiError(413, "payload_too_large", f"the question exceeds {max_prompt_bytes} bytes")
        indices, size = engine.image_of(frame)
        generation = GenerationRequest(indices, engine.input_ids(question, size), options, image_size=size)
        if cache is not None:
            generation.image_digest = image_digest(frame.indices, engine.fingerprint, size)
            cache.put(scope, generation.image_digest, frame.indices, summary["codebook_size"], size)
        return generation

    def _followup_request(body: bytes, options: SamplingOptions, scope: bytes) -> GenerationRequest:
        try:
            followup = decode_followup(body, entropy_model=entropy_model, max_prompt_bytes=max_prompt_bytes)
        except wire.WireFormatError as exc:
            raise classify_wire_error(exc) from None
        if not followup.question.strip():
            raise InvalidQuestionError("the follow-up carries a blank question")
        kept = cache.lookup(scope, followup.digest)
        if kept is None:
            raise ApiError(409, "image_not_cached", f"image {followup.digest.hex()} is not (or no longer) held here; "
                           "send its frame again")
        indices, size = kept
        generation = GenerationRequest(torch.from_numpy(indices.astype(np.int64)),
                                       engine.input_ids(followup.question, size), options, image_size=size)
        generation.image_digest = followup.digest
        return generation

    return request_of


def add_answer_route(app: FastAPI, engine: AnswerEngine, batcher: DynamicBatcher, request_of) -> None:
    """Add ``POST /v1/answer`` to ``app``; ``request_of`` is a `request_decoder`."""

    @app.post("/v1/answer", openapi_extra=answer_route_openapi(), responses=answer_responses(),
              summary="Answer the question carried by an AlignedVQ frame")
    async def answer(request: Request):
        t_start = time.perf_counter()
        options, stream = sampling_from(request, engine.max_new_tokens)
        body = await read_body(request, app.state.max_body_bytes)
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
        job = Job(request=generation, future=loop.create_future(), enqueued=t_decoded)
        # Settled early (the client left, or shutdown answered it): a running generate stops this row.
        job.future.add_done_callback(lambda _: generation.cancelled.set())
        try:
            batcher.submit(job)
        except QueueFull:
            retry = batcher.retry_after_seconds()
            raise overloaded(f"the request queue is full ({batcher.max_queue}); retry in {retry} s", retry) from None

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
            events = answer_events(request, job, engine, updates, body_of)
            if metrics is not None:
                events = metrics.stream_timer("/v1/answer", t_start)(events)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return body_of(await unless_client_leaves(request, job.future))


__all__ = ["add_answer_route", "read_body", "request_decoder", "sampling_from"]
