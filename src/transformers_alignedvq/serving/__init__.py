"""The cloud server: answers questions about images it never sees, from AlignedVQ frames.

The edge posts one wire frame per request (`transformers_alignedvq.wire`, Content-Type
``application/octet-stream``, the raw bytes as the body) holding the image's codebook indices and the
question as the frame's prompt. The server decodes and checks the frame, turns the question into the
model's chat prompt, and answers: greedy by default, sampled on request (`serving.sampling`).

Two engines answer behind the same request path, chosen by name (`engines.get_engine`), both derived from
`engines.base.AnswerEngine`: ``"transformers"`` (Transformers' ``generate`` on static batches) and ``"vllm"``
(the image features are computed here in batches, the language model runs in vLLM with continuous batching).

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
* ``GET /metrics`` -> Prometheus metrics (`serving.metrics`).
* ``GET /v1/model`` -> the edge/cloud contract (split, codebook size, bits per index, tokens, codebook
  fingerprint, frame bytes) and the serving limits.

With API keys (`serving.auth`), every route but ``/healthz`` (and ``/metrics`` with
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
409   ``image_not_cached``       a follow-up (`wire_followup`) names an image this
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

Connections are bounded by `serving.guards` (a cap on open connections, deadlines for the
request head and body) when served with `serve` or `BackgroundServer`. On SIGTERM the server stops taking
work: requests already received are answered (or get 503 ``shutting_down`` once ``shutdown_timeout`` is
near), new ones get 503, every response says ``Connection: close``, then the process exits.

The package, by concern (modules import downwards only: no cycles):

=====================  ==================================================================================
module                 what
=====================  ==================================================================================
``errors``             the request-error family and its HTTP mapping (``ApiError``, ``RequestError``)
``protocol``           the frame's media type; request and response schemas (OpenAPI)
``engines``            ``AnswerEngine`` (``engines.base``), the backends by name: ``transformers``, ``vllm``
``sampling``           decoding options, per-row sampling
``batcher``            ``DynamicBatcher``: queue, batches, health
``streaming``          client-disconnect watching, streamed deltas
``answer``             ``POST /v1/answer``
``openai``             ``POST /v1/chat/completions``, ``GET /v1/models``
``metrics``            ``GET /metrics``
``image_cache``        images kept for follow-up questions
``app``                ``create_app``: the engine, the batcher and every route
``auth``, ``guards``,  API keys; connection caps, deadlines and log rate limits on uvicorn
``connection_limits``
``runner``             ``serve`` and ``BackgroundServer``: the process, signals, draining
=====================  ==================================================================================
"""

from __future__ import annotations

import importlib

# Name -> module, imported on first use: `serving.auth` and `serving.connection_limits` stay light (the CLI's
# parser reads their defaults on a device), and importing one module never imports the rest.
_NAMES = {
    "BackgroundServer": "runner",
    "serve": "runner",
    "create_app": "app",
    "ENGINES": "engines",
    "get_engine": "engines",
    "AnswerEngine": "engines.base",
    "GenerationRequest": "engines.base",
    "GenerationResult": "engines.base",
    "DynamicBatcher": "batcher",
    "EngineHealth": "batcher",
    "ApiError": "errors",
    "InvalidQuestionError": "errors",
    "RequestError": "errors",
    "ServerConfigError": "errors",
    "classify_wire_error": "errors",
    "FRAME_MEDIA_TYPE": "protocol",
}

__all__ = sorted(_NAMES)


def __getattr__(name: str):
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_NAMES))
