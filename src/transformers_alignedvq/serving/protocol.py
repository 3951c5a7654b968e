"""The server's protocol: the frame's media type, and the request and response shapes of its OpenAPI document
(``/openapi.json`` with ``docs=True``).

These models document; the routes build their answers as plain dicts, so nothing here filters or reshapes a
response. `answer_route_openapi` describes what FastAPI cannot infer from ``POST /v1/answer``: a raw binary
body, the query parameters the route reads itself, and the server-sent events of ``stream=true``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..wire import FRAME_MEDIA_TYPE


class ErrorDetail(BaseModel):
    type: str = Field(description="machine-readable kind, e.g. malformed_frame, payload_too_large, overloaded")
    message: str = Field(description="what was wrong and what to do; never internals")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Timing(BaseModel):
    receive_body: float = Field(description="ms to receive the body (transfer time)")
    decode_frame: float = Field(description="ms to decode and check the frame and tokenise the question")
    queue: float = Field(description="ms waiting for a batch")
    generate: float = Field(description="ms of the batch step: cloud vision part and language model")
    total: float = Field(description="ms from the last body byte to the answer")


class AnswerResponse(BaseModel):
    answer: str
    bytes_received: int = Field(description="size of the frame")
    batch_size: int = Field(description="requests in the batch this one ran in")
    generated_tokens: int = Field(description="tokens generated, eos excluded")
    image_digest: str | None = Field(description="hex digest a follow-up names this image by (None: not kept)")
    timing_ms: Timing


class HealthResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    status: Literal["ok", "unhealthy", "shutting_down"]
    last_generate: Literal["not_run", "ok", "failed"]
    seconds_since_last_generate: float | None
    consecutive_failures: int
    queue_depth: int
    max_queue: int
    in_flight: int
    batches: int
    requests: int
    abandoned: int = Field(description="jobs dropped or stopped because their client left")


class ModelInfo(BaseModel):
    """The edge/cloud contract and the serving limits (more fields may follow)."""

    model_config = ConfigDict(extra="allow")
    model_type: str
    engine: Literal["transformers", "vllm"]
    codebook_size: int
    codebook_fingerprint: str = Field(description="hex; frames carry its first 8 bytes")
    num_tokens: int
    codes_per_token: int
    bits_per_index: int
    entropy_model_id: str | None
    max_new_tokens: int
    max_batch_size: int
    max_queue: int
    max_body_bytes: int
    max_prompt_bytes: int
    frame_media_type: str


# Errors every route may answer (auth, overload, shutdown, bugs), and those of the frame route.
COMMON_ERRORS = {401: "missing or unknown API key", 500: "internal_error: a bug or a failing model",
                 503: "overloaded (with Retry-After) or shutting_down"}
FRAME_ERRORS = {
    400: "empty_body, malformed_frame, bad_request, client_disconnected",
    409: "codebook_mismatch, entropy_model_mismatch, or image_not_cached (a follow-up: send the frame again)",
    413: "payload_too_large: body above max_body_bytes, or question above max_prompt_bytes",
    415: "unsupported_media_type: not application/octet-stream, or a Content-Encoding",
    422: "incompatible_frame, invalid_question or invalid_parameter",
}


def error_responses(errors: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": text} for status, text in {**errors, **COMMON_ERRORS}.items()}


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


ANSWER_QUERY = [
    _query("max_new_tokens", {"type": "integer", "minimum": 1}, "answer length at most (default and upper bound: "
           "the server's)"),
    _query("temperature", {"type": "number", "minimum": 0, "maximum": 2, "default": 0}, "0 is greedy"),
    _query("top_p", {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1}, "nucleus sampling mass"),
    _query("seed", {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}, "makes a sampled answer reproducible"),
    _query("stream", {"type": "boolean", "default": False}, "answer with server-sent events"),
]

STREAM_DESCRIPTION = (
    "With stream=true: text/event-stream of `token` events `{\"delta\": str}` whose deltas add up to the answer, "
    "then one `done` event carrying the AnswerResponse, or one `error` event carrying an ErrorResponse."
)


def answer_route_openapi() -> dict:
    """``openapi_extra`` of ``POST /v1/answer``."""
    return {
        "parameters": ANSWER_QUERY,
        "requestBody": {"required": True, "description": "one AlignedVQ wire frame (docs/wire-format.md) with the "
                        "question as its prompt (`alignedvq ask --save-frame FILE` writes one), or a follow-up "
                        "naming a kept image by its image_digest (transformers_alignedvq.wire_followup)",
                        "content": {FRAME_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}},
    }


def answer_responses() -> dict:
    return {
        200: {"model": AnswerResponse, "description": "the answer; " + STREAM_DESCRIPTION,
              "content": {"text/event-stream": {"schema": {"type": "string"}}}},
        **error_responses(FRAME_ERRORS),
    }


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, ...")
    param: str | None = Field(description="the request field at fault, where known")
    code: str | None = Field(description="the binary route's error type, e.g. malformed_frame")


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


class ImageUrl(BaseModel):
    url: str = Field(description="data:image/png;base64,... (http(s) URLs only with --allow-remote-images)")


class FrameData(BaseModel):
    data: str = Field(description="base64 of one AlignedVQ wire frame (docs/wire-format.md)")


class ContentPart(BaseModel):
    type: Literal["text", "image_url", "alignedvq_frame"]
    text: str | None = None
    image_url: ImageUrl | None = None
    alignedvq_frame: FrameData | None = Field(None, description="extension: the edge's indices instead of pixels")


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """Exactly one image (an image_url or alignedvq_frame part) in the conversation."""

    model: str = Field(description="the id GET /v1/models lists")
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, description="at most the server's --max-new-tokens (its default)")
    max_completion_tokens: int | None = None
    temperature: float | None = Field(None, description="omitted or 0: greedy; at most 2")
    top_p: float | None = None
    seed: int | None = None
    n: int | None = Field(None, description="1 only")
    stream: bool = False
    stream_options: StreamOptions | None = None


class Usage(BaseModel):
    prompt_tokens: int = Field(description="prompt tokens, the image's included")
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    alignedvq: dict = Field(description="image_bytes_received, batch_size")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


def chat_openapi() -> dict:
    """``openapi_extra`` of ``POST /v1/chat/completions``: the body is read by the route itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}}}


