"""A tiny, random, fully saved AlignedVQ deployment for tests, benchmarks and demos.

`save_tiny_deployment(directory)` writes what a real model folder holds: the AlignedVQ checkpoint plus a
`LlavaProcessor` (CLIP image processor, word-level tokenizer, LLaVA-1.5-style chat template), all mutually
consistent (image size, patch size, image token id), so the server, the edge client and the CLI can be
exercised end to end on a CPU in seconds. The weights are random: answers are gibberish, but deterministic.
"""

from __future__ import annotations

import os
from pathlib import Path

# Python source that, run first in an interpreter, makes importing torch and transformers fail as if they were
# not installed: how tests and benchmarks emulate a device with only the `edge` extra in a full environment.
WITHOUT_CLOUD_PACKAGES = """
import importlib.abc, importlib.machinery, sys

class _Absent(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "onnx", "onnxscript"):
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)
    def exec_module(self, module):
        pass

sys.meta_path.insert(0, _Absent())
"""

IMAGE_TOKEN_ID = 99
VOCAB_SIZE = 100
IMAGE_SIZE = 32
PATCH_SIZE = 8
# A wide init makes the random model's answers depend on the image and the question, so tests can tell
# answers apart (with the usual 0.02 every input gets the same reply).
INIT_RANGE = 0.5

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:"), written for content lists.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %} "
    "{% else %}ASSISTANT: {% for part in message['content'] %}{{ part['text'] }}{% endfor %}</s> "
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Enough words for easy-VQA style questions to tokenize to something other than [UNK].
_WORDS = (
    "USER ASSISTANT : ? , . what which is the shape color colour of in image picture does contain there a an "
    "not no yes present circle rectangle triangle square red green blue black gray grey teal brown yellow "
    "purple orange white it this that"
).split()


def tiny_tokenizer():
    """A word-level `PreTrainedTokenizerFast` with ``[PAD]``=0, ``<s>``=1, ``</s>``=2, ``[UNK]``=3 and
    ``<image>``=99, padding on the left (what batched generation needs)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "<s>": 1, "</s>": 2, "[UNK]": 3}
    for word in _WORDS:
        vocab.setdefault(word, len(vocab))
    while len(vocab) < IMAGE_TOKEN_ID:
        vocab[f"w{len(vocab)}"] = len(vocab)
    vocab["<image>"] = IMAGE_TOKEN_ID
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="[UNK]",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    if tokenizer.convert_tokens_to_ids("<image>") != IMAGE_TOKEN_ID:
        raise RuntimeError("tiny tokenizer: <image> did not get the model's image token id")
    return tokenizer


def tiny_processor(*, image_size: int = IMAGE_SIZE, patch_size: int = PATCH_SIZE):
    """A `LlavaProcessor` matching `tiny_model` (CLS dropped, as LLaVA-1.5's ``default`` strategy does)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_model(*, seed: int = 0, codebook_size: int = 12, **vq_options):
    """A tiny random LLaVA (CLIP 32 px / patch 8, 3 blocks; Llama 2 layers, width 32) converted to AlignedVQ,
    with its codebook k-means-initialised on random images. The default K = 12 is deliberately not a
    power of two, so a 4-bit index can be out of range (useful to test the cloud's checks)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from .models.llava_alignedvq.modeling_alignedvq import LlavaAlignedVQForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
    )
    text = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB_SIZE, pad_token_id=0, initializer_range=INIT_RANGE, bos_token_id=1, eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
    )
    torch.manual_seed(seed)
    llava = LlavaForConditionalGeneration(config).eval()
    model = LlavaAlignedVQForConditionalGeneration.from_llava(llava, codebook_size=codebook_size, **vq_options).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    model.init_codebook([torch.randn(8, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)], iters=5)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    return model


def save_tiny_deployment(directory: str | os.PathLike, *, seed: int = 0, **vq_options) -> Path:
    """Write a tiny model + processor into ``directory`` (created if needed); returns the path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tiny_model(seed=seed, **vq_options).save_pretrained(directory)
    tiny_processor().save_pretrained(directory)
    return directory


__all__ = [
    "CHAT_TEMPLATE",
    "IMAGE_SIZE",
    "IMAGE_TOKEN_ID",
    "INIT_RANGE",
    "PATCH_SIZE",
    "VOCAB_SIZE",
    "WITHOUT_CLOUD_PACKAGES",
    "save_tiny_deployment",
    "tiny_model",
    "tiny_processor",
    "tiny_tokenizer",
]
