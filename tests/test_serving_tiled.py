"""The Transformers engine serving LLaVA-OneVision (any-resolution tiles) on a tiny random model: frames carry
their geometry, the server checks it against the model's own tiling and answers as the model's own ``generate``
does from the same indices; bad geometry is a 4xx JSON error, never a 500."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import (
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaProcessor,
)

from tests.serving_helpers import OCTET, assert_error
from transformers_alignedvq import wire
from transformers_alignedvq.models.family import from_vlm
from transformers_alignedvq.models.llava_onevision_alignedvq.modeling_llava_onevision_alignedvq import (
    _HAS_MM_ENCODER_OUTPUTS,
)
from transformers_alignedvq.serving import create_app
from transformers_alignedvq.serving.errors import classify_wire_error
from transformers_alignedvq.serving.tiled import refuse_geometry
from transformers_alignedvq.testing import CHAT_TEMPLATE, IMAGE_TOKEN_ID, INIT_RANGE, VOCAB_SIZE, tiny_tokenizer
from transformers_alignedvq.wire_followup import encode_followup
from transformers_alignedvq.wire_geometry import WireGeometry

pytestmark = pytest.mark.skipif(not _HAS_MM_ENCODER_OUTPUTS, reason="OneVision with AlignedVQ needs transformers>=5.19")

TILE, PATCH = 16, 4
PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]
QUESTION = "what color is the shape ?"


def tiny_onevision_alignedvq():
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=TILE, patch_size=PATCH),
        text_config=dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB_SIZE,
                         initializer_range=INIT_RANGE),
        image_token_index=IMAGE_TOKEN_ID, video_token_index=98, image_grid_pinpoints=PINPOINTS,
    )
    torch.manual_seed(0)
    model = from_vlm(LlavaOnevisionForConditionalGeneration(config).eval(), split_layer=1, split_site="ln1",
                     codebook_size=16).eval()
    sizes = torch.tensor([[20, 30], [16, 16]])
    model.init_codebook([{"pixel_values": torch.randn(2, 5, 3, TILE, TILE), "image_sizes": sizes}], iters=3)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    return model


@pytest.fixture(scope="module")
def app():
    return create_app(tiny_onevision_alignedvq(), processor=tiny_tokenizer(), max_new_tokens=6, max_wait_ms=1)


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def engine(app):
    return app.state.engine


def edge(model, size: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, WireGeometry]:
    """The client side: the torch edge on random tiles of an image of ``size``, and the frame geometry."""
    sizes = torch.tensor([size])
    geometry = model.frame_geometry(sizes)
    pixels = torch.randn(1, geometry.num_tiles, 3, TILE, TILE, generator=torch.Generator().manual_seed(seed))
    indices = model.encode_edge(pixels, sizes)
    return indices, WireGeometry.tiled(sizes, geometry.tiles_per_image, geometry.tile_grids)


def frame_of(engine, indices, geometry, question=QUESTION, **options) -> bytes:
    return wire.encode_frame(np.asarray(indices).reshape(-1), codebook_size=16, codebook_fingerprint=engine.fingerprint,
                             geometry=geometry, grid=(4, 4), prompt=question, **options)


def direct_answer(engine, indices, size) -> tuple[str, list[int]]:
    """The model's own generate from the same indices, its prompt built from its own packed feature count."""
    model, sizes = engine.model, torch.tensor([size])
    count = len(model.model.get_image_features(image_indices=indices, image_sizes=sizes, return_dict=True)
                .pooler_output[0])
    ids = engine.tokenizer(f"USER: {'<image>' * count}\n{QUESTION} ASSISTANT:")["input_ids"]
    out = model.generate(input_ids=torch.tensor([ids]), image_indices=indices, image_sizes=sizes, max_new_tokens=6,
                         do_sample=False, pad_token_id=0, eos_token_id=2)
    return engine.answer_text(out[0, len(ids):].tolist(), engine.request(indices, QUESTION, size).options), ids


def post(client, body: bytes):
    return client.post("/v1/answer", content=body, headers=OCTET)


@pytest.mark.parametrize("size", [(20, 30), (16, 16), (40, 9)])
def test_answer_equals_direct_generate(client, engine, size):
    indices, geometry = edge(engine.model, size)
    response = post(client, frame_of(engine, indices, geometry))
    assert response.status_code == 200, response.text
    expected, ids = direct_answer(engine, indices, size)
    assert engine.input_ids(QUESTION, size) == ids
    assert response.json()["answer"] == expected


