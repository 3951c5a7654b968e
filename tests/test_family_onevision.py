"""LLaVA-OneVision with AlignedVQ on a tiny random SigLIP + Qwen2 model, and the family dispatch of `from_vlm`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_llava
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

import transformers_alignedvq as tav
from transformers_alignedvq.models.family import LlavaAdapter, from_vlm
from transformers_alignedvq.models.llava_alignedvq.alignedvq_layer import AlignedVQLayerOutput
from transformers_alignedvq.models.llava_alignedvq.modeling_alignedvq import LlavaAlignedVQForConditionalGeneration
from transformers_alignedvq.models.llava_onevision_alignedvq.modeling_llava_onevision_alignedvq import (
    _HAS_MM_ENCODER_OUTPUTS,
    LlavaOnevisionAlignedVQForConditionalGeneration,
)
from transformers_alignedvq.preprocess_tiles import cap_pinpoints

pytestmark = pytest.mark.skipif(not _HAS_MM_ENCODER_OUTPUTS, reason="OneVision with AlignedVQ needs transformers>=5.19")

IMAGE_TOKEN, TILE, PATCH = 99, 16, 4
PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]
# A landscape photo (4 grid tiles + base view) and a square one (1 + base) in the same batch.
SIZES = torch.tensor([[20, 30], [16, 16]])


def tiny_onevision(seed: int = 0) -> LlavaOnevisionForConditionalGeneration:
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, image_size=TILE, patch_size=PATCH),
        text_config=dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100),
        image_token_index=IMAGE_TOKEN, video_token_index=98, image_grid_pinpoints=PINPOINTS,
    )
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(config).eval()


def tiny_split(site: str = "mlp", layer: int = 1, seed: int = 0) -> LlavaOnevisionAlignedVQForConditionalGeneration:
    model = from_vlm(tiny_onevision(seed), split_layer=layer, split_site=site, codebook_size=16)
    torch.manual_seed(seed + 1)
    model.init_codebook([{"pixel_values": pixels(), "image_sizes": SIZES}], iters=3)
    return model


def pixels(seed: int = 0) -> torch.Tensor:
    """The processor's layout: (images, max_tiles, 3, tile, tile), the short image padded with junk tiles."""
    return torch.randn(2, 5, 3, TILE, TILE, generator=torch.Generator().manual_seed(seed))


def prompt(model, sizes=SIZES) -> torch.Tensor:
    """Each image's placeholders (as many as OneVision's packing makes) then 3 text tokens, left-padded."""
    lengths = [len(features) for features in model.model.get_image_features(
        image_indices=model.encode_edge(pixels(), sizes), image_sizes=sizes, return_dict=True).pooler_output]
    width = max(lengths) + 3
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length - 3 : width - 3] = IMAGE_TOKEN
        ids[row, width - 3 :] = torch.tensor([5, 6, 7])
    return ids


def test_geometry_follows_onevision_tiling():
    model = tiny_split()
    geometry = model.frame_geometry(SIZES)
    expected = tuple(image_size_to_num_patches(size, PINPOINTS, TILE) for size in SIZES.tolist())
    assert geometry.tiles_per_image == expected == (5, 2)
    assert geometry.tile_grids == ((2, 2), (1, 1))
    assert (geometry.patch_grid, geometry.tokens_per_tile, geometry.num_tokens) == ((4, 4), 16, 7 * 16)
    # A two-image sample: each image is its base view only.
    assert model.frame_geometry(SIZES, batch_num_images=[2]).tiles_per_image == (1, 1)
    with pytest.raises(ValueError, match="image_sizes"):
        model.frame_geometry(None)
    with pytest.raises(ValueError, match="batch_num_images"):
        model.frame_geometry(SIZES, batch_num_images=[1])


