"""The request-error family (`serving.errors`): engines raise domain errors, never HTTP ones, and both routes
answer them as 4xx JSON (the binary route's shape, the OpenAI shape on the chat route)."""

from __future__ import annotations

import base64

import pytest
from fastapi.testclient import TestClient

from tests.serving_helpers import OCTET, assert_error, make_frame
from transformers_alignedvq.errors import WireFormatError
from transformers_alignedvq.serving import create_app
from transformers_alignedvq.serving.errors import ApiError, InvalidQuestionError, RequestError, as_api_error
from transformers_alignedvq.testing import save_tiny_deployment

PLACEHOLDER_QUESTION = "what <image> is it ?"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    deployment = save_tiny_deployment(tmp_path_factory.mktemp("serving-errors") / "tiny")
    return create_app(deployment, max_new_tokens=2, max_wait_ms=0, served_model_name="tiny")


def test_domain_errors_map_to_their_http_answer():
    cases = [
        (InvalidQuestionError("blank"), 422, "invalid_question"),
        (RequestError("odd"), 400, "bad_request"),
        (WireFormatError("codebook fingerprint mismatch: frame ab, model cd"), 409, "codebook_mismatch"),
        (WireFormatError("bad magic"), 400, "malformed_frame"),
    ]
    for error, status, type_ in cases:
        answer = as_api_error(error)
        assert (answer.status, answer.type, answer.message) == (status, type_, str(error))
    same = ApiError(503, "overloaded", "full")
    assert as_api_error(same) is same
    assert as_api_error(RuntimeError("CUDA out of memory")) is None  # a bug or the model: a 500, text in the log


def test_the_engine_raises_a_domain_error_not_an_http_one(app):
    with pytest.raises(InvalidQuestionError, match="image placeholder") as caught:
        app.state.engine.input_ids(PLACEHOLDER_QUESTION)
    assert not isinstance(caught.value, ApiError)


def test_both_routes_answer_the_engines_error_as_422(app):
    engine = app.state.engine
    frame = make_frame(engine, question=PLACEHOLDER_QUESTION)
    with TestClient(app) as client:
        assert_error(client.post("/v1/answer", content=frame, headers=OCTET), 422, "invalid_question", "placeholder")
        part = {"type": "alignedvq_frame", "alignedvq_frame": {"data": base64.b64encode(make_frame(engine)).decode()}}
        chat = client.post("/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": [part, {"type": "text",
                                                                             "text": PLACEHOLDER_QUESTION}]}]})
    assert chat.status_code == 422, chat.text
    error = chat.json()["error"]
    assert (error["code"], error["type"]) == ("invalid_question", "invalid_request_error")
    assert "placeholder" in error["message"]
