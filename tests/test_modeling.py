import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForImageTextToText, LlavaConfig, LlavaForConditionalGeneration

import transformers_alignedvq as tav
from tests.conftest import IMAGE_SIZE, NUM_PATCHES, prompt_ids, tiny_alignedvq, tiny_llava
from transformers_alignedvq import split

VARIANTS = [dict(), dict(num_codebooks=2, num_groups=4), dict(codebook_dim=16), dict(use_dlp=False)]


SITE_LAYERS = [(site, layer) for site in tav.SPLIT_SITES for layer in (0, 1) if not (site == "patch" and layer)]


@pytest.mark.parametrize("site,split_layer", SITE_LAYERS)
def test_pixels_and_indices_give_the_same_logits(site, split_layer, pixels):
    model = tiny_alignedvq(split_layer=split_layer, split_site=site)
    with torch.no_grad():  # non-zero DLP gates so the test covers both projections
        model.model.alignedvq.dlp_in.gate.fill_(0.3)
        model.model.alignedvq.dlp_out.gate.fill_(-0.2)
    ids = prompt_ids()
    indices = model.encode_edge(pixels)
    assert indices.shape == (2, NUM_PATCHES + 1) and indices.dtype == torch.long
    assert 0 <= int(indices.min()) and int(indices.max()) < 16
    with torch.no_grad():
        from_pixels = model(input_ids=ids, pixel_values=pixels)
        from_indices = model.forward_from_indices(indices, input_ids=ids)
    assert torch.equal(from_pixels.image_indices, indices)
    torch.testing.assert_close(from_pixels.logits, from_indices.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("options", VARIANTS)
def test_variants_split_consistently(options, pixels):
    model = tiny_alignedvq(split_site="ln2", **options)
    indices = model.encode_edge(pixels)
    codes = model.config.codes_per_token
    assert indices.shape == ((2, NUM_PATCHES + 1) if codes == 1 else (2, NUM_PATCHES + 1, codes))
    ids = prompt_ids()
    with torch.no_grad():
        a = model(input_ids=ids, pixel_values=pixels).logits
        b = model.forward_from_indices(indices, input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_greedy_generation_from_pixels_and_from_indices_agree(pixels):
    model = tiny_alignedvq()
    ids = prompt_ids()
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    from_pixels = model.generate(pixel_values=pixels, **kwargs)
    from_indices = model.generate(image_indices=model.encode_edge(pixels), **kwargs)
    assert from_pixels.shape == (2, ids.shape[1] + 6)
    assert torch.equal(from_pixels, from_indices)


def test_split_halves_recompose_the_stock_clip_block():
    torch.manual_seed(0)
    tower = tiny_llava().model.vision_tower
    block = tower.encoder.layers[1]
    x = torch.randn(2, 17, 32)
    full = block(x, None)
    for site in ("attn", "mlp"):  # residual-stream sites: edge + cloud = the original block
        torch.testing.assert_close(split.block_from_site(block, split.block_to_site(block, x, site), site), full)
    z = split.block_to_site(block, x, "ln1")  # LayerNorm sites: z replaces the residual as documented
    h = z + block.self_attn(z)[0]
    torch.testing.assert_close(split.block_from_site(block, z, "ln1"), h + block.mlp(block.layer_norm2(h)))
    z = split.block_to_site(block, x, "ln2")
    torch.testing.assert_close(split.block_from_site(block, z, "ln2"), z + block.mlp(z))
    # without quantization, edge + cloud reproduce the tower's hidden states
    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    stock = tower(pixels, output_hidden_states=True).hidden_states
    edge = split.edge_forward(tower, pixels, 1, "attn")
    hidden = split.cloud_forward(tower, edge, 1, "attn", [2, 3])
    torch.testing.assert_close(hidden[2], stock[2])
    torch.testing.assert_close(hidden[3], stock[3])


@pytest.mark.parametrize("site,split_layer", [("mlp", 0), ("input", 0), ("input", 1), ("patch", 0)])
def test_residual_stream_sites_with_an_identity_quantizer_reproduce_llava(pixels, site, split_layer):
    # With a codebook holding every site feature exactly, the residual-stream sites (`input`, `mlp`) are
    # lossless and the model must equal the stock LLaVA it came from: nothing else in the cloud path differs.
    llava = tiny_llava()
    reference = tiny_llava()
    model = tav.LlavaAlignedVQForConditionalGeneration.from_llava(
        llava, split_site=site, split_layer=split_layer, codebook_size=34
    ).eval()
    features = model.model.edge_features(pixels).reshape(-1, 32)
    with torch.no_grad():
        model.model.alignedvq.quantizer.codebook[0, 0] = features
    ids = prompt_ids()
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=pixels).logits
        got = model(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_save_and_load_round_trip(tmp_path, pixels):
    model = tiny_alignedvq(split_site="attn", codebook_size=32)
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llava_alignedvq"
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is tav.LlavaAlignedVQForConditionalGeneration
    assert loaded.config.split_site == "attn" and loaded.config.codebook_size == 32
    assert torch.equal(loaded.encode_edge(pixels), model.encode_edge(pixels))
    ids = prompt_ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, pixel_values=pixels).logits, model(input_ids=ids, pixel_values=pixels).logits, atol=0, rtol=0)
    again = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(again) is tav.LlavaAlignedVQForConditionalGeneration


