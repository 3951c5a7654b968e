import pytest
import torch
from transformers import TrainingArguments

import transformers_alignedvq as tav
from tests.conftest import IMAGE_SIZE, NUM_PATCHES, prompt_ids, tiny_alignedvq
from transformers_alignedvq.evaluation import normalize_answer, vqa_accuracy, vqa_score
from transformers_alignedvq.training import AlignedVQTrainer, prepare_for_finetuning, trainable_parameters


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("The Dog.", "dog"),
        ("Two", "2"),
        ("dont", "don't"),
        ("1.5", "1.5"),
        ("yes!", "yes"),
        ("red,blue", "red blue"),
        ("  A  cat  ", "cat"),
        ("1,000", "1000"),
    ],
)
def test_vqa_v2_normalisation(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_vqa_scores_hand_checked():
    assert vqa_score("Red", "red") == 1.0
    assert vqa_score("red", "blue") == 0.0
    ten = ["2"] * 2 + ["3"] * 8
    assert vqa_score("two", ten) == pytest.approx(2 / 3)
    assert vqa_score("3", ten) == 1.0
    assert vqa_score("4", ten) == 0.0
    assert vqa_accuracy(["circle", "no"], ["circle", ["yes", "yes", "no"]]) == pytest.approx((1 + 1 / 3) / 2)
    with pytest.raises(ValueError, match="references"):
        vqa_accuracy(["a"], [])
    with pytest.raises(ValueError, match="at least one"):
        vqa_score("a", [])


def test_evaluate_metric_module_gives_the_same_numbers():
    evaluate = pytest.importorskip("evaluate")
    metric = evaluate.load(tav.VQA_ACCURACY_METRIC)
    preds, refs = ["Two", "red", "a dog"], [["2", "2", "two"], ["blue"], ["dog"]]
    result = metric.compute(predictions=preds, references=refs)
    assert result["accuracy"] == pytest.approx(vqa_accuracy(preds, refs)) == pytest.approx(2 / 3)


class _Batches(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        ids = prompt_ids(batch=n, seed=1)
        labels = ids.clone()
        labels[:, :NUM_PATCHES] = -100
        self.items = [
            {"input_ids": ids[i], "labels": labels[i], "pixel_values": torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=g)}
            for i in range(n)
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_trainer_finetunes_codebook_dlp_and_lora_only(tmp_path):
    model = tiny_alignedvq(codebook_size=8)
    prepare_for_finetuning(model, lora_r=4)
    trainable, total = trainable_parameters(model)
    assert 0 < trainable < total
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n and "language_model" in n for n in names)
    assert not any("lora_" in n and "vision_tower" in n for n in names), "LoRA must stay out of the vision tower"
    assert {n for n in names if "lora_" not in n} == {n for n, _ in model.model.alignedvq.named_parameters(prefix="model.alignedvq")}

    frozen_before = model.model.vision_tower.embeddings.patch_embedding.weight.clone()
    codebook_before = model.model.alignedvq.quantizer.codebook.clone()
    lora_before = {n: p.clone() for n, p in model.named_parameters() if "lora_B" in n}
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2,
        logging_steps=2, report_to="none", save_strategy="no", remove_unused_columns=False,
        use_cpu=True, disable_tqdm=True,
    )
    trainer = AlignedVQTrainer(model=model, args=args, train_dataset=_Batches(8))
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all("commitment_loss" in e and "codebook_perplexity" in e for e in logged)
    assert all(1.0 <= e["codebook_perplexity"] <= 8.0 for e in logged)
    assert torch.equal(model.model.vision_tower.embeddings.patch_embedding.weight, frozen_before)
    assert not torch.equal(model.model.alignedvq.quantizer.codebook, codebook_before)
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if "lora_B" in n)
    assert model.model.alignedvq.dlp_in.gate.item() != 0.0
