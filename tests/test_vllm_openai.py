"""`alignedvq serve --engine vllm` as deployed: a separate process with the default memory settings, started
while another process holds memory, asked by the official `openai` client about images (a data URL and the
alignedvq frame part, streamed and not). Its greedy answers must equal its own binary route's and those of the
Transformers engine asked the same ways.

Runs only where vLLM and openai import (.ci/run's vLLM venv). One vLLM server serves the whole module: it starts
in a minute or two on a CPU.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")

import transformers_alignedvq  # noqa: E402
from tests.serving_helpers import OCTET, descendants, make_frame  # noqa: E402
from transformers_alignedvq.demo import demo_samples  # noqa: E402
from transformers_alignedvq.serving import BackgroundServer, create_app  # noqa: E402

MODEL = getattr(transformers_alignedvq, "TINY_EASYVQA", None)
pytestmark = pytest.mark.bundled_model
START_TIMEOUT_S = 600  # two shared CPU cores: about 80 s
# vLLM's own default reserves this fraction of the machine's memory and refuses to start with less available.
VLLM_DEFAULT_MEMORY_FRACTION = 0.92
HOLD_AT_LEAST = 3 * 2**30

# Allocates and touches N bytes, says so, then holds them until its stdin closes (so it ends with the test).
_HOLDER = ("import sys; n = int(sys.argv[1]); held = bytearray(n); held[::4096] = b'\\1' * len(range(0, n, 4096)); "
           "print('held', flush=True); sys.stdin.read()")


def meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in bytes."""
    fields = (line.split() for line in Path("/proc/meminfo").read_text().splitlines())
    return {parts[0].rstrip(":"): int(parts[1]) * 1024 for parts in fields if len(parts) >= 2}


