"""OpenAI-compatible routes: ``POST /v1/chat/completions`` and ``GET /v1/models``.

A client that cannot run the edge (a browser, a script, an existing OpenAI integration) sends the image as an
``image_url`` part; the cloud then runs the whole model: the edge part on the decoded pixels, then the same
request path as ``POST /v1/answer`` (same batcher, limits and engines). A client that has an edge sends its
frame instead, as the extension part ``{"type": "alignedvq_frame", "alignedvq_frame": {"data": "<base64>"}}``,
so indices, not pixels, cross the network. Each conversation carries exactly one image (LLaVA-1.5's format).

* image URLs: ``data:image/...;base64,...`` data URLs, at most ``max_image_bytes`` decoded and
  ``max_image_pixels`` pixels (PNG, JPEG, WebP, GIF or BMP); ``http(s)://`` URLs only with
  ``allow_remote_images`` (fetched with the same bounds and a timeout), refused otherwise.
* a frame part: base64 of one wire frame, at most the binary route's ``max_body_bytes``, checked the same way;
  the question is the message's text (the frame's own prompt is used when there is none).
* sampling: ``max_tokens`` / ``max_completion_tokens`` (at most the server's), ``temperature`` (omitted: greedy,
  the server's default), ``top_p``, ``seed``; ``n`` must be 1; ``stop``, tools, logprobs and penalties are
  refused with 400 rather than ignored.
* ``stream: true`` answers in the OpenAI chunk format (``data: {chunk}`` lines, ``data: [DONE]`` last);
  ``stream_options.include_usage`` adds the usage chunk. Answers carry ``usage`` (prompt tokens with the image's).
* errors are OpenAI-shaped: ``{"error": {"message", "type", "param", "code"}}``, ``code`` being the binary
  route's error type.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from .. import wire
from .batcher import Job, QueueFull
from .engines.base import GenerationRequest, GenerationResult
from .errors import ApiError, RequestError, as_api_error, classify_wire_error
from .sampling import SamplingError, SamplingOptions
from .streaming import cancel_when_client_leaves, text_delta, unless_client_leaves

FRAME_PART = "alignedvq_frame"
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
DEFAULT_MAX_IMAGE_BYTES = 8 * 2**20
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
REMOTE_TIMEOUT_S = 10.0
# Accepted and ignored when they ask for nothing: the defaults of fields this server does not implement.
_UNSUPPORTED = {"stop": (None, [], ""), "tools": (None, []), "functions": (None, []), "logprobs": (None, False),
                "top_logprobs": (None, 0), "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0),
                "frequency_penalty": (None, 0, 0.0), "response_format": (None, {"type": "text"}),
                "tool_choice": (None, "none", "auto")}


@dataclass
class ChatLimits:
    """Bounds of the chat route: request body, one image's bytes and pixels, and whether remote image URLs
    are fetched."""

    max_request_bytes: int
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    allow_remote_images: bool = False


def _invalid(message: str, param: str | None = None, status: int = 400, code: str = "invalid_request") -> ApiError:
    error = ApiError(status, code, message)
    error.param = param
    return error


def openai_error_response(error: ApiError) -> JSONResponse:
    kinds = {401: "authentication_error", 404: "not_found_error", 503: "service_unavailable", 500: "server_error"}
    body = {"error": {"message": error.message, "type": kinds.get(error.status, "invalid_request_error"),
                      "param": getattr(error, "param", None), "code": error.type}}
    return JSONResponse(body, status_code=error.status, headers=error.headers)


# ------------------------------------------------------------------------------------------------------------
@dataclass
class ChatRequest:
    """A parsed chat request: messages in Transformers' chat format (the image as ``{"type": "image"}``), the
    image part as sent, the decoding options, and how to answer."""

    messages: list[dict]
    image: dict
    options: SamplingOptions
    stream: bool
    include_usage: bool


def _parts(content: Any, index: int) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(part, dict) for part in content):
        raise _invalid(f"messages[{index}].content must be a string or a list of parts", f"messages[{index}].content")
    return content


def _messages(raw: Any) -> tuple[list[dict], dict]:
    if not isinstance(raw, list) or not raw:
        raise _invalid("messages must be a non-empty list", "messages")
    messages, images = [], []
    for index, message in enumerate(raw):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise _invalid(f"messages[{index}] needs a role of system, user or assistant", f"messages[{index}]")
        content = []
        for part in _parts(message.get("content"), index):
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                content.append({"type": "text", "text": part["text"]})
            elif kind in ("image_url", FRAME_PART) and message["role"] == "user":
                images.append(part)
                content.append({"type": "image"})
            else:
                raise _invalid(f"messages[{index}] has an unsupported content part {kind!r} (text, image_url or "
                               f"{FRAME_PART}; images in user messages)", f"messages[{index}].content")
        messages.append({"role": message["role"], "content": content})
    if len(images) != 1:
        raise _invalid(f"send exactly one image (an image_url or {FRAME_PART} part); got {len(images)}", "messages",
                       422, "invalid_question")
    return messages, images[0]


def _options(body: dict, max_new_tokens: int) -> SamplingOptions:
    for name, defaults in _UNSUPPORTED.items():
        if body.get(name) not in defaults:
            raise _invalid(f"{name} is not supported by this server", name)
    if body.get("n") not in (None, 1):
        raise _invalid("n must be 1", "n")
    fields: dict[str, Any] = {}
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    for name, value in (("max_new_tokens", limit), ("temperature", body.get("temperature")),
                        ("top_p", body.get("top_p")), ("seed", body.get("seed"))):
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise _invalid(f"{name} must be a number", name, 422, "invalid_parameter")
            fields[name] = float(value) if name in ("temperature", "top_p") else value
    fields.setdefault("max_new_tokens", max_new_tokens)
    if fields["max_new_tokens"] > max_new_tokens:
        raise _invalid(f"max_tokens={fields['max_new_tokens']} exceeds this server's limit of {max_new_tokens}",
                       "max_tokens", 422, "invalid_parameter")
    try:
        return SamplingOptions(**fields)
    except (SamplingError, TypeError) as exc:
        raise _invalid(str(exc), None, 422, "invalid_parameter") from None


def parse_chat(body: Any, *, model_id: str, max_new_tokens: int) -> ChatRequest:
    """The `ChatRequest` of a decoded JSON body, or an `ApiError` naming the field (``param``)."""
    if not isinstance(body, dict):
        raise _invalid("the body must be a JSON object")
    if body.get("model") != model_id:
        raise _invalid(f"model {body.get('model')!r} is not served here; GET /v1/models lists {model_id!r}", "model",
                       404, "model_not_found")
    messages, image = _messages(body.get("messages"))
    stream = body.get("stream") or False
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(stream_options, dict):
        raise _invalid("stream must be a boolean and stream_options an object", "stream")
    return ChatRequest(messages, image, _options(body, max_new_tokens), stream,
                       bool(stream_options.get("include_usage")))


# ------------------------------------------------------------------------------------------------------------
def _base64(data: Any, limit: int, what: str, param: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise _invalid(f"{what} must be a base64 string", param)
    if len(data) > 4 * (limit // 3 + 1) + 4:  # checked before decoding: the text is the bigger of the two
        raise _invalid(f"{what} exceeds {limit} bytes", param, 413, "payload_too_large")
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(f"{what} is not valid base64", param) from None
    if len(decoded) > limit:
        raise _invalid(f"{what} exceeds {limit} bytes", param, 413, "payload_too_large")
    return decoded


def _fetch(url: str, limits: ChatLimits) -> bytes:
    import httpx

    chunks, size = [], 0
    try:
        with httpx.stream("GET", url, timeout=REMOTE_TIMEOUT_S, follow_redirects=False) as response:
            if response.status_code != 200:
                raise _invalid(f"fetching the image answered HTTP {response.status_code}", "image_url")
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > limits.max_image_bytes:
                    raise _invalid(f"the image exceeds {limits.max_image_bytes} bytes", "image_url", 413,
                                   "payload_too_large")
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise _invalid(f"the image could not be fetched: {type(exc).__name__}", "image_url") from None
    return b"".join(chunks)


def image_bytes(part: dict, limits: ChatLimits) -> bytes:
    """The encoded image of an ``image_url`` part: a data URL's content, or a fetched remote image."""
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise _invalid("image_url.url must be a string", "image_url")
    if url.startswith("data:"):
        header, comma, data = url.partition(",")
        if not comma or not header.startswith("data:image/") or not header.endswith(";base64"):
            raise _invalid("a data URL must look like data:image/png;base64,...", "image_url")
        return _base64(data, limits.max_image_bytes, "the image", "image_url")
    if url.startswith(("http://", "https://")):
        if not limits.allow_remote_images:
            raise _invalid("remote image URLs are off on this server; send the image as a data URL "
                           "(data:image/png;base64,...) or start it with --allow-remote-images", "image_url")
        return _fetch(url, limits)
    raise _invalid("image_url.url must be a data URL (or an http(s) URL where allowed)", "image_url")