def test_llava_checkpoint_loads_with_only_alignedvq_missing(tmp_path, pixels):
    llava = tiny_llava()
    llava.save_pretrained(tmp_path)
    model = tav.LlavaAlignedVQForConditionalGeneration.from_llava(str(tmp_path), codebook_size=16)
    base, ours = llava.state_dict(), model.state_dict()
    assert set(base) <= set(ours)
    assert all(k.startswith("model.alignedvq.") for k in set(ours) - set(base))
    assert all(torch.equal(base[k], ours[k]) for k in base)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    model.save_pretrained(tmp_path / "ours")
    with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert names <= saved, "base parameter names on disk must not change"
    # a fresh DLP is the identity: gates start at zero
    assert model.model.alignedvq.dlp_in.gate.item() == 0.0 == model.model.alignedvq.dlp_out.gate.item()


def test_llava_1_5_7b_converts_on_the_meta_device_with_names_intact(llava_7b_config_path):
    config = LlavaConfig.from_pretrained(llava_7b_config_path)
    with torch.device("meta"):
        llava = LlavaForConditionalGeneration(config)
    base = {k: v.shape for k, v in llava.state_dict().items()}
    model = tav.LlavaAlignedVQForConditionalGeneration.from_llava(llava)
    ours = {k: v.shape for k, v in model.state_dict().items()}
    assert {k: ours[k] for k in base} == base
    extra = set(ours) - set(base)
    assert extra and all(k.startswith("model.alignedvq.") for k in extra)
    assert ours["model.alignedvq.quantizer.codebook"] == (1, 1, 4096, 1024)
    assert ours["model.alignedvq.dlp_in.proj.weight"] == (1024, 1024)
    assert model.config.num_image_tokens == 577
    assert "model.vision_tower.encoder.layers.0.layer_norm1.weight" in ours


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_loading_keeps_an_fp32_codebook_and_exact_search(tmp_path, pixels, dtype):
    model = tiny_alignedvq()
    model.save_pretrained(tmp_path)
    half = AutoModel.from_pretrained(tmp_path, dtype=dtype, device_map="auto").eval()
    quantizer = half.model.alignedvq.quantizer
    assert quantizer.codebook.dtype == torch.float32
    assert half.model.alignedvq.dlp_in.proj.weight.dtype == dtype
    torch.testing.assert_close(quantizer.codebook, model.model.alignedvq.quantizer.codebook, atol=0, rtol=0)
    site = half.model.edge_features(pixels)
    assert site.dtype == dtype
    expected = torch.cdist(half.model.alignedvq.pre_quantization(site).double(), quantizer.codebook[0, 0].double()).argmin(-1)
    assert torch.equal(half.encode_edge(pixels), expected)
    ids = prompt_ids()
    with torch.no_grad():
        out = half.forward_from_indices(half.encode_edge(pixels), input_ids=ids)
    assert out.logits.dtype == dtype and torch.isfinite(out.logits).all()


def test_training_step_adds_commitment_loss_and_updates_codebook(pixels):
    model = tiny_alignedvq(codebook_size=8)
    model.train()
    ids = prompt_ids()
    labels = ids.clone()
    labels[:, :NUM_PATCHES] = -100
    before = model.model.alignedvq.quantizer.codebook.clone()
    out = model(input_ids=ids, pixel_values=pixels, labels=labels)
    torch.testing.assert_close(out.loss, out.lm_loss + model.config.commitment_weight * out.commitment_loss)
    assert out.commitment_loss > 0 and 1 <= float(out.codebook_perplexity) <= 8
    assert not torch.equal(model.model.alignedvq.quantizer.codebook, before), "EMA must move the codebook"
    out.loss.backward()
    vq = model.model.alignedvq
    assert vq.dlp_in.gate.grad is not None and vq.dlp_in.gate.grad.abs() > 0
    assert vq.dlp_out.gate.grad is not None and vq.dlp_out.gate.grad.abs() > 0
    # straight-through: the vision blocks before the split still learn
    assert model.model.vision_tower.embeddings.patch_embedding.weight.grad.abs().sum() > 0


