"""Cloud server (`transformers_alignedvq.serving`) through FastAPI's TestClient, on a tiny saved deployment."""

from __future__ import annotations

import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from tests.serving_helpers import OCTET, assert_error, make_frame, post_to, sse_events, streamed
from transformers_alignedvq import wire
from transformers_alignedvq.serving import create_app
from transformers_alignedvq.testing import IMAGE_SIZE

QUESTIONS = ["what color is the shape ?", "does the image contain a circle ?", "what shape is in the image ?",
             "is there a red triangle in the picture ?", "what ?"]


@pytest.fixture(scope="module")
def app(deployment):
    return create_app(deployment, max_new_tokens=6, max_batch_size=8, max_wait_ms=1)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def engine(app):
    return app.state.engine


def images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    shape = (IMAGE_SIZE + 8, IMAGE_SIZE + 8, 3)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for _ in range(count)]


def edge_indices(engine, image: Image.Image) -> np.ndarray:
    pixels = engine.processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
    return engine.model.encode_edge(pixels)[0].numpy()


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def post(client, body, headers=OCTET):
    return client.post("/v1/answer", content=body, headers=headers)


# ---------------------------------------------------------------------------------------------------------
def test_health_and_model_info(client, engine):
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    info = client.get("/v1/model").json()
    config = engine.config
    assert info["codebook_fingerprint"] == engine.model.codebook_fingerprint().hex()
    assert (info["split_layer"], info["split_site"]) == (config.split_layer, config.split_site)
    assert info["codebook_size"] == 12 and info["bits_per_index"] == 4
    assert info["num_tokens"] == config.num_image_tokens == 17 and info["grid"] == [4, 4]
    assert info["frame_bytes"] == len(make_frame(engine, question=None))
    assert info["max_body_bytes"] >= len(make_frame(engine, question="x" * info["max_prompt_bytes"]))


def test_prompt_tokens_match_the_llava_processor(engine):
    question = QUESTIONS[0]
    prompt = engine.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True,
    )
    expected = engine.processor(images=images(1)[0], text=prompt, return_tensors="pt")["input_ids"][0].tolist()
    assert engine.input_ids(question) == expected


def test_good_frame_is_answered_like_the_full_model(client, engine):
    image, question = images(1, seed=3)[0], QUESTIONS[1]
    body = make_frame(engine, edge_indices(engine, image), question)
    response = post(client, body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["bytes_received"] == len(body)
    assert set(result["timing_ms"]) == {"receive_body", "decode_frame", "queue", "generate", "total"}
    assert all(value >= 0 for value in result["timing_ms"].values())
    assert result["timing_ms"]["total"] >= result["timing_ms"]["generate"]

    # The same question asked of the whole model from pixels, as an ordinary LLaVA pipeline would.
    processor, model = engine.processor, engine.model
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    new = new[: new.index(2)] if 2 in new else new  # eos
    assert result["answer"] == processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    assert result["generated_tokens"] == len(new)


def test_batched_answers_equal_unbatched(deployment, engine):
    pairs = list(zip(images(len(QUESTIONS), seed=7), QUESTIONS))
    bodies = [make_frame(engine, edge_indices(engine, image), question) for image, question in pairs]

    unbatched_app = create_app(deployment, max_new_tokens=6, max_batch_size=1, max_wait_ms=0)
    with TestClient(unbatched_app) as single:
        alone = [post(single, body).json() for body in bodies]
    assert {r["batch_size"] for r in alone} == {1}

    # A long wait and a batch size equal to the number of requests: the worker fires once all are queued.
    batched_app = create_app(deployment, max_new_tokens=6, max_batch_size=len(bodies), max_wait_ms=10_000)
    with TestClient(batched_app) as batched, ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda body: post(batched, body).json(), bodies))
    assert {r["batch_size"] for r in together} == {len(bodies)}
    assert batched_app.state.batcher.batches == 1

    assert [r["answer"] for r in together] == [r["answer"] for r in alone]
    assert [r["generated_tokens"] for r in together] == [r["generated_tokens"] for r in alone]
    # Otherwise a row mix-up inside the batch would go unnoticed.
    assert len({r["answer"] for r in alone}) > 1


