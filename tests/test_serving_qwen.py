"""The Transformers engine serving Qwen2.5-VL on the tiny random model of `test_family_qwen2_5_vl`: frames carry
their image's patch grid, the server checks it against what the model's image processor makes and answers as the
model's own ``generate`` does from the same indices; a bad grid is a 4xx JSON error, never a 500."""

from __future__ import annotations

import base64
import io
import zlib

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from tests.serving_helpers import OCTET, assert_error
from tests.test_family_qwen2_5_vl import MERGE, PATCH, tiny_split
from transformers_alignedvq import wire
from transformers_alignedvq.errors import ServerConfigError
from transformers_alignedvq.models.qwen2_5_vl_alignedvq.modeling_qwen2_5_vl_alignedvq import _HAS_MM_ENCODER_OUTPUTS
from transformers_alignedvq.preprocess_qwen import QwenImagePreprocessing
from transformers_alignedvq.serving import create_app
from transformers_alignedvq.testing import CHAT_TEMPLATE, tiny_tokenizer
from transformers_alignedvq.wire_followup import encode_followup
from transformers_alignedvq.wire_geometry import WireGeometry

pytestmark = pytest.mark.skipif(not _HAS_MM_ENCODER_OUTPUTS, reason="needs Qwen2.5-VL's forward(mm_encoder_outputs)")

QUESTION = "what color is the shape ?"
# Pixel limits for 2-px patches: 4x4 patches (8x8 px) at least, 768 px at most (e.g. 12x16 patches).
MIN_PIXELS, MAX_PIXELS = 64, 768


def image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
                                    size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})


def processor():
    """The server reads a processor's image processor, tokenizer and chat template only (Qwen's own processor
    also wants a video processor), so LLaVA's carries them here."""
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=image_processor(), tokenizer=tiny_tokenizer(), patch_size=PATCH,
                          chat_template=CHAT_TEMPLATE)


def tiny_served_qwen():
    model = tiny_split("mlp", 1)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    return model


@pytest.fixture(scope="module")
def app():
    return create_app(tiny_served_qwen(), processor=processor(), max_new_tokens=6, max_wait_ms=1)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def engine(app):
    return app.state.engine


