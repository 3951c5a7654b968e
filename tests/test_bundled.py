"""The easy-VQA AlignedVQ model shipped inside the package."""

import pytest
import torch

import transformers_alignedvq as tav

pytestmark = pytest.mark.skipif(
    not hasattr(tav, "TINY_EASYVQA"), reason="this build has no bundled model (examples/build_bundled_model.py)"
)


def test_bundled_model_answers_test_questions_over_the_wire():
    from transformers import AutoModel, AutoProcessor

    from transformers_alignedvq.data import load_easy_vqa
    from transformers_alignedvq.evaluation import evaluate_vqa

    model = AutoModel.from_pretrained(tav.TINY_EASYVQA).eval()
    assert isinstance(model, tav.LlavaAlignedVQForConditionalGeneration)
    processor = AutoProcessor.from_pretrained(tav.TINY_EASYVQA)
    questions = load_easy_vqa("test").shuffle(seed=0).select(range(24))
    result = evaluate_vqa(model, processor, questions, batch_size=24)
    assert result["accuracy"] >= 20 / 24, list(zip(result["predictions"], questions["answer"]))
    assert result["bytes_per_image"] < 200  # a whole wire frame, header and CRC included


def test_bundled_model_is_safetensors_with_its_edge_part_and_card():
    from pathlib import Path

    folder = Path(tav.TINY_EASYVQA)
    files = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "edge_model.safetensors", "edge_config.json", "README.md"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl", ".pth")) for name in files)
    assert tav.DEFAULT_MODEL == tav.TINY_EASYVQA
    with torch.no_grad():
        edge = tav.LlavaAlignedVQForConditionalGeneration.from_pretrained(folder).edge_encoder()
    assert edge.num_bytes() < 10_000_000