def test_coded_frame_and_openai_route_answer_alike(engine):
    """Coded tile by tile under an entropy model fitted on tiles; the OpenAI route takes the same frame."""
    model = engine.model
    tiles = torch.cat([edge(model, (32, 32), seed)[0] for seed in range(20)]).numpy()
    entropy = wire.EntropyModel.fit(tiles, codebook_size=16, grid=(4, 4), has_cls_token=False)
    app = create_app(model, processor=engine.tokenizer, max_new_tokens=6, max_wait_ms=1, entropy_model=entropy)
    indices, geometry = edge(model, (20, 30), seed=3)
    coded = frame_of(engine, indices, geometry, entropy_model=entropy)
    assert wire.decode_frame(coded, entropy_model=entropy).entropy_coded  # random tiles: no smaller than raw
    expected, _ = direct_answer(engine, indices, (20, 30))
    with TestClient(app) as client:
        assert post(client, coded).json()["answer"] == expected
        chat = {"model": client.get("/v1/models").json()["data"][0]["id"], "messages": [{"role": "user", "content": [
            {"type": "text", "text": QUESTION},
            {"type": "alignedvq_frame", "alignedvq_frame": {"data": base64.b64encode(coded).decode()}}]}]}
        answer = client.post("/v1/chat/completions", json=chat)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == expected


def test_batched_requests_of_different_sizes_answer_as_alone(engine):
    requests = []
    for seed, size in enumerate([(20, 30), (16, 16), (9, 40)]):
        indices, _ = edge(engine.model, size, seed)
        requests.append(engine.request(indices.reshape(-1, 1), QUESTION, size))
    together = [result.text for result in engine.generate(requests)]
    alone = [engine.generate([request])[0].text for request in requests]
    assert together == alone


def test_followup_reuses_the_kept_image(client, engine):
    indices, geometry = edge(engine.model, (20, 30), seed=5)
    first = post(client, frame_of(engine, indices, geometry, question="what ?")).json()
    digest = bytes.fromhex(first["image_digest"])
    again = post(client, encode_followup(digest, QUESTION))
    assert again.status_code == 200, again.text
    assert again.json()["answer"] == post(client, frame_of(engine, indices, geometry)).json()["answer"]


def test_model_info_describes_tiles(client):
    info = client.get("/v1/model").json()
    assert info["family"] == "llava_onevision" and info["tokens_per_tile"] == info["num_tokens"] == 16
    assert info["image_grid_pinpoints"] == PINPOINTS and info["max_tiles_per_image"] == 5
    assert info["grid"] == [4, 4] and info["has_cls_token"] is False and info["lm_image_tokens"] is None
    # The largest frame: a 2x2 grid plus the base view (5 tiles of 16 tokens), the longest prompt and section.
    largest = wire.encode_frame(np.zeros(5 * 16, int), codebook_size=16, codebook_fingerprint=bytes(16),
                                prompt="x" * 2048, grid=(4, 4),
                                geometry=WireGeometry.tiled([(2**16 - 1, 2**16 - 1)], [5], [(2, 2)]))
    assert len(largest) <= info["max_body_bytes"] <= len(largest) + 16


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_bad_geometry_is_a_4xx_json_error(client, engine):
    indices, geometry = edge(engine.model, (20, 30))
    flat = indices.reshape(-1).numpy()
    cases = [
        # No geometry section: a LLaVA-1.5 style frame of 5 tiles' tokens.
        (wire.encode_frame(flat, codebook_size=16, codebook_fingerprint=engine.fingerprint, prompt=QUESTION),
         422, "incompatible_frame", "must carry its image size"),
        # A 20x30 image is a 2x2 grid here, never one tile plus its base view.
        (frame_of(engine, flat[:32], WireGeometry.tiled([(20, 30)], (2,), ((1, 1),))), 422, "incompatible_frame",
         "an image of 20x30 is 5 tiles (2x2 grid + base view)"),
        # A 3x1 grid is no pinpoint of this model, whatever the size.
        (frame_of(engine, np.zeros(64, int), WireGeometry.tiled([(48, 16)], (4,), ((3, 1),))), 422,
         "incompatible_frame", "is 3 tiles (2x1 grid"),
        (frame_of(engine, np.concatenate([flat, flat]), WireGeometry.tiled([(20, 30)] * 2, (5, 5), ((2, 2),) * 2)),
         422, "incompatible_frame", "carries 2 images"),
        (wire.encode_frame(np.zeros(2 * 9, int), codebook_size=16, codebook_fingerprint=engine.fingerprint,
                           grid=(3, 3), prompt=QUESTION, geometry=WireGeometry.tiled([(16, 16)], (2,), ((1, 1),))),
         422, "incompatible_frame", "9 tokens per tile, this model makes 16"),
        (wire.encode_frame(np.zeros(16, int), codebook_size=16, codebook_fingerprint=engine.fingerprint,
                           prompt=QUESTION, geometry=WireGeometry.patch_grids([(1, 4, 4)])), 422,
         "incompatible_frame", "carries patch grids"),
        (frame_of(engine, flat, geometry)[:40], 400, "malformed_frame", "frame truncated"),
        (wire.encode_frame(flat, codebook_size=16, codebook_fingerprint=bytes(16), geometry=geometry, prompt=QUESTION),
         409, "codebook_mismatch", "fingerprint"),
    ]
    # Counts that do not add up (4 tiles for a 2x2 grid), with a valid CRC: the decoder refuses the frame itself.
    good = frame_of(engine, flat, geometry)
    section = good.index(bytes([1, 1, 20, 30, 5, 2, 2]))
    bad = bytearray(good[:-4])
    bad[section + 4] = 4
    cases.append((with_crc(bytes(bad)), 400, "malformed_frame", "invalid geometry: image 0: 4 tiles do not add up"))
    for body, status, kind, message in cases:
        assert_error(post(client, body), status, kind, message)
    assert client.get("/healthz").json()["status"] == "ok"


