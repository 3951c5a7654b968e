"""Post-training quantization (`ptq/`): quantizer math, the three methods on tiny models,
saved checkpoints (strict loading) and serving a quantized model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import IMAGE_SIZE, IMAGE_TOKEN, NUM_PATCHES, tiny_alignedvq, tiny_llava
from safetensors.torch import load_file, save_file
from torch import nn

import transformers_alignedvq as tav
from transformers_alignedvq import ptq
from transformers_alignedvq.ptq import (
    Calibrator,
    PTQConfig,
    dependency_analysis,
    model_steps,
    quantize_model,
    r_squared,
    token_entropy,
)

# Short grids keep each search to a fraction of a second on these tiny models.
FAST = {"clip_grid": (1.0, 0.8, 0.6), "joint_grid": (0.9, 1.1), "search_rows": 512}


def calibration(count: int = 2, batch: int = 4, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        text = torch.randint(5, IMAGE_TOKEN - 1, (batch, 6), generator=generator)
        ids = torch.cat([torch.full((batch, NUM_PATCHES), IMAGE_TOKEN), text], dim=1)
        mask = torch.ones_like(ids)
        mask[0, -2:] = 0  # one padded row
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        labels[:, :NUM_PATCHES] = -100
        pixels = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        batches.append({"pixel_values": pixels, "input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"]).logits


# ---------------------------------------------------------------------------------------------------------
# quantizer math
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 6, 8])
def test_weight_quantization_is_per_channel_symmetric_with_2_to_the_bits_levels(bits):
    weight = torch.randn(5, 64) * torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0]).unsqueeze(1)
    scales = ptq.weight_scales(weight, bits)
    qmin, qmax = ptq.weight_range(bits)
    quantized = ptq.fake_quantize(weight, scales.unsqueeze(1), 0, qmin, qmax)
    for row in range(5):
        levels = torch.unique(torch.round(quantized[row] / scales[row]))
        assert levels.numel() <= 2**bits and levels.min() >= qmin and levels.max() <= qmax
    # unclipped: every weight within half a step of its quantized value, and the largest one exact
    assert ((weight - quantized).abs() <= scales.unsqueeze(1) / 2 + 1e-6 * weight.abs()).all()
    assert torch.allclose(quantized.abs().amax(1), weight.abs().amax(1), rtol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_activation_quantizer_covers_its_range_and_keeps_zero_exact(bits):
    scale, zero_point = ptq.activation_qparams(-0.3, 5.0, bits)
    assert 0 <= zero_point <= 2**bits - 1 and isinstance(zero_point, int)
    x = torch.linspace(-0.3, 5.0, 1000)
    quantized = ptq.fake_quantize(x, scale, zero_point, 0, 2**bits - 1)
    assert torch.unique(quantized).numel() <= 2**bits
    assert (x - quantized).abs().max() <= scale * 0.5 + 1e-6 + abs(zero_point * scale - 0.3)
    assert float(ptq.fake_quantize(torch.zeros(1), scale, zero_point, 0, 2**bits - 1)) == 0.0
    # a range that excludes zero is widened to include it
    scale, zero_point = ptq.activation_qparams(1.0, 2.0, bits)
    assert zero_point == 0 and scale == pytest.approx(2.0 / (2**bits - 1))


def test_fewer_bits_give_larger_errors():
    x, weight = torch.randn(256, 32), torch.randn(16, 32)
    errors = []
    for bits in (8, 6, 4):
        layer = ptq.QuantLinear(nn.Linear(32, 16, bias=False), bits, bits, "vision")
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.weight_scale.copy_(ptq.weight_scales(weight, bits))
            layer.set_input_range(float(x.min()), float(x.max()))
        errors.append(float(((layer(x) - x @ weight.T) ** 2).mean()))
    assert errors[0] < errors[1] < errors[2]


def test_quant_linear_keeps_parameter_names_and_disables_exactly():
    model = nn.Sequential(nn.Linear(8, 4))
    keys = set(model.state_dict())
    x = torch.randn(3, 8)
    reference = model(x)
    layer = ptq.replace_linear(model, "0", 4, None, "vision")
    assert set(model.state_dict()) == keys and isinstance(model[0], nn.Linear)
    assert not torch.equal(model(x), reference)
    with ptq.quantizers_disabled(model):
        assert torch.equal(model(x), reference)
    # weight-only: the input is not quantized
    assert torch.equal(layer.quantize_input(x), x)
    with pytest.raises(ValueError, match="not an unquantized nn.Linear"):
        ptq.replace_linear(model, "0", 4, 4, "vision")


@pytest.mark.parametrize("options", [{"method": "gptq"}, {"weight_bits": 1}, {"act_bits": 9},
                                     {"parts": ("decoder",)}, {"parts": ()}, {"joint_grid": ()},
                                     {"max_block_depth": 0}, {"veo_weight": -1.0}])
def test_invalid_config_is_refused(options):
    with pytest.raises(ValueError):
        PTQConfig(**options)


def test_token_entropy_and_r_squared():
    uniform = torch.ones(1, 10, 4)
    one_hot = torch.zeros(1, 10, 4)
    one_hot[:, 3] = 5.0
    assert float(token_entropy(uniform)) == pytest.approx(1.0)
    assert float(token_entropy(one_hot)) == pytest.approx(0.0, abs=1e-6)
    mask = torch.tensor([[1] * 5 + [0] * 5])
    assert float(token_entropy(uniform, mask)) == pytest.approx(1.0)  # padding neither counts nor dilutes
    assert r_squared([1, 2, 3, 4], [3, 5, 7, 9]) == pytest.approx(1.0)
    assert r_squared([1, 2, 3, 4], [1, -1, 1, -1]) < 0.5


# ---------------------------------------------------------------------------------------------------------
# the model as steps, the methods
# ---------------------------------------------------------------------------------------------------------
def test_steps_follow_the_split_and_compute_the_model():
    model = tiny_alignedvq(split_layer=1, split_site="attn")
    steps = model_steps(model)
    names = [s.name for s in steps]
    assert names == ["vision.embed", "vision.0", "vision.1.edge", "alignedvq", "vision.1.cloud", "select",
                     "projector", "prompt", "language_model.0", "language_model.1"]
    parts = {s.name: s.part for s in steps}
    assert parts["vision.0"] == parts["vision.1.edge"] == "edge" and parts["vision.1.cloud"] == "vision"
    edge_linears = steps[2].linears
    assert edge_linears and all(".self_attn." in n for n in edge_linears)
    assert all(".mlp." in n for n in steps[4].linears)
    # running the steps gives the model's last hidden state (before the final norm)
    batch = calibration(1)[0]
    x = batch["pixel_values"]
    for step in steps:
        x = step.run(x, batch)
    with torch.no_grad():
        out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"])
    keep = batch["attention_mask"].bool()
    final = model.model.language_model.norm(x)
    torch.testing.assert_close(model.lm_head(final)[keep], out.logits[keep], atol=1e-4, rtol=1e-4)


def test_steps_of_a_patch_split_with_residual_codebooks():
    """The bundled model's split: the edge holds no linear layer, every block is the cloud's."""
    model = tiny_alignedvq(split_layer=0, split_site="patch", num_codebooks=2)
    steps = model_steps(model)
    assert [s.name for s in steps][:5] == ["vision.patch.edge", "alignedvq", "vision.positions", "vision.0", "vision.1"]
    assert not any(s.part == "edge" for s in steps) and all(s.part == "vision" for s in steps[3:5])
    batch = calibration(1)[0]
    x = batch["pixel_values"]
    for step in steps:
        x = step.run(x, batch)
    with torch.no_grad():
        out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"])
    keep = batch["attention_mask"].bool()
    final = model.model.language_model.norm(x)
    torch.testing.assert_close(model.lm_head(final)[keep], out.logits[keep], atol=1e-4, rtol=1e-4)
    quantize_model(model, calibration(), PTQConfig(method="rtn", weight_bits=8, act_bits=8))
    assert ptq.edge_quantizers(model) == {}
    assert any("vision_tower.encoder.layers.0." in name for name in ptq.quant_layers(model))


@pytest.mark.parametrize("method", ["rtn", "layerwise", "qvlm"])
def test_methods_quantize_the_selected_parts_only(method):
    model = tiny_alignedvq(split_layer=1, split_site="mlp")
    batches = calibration()
    reference = logits(model, batches[0])
    report = quantize_model(model, batches, PTQConfig(method=method, weight_bits=8, act_bits=8,
                                                      parts=("vision", "language_model"), **FAST))
    layers = ptq.quant_layers(model)
    assert layers and all(layer.part in ("vision", "language_model") for layer in layers.values())
    assert not any(name.startswith(("model.multi_modal_projector", "lm_head")) for name in layers)
    assert not any(".layers.0." in n or ".layers.1." in n for n in layers if "vision_tower" in n)  # edge blocks
    assert "model.vision_tower.encoder.layers.2.mlp.fc2" not in layers  # after the feature layer: never runs
    assert report["search_seconds"] > 0 and report["blocks"]
    quantized = logits(model, batches[0])
    assert not torch.equal(quantized, reference)
    assert (quantized - reference).abs().max() < 0.1 * reference.abs().max()


def test_searches_lower_the_calibration_error():
    """Layer-wise search beats min-max on each layer's own error, and the joint block search never raises the
    block error it starts from."""
    errors = {}
    for method in ("rtn", "layerwise", "qvlm"):
        model = tiny_llava()
        batches = calibration(3)
        quantize_model(model, batches, PTQConfig(method=method, weight_bits=4, act_bits=4,
                                                 entropy_threshold=0.0, max_block_depth=2, **FAST))
        calibrator = Calibrator(model, batches, PTQConfig(weight_bits=4, act_bits=4, joint_samples=12))
        last = len(calibrator.steps) - 1
        errors[method] = float(calibrator.block_errors(0, last, [b["pixel_values"] for b in batches]).mean())
    assert errors["layerwise"] < errors["rtn"]
    assert errors["qvlm"] <= errors["layerwise"] * 1.05


def test_qvlm_blocks_follow_the_entropy_threshold():
    model = tiny_llava()
    batches = calibration()
    everything = quantize_model(model, batches, PTQConfig(weight_bits=8, act_bits=8, entropy_threshold=0.0,
                                                          max_block_depth=99, **FAST))
    assert ["vision.0", "vision.1"] in everything["blocks"]
    assert ["language_model.0", "language_model.1"] in everything["blocks"]
    model = tiny_llava()
    nothing = quantize_model(model, batches, PTQConfig(weight_bits=8, act_bits=8, entropy_threshold=1.01, **FAST))
    assert all(len(block) == 1 for block in nothing["blocks"])


@pytest.mark.parametrize("site, moved", [("mlp", ("1",)), ("patch", ("0", "1"))])
def test_visual_encoder_optimization_moves_only_cloud_vision_blocks(site, moved):
    model = tiny_alignedvq(split_layer=0, split_site=site)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fingerprint = model.codebook_fingerprint()
    report = quantize_model(model, calibration(), PTQConfig(weight_bits=8, act_bits=8, veo_weight=1.0, veo_steps=4,
                                                            veo_lr=1e-2, **FAST))
    assert report["vision_entropy_after"] < report["vision_entropy_before"]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    blocks = {k.split(".")[4] for k in changed if k.startswith("model.vision_tower.encoder.layers.")}
    assert changed and all(k.startswith("model.vision_tower.encoder.layers.") for k in changed)
    assert blocks == set(moved)
    assert model.codebook_fingerprint() == fingerprint


def test_dependency_analysis_reports_every_pair():
    model = tiny_llava()
    pairs = dependency_analysis(model, calibration(), PTQConfig(weight_bits=4, act_bits=4, joint_samples=8, **FAST))
    assert [p["layer"] for p in pairs] == ["vision.0", "language_model.0"]
    for pair in pairs:
        assert len(pair["entropy"]) == len(pair["ded"]) == 8 and 0.0 <= pair["r2"] <= 1.0


def test_quantizing_twice_or_with_an_unmerged_lora_is_refused():
    model = tiny_alignedvq()
    quantize_model(model, calibration(1), PTQConfig(method="rtn"))
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, calibration(1), PTQConfig(method="rtn"))
    from peft import LoraConfig

    from transformers_alignedvq.lora import add_lora

    model = tiny_alignedvq()
    add_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="Merge the LoRA"):
        quantize_model(model, calibration(1), PTQConfig(method="rtn"))


# ---------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def quantized_checkpoint(tmp_path):
    model = tiny_alignedvq(split_layer=1, split_site="mlp")
    quantize_model(model, calibration(), PTQConfig(method="layerwise", weight_bits=6, act_bits=6, **FAST))
    model.save_pretrained(tmp_path)
    return model, tmp_path


def test_quantized_checkpoint_round_trip(quantized_checkpoint):
    model, directory = quantized_checkpoint
    assert (directory / ptq.PTQ_CONFIG_NAME).is_file() and (directory / ptq.PTQ_WEIGHTS_NAME).is_file()
    saved = load_file(str(directory / "model.safetensors"))
    assert not any("scale" in key or "zero_point" in key for key in saved)  # the weights stay a normal checkpoint
    loaded = tav.LlavaAlignedVQForConditionalGeneration.from_pretrained(directory)
    assert set(ptq.quant_layers(loaded)) == set(ptq.quant_layers(model))
    for name, layer in ptq.quant_layers(loaded).items():
        original = ptq.quant_layers(model)[name]
        assert torch.equal(layer.weight_scale, original.weight_scale)
        assert torch.equal(layer.input_zero_point, original.input_zero_point)
    batch = calibration(1, seed=5)[0]
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch))
    assert loaded.ptq_info["method"] == "layerwise"


def _rewrite_state(directory, change):
    path = directory / ptq.PTQ_WEIGHTS_NAME
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))


def _rewrite_config(directory, change):
    path = directory / ptq.PTQ_CONFIG_NAME
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


FC1 = "model.language_model.layers.0.mlp.gate_proj"


@pytest.mark.parametrize("damage, message", [
    (lambda d: _rewrite_state(d, lambda s: s.pop(f"{FC1}.input_scale")), "missing"),
    (lambda d: _rewrite_state(d, lambda s: s.update({"extra.weight_scale": torch.ones(2)})), "unexpected"),
    (lambda d: _rewrite_state(d, lambda s: s.update({f"{FC1}.weight_scale": s[f"{FC1}.weight_scale"].half()})),
     "mis-typed"),
    (lambda d: _rewrite_state(d, lambda s: s.update({f"{FC1}.weight_scale": torch.ones(3)})), "mis-shaped"),
    (lambda d: _rewrite_state(d, lambda s: s.update({f"{FC1}.input_scale": torch.tensor(-1.0)})), "positive"),
    (lambda d: _rewrite_state(d, lambda s: s.update({f"{FC1}.input_zero_point": torch.tensor(99, dtype=torch.int32)})),
     "outside"),
    (lambda d: _rewrite_config(d, lambda c: c["layers"].update(
        {"model.language_model.layers.0.input_layernorm": c["layers"][FC1]})), "not nn.Linear"),
    (lambda d: _rewrite_config(d, lambda c: c["layers"][FC1].update(act_bits=12)), "act_bits"),
    (lambda d: _rewrite_config(d, lambda c: c.update(format_version=2)), "format_version"),
    (lambda d: (d / ptq.PTQ_WEIGHTS_NAME).unlink(), "missing"),
    (lambda d: (d / ptq.PTQ_WEIGHTS_NAME).write_bytes((d / ptq.PTQ_WEIGHTS_NAME).read_bytes()[:-7]), "truncated"),
])
def test_a_ptq_file_that_does_not_fit_is_refused(quantized_checkpoint, damage, message):
    _, directory = quantized_checkpoint
    damage(directory)
    with pytest.raises(tav.CheckpointMismatchError, match=message):
        tav.LlavaAlignedVQForConditionalGeneration.from_pretrained(directory)


def test_quantizers_are_bound_to_their_weights(quantized_checkpoint, tmp_path):
    _, directory = quantized_checkpoint
    other = tiny_alignedvq(seed=3, split_layer=1, split_site="mlp")
    other.save_pretrained(tmp_path / "other")
    (directory / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(tav.CheckpointMismatchError, match="other weights"):
        tav.LlavaAlignedVQForConditionalGeneration.from_pretrained(directory)


def test_quantized_adapter_checkpoint_is_refused(tmp_path):
    model = tiny_alignedvq()
    quantize_model(model, calibration(1), PTQConfig(method="rtn"))
    model.config.base_model_name_or_path = "some/base"
    with pytest.raises(ValueError, match="full checkpoint"):
        model.save_pretrained(tmp_path, checkpoint_kind="adapter")


def test_a_quantized_model_answers_through_the_server(tmp_path):
    from fastapi.testclient import TestClient

    from transformers_alignedvq import wire
    from transformers_alignedvq.serving import create_app
    from transformers_alignedvq.testing import save_tiny_deployment

    directory = save_tiny_deployment(tmp_path / "tiny")
    model = tav.LlavaAlignedVQForConditionalGeneration.from_pretrained(directory)
    quantize_model(model, calibration(), PTQConfig(method="rtn", weight_bits=4, act_bits=4,
                                                   parts=("vision", "projector", "language_model")))
    model.save_pretrained(directory)
    app = create_app(directory, max_new_tokens=4, max_wait_ms=1)
    engine = app.state.engine
    assert ptq.is_quantized(engine.model)
    indices = torch.arange(engine.config.num_image_tokens) % engine.config.codebook_size
    frame = wire.encode_frame(indices.numpy(), codebook_size=engine.config.codebook_size,
                              codebook_fingerprint=engine.fingerprint, prompt="what color is the shape ?",
                              grid=(4, 4), has_cls_token=True)
    with TestClient(app) as client:
        response = client.post("/v1/answer", content=frame, headers={"Content-Type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["answer"], str)


def test_edge_quantizers_use_the_edge_encoders_names():
    model = tiny_alignedvq(split_layer=1, split_site="mlp")
    quantize_model(model, calibration(), PTQConfig(method="rtn", weight_bits=8, act_bits=8, parts=("edge",)))
    quantizers = ptq.edge_quantizers(model)
    edge = model.edge_encoder()
    modules = dict(edge.named_modules())
    assert quantizers and all(isinstance(modules[name], nn.Linear) for name in quantizers)
    assert {n.split(".")[2] for n in quantizers} == {"0", "1"}  # both edge blocks, nothing of the cloud
    for name, entry in quantizers.items():
        assert entry["weight_scale"].shape == (modules[name].out_features,)
        assert entry["act_bits"] == 8 and 0 <= entry["input_zero_point"] <= 255 and entry["input_scale"] > 0
    # the exported edge keeps full-precision weights: the quantizers are for an exporter to apply
    assert torch.equal(modules[name].weight, ptq.quant_layers(model)[f"model.vision_tower.{name}"].weight)
