"""Prometheus metrics of the cloud server (``GET /metrics``, text exposition format, via prometheus-client).

Each app has its own registry (several apps in one process, as in tests, do not mix their counts):

=============================================  =========  =====================================================
metric                                         type       what
=============================================  =========  =====================================================
``alignedvq_requests_total{route,status}``     counter    answered HTTP requests (401s and 404s included;
                                                          unknown paths count under ``route="other"``)
``alignedvq_request_duration_seconds{route}``  histogram  from the request's start to its last byte sent
``alignedvq_time_to_first_token_seconds``      histogram  streamed answers: from the request's start to the
``{route}``                                               first text piece sent
``alignedvq_frame_bytes``                      histogram  size of each frame received (its ``_sum``: bytes in)
``alignedvq_generated_tokens_total``           counter    answer tokens generated (eos excluded)
``alignedvq_batch_size``                       histogram  requests per batch step
``alignedvq_queue_depth``                      gauge      requests waiting for a batch
``alignedvq_in_flight``                        gauge      requests taken from the queue and not answered yet
``alignedvq_abandoned_requests``               gauge      requests dropped or stopped because their client left
``alignedvq_engine_healthy``                   gauge      1 while the last generate succeeded, else 0
``alignedvq_engine_consecutive_failures``      gauge      failed batches in a row
``alignedvq_image_cache_{entries,bytes}``      gauge      images kept for follow-up questions, their memory
``alignedvq_image_cache_{hits,misses}``        gauge      follow-ups that found their image, or did not
=============================================  =========  =====================================================
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FRAME_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 65536, 262144, 1048576, 4194304)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    """The metrics of one app; ``routes`` are the paths counted under their own name."""

    def __init__(self, routes: Iterable[str]):
        self.routes = frozenset(routes)
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("alignedvq_requests", "HTTP requests answered", ["route", "status"],
                                registry=registry)
        self.duration = Histogram("alignedvq_request_duration_seconds", "Request start to last byte sent",
                                  ["route"], buckets=LATENCY_BUCKETS, registry=registry)
        self.first_token = Histogram("alignedvq_time_to_first_token_seconds", "Request start to first text "
                                     "piece sent (streamed answers)", ["route"], buckets=LATENCY_BUCKETS,
                                     registry=registry)
        self.frame_bytes = Histogram("alignedvq_frame_bytes", "Size of each frame received", buckets=FRAME_BUCKETS,
                                     registry=registry)
        self.generated_tokens = Counter("alignedvq_generated_tokens", "Answer tokens generated",
                                        registry=registry)
        self.batch_size = Histogram("alignedvq_batch_size", "Requests per batch step", buckets=BATCH_BUCKETS,
                                    registry=registry)

    def watch(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge read from ``read()`` at each scrape."""
        Gauge(name, documentation, registry=self.registry).set_function(read)

    def route_of(self, path: str) -> str:
        return path if path in self.routes else "other"

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def stream_timer(self, route: str, start: float):
        """Wraps a server-sent event stream: the first ``token`` event observes the time to first token."""

        def wrap(events):
            async def timed():
                first = True
                async for chunk in events:
                    if first and chunk.startswith("event: token"):
                        self.first_token.labels(route).observe(time.perf_counter() - start)
                        first = False
                    yield chunk

            return timed()

        return wrap


class MetricsMiddleware:
    """ASGI middleware: counts every HTTP response by route and status and times it to its last byte."""

    def __init__(self, app, *, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]
        route = self.metrics.route_of(scope["path"])

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.duration.labels(route).observe(time.perf_counter() - start)


def install_metrics(app, batcher, health) -> ServerMetrics:
    """Serve ``GET /metrics`` for ``app`` (call once its routes are added) and count into it from its
    ``batcher`` and engine ``health``; the metrics are also ``app.state.metrics``."""
    from starlette.responses import Response

    from .protocol import error_responses

    metrics = ServerMetrics(())
    metrics.watch("alignedvq_queue_depth", "Requests waiting for a batch", batcher.queue_depth)
    metrics.watch("alignedvq_in_flight", "Requests taken from the queue, not answered yet", lambda: batcher.in_flight)
    metrics.watch("alignedvq_abandoned_requests", "Requests dropped or stopped because their client left",
                  lambda: batcher.abandoned)
    metrics.watch("alignedvq_engine_healthy", "1 while the last generate succeeded", lambda: float(health.ok))
    metrics.watch("alignedvq_engine_consecutive_failures", "Failed batches in a row",
                  lambda: health.consecutive_failures)
    batcher.on_batch = metrics.batch_size.observe
    cache = getattr(app.state, "image_cache", None)
    if cache is not None:
        metrics.watch("alignedvq_image_cache_entries", "Images kept for follow-up questions", lambda: len(cache))
        metrics.watch("alignedvq_image_cache_bytes", "Memory of the images kept", lambda: cache.bytes)
        metrics.watch("alignedvq_image_cache_hits", "Follow-ups that found their image", lambda: cache.hits)
        metrics.watch("alignedvq_image_cache_misses", "Follow-ups that did not (409 image_not_cached)",
                      lambda: cache.misses)

    @app.get("/metrics", response_class=Response, summary="Prometheus metrics (text exposition format)",
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                              "description": "every metric of serving.metrics"}, **error_responses({})})
    async def prometheus_metrics():
        content, media_type = metrics.exposition()
        return Response(content, media_type=media_type)

    metrics.routes = frozenset(getattr(route, "path", "") for route in app.routes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: 401s are counted too
    app.state.metrics = metrics
    return metrics


__all__ = ["MetricsMiddleware", "ServerMetrics", "install_metrics"]
