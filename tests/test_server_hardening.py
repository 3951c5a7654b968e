"""The server against hostile and unlucky clients, over real sockets: connection cap, head/body deadlines,
graceful shutdown, clients that leave, health, API keys and TLS (`serving.guards`, `serving.auth`, `serving.runner`)."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.serving_helpers import OCTET, assert_error, make_frame
from transformers_alignedvq import cli
from transformers_alignedvq.errors import ServerConfigError
from transformers_alignedvq.serving import BackgroundServer, create_app
from transformers_alignedvq.serving.auth import API_KEYS_ENV, load_api_keys
from transformers_alignedvq.serving.connection_limits import ConnectionLimits
from transformers_alignedvq.serving.engines.transformers import TransformersAnswerEngine
from transformers_alignedvq.serving.guards import RateLimitFilter, exposure_warnings

KEY = "k" * 20 + "-secret-1"
FAST = ConnectionLimits(max_connections=8, backlog=4, header_timeout=0.5, body_timeout=0.5, keep_alive_timeout=0.5)


@pytest.fixture(scope="module")
def app(deployment):
    return create_app(deployment, max_new_tokens=2, max_wait_ms=0)


@pytest.fixture(scope="module")
def frame(app):
    return make_frame(app.state.engine)


def closed_by_server(sock: socket.socket, within: float) -> float | None:
    """Seconds until the server closed ``sock`` (EOF or reset), or None if it is still open after ``within``."""
    start = time.monotonic()
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - start


def post_request(frame: bytes, path: str = "/v1/answer") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(frame)}\r\n\r\n").encode() + frame


class Gate:
    """Replaces a batcher's run_batch with one that blocks until released, counting the jobs it ran."""

    def __init__(self, batcher):
        self.entered, self.release, self.jobs = threading.Event(), threading.Event(), 0
        self._run, self._batcher = batcher.run_batch, batcher
        batcher.run_batch = self

    def __call__(self, jobs):
        self.jobs += len(jobs)
        self.entered.set()
        assert self.release.wait(30), "the test never released the worker"
        return self._run(jobs)

    def restore(self):
        self.release.set()
        self._batcher.run_batch = self._run


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.005)


# ---------------------------------------------------------------------------------------------------------
def test_idle_connections_beyond_the_cap_do_not_lock_out_a_valid_client(app):
    with BackgroundServer(app, limits=ConnectionLimits(max_connections=8, backlog=4)) as server:
        idle = []
        for _ in range(30):
            idle.append(socket.create_connection(("127.0.0.1", server.port)))
            time.sleep(0.005)  # lets the server's thread take the GIL and accept: a full backlog costs 1 s
        response = httpx.get(f"{server.url}/healthz", timeout=5)
        assert response.status_code == 200 and response.json()["status"] == "ok"
        closed = sum(closed_by_server(sock, 0.05) is not None for sock in idle)
        assert closed >= 30 + 1 - 8  # the oldest idle ones made room; the newest are still open
        assert closed_by_server(idle[-1], 0.05) is None
        for sock in idle:
            sock.close()


def test_silent_and_slow_clients_are_cut_off_at_their_deadlines(app, frame):
    with BackgroundServer(app, limits=FAST) as server:
        address = ("127.0.0.1", server.port)
        silent = socket.create_connection(address)
        slow_head = socket.create_connection(address)
        slow_head.sendall(b"POST /v1/answer HTTP/1.1\r\nHost: t\r\n")
        slow_body = socket.create_connection(address)
        slow_body.sendall(post_request(frame)[:-5])  # the head and all of the body but 5 bytes
        for sock in (silent, slow_head, slow_body):
            held = closed_by_server(sock, 5)
            assert held is not None and held < 2, held
            sock.close()
        # A client that keeps the head trickling in is cut at the head deadline too.
        trickle = socket.create_connection(address)
        start = time.monotonic()
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for _ in range(40):
                trickle.sendall(b"X")
                time.sleep(0.05)
        assert time.monotonic() - start < 2
        trickle.close()


