"""Qwen2.5-VL with AlignedVQ on a tiny random model: two windowed blocks before a full-attention one, windows of
2x2 merge units (4x4 patches) so that both images of a batch are cut into several windows, some cut short at
the image's edge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import transformers_alignedvq as tav
from transformers_alignedvq.models.family import FrameGeometry, from_vlm
from transformers_alignedvq.models.llava_alignedvq.alignedvq_layer import AlignedVQLayerOutput
from transformers_alignedvq.models.qwen2_5_vl_alignedvq.modeling_qwen2_5_vl_alignedvq import (
    _HAS_MM_ENCODER_OUTPUTS,
    Qwen2_5_VLAdapter,
    Qwen2_5_VLAlignedVQForConditionalGeneration,
)
from transformers_alignedvq.models.qwen2_5_vl_alignedvq.split_qwen2_5_vl import token_layout

pytestmark = pytest.mark.skipif(not _HAS_MM_ENCODER_OUTPUTS, reason="needs Qwen2.5-VL's forward(mm_encoder_outputs)")

IMAGE, VIDEO, START, END = 99, 98, 97, 96
PATCH, MERGE, TEMPORAL = 2, 2, 2
PATCH_DIM = 3 * TEMPORAL * PATCH * PATCH
# A 6x8-patch image (3x4 merge units: 2x2 windows, two of them cut short) and a 4x6 one (2x3 units: 1x2 windows).
GRID = torch.tensor([[1, 6, 8], [1, 4, 6]])
NUM_PATCHES = 48 + 24
ALLOWED = [("patch", 0), ("input", 0), ("input", 1), ("ln1", 0), ("ln1", 1), ("mlp", 0), ("mlp", 1)]


def tiny_config(fullatt_block_indexes=(2,)) -> Qwen2_5_VLConfig:
    return Qwen2_5_VLConfig(
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=PATCH,
                           spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, window_size=4 * PATCH,
                           fullatt_block_indexes=list(fullatt_block_indexes), out_hidden_size=32),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         initializer_range=0.1,  # larger weights than the default, so positions visibly matter
                         rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END,
    )


def tiny_qwen(seed: int = 0, **config) -> Qwen2_5_VLForConditionalGeneration:
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(tiny_config(**config)).eval()


def tiny_split(site: str = "mlp", layer: int = 1, seed: int = 0, **vq) -> Qwen2_5_VLAlignedVQForConditionalGeneration:
    model = from_vlm(tiny_qwen(seed), split_layer=layer, split_site=site, codebook_size=16, **vq)
    torch.manual_seed(seed + 1)
    model.init_codebook([{"pixel_values": pixels(), "image_grid_thw": GRID}], iters=3)
    return model


def pixels(seed: int = 0) -> torch.Tensor:
    """The processor's layout: every patch of both images, flattened, ``(num_patches, patch_dim)``."""
    return torch.randn(NUM_PATCHES, PATCH_DIM, generator=torch.Generator().manual_seed(seed))


