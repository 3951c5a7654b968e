"""The vLLM engine serving LLaVA-NeXT, LLaVA-OneVision and Qwen2.5-VL AlignedVQ models (tiny, random): frames of
images of several sizes, asked on the binary and the OpenAI route, get the Transformers engine's greedy answers.

Runs only where vLLM imports (.ci/run's vLLM venv). One vLLM engine at a time, one per family (about half a minute
to start on a CPU each). vLLM's CPU attention takes head sizes of 32 and up, so these models' language models are
wider than the other tests' (64, two heads).
"""

from __future__ import annotations

import base64
import io
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")

from fastapi.testclient import TestClient  # noqa: E402
from transformers import (  # noqa: E402
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

from tests.serving_helpers import OCTET  # noqa: E402
from transformers_alignedvq import wire  # noqa: E402
from transformers_alignedvq.models.family import from_vlm  # noqa: E402
from transformers_alignedvq.serving import create_app  # noqa: E402
from transformers_alignedvq.testing import CHAT_TEMPLATE, IMAGE_TOKEN_ID, INIT_RANGE, VOCAB_SIZE, tiny_tokenizer  # noqa: E402
from transformers_alignedvq.wire_geometry import WireGeometry  # noqa: E402

TILE, PATCH = 16, 4
PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]
# OneVision's too: a 4x4 grid of tiles is more than anyres_max_9 takes, so a 64x64 image is downsampled.
ONEVISION_PINPOINTS = [*PINPOINTS, [64, 64]]
QWEN_PATCH, MERGE = 2, 2
QUESTIONS = ["what color is the shape ?", "what shape is in the image ?", "is there a red circle ?"]
# A language model vLLM's CPU attention runs (head size 32): every family's text config.
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=VOCAB_SIZE, initializer_range=INIT_RANGE)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=TILE,
              patch_size=PATCH)
MAX_NEW_TOKENS = 6
VLLM_ARGS = {"enforce_eager": True}  # the KV cache is sized from the model by the engine itself


def _served(model):
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, 2
    return model.eval()


def _tiled_codebook(model):
    sizes = torch.tensor([[20, 30], [16, 16]])
    model.init_codebook([{"pixel_values": torch.randn(2, 5, 3, TILE, TILE), "image_sizes": sizes}], iters=3)
    return _served(model)


def tiny_next():
    config = LlavaNextConfig(vision_config=dict(model_type="clip_vision_model", **VISION),
                             text_config=dict(model_type="llama", pad_token_id=0, **TEXT),
                             image_token_index=IMAGE_TOKEN_ID, image_grid_pinpoints=PINPOINTS)
    torch.manual_seed(0)
    model = from_vlm(LlavaNextForConditionalGeneration(config).eval(), split_layer=1, split_site="ln1",
                     codebook_size=16)
    return _tiled_codebook(model), tiny_tokenizer()


def tiny_onevision():
    config = LlavaOnevisionConfig(vision_config=dict(model_type="siglip_vision_model", **VISION),
                                  text_config=dict(model_type="qwen2", **TEXT),
                                  image_token_index=IMAGE_TOKEN_ID, video_token_index=98,
                                  image_grid_pinpoints=ONEVISION_PINPOINTS)
    torch.manual_seed(0)
    model = from_vlm(LlavaOnevisionForConditionalGeneration(config).eval(), split_layer=1, split_site="ln1",
                     codebook_size=16)
    return _tiled_codebook(model), video_tokenizer()


def video_tokenizer():
    """The tiny tokenizer with a video token (id 98, the models' ``video_token_id``): vLLM sizes a video at start-up
    with the processor's video token even though none may come."""
    base = tiny_tokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, pad_token="[PAD]", bos_token="<s>",
                                   eos_token="</s>", unk_token="[UNK]", padding_side="left",
                                   extra_special_tokens={"image_token": "<image>", "video_token": "w98"})


def tiny_qwen():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=QWEN_PATCH,
                           spatial_merge_size=MERGE, temporal_patch_size=2, window_size=4 * QWEN_PATCH,
                           fullatt_block_indexes=[2], out_hidden_size=64),
        text_config=dict(bos_token_id=1, eos_token_id=2, pad_token_id=0, **TEXT,
                         rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0}),
        image_token_id=IMAGE_TOKEN_ID, video_token_id=98, vision_start_token_id=97, vision_end_token_id=96,
    )
    torch.manual_seed(0)
    model = from_vlm(Qwen2_5_VLForConditionalGeneration(config).eval(), split_layer=1, split_site="mlp",
                     codebook_size=16)
    grid = torch.tensor([[1, 6, 8]])
    model.init_codebook([{"pixel_values": torch.randn(48, 3 * 2 * QWEN_PATCH**2), "image_grid_thw": grid}], iters=3)
    # As a server without Qwen's own processor holds it: the image processor's pixel limits and the template.
    images = Qwen2VLImageProcessorPil(patch_size=QWEN_PATCH, merge_size=MERGE, temporal_patch_size=2,
                                      size={"shortest_edge": 64, "longest_edge": 768})
    processor = LlavaProcessor(image_processor=images, tokenizer=video_tokenizer(), patch_size=QWEN_PATCH,
                               chat_template=CHAT_TEMPLATE)
    return _served(model), processor


# Each family: its builder and the images asked about (tiled: (height, width); Qwen2.5-VL: patch grids (t, h, w)).
FAMILIES = {
    "llava_next": (tiny_next, [(20, 30), (16, 16), (40, 9)]),
    "llava_onevision": (tiny_onevision, [(20, 30), (64, 64), (9, 40)]),
    "qwen2_5_vl": (tiny_qwen, [(1, 6, 8), (1, 4, 6), (1, 12, 16)]),
}