# ---------------------------------------------------------------------------------------------------------
def _bad_requests(engine, max_body_bytes: int) -> dict[str, tuple[bytes, dict, int, str, str]]:
    """name -> (body, headers, status, error type, message fragment)."""
    good = make_frame(engine)
    payload = len(good) - 4 - wire.raw_payload_bytes(17, codebook_size=12)  # the payload follows the question
    flipped = bytearray(good)
    flipped[payload] ^= 0xFF  # first payload byte, CRC left stale
    # Token 0 = 15 >= K = 12 with a correct CRC: only the range check can catch it.
    out_of_range = bytearray(good[:-4])
    out_of_range[payload] = 0xF0 | (out_of_range[payload] & 0x0F)
    other_fingerprint = bytes(16)
    return {
        "empty body": (b"", OCTET, 400, "empty_body", "empty"),
        "truncated": (good[:-5], OCTET, 400, "malformed_frame", "truncated"),
        "header only": (good[:10], OCTET, 400, "malformed_frame", "truncated"),
        "bad magic": (b"XXXX" + good[4:], OCTET, 400, "malformed_frame", "magic"),
        "not a frame": (b"GET / HTTP/1.1\r\n\r\n" * 3, OCTET, 400, "malformed_frame", "magic"),
        "bad crc": (bytes(flipped), OCTET, 400, "malformed_frame", "CRC-32 mismatch"),
        "trailing bytes": (good + b"\0", OCTET, 400, "malformed_frame", "trailing"),
        "future version": (with_crc(good[:2] + b"\x03" + good[3:-4]), OCTET, 400, "malformed_frame", "version"),
        "wrong fingerprint": (make_frame(engine, codebook_fingerprint=other_fingerprint), OCTET, 409,
                              "codebook_mismatch", "fingerprint mismatch"),
        "wrong token count": (make_frame(engine, np.zeros(10, dtype=np.int64), grid=None, has_cls_token=False),
                              OCTET, 422, "incompatible_frame", "token count mismatch"),
        "wrong codebook size": (make_frame(engine, codebook_size=16), OCTET, 422, "incompatible_frame",
                                "codebook size mismatch"),
        "wrong codes per token": (make_frame(engine, np.zeros((17, 2), dtype=np.int64)), OCTET, 422,
                                  "incompatible_frame", "codes per token"),
        "index out of range": (with_crc(bytes(out_of_range)), OCTET, 422, "incompatible_frame", "out of range"),
        "no question": (make_frame(engine, question=None), OCTET, 422, "invalid_question", "no question"),
        "blank question": (make_frame(engine, question="   "), OCTET, 422, "invalid_question", "no question"),
        "image placeholder in question": (make_frame(engine, question="what <image> is it ?"), OCTET, 422,
                                          "invalid_question", "placeholder"),
        "wrong content type": (good, {"Content-Type": "text/plain"}, 415, "unsupported_media_type", "text/plain"),
        "json content type": (good, {"Content-Type": "application/json"}, 415, "unsupported_media_type", ""),
        "no content type": (good, {}, 415, "unsupported_media_type", "(none)"),
        "compressed": (zlib.compress(good), {**OCTET, "Content-Encoding": "gzip"}, 415, "unsupported_media_type",
                       "gzip"),
        "oversized": (good + bytes(max_body_bytes), OCTET, 413, "payload_too_large", "limit"),
        "question over the limit": (make_frame(engine, question="a" * (max_body_bytes - 32)), OCTET, 413,
                                    "payload_too_large", ""),
    }


@pytest.mark.parametrize(
    "case",
    ["empty body", "truncated", "header only", "bad magic", "not a frame", "bad crc", "trailing bytes",
     "future version", "wrong fingerprint", "wrong token count", "wrong codebook size", "wrong codes per token",
     "index out of range",
     "no question", "blank question", "image placeholder in question", "wrong content type", "json content type",
     "no content type", "compressed", "oversized", "question over the limit"],
)
def test_bad_request_gets_documented_error(client, app, engine, case):
    body, headers, status, type_, fragment = _bad_requests(engine, app.state.max_body_bytes)[case]
    assert_error(post(client, body, headers), status, type_, fragment)


