"""What an adversarial probe of the server found, each pinned by a test: costly frames kept off the event loop
and bounded by the server's own limits, generation stopped for clients that left mid-stream."""

from __future__ import annotations

import socket
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from test_server import OCTET, assert_error, make_frame
from test_server_hardening import post_request, wait_for

from transformers_alignedvq.serving import BackgroundServer, create_app


class CountingForward:
    """Wraps a model's forward: counts the calls (one per generated token) and makes each take ``delay`` s."""

    def __init__(self, model, delay: float = 0.0):
        self.model, self.delay, self.calls, self._forward = model, delay, 0, model.forward
        model.forward = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        time.sleep(self.delay)
        return self._forward(*args, **kwargs)

    def restore(self):
        del self.model.forward


def test_a_cancelled_row_stops_generating(deployment):
    app = create_app(deployment, max_new_tokens=40, warmup=False)
    engine = app.state.engine
    engine.eos_token_ids = []  # the random model would otherwise stop at its eos by chance
    zeros = torch.zeros(engine.summary["num_tokens"], engine.summary["codes_per_token"], dtype=torch.long)
    request = engine.request(zeros, "what color is the shape ?", max_new_tokens=40)
    request.on_tokens = lambda tokens: request.cancelled.set() if len(tokens) == 3 else None
    steps = CountingForward(engine.model)
    try:
        result = engine.generate([request])[0]
    finally:
        steps.restore()
    assert steps.calls <= 4 and result.generated_tokens <= 4  # the step under way when it was set, at most
    # Another row of the batch keeps going to its own end.
    kept = engine.request(zeros, "what shape is in the image ?", max_new_tokens=10)
    gone = engine.request(zeros, "what color is the shape ?", max_new_tokens=40)
    gone.on_tokens = lambda tokens: gone.cancelled.set() if len(tokens) == 2 else None
    results = engine.generate([kept, gone])
    assert results[0].generated_tokens == 10 and results[1].generated_tokens <= 10


def test_a_client_that_leaves_mid_stream_stops_its_generation(deployment):
    app = create_app(deployment, max_new_tokens=40, max_wait_ms=0, warmup=False)
    engine, batcher = app.state.engine, app.state.batcher
    engine.eos_token_ids = []
    steps = CountingForward(engine.model, delay=0.05)  # 40 steps would take 2 s
    frame = make_frame(engine)
    try:
        with BackgroundServer(app) as server:
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(post_request(frame, "/v1/answer?stream=true"))
            received = b""
            while b"event: token" not in received:
                received += sock.recv(4096)
            sock.close()  # gone after the first token
            wait_for(lambda: batcher.in_flight == 0 and batcher.abandoned == 1)
    finally:
        steps.restore()
    assert steps.calls < 20, f"{steps.calls} of 40 steps computed after the client left"


def test_coded_frames_are_bounded_by_the_servers_prompt_limit(deployment):
    pytest.importorskip("constriction")
    from fastapi.testclient import TestClient

    from tests.wire_data import blocky_images
    from transformers_alignedvq import wire
    from transformers_alignedvq.entropy import EntropyModel

    question = "what shape is it?"
    # The tiny deployment: K = 12, a 4 x 4 grid and a CLS token.
    model = EntropyModel.fit(np.concatenate([blocky_images(300, k=12, side=4)] * 2), codebook_size=12,
                             grid=(4, 4), has_cls_token=True, questions=[question] * 2)
    app = create_app(deployment, max_new_tokens=2, warmup=False, entropy_model=model,
                     max_prompt_bytes=len(question) - 1)
    engine = app.state.engine
    coded = wire.encode_frame(blocky_images(1, k=12, side=4)[0], codebook_size=12,
                              codebook_fingerprint=engine.fingerprint, prompt=question, entropy_model=model)
    assert coded[3] >> wire.PROMPT_SHIFT == wire.PROMPT_CODED
    empty = coded[:17] + struct.pack("<I", zlib.crc32(coded[:17]))  # a 21-byte frame, no payload
    with TestClient(app) as client:
        assert_error(client.post("/v1/answer", content=coded, headers=OCTET), 413, "payload_too_large",
                     f"exceeds {len(question) - 1} bytes")
        assert_error(client.post("/v1/answer", content=empty, headers=OCTET), 400, "malformed_frame",
                     "data ended before the last symbol")


