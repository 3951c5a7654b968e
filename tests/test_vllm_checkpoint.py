"""The llava-hf folder written for vLLM (`vllm_checkpoint`), checked with Transformers: no vLLM needed."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig
from transformers import LlavaForConditionalGeneration

from transformers_alignedvq import CheckpointMismatchError
from transformers_alignedvq.lora import add_lora
from transformers_alignedvq.serving.engines.vllm_checkpoint import (
    EXPORT_RECORD_NAME,
    check_export,
    checkpoint_name,
    export_for_vllm,
)
from transformers_alignedvq.testing import IMAGE_TOKEN_ID, save_tiny_deployment, tiny_model, tiny_processor

IMAGE_TOKENS = 16  # the tiny model's 17 vision tokens less the CLS one


def prompt(batch: int = 2) -> torch.Tensor:
    text = torch.randint(5, 90, (batch, 6), generator=torch.Generator().manual_seed(0))
    return torch.cat([text[:, :2], torch.full((batch, IMAGE_TOKENS), IMAGE_TOKEN_ID), text[:, 2:]], dim=1)


def indices(model, batch: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.codebook_size, (batch, model.config.num_image_tokens), generator=generator)


def llava_logits(llava, model, input_ids, image_indices) -> torch.Tensor:
    """The exported LLaVA's logits with our image features in place of its image tokens, as vLLM runs it."""
    with torch.no_grad():
        features = torch.cat(model.model.get_image_features(image_indices=image_indices).pooler_output)
        embeds = llava.get_input_embeddings()(input_ids)
        embeds[input_ids == IMAGE_TOKEN_ID] = features
        return llava(inputs_embeds=embeds).logits


def load_exported(folder) -> LlavaForConditionalGeneration:
    llava, info = LlavaForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    return llava.eval()


def test_export_is_a_plain_llava_that_computes_what_our_model_computes(tmp_path):
    model = tiny_model()
    folder = export_for_vllm(model, tmp_path / "vllm", processor=tiny_processor())
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llava" and config["architectures"] == ["LlavaForConditionalGeneration"]
    assert "codebook_size" not in config and "split_layer" not in config
    llava = load_exported(folder)
    input_ids, image_indices = prompt(), indices(model)
    with torch.no_grad():
        ours = model(input_ids=input_ids, image_indices=image_indices).logits
    torch.testing.assert_close(llava_logits(llava, model, input_ids, image_indices), ours)
    assert (folder / "tokenizer.json").is_file() and (folder / "chat_template.jinja").is_file()


def test_export_merges_lora_without_changing_the_model(tmp_path):
    model = tiny_model()
    add_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # fresh LoRA is a no-op (B = 0); make it count
            torch.nn.init.normal_(parameter, std=0.5, generator=torch.Generator().manual_seed(2))
    llava = load_exported(export_for_vllm(model, tmp_path / "vllm", processor=tiny_processor()))
    input_ids, image_indices = prompt(), indices(model)
    with torch.no_grad():
        ours = model(input_ids=input_ids, image_indices=image_indices).logits
    # x(W + BA) and xW + xBA round differently in fp32.
    torch.testing.assert_close(llava_logits(llava, model, input_ids, image_indices), ours, atol=1e-4, rtol=1e-4)
    assert any("lora_A" in name for name, _ in model.named_parameters())  # still unmerged in the model


def test_a_tied_model_from_a_folder_exports_without_lm_head(tmp_path):
    import transformers_alignedvq

    source = getattr(transformers_alignedvq, "TINY_EASYVQA", None) or save_tiny_deployment(tmp_path / "tiny")
    folder = export_for_vllm(source, tmp_path / "vllm")
    llava = load_exported(folder)
    if llava.config.tie_word_embeddings:
        assert llava.lm_head.weight.data_ptr() == llava.get_input_embeddings().weight.data_ptr()


def test_check_export_accepts_only_the_exported_weights(tmp_path):
    model = tiny_model(seed=0)
    folder = export_for_vllm(model, tmp_path / "vllm", processor=tiny_processor())
    check_export(folder, model)
    with pytest.raises(CheckpointMismatchError, match="other weights"):
        check_export(folder, tiny_model(seed=1))
    (folder / EXPORT_RECORD_NAME).unlink()
    with pytest.raises(CheckpointMismatchError, match="not a folder written by export_for_vllm"):
        check_export(folder, model)


@pytest.mark.parametrize(("ours", "theirs"), [
    ("model.language_model.layers.0.self_attn.q_proj.weight", "language_model.model.layers.0.self_attn.q_proj.weight"),
    ("lm_head.weight", "language_model.lm_head.weight"),
    ("model.multi_modal_projector.linear_1.bias", "multi_modal_projector.linear_1.bias"),
    ("model.vision_tower.embeddings.patch_embedding.weight",
     "vision_tower.vision_model.embeddings.patch_embedding.weight"),
    ("model.vision_tower.vision_model.post_layernorm.weight", "vision_tower.vision_model.post_layernorm.weight"),
    ("model.alignedvq.quantizer.codebook", None),
])
def test_checkpoint_names_are_llava_hf_originals(ours, theirs):
    assert checkpoint_name(ours) == theirs


def test_a_parameter_outside_llava_is_refused():
    with pytest.raises(ValueError, match="no name in a llava checkpoint"):
        checkpoint_name("model.something_else.weight")


def test_export_refuses_a_model_object_without_its_processor(tmp_path):
    with pytest.raises(ValueError, match="processor="):
        export_for_vllm(tiny_model(), tmp_path / "vllm")