def chat_responses() -> dict:
    errors = {**FRAME_ERRORS, 400: "invalid_request: bad JSON, message, image or unsupported field; "
                                   "malformed_frame", 404: "model_not_found",
              500: COMMON_ERRORS[500], 503: COMMON_ERRORS[503]}
    return {200: {"model": ChatCompletion, "description": "the completion; with stream=true, text/event-stream of "
                  "chat.completion.chunk objects (data: lines), data: [DONE] last",
                  "content": {"text/event-stream": {"schema": {"type": "string"}}}},
            # The API-key check answers before the route, in the server's own error shape.
            401: {"model": ErrorResponse, "description": COMMON_ERRORS[401]},
            **{status: {"model": OpenAIError, "description": text} for status, text in errors.items()}}


def add_request_schema(app, model: type[BaseModel]) -> None:
    """Put ``model`` (a body a route reads itself) into ``app``'s OpenAPI components, where its
    ``openapi_extra`` refers to it."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            document = build()
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components = document.setdefault("components", {}).setdefault("schemas", {})
            components.update(schema.pop("$defs", {}))
            components[model.__name__] = schema
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi


def models_responses() -> dict:
    return {200: {"model": ModelList}, **error_responses({})}


__all__ = ["FRAME_MEDIA_TYPE", "AnswerResponse", "ErrorResponse", "HealthResponse", "ModelInfo", "answer_responses",
           "answer_route_openapi", "add_request_schema", "chat_openapi", "chat_responses", "error_responses", "models_responses"]
