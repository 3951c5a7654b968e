"""Edge client (`transformers_alignedvq.client`) against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor

from transformers_alignedvq.client import EdgeClient, EdgeClientError, ServerError, ServerUnavailableError
from transformers_alignedvq.edge_runtime import EDGE_WEIGHTS_NAME
from transformers_alignedvq.export.edge_export import export_edge
from transformers_alignedvq.preprocess import ImageInputError
from transformers_alignedvq.serving import BackgroundServer, create_app
from transformers_alignedvq.testing import WITHOUT_CLOUD_PACKAGES
from transformers_alignedvq.wire import codebook_fingerprint

QUESTION = "what color is the shape ?"
# Modules the edge process must never load: the web server stack and the language model.
SERVER_MODULES = ("fastapi", "starlette", "uvicorn", "transformers_alignedvq.serving")
LM_MODULES = ("transformers.models.llama.modeling_llama",)

_PROBE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    torch.set_num_threads(1)
    from transformers_alignedvq.client import EdgeClient

    edge_dir, url = sys.argv[1], sys.argv[2]
    with EdgeClient(edge_dir, url, timeout=60) as client:
        image = np.random.default_rng(5).integers(0, 256, (48, 48, 3), dtype=np.uint8)
        answer = client.ask(image, "what color is the shape ?")
    print(json.dumps({"answer": answer.text, "bytes_sent": answer.bytes_sent, "modules": sorted(sys.modules)}))
    """
)


@pytest.fixture(scope="module")
def edge_dir(deployment, tmp_path_factory):
    return export_edge(deployment, tmp_path_factory.mktemp("edge"))


@pytest.fixture(scope="module")
def server(deployment):
    app = create_app(deployment, max_new_tokens=6, max_wait_ms=1)
    with BackgroundServer(app, host="127.0.0.1", port=0) as running:
        yield running