@pytest.fixture(scope="module")
def memory_holder():
    """Another job on the machine: a process holding enough memory that vLLM's default fraction is not free
    (3 GiB at least)."""
    if not Path("/proc/meminfo").exists():
        pytest.skip("needs /proc/meminfo (Linux)")
    info = meminfo()
    size = max(HOLD_AT_LEAST, int(info["MemAvailable"] - 0.85 * info["MemTotal"]))
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(size)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held", "the memory holder did not start"
    yield size
    holder.stdin.close()
    holder.wait(30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until_up(process: subprocess.Popen, url: str, log: Path) -> float:
    start = time.monotonic()
    while time.monotonic() - start < START_TIMEOUT_S:
        if process.poll() is not None:
            pytest.fail(f"serve --engine vllm exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"serve --engine vllm did not answer within {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def vllm_server(memory_holder, tmp_path_factory):
    """``(process, url, log)`` of ``alignedvq serve --engine vllm`` with no memory flag, the holder running."""
    port, log = free_port(), tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    command = [sys.executable, "-m", "transformers_alignedvq.cli", "serve", "--engine", "vllm", "--port", str(port)]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(process, url, log)
        yield process, url, log
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(120)
            except subprocess.TimeoutExpired:
                for pid in [*descendants(process.pid), process.pid]:
                    os.kill(pid, signal.SIGKILL)
                process.wait(30)


@pytest.fixture(scope="module")
def hf_server():
    with BackgroundServer(create_app(MODEL)) as running:
        yield running


@pytest.fixture(scope="module")
def samples(hf_server):
    """``(question, data URL of the image, the image's frame with the question)`` for real easy-VQA images,
    the frames encoded by the bundled model's edge."""
    engine = hf_server.app.state.engine
    rows = []
    for row in demo_samples(images=4, questions_per_image=2):
        buffer = io.BytesIO()
        row["image"].save(buffer, format="PNG")
        url = f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"
        pixels = engine.processor.image_processor(images=row["image"], return_tensors="pt")["pixel_values"]
        frame = make_frame(engine, engine.model.encode_edge(pixels)[0].numpy(), row["question"], grid=(8, 8))
        rows.append((row["question"], url, frame))
    return rows


def chat(client, model: str, content: list[dict], stream: bool) -> tuple[str, int, str]:
    """``(answer, completion tokens, finish reason)`` of one greedy chat completion about ``content``."""
    messages = [{"role": "user", "content": content}]
    if not stream:
        completion = client.chat.completions.create(model=model, messages=messages, temperature=0)
        choice = completion.choices[0]
        return choice.message.content, completion.usage.completion_tokens, choice.finish_reason
    chunks = list(client.chat.completions.create(model=model, messages=messages, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and chunks[-1].usage is not None, chunks
    return text, chunks[-1].usage.completion_tokens, finish[0]


def answers(url: str, samples) -> dict[str, list]:
    """Each way of asking -> the answers to ``samples``: the binary route, then the chat route with a data URL
    or a frame part, streamed or not."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    found: dict[str, list] = {}
    for question, image_url, frame in samples:
        response = httpx.post(f"{url}/v1/answer", content=frame, headers=OCTET, timeout=300)
        assert response.status_code == 200, response.text
        body = response.json()
        found.setdefault("binary", []).append((body["answer"], body["generated_tokens"], "stop"))
        parts = {"data_url": {"type": "image_url", "image_url": {"url": image_url}},
                 "frame": {"type": "alignedvq_frame", "alignedvq_frame": {"data": base64.b64encode(frame).decode()}}}
        for name, part in parts.items():
            for stream in (False, True):
                content = [part, {"type": "text", "text": question}]
                found.setdefault(f"chat {name}{' stream' if stream else ''}", []).append(
                    chat(client, model, content, stream))
    return found


def scrape(url: str) -> dict[tuple, float]:
    """``(sample name, sorted labels) -> value`` of the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200, response.text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def test_serve_starts_with_default_memory_flags_beside_other_jobs(vllm_server, memory_holder):
    _, url, _ = vllm_server
    info = meminfo()
    # What vLLM's own default would have refused: less than its fraction of the machine's memory available.
    assert info["MemAvailable"] < VLLM_DEFAULT_MEMORY_FRACTION * info["MemTotal"], (memory_holder, info)
    assert httpx.get(f"{url}/v1/model").json()["engine"] == "vllm"


def test_openai_client_gets_the_binary_routes_greedy_answers_on_both_engines(vllm_server, hf_server, samples):
    expected = answers(hf_server.url, samples)
    assert len({answer for answer, _, _ in expected["binary"]}) > 2  # real answers, not one reply to everything
    for way, found in expected.items():
        assert found == expected["binary"], f"Transformers engine, {way}"
    found = answers(vllm_server[1], samples)
    for way, answered in found.items():
        assert answered == expected["binary"], f"vLLM engine, {way}"
    # Prometheus counted them: 4 chat completions per sample, 2 of them streamed; every answer's tokens.
    metrics = scrape(vllm_server[1])
    assert metrics[("alignedvq_requests_total", (("route", "/v1/chat/completions"), ("status", "200")))] == \
        4 * len(samples)
    chat_route = (("route", "/v1/chat/completions"),)
    assert metrics[("alignedvq_time_to_first_token_seconds_count", chat_route)] == 2 * len(samples)
    assert metrics[("alignedvq_generated_tokens_total", ())] == sum(n for way in found.values() for _, n, _ in way)


def test_conversations_and_seeded_sampling_agree_across_engines(vllm_server, hf_server, samples):
    """A system message and an earlier turn go through the chat template the same way on both engines; a
    seeded sampled answer repeats."""
    found = {}
    for name, url in (("vllm", vllm_server[1]), ("transformers", hf_server.url)):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        model = client.models.list().data[0].id
        replies = []
        for question, image_url, _ in samples[:4]:
            messages = [{"role": "system", "content": "answer in one word"},
                        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                     {"type": "text", "text": question}]},
                        {"role": "assistant", "content": "i am not sure"},
                        {"role": "user", "content": question}]
            completion = client.chat.completions.create(model=model, messages=messages, temperature=0)
            replies.append(completion.choices[0].message.content)
        found[name] = replies
        content = [{"type": "image_url", "image_url": {"url": samples[0][1]}}, {"type": "text", "text": samples[0][0]}]
        sampled = [client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                                  temperature=2, seed=seed, max_tokens=8).choices[0].message.content
                   for seed in (1, 2, 3, 1, 2, 3)]
        assert sampled[:3] == sampled[3:], (name, sampled)
    assert found["vllm"] == found["transformers"] and all(found["vllm"]), found


def test_a_question_beyond_vllms_context_is_a_413(vllm_server, samples):
    client = openai.OpenAI(base_url=f"{vllm_server[1]}/v1", api_key="unused", max_retries=0, timeout=300)
    question, image_url, _ = samples[0]
    long = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": "what " * 400 + "?"}]
    with pytest.raises(openai.APIStatusError) as error:
        chat(client, client.models.list().data[0].id, long, stream=False)
    assert error.value.status_code == 413 and error.value.body["code"] == "payload_too_large", error.value.body
    assert httpx.get(f"{vllm_server[1]}/healthz").json()["consecutive_failures"] == 0


# Last in this module: it stops the module's server.
def test_sigterm_stops_the_server_and_vllms_processes(vllm_server):
    process, _, log = vllm_server
    children = descendants(process.pid)
    assert any(name.startswith("VLLM::") for name in children.values()), children
    process.send_signal(signal.SIGTERM)
    assert process.wait(120) is not None
    deadline = time.monotonic() + 60
    while alive := [pid for pid in children if running(pid)]:
        assert time.monotonic() < deadline, f"still running: {alive}\n{log.read_text()[-2000:]}"
        time.sleep(0.5)