def test_head_over_max_header_bytes_in_pieces_is_refused(app):
    with BackgroundServer(app, limits=ConnectionLimits(max_header_bytes=1024)) as server:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        with pytest.raises((BrokenPipeError, ConnectionResetError)):  # the server answers and closes midway
            for _ in range(40):
                sock.sendall(b"X-Padding: " + b"a" * 500 + b"\r\n")
                time.sleep(0.02)
        sock.settimeout(5)
        assert sock.recv(100).startswith(b"HTTP/1.1 400")
        sock.close()


def test_limits_are_validated_and_checked_against_the_open_file_limit(monkeypatch):
    with pytest.raises(ServerConfigError, match="backlog=9 must be between 1 and max_connections=8"):
        ConnectionLimits(max_connections=8, backlog=9)
    with pytest.raises(ServerConfigError, match="header_timeout=0 must be > 0"):
        ConnectionLimits(header_timeout=0)
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda kind: (256, 512))
    with pytest.raises(ServerConfigError, match=r"need 1536 open files.*at most 512.*--max-connections"):
        ConnectionLimits().ensure_fd_limit()


# ---------------------------------------------------------------------------------------------------------
def test_client_that_left_after_sending_its_body_is_not_computed(deployment, frame):
    app = create_app(deployment, max_new_tokens=2, max_batch_size=1, max_wait_ms=0, warmup=False)
    batcher, gate = app.state.batcher, Gate(app.state.batcher)
    try:
        with BackgroundServer(app) as server, ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, f"{server.url}/v1/answer", content=frame, headers=OCTET, timeout=30)
            assert gate.entered.wait(30)  # the worker is busy with the first request
            gone = socket.create_connection(("127.0.0.1", server.port))
            gone.sendall(post_request(frame))
            wait_for(lambda: batcher.queue_depth() == 1)
            gone.close()
            time.sleep(0.2)  # the server notices the disconnect and cancels the queued job
            gate.release.set()
            assert first.result(30).status_code == 200
            wait_for(lambda: batcher.queue_depth() == 0)
            assert gate.jobs == 1 and batcher.abandoned == 1 and batcher.requests == 1
    finally:
        gate.restore()


@contextlib.contextmanager
def held_requests(deployment, frame, *, count: int, max_batch_size: int, shutdown_timeout: float):
    """A running server whose worker is blocked (`Gate`) while it holds ``count`` posted requests; yields
    ``(server, gate, futures of the responses)``."""
    app = create_app(deployment, max_new_tokens=2, max_batch_size=max_batch_size, max_wait_ms=0, warmup=False)
    batcher, gate = app.state.batcher, Gate(app.state.batcher)
    server = BackgroundServer(app, limits=ConnectionLimits(shutdown_timeout=shutdown_timeout)).start()
    try:
        with ThreadPoolExecutor(count) as pool:
            try:
                sent = [pool.submit(httpx.post, f"{server.url}/v1/answer", content=frame, headers=OCTET, timeout=30)
                        for _ in range(count)]
                wait_for(lambda: batcher.queue_depth() + batcher.in_flight == count)
                yield server, gate, sent
            finally:
                gate.restore()
    finally:
        server.stop()


def test_sigterm_drain_answers_everything_received_then_refuses_connections(deployment, frame):
    with held_requests(deployment, frame, count=6, max_batch_size=2, shutdown_timeout=20) as (server, gate, sent):
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        wait_for(lambda: server.app.state.batcher.stopping)
        late = httpx.post(f"{server.url}/v1/answer", content=frame, headers=OCTET, timeout=10)
        assert_error(late, 503, "shutting_down")
        assert late.headers["connection"] == "close" and late.headers["retry-after"] == "1"
        gate.release.set()
        assert [future.result(30).status_code for future in sent] == [200] * 6
        stopper.join(30)
        assert not stopper.is_alive()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/healthz", timeout=2)