def test_chunked_oversized_upload_is_cut_off(client, app):
    chunk = b"A" * 1024
    count = app.state.max_body_bytes // len(chunk) + 2
    response = client.post("/v1/answer", content=iter([chunk] * count), headers=OCTET)  # no Content-Length
    assert_error(response, 413, "payload_too_large", "limit")


def test_routes_and_methods_answer_json_errors(client):
    assert_error(client.get("/v1/answer"), 405, "method_not_allowed")
    assert_error(client.get("/nothing-here"), 404, "not_found")


def test_random_corruption_never_crashes_the_server(client, engine):
    # TestClient re-raises server exceptions, so a 500 (a bug) fails here loudly.
    rng = np.random.default_rng(0)
    good = make_frame(engine)
    for trial in range(60):
        data = bytearray(good)
        if trial % 3 == 0:
            data = data[: rng.integers(0, len(data))]
        else:
            for _ in range(rng.integers(1, 4)):
                data[rng.integers(0, len(data))] = rng.integers(0, 256)
            if trial % 3 == 2:  # a valid CRC, so the checks behind it are reached
                data = bytearray(with_crc(bytes(data[:-4])))
        response = post(client, bytes(data))
        assert response.status_code in (200, 400, 409, 413, 422), (trial, response.text)
        if response.status_code != 200:
            assert set(response.json()["error"]) == {"type", "message"}


def test_full_queue_answers_503_with_retry_after(deployment):
    app = create_app(deployment, max_new_tokens=2, max_batch_size=1, max_wait_ms=0, max_queue=1, warmup=False)
    batcher = app.state.batcher
    entered, release = threading.Event(), threading.Event()
    run_batch = batcher.run_batch

    def blocking_run_batch(jobs):
        entered.set()
        assert release.wait(30), "test never released the worker"
        return run_batch(jobs)

    batcher.run_batch = blocking_run_batch
    engine = app.state.engine
    body = make_frame(engine)
    with TestClient(app) as client, ThreadPoolExecutor(2) as pool:
        try:
            first = pool.submit(post, client, body)  # taken by the worker, which then blocks
            assert entered.wait(30)
            second = pool.submit(post, client, body)  # fills the one queue slot
            deadline = time.monotonic() + 30
            while batcher.queue_depth() < 1:
                assert time.monotonic() < deadline, "second request never queued"
                time.sleep(0.005)
            refused = post(client, body)
            assert_error(refused, 503, "overloaded", "queue is full")
            assert int(refused.headers["Retry-After"]) >= 1
            assert client.get("/healthz").json()["queue_depth"] == 1  # the event loop still answers
        finally:
            release.set()
        assert first.result(30).status_code == 200
        assert second.result(30).status_code == 200
        assert post(client, body).status_code == 200


def test_still_answers_after_every_bad_request(client, app, engine):
    before = client.get("/healthz").json()["requests"]
    for body, headers, status, _, _ in _bad_requests(engine, app.state.max_body_bytes).values():
        assert post(client, body, headers).status_code == status
    response = post(client, make_frame(engine, question=QUESTIONS[2]))
    assert response.status_code == 200 and isinstance(response.json()["answer"], str)
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["requests"] == before + 1  # only the good one reached the model


# ---------------------------------------------------------------------------------------------------------
# sampling and streaming
def sampled_bodies(engine, count: int = 5) -> list[bytes]:
    return [make_frame(engine, edge_indices(engine, image), question)
            for image, question in zip(images(count, seed=11), QUESTIONS)]


@pytest.mark.parametrize("query", ["temperature=-1", "temperature=nan", "top_p=0", "max_new_tokens=7",
                                   "max_new_tokens=0", "seed=-3", "stream=maybe", "temprature=1",
                                   "temperature=1&temperature=2"])
