"""The entropy model of coded frames (`transformers_alignedvq.entropy`): fitting, storage, identity, the
question model, and the bounds the decoder keeps whatever the payload says."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.wire_data import QUESTIONS, blocky_images, small_model
from transformers_alignedvq.entropy import (
    ENTROPY_MODEL_NAME,
    MAX_CODED_PROMPT_BYTES,
    EntropyModel,
    load_entropy_model,
    split_pieces,
)
from transformers_alignedvq.errors import CheckpointMismatchError, WireFormatError

pytest.importorskip("constriction")
MODEL = small_model()
MODEL_ARRAYS = MODEL.to_arrays()


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60))
def test_pieces_put_back_together_give_the_text(text):
    assert "".join(split_pieces(text)) == text


def test_pieces_are_words_with_their_space_and_marks():
    assert split_pieces("what color is  the shape?\n") == ["what", " color", " is", " ", " the", " shape", "?", "\n"]


def test_fit_save_load_keeps_the_model_and_its_id(tmp_path):
    path = MODEL.save(tmp_path)
    assert path.name == ENTROPY_MODEL_NAME
    loaded = load_entropy_model(tmp_path)
    assert loaded.model_id == MODEL.model_id and len(MODEL.model_id) == 4
    assert (loaded.codebook_size, loaded.grid, loaded.has_cls_token, loaded.num_tokens) == (64, (6, 6), True, 37)
    image = blocky_images(1, seed=5)[0]
    assert loaded.encode_payload(image, "q") == MODEL.encode_payload(image, "q")  # deterministic, same tables
    assert load_entropy_model(tmp_path / "missing") is None
    refit = EntropyModel.fit(blocky_images(200), codebook_size=64, grid=(6, 6), has_cls_token=True,
                             questions=QUESTIONS, smoothing=0.25)
    assert refit.model_id != MODEL.model_id


def test_corrupt_file_is_a_checkpoint_error(tmp_path):
    path = MODEL.save(tmp_path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointMismatchError, match=ENTROPY_MODEL_NAME):
        load_entropy_model(tmp_path)


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("rank_probabilities", np.zeros((128, 9)), "strictly positive"),
        ("escape_probabilities", np.ones(63), "shape"),
        ("geometry", np.array([64, 0, 6, 1]), "grid"),
        ("geometry", np.array([2**21, 6, 6, 1]), "codebook size"),
        ("question_piece_ends", np.array([1, 1]), "ends"),
        ("question_pieces", np.frombuffer(b"\xff" * 100, np.uint8), "UTF-8|ends"),
        ("cls_probabilities", np.full((1, 64), 1 / 64), "2..8 stages"),  # a stage axis needs two stages or more
        ("cls_probabilities", np.full((9, 64), 1 / 64), "2..8 stages"),
        ("cls_probabilities", np.full((2, 64), 1 / 64), "shape"),  # staged, but the other tables are not
    ],
)
def test_invalid_arrays_are_refused(key, value, words):
    with pytest.raises(WireFormatError, match=words):
        EntropyModel({**MODEL_ARRAYS, key: value})
    with pytest.raises(WireFormatError, match="lacks"):
        EntropyModel({k: v for k, v in MODEL_ARRAYS.items() if k != key})


def test_fit_rejects_bad_input():
    with pytest.raises(WireFormatError, match="shape"):
        EntropyModel.fit(np.zeros((3, 36), int), codebook_size=64, grid=(6, 6), has_cls_token=True)
    with pytest.raises(WireFormatError, match="stages <= 8"):
        EntropyModel.fit(np.zeros((3, 37, 9), int), codebook_size=64, grid=(6, 6), has_cls_token=True)
    with pytest.raises(WireFormatError, match=r"\[0, 64\)"):
        EntropyModel.fit(np.full((3, 37), 64), codebook_size=64, grid=(6, 6), has_cls_token=True)
    with pytest.raises(WireFormatError, match="smoothing"):
        EntropyModel.fit(np.zeros((3, 37), int), codebook_size=64, grid=(6, 6), has_cls_token=True, smoothing=0)


def test_model_without_cls_or_questions_round_trips():
    images = blocky_images(30)[:, 1:]
    model = EntropyModel.fit(images, codebook_size=64, grid=(6, 6), has_cls_token=False)
    for image in images[:5]:
        _, coded = model.encode_payload(image, "anything at all ☃")
        tokens, question = model.decode_payload(coded, with_question=True)
        np.testing.assert_array_equal(tokens, image)
        assert question == "anything at all ☃"


def test_training_questions_cost_little_and_others_still_round_trip():
    image = blocky_images(1)[0]
    alone, _ = MODEL.encode_payload(image, None)
    for question in ("what color is the shape?", "What is the COLOUR of the shape?", "a\tb\n ?? ¿qué?", ""):
        _, coded = MODEL.encode_payload(image, question)
        assert MODEL.decode_payload(coded, with_question=True)[1] == question
    _, known = MODEL.encode_payload(image, "what color is the shape?")
    assert len(known) - len(alone) <= 2  # 24 bytes of UTF-8
    assert MODEL.encode_payload(image, "x" * (MAX_CODED_PROMPT_BYTES + 1))[1] is None


def test_decoding_is_bounded_by_the_model_not_the_payload():
    # A payload that would spell an endless question stops at MAX_CODED_PROMPT_BYTES (or earlier, corrupt).
    rng = np.random.default_rng(0)
    for _ in range(50):
        payload = rng.integers(0, 256, size=rng.integers(0, 64), dtype=np.uint8).tobytes()
        for with_question in (False, True):
            try:
                tokens, question = MODEL.decode_payload(payload, with_question=with_question)
            except WireFormatError:
                continue
            assert tokens.shape == (37,) and np.all((tokens >= 0) & (tokens < 64))
            assert question is None or len(question.encode()) <= MAX_CODED_PROMPT_BYTES


def test_an_exhausted_coder_stops_decoding_at_once():
    # An empty payload used to be decoded from the coder's idle state (symbol 0 forever), up to 4096 question
    # bytes; a cut-short one is refused too.
    image = blocky_images(1)[0]
    _, coded = MODEL.encode_payload(image, "what color is the shape?")
    with pytest.raises(WireFormatError, match="data ended before the last symbol"):
        MODEL.decode_payload(b"", with_question=True)
    for payload in (coded[:1], coded[: len(coded) // 2]):
        with pytest.raises(WireFormatError, match="corrupt"):
            MODEL.decode_payload(payload, with_question=True)


def test_question_length_is_bounded_by_the_caller():
    image = blocky_images(1)[0]
    question = "what color is the shape? " * 4
    _, coded = MODEL.encode_payload(image, question)
    size = len(question.encode())
    assert MODEL.decode_payload(coded, with_question=True, max_question_bytes=size)[1] == question
    with pytest.raises(WireFormatError, match=f"prompt too long: the coded question exceeds {size - 1} bytes"):
        MODEL.decode_payload(coded, with_question=True, max_question_bytes=size - 1)


def test_questions_round_trip_on_the_smallest_states():
    # Uniform images cost the coder almost nothing, so the question is decoded from a state with no words
    # left; the exhausted-coder check must not refuse these, with or without a question vocabulary.
    flat = np.zeros((40, 37), dtype=np.int64)
    for questions in (QUESTIONS, ()):
        model = EntropyModel.fit(flat, codebook_size=64, grid=(6, 6), has_cls_token=True, questions=questions)
        for question in ("what color is the shape?", "é", "zz", "?", ""):
            _, coded = model.encode_payload(flat[0], question)
            tokens, decoded = model.decode_payload(coded, with_question=True)
            assert decoded == question and np.array_equal(tokens, flat[0])
            assert model.decode_question(model.encode_question(question)) == question


def test_several_codes_per_token_are_coded_stage_by_stage(tmp_path):
    """Residual VQ's codes: one coded stage per code position, each with its own tables; frames round-trip,
    cost less than raw ones, and a one-stage model refuses two codes (and the other way round)."""
    from transformers_alignedvq.entropy import load_entropy_model
    from transformers_alignedvq.wire import decode_frame, encode_frame

    fp = bytes(range(16))
    first = blocky_images(40)  # (images, 37) indices < 64
    second = (first * 5 + np.random.default_rng(0).integers(0, 2, first.shape)) % 64
    staged = np.stack([first, second], -1)
    model = EntropyModel.fit(staged, codebook_size=64, grid=(6, 6), has_cls_token=True, questions=QUESTIONS)
    assert model.codes_per_token == 2 and model.to_arrays()["rank_probabilities"].shape[0] == 2
    assert load_entropy_model(model.save(tmp_path).parent).model_id == model.model_id
    options = dict(codebook_size=64, codebook_fingerprint=fp, grid=(6, 6), has_cls_token=True)
    for row in staged[:5]:
        frame = encode_frame(row, entropy_model=model, prompt=QUESTIONS[0], **options)
        assert len(frame) < len(encode_frame(row, prompt=QUESTIONS[0], **options))
        decoded = decode_frame(frame, codebook_size=64, codebook_fingerprint=fp, entropy_model=model)
        assert np.array_equal(decoded.indices, row) and decoded.codes_per_token == 2
        assert decoded.prompt == QUESTIONS[0]
    one_stage = EntropyModel.fit(first, codebook_size=64, grid=(6, 6), has_cls_token=True)
    with pytest.raises(WireFormatError, match="37 tokens x 1 codes"):
        encode_frame(staged[0], entropy_model=one_stage, **options)
    with pytest.raises(WireFormatError, match="37 tokens x 2 codes"):
        encode_frame(first[0], entropy_model=model, **options)

