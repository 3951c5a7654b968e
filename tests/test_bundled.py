"""The easy-VQA AlignedVQ model shipped inside the package."""

import pytest
import torch

import transformers_alignedvq as tav

pytestmark = pytest.mark.bundled_model


def test_bundled_model_answers_test_questions_over_the_wire():
    from transformers import AutoModel, AutoProcessor

    from transformers_alignedvq.evaluation import evaluate_vqa
    from transformers_alignedvq.training.data import load_easy_vqa

    model = AutoModel.from_pretrained(tav.TINY_EASYVQA).eval()
    assert isinstance(model, tav.LlavaAlignedVQForConditionalGeneration)
    processor = AutoProcessor.from_pretrained(tav.TINY_EASYVQA)
    questions = load_easy_vqa("test").shuffle(seed=0).select(range(24))
    result = evaluate_vqa(model, processor, questions, batch_size=24)
    assert result["accuracy"] >= 20 / 24, list(zip(result["predictions"], questions["answer"]))
    assert result["bytes_per_image"] < 250  # a whole wire frame of two codes per token, header and CRC included
    # per-question correctness, in question order, for paired tests between runs
    assert len(result["correct"]) == 24 and result["correct"].count("1") == round(24 * result["accuracy"])
    assert [bit == "1" for bit in result["correct"]] == [p == a for p, a in zip(result["predictions"], questions["answer"])]


def test_bundled_model_is_safetensors_with_its_edge_part_and_card():
    from pathlib import Path

    folder = Path(tav.TINY_EASYVQA)
    files = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "edge_model.safetensors", "edge_config.json", "README.md"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl", ".pth")) for name in files)
    assert tav.DEFAULT_MODEL == tav.TINY_EASYVQA
    with torch.no_grad():
        edge = tav.LlavaAlignedVQForConditionalGeneration.from_pretrained(folder).edge_encoder()
    assert edge.num_bytes() < 20_000_000  # two codebooks and their folded search tables, a fraction of the model


def test_bundled_entropy_model_codes_test_images_losslessly():
    pytest.importorskip("constriction")
    import numpy as np

    from transformers_alignedvq import wire
    from transformers_alignedvq.edge_runtime import frame_geometry, load_edge_runtime
    from transformers_alignedvq.entropy import load_entropy_model
    from transformers_alignedvq.training.data import load_easy_vqa

    edge = load_edge_runtime(tav.TINY_EASYVQA)
    model = load_entropy_model(tav.TINY_EASYVQA)
    geometry = frame_geometry(edge.image_size, edge.patch_size)
    assert (model.codebook_size, model.grid, model.has_cls_token) == (
        edge.codebook_size, geometry["grid"], geometry["has_cls_token"])
    rows = load_easy_vqa("test", limit=40)
    options = dict(codebook_size=edge.codebook_size, codebook_fingerprint=edge.fingerprint, grid=geometry["grid"],
                   has_cls_token=True)
    raw, coded = [], []
    for row in rows:
        indices = edge.encode_image(row["image"])
        raw.append(wire.encode_frame(indices, prompt=row["question"], **options))
        coded.append(wire.encode_frame(indices, prompt=row["question"], entropy_model=model, **options))
        frame = wire.decode_frame(coded[-1], codebook_fingerprint=edge.fingerprint, entropy_model=model)
        np.testing.assert_array_equal(frame.indices, indices)
        assert frame.prompt == row["question"]
    # The model was fitted on the training split: on test images a coded frame is far below a raw one.
    assert np.mean([len(f) for f in coded]) < 0.5 * np.mean([len(f) for f in raw])