def test_bad_sampling_parameters_get_422_before_the_body_is_read(client, engine, query):
    response = client.post(f"/v1/answer?{query}", content=make_frame(engine), headers=OCTET)
    assert_error(response, 422, "invalid_parameter")
    assert response.headers["connection"] == "close"


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(deployment, client, engine):
    bodies = sampled_bodies(engine)
    query = "?temperature=1.5&seed={}"
    first = [post_to(client, body, query.format(i))["answer"] for i, body in enumerate(bodies)]
    again = [post_to(client, body, query.format(i))["answer"] for i, body in enumerate(bodies)]
    batched_app = create_app(deployment, max_new_tokens=6, max_batch_size=len(bodies), max_wait_ms=10_000)
    with TestClient(batched_app) as batched, ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda i: post_to(batched, bodies[i], query.format(i)), range(len(bodies))))
    assert {r["batch_size"] for r in together} == {len(bodies)}
    assert first == again == [r["answer"] for r in together]
    greedy = [post_to(client, body)["answer"] for body in bodies]
    other_seeds = [post_to(client, body, query.format(100 + i))["answer"] for i, body in enumerate(bodies)]
    assert first != greedy and first != other_seeds  # it does sample, and the seed matters


def test_one_batch_keeps_each_requests_own_options(deployment, client, engine):
    bodies = sampled_bodies(engine, 3)
    queries = ["", "?max_new_tokens=2", "?temperature=1&seed=5&max_new_tokens=4"]
    alone = [post_to(client, body, query) for body, query in zip(bodies, queries)]
    app = create_app(deployment, max_new_tokens=6, max_batch_size=3, max_wait_ms=10_000)
    with TestClient(app) as batched, ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda pair: post_to(batched, *pair), zip(bodies, queries)))
    assert {r["batch_size"] for r in together} == {3}
    assert [r["answer"] for r in together] == [r["answer"] for r in alone]
    assert [r["generated_tokens"] for r in together] == [r["generated_tokens"] for r in alone]
    assert together[1]["generated_tokens"] <= 2 and together[2]["generated_tokens"] <= 4


def test_streamed_deltas_add_up_to_the_answer(client, engine):
    for body in sampled_bodies(engine):
        plain = post_to(client, body)
        text, done, deltas = streamed(client, body)
        assert text == done["answer"] == plain["answer"]
        assert done["generated_tokens"] == plain["generated_tokens"] and set(done["timing_ms"]) == set(plain["timing_ms"])
        assert all(deltas)
    sampled = sampled_bodies(engine, 1)[0]
    assert streamed(client, sampled, "&temperature=1&seed=9")[0] == post_to(client, sampled, "?temperature=1&seed=9")[
        "answer"]


def test_a_stream_reports_a_failing_model_as_an_error_event(deployment, engine):
    app = create_app(deployment, max_new_tokens=2, max_wait_ms=0, warmup=False)

    def broken(jobs):
        raise RuntimeError(f"device-side assert in {deployment}")

    app.state.batcher.run_batch = broken
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/v1/answer?stream=true", content=make_frame(engine), headers=OCTET)
    assert response.status_code == 200 and str(deployment) not in response.text
    assert sse_events(response) == [("error", {"error": {"type": "internal_error",
                                                         "message": "the model failed on this request; see the "
                                                                    "server log"}})]


# ---------------------------------------------------------------------------------------------------------
def test_unknown_engine_is_a_start_up_error(deployment):
    from transformers_alignedvq.errors import ServerConfigError

    with pytest.raises(ServerConfigError, match="engine='nope' must be one of transformers, vllm"):
        create_app(deployment, engine="nope")


def test_vllm_engine_without_vllm_says_what_to_install(deployment):
    import importlib.util

    from transformers_alignedvq.errors import ServerConfigError

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here (tests/test_vllm_engine.py runs it)")
    with pytest.raises(ServerConfigError, match="pip install vllm"):
        create_app(deployment, engine="vllm")


def test_model_info_names_the_engine(client):
    assert client.get("/v1/model").json()["engine"] == "transformers"
