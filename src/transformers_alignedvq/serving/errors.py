"""The cloud's request errors, defined once: what engines and decoders raise, and the HTTP answer it becomes.

Below the HTTP layer (engines, frame and chat decoding) a request the client got wrong raises a domain error:
`RequestError` and its subclasses, or `wire.WireFormatError` for a frame. The app maps each to an `ApiError`
(`as_api_error`): a status, an error type and a message, answered as ``{"error": {"type", "message"}}``. Start-up
problems are `ServerConfigError` (the package's `errors` module; the CLI prints them), never a request error.
"""

from __future__ import annotations

from ..errors import ServerConfigError, WireFormatError

# Answered on errors sent before the body is read: the rest of the body is not wanted.
CLOSE = {"Connection": "close"}


class ApiError(Exception):
    """An error answered to the client as ``{"error": {"type", "message"}}`` with an HTTP status."""

    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers or {}


class RequestError(ValueError):
    """A request this server cannot answer as sent, raised below the HTTP layer. ``code`` is the error type the
    client sees; `as_api_error` gives its status."""

    code = "bad_request"


class InvalidQuestionError(RequestError):
    """The question cannot go to this model: blank, holding the image placeholder, or a conversation this model
    has no template for."""

    code = "invalid_question"


class PromptTooLongError(RequestError):
    """The prompt (question and image tokens) leaves the model no room to answer within its context."""

    code = "payload_too_large"


_STATUS = {RequestError.code: 400, InvalidQuestionError.code: 422, PromptTooLongError.code: 413}

# Documented prefixes of `wire.decode_frame` messages (docs/wire-format.md, "Errors") -> (status, type).
# Checked in order; anything else the decoder raises is a malformed frame (400).
_WIRE_ERRORS = (
    ("codebook fingerprint mismatch", 409, "codebook_mismatch"),
    ("codebook size mismatch", 422, "incompatible_frame"),
    ("token count mismatch", 422, "incompatible_frame"),
    ("codes per token mismatch", 422, "incompatible_frame"),
    ("geometry mismatch", 422, "incompatible_frame"),
    ("decoded index out of range", 422, "incompatible_frame"),
    ("entropy model mismatch", 409, "entropy_model_mismatch"),
    ("version-1 entropy-coded frames", 422, "incompatible_frame"),
    ("prompt too long", 413, "payload_too_large"),
)


def classify_wire_error(exc: WireFormatError) -> ApiError:
    """The HTTP answer to a frame `wire.decode_frame` refused."""
    message = str(exc)
    for prefix, status, type_ in _WIRE_ERRORS:
        if message.startswith(prefix):
            return ApiError(status, type_, message)
    return ApiError(400, "malformed_frame", message)


def as_api_error(exc: Exception) -> ApiError | None:
    """The HTTP answer to a request error (`ApiError`, `RequestError`, `WireFormatError`); None for anything
    else, which is a bug or a failing model (answered 500 without its text)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestError):
        return ApiError(_STATUS.get(exc.code, 400), exc.code, str(exc))
    if isinstance(exc, WireFormatError):
        return classify_wire_error(exc)
    return None


def model_failed() -> ApiError:
    return ApiError(500, "internal_error", "the model failed on this request; see the server log")


def shutting_down() -> ApiError:
    return ApiError(503, "shutting_down", "the server is shutting down; retry (another replica, or after restart)",
                    {"Retry-After": "1"})


def overloaded(message: str, retry_after: int) -> ApiError:
    return ApiError(503, "overloaded", message, {"Retry-After": str(retry_after)})


__all__ = [
    "CLOSE",
    "ApiError",
    "InvalidQuestionError",
    "PromptTooLongError",
    "RequestError",
    "ServerConfigError",
    "as_api_error",
    "classify_wire_error",
    "model_failed",
    "overloaded",
    "shutting_down",
]