@pytest.fixture(scope="module")
def isolated_edge_process(server, edge_dir):
    """An edge client in a fresh interpreter; started early (module scope) so it overlaps the other tests."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", _PROBE, str(edge_dir), server.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def isolated_edge_result(isolated_edge_process):
    out, err = isolated_edge_process.communicate(timeout=240)
    assert isolated_edge_process.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(autouse=True, scope="module")
def _start_probe_early(isolated_edge_process):
    yield


@pytest.fixture(scope="module")
def edge_client(edge_dir, server):
    with EdgeClient(edge_dir, server.url, timeout=60, retry_window=5, backoff=0.01) as client:
        yield client


def image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 40, 3), dtype=np.uint8))


def direct_answer(server, frame: bytes) -> dict:
    response = httpx.post(f"{server.url}/v1/answer", content=frame,
                          headers={"Content-Type": "application/octet-stream"}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


class FlakyProxy:
    """TCP proxy to the real server whose first ``misbehave`` connections fail: closed after the request
    arrives (a dropped connection), answered with ``canned`` bytes instead of being forwarded, or, ``silent``,
    held open without an answer (a stuck server)."""

    def __init__(self, target_port: int, *, misbehave: int, canned: bytes | None = None, silent: bool = False):
        self.target_port, self.misbehave, self.canned, self.silent = target_port, misbehave, canned, silent
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn, self.connections), daemon=True).start()

    @staticmethod
    def _read_request(conn) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return
            body += chunk

    def _handle(self, conn, number: int):
        with conn:
            if number <= self.misbehave:
                self._read_request(conn)
                if self.canned is not None:
                    conn.sendall(self.canned)
                while self.silent and not self._closed and conn.recv(65536):
                    pass  # until the client gives up and closes
                return
            with socket.create_connection(("127.0.0.1", self.target_port)) as upstream:
                def pump(src, dst):
                    try:
                        while chunk := src.recv(65536):
                            dst.sendall(chunk)
                    except OSError:
                        pass
                    finally:
                        try:
                            dst.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass

                back = threading.Thread(target=pump, args=(upstream, conn), daemon=True)
                back.start()
                pump(conn, upstream)
                back.join(30)

    def close(self):
        self._closed = True
        self._listener.close()


def canned_503(retry_after: str) -> bytes:
    body = json.dumps({"error": {"type": "overloaded", "message": "queue full"}}).encode()
    return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            + f"Retry-After: {retry_after}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)


# ---------------------------------------------------------------------------------------------------------
def test_export_edge_writes_only_the_edge_and_matches_the_model(deployment, edge_dir, edge_client, server):
    assert sorted(p.name for p in edge_dir.iterdir()) == ["edge_config.json", "edge_model.safetensors"]
    model = server.app.state.engine.model
    # the preprocessing recorded in the edge folder is the deployment's own image processor's
    pixels = AutoProcessor.from_pretrained(deployment).image_processor(images=image(1), return_tensors="pt")["pixel_values"]
    np.testing.assert_allclose(edge_client.edge.preprocessing(image(1)), pixels.numpy(), atol=1e-6, rtol=0)
    indices = torch.from_numpy(edge_client.edge.encode(pixels.numpy())).squeeze(-1)
    assert torch.equal(indices, model.encode_edge(pixels))
    assert edge_client.fingerprint == model.codebook_fingerprint()
    assert edge_client.check_server()["codebook_fingerprint"] == model.codebook_fingerprint().hex()


def test_ask_round_trip(edge_client, server):
    answer = edge_client.ask(image(2), QUESTION)
    frame = edge_client.encode(image(2), QUESTION)
    assert answer.bytes_sent == len(frame) == answer.server["bytes_received"]
    assert answer.text == direct_answer(server, frame)["answer"] and answer.text
    assert answer.cloud_ms == answer.server["timing_ms"]["total"] > 0
    assert answer.edge_ms > 0 and answer.transfer_ms >= 0 and answer.attempts == 1
    assert answer.total_ms >= answer.edge_ms
    # A different image or question gives a different frame.
    assert edge_client.encode(image(3), QUESTION) != frame
    assert edge_client.encode(image(2), "what shape is it ?") != frame


def test_ask_passes_sampling_options(edge_client, server):
    frame = edge_client.encode(image(5), QUESTION)
    assert edge_client.ask(image(5), QUESTION).server["generated_tokens"] > 1  # greedy, the server's limit
    sampled = edge_client.ask(image(5), QUESTION, temperature=1.5, seed=4, max_new_tokens=1)
    response = httpx.post(f"{server.url}/v1/answer?temperature=1.5&seed=4&max_new_tokens=1", content=frame,
                          headers={"Content-Type": "application/octet-stream"}, timeout=60)
    assert sampled.text == response.json()["answer"] and sampled.server["generated_tokens"] == 1
    with pytest.raises(ServerError, match="422 invalid_parameter: top_p"):
        edge_client.ask(image(5), QUESTION, top_p=2.0)


def test_stream_yields_pieces_that_add_up_to_the_answer(edge_client, server):
    answer = edge_client.ask(image(6), QUESTION)
    with edge_client.stream(image(6), QUESTION) as stream:
        pieces = list(stream)
    assert len(pieces) >= 1 and "".join(pieces).strip() == answer.text
    assert stream.answer.text == answer.text and stream.answer.bytes_sent < 40 < answer.bytes_sent  # a follow-up
    assert stream.answer.server["generated_tokens"] == answer.server["generated_tokens"]
    sampled = edge_client.ask(image(6), QUESTION, temperature=1.5, seed=3)
    assert "".join(edge_client.stream(image(6), QUESTION, temperature=1.5, seed=3)).strip() == sampled.text
    with pytest.raises(ServerError, match="422 invalid_parameter: top_p"):
        edge_client.stream(image(6), QUESTION, top_p=2.0)


def test_save_frame_writes_what_ask_sends(edge_client, server, tmp_path):
    path = tmp_path / "frame.bin"
    size = edge_client.save_frame(path, image(7), QUESTION)
    frame = path.read_bytes()
    assert size == len(frame) and frame == edge_client.encode(image(7), QUESTION)
    assert direct_answer(server, frame)["answer"] == edge_client.ask(image(7), QUESTION).text


def test_image_inputs_are_interchangeable(edge_client, tmp_path):
    picture = image(4)
    path = tmp_path / "picture.png"
    picture.save(path)
    inputs = (picture, path, str(path), path.read_bytes(), np.asarray(picture))
    frames = {edge_client.encode(x, QUESTION) for x in inputs}
    assert len(frames) == 1
    with pytest.raises(ImageInputError, match="image must be"):
        edge_client.encode(12, QUESTION)
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(ImageInputError, match="cannot read the image"):
        edge_client.encode(tmp_path / "notes.txt", QUESTION)
    with pytest.raises(ValueError, match="non-empty"):
        edge_client.ask(picture, "  ")


def test_full_checkpoint_folder_works_as_edge_folder(deployment, edge_client, server):
    # Full checkpoints carry the edge files; the client reads only those plus the image processor.
    with EdgeClient(deployment, server.url) as client:
        assert client.encode(image(5), QUESTION) == edge_client.encode(image(5), QUESTION)


def test_retries_after_a_dropped_connection(edge_dir, server):
    proxy = FlakyProxy(server.port, misbehave=1)
    try:
        with EdgeClient(edge_dir, proxy.url, timeout=30, retry_window=10, backoff=0.01) as client:
            answer = client.ask(image(6), QUESTION)
            assert answer.attempts == 2 and proxy.connections == 2
            assert answer.text == direct_answer(server, client.encode(image(6), QUESTION))["answer"]
    finally:
        proxy.close()


def test_retries_after_503_honouring_retry_after(edge_dir, server):
    proxy = FlakyProxy(server.port, misbehave=1, canned=canned_503("1"))
    try:
        with EdgeClient(edge_dir, proxy.url, timeout=30, retry_window=10, backoff=0.0, max_backoff=5) as client:
            start = time.perf_counter()
            answer = client.ask(image(7), QUESTION)
            assert time.perf_counter() - start >= 0.9  # waited the server's Retry-After, not the zero backoff
            assert answer.attempts == 2 and answer.text
    finally:
        proxy.close()


def test_gives_up_when_the_retry_window_is_over(edge_dir, server):
    proxy = FlakyProxy(server.port, misbehave=1000)
    try:
        with EdgeClient(edge_dir, proxy.url, timeout=30, retry_window=1.0, backoff=0.05, max_backoff=0.2) as client:
            start = time.monotonic()
            with pytest.raises(ServerUnavailableError, match=r"attempt\(s\) in 1\.\d s"):
                client.ask(image(8), QUESTION)
            assert 1.0 <= time.monotonic() - start < 3.0
        assert 4 <= proxy.connections <= 40  # backoff 0.05 s doubling to 0.2 s, jittered, over 1 s
    finally:
        proxy.close()
    with socket.create_server(("127.0.0.1", 0)) as probe:
        closed_port = probe.getsockname()[1]  # nothing listens once the block ends
    with EdgeClient(edge_dir, f"http://127.0.0.1:{closed_port}", retry_window=0.2, backoff=0.01) as client:
        with pytest.raises(ServerUnavailableError, match="ConnectError"):
            client.ask(image(8), QUESTION)
    with EdgeClient(edge_dir, f"http://127.0.0.1:{closed_port}", retry_window=0) as client:
        with pytest.raises(ServerUnavailableError, match="after 1 attempt"):
            client.ask(image(8), QUESTION)


def test_a_read_timeout_is_retried_like_a_dropped_connection(edge_dir, server):
    # The first connection gets no answer at all (the server is stuck or restarting): the client times out
    # reading, and sends the same idempotent request again.
    proxy = FlakyProxy(server.port, misbehave=1, silent=True)
    try:
        with EdgeClient(edge_dir, proxy.url, timeout=0.5, retry_window=10, backoff=0.01) as client:
            answer = client.ask(image(6), QUESTION)
            assert answer.attempts == 2 and answer.text
    finally:
        proxy.close()


def test_default_retry_window_covers_a_server_restart_with_jitter(edge_dir):
    with EdgeClient(edge_dir, "http://127.0.0.1:9", seed=0) as client:
        assert client.retry_window == 30.0
        waits = [client._delay(3, None, 100.0) for _ in range(50)]
    assert 0.8 <= min(waits) < max(waits) <= 1.6  # 0.2 * 2**3 = 1.6, drawn from [half, all]


def test_bad_server_urls_are_refused_up_front(edge_dir):
    for url in ("127.0.0.1:8000", "cloud:8000", "ftp://cloud", "http://"):
        with pytest.raises(EdgeClientError, match="must start with http"):
            EdgeClient(edge_dir, url)


def test_an_edge_saved_from_the_model_object_works(server, tmp_path, edge_client):
    # The README's Python path: model.edge_encoder().save_pretrained(dir), no image processor file beside it.
    model = server.app.state.engine.model
    model.edge_encoder().save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edge_config.json", "edge_model.safetensors"]
    with EdgeClient(tmp_path, server.url) as client:
        assert client.encode(image(3), QUESTION) == edge_client.encode(image(3), QUESTION)
        assert client.ask(image(3), QUESTION).text == edge_client.ask(image(3), QUESTION).text


def test_client_errors_are_not_retried(edge_dir, server, tmp_path):
    other = tmp_path / "other-edge"
    shutil.copytree(edge_dir, other)
    state = load_file(str(other / EDGE_WEIGHTS_NAME))
    state["alignedvq.quantizer.codebook"] = state["alignedvq.quantizer.codebook"] + 1.0  # another codebook
    save_file(state, str(other / EDGE_WEIGHTS_NAME), metadata={"format": "pt"})
    with pytest.raises(EdgeClientError, match="holds another codebook than edge_config.json records"):
        EdgeClient(other, server.url)  # weights and config of two different edges
    config = json.loads((other / "edge_config.json").read_text())
    config["codebook_fingerprint"] = codebook_fingerprint(state["alignedvq.quantizer.codebook"]).hex()
    (other / "edge_config.json").write_text(json.dumps(config))  # a consistent edge of another model
    proxy = FlakyProxy(server.port, misbehave=0)
    try:
        with EdgeClient(other, proxy.url, retry_window=5, backoff=0.01) as client:
            with pytest.raises(ServerError) as caught:
                client.ask(image(9), QUESTION)
            assert caught.value.status == 409 and caught.value.type == "codebook_mismatch"
            assert proxy.connections == 1
            with pytest.raises(EdgeClientError, match="codebook_fingerprint"):
                client.check_server()
    finally:
        proxy.close()


def test_edge_folder_errors(tmp_path, deployment, server):
    with pytest.raises(EdgeClientError, match="not found"):
        EdgeClient(tmp_path / "missing", server.url)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgeClientError, match="missing edge_config.json"):
        EdgeClient(tmp_path / "empty", server.url)
    bare = tmp_path / "bare-model"
    bare.mkdir()
    shutil.copy(deployment / "config.json", bare / "config.json")
    with pytest.raises(EdgeClientError, match="export-edge"):
        EdgeClient(bare, server.url)
    with pytest.raises(EdgeClientError, match="is a file; give the edge folder"):
        EdgeClient(deployment / "config.json", server.url)


# A device without PyTorch or Transformers, emulated: any import of them fails as if they were not installed.
_WITHOUT_TORCH = WITHOUT_CLOUD_PACKAGES + textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from transformers_alignedvq.client import EdgeClient

    with EdgeClient(sys.argv[1], sys.argv[2], threads=1) as client:
        image = np.random.default_rng(5).integers(0, 256, (48, 48, 3), dtype=np.uint8)
        answer = client.ask(image, "what color is the shape ?")
        frame = client.encode(image, "what color is the shape ?")
    print(json.dumps({"answer": answer.text, "backend": client.edge.backend, "frame": frame.hex(),
                      "modules": sorted(sys.modules)}))
    """
)