def frame(engine, image, question: str, seed: int) -> bytes:
    """The client's frame: the torch edge on random pixels of ``image`` (a size, or a Qwen patch grid)."""
    model, generator = engine.model, torch.Generator().manual_seed(seed)
    if len(image) == 3:
        patches = torch.randn(image[1] * image[2], 3 * 2 * QWEN_PATCH**2, generator=generator)
        indices = model.encode_edge(patches, torch.tensor([image]))
        geometry, grid, cls = WireGeometry.patch_grids([image]), None, False
    else:
        sizes = torch.tensor([image])
        layout = model.frame_geometry(sizes)
        pixels = torch.randn(1, layout.num_tiles, 3, TILE, TILE, generator=generator)
        indices = model.encode_edge(pixels, sizes)
        geometry = WireGeometry.tiled(sizes, layout.tiles_per_image, layout.tile_grids)
        grid, cls = (TILE // PATCH, TILE // PATCH), engine.tiles.has_cls_token
    return wire.encode_frame(np.asarray(indices).reshape(-1), codebook_size=16, codebook_fingerprint=engine.fingerprint,
                             geometry=geometry, grid=grid, has_cls_token=cls, prompt=question)


@pytest.fixture(scope="module", params=list(FAMILIES))
def served(request, tmp_path_factory):
    """``(family, transformers_client, vllm_client, frames, folder)``: both engines serving the same weights, the
    Transformers engine the model object, the vLLM engine its saved checkpoint folder (as `alignedvq serve` does)."""
    build, images = FAMILIES[request.param]
    model, processor = build()
    folder = tmp_path_factory.mktemp(request.param)
    with warnings.catch_warnings():  # without onnx installed the folder gets no ONNX edge, which is not used here
        warnings.filterwarnings("ignore", message=".*no ONNX edge")
        model.save_pretrained(folder)
    processor.save_pretrained(folder)
    options = dict(max_new_tokens=MAX_NEW_TOKENS, max_wait_ms=1)
    hf_app = create_app(model, processor=processor, **options)
    vllm_app = create_app(folder, engine="vllm", vllm_args=VLLM_ARGS, **options)
    try:
        with TestClient(hf_app) as hf_client, TestClient(vllm_app) as vllm_client:
            engine = hf_client.app.state.engine
            frames = [frame(engine, image, question, seed) for seed, (image, question)
                      in enumerate(zip(images, QUESTIONS))]
            yield request.param, hf_client, vllm_client, frames, folder
    finally:
        vllm_app.state.engine.close()


def answer(client, body: bytes) -> dict:
    response = client.post("/v1/answer", content=body, headers=OCTET)
    assert response.status_code == 200, response.text
    return response.json()


def test_greedy_answers_equal_the_transformers_engines(served):
    family, hf_client, vllm_client, frames, _ = served
    if family == "llava_onevision":  # the 64x64 image's 16x16 features are downsampled (else 256 + 16 + 16)
        assert vllm_client.app.state.engine.image_tokens((64, 64)) < 16 * 16 + 16 + 16
    assert vllm_client.get("/v1/model").json()["engine"] == "vllm"
    expected = [answer(hf_client, body) for body in frames]
    got = [answer(vllm_client, body) for body in frames]
    assert [(r["answer"], r["generated_tokens"]) for r in got] == [
        (r["answer"], r["generated_tokens"]) for r in expected], family
    assert all(r["generated_tokens"] > 0 for r in expected)
    assert len({r["answer"] for r in expected}) > 1  # the answers depend on the image and question


def chat_answers(clients, image_part: dict) -> list[str]:
    """Each client's greedy answer on the OpenAI route to the first question about ``image_part``."""
    texts = []
    for client in clients:
        chat = {"model": client.get("/v1/models").json()["data"][0]["id"], "max_tokens": MAX_NEW_TOKENS,
                "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTIONS[0]}, image_part]}]}
        reply = client.post("/v1/chat/completions", json=chat)
        assert reply.status_code == 200, reply.text
        texts.append(reply.json()["choices"][0]["message"]["content"])
    return texts


def test_openai_route_answers_alike(served):
    family, hf_client, vllm_client, frames, _ = served
    part = {"type": "alignedvq_frame", "alignedvq_frame": {"data": base64.b64encode(frames[0]).decode()}}
    texts = chat_answers([hf_client, vllm_client], part)
    assert texts[0] == texts[1], family
    if family == "qwen2_5_vl":  # its served processor has an image processor: pixels are encoded in the server
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (13, 21, 3), dtype=np.uint8)).save(buffer, "PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        texts = chat_answers([hf_client, vllm_client], {"type": "image_url", "image_url": {"url": url}})
        assert texts[0] == texts[1]


def test_the_export_of_a_saved_folder_is_the_base_model_transformers_loads(served, tmp_path):
    """What vLLM reads is also a plain checkpoint of the base model: no AlignedVQ field or weight, and every weight
    where the base class (and vLLM's, which maps the same names) expects it."""
    import transformers

    from transformers_alignedvq.serving.engines.vllm_checkpoint import FAMILIES, export_for_vllm

    family, *_, folder = served
    exported = export_for_vllm(folder, tmp_path / "vllm")
    config = transformers.AutoConfig.from_pretrained(exported)
    assert config.model_type == family and "codebook_size" not in config.to_dict()
    base = getattr(transformers, config.architectures[0])
    assert config.architectures == [FAMILIES[f"{family}_alignedvq"].architecture]
    _, info = base.from_pretrained(exported, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert type(transformers.AutoProcessor.from_pretrained(exported)).__name__ == FAMILIES[f"{family}_alignedvq"].processor