def edge(model, grid: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """The client side: the torch edge on random patches of one image of patch grid ``grid``."""
    patches = torch.randn(grid[1] * grid[2], 3 * 2 * PATCH * PATCH, generator=torch.Generator().manual_seed(seed))
    return model.encode_edge(patches, torch.tensor([grid]))


def frame_of(engine, indices, grid, question=QUESTION, **options) -> bytes:
    return wire.encode_frame(np.asarray(indices).reshape(-1), codebook_size=16, codebook_fingerprint=engine.fingerprint,
                             geometry=WireGeometry.patch_grids([grid]), prompt=question, **options)


def direct_answer(engine, indices, grid, question=QUESTION) -> str:
    """The model's own generate from the same indices, with t*h*w/merge² placeholders as Qwen's processor makes."""
    count = grid[0] * grid[1] * grid[2] // MERGE**2
    ids = engine.tokenizer(f"USER: {'<image>' * count}\n{question} ASSISTANT:")["input_ids"]
    assert engine.input_ids(question, grid) == ids
    out = engine.model.generate(input_ids=torch.tensor([ids]), image_indices=indices, image_grid_thw=torch.tensor([grid]),
                                max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=2)
    return engine.answer_text(out[0, len(ids):].tolist(), engine.request(indices, question, grid).options)


def post(client, body: bytes):
    return client.post("/v1/answer", content=body, headers=OCTET)


@pytest.mark.parametrize("grid", [(1, 6, 8), (1, 4, 6), (1, 12, 16), (1, 2, 32), (1, 2, 194)])
def test_answer_equals_direct_generate(client, engine, grid):
    indices = edge(engine.model, grid)
    response = post(client, frame_of(engine, indices, grid))
    assert response.status_code == 200, response.text
    assert response.json()["answer"] == direct_answer(engine, indices, grid)


def test_answers_depend_on_the_grid(engine):
    """The same indices laid out as another grid give other 3-D positions: the grid really reaches generate."""
    indices = edge(engine.model, (1, 6, 8), seed=4)
    answers = {direct_answer(engine, indices, grid) for grid in [(1, 6, 8), (1, 8, 6), (1, 4, 12)]}
    assert len(answers) > 1


def test_batched_requests_of_different_grids_answer_as_alone(engine):
    requests = [engine.request(edge(engine.model, grid, seed).reshape(-1, 1), QUESTION, grid)
                for seed, grid in enumerate([(1, 6, 8), (1, 4, 4), (1, 2, 32)])]
    together = [result.text for result in engine.generate(requests)]
    assert together == [engine.generate([request])[0].text for request in requests]


def test_followup_and_openai_frame_part(client, engine):
    grid = (1, 4, 6)
    indices = edge(engine.model, grid, seed=5)
    first = post(client, frame_of(engine, indices, grid, question="what ?"))
    assert first.status_code == 200, first.text
    again = post(client, encode_followup(bytes.fromhex(first.json()["image_digest"]), QUESTION))
    assert again.status_code == 200, again.text
    expected = direct_answer(engine, indices, grid)
    assert again.json()["answer"] == expected
    chat = {"model": client.get("/v1/models").json()["data"][0]["id"], "messages": [{"role": "user", "content": [
        {"type": "alignedvq_frame", "alignedvq_frame": {"data": base64.b64encode(frame_of(engine, indices, grid,
                                                                                          question=None)).decode()}},
        {"type": "text", "text": QUESTION}]}]}
    answer = client.post("/v1/chat/completions", json=chat)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == expected


def test_openai_image_url_runs_the_edge_here(client, engine):
    """Pixels sent to the OpenAI route are preprocessed by the model's image processor and encoded on the server:
    the answer is the model's own from the indices of the processor's patches."""
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (13, 21, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    inputs = image_processor()(images=image, return_tensors="pt")
    grid = tuple(inputs["image_grid_thw"][0].tolist())
    assert grid == (1, 6, 10)
    indices = engine.model.encode_edge(inputs["pixel_values"], inputs["image_grid_thw"])
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    chat = {"model": client.get("/v1/models").json()["data"][0]["id"], "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}]}
    answer = client.post("/v1/chat/completions", json=chat)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == direct_answer(engine, indices, grid)


def test_model_info_describes_the_patch_grids(client):
    info = client.get("/v1/model").json()
    assert info["family"] == "qwen2_5_vl" and info["spatial_merge_size"] == MERGE and info["patch_size"] == PATCH
    assert (info["min_pixels"], info["max_pixels"]) == (MIN_PIXELS, MAX_PIXELS)
    # The largest grid: an image of aspect ratio 200 clamped to one merge unit high, 2x194 patches (4x388 px).
    assert info["num_tokens"] == 388 and info["grid"] is None and info["lm_image_tokens"] is None
    largest = wire.encode_frame(np.zeros(388, int), codebook_size=16, codebook_fingerprint=bytes(16),
                                prompt="x" * 2048, geometry=WireGeometry.patch_grids([(1, 2, 194)]))
    assert len(largest) <= info["max_body_bytes"] <= len(largest) + 16


def test_every_grid_the_processor_makes_passes_and_others_do_not(engine):
    """The check admits the grid of every image size (aspect ratios up to 200, where smart_resize clamps a side to
    one merge unit and may exceed max_pixels), and nothing smaller or larger than the limits allow."""
    settings = QwenImagePreprocessing(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=PATCH,
                                      merge_size=MERGE)
    rng = np.random.default_rng(0)
    sizes = [tuple(int(v) for v in rng.integers(1, 400, 2)) for _ in range(300)] + [(2, 400), (400, 2), (3, 600), (8, 1600)]
    grids = {settings.grid(h, w) for h, w in sizes if max(h, w) / min(h, w) <= 200}
    assert any(g[1] * g[2] * PATCH**2 > MAX_PIXELS for g in grids)  # the clamped case is covered
    for grid in grids:
        engine.tiles.check_grid(grid)
    for grid in [(1, 2, 2), (1, 14, 16), (1, 2, 200), (2, 4, 4), (1, 3, 4)]:
        with pytest.raises(wire.WireFormatError, match="geometry mismatch"):
            engine.tiles.check_grid(grid)


def test_bad_grids_are_4xx_json_errors(client, engine):
    flat = edge(engine.model, (1, 6, 8)).reshape(-1).numpy()
    fp = engine.fingerprint
    cases = [
        (wire.encode_frame(flat, codebook_size=16, codebook_fingerprint=fp, prompt=QUESTION), 422,
         "incompatible_frame", "must carry its image's grid"),
        (wire.encode_frame(np.zeros(2 * 16, int), codebook_size=16, codebook_fingerprint=fp, prompt=QUESTION, grid=(4, 4),
                           geometry=WireGeometry.tiled([(8, 8)], (2,), ((1, 1),))), 422, "incompatible_frame",
         "carries tiles"),
        (frame_of(engine, np.zeros(96, int), (2, 6, 8)), 422, "incompatible_frame", "t must be 1"),
        (frame_of(engine, np.zeros(40, int), (1, 5, 8)), 422, "incompatible_frame", "multiples of the merge size 2"),
        (frame_of(engine, np.zeros(4, int), (1, 2, 2)), 422, "incompatible_frame", "min_pixels=64"),
        (frame_of(engine, np.zeros(224, int), (1, 14, 16)), 422, "incompatible_frame", "max_pixels=768"),
        (wire.encode_frame(np.concatenate([flat, flat]), codebook_size=16, codebook_fingerprint=fp, prompt=QUESTION,
                           geometry=WireGeometry.patch_grids([(1, 6, 8)] * 2)), 422, "incompatible_frame",
         "carries 2 images"),
        (frame_of(engine, flat, (1, 6, 8))[:30], 400, "malformed_frame", "frame truncated"),
        (wire.encode_frame(flat, codebook_size=16, codebook_fingerprint=bytes(16), prompt=QUESTION,
                           geometry=WireGeometry.patch_grids([(1, 6, 8)])), 409, "codebook_mismatch", "fingerprint"),
    ]
    for body, status, kind, message in cases:
        assert_error(post(client, body), status, kind, message)
    assert client.get("/healthz").json()["status"] == "ok"
    assert post(client, frame_of(engine, flat, (1, 6, 8))).status_code == 200


def test_coded_frame_answers_as_the_raw_one(engine):
    """Under an entropy model fitted on patch grids the server decodes coded frames of any admitted grid, and answers
    them as their raw frames; a damaged coded payload is a 400, and the server goes on serving."""
    grids = [(1, 6, 8), (1, 4, 6), (1, 2, 32), (1, 12, 16)]
    training = [(edge(engine.model, grid, seed).reshape(-1).numpy(), grid) for seed, grid in enumerate(grids * 3)]
    entropy = wire.EntropyModel.fit_patch_grids(training, codebook_size=16, questions=[QUESTION] * 2)
    app = create_app(engine.model, processor=processor(), max_new_tokens=6, max_wait_ms=1, entropy_model=entropy)
    with TestClient(app) as client:
        assert client.get("/v1/model").json()["entropy_model_id"] == entropy.model_id.hex()
        for seed, grid in enumerate([(1, 6, 8), (1, 2, 194), (1, 8, 6)], start=20):
            indices = edge(engine.model, grid, seed)
            coded = frame_of(engine, indices, grid, entropy_model=entropy)
            assert wire.decode_frame(coded, entropy_model=entropy).entropy_coded
            raw = post(client, frame_of(engine, indices, grid))
            answer = post(client, coded)
            assert answer.status_code == raw.status_code == 200, answer.text
            assert answer.json()["answer"] == raw.json()["answer"] == direct_answer(engine, indices, grid)
        digest = bytes.fromhex(answer.json()["image_digest"])  # a follow-up's question coded under the same model
        again = post(client, encode_followup(digest, QUESTION, entropy_model=entropy))
        assert again.status_code == 200 and again.json()["answer"] == answer.json()["answer"]
        body = bytearray(coded[:-4])
        body[-3] ^= 0xFF
        damaged = bytes(body) + zlib.crc32(bytes(body)).to_bytes(4, "little")
        assert_error(post(client, damaged), 400, "malformed_frame", "entropy-coded payload")
        assert_error(post(client, frame_of(engine, np.zeros(4, int), (1, 2, 2), entropy_model=entropy)), 422,
                     "incompatible_frame", "min_pixels=64")
        assert post(client, coded).status_code == 200


def test_an_entropy_model_that_does_not_fit_is_refused_at_start_up(engine):
    fixed = wire.EntropyModel.fit(np.zeros((2, 16), int), codebook_size=16, grid=(4, 4), has_cls_token=False)
    with pytest.raises(ServerConfigError, match="codes a fixed grid; .* fit one with EntropyModel.fit_patch_grids"):
        create_app(engine.model, processor=processor(), entropy_model=fixed, warmup=False)
    other_k = wire.EntropyModel.fit_patch_grids([(np.zeros(16, int), (1, 4, 4))], codebook_size=32)
    with pytest.raises(ServerConfigError, match="does not fit this model's frames \\(K=16, 1 codes per token\\)"):
        create_app(engine.model, processor=processor(), entropy_model=other_k, warmup=False)


def test_processor_of_another_tower_is_refused(engine):
    from transformers import LlavaProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    other = LlavaProcessor(image_processor=Qwen2VLImageProcessorPil(patch_size=14), tokenizer=tiny_tokenizer(),
                           patch_size=14)
    with pytest.raises(ServerConfigError, match="not the vision tower's"):
        create_app(engine.model, processor=other, warmup=False)



def test_a_saved_folder_serves_and_a_lying_config_is_refused(tmp_path, engine):
    """`alignedvq serve FOLDER`'s path: the model, its processor (pixel limits included) and the start-up size
    checks, which read Qwen's own tower names (``model.visual.blocks.N``, ``depth``)."""
    import json

    engine.model.save_pretrained(tmp_path)
    processor().save_pretrained(tmp_path)
    app = create_app(tmp_path, max_new_tokens=6, max_wait_ms=1)
    served = app.state.engine
    assert (served.tiles.preprocessing.min_pixels, served.tiles.preprocessing.max_pixels) == (MIN_PIXELS, MAX_PIXELS)
    indices = edge(engine.model, (1, 6, 8))
    with TestClient(app) as client:
        response = post(client, frame_of(served, indices, (1, 6, 8)))
        assert response.status_code == 200, response.text
        assert response.json()["answer"] == direct_answer(engine, indices, (1, 6, 8))
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_config"]["depth"] = 7
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ServerConfigError, match="vision depth=7 but the weights hold 3"):
        create_app(tmp_path)


def test_pixel_limits_saved_beside_the_model_hold_without_a_processor(tmp_path, engine):
    """A folder whose processor cannot be built (Qwen's own wants a video processor) still serves under the
    pixel limits saved with it, not the class defaults (which would refuse every grid of this tiny model)."""
    engine.model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    image_processor().save_pretrained(tmp_path)
    app = create_app(tmp_path, max_new_tokens=6, max_wait_ms=1, warmup=False)
    assert app.state.engine.processor is None
    settings = app.state.engine.tiles.preprocessing
    assert (settings.min_pixels, settings.max_pixels) == (MIN_PIXELS, MAX_PIXELS)
