"""LLaVA-NeXT with AlignedVQ on a tiny random CLIP + Llama model: the second any-resolution family, sharing the
tile logic with OneVision and adding only its adapter, config and packing call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, LlavaNextConfig, LlavaNextForConditionalGeneration

import transformers_alignedvq as tav
from transformers_alignedvq.models.family import from_vlm
from transformers_alignedvq.models.llava_alignedvq.alignedvq_layer import AlignedVQLayerOutput
from transformers_alignedvq.models.llava_next_alignedvq.modeling_llava_next_alignedvq import (
    _HAS_MM_ENCODER_OUTPUTS,
    LlavaNextAlignedVQForConditionalGeneration,
)

pytestmark = pytest.mark.skipif(not _HAS_MM_ENCODER_OUTPUTS, reason="NeXT with AlignedVQ needs transformers>=5.19")

IMAGE_TOKEN, TILE, PATCH = 99, 16, 4
PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]
SIZES = torch.tensor([[20, 30], [16, 16]])  # 4 grid tiles + base view, and 1 + base


def tiny_next(seed: int = 0) -> LlavaNextForConditionalGeneration:
    config = LlavaNextConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, image_size=TILE, patch_size=PATCH),
        text_config=dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100, pad_token_id=0),
        image_token_index=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS, image_seq_length=16,
    )
    torch.manual_seed(seed)
    return LlavaNextForConditionalGeneration(config).eval()


def pixels(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 5, 3, TILE, TILE, generator=torch.Generator().manual_seed(seed))


def tiny_split(site: str = "ln1", layer: int = 0) -> LlavaNextAlignedVQForConditionalGeneration:
    model = from_vlm(tiny_next(), split_layer=layer, split_site=site, codebook_size=16)
    torch.manual_seed(1)
    model.init_codebook([{"pixel_values": pixels(), "image_sizes": SIZES}], iters=3)
    return model


def prompt(model) -> torch.Tensor:
    image = model.model.get_image_features(image_indices=model.encode_edge(pixels(), SIZES), image_sizes=SIZES)
    lengths = [len(features) for features in image.pooler_output]
    width = max(lengths) + 3
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length - 3 : width - 3] = IMAGE_TOKEN
        ids[row, width - 3 :] = torch.tensor([5, 6, 7])
    return ids


def test_geometry_counts_the_cls_token_and_matches_the_image_processor():
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    processor = LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                           image_grid_pinpoints=PINPOINTS)
    photos = [Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))
              for seed, (h, w) in enumerate([(20, 30), (16, 16), (40, 12)])]
    batch = processor(photos, return_tensors="pt")
    model = tiny_split()
    geometry = model.frame_geometry(batch["image_sizes"])
    assert geometry.tiles_per_image == (5, 2, 3) and geometry.tokens_per_tile == 17
    filled = (batch["pixel_values"].abs().flatten(2).sum(-1) > 0).sum(-1)
    assert tuple(filled.tolist()) == geometry.tiles_per_image
    assert model.encode_edge(batch["pixel_values"], batch["image_sizes"]).shape == (10, 17)
    with pytest.raises(ValueError, match="batch_num_images"):
        model.frame_geometry(SIZES, batch_num_images=[1, 1])


@pytest.mark.parametrize("site", ["patch", "input", "mlp"])
def test_split_without_quantization_is_the_stock_model(site, monkeypatch):
    base = tiny_next()
    expected = base.model.get_image_features(pixels(), SIZES, return_dict=True).pooler_output
    model = from_vlm(base, split_layer=0, split_site=site, codebook_size=16)

    def unquantized(z):
        return AlignedVQLayerOutput(z, torch.zeros(*z.shape[:2], 1, dtype=torch.long))

    monkeypatch.setattr(model.model.alignedvq, "forward", unquantized)
    ours = model.model.get_image_features(pixels(), SIZES, return_dict=True).pooler_output
    for a, b in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("site", "layer"), [("ln1", 0), ("mlp", 1)])
def test_pixels_and_indices_give_the_same_forward_and_tokens(site, layer):
    model = tiny_split(site, layer)
    ids = prompt(model)
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)
    indices = model.encode_edge(pixels(), SIZES)
    assert indices.shape == (7, 17)
    from_pixels = model(input_ids=ids, pixel_values=pixels(), image_sizes=SIZES, labels=labels)
    from_indices = model.forward_from_indices(indices, input_ids=ids, image_sizes=SIZES, labels=labels)
    assert torch.equal(from_pixels.logits, from_indices.logits) and torch.equal(from_pixels.loss, from_indices.loss)
    options = dict(input_ids=ids, attention_mask=(ids != 0).long(), image_sizes=SIZES, max_new_tokens=5,
                   do_sample=False)
    assert torch.equal(model.generate(pixel_values=pixels(), **options), model.generate(image_indices=indices, **options))
    with pytest.raises(ValueError, match=r"\(7, 17\)"):
        model.forward_from_indices(indices[:, 1:], input_ids=ids, image_sizes=SIZES)


def test_save_load_through_the_auto_class_and_dispatch(tmp_path):
    model = tiny_split()
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is LlavaNextAlignedVQForConditionalGeneration
    assert not info["missing_keys"] and not info["unexpected_keys"]
    indices = model.encode_edge(pixels(), SIZES)
    assert torch.equal(loaded.eval().encode_edge(pixels(), SIZES), indices)
    ids = prompt(model)
    expected = model.forward_from_indices(indices, input_ids=ids, image_sizes=SIZES).logits
    assert torch.equal(loaded.forward_from_indices(indices, input_ids=ids, image_sizes=SIZES).logits, expected)
    assert tav.LlavaNextAlignedVQForConditionalGeneration is LlavaNextAlignedVQForConditionalGeneration
    with pytest.raises(TypeError, match="LlavaNextForConditionalGeneration"):
        from_vlm(torch.nn.Linear(2, 2), codebook_size=16)


def test_vision_layer_outputs_are_the_towers():
    """As for OneVision (Transformers' own tests ask for them): every hidden state and attention of the CLIP tower
    over all tiles, CLS included; the edge's (before the split) are the stock tower's."""
    model = tiny_split(site="mlp", layer=1)  # states 0-1 on the edge, 2-3 in the cloud
    model.set_attn_implementation("eager")
    tiles = model.model.pixel_tiles(pixels(), model.frame_geometry(SIZES))
    stock = model.model.vision_tower(tiles, output_hidden_states=True, output_attentions=True)
    image = model.model.get_image_features(pixels(), SIZES, output_hidden_states=True, output_attentions=True)
    assert len(image.hidden_states) == 4 and len(image.attentions) == 3
    assert image.hidden_states[0].shape == (7, 17, 32)  # 7 tiles of 16 patches + CLS
    edge, stock_edge = image.hidden_states[:2] + image.attentions[:2], stock.hidden_states[:2] + stock.attentions[:2]
    for ours, theirs in zip(edge, stock_edge):
        torch.testing.assert_close(ours, theirs)
    (feature_layer,) = model.config.feature_layer_indices()  # NeXT reads layer -2, CLS dropped ("default")
    torch.testing.assert_close(image.hidden_states[feature_layer][:, 1:], image.last_hidden_state)
