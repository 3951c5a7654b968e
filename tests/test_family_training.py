"""The finetune recipe and the wire evaluation on a family (LLaVA-NeXT, warm-started from the easy-VQA LLaVA as
examples/train_family_easyvqa.py does): the shared-prefix loss with tiles, the finetune command, and
`evaluate_vqa` sending each image's tiles as a frame with its geometry."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("easy_vqa")
pytest.importorskip("transformers.models.llava_next.image_processing_pil_llava_next")

from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration  # noqa: E402

from transformers_alignedvq.entropy import load_entropy_model  # noqa: E402
from transformers_alignedvq.evaluation import evaluate_vqa  # noqa: E402
from transformers_alignedvq.evaluation.family_wire import family_indices_over_the_wire  # noqa: E402
from transformers_alignedvq.models.llava_next_alignedvq.modeling_llava_next_alignedvq import _HAS_MM_ENCODER_OUTPUTS  # noqa: E402
from transformers_alignedvq.training import shared_image_prefix_loss  # noqa: E402
from transformers_alignedvq.training.data import VQACollator, load_easy_vqa  # noqa: E402
from transformers_alignedvq.training.finetune import main as finetune  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "artifacts" / "base-easyvqa"
pytestmark = pytest.mark.skipif(not _HAS_MM_ENCODER_OUTPUTS, reason="the families need Transformers >= 5.19")


def _script():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        spec = importlib.util.spec_from_file_location("train_family_easyvqa", ROOT / "examples" / "train_family_easyvqa.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return module


@pytest.fixture(scope="module")
def next_base(tmp_path_factory):
    """The easy-VQA LLaVA as a LLaVA-NeXT (64-px tiles), saved with its processor."""
    script = _script()
    folder = tmp_path_factory.mktemp("next-base")
    llava = LlavaForConditionalGeneration.from_pretrained(BASE)
    torch.manual_seed(0)  # image_newline, the one new weight
    model = script.next_from_llava(llava)
    for name, weight in llava.state_dict().items():  # everything but image_newline comes from the LLaVA
        torch.testing.assert_close(model.state_dict()[name], weight, rtol=0, atol=0, msg=name)
    model.save_pretrained(folder)
    script.next_processor(AutoProcessor.from_pretrained(BASE)).save_pretrained(folder)
    return folder


def _grouped_batch(processor, count=12):
    rows = load_easy_vqa("train", limit=count)
    return VQACollator(processor, train=True)([rows[i] for i in range(count)])


def test_shared_prefix_loss_with_tiles_is_the_stock_loss(next_base):
    model = AutoModelForImageTextToText.from_pretrained(next_base).eval()
    batch = _grouped_batch(AutoProcessor.from_pretrained(next_base))
    assert batch["pixel_values"].shape[1] == 2  # base view + one tile per 64×64 image
    reference = model(**batch).loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    shared = shared_image_prefix_loss(model, batch)
    assert shared is not None
    shared.lm_loss.backward()
    torch.testing.assert_close(shared.lm_loss, reference, rtol=1e-5, atol=1e-6)
    assert expected.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in expected.items():  # summed in another order: equal to float32 rounding of the largest
        atol = max(1e-6, 1e-5 * float(grad.abs().max()))
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=atol,
                                   msg=name)


def test_shared_prefix_loss_declines_patch_grid_batches(next_base):
    batch = dict(_grouped_batch(AutoProcessor.from_pretrained(next_base)))
    batch["image_grid_thw"] = torch.tensor([[1, 8, 8]])  # Qwen2.5-VL: pixel rows are patches, not questions
    assert shared_image_prefix_loss(AutoModelForImageTextToText.from_pretrained(next_base), batch) is None


@pytest.fixture(scope="module")
def finetuned(next_base, tmp_path_factory):
    folder = tmp_path_factory.mktemp("next-alignedvq")
    result = finetune(["--base", str(next_base), "--output", str(folder), "--limit", "60", "--max-steps", "2",
                       "--batch-size", "8", "--calibration-images", "8", "--kmeans-iters", "2", "--codebook-size",
                       "16", "--split-layer", "0", "--split-site", "patch", "--num-codebooks", "2", "--eval-images",
                       "2", "--eval-vqa-questions", "8", "--no-progress", "--threads", "1"])
    return folder, result


def test_the_finetune_command_trains_a_family(finetuned):
    folder, result = finetuned
    assert any("eval_vqa_accuracy" in entry for entry in result["log_history"])
    model = AutoModelForImageTextToText.from_pretrained(folder)
    assert type(model).__name__ == "LlavaNextAlignedVQForConditionalGeneration"
    assert (model.config.split_site, model.config.codes_per_token) == ("patch", 2)
    assert load_entropy_model(folder) is not None  # fitted tile by tile for the new codebook
    assert json.loads((folder / "training_log.json").read_text())


def test_evaluation_sends_tiles_as_frames_with_their_geometry(finetuned):
    folder, _ = finetuned
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    rows = load_easy_vqa("validation", limit=12)
    wire = evaluate_vqa(model, processor, rows, batch_size=6, entropy_model=load_entropy_model(folder))
    pixels = evaluate_vqa(model, processor, rows, batch_size=6, mode="pixels")
    assert wire["predictions"] == pixels["predictions"]  # pixel input is encoded to indices first
    # 2 tiles x 65 tokens x 2 codes x 4 bits, the header and the tile geometry
    assert 130 < wire["bytes_per_image"] < 200
    assert 0 < wire["entropy_coded_bytes_per_image"] < wire["bytes_per_image"] + 20

    inputs = processor.image_processor(images=[rows[i]["image"].convert("RGB") for i in range(3)], return_tensors="pt")
    cloud, raw, coded = family_indices_over_the_wire(model, dict(inputs))
    assert cloud["image_indices"].shape == (6, model.config.tokens_per_tile, 2) and len(raw) == 3 and coded == []
    expected = model.encode_edge(inputs["pixel_values"], inputs["image_sizes"])
    assert torch.equal(cloud["image_indices"], expected.reshape(cloud["image_indices"].shape))


def test_the_entropy_model_of_a_patch_grid_family_is_fitted_per_image():
    """Qwen2.5-VL: the finetune's entropy model codes each image's patch grid (grids differ per image)."""
    from test_family_qwen2_5_vl import MERGE, PATCH, TEMPORAL, tiny_split
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from transformers_alignedvq.training.finetune import fit_entropy_model
    from transformers_alignedvq.wire import decode_frame, encode_frame
    from transformers_alignedvq.wire_geometry import WireGeometry

    class Processor:  # what fit_entropy_model reads of a processor
        image_processor = Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL,
                                                   min_pixels=16 * 16, max_pixels=40 * 40)

    model = tiny_split(site="patch", layer=0)
    rows = load_easy_vqa("train", limit=40)
    rows = rows.map(lambda row, i: {"image": row["image"].resize((24 + 4 * (i % 3), 32))}, with_indices=True)
    entropy = fit_entropy_model(model, Processor(), rows, batch_size=4)
    assert entropy is not None and entropy.grid is None  # a patch-grid model: the frame's geometry sizes it
    inputs = Processor.image_processor(images=[rows[0]["image"].convert("RGB")], return_tensors="pt")
    indices = model.encode_edge(inputs["pixel_values"], inputs["image_grid_thw"]).numpy()
    options = dict(codebook_size=16, codebook_fingerprint=model.codebook_fingerprint(),
                   geometry=WireGeometry.patch_grids(inputs["image_grid_thw"]))
    frame = encode_frame(indices, entropy_model=entropy, **options)
    assert len(frame) < len(encode_frame(indices, **options))
    decoded = decode_frame(frame, codebook_size=16, entropy_model=entropy)
    assert (decoded.indices[:, 0] == indices).all()