def test_geometry_matches_the_image_processor():
    """The tiles the processor makes for photos of three shapes are exactly those the geometry names: the rest
    of each image's padded slots are empty, and the edge takes the processor's output as it is."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    processor = LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE}, image_grid_pinpoints=PINPOINTS)
    photos = [Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))
              for seed, (h, w) in enumerate([(20, 30), (16, 16), (40, 12)])]
    batch = processor(photos, return_tensors="pt")
    model = tiny_split()
    geometry = model.frame_geometry(batch["image_sizes"], batch["batch_num_images"])
    assert geometry.tiles_per_image == (5, 2, 3) and geometry.tile_grids == ((2, 2), (1, 1), (2, 1))
    filled = (batch["pixel_values"].abs().flatten(2).sum(-1) > 0).sum(-1)
    assert tuple(filled.tolist()) == geometry.tiles_per_image
    indices = model.encode_edge(batch["pixel_values"], batch["image_sizes"], batch["batch_num_images"])
    assert indices.shape == (10, 16)


@pytest.mark.parametrize("site", ["patch", "input", "attn", "mlp"])
def test_split_without_quantization_is_the_stock_model(site, monkeypatch):
    """Exact sites with the quantizer bypassed give OneVision's own packed image features: tiling, the
    tower's continuation, the projector and the packing are the stock model's."""
    base = tiny_onevision()
    expected = base.model.get_image_features(pixels(), SIZES, return_dict=True).pooler_output
    model = from_vlm(base, split_layer=0 if site == "patch" else 1, split_site=site, codebook_size=16)

    def unquantized(z):
        return AlignedVQLayerOutput(z, torch.zeros(*z.shape[:2], 1, dtype=torch.long))

    monkeypatch.setattr(model.model.alignedvq, "forward", unquantized)
    ours = model.model.get_image_features(pixels(), SIZES, return_dict=True).pooler_output
    assert [tuple(t.shape) for t in ours] == [tuple(t.shape) for t in expected]
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("site", "layer"), [("patch", 0), ("input", 1), ("ln1", 0), ("attn", 1), ("ln2", 2), ("mlp", 1)]
)
def test_pixels_and_indices_give_the_same_forward(site, layer):
    model = tiny_split(site, layer)
    ids = prompt(model)
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)
    indices = model.encode_edge(pixels(), SIZES)
    assert indices.shape == (7, 16) and indices.dtype == torch.long
    from_pixels = model(input_ids=ids, pixel_values=pixels(), image_sizes=SIZES, labels=labels)
    from_indices = model.forward_from_indices(indices, input_ids=ids, image_sizes=SIZES, labels=labels)
    assert torch.equal(from_pixels.logits, from_indices.logits)
    assert torch.equal(from_pixels.loss, from_indices.loss)
    assert torch.equal(from_pixels.image_indices, indices)
    # The padding tiles of the short image never reach the tower: changing them changes nothing.
    other = pixels()
    other[1, 2:] = 0
    assert torch.equal(model.encode_edge(other, SIZES), indices)


def test_generate_from_pixels_and_from_indices_agree():
    model = tiny_split()
    ids = prompt(model)
    mask = (ids != 0).long()
    for beams in (1, 2):  # beams expand the pre-encoded image as generation does for pixels
        options = dict(input_ids=ids, attention_mask=mask, image_sizes=SIZES, max_new_tokens=6, do_sample=False,
                       num_beams=beams)
        from_pixels = model.generate(pixel_values=pixels(), **options)
        from_indices = model.generate(image_indices=model.encode_edge(pixels(), SIZES), **options)
        assert from_pixels.shape == (2, ids.shape[1] + 6)
        assert torch.equal(from_pixels, from_indices)
    # The image matters: other pixels, other indices.
    assert not torch.equal(model.encode_edge(pixels(seed=1), SIZES), model.encode_edge(pixels(), SIZES))


def test_a_two_image_prompt_sends_base_views_only():
    model = tiny_split()
    count = torch.tensor([2])
    tiles = pixels()[:, 0]  # (2, 3, tile, tile): one base view per image
    indices = model.encode_edge(tiles, SIZES, batch_num_images=count)
    assert indices.shape == (2, 16)
    image = model.model.get_image_features(image_indices=indices, image_sizes=SIZES, batch_num_images=count)
    lengths = [len(features) for features in image.pooler_output]
    assert lengths == [17, 17]  # 16 tokens and a newline each
    ids = torch.cat([torch.full((1, sum(lengths)), IMAGE_TOKEN), torch.tensor([[5, 6]])], dim=1)
    options = dict(input_ids=ids, image_sizes=SIZES, batch_num_images=count)
    from_pixels = model(pixel_values=tiles, **options)
    assert torch.equal(from_pixels.logits, model.forward_from_indices(indices, **options).logits)


def test_videos_are_refused():
    model = tiny_split()
    ids = prompt(model)
    video = torch.zeros(1, 2, 3, TILE, TILE)
    with pytest.raises(ValueError, match="pixel_values_videos"):
        model(input_ids=ids, pixel_values_videos=video)
    with pytest.raises(ValueError, match="pixel_values_videos"):
        model.generate(input_ids=ids, pixel_values_videos=video, max_new_tokens=1)


def test_vision_layer_outputs_are_the_towers():
    """Transformers' own OneVision tests ask get_image_features for every hidden state and attention of the tower:
    before the split they are the edge's (the stock tower's, before quantization), after it the cloud's; from
    indices the edge's are None; indices select states as in Transformers."""
    model = tiny_split()  # mlp site of block 1 in a 3-block tower: states 0-1 on the edge, 2-3 in the cloud
    model.set_attn_implementation("eager")
    tiles = model.model.pixel_tiles(pixels(), model.frame_geometry(SIZES))
    stock = model.model.vision_tower(tiles, output_hidden_states=True, output_attentions=True)
    image = model.model.get_image_features(pixels(), SIZES, output_hidden_states=True, output_attentions=True)
    assert len(image.hidden_states) == 4 and len(image.attentions) == 3
    edge, stock_edge = image.hidden_states[:2] + image.attentions[:2], stock.hidden_states[:2] + stock.attentions[:2]
    for ours, theirs in zip(edge, stock_edge):
        torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(image.hidden_states[-1], image.last_hidden_state)  # feature layer -1, "full"
    indices = model.encode_edge(pixels(), SIZES)
    cloud = model.model.get_image_features(image_indices=indices, image_sizes=SIZES, output_hidden_states=True,
                                           output_attentions=True)
    assert cloud.hidden_states[:2] == (None, None) and len(cloud.attentions) == 1
    for ours, theirs in zip(cloud.hidden_states[2:], image.hidden_states[2:]):
        torch.testing.assert_close(ours, theirs)
    picked = model.model.get_image_features(pixels(), SIZES, output_hidden_states=[0, -1]).hidden_states
    assert picked[1] is None and picked[2] is None
    torch.testing.assert_close(picked[0], image.hidden_states[0])
    torch.testing.assert_close(picked[3], image.hidden_states[3])
    model.config.vision_config.output_hidden_states = True  # the config's flag, as Transformers reads it
    assert len(model.model.get_image_features(pixels(), SIZES).hidden_states) == 4


