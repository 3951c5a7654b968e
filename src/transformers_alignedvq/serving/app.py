"""The cloud app: `create_app` builds the engine, the batcher and the FastAPI app with every route.

Routes: ``POST /v1/answer`` (`serving.answer`), ``POST /v1/chat/completions`` and ``GET /v1/models``
(`serving.openai`), ``GET /metrics`` (`serving.metrics`), and here ``GET /healthz`` and ``GET /v1/model``.
Every request error is answered as ``{"error": {"type", "message"}}`` (`serving.errors`); anything else is a
500 whose text stays in the log.
"""

from __future__ import annotations

import logging
import os
from contextlib import asynccontextmanager
from typing import Callable, Sequence

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import wire
from ..errors import ServerConfigError
from ..wire_geometry import KIND_PATCHES
from .answer import add_answer_route, request_decoder
from .auth import BearerAuth
from .batcher import DynamicBatcher, EngineHealth
from .engines import get_engine
from .engines.base import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MAX_PROMPT_BYTES, AnswerEngine
from .errors import ApiError, RequestError, as_api_error
from .image_cache import ImageCache
from .metrics import install_metrics
from .protocol import FRAME_MEDIA_TYPE, HealthResponse, ModelInfo, error_responses

logger = logging.getLogger(__name__)


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

    ``engine`` names the backend (`serving.engines.get_engine`): ``"transformers"`` (default) or ``"vllm"``
    (`serving.engines.vllm`: ``vllm_checkpoint`` is the folder of the exported language model, written there if
    empty, a temporary one if None; ``vllm_args`` are further ``vllm.AsyncEngineArgs`` fields, e.g.
    ``tensor_parallel_size``). The vLLM engine runs until ``app.state.engine.close()`` (`serve` calls it on exit).
    ``max_body_bytes`` defaults to the largest valid frame: the index frame plus a prompt of
    ``max_prompt_bytes`` (or the largest coded one, when an ``entropy_model`` is given). ``warmup`` runs one
    tiny generate before serving, which also proves the processor and the model fit together (a failure is a
    `ServerConfigError`). ``api_keys`` (see `serving.auth.load_api_keys`) turns bearer-token authentication on.
    ``docs`` serves ``/docs`` and ``/openapi.json``. ``image_cache_entries`` and ``image_cache_bytes`` bound the
    images kept for follow-up questions (`serving.image_cache`; 0 entries: none kept). ``metrics`` serves
    Prometheus metrics at ``/metrics`` (`serving.metrics`), behind the API keys unless ``public_metrics``.
    """
    if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0 or max_prompt_bytes < 1:
        raise ServerConfigError(
            f"need max_batch_size >= 1, max_queue >= 1, max_wait_ms >= 0, max_prompt_bytes >= 1; got "
            f"{max_batch_size}, {max_queue}, {max_wait_ms}, {max_prompt_bytes}"
        )
    if entropy_model is None and isinstance(model_dir_or_model, (str, os.PathLike)) and os.path.isdir(model_dir_or_model):
        from ..entropy import load_entropy_model

        entropy_model = load_entropy_model(model_dir_or_model)
    backend = get_engine(engine)
    # Only the vLLM engine takes these; with another engine they are ignored, as `alignedvq serve` refuses them.
    options = {"checkpoint": vllm_checkpoint, "engine_args": vllm_args} if engine == "vllm" else {}
    answer_engine = backend.from_pretrained(model_dir_or_model, processor=processor, device=device, dtype=dtype,
                                            max_new_tokens=max_new_tokens, max_prompt_bytes=max_prompt_bytes,
                                            max_batch_size=max_batch_size, **options)
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
    if max_body_bytes is None and engine.tiles is not None:
        max_body_bytes = engine.tiles.max_frame_bytes(prompt_bytes=max_prompt_bytes,
                                                      entropy_coded=entropy_model is not None)
    elif max_body_bytes is None:
        max_body_bytes = wire.max_frame_bytes(
            codebook_size=summary["codebook_size"], num_tokens=summary["num_tokens"],
            codes_per_token=summary["codes_per_token"], grid=tuple(summary["grid"]), prompt_bytes=max_prompt_bytes,
            entropy_coded=entropy_model is not None)
    _check_entropy_model(entropy_model, engine)
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
        "vision_feature_select_strategy": getattr(engine.config, "vision_feature_select_strategy", None),
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
    add_answer_route(app, engine, batcher, request_decoder(engine, entropy_model, max_prompt_bytes, image_cache))
    if chat is not None:
        _add_openai_routes(app, engine, batcher, entropy_model=entropy_model, max_prompt_bytes=max_prompt_bytes,
                           max_body_bytes=max_body_bytes, **chat)
    if metrics:
        install_metrics(app, batcher, health)
    return app


def _warm_up(engine: AnswerEngine, health: EngineHealth) -> None:
    summary = engine.summary
    zeros, size = torch.zeros(summary["num_tokens"], summary["codes_per_token"], dtype=torch.long), None
    if engine.tiles is not None:
        zeros, size = engine.tiles.warmup_image()
    try:
        engine.generate([engine.request(zeros, "warm up", size)])
    except Exception as exc:
        raise ServerConfigError(f"the warm-up generate failed, so the model cannot answer: "
                                f"{type(exc).__name__}: {exc}") from exc
    health.record(True)


def _model_id(model_dir_or_model) -> str:
    """The id ``/v1/models`` lists: the model folder's name (or the loaded model's), else ``alignedvq``."""
    if not isinstance(model_dir_or_model, (str, os.PathLike)):
        model_dir_or_model = getattr(model_dir_or_model, "name_or_path", "") or ""
    return os.path.basename(os.path.normpath(str(model_dir_or_model))) if str(model_dir_or_model) else "alignedvq"


def _add_openai_routes(app: FastAPI, engine: AnswerEngine, batcher: DynamicBatcher, *, model_id: str,
                       entropy_model, max_prompt_bytes: int, max_body_bytes: int, max_image_bytes: int,
                       max_image_pixels: int, allow_remote_images: bool) -> None:
    from .openai import ChatDecoder, ChatLimits, install_openai_routes

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


def _check_entropy_model(entropy_model: wire.EntropyModel | None, engine: AnswerEngine) -> None:
    summary = engine.summary
    num_tokens, codes = summary["num_tokens"], summary["codes_per_token"]
    if entropy_model is not None and getattr(engine.tiles, "kind", None) == KIND_PATCHES:  # grids of any size
        return engine.tiles.check_entropy_model(entropy_model)
    if entropy_model is not None and (entropy_model.codebook_size, entropy_model.num_tokens,
                                      entropy_model.codes_per_token) != (summary["codebook_size"], num_tokens, codes):
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
    app.state.drain = batcher.drain  # called by `serving.guards.GuardedServer` on SIGTERM
    app.add_middleware(_CloseWhileDraining, draining=lambda: batcher.stopping)
    if api_keys:
        app.add_middleware(BearerAuth, keys=api_keys, open_paths=open_paths)
    _add_error_handlers(app)
    return app


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(
        {"error": {"type": error.type, "message": error.message}}, status_code=error.status, headers=error.headers
    )


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: Exception):
        return _error_response(as_api_error(exc))

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


__all__ = ["create_app"]
