"""The OpenAI-compatible routes, asked by the official `openai` client over a real socket: the same greedy
answers as the binary route, streamed or not, from pixels or from a frame; OpenAI-shaped errors; same auth."""

from __future__ import annotations

import base64
import http.server
import io
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")

from test_server import OCTET, edge_indices, images, make_frame  # noqa: E402

from transformers_alignedvq.serving import BackgroundServer, create_app  # noqa: E402

KEY = "openai-test-key-" + "o" * 20
QUESTIONS = ["what color is the shape ?", "does the image contain a circle ?", "what shape is in the image ?"]


@pytest.fixture(scope="module")
def server(deployment):
    app = create_app(deployment, max_new_tokens=6, max_wait_ms=1, api_keys=[KEY], max_image_bytes=200_000,
                     max_image_pixels=300 * 300)
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def engine(server):
    return server.app.state.engine


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def user(image_part: dict, question: str | None) -> list[dict]:
    content = [image_part] + ([{"type": "text", "text": question}] if question is not None else [])
    return [{"role": "user", "content": content}]


def binary_answer(server, frame: bytes, query: str = "") -> str:
    response = httpx.post(f"{server.url}/v1/answer{query}", content=frame,
                          headers={**OCTET, "Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, response.text
    return response.json()["answer"]


def test_models_lists_the_served_model(client, deployment):
    assert [model.id for model in client.models.list().data] == [deployment.name]


def test_greedy_answers_from_pixels_equal_the_binary_routes(client, server, engine, deployment):
    for seed, question in enumerate(QUESTIONS):
        image = images(1, seed=seed + 10)[0]
        frame = make_frame(engine, edge_indices(engine, image), question)
        completion = client.chat.completions.create(
            model=deployment.name, temperature=0,
            messages=user({"type": "image_url", "image_url": {"url": data_url(image)}}, question))
        assert completion.choices[0].message.content == binary_answer(server, frame)
        usage = completion.usage
        assert usage.prompt_tokens == len(engine.input_ids(question))
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert completion.choices[0].finish_reason in ("stop", "length")


def test_a_frame_part_carries_indices_and_answers_the_same(client, server, engine, deployment):
    image, question = images(1, seed=21)[0], QUESTIONS[0]
    frame = make_frame(engine, edge_indices(engine, image), question)
    part = {"type": "alignedvq_frame", "alignedvq_frame": {"data": base64.b64encode(frame).decode()}}
    expected = binary_answer(server, frame)
    for text in (question, None):  # without text the frame's own prompt is the question
        completion = client.chat.completions.create(model=deployment.name, messages=user(part, text))
        assert completion.choices[0].message.content == expected
        assert completion.model_extra["alignedvq"]["image_bytes_received"] == len(frame)


def test_streaming_chunks_add_up_and_carry_usage(client, server, engine, deployment):
    image, question = images(1, seed=30)[0], QUESTIONS[1]
    messages = user({"type": "image_url", "image_url": {"url": data_url(image, "JPEG")}}, question)
    whole = client.chat.completions.create(model=deployment.name, messages=messages)
    chunks = list(client.chat.completions.create(model=deployment.name, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text.strip() == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_sampling_parameters_match_the_binary_route(client, server, engine, deployment):
    image, question = images(1, seed=40)[0], QUESTIONS[2]
    frame = make_frame(engine, edge_indices(engine, image), question)
    part = {"type": "alignedvq_frame", "alignedvq_frame": {"data": base64.b64encode(frame).decode()}}
    options = dict(temperature=1.5, top_p=0.9, seed=11, max_tokens=4)
    sampled = client.chat.completions.create(model=deployment.name, messages=user(part, question), **options)
    expected = binary_answer(server, frame, "?temperature=1.5&top_p=0.9&seed=11&max_new_tokens=4")
    assert sampled.choices[0].message.content == expected and sampled.usage.completion_tokens <= 4


def test_errors_are_openai_shaped(client, server, deployment):
    image_part = {"type": "image_url", "image_url": {"url": data_url(images(1)[0])}}
    create = client.chat.completions.create
    cases = [
        (openai.NotFoundError, "model_not_found", dict(model="gpt-4o", messages=user(image_part, "q"))),
        (openai.BadRequestError, "invalid_request", dict(model=deployment.name, messages=user(
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "q"))),
        (openai.BadRequestError, "invalid_request", dict(model=deployment.name, messages=user(
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, "q"))),
        (openai.UnprocessableEntityError, "invalid_question", dict(model=deployment.name, messages=[
            {"role": "user", "content": "no image here"}])),
        (openai.UnprocessableEntityError, "invalid_parameter", dict(model=deployment.name, max_tokens=99,
                                                                   messages=user(image_part, "q"))),
        (openai.BadRequestError, "invalid_request", dict(model=deployment.name, stop=["."],
                                                         messages=user(image_part, "q"))),
        (openai.BadRequestError, "malformed_frame", dict(model=deployment.name, messages=user(
            {"type": "alignedvq_frame", "alignedvq_frame": {"data": base64.b64encode(b"AV junk").decode()}}, "q"))),
    ]
    for error, code, kwargs in cases:
        with pytest.raises(error) as caught:
            create(**kwargs)
        body = caught.value.body
        assert body["code"] == code and body["message"] and "type" in body, body
    big = Image.fromarray(np.zeros((400, 400, 3), dtype=np.uint8))
    with pytest.raises(openai.APIStatusError) as caught:
        create(model=deployment.name, messages=user({"type": "image_url", "image_url": {"url": data_url(big)}}, "q"))
    assert caught.value.status_code == 413 and "pixels" in caught.value.body["message"]
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (290, 290, 3), dtype=np.uint8))
    with pytest.raises(openai.APIStatusError) as caught:
        create(model=deployment.name, messages=user({"type": "image_url", "image_url": {"url": data_url(noise)}}, "q"))
    assert caught.value.status_code == 413 and "200000 bytes" in caught.value.body["message"]
    anonymous = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong-key-" + "w" * 20, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.chat.completions.create(model=deployment.name, messages=user(image_part, "q"))


def test_remote_images_only_where_allowed(deployment, tmp_path):
    image = images(1, seed=50)[0]
    image.save(tmp_path / "photo.png")
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(tmp_path))  # noqa: E731
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as files:
        threading.Thread(target=files.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{files.server_address[1]}/photo.png"
        app = create_app(deployment, max_new_tokens=4, allow_remote_images=True)
        with BackgroundServer(app) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
            remote = client.chat.completions.create(model=deployment.name, messages=user(
                {"type": "image_url", "image_url": {"url": url}}, QUESTIONS[0]))
            inline = client.chat.completions.create(model=deployment.name, messages=user(
                {"type": "image_url", "image_url": {"url": data_url(image)}}, QUESTIONS[0]))
        files.shutdown()
    assert remote.choices[0].message.content == inline.choices[0].message.content


def test_conversations_use_the_chat_template(client, engine, deployment):
    image_part = {"type": "image_url", "image_url": {"url": data_url(images(1, seed=60)[0])}}
    messages = [{"role": "user", "content": [image_part, {"type": "text", "text": QUESTIONS[0]}]},
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": QUESTIONS[2]}]
    completion = client.chat.completions.create(model=deployment.name, messages=messages)
    converted = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTIONS[0]}]},
                 {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
                 {"role": "user", "content": [{"type": "text", "text": QUESTIONS[2]}]}]
    prompt = engine.processor.apply_chat_template(converted, add_generation_prompt=True)
    expected = engine.processor(images=images(1)[0], text=prompt, return_tensors="pt")["input_ids"][0].tolist()
    assert engine.chat_input_ids(converted) == expected
    assert completion.usage.prompt_tokens == len(expected) and completion.choices[0].message.content


