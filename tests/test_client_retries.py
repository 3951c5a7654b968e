"""Which failures the edge client retries: only those a later attempt can get past."""

from __future__ import annotations

import http.server
import json
import threading

import httpx
import numpy as np
import pytest

import transformers_alignedvq
from transformers_alignedvq.client import EdgeClient, EdgeClientError, ServerError

pytestmark = pytest.mark.bundled_model
IMAGE = np.zeros((16, 16, 3), dtype=np.uint8)
ANSWER = {"answer": "red", "timing_ms": {"total": 1.0}}


def _client(statuses: list[int], seen: list[int], **options) -> EdgeClient:
    """A client whose server answers ``statuses`` in turn (then 200), recording each request in ``seen``."""

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(len(seen))
        if len(seen) <= len(statuses):
            status = statuses[len(seen) - 1]
            return httpx.Response(status, json={"error": {"type": "t", "message": f"status {status}"}},
                                  headers={"Retry-After": "0"})
        # a stream, not `json=`: httpx sets `elapsed` (which `ask` reads) only once a stream is read
        return httpx.Response(200, headers={"Content-Type": "application/json"},
                              stream=httpx.ByteStream(json.dumps(ANSWER).encode()))

    return EdgeClient(transformers_alignedvq.DEFAULT_MODEL, "http://cloud", transport=httpx.MockTransport(handle),
                      threads=1, backoff=0.001, **options)


@pytest.mark.parametrize("status", [408, 429, 502, 503, 504])
def test_statuses_a_later_attempt_can_pass_are_retried(status):
    seen: list[int] = []
    with _client([status, status], seen, retry_window=10) as client:
        answer = client.ask(IMAGE, "what color?")
    assert answer.text == "red" and answer.attempts == 3 and len(seen) == 3


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422, 500])
def test_other_error_statuses_are_final_at_once(status):
    seen: list[int] = []
    with _client([status], seen, retry_window=10) as client, pytest.raises(ServerError) as caught:
        client.ask(IMAGE, "what color?")
    assert caught.value.status == status and len(seen) == 1


class _PlainHTTP(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the standard library's name)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_https_against_a_plain_http_server_fails_at_once():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _PlainHTTP)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"https://127.0.0.1:{server.server_address[1]}"
        with EdgeClient(transformers_alignedvq.DEFAULT_MODEL, url, threads=1, retry_window=30) as client:
            with pytest.raises(EdgeClientError, match="TLS failed .*needs a server with TLS on") as caught:
                client.server_info()
    finally:
        server.shutdown()
        server.server_close()
    assert "after" not in str(caught.value)  # not ServerUnavailableError's "failed after N attempt(s)"
