from pathlib import Path

import pytest
import torch
from transformers import TrainingArguments

import transformers_alignedvq as tav
from tests.conftest import IMAGE_SIZE, NUM_PATCHES, prompt_ids, tiny_alignedvq
from transformers_alignedvq.evaluation import normalize_answer, vqa_accuracy, vqa_score
from transformers_alignedvq.training import (
    AlignedVQTrainer,
    prepare_for_finetuning,
    shared_image_prefix_loss,
    trainable_parameters,
)


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


def _training_args(tmp_path, **overrides) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, learning_rate=1e-2, report_to="none",
        save_strategy="no", remove_unused_columns=False, use_cpu=True, disable_tqdm=True, **overrides,
    )


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
    trainer = AlignedVQTrainer(model=model, args=_training_args(tmp_path, max_steps=4, logging_steps=2),
                               train_dataset=_Batches(8))
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all("commitment_loss" in e and "codebook_perplexity" in e for e in logged)
    assert all(1.0 <= e["codebook_perplexity"] <= 8.0 for e in logged)
    assert torch.equal(model.model.vision_tower.embeddings.patch_embedding.weight, frozen_before)
    assert not torch.equal(model.model.alignedvq.quantizer.codebook, codebook_before)
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if "lora_B" in n)
    assert model.model.alignedvq.dlp_in.gate.item() != 0.0


def test_trainer_runs_the_vanilla_baseline_with_nothing_to_differentiate(tmp_path):
    """No DLP and no LoRA (Figure 7's vanilla VQ): no parameter takes a gradient, the codebook learns by EMA."""
    model = tiny_alignedvq(codebook_size=8, use_dlp=False)
    prepare_for_finetuning(model, lora_r=0)
    assert trainable_parameters(model)[0] == 0
    codebook_before = model.model.alignedvq.quantizer.codebook.clone()
    weights_before = {n: p.clone() for n, p in model.named_parameters()}
    trainer = AlignedVQTrainer(model=model, args=_training_args(tmp_path, max_steps=3, logging_steps=1),
                               train_dataset=_Batches(6))
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3 and all(e["loss"] > 0 and "commitment_loss" in e for e in logged)
    assert not torch.equal(model.model.alignedvq.quantizer.codebook, codebook_before)
    assert all(torch.equal(p, weights_before[n]) for n, p in model.named_parameters())


# ---------------------------------------------------------------- image-grouped finetuning

BASE = Path(__file__).resolve().parents[1] / "artifacts" / "base-easyvqa"


@pytest.fixture(scope="module")
def easyvqa_batch():
    pytest.importorskip("easy_vqa")
    from transformers import AutoProcessor

    from transformers_alignedvq.training.data import EasyVQAAugment, VQACollator, load_easy_vqa

    processor = AutoProcessor.from_pretrained(BASE)
    rows = load_easy_vqa("train", limit=25)  # 3 images, several questions each
    batch = VQACollator(processor, train=True, image_transform=EasyVQAAugment(seed=0))([rows[i] for i in range(25)])
    return processor, rows, batch


