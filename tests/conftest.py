"""Tiny random CLIP + Llama LLaVA models so the whole suite runs in seconds on a CPU."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import transformers_alignedvq as tav

IMAGE_TOKEN = 99
IMAGE_SIZE = 32
PATCH = 8
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2  # 16 patches + CLS = 17 vision tokens


torch.set_num_threads(1)

BUNDLED_MODEL_MISSING = "this build has no bundled model (examples/build_bundled_model.py)"


def pytest_configure(config):
    config.addinivalue_line("markers", "bundled_model: needs the easy-VQA model shipped in the package (skipped "
                                       "where the build has none)")


def pytest_runtest_setup(item):
    if item.get_closest_marker("bundled_model") and not hasattr(tav, "TINY_EASYVQA"):
        pytest.skip(BUNDLED_MODEL_MISSING)


def tiny_llava_config(**overrides) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
    )
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        pad_token_id=0,
    )
    values = dict(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN, image_seq_length=NUM_PATCHES)
    values.update(overrides)
    return LlavaConfig(**values)


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(tiny_llava_config()).eval()


def tiny_alignedvq(seed: int = 0, calibrate: bool = True, **vq_options):
    """A tiny AlignedVQ model with its codebook k-means-initialised on random images."""
    vq_options.setdefault("codebook_size", 16)
    model = tav.LlavaAlignedVQForConditionalGeneration.from_llava(tiny_llava(seed), **vq_options).eval()
    if calibrate:
        generator = torch.Generator().manual_seed(seed + 1)
        model.init_codebook([torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)], iters=5)
    return model


def prompt_ids(batch: int = 2, text_tokens: int = 5, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(1, IMAGE_TOKEN - 1, (batch, text_tokens), generator=generator)
    return torch.cat([torch.full((batch, NUM_PATCHES), IMAGE_TOKEN), text], dim=1)


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(123))



@pytest.fixture(scope="session")
def llava_7b_config_path():
    """The llava-hf/llava-1.5-7b-hf config (a copy kept with the tests: no Hub access needed)."""
    from pathlib import Path

    return Path(__file__).parent / "data" / "llava-1.5-7b-hf.config.json"


@pytest.fixture(scope="session")
def deployment(tmp_path_factory):
    """One served deployment for every test that needs one (read it, never write into it): a tiny random
    AlignedVQ model with its processor and edge files, as `alignedvq serve` takes it."""
    from transformers_alignedvq.testing import save_tiny_deployment

    return save_tiny_deployment(tmp_path_factory.mktemp("tiny-deployment"))