def open_image(data: bytes, limits: ChatLimits):
    """The RGB image of encoded ``data``; its pixel count is checked before the pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise _invalid(f"the image has {width}x{height} pixels, more than {limits.max_image_pixels}", "image_url",
                           413, "payload_too_large")
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, ApiError):
            raise
        raise _invalid(f"the image cannot be read as {', '.join(IMAGE_FORMATS)}: {type(exc).__name__}",
                       "image_url") from None


class ChatDecoder:
    """Turns a `ChatRequest` into a `GenerationRequest` (in the server's decode threads): the image part into
    indices (the edge run here on pixels, or a frame decoded), the conversation into prompt ids."""

    def __init__(self, engine, *, entropy_model, max_prompt_bytes: int, max_body_bytes: int, limits: ChatLimits):
        self.engine, self.entropy_model, self.limits = engine, entropy_model, limits
        self.max_prompt_bytes, self.max_body_bytes = max_prompt_bytes, max_body_bytes

    def __call__(self, chat: ChatRequest) -> tuple[GenerationRequest, int]:
        """``(request, bytes of the image part as received)``."""
        texts = [part["text"] for message in chat.messages for part in message["content"] if part["type"] == "text"]
        if sum(len(text.encode("utf-8")) for text in texts) > self.max_prompt_bytes:
            raise _invalid(f"the messages' text exceeds {self.max_prompt_bytes} bytes", "messages", 413,
                           "payload_too_large")
        if chat.image.get("type") == FRAME_PART:
            (indices, image_size), prompt, size = self._frame(chat.image)
            if not any(text.strip() for text in texts) and prompt:
                _user_turn(chat.messages)["content"].append({"type": "text", "text": prompt})
        else:
            data = image_bytes(chat.image, self.limits)
            (indices, image_size), size = self._edge(open_image(data, self.limits)), len(data)
        if not any(part["type"] == "text" and part["text"].strip() for part in _user_turn(chat.messages)["content"]):
            raise _invalid("the last user message carries no question", "messages", 422, "invalid_question")
        return GenerationRequest(indices, self.engine.chat_input_ids(chat.messages, image_size), chat.options,
                                 image_size=image_size), size

    def _frame(self, part: dict) -> tuple[tuple[torch.Tensor, tuple | None], str | None, int]:
        """``((indices, image size or None), the frame's prompt, its bytes)``: checked as the binary route does."""
        payload = part.get(FRAME_PART)
        data = _base64(payload.get("data") if isinstance(payload, dict) else None, self.max_body_bytes,
                       "the frame", FRAME_PART)
        try:
            frame = wire.decode_frame(data, entropy_model=self.entropy_model, max_prompt_bytes=self.max_prompt_bytes,
                                      **self.engine.frame_checks())
        except wire.WireFormatError as exc:
            raise classify_wire_error(exc) from None
        return self.engine.image_of(frame), frame.prompt, len(data)

    def _edge(self, image) -> tuple[torch.Tensor, tuple | None]:
        """The edge run here: ``(indices (tokens, codes), the image's layout (tiled families: its size; Qwen2.5-VL:
        its patch grid) or None)``."""
        processor = getattr(self.engine.processor, "image_processor", None)
        if processor is None:
            raise _invalid(f"this server has no image processor; send the image as an {FRAME_PART} part",
                           "image_url", 422, "invalid_question")
        inputs = processor(images=image, return_tensors="pt")
        with torch.inference_mode():
            if self.engine.tiles is None:
                pixels, size = inputs["pixel_values"].to(self.engine.device), None
                indices = self.engine.model.encode_edge(pixels)[0].cpu()
            else:  # the family's edge on the processor's output; the layout travels with it as in a frame
                try:
                    indices, size = self.engine.tiles.encode_processed(inputs)
                except wire.WireFormatError as exc:  # an image this model's limits refuse
                    raise classify_wire_error(exc) from None
        return (indices if indices.dim() == 2 else indices[:, None]), size


def _user_turn(messages: list[dict]) -> dict:
    return next(message for message in reversed(messages) if message["role"] == "user")


# ------------------------------------------------------------------------------------------------------------
async def _json_body(request: Request, limit: int) -> Any:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise _invalid(f"send the request as application/json, got {media_type or '(none)'!r}", None, 415,
                       "unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _invalid(f"body of {declared} bytes exceeds the limit of {limit} bytes", None, 413, "payload_too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _invalid(f"body exceeds the limit of {limit} bytes", None, 413, "payload_too_large")
            chunks.append(chunk)
    except ClientDisconnect:
        raise _invalid("the client disconnected while sending the body", None, 400, "client_disconnected") from None
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError):
        raise _invalid("the body is not valid JSON") from None


def _finish_reason(result: GenerationResult, options: SamplingOptions) -> str:
    return "length" if result.generated_tokens >= options.max_new_tokens else "stop"


def _usage(generation: GenerationRequest, result: GenerationResult) -> dict:
    prompt = len(generation.input_ids)
    return {"prompt_tokens": prompt, "completion_tokens": result.generated_tokens,
            "total_tokens": prompt + result.generated_tokens}


class _Completion:
    """One chat completion's identity and its OpenAI-shaped bodies."""

    def __init__(self, model_id: str):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model_id

    def body(self, generation, result, extra: dict) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "logprobs": None, "finish_reason": _finish_reason(result, generation.options)}],
                "usage": _usage(generation, result), "alignedvq": extra}

    def chunk(self, delta: dict | None, finish_reason: str | None = None, **fields) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                             "finish_reason": finish_reason}]
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices, **fields}
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


