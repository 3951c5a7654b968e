"""Prometheus metrics (`serving.metrics`): scraped over HTTP from a real server, counters that move."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families
from test_server import OCTET, make_frame

from transformers_alignedvq.serving import BackgroundServer, create_app

KEY = "metrics-test-key-" + "m" * 20


def scrape(url: str, **kwargs) -> dict[tuple[str, tuple], float]:
    response = httpx.get(f"{url}/metrics", **kwargs)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def value(samples, name, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_with_requests(deployment):
    app = create_app(deployment, max_new_tokens=3, max_wait_ms=0)
    frame = make_frame(app.state.engine)
    with BackgroundServer(app) as server:
        before = scrape(server.url)
        assert value(before, "alignedvq_engine_healthy") == 1.0
        for _ in range(3):
            assert httpx.post(f"{server.url}/v1/answer", content=frame, headers=OCTET).status_code == 200
        assert httpx.post(f"{server.url}/v1/answer", content=b"junk", headers=OCTET).status_code == 400
        assert httpx.get(f"{server.url}/nowhere").status_code == 404
        with httpx.stream("POST", f"{server.url}/v1/answer?stream=true", content=frame, headers=OCTET) as streamed:
            assert streamed.status_code == 200 and "event: done" in streamed.read().decode()
        after = scrape(server.url)
    route = "/v1/answer"
    assert value(after, "alignedvq_requests_total", route=route, status="200") - \
        value(before, "alignedvq_requests_total", route=route, status="200") == 4
    assert value(after, "alignedvq_requests_total", route=route, status="400") == 1
    assert value(after, "alignedvq_requests_total", route="other", status="404") == 1
    assert value(after, "alignedvq_request_duration_seconds_count", route=route) == 5
    assert value(after, "alignedvq_time_to_first_token_seconds_count", route=route) == 1
    assert value(after, "alignedvq_frame_bytes_count") == 5
    assert value(after, "alignedvq_frame_bytes_sum") == 4 * len(frame) + len(b"junk")
    assert value(after, "alignedvq_batch_size_count") == 4 and value(after, "alignedvq_batch_size_sum") == 4
    assert 4 <= value(after, "alignedvq_generated_tokens_total") <= 12
    assert value(after, "alignedvq_queue_depth") == 0 and value(after, "alignedvq_in_flight") == 0
    assert value(after, "alignedvq_image_cache_entries") == 1 and value(after, "alignedvq_image_cache_bytes") > 0


def test_metrics_are_behind_the_keys_unless_public(deployment):
    for public in (False, True):
        app = create_app(deployment, max_new_tokens=2, warmup=False, api_keys=[KEY], public_metrics=public)
        with BackgroundServer(app) as server:
            anonymous = httpx.get(f"{server.url}/metrics")
            assert anonymous.status_code == (200 if public else 401)
            samples = scrape(server.url, headers={"Authorization": f"Bearer {KEY}"})
            if not public:
                assert value(samples, "alignedvq_requests_total", route="/metrics", status="401") == 1
    app = create_app(deployment, max_new_tokens=2, warmup=False, metrics=False)
    with BackgroundServer(app) as server:
        assert httpx.get(f"{server.url}/metrics").status_code == 404