def test_init_codebook_fits_real_site_features(pixels):
    model = tiny_alignedvq(calibrate=False, codebook_size=16)
    site = model.model.edge_features(pixels).reshape(-1, 32)
    random_error = ((model.model.alignedvq.quantizer(site).quantized - site) ** 2).mean()
    assert model.init_codebook([pixels, {"pixel_values": pixels}], iters=10) == 2 * 2 * (NUM_PATCHES + 1)
    fitted_error = ((model.model.alignedvq.quantizer(site).quantized - site) ** 2).mean()
    assert fitted_error < 0.5 * random_error
    with pytest.raises(ValueError, match="no calibration"):
        model.init_codebook([])


def test_bad_inputs_raise_value_errors_naming_the_problem(pixels):
    model = tiny_alignedvq()
    good = model.encode_edge(pixels)
    ids = prompt_ids()
    cases = [
        (good[:, :-1], "tokens per image"),
        (good[0], "shape"),
        (good.unsqueeze(-1).expand(-1, -1, 2), "shape"),
        (good.float(), "integer dtype"),
        (good.clone().fill_(16), "out of range"),
        (good.clone().fill_(-1), "out of range"),
        (good.tolist(), "torch.Tensor"),
    ]
    for indices, words in cases:
        with pytest.raises(ValueError, match=words):
            model.forward_from_indices(indices, input_ids=ids)
    with pytest.raises(ValueError, match="shape"):
        model.encode_edge(torch.randn(2, 3, IMAGE_SIZE + 8, IMAGE_SIZE))
    with pytest.raises(ValueError, match="shape"):
        model.encode_edge(torch.randn(3, IMAGE_SIZE, IMAGE_SIZE))
    with pytest.raises(ValueError, match="floating point"):
        model.encode_edge(torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8))
    with pytest.raises(ValueError, match="exactly one"):
        model.model.get_image_features(pixel_values=pixels, image_indices=good)
    with pytest.raises(ValueError, match="not both"):
        model.generate(input_ids=ids, pixel_values=pixels, image_indices=good, max_new_tokens=1)
    grouped = tiny_alignedvq(num_groups=2)
    with pytest.raises(ValueError, match="codes per token"):
        grouped.forward_from_indices(torch.zeros(2, NUM_PATCHES + 1, 3, dtype=torch.long), input_ids=ids)
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        tav.LlavaAlignedVQForConditionalGeneration.from_llava(object())


def test_edge_side_imports_nothing_from_the_cloud():
    code = (
        "import sys, transformers_alignedvq.export.edge\n"
        "banned = ['fastapi', 'uvicorn', 'peft', 'datasets', 'transformers.trainer',"
        " 'transformers.models.llama.modeling_llama', 'transformers_alignedvq.serving', 'transformers_alignedvq.training']\n"
        "print([m for m in banned if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_eval_forward_on_pixels_equals_the_cloud_on_the_edge_indices_loss_included(pixels):
    model = tiny_alignedvq()
    ids = prompt_ids()
    out = model(input_ids=ids, pixel_values=pixels, labels=ids)
    cloud = model.forward_from_indices(model.encode_edge(pixels), input_ids=ids, labels=ids)
    assert out.commitment_loss is None and out.codebook_perplexity is None
    assert torch.equal(out.loss, cloud.loss) and torch.equal(out.loss, out.lm_loss)
    assert torch.equal(out.logits, cloud.logits)
    model.train()  # training: the commitment term is part of the loss (Eq. 3)
    out = model(input_ids=ids, pixel_values=pixels, labels=ids)
    assert out.commitment_loss is not None
    torch.testing.assert_close(out.loss, out.lm_loss + model.config.commitment_weight * out.commitment_loss)


def test_output_carries_every_field_of_the_parents_output_unchanged(pixels):
    import dataclasses

    from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast

    model = tiny_alignedvq()
    ids = prompt_ids()
    ours = {f.name for f in dataclasses.fields(tav.LlavaAlignedVQCausalLMOutputWithPast)}
    assert {f.name for f in dataclasses.fields(LlavaCausalLMOutputWithPast)} <= ours
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pixels, labels=ids, output_hidden_states=True, use_cache=True)
        image = model.model.get_image_features(pixel_values=pixels)
        embeds = model.model.embed_with_image(ids, None, image)
        stock = LlavaForConditionalGeneration.forward(
            model, inputs_embeds=embeds, labels=ids, output_hidden_states=True, use_cache=True
        )
    assert set(stock.keys()) <= set(out.keys())
    for key, value in stock.items():
        assert _same(out[key], value), key
    with torch.no_grad():
        as_tuple = model(input_ids=ids, pixel_values=pixels, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.logits)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b)  # a cache object: the same kind, filled by the same language model