def test_grouped_codes_travel_per_tile():
    model = from_vlm(tiny_onevision(), split_layer=1, split_site="mlp", codebook_size=16, num_groups=2)
    indices = model.encode_edge(pixels(), SIZES)
    assert indices.shape == (7, 16, 2)
    ids = prompt(model)
    from_pixels = model(input_ids=ids, pixel_values=pixels(), image_sizes=SIZES)
    assert torch.equal(from_pixels.logits, model.forward_from_indices(indices, input_ids=ids, image_sizes=SIZES).logits)
    with pytest.raises(ValueError, match=r"\(7, 16, 2\)"):
        model.forward_from_indices(indices[..., 0], input_ids=ids, image_sizes=SIZES)


def test_indices_are_checked_against_the_geometry():
    model = tiny_split()
    ids = prompt(model)
    indices = model.encode_edge(pixels(), SIZES)
    with pytest.raises(ValueError, match=r"\(7, 16\)"):
        model.forward_from_indices(indices[:5], input_ids=ids, image_sizes=SIZES)
    with pytest.raises(ValueError):
        model.forward_from_indices(indices + 16, input_ids=ids, image_sizes=SIZES)
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=ids, pixel_values=pixels(), image_indices=indices, image_sizes=SIZES)
    with pytest.raises(ValueError, match="tiles"):
        model.encode_edge(pixels()[:, :3], SIZES)


def test_training_adds_the_commitment_loss_and_reaches_the_tower():
    model = tiny_split("mlp", 1).train()
    ids = prompt(model.eval()).clone()
    model.train()
    labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)
    out = model(input_ids=ids, pixel_values=pixels(), image_sizes=SIZES, labels=labels)
    assert out.commitment_loss is not None and out.commitment_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + model.config.commitment_weight * out.commitment_loss)
    out.loss.backward()
    assert model.model.vision_tower.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0


def test_init_codebook_clusters_every_tile():
    model = from_vlm(tiny_onevision(), split_layer=1, split_site="mlp", codebook_size=16)
    before = model.model.alignedvq.quantizer.codebook.clone()
    count = model.init_codebook([{"pixel_values": pixels(), "image_sizes": SIZES}], iters=2)
    assert count == 7 * 16
    assert not torch.equal(before, model.model.alignedvq.quantizer.codebook)