async def _chunks(request: Request, job: Job, engine, updates: asyncio.Queue, completion: _Completion,
                  include_usage: bool, on_first_token, on_result):
    """The OpenAI chunk stream of one answer: the role, content deltas, the finish reason, [usage], [DONE]."""
    job.future.add_done_callback(lambda _: updates.put_nowait(None))
    watcher = cancel_when_client_leaves(request, job.future)
    generation, sent = job.request, ""
    try:
        yield completion.chunk({"role": "assistant", "content": ""})
        while (tokens := await updates.get()) is not None:
            delta = text_delta(sent, engine.answer_text(tokens, generation.options))
            if delta:
                if not sent:
                    on_first_token()
                sent += delta
                yield completion.chunk({"content": delta})
        if job.future.cancelled():
            return
        error = job.future.exception()
        if error is not None:
            error = error if isinstance(error, ApiError) else ApiError(500, "internal_error", "the model failed")
            yield f"data: {openai_error_response(error).body.decode()}\n\n"
        else:
            result: GenerationResult = job.future.result()
            on_result(result)
            rest = text_delta(sent, result.text)
            if rest:
                yield completion.chunk({"content": rest})
            yield completion.chunk({}, _finish_reason(result, generation.options))
            if include_usage:
                yield completion.chunk(None, usage=_usage(generation, result))
        yield "data: [DONE]\n\n"
    finally:
        watcher.cancel()
        job.future.cancel()