# ---------------------------------------------------------------------------------------------------------
KEY_1, KEY_2 = "first-key-" + "a" * 20, "second-key-" + "b" * 20


def test_access_log_blanks_query_values_but_the_sampling_ones():
    from transformers_alignedvq.serving.auth import AccessLogRedaction
    from transformers_alignedvq.serving.guards import LOGGED_QUERY_PARAMETERS

    redaction = AccessLogRedaction(LOGGED_QUERY_PARAMETERS)
    assert redaction.redact("/v1/answer?api_key=SECRET&top_p=0.5&stream=true&x") == \
        "/v1/answer?api_key=[redacted]&top_p=0.5&stream=true&x"
    assert redaction.redact("/v1/model") == "/v1/model"


def test_keys_reload_without_a_restart(deployment, tmp_path):
    from fastapi.testclient import TestClient

    from transformers_alignedvq.serving.auth import ApiKeys

    path = tmp_path / "keys"
    path.write_text(KEY_1 + "\n")
    keys = ApiKeys.load(path, environ={})
    app = create_app(deployment, max_new_tokens=2, warmup=False, api_keys=keys)
    with TestClient(app) as client:
        def status(key):
            return client.get("/v1/model", headers={"Authorization": f"Bearer {key}"}).status_code

        assert (status(KEY_1), status(KEY_2)) == (200, 401)
        path.write_text(f"# rotated\n{KEY_2}\n")
        assert keys.reload() == 1
        assert (status(KEY_1), status(KEY_2)) == (401, 200)
        path.write_text("# nothing left\n")
        with pytest.raises(ValueError, match="holds no key"):
            keys.reload()
        assert status(KEY_2) == 200  # a broken file keeps the keys in force


def test_serve_reloads_keys_on_sighup_and_keeps_keys_out_of_the_log(deployment, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    import httpx

    path, log = tmp_path / "keys", tmp_path / "server.log"
    path.write_text(KEY_1 + "\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "ALIGNEDVQ_API_KEYS"}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "transformers_alignedvq.cli", "serve", "--model",
                                    str(deployment), "--port", str(port), "--max-new-tokens", "2", "--api-keys-file",
                                    str(path)], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        def status(key, query=""):
            return httpx.get(f"{url}/v1/model{query}", headers={"Authorization": f"Bearer {key}"}).status_code

        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/healthz")
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        assert status(KEY_1, f"?api_key={KEY_1}") == 200 and status(KEY_2) == 401
        path.write_text(KEY_2 + "\n")
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: status(KEY_2) == 200)
        assert status(KEY_1) == 401
    finally:
        process.terminate()
        process.wait(30)
    text = log.read_text()
    assert "api_key=[redacted]" in text and KEY_1 not in text, text
    assert "SIGHUP: 1 API key(s) loaded" in text


def test_openapi_documents_every_route(deployment):
    from fastapi.testclient import TestClient

    app = create_app(deployment, max_new_tokens=2, warmup=False, docs=True)
    with TestClient(app) as client:
        document = client.get("/openapi.json").json()
    schemas = document["components"]["schemas"]
    assert {"AnswerResponse", "ErrorResponse", "HealthResponse", "ModelInfo", "Timing"} <= set(schemas)
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            content = operation["responses"]["200"]["content"]
            if path == "/metrics":
                assert [media for media in content if media.startswith("text/plain")], content
            else:
                assert "$ref" in content["application/json"]["schema"], (path, method)
            if path != "/healthz":
                assert operation["responses"]["401"]["content"]["application/json"]["schema"]["$ref"].endswith(
                    "/ErrorResponse"), (path, method)
    answer = document["paths"]["/v1/answer"]["post"]
    assert answer["requestBody"]["content"]["application/octet-stream"]["schema"]["format"] == "binary"
    assert {p["name"] for p in answer["parameters"]} == {"max_new_tokens", "temperature", "top_p", "seed", "stream"}
    assert "text/event-stream" in answer["responses"]["200"]["content"]
    assert {"400", "409", "413", "415", "422", "503"} <= set(answer["responses"])
    chat = document["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert {"ChatCompletionRequest", "ChatMessage", "ContentPart", "ChatCompletion", "OpenAIError"} <= set(schemas)
    assert chat["responses"]["404"]["content"]["application/json"]["schema"]["$ref"].endswith("/OpenAIError")