def test_save_and_load_through_the_auto_class(tmp_path):
    model = tiny_split()
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is LlavaOnevisionAlignedVQForConditionalGeneration
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (loaded.config.split_site, loaded.config.split_layer, loaded.config.codebook_size) == ("mlp", 1, 16)
    ids = prompt(model)
    indices = model.encode_edge(pixels(), SIZES)
    assert torch.equal(loaded.eval().encode_edge(pixels(), SIZES), indices)
    a = model.forward_from_indices(indices, input_ids=ids, image_sizes=SIZES).logits
    assert torch.equal(a, loaded.forward_from_indices(indices, input_ids=ids, image_sizes=SIZES).logits)


def test_from_vlm_dispatches_by_family(tmp_path):
    assert tav.from_vlm is from_vlm
    llava = from_vlm(tiny_llava(), split_layer=0, split_site="ln1", codebook_size=16)
    assert type(llava) is LlavaAlignedVQForConditionalGeneration
    assert LlavaAdapter.geometry(llava.config, [(32, 32)] * 3).num_tokens == 3 * llava.config.num_image_tokens
    onevision = from_vlm(tiny_onevision(), split_layer=1, split_site="input", codebook_size=16)
    assert type(onevision) is LlavaOnevisionAlignedVQForConditionalGeneration
    assert not onevision.training
    tiny_onevision().save_pretrained(tmp_path)
    from_folder = from_vlm(str(tmp_path), split_layer=1, codebook_size=16)
    assert type(from_folder) is LlavaOnevisionAlignedVQForConditionalGeneration
    text_only = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration, LlavaNextForConditionalGeneration, LlavaOnevision"):
        from_vlm(text_only, codebook_size=16)
    with pytest.raises(TypeError, match="already split"):
        from_vlm(onevision, codebook_size=16)
    with pytest.raises(ValueError, match="split_layer"):
        from_vlm(tiny_onevision(), split_layer=3, codebook_size=16)


def test_another_feature_layer_from_indices_and_one_before_the_split_refused():
    model = tiny_split("ln1", 1)
    ids, indices = prompt(model), model.encode_edge(pixels(), SIZES)
    options = dict(input_ids=ids, image_sizes=SIZES, vision_feature_layer=-2)
    from_pixels = model(pixel_values=pixels(), **options).logits
    assert torch.equal(from_pixels, model.forward_from_indices(indices, **options).logits)
    assert not torch.equal(from_pixels, model.forward_from_indices(indices, input_ids=ids, image_sizes=SIZES).logits)
    with pytest.raises(ValueError, match="before the split"):
        model.forward_from_indices(indices, input_ids=ids, image_sizes=SIZES, vision_feature_layer=1)


def test_a_capped_tile_grid_is_shared_by_the_processor_and_the_model():
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    capped = cap_pinpoints(PINPOINTS, TILE, max_grid_tiles=2)
    assert capped == [[16, 16], [16, 32], [32, 16]]
    model = from_vlm(tiny_onevision(), split_layer=1, split_site="mlp", codebook_size=16, image_grid_pinpoints=capped)
    processor = LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE}, image_grid_pinpoints=capped)
    photo = Image.fromarray(np.random.RandomState(0).randint(0, 255, (30, 40, 3), dtype=np.uint8))
    batch = processor([photo], return_tensors="pt")
    assert tiny_split().frame_geometry(batch["image_sizes"]).tiles_per_image == (5,)  # uncapped: 2x2 + base
    geometry = model.frame_geometry(batch["image_sizes"])
    assert geometry.tiles_per_image == (3,) and geometry.tile_grids == ((1, 2),)
    assert batch["pixel_values"].shape[1] == 3
    indices = model.encode_edge(batch["pixel_values"], batch["image_sizes"])
    lengths = [len(f) for f in model.model.get_image_features(image_indices=indices,
                                                                image_sizes=batch["image_sizes"]).pooler_output]
    ids = torch.cat([torch.full((1, lengths[0]), IMAGE_TOKEN), torch.tensor([[5, 6]])], dim=1)
    options = dict(input_ids=ids, image_sizes=batch["image_sizes"])
    from_pixels = model(pixel_values=batch["pixel_values"], **options).logits
    assert torch.equal(from_pixels, model.forward_from_indices(indices, **options).logits)
    with pytest.raises(ValueError, match="at most 0|positive"):
        cap_pinpoints(PINPOINTS, TILE, max_grid_tiles=0)