def prompt() -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts: <start>, each image's t*h*w/4 placeholders, <end>, then 3 text tokens."""
    counts = (GRID.prod(-1) // MERGE**2).tolist()
    width = max(counts) + 5
    ids = torch.zeros(len(counts), width, dtype=torch.long)
    for row, count in enumerate(counts):
        ids[row, width - count - 5 :] = torch.tensor([START] + [IMAGE] * count + [END, 5, 6, 7])
    return ids, (ids != 0).long()


def test_geometry_is_each_images_patch_grid():
    model = tiny_split()
    geometry = model.frame_geometry(GRID)
    assert geometry.image_patch_grids == ((1, 6, 8), (1, 4, 6))
    assert geometry.tokens_per_image == (48, 24) and geometry.num_tokens == NUM_PATCHES
    assert geometry.tiles_per_image == (1, 1)
    # The tiled families' geometry keeps its meaning.
    tiled = FrameGeometry((5, 2), ((2, 2), (1, 1)), (4, 4), 16)
    assert tiled.num_tokens == 7 * 16 and tiled.tokens_per_image == (80, 32)
    assert model.frame_geometry(np.array([[1, 6, 8]])).image_patch_grids == ((1, 6, 8),)  # numpy ints too
    for bad, match in [(None, "image_grid_thw"), (torch.tensor([[2, 6, 8]]), "t=2"), (torch.tensor([[1, 5, 8]]),
                       "multiples"), (torch.tensor([[1.0, 6, 8]]), "integer"), (torch.tensor([[1, 0, 8]]), "positive"),
                       ([[1, 6.0, 8]], "integers"), ([], "no image")]:
        with pytest.raises(ValueError, match=match):
            model.frame_geometry(bad)


@pytest.mark.parametrize(("site", "layer"), [("patch", 0), ("input", 1), ("mlp", 0), ("mlp", 1)])
def test_split_without_quantization_is_the_stock_model(site, layer, monkeypatch):
    """With the quantizer bypassed, the sites where the residual stream crosses give the stock tower's merged
    features exactly: windows, rotary positions, the wire's raster order and the merger are undone and redone
    as the stock forward does them."""
    expected = tiny_qwen().model.get_image_features(pixels(), GRID, return_dict=True).pooler_output
    model = from_vlm(tiny_qwen(), split_layer=layer, split_site=site, codebook_size=16)
    monkeypatch.setattr(model.model.alignedvq, "forward",
                        lambda z: AlignedVQLayerOutput(z, torch.zeros(z.shape[0], 1, dtype=torch.long)))
    ours = model.model.get_image_features(pixels(), GRID, return_dict=True).pooler_output
    assert [tuple(t.shape) for t in ours] == [(12, 32), (6, 32)]
    for a, b in zip(ours, expected, strict=True):
        assert torch.equal(a, b)


def test_the_wire_carries_patches_in_raster_order():
    """Features leave the edge image by image, each image's patches row by row, whatever the processor's and
    the windows' orders: checked against the image processor's own patches of two photos."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL,
                                         do_rescale=False, do_normalize=False,
                                         size={"shortest_edge": 16, "longest_edge": 4096})
    photos = [np.random.RandomState(seed).randint(0, 255, (h, w, 3)).astype(np.uint8)
              for seed, (h, w) in enumerate([(12, 16), (8, 12)])]
    batch = processor(photos, return_tensors="pt")
    assert torch.equal(batch["image_grid_thw"], GRID)
    model = tiny_split("patch", 0)
    sent = model.model.edge_features(batch["pixel_values"], GRID)
    raster = [torch.from_numpy(photo).permute(2, 0, 1).float().reshape(3, h, PATCH, w, PATCH).permute(1, 3, 0, 2, 4)
              for photo, (_, h, w) in zip(photos, GRID.tolist(), strict=True)]
    raster = torch.cat([p.reshape(-1, 3, 1, PATCH, PATCH).expand(-1, 3, TEMPORAL, PATCH, PATCH).reshape(-1, PATCH_DIM)
                        for p in raster])
    assert not torch.equal(raster, batch["pixel_values"])  # the processor's order is not raster order
    assert torch.equal(sent, model.model.visual.patch_embed(raster))
    assert model.encode_edge(batch["pixel_values"], GRID).shape == (NUM_PATCHES,)


@pytest.mark.parametrize(("site", "layer"), ALLOWED)
def test_pixels_and_indices_give_the_same_forward_and_tokens(site, layer):
    model = tiny_split(site, layer)
    ids, mask = prompt()
    labels = ids.masked_fill((ids == IMAGE) | (mask == 0), -100)
    indices = model.encode_edge(pixels(), GRID)
    assert indices.shape == (NUM_PATCHES,) and indices.dtype == torch.long
    options = dict(input_ids=ids, attention_mask=mask, image_grid_thw=GRID)
    from_pixels = model(pixel_values=pixels(), labels=labels, **options)
    from_indices = model.forward_from_indices(indices, labels=labels, **options)
    assert torch.equal(from_pixels.logits, from_indices.logits)
    assert torch.equal(from_pixels.loss, from_indices.loss)
    assert torch.equal(from_pixels.image_indices, indices)
    generate = dict(max_new_tokens=5, do_sample=False, **options)
    tokens = model.generate(pixel_values=pixels(), **generate)
    assert tokens.shape == (2, ids.shape[1] + 5)
    assert torch.equal(tokens, model.generate(image_indices=indices, **generate))


def test_generation_uses_3d_positions_at_every_step():
    """Each step's logits in `generate` (prompt positions from `get_rope_index`, then the cached rope deltas)
    equal a cache-free forward over the whole sequence, which recomputes the 3-D positions from scratch; 1-D
    positions would give other logits. Beams carry the pre-encoded image too."""
    model = tiny_split("ln1", 1)
    ids, mask = prompt()
    indices = model.encode_edge(pixels(), GRID)
    out = model.generate(input_ids=ids, attention_mask=mask, image_indices=indices, image_grid_thw=GRID,
                         max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    sequence = out.sequences
    for step, logits in enumerate(out.logits):
        length = ids.shape[1] + step
        full_mask = torch.cat([mask, torch.ones(2, step, dtype=torch.long)], dim=1)
        reference = model.forward_from_indices(indices, input_ids=sequence[:, :length], attention_mask=full_mask,
                                               image_grid_thw=GRID, use_cache=False).logits[:, -1]
        torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)
    flat = model.forward_from_indices(indices, input_ids=ids, attention_mask=mask, image_grid_thw=GRID,
                                      position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    assert (flat - out.logits[0]).abs().max() > 1e-2
    options = dict(input_ids=ids, attention_mask=mask, image_grid_thw=GRID, max_new_tokens=4, do_sample=False,
                   num_beams=2)
    assert torch.equal(model.generate(pixel_values=pixels(), **options),
                       model.generate(image_indices=indices, **options))
    positional = {name: value for name, value in options.items() if name != "input_ids"}
    assert torch.equal(model.generate(ids, image_indices=indices, **positional),  # the prompt given by position
                       model.generate(image_indices=indices, **options))
    assert torch.equal(model.generate(inputs=ids, image_indices=indices, **positional),  # ... or by generate's name
                       model.generate(image_indices=indices, **options))
    explicit = (ids == IMAGE).int()
    assert torch.equal(model.generate(image_indices=indices, mm_token_type_ids=explicit, **options),
                       model.generate(image_indices=indices, **options))


@pytest.mark.parametrize(("site", "layer"), [("input", 2), ("ln1", 2), ("mlp", 2), ("attn", 0), ("ln2", 1),
                                             ("patch", 1)])
def test_sites_past_the_first_full_attention_block_are_refused(site, layer):
    with pytest.raises(ValueError, match="split_site='patch' comes before block 0|'input', 'ln1' or 'mlp'"):
        from_vlm(tiny_qwen(), split_layer=layer, split_site=site, codebook_size=16)


def test_a_tower_whose_first_block_is_global_splits_at_the_patch_only():
    with pytest.raises(ValueError, match="block 0 already attends over the whole image"):
        from_vlm(tiny_qwen(fullatt_block_indexes=(0, 2)), split_layer=0, split_site="input", codebook_size=16)
    model = from_vlm(tiny_qwen(fullatt_block_indexes=(0, 2)), split_layer=0, split_site="patch", codebook_size=16)
    with pytest.raises(ValueError, match="attention window"):
        Qwen2_5_VLAdapter.edge(model.model.visual, pixels(), 0, "ln1", layout=token_layout(model.model.visual, GRID))


def test_inputs_are_checked():
    model = tiny_split()
    ids, mask = prompt()
    indices = model.encode_edge(pixels(), GRID)
    options = dict(input_ids=ids, image_grid_thw=GRID)
    with pytest.raises(ValueError, match=rf"\({NUM_PATCHES},\)"):
        model.forward_from_indices(indices[:-4], **options)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_from_indices(indices + 16, **options)
    with pytest.raises(ValueError, match="not both"):
        model(pixel_values=pixels(), image_indices=indices, **options)
    with pytest.raises(ValueError, match="pixel_values must have shape"):
        model.encode_edge(pixels()[:-1], GRID)
    with pytest.raises(ValueError, match="image_grid_thw"):
        model.forward_from_indices(indices, input_ids=ids)
    with pytest.raises(ValueError, match="input_ids"):
        model.forward_from_indices(indices, inputs_embeds=model.get_input_embeddings()(ids), image_grid_thw=GRID)
    with pytest.raises(ValueError, match="pixel_values_videos"):
        model(input_ids=ids, pixel_values_videos=pixels(), video_grid_thw=GRID)


def test_vision_layer_outputs_are_the_towers_in_raster_order():
    """The stock forward passes output_hidden_states / output_attentions on to get_image_features, so a forward
    asking for them must work with an image (Transformers' own Qwen2.5-VL tests do). The tower's per-layer outputs
    come in raster order: the edge's (before the split) are the stock tower's, reordered; None from indices."""
    model = tiny_split()  # mlp site of block 1 in a 3-block tower: states 0-1 on the edge, 2-3 in the cloud
    ids, mask = prompt()
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels(), image_grid_thw=GRID,
                output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == 3
    if "image_outputs" in type(out).__dataclass_fields__:  # the parent's output has the tower's (not in 5.19)
        assert len(out.image_outputs.hidden_states) == 4 and len(out.image_outputs.attentions) == 3
    stock = model.model.visual(pixels(), grid_thw=GRID, output_hidden_states=True, output_attentions=True)
    raster = token_layout(model.model.visual, GRID).raster_from_window
    image = model.model.get_image_features(pixels(), GRID, output_hidden_states=True, output_attentions=True)
    edge, stock_edge = image.hidden_states[:2] + image.attentions[:2], stock.hidden_states[:2] + stock.attentions[:2]
    for ours, theirs in zip(edge, stock_edge):
        torch.testing.assert_close(ours, theirs[raster])
    torch.testing.assert_close(image.hidden_states[-1], image.last_hidden_state)
    cloud = model.model.get_image_features(image_indices=model.encode_edge(pixels(), GRID), image_grid_thw=GRID,
                                           output_hidden_states=[0, 2, -1], output_attentions=True)
    assert cloud.hidden_states[:2] == (None, None) and len(cloud.attentions) == 1
    torch.testing.assert_close(cloud.hidden_states[2], image.hidden_states[2])
    torch.testing.assert_close(cloud.hidden_states[3], image.hidden_states[3])


def test_grouped_codes_travel_per_patch():
    model = tiny_split("ln1", 0, num_groups=2)
    indices = model.encode_edge(pixels(), GRID)
    assert indices.shape == (NUM_PATCHES, 2)
    ids, mask = prompt()
    options = dict(input_ids=ids, attention_mask=mask, image_grid_thw=GRID)
    assert torch.equal(model(pixel_values=pixels(), **options).logits,
                       model.forward_from_indices(indices, **options).logits)


def test_init_codebook_clusters_every_patch():
    model = from_vlm(tiny_qwen(), split_layer=1, split_site="mlp", codebook_size=16)
    before = model.model.alignedvq.quantizer.codebook.clone()
    count = model.init_codebook([{"pixel_values": pixels(), "image_grid_thw": GRID}], iters=2)
    assert count == NUM_PATCHES
    assert not torch.equal(before, model.model.alignedvq.quantizer.codebook)


def test_finetune_recipe_trains_lora_and_dlp_only():
    from transformers_alignedvq.training import prepare_for_finetuning

    model = prepare_for_finetuning(tiny_split("ln1", 1), lora_r=4).train()
    ids, mask = prompt()
    labels = ids.masked_fill((ids == IMAGE) | (mask == 0), -100)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels(), image_grid_thw=GRID, labels=labels)
    assert out.commitment_loss is not None and out.commitment_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + model.config.commitment_weight * out.commitment_loss)
    out.loss.backward()
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name or ".alignedvq." in name for name in trained)
    assert any("language_model" in name and "lora_" in name for name in trained)
    assert not any("visual" in name for name in trained)
    for name, param in model.named_parameters():
        if "lora_B" in name or name.endswith("gate"):  # lora_A and the DLP projections start behind zeros
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_save_and_load_through_the_auto_class(tmp_path):
    model = tiny_split("ln1", 1)
    model.save_pretrained(tmp_path)
    loaded, info = AutoModelForImageTextToText.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is Qwen2_5_VLAlignedVQForConditionalGeneration
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (loaded.config.split_site, loaded.config.split_layer, loaded.config.codebook_size) == ("ln1", 1, 16)
    ids, mask = prompt()
    indices = model.encode_edge(pixels(), GRID)
    assert torch.equal(loaded.eval().encode_edge(pixels(), GRID), indices)
    options = dict(input_ids=ids, attention_mask=mask, image_grid_thw=GRID)
    assert torch.equal(model.forward_from_indices(indices, **options).logits,
                       loaded.forward_from_indices(indices, **options).logits)


def test_from_vlm_converts_a_loaded_model_and_a_folder(tmp_path):
    model = from_vlm(tiny_qwen(), split_layer=0, split_site="ln1", codebook_size=16)
    assert type(model) is Qwen2_5_VLAlignedVQForConditionalGeneration and not model.training
    assert tav.Qwen2_5_VLAlignedVQForConditionalGeneration is Qwen2_5_VLAlignedVQForConditionalGeneration
    tiny_qwen().save_pretrained(tmp_path)
    from_folder = from_vlm(str(tmp_path), split_layer=1, split_site="mlp", codebook_size=16)
    assert type(from_folder) is Qwen2_5_VLAlignedVQForConditionalGeneration
    assert from_folder.config.base_model_name_or_path == str(tmp_path)
    with pytest.raises(TypeError, match="already split"):
        from_vlm(model, codebook_size=16)
    with pytest.raises(TypeError, match="Qwen2_5_VLForConditionalGeneration"):
        from_vlm(torch.nn.Linear(2, 2), codebook_size=16)