def test_llava_models_refuse_geometry_frames():
    data = wire.encode_frame(np.zeros(17, int), codebook_size=16, codebook_fingerprint=bytes(16), grid=(4, 4),
                             has_cls_token=True, geometry=WireGeometry.tiled([(16, 16)], (1,), ((0, 0),)))
    with pytest.raises(wire.WireFormatError) as error:
        wire.decode_frame(data, num_tokens=17, check_geometry=refuse_geometry(17))
    answer = classify_wire_error(error.value)
    assert (answer.status, answer.type) == (422, "incompatible_frame") and "one image of 17 tokens" in answer.message


def test_meta_count_of_placeholders_matches_the_packing(engine):
    model = engine.model
    for size in [(20, 30), (16, 16), (9, 40), (33, 17), (1, 64), (64, 1)]:
        indices, _ = edge(model, size)
        packed = model.model.get_image_features(image_indices=indices, image_sizes=torch.tensor([size]),
                                                return_dict=True).pooler_output[0]
        assert engine.image_tokens(size) == len(packed), size


def tiny_next_alignedvq():
    """LLaVA-NeXT: CLIP tiles with a CLS token (4x4 + 1 per tile), which the cloud drops after the tower."""
    config = LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=TILE, patch_size=PATCH),
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB_SIZE, pad_token_id=0,
                         initializer_range=INIT_RANGE),
        image_token_index=IMAGE_TOKEN_ID, image_grid_pinpoints=PINPOINTS, image_seq_length=16,
    )
    torch.manual_seed(0)
    model = from_vlm(LlavaNextForConditionalGeneration(config).eval(), split_layer=0, split_site="ln1",
                     codebook_size=16).eval()
    model.init_codebook([{"pixel_values": torch.randn(1, 5, 3, TILE, TILE), "image_sizes": torch.tensor([[20, 30]])}],
                        iters=3)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    return model


