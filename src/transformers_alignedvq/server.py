"""Moved to the package `transformers_alignedvq.serving`, split by concern (this path works until the next
release). ``AnswerEngine`` here is the Transformers engine, as it was: now
`serving.engines.transformers.TransformersAnswerEngine`; `serving.engines.base.AnswerEngine` is the base class."""

from ._moved import forward_names

__getattr__ = forward_names(__name__, "transformers_alignedvq.serving", {
    "AnswerEngine": "engines.transformers:TransformersAnswerEngine",
    "ENGINES": "engines:ENGINES",
    "DEFAULT_MAX_NEW_TOKENS": "engines.base:DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_MAX_PROMPT_BYTES": "engines.base:DEFAULT_MAX_PROMPT_BYTES",
    "FALLBACK_PROMPT": "engines.base:FALLBACK_PROMPT",
    "GenerationRequest": "engines.base:GenerationRequest",
    "GenerationResult": "engines.base:GenerationResult",
    "FRAME_MEDIA_TYPE": "protocol:FRAME_MEDIA_TYPE",
    "ApiError": "errors:ApiError",
    "ServerConfigError": "errors:ServerConfigError",
    "classify_wire_error": "errors:classify_wire_error",
    "DECODE_THREADS": "batcher:DECODE_THREADS",
    "DynamicBatcher": "batcher:DynamicBatcher",
    "EngineHealth": "batcher:EngineHealth",
    "QueueFull": "batcher:QueueFull",
    "_Job": "batcher:Job",
    "create_app": "app:create_app",
    "BackgroundServer": "runner:BackgroundServer",
    "serve": "runner:serve",
})