def install_openai_routes(app: FastAPI, *, engine, batcher, decoder: ChatDecoder, model_id: str) -> None:
    """Add ``GET /v1/models`` and ``POST /v1/chat/completions`` to ``app`` (same batcher, auth and limits)."""
    from .protocol import (
        ChatCompletionRequest,
        add_request_schema,
        chat_openapi,
        chat_responses,
        models_responses,
    )

    created = int(time.time())

    @app.get("/v1/models", responses=models_responses(), summary="The served model (OpenAI format)")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "transformers-alignedvq"}]}

    @app.post("/v1/chat/completions", openapi_extra=chat_openapi(), responses=chat_responses(),
              summary="OpenAI-compatible chat completion about one image (image_url or alignedvq_frame)")
    async def chat_completions(request: Request):
        try:
            return await _complete(request)
        except (ApiError, RequestError) as error:
            return openai_error_response(as_api_error(error))

    async def _complete(request: Request):
        start = time.perf_counter()
        body = await _json_body(request, decoder.limits.max_request_bytes)
        chat = parse_chat(body, model_id=model_id, max_new_tokens=engine.max_new_tokens)
        generation, size = await batcher.off_loop(decoder, chat)
        metrics = getattr(app.state, "metrics", None)
        if metrics is not None:
            metrics.frame_bytes.observe(size)
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()
        if chat.stream:
            generation.on_tokens = lambda tokens: loop.call_soon_threadsafe(updates.put_nowait, tokens)
        job = Job(request=generation, future=loop.create_future(), enqueued=time.perf_counter())
        job.future.add_done_callback(lambda _: generation.cancelled.set())
        try:
            batcher.submit(job)
        except QueueFull:
            retry = batcher.retry_after_seconds()
            raise ApiError(503, "overloaded", f"the request queue is full; retry in {retry} s",
                           {"Retry-After": str(retry)}) from None
        completion = _Completion(model_id)

        def first_token():
            if metrics is not None:
                metrics.first_token.labels("/v1/chat/completions").observe(time.perf_counter() - start)

        def count(result: GenerationResult):
            if metrics is not None:
                metrics.generated_tokens.inc(result.generated_tokens)

        if chat.stream:
            return StreamingResponse(_chunks(request, job, engine, updates, completion, chat.include_usage,
                                             first_token, count), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        result = await unless_client_leaves(request, job.future)
        count(result)
        return completion.body(generation, result, {"image_bytes_received": size, "batch_size": job.batch_size})

    add_request_schema(app, ChatCompletionRequest)


__all__ = ["FRAME_PART", "ChatDecoder", "ChatLimits", "ChatRequest", "install_openai_routes", "parse_chat"]
