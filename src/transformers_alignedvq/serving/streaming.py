"""What the answer routes share about a request's lifetime: noticing that its client left, and streaming.

A request's job is cancelled the moment its client disconnects (the batcher then drops it, or the engine stops
its row). A streamed answer is sent as text deltas, each the new end of the answer decoded so far.
"""

from __future__ import annotations

import asyncio
import json
from typing import Callable

from starlette.requests import Request

from .batcher import Job
from .engines.base import GenerationResult
from .errors import ApiError, model_failed


def cancel_when_client_leaves(request: Request, future: asyncio.Future) -> asyncio.Task:
    """A task that cancels ``future`` the moment the client disconnects (the body must have been read, so
    the next message is the disconnect); cancel the task once it is no longer needed."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        future.cancel()

    return asyncio.ensure_future(watch())


async def unless_client_leaves(request: Request, future: asyncio.Future):
    """The future's result; if the client disconnects first, the future is cancelled at once (the batcher then
    drops the job unless its batch already runs)."""
    watcher = cancel_when_client_leaves(request, future)
    try:
        return await future
    except asyncio.CancelledError:
        if not (watcher.done() and future.cancelled()):
            raise  # this handler itself was cancelled
        raise ApiError(400, "client_disconnected", "the client disconnected before the answer was ready") from None
    finally:
        watcher.cancel()


def sse(event: str, data: dict) -> str:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def text_delta(sent: str, text: str) -> str:
    """What to send after ``sent`` now that the answer reads ``text``: its new end, without a trailing
    half-decoded character; nothing while ``text`` does not continue ``sent``."""
    if not text.startswith(sent):
        return ""
    return text[len(sent):].rstrip("\ufffd")


async def answer_events(request: Request, job: Job, engine, updates: asyncio.Queue,
                        body_of: Callable[[GenerationResult], dict]):
    """Server-sent events of one streamed answer: ``token`` deltas, then ``done`` (or ``error``)."""
    job.future.add_done_callback(lambda _: updates.put_nowait(None))
    watcher = cancel_when_client_leaves(request, job.future)
    options, sent = job.request.options, ""
    try:
        while (tokens := await updates.get()) is not None:
            delta = text_delta(sent, engine.answer_text(tokens, options))
            if delta:
                sent += delta
                yield sse("token", {"delta": delta})
        if job.future.cancelled():
            return
        error = job.future.exception()
        if error is not None:
            if not isinstance(error, ApiError):
                error = model_failed()
            yield sse("error", {"error": {"type": error.type, "message": error.message}})
            return
        result: GenerationResult = job.future.result()
        rest = text_delta(sent, result.text)
        if rest:
            yield sse("token", {"delta": rest})
        yield sse("done", body_of(result))
    finally:
        watcher.cancel()
        job.future.cancel()  # a no-op once answered; otherwise the client left mid-stream


__all__ = ["answer_events", "cancel_when_client_leaves", "sse", "text_delta", "unless_client_leaves"]