def test_an_onnx_edge_answers_on_a_device_without_torch(deployment, server, edge_client, tmp_path):
    pytest.importorskip("onnxscript")
    onnx_dir = export_edge(deployment, tmp_path / "onnx-edge", format="onnx")
    assert sorted(p.name for p in onnx_dir.iterdir()) == ["edge_config.json", "edge_model.onnx"]
    out = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, str(onnx_dir), server.url],
                         capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["backend"] == "onnx"
    assert not {m.split(".")[0] for m in result["modules"]} & {"torch", "transformers"}
    image = np.random.default_rng(5).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    assert bytes.fromhex(result["frame"]) == edge_client.encode(image, QUESTION)  # the PyTorch edge's frame
    assert result["answer"] == edge_client.ask(image, QUESTION).text


# Last: by now the subprocess started by the autouse fixture has had the whole module to finish.
def test_edge_process_answers_without_server_or_language_model_code(isolated_edge_result, edge_client):
    assert isolated_edge_result["answer"] == edge_client.ask(
        np.random.default_rng(5).integers(0, 256, (48, 48, 3), dtype=np.uint8), QUESTION).text
    loaded = set(isolated_edge_result["modules"])
    assert not loaded & set(SERVER_MODULES + LM_MODULES)


def test_idle_connections_expire_before_the_server_closes_them(edge_dir, server):
    """A request sent on a keep-alive connection the server is closing at that moment fails mid-flight; the
    client drops idle connections before the server's keep-alive timeout would."""
    from transformers_alignedvq.client import KEEPALIVE_EXPIRY
    from transformers_alignedvq.serving.connection_limits import ConnectionLimits

    assert KEEPALIVE_EXPIRY < ConnectionLimits().keep_alive_timeout
    with EdgeClient(edge_dir, server.url) as client:
        assert client._http._transport._pool._keepalive_expiry == KEEPALIVE_EXPIRY