def test_no_call_is_reported_as_deprecated_by_the_installed_transformers(tmp_path):
    # Transformers warns once per process, so the check runs in a fresh one.
    code = """
import logging, warnings, torch
from tests.conftest import prompt_ids, tiny_alignedvq, NUM_PATCHES
from transformers_alignedvq.training import prepare_for_finetuning, shared_image_prefix_loss
records = []
class Keep(logging.Handler):
    def emit(self, record): records.append(record.getMessage())
logging.getLogger("transformers").addHandler(Keep())
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    model = tiny_alignedvq()
    ids = prompt_ids()
    pixels = torch.randn(2, 3, 32, 32)
    model.generate(input_ids=ids, image_indices=model.encode_edge(pixels), max_new_tokens=3)
    model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
    model(input_ids=ids, pixel_values=pixels, labels=ids, use_cache=True)
    prepare_for_finetuning(model, lora_r=2).train()
    labels = ids.clone(); labels[:, :NUM_PATCHES + 1] = -100
    same = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, pixel_values=pixels[:1].expand(2, -1, -1, -1))
    shared_image_prefix_loss(model, same).lm_loss.backward()
    model(**same).loss.backward()
messages = records + [str(w.message) for w in caught]
print([m for m in messages if "deprecat" in m.lower()])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(Path(__file__).parents[1]))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_init_codebook_works_on_a_half_precision_model(pixels, dtype):
    model = tiny_alignedvq(calibrate=False).to(dtype)
    with torch.no_grad():
        model.model.alignedvq.dlp_in.gate.fill_(0.4)  # the features pass through a non-trivial input DLP
    assert model.init_codebook([pixels], iters=3) == 2 * (NUM_PATCHES + 1)
    codebook = model.model.alignedvq.quantizer.codebook
    assert codebook.dtype == torch.float32 and torch.isfinite(codebook).all()
    site = model.model.edge_features(pixels).reshape(-1, 32)
    weight, bias = model.model.alignedvq._pre_quantization_affine()
    pre = site.float() @ weight.T + bias
    # every codeword is a mean of real (projected) features: each lies within their range
    assert pre.min() - 1e-3 <= codebook.min() and codebook.max() <= pre.max() + 1e-3


def test_from_pretrained_refuses_a_plain_llava_folder_and_points_to_from_llava(tmp_path):
    tiny_llava().save_pretrained(tmp_path)
    with pytest.raises(tav.CheckpointMismatchError, match="from_llava"):
        tav.LlavaAlignedVQForConditionalGeneration.from_pretrained(tmp_path)


@pytest.mark.parametrize("training", [False, True])
def test_from_llava_keeps_the_mode_of_the_model_it_got(training, pixels):
    llava = tiny_llava().train(training)
    model = tav.LlavaAlignedVQForConditionalGeneration.from_llava(llava, codebook_size=8)
    assert model.training is training
    assert all(module.training is training for module in model.modules())
    before = model.model.alignedvq.quantizer.codebook.clone()
    with torch.no_grad():
        model(input_ids=prompt_ids(), pixel_values=pixels)
    assert torch.equal(model.model.alignedvq.quantizer.codebook, before) is not training


def test_from_llava_on_a_path_returns_an_eval_model_with_the_base_weights(tmp_path):
    llava = tiny_llava()
    llava.save_pretrained(tmp_path)
    model = tav.LlavaAlignedVQForConditionalGeneration.from_llava(str(tmp_path), codebook_size=8)
    assert not model.training
    assert torch.equal(model.lm_head.weight, llava.lm_head.weight)