def test_llava_next_is_served_with_its_cls_tiles():
    app = create_app(tiny_next_alignedvq(), processor=tiny_tokenizer(), max_new_tokens=6, max_wait_ms=1)
    engine = app.state.engine
    assert engine.tiles.tokens_per_tile == 17 and engine.tiles.has_cls_token
    with TestClient(app) as client:
        for size in [(20, 30), (16, 16), (40, 9)]:
            indices, geometry = edge(engine.model, size)
            body = wire.encode_frame(indices.reshape(-1).numpy(), codebook_size=16,
                                     codebook_fingerprint=engine.fingerprint, geometry=geometry, grid=(4, 4),
                                     has_cls_token=True, prompt=QUESTION)
            response = post(client, body)
            assert response.status_code == 200, response.text
            assert response.json()["answer"] == direct_answer(engine, indices, size)[0]
        no_cls = wire.encode_frame(np.zeros(5 * 17, int), codebook_size=16, codebook_fingerprint=engine.fingerprint,
                                   geometry=WireGeometry.tiled([(20, 30)], (5,), ((2, 2),)), prompt=QUESTION)
        assert post(client, no_cls).status_code == 200  # the grid is optional on the wire; its absence is fine
        wrong = wire.encode_frame(np.zeros(5 * 17, int), codebook_size=16, codebook_fingerprint=engine.fingerprint,
                                  geometry=WireGeometry.tiled([(20, 30)], (5,), ((2, 2),)), grid=(2, 8), prompt=QUESTION,
                                  has_cls_token=True)
        assert_error(post(client, wrong), 422, "incompatible_frame", "patch grid 2x8 (CLS True) per tile")


def test_openai_image_url_runs_the_tiled_edge_here():
    """A client without an edge sends pixels; the server tiles them with the model's processor and answers as
    the model does from the indices of the same tiles."""
    from PIL import Image

    model = tiny_onevision_alignedvq()
    image_processor = LlavaOnevisionImageProcessor(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS,
                                                   do_convert_rgb=True)
    # The server reads a processor's image processor, tokenizer and chat template only; OneVision's own processor
    # also wants a video processor (torchvision), so LLaVA's carries them here.
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer(), patch_size=PATCH,
                               vision_feature_select_strategy="full", chat_template=CHAT_TEMPLATE)
    app = create_app(model, processor=processor, max_new_tokens=6, max_wait_ms=1)
    engine = app.state.engine
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    inputs = image_processor(images=image, return_tensors="pt")
    indices = model.encode_edge(inputs["pixel_values"], inputs["image_sizes"])
    expected, _ = direct_answer(engine, indices, (20, 30))
    with TestClient(app) as client:
        chat = {"model": client.get("/v1/models").json()["data"][0]["id"], "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}]}
        answer = client.post("/v1/chat/completions", json=chat)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == expected


def test_a_saved_folder_serves_and_a_lying_config_is_refused(tmp_path, engine):
    """`alignedvq serve FOLDER`'s path: the size checks read the tiled families' weight names (Transformers' own)."""
    import json

    from transformers_alignedvq.errors import ServerConfigError

    engine.model.save_pretrained(tmp_path)
    engine.tokenizer.save_pretrained(tmp_path)
    app = create_app(tmp_path, max_new_tokens=6, max_wait_ms=1)
    indices, geometry = edge(engine.model, (20, 30))
    with TestClient(app) as client:
        assert post(client, frame_of(engine, indices, geometry)).json()["answer"] == direct_answer(
            engine, indices, (20, 30))[0]
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 7
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ServerConfigError, match="vision num_hidden_layers=7 but the weights hold 2"):
        create_app(tmp_path)


def test_a_capped_tile_grid_is_enforced(engine):
    """A server whose model carries capped pinpoints (`cap_pinpoints`, at most 2 grid tiles) takes frames tiled
    under the cap and refuses those of an uncapped edge, which sends more tiles than the cap allows."""
    from transformers_alignedvq.preprocess_tiles import cap_pinpoints

    capped = cap_pinpoints(PINPOINTS, TILE, max_grid_tiles=2)
    model = tiny_onevision_alignedvq()
    model.config.image_grid_pinpoints = capped
    app = create_app(model, processor=tiny_tokenizer(), max_new_tokens=6, max_wait_ms=1)
    assert app.state.engine.tiles.max_tiles == 3
    indices, geometry = edge(model, (20, 30))
    assert geometry.images[0].grid == (1, 2)
    uncapped_indices, uncapped = edge(engine.model, (20, 30))
    with TestClient(app) as client:
        response = post(client, frame_of(app.state.engine, indices, geometry))
        assert response.status_code == 200, response.text
        assert response.json()["answer"] == direct_answer(app.state.engine, indices, (20, 30))[0]
        assert_error(post(client, frame_of(app.state.engine, uncapped_indices, uncapped)), 422, "incompatible_frame",
                     "is 3 tiles (1x2 grid + base view) under this model's pinpoints, the frame has 5 (2x2)")