def test_sigterm_answers_503_to_what_cannot_finish_within_the_timeout(deployment, frame):
    with held_requests(deployment, frame, count=3, max_batch_size=1, shutdown_timeout=1.0) as (server, gate, sent):
        start = time.monotonic()
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        responses = [future.result(30) for future in sent]  # the worker stays blocked
        assert time.monotonic() - start < 3
        for response in responses:
            assert_error(response, 503, "shutting_down")
        gate.release.set()  # lets the blocked batch end, so the server can stop
        stopper.join(30)
        assert not stopper.is_alive()


SERVE_RECORDING_CLOSE = """
import sys
from pathlib import Path
from transformers_alignedvq.serving import serve
from transformers_alignedvq.serving.engines.transformers import TransformersAnswerEngine
TransformersAnswerEngine.close = lambda self: Path(sys.argv[3]).write_text("closed")
serve(sys.argv[1], port=int(sys.argv[2]), max_new_tokens=2)
"""


def test_serve_closes_its_engine_before_a_signal_ends_it(deployment, tmp_path):
    """uvicorn re-raises SIGTERM after draining, which would end the process past `serve`'s finally and leave
    vLLM's engine processes running."""
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    marker = tmp_path / "closed"
    process = subprocess.Popen([sys.executable, "-c", SERVE_RECORDING_CLOSE, str(deployment), str(port), str(marker)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def healthy() -> bool:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout=120)
        process.terminate()
        assert process.wait(30) == -15  # the signal still ends the process, as uvicorn intends
    finally:
        if process.poll() is None:
            process.kill()
    assert marker.read_text() == "closed"


# ---------------------------------------------------------------------------------------------------------
def test_failing_model_makes_health_red_and_leaks_nothing(deployment, frame):
    app = create_app(deployment, max_new_tokens=2, max_wait_ms=0)
    batcher = app.state.batcher
    run_batch = batcher.run_batch

    def broken(jobs):
        raise RuntimeError(f"CUDA error: device-side assert in {deployment}/modeling.py")

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/healthz").json()["last_generate"] == "ok"  # the warm-up
        info = client.get("/v1/model").text
        assert str(deployment) not in info and "name_or_path" not in info
        batcher.run_batch = broken
        failed = client.post("/v1/answer", content=frame, headers=OCTET)
        assert_error(failed, 500, "internal_error", "see the server log")
        assert "CUDA" not in failed.text and str(deployment) not in failed.text
        health = client.get("/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "unhealthy" and health.json()["consecutive_failures"] == 1
        batcher.run_batch = run_batch
        assert client.post("/v1/answer", content=frame, headers=OCTET).status_code == 200
        assert client.get("/healthz").status_code == 200


def test_warm_up_failure_is_a_start_up_error(deployment, monkeypatch):
    def broken(self, batch):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(TransformersAnswerEngine, "generate", broken)
    with pytest.raises(ServerConfigError, match="warm-up generate failed.*out of memory"):
        create_app(deployment)


def test_openapi_routes_follow_the_docs_switch(deployment):
    with TestClient(create_app(deployment, warmup=False)) as client:
        assert client.get("/openapi.json").status_code == 404 and client.get("/docs").status_code == 404
    with TestClient(create_app(deployment, warmup=False, docs=True, api_keys=[KEY])) as client:
        assert_error(client.get("/openapi.json"), 401, "unauthorized")
        assert client.get("/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


# ---------------------------------------------------------------------------------------------------------
def test_api_keys_gate_every_route_but_health(deployment, frame):
    app = create_app(deployment, max_new_tokens=2, max_wait_ms=0, api_keys=[KEY, "another-key-0123456789"])
    with TestClient(app) as client:
        for headers in ({}, {"Authorization": "Bearer wrong-key-0123456789"}, {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}):
            for response in (client.post("/v1/answer", content=frame, headers={**OCTET, **headers}),
                             client.get("/v1/model", headers=headers), client.get("/nothing", headers=headers)):
                assert_error(response, 401, "unauthorized", "Authorization: Bearer")
                assert response.headers["www-authenticate"].startswith("Bearer")
        assert app.state.batcher.requests == 0  # nothing unauthenticated reached the model
        assert client.get("/healthz").status_code == 200
        for key in (KEY, "another-key-0123456789"):
            answered = client.post("/v1/answer", content=frame, headers={**OCTET, "Authorization": f"bearer {key}"})
            assert answered.status_code == 200, answered.text


def test_api_keys_load_from_file_and_environment_and_are_never_echoed(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# clients\n{KEY}\n\n  second-key-abcdefghij  \n")
    env = {API_KEYS_ENV: "env-key-0123456789abc, env-key-2-0123456789"}
    assert load_api_keys(keys_file, environ=env) == [KEY, "second-key-abcdefghij", "env-key-0123456789abc",
                                                     "env-key-2-0123456789"]
    assert load_api_keys(environ={}) == []
    keys_file.write_text("tooshort\n")
    with pytest.raises(ServerConfigError, match="key 1 of file .* has 8 characters") as error:
        load_api_keys(keys_file, environ={})
    assert "tooshort" not in str(error.value)
    keys_file.write_text("# only a comment\n")
    with pytest.raises(ServerConfigError, match="holds no key"):
        load_api_keys(keys_file, environ={})
    with pytest.raises(ServerConfigError, match="cannot carry"):
        load_api_keys(environ={API_KEYS_ENV: "key-with-a-quote-\"-0123456789"})


def test_https_with_api_key_through_real_clients(deployment, tmp_path):
    trustme = pytest.importorskip("trustme")
    from transformers_alignedvq.client import EdgeClient, ServerError
    from transformers_alignedvq.export.edge_export import export_edge

    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certificate.private_key_pem.write_to_path(keyfile)
    certificate.cert_chain_pems[0].write_to_path(certfile)
    context = ssl.create_default_context()
    authority.configure_trust(context)

    app = create_app(deployment, max_new_tokens=2, max_wait_ms=0, api_keys=[KEY])
    edge = export_edge(deployment, tmp_path / "edge")
    with BackgroundServer(app, ssl_certfile=certfile, ssl_keyfile=keyfile) as server:
        assert server.url.startswith("https://")
        assert httpx.get(f"{server.url}/healthz", verify=context).status_code == 200
        with pytest.raises(httpx.ConnectError):  # the certificate is checked
            httpx.get(f"{server.url}/healthz")
        assert httpx.get(f"{server.url}/v1/model", verify=context).status_code == 401
        image = np.zeros((40, 40, 3), dtype=np.uint8)
        with EdgeClient(edge, server.url, api_key=KEY, transport=httpx.HTTPTransport(verify=context)) as client:
            assert isinstance(client.ask(image, "what shape is it ?").text, str)
        with EdgeClient(edge, server.url, transport=httpx.HTTPTransport(verify=context)) as anonymous:
            with pytest.raises(ServerError, match="401 unauthorized"):
                anonymous.ask(image, "what shape is it ?")
        with pytest.raises(httpx.RemoteProtocolError):  # plain HTTP to the TLS port
            httpx.get(f"http://127.0.0.1:{server.port}/healthz")


# ---------------------------------------------------------------------------------------------------------
def test_rate_limit_filter_passes_a_burst_then_counts_what_it_drops():
    now = [0.0]
    limit = RateLimitFilter(burst=3, period=10.0, clock=lambda: now[0])

    def record(msg, args=(), name="uvicorn.error", level=logging.WARNING):
        return logging.LogRecord(name, level, __file__, 1, msg, args, None)

    passed = [limit.filter(record("Invalid HTTP request received.")) for _ in range(100)]
    assert passed.count(True) == 3
    assert limit.filter(record("another message"))  # another kind has its own budget
    now[0] = 10.0
    summary = record("Invalid HTTP request received.")
    assert limit.filter(summary) and "97 more like this dropped" in summary.getMessage()
    answered = ("127.0.0.1:5", "POST", "/v1/answer", "1.1", 200)
    assert all(limit.filter(record('%s - "%s %s HTTP/%s" %d', answered, "uvicorn.access", logging.INFO))
               for _ in range(50))
    refused = ("127.0.0.1:5", "POST", "/v1/answer", "1.1", 400)
    assert sum(limit.filter(record('%s - "%s %s HTTP/%s" %d', refused, "uvicorn.access", logging.INFO))
               for _ in range(50)) == 3


def test_a_flood_of_bad_requests_logs_a_bounded_number_of_lines(app):
    lines = []
    handler = logging.Handler()
    handler.emit = lines.append
    uvicorn_errors = logging.getLogger("uvicorn.error")
    with BackgroundServer(app, log_level="info") as server:
        uvicorn_errors.addHandler(handler)
        try:
            for _ in range(60):
                with socket.create_connection(("127.0.0.1", server.port)) as sock:
                    sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
                    sock.settimeout(5)
                    assert sock.recv(100).startswith(b"HTTP/1.1 400")
        finally:
            uvicorn_errors.removeHandler(handler)
    invalid = [record for record in lines if "Invalid HTTP request" in record.getMessage()]
    assert 1 <= len(invalid) <= 10


def test_exposure_warnings():
    assert exposure_warnings("127.0.0.1", auth=False, tls=False) == []
    assert exposure_warnings("::1", auth=False, tls=False) == []
    assert "all interfaces without API keys" in exposure_warnings("0.0.0.0", auth=False, tls=True)[0]
    assert "without TLS" in exposure_warnings("10.1.2.3", auth=True, tls=False)[0]
    assert exposure_warnings("0.0.0.0", auth=True, tls=True) == []


def test_serve_on_all_interfaces_without_keys_warns_before_loading(tmp_path, caplog, monkeypatch):
    monkeypatch.delenv(API_KEYS_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="transformers_alignedvq.serving.runner"):
        assert cli.main(["serve", "--model", str(tmp_path / "missing"), "--host", "0.0.0.0"]) == 1
    assert "listening on all interfaces without API keys" in caplog.text


def test_serve_help_shows_every_limit_with_its_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split("options:", 1)[1].split())
    defaults = ConnectionLimits()
    for flag, value in [("--max-connections", defaults.max_connections), ("--backlog", defaults.backlog),
                        ("--header-timeout", defaults.header_timeout), ("--body-timeout", defaults.body_timeout),
                        ("--keep-alive-timeout", defaults.keep_alive_timeout),
                        ("--max-header-bytes", defaults.max_header_bytes),
                        ("--shutdown-timeout", defaults.shutdown_timeout), ("--max-queue", 64),
                        ("--max-prompt-bytes", 2048), ("--max-new-tokens", 32), ("--max-batch-size", 8)]:
        shown = re.search(rf"{flag} [A-Z_]+ .*?\(default: ([^)]*)\)", text)
        assert shown and shown.group(1) == str(value), flag
    assert "--max-body-bytes" in text and "largest valid frame" in text


def test_ask_sends_the_key_from_a_file_or_the_environment(deployment, tmp_path, monkeypatch, capsys):
    from PIL import Image

    from transformers_alignedvq.export.edge_export import export_edge

    picture = tmp_path / "picture.png"
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(picture)
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    monkeypatch.delenv(cli.API_KEY_ENV, raising=False)
    app = create_app(deployment, max_new_tokens=2, max_wait_ms=0, api_keys=[KEY])
    with BackgroundServer(app) as server:
        edge = export_edge(deployment, tmp_path / "edge")
        ask = ["ask", "--server", server.url, "--edge", str(edge), "--image", str(picture), "what ?"]
        assert cli.main(ask + ["--retry-window", "0"]) == 1
        assert "401 unauthorized" in capsys.readouterr().err
        assert cli.main(ask + ["--api-key-file", str(key_file)]) == 0
        monkeypatch.setenv(cli.API_KEY_ENV, KEY)
        assert cli.main(ask) == 0
    assert capsys.readouterr().out.count("answer:") == 2
