"""The vLLM engine's default KV cache on a CPU, sized from the model and the serving limits (no vLLM needed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, LlamaConfig

import transformers_alignedvq
from transformers_alignedvq.serving.engines.vllm import kv_cache_defaults


def test_llava_7b_cache_holds_the_batch_of_longest_sequences():
    data = json.loads((Path(__file__).parent / "data" / "llava-1.5-7b-hf.config.json").read_text())
    text = LlamaConfig(**data["text_config"])  # Vicuna-7B: 32 layers, 32 KV heads of 128
    defaults = kv_cache_defaults(text, torch.float16, prompt_tokens=2697, max_new_tokens=32, sequences=8)
    assert defaults["max_model_len"] == 2729
    per_token = 2 * 32 * 32 * 128 * 2  # 512 KiB
    assert defaults["kv_cache_memory_bytes"] == per_token * 16 * (-(-2729 // 16)) * 8  # 8 sequences in whole blocks
    # Capped by the model's context, and sized by max_num_seqs when the user sets it.
    capped = kv_cache_defaults(text, torch.float16, prompt_tokens=9000, max_new_tokens=32, sequences=8,
                               extra={"max_num_seqs": 2})
    assert capped["max_model_len"] == 4096 and capped["kv_cache_memory_bytes"] == per_token * 4096 * 2


def test_the_users_choice_wins():
    text = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    for chosen in ({"kv_cache_memory_bytes": 2**28}, {"gpu_memory_utilization": 0.5}):
        assert kv_cache_defaults(text, torch.float32, prompt_tokens=100, max_new_tokens=8, sequences=4,
                                 extra=chosen) == {}
    given = kv_cache_defaults(text, torch.float32, prompt_tokens=100, max_new_tokens=8, sequences=4,
                              extra={"max_model_len": 64})
    assert "max_model_len" not in given and given["kv_cache_memory_bytes"] == 2 * 2 * 2 * 16 * 4 * 64 * 4


def test_the_bundled_model_asks_for_megabytes_not_most_of_the_machine():
    model = getattr(transformers_alignedvq, "TINY_EASYVQA", None)
    if model is None:
        return
    text = AutoConfig.from_pretrained(model).text_config
    defaults = kv_cache_defaults(text, torch.float32, prompt_tokens=100 + 2048 + 1, max_new_tokens=32, sequences=8)
    assert defaults["max_model_len"] <= text.max_position_embeddings
    assert defaults["kv_cache_memory_bytes"] < 64 * 2**20