def _alignedvq_with_lora():
    torch.manual_seed(0)
    model = tav.LlavaAlignedVQForConditionalGeneration.from_llava(BASE, codebook_size=16)
    prepare_for_finetuning(model, lora_r=4, lora_dropout=0.0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero adapters, so their gradients are checked through the whole path
            torch.nn.init.normal_(param, std=0.05)
    with torch.no_grad():
        model.model.alignedvq.dlp_in.gate.fill_(0.3)
    # Training mode (the commitment loss exists only there) with the EMA frozen and no dropout anywhere, so
    # two forwards see the same weights.
    model.model.alignedvq.quantizer.ema_decay = 1.0
    return model.train()


@pytest.mark.parametrize("kind", ["alignedvq", "llava"])
def test_shared_image_prefix_loss_matches_the_stock_forward(easyvqa_batch, kind):
    from transformers import LlavaForConditionalGeneration

    _, _, batch = easyvqa_batch
    if kind == "alignedvq":
        model = _alignedvq_with_lora()
    else:
        model = LlavaForConditionalGeneration.from_pretrained(BASE).eval()
    reference = model(**batch)
    ref_loss = getattr(reference, "lm_loss", None) if kind == "alignedvq" else reference.loss
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    shared = shared_image_prefix_loss(model, batch)
    assert shared is not None
    shared.lm_loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert torch.allclose(shared.lm_loss, ref_loss, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert torch.allclose(grad, ref_grads[name], atol=1e-6), name
    if kind == "alignedvq":
        # The commitment loss is over the distinct images (each image once, not once per question).
        unique = torch.unique(batch["pixel_values"].flatten(1), dim=0).view(-1, *batch["pixel_values"].shape[1:])
        expected = model.model.get_image_features(pixel_values=unique).commitment_loss
        assert expected is not None and torch.allclose(shared.commitment_loss, expected)
        # a batch normalised by the Trainer's token count over accumulated micro-batches
        count = int((batch["labels"] != -100).sum())
        half = shared_image_prefix_loss(model, batch, num_items_in_batch=2 * count)
        assert torch.allclose(half.lm_loss, shared.lm_loss / 2)


def test_shared_image_prefix_loss_declines_batches_without_shared_images(easyvqa_batch):
    processor, rows, _ = easyvqa_batch
    from transformers_alignedvq.training.data import VQACollator

    distinct = [rows[i] for i in range(len(rows)) if i == 0 or rows[i]["image_id"] != rows[i - 1]["image_id"]]
    assert len({r["image_id"] for r in distinct}) == len(distinct) >= 2
    batch = VQACollator(processor, train=True)(distinct)
    model = _alignedvq_with_lora()
    assert shared_image_prefix_loss(model, batch) is None
    labelled_prefix = dict(VQACollator(processor, train=True)([rows[i] for i in range(6)]))
    labelled_prefix["labels"] = labelled_prefix["input_ids"].clone()  # labels on the image prefix
    assert shared_image_prefix_loss(model, labelled_prefix) is None


def test_trainer_groups_images_and_uses_the_shared_prefix(tmp_path, monkeypatch):
    pytest.importorskip("easy_vqa")
    from transformers import AutoProcessor

    from transformers_alignedvq.training import trainer as training
    from transformers_alignedvq.training.data import VQACollator, load_easy_vqa

    processor = AutoProcessor.from_pretrained(BASE)
    data = load_easy_vqa("train", limit=60)
    model = _alignedvq_with_lora().train()
    seen, shared_steps = [], []
    real = training.shared_image_prefix_loss

    def spy(model, batch, **kwargs):
        seen.append(torch.unique(batch["pixel_values"].flatten(1), dim=0).shape[0])
        out = real(model, batch, **kwargs)
        shared_steps.append(out is not None)
        return out

    monkeypatch.setattr(training, "shared_image_prefix_loss", spy)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=3, learning_rate=1e-3,
        logging_steps=1, report_to="none", save_strategy="no", remove_unused_columns=False,
        use_cpu=True, disable_tqdm=True,
    )
    trainer = AlignedVQTrainer(
        model=model, args=args, train_dataset=data, data_collator=VQACollator(processor, train=True), images_per_batch=2
    )
    trainer.train()
    assert len(seen) == 3 and all(n <= 2 for n in seen)
    assert all(shared_steps)
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert logged and all("commitment_loss" in e and e["loss"] > 0 for e in logged)


def test_commitment_loss_is_weighted_once_per_optimizer_step(easyvqa_batch, tmp_path):
    """Under gradient accumulation the token loss is normalised over all micro-batches by the Trainer; the
    commitment term (a per-micro-batch mean) must be divided by the accumulation steps, not added in full."""
    _, _, batch = easyvqa_batch
    model = _alignedvq_with_lora()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, gradient_accumulation_steps=4,
        report_to="none", use_cpu=True, remove_unused_columns=False,
    )
    trainer = AlignedVQTrainer(model=model, args=args)
    trainer.current_gradient_accumulation_steps = 4
    count = int((batch["labels"] != -100).sum())
    loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True, num_items_in_batch=4 * count)
    weight = model.config.commitment_weight
    assert torch.allclose(outputs.lm_loss, model(**batch).lm_loss / 4, atol=1e-6)
    assert torch.allclose(loss, outputs.lm_loss + weight * outputs.commitment_loss / 4, atol=1e-6)


def test_cloud_vision_lora_adapts_only_blocks_the_cloud_runs(pixels):
    from tests.conftest import prompt_ids, tiny_alignedvq
    from transformers_alignedvq.training import cloud_vision_lora_targets

    model = tiny_alignedvq(split_site="ln1", split_layer=0)
    prepare_for_finetuning(model, lora_r=2, lora_cloud_vision=True)
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if "lora_A" in n and "vision_tower" in n}
    assert adapted and all(".layers.1." in n for n in adapted)  # block 0 holds the split: its ln1 is on the edge
    edge_before = model.edge_encoder().state_dict()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    model.train()
    ids = prompt_ids()
    model(input_ids=ids, pixel_values=pixels, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n and "vision_tower" in n)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    edge_after = model.edge_encoder().state_dict()
    vision = [k for k in edge_before if not k.startswith("alignedvq.")]  # the edge's DLP trains, its tower not
    assert vision and all(torch.equal(edge_before[k], edge_after[k]) for k in vision)
    with pytest.raises(ValueError, match="no vision block runs entirely in the cloud"):
        cloud_vision_lora_targets(tiny_alignedvq(split_site="mlp", split_layer=1).config)