def test_ten_questions_about_one_image_send_its_indices_once(edge_dir, server):
    app = server.app
    questions = [f"what color is the shape {'?' * i}" for i in range(1, 11)]
    with EdgeClient(edge_dir, server.url, retry_window=0) as client:
        answers = client.ask_many(image(8), questions)
        frame = client.encode(image(8), questions[0])
        assert answers[0].bytes_sent == len(frame)
        # A follow-up: 13 bytes and the question (UTF-8: the tiny deployment has no entropy model).
        assert [a.bytes_sent for a in answers[1:]] == [13 + len(q.encode()) for q in questions[1:]]
        # The same answers as frames carrying each question.
        assert [a.text for a in answers] == [direct_answer(server, client.encode(image(8), q))["answer"]
                                             for q in questions]
        # ask() reuses the image too, and resends the frame once when the server dropped it.
        assert client.ask(image(8), questions[0]).bytes_sent == 13 + len(questions[0])
        app.state.image_cache._entries.clear()
        again = client.ask(image(8), questions[1])
        assert again.bytes_sent == len(client.encode(image(8), questions[1])) and again.text == answers[1].text
        assert client.ask(image(8), questions[2]).bytes_sent == 13 + len(questions[2])
    with EdgeClient(edge_dir, server.url, reuse_images=False) as plain:
        assert [a.bytes_sent for a in plain.ask_many(image(8), questions[:2])] == [
            len(plain.encode(image(8), q)) for q in questions[:2]]


def test_a_follow_up_for_an_unknown_image_is_a_clear_409(edge_dir, server):
    from transformers_alignedvq.wire_followup import encode_followup

    response = httpx.post(f"{server.url}/v1/answer", content=encode_followup(b"\x00" * 8, "what ?"),
                          headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 409 and response.json()["error"]["type"] == "image_not_cached"
    assert "send its frame again" in response.json()["error"]["message"]