def test_chat_requests_are_counted_in_the_metrics(client, server, deployment):
    from test_server_metrics import scrape, value

    headers = {"Authorization": f"Bearer {KEY}"}
    before = scrape(server.url, headers=headers)
    image_part = {"type": "image_url", "image_url": {"url": data_url(images(1, seed=61)[0])}}
    list(client.chat.completions.create(model=deployment.name, messages=user(image_part, QUESTIONS[0]), stream=True))
    after = scrape(server.url, headers=headers)
    route = "/v1/chat/completions"
    assert value(after, "alignedvq_requests_total", route=route, status="200") - \
        value(before, "alignedvq_requests_total", route=route, status="200") == 1
    assert value(after, "alignedvq_time_to_first_token_seconds_count", route=route) - \
        value(before, "alignedvq_time_to_first_token_seconds_count", route=route) == 1
    assert value(after, "alignedvq_generated_tokens_total") > value(before, "alignedvq_generated_tokens_total")


def test_malformed_chat_requests_get_4xx_never_5xx(server, deployment):
    good_image = {"type": "image_url", "image_url": {"url": data_url(images(1)[0])}}
    name = deployment.name
    bodies = [
        [], "text", {"model": name}, {"model": name, "messages": {}}, {"model": name, "messages": [1]},
        {"model": name, "messages": [{"role": "tool", "content": "x"}]},
        {"model": name, "messages": [{"role": "user", "content": [{"type": "image_url"}, {"type": "text"}]}]},
        {"model": name, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}]},
        {"model": name, "messages": [{"role": "user", "content": [good_image, good_image, {"type": "text",
                                                                                          "text": "q"}]}]},
        {"model": name, "messages": [{"role": "assistant", "content": [good_image]}]},
        {"model": name, "messages": [{"role": "user", "content": [good_image]}]},
        {"model": name, "messages": user(good_image, "q"), "temperature": "hot"},
        {"model": name, "messages": user(good_image, "q"), "temperature": 9},
        {"model": name, "messages": user(good_image, "q"), "seed": -1},
        {"model": name, "messages": user(good_image, "q"), "top_p": True},
        {"model": name, "messages": user(good_image, "q"), "max_tokens": 0},
        {"model": name, "messages": user(good_image, "q"), "n": 2},
        {"model": name, "messages": user(good_image, "q"), "stream": "yes"},
        {"model": name, "messages": user(good_image, "<image> what ?")},
        {"model": name, "messages": user({"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}},
                                         "q")},
        {"model": name, "messages": user({"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}},
                                         "q")},
        {"model": name, "messages": user({"type": "alignedvq_frame", "alignedvq_frame": "x"}, "q")},
        {"model": name, "messages": user({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, "q")},
    ]
    headers = {"Authorization": f"Bearer {KEY}"}
    for body in bodies:
        response = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers)
        assert 400 <= response.status_code < 500, (body, response.text)
        error = response.json()["error"]
        assert error["message"] and error["code"], body
    for content, media in ((b"{", "application/json"), (b"{}", "text/plain")):
        response = httpx.post(f"{server.url}/v1/chat/completions", content=content,
                              headers={**headers, "Content-Type": media})
        assert response.status_code in (400, 415), response.text
