"""Tests of the easy-VQA data pipeline and the base-model training script."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("datasets")
pytest.importorskip("easy_vqa")
torch = pytest.importorskip("torch")

from transformers_alignedvq.data import VALIDATION_IMAGES  # noqa: E402
from transformers_alignedvq.training.data import (  # noqa: E402
    EASY_VQA_SIZES,
    EasyVQAAugment,
    ImageGroupedBatchSampler,
    VQACollator,
    build_messages,
    easy_vqa_answers,
    format_conversation,
    format_prompt,
    image_attributes,
    load_easy_vqa,
    question_template,
    validation_image_ids,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_base_easyvqa.py"

torch.set_num_threads(1)


def _load_script():
    spec = importlib.util.spec_from_file_location("train_base_easyvqa", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture(scope="module")
def processor(script):
    train = load_easy_vqa("train")
    tokenizer = script.build_tokenizer(list(train["question"]) + easy_vqa_answers())
    return script.build_processor(tokenizer, image_size=64, patch_size=8)


def _rows(split, n):
    ds = load_easy_vqa(split, limit=n)
    return [ds[i] for i in range(len(ds))]


# ---------------------------------------------------------------- dataset


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_split_sizes_and_columns(split):
    ds = load_easy_vqa(split)
    assert len(ds) == EASY_VQA_SIZES[split]
    assert set(ds.column_names) == {"image", "question", "answer", "image_id"}
    row = ds[0]
    assert row["image"].size == (64, 64)
    assert isinstance(row["question"], str) and row["question"].endswith("?")
    assert set(ds["answer"]) <= set(easy_vqa_answers())


def test_answers_and_limit():
    assert len(easy_vqa_answers()) == 13
    ds = load_easy_vqa("train", limit=10)
    assert len(ds) == 10
    assert ds["question"] == load_easy_vqa("train")["question"][:10]
    assert len(load_easy_vqa("test", limit=0)) == 0
    with pytest.raises(ValueError):
        load_easy_vqa("dev")


def test_validation_is_held_out_training_images():
    import easy_vqa

    train, validation = load_easy_vqa("train"), load_easy_vqa("validation")
    train_ids, validation_ids = set(train["image_id"]), set(validation["image_id"])
    # carved by image: no image contributes questions to both splits
    assert len(validation_ids) == VALIDATION_IMAGES and not train_ids & validation_ids
    # together they are exactly the published training split, every question once
    published = easy_vqa.get_train_questions()
    rows = [tuple(zip(d["question"], d["answer"], d["image_id"])) for d in (train, validation)]
    assert sorted(rows[0] + rows[1]) == sorted(zip(*published))
    # the carve is fixed (same ids on every call, not the first or last images) and its images are the train files
    assert validation_image_ids(published[2]) == frozenset(validation_ids)
    assert max(validation_ids) - min(validation_ids) > 3000
    paths = easy_vqa.get_train_image_paths()
    row = validation[0]
    from PIL import Image

    assert row["image"].tobytes() == Image.open(paths[row["image_id"]]).tobytes()


def test_validation_differs_from_test():
    # "validation" used to alias "test"; choices made on it must not see test questions' images
    validation, test = load_easy_vqa("validation", limit=50), load_easy_vqa("test", limit=50)
    assert validation.split == "validation"
    assert [r["image"].tobytes() for r in validation] != [r["image"].tobytes() for r in test]


def test_image_ids_are_consistent():
    ds = load_easy_vqa("test", limit=40)
    images = {}
    for row in ds:
        key = row["image_id"]
        arr = bytes(row["image"].convert("RGB").tobytes())
        assert images.setdefault(key, arr) == arr


def _answer_from_attributes(attrs, question):
    import re

    words = set(re.findall(r"[a-z]+", question))
    if question.startswith("what"):
        return attrs["color"] if "color" in words else attrs["shape"]
    (key, named), = [(k, w) for w in words for k in ("color", "shape")
                     if w in {"color": {"red", "green", "blue", "black", "gray", "teal", "yellow", "brown"},
                              "shape": {"circle", "rectangle", "triangle"}}[k]]
    present = attrs[key] == named
    return "yes" if present != bool(words & {"not", "no"}) else "no"


@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_image_attributes_answer_every_question(split):
    ds = load_easy_vqa(split)
    questions, answers, ids = ds["question"], ds["answer"], ds["image_id"]
    attrs = image_attributes(questions, answers, ids)
    assert len(attrs) == len(set(ids))
    # nearly every image gets both attributes; every question they cover is
    # answered correctly by them (so they are consistent with the dataset)
    assert sum("shape" in a and "color" in a for a in attrs.values()) > 0.85 * len(attrs)
    checked = 0
    for q, a, i in zip(questions, answers, ids):
        try:
            pred = _answer_from_attributes(attrs[i], q)
        except KeyError:
            continue
        assert pred == a, (q, a, attrs[i])
        checked += 1
    assert checked > 0.9 * len(questions)


def test_question_template():
    assert question_template("Is there not a red shape in the image?") == "is there not a <colour> shape in the image?"
    assert question_template("what is the color of the triangle?") == "what is the color of the <shape>?"
    # whole words only: "shape" is not a shape word, and "reddish" is not "red"
    assert question_template("what shape is present?") == "what shape is present?"
    assert question_template("is it reddish?") == "is it reddish?"


# ---------------------------------------------------------------- formatting


def test_chat_template(processor):
    prompt = format_prompt(processor, "what color is the shape?")
    assert prompt == "<s><|user|> <image> what color is the shape?<|assistant|>"
    direct = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the shape?"}]}],
        add_generation_prompt=True,
    )
    assert direct == prompt
    full = format_conversation(processor, "what color is the shape?", "blue")
    assert full == prompt + " blue</s>"
    assert build_messages("q?", "a")[1] == {"role": "assistant", "content": [{"type": "text", "text": "a"}]}


def test_processor_expands_image_token(processor):
    row = _rows("train", 1)[0]
    batch = processor(images=[row["image"]], text=[format_prompt(processor, row["question"])], return_tensors="pt")
    n_image = int((batch["input_ids"] == processor.image_token_id).sum())
    assert n_image == (64 // 8) ** 2
    assert tuple(batch["pixel_values"].shape) == (1, 3, 64, 64)


# ---------------------------------------------------------------- collator


def test_train_collator_masks_all_but_answer(processor):
    rows = _rows("train", 24)
    batch = VQACollator(processor, train=True)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "labels"}
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape
    tok = processor.tokenizer
    lengths = mask.sum(1)
    assert bool((mask[:, 0] == 1).all()), "training batches are right-padded"
    for r, row in enumerate(rows):
        kept = labels[r][labels[r] != -100]
        assert tok.decode(kept) == f"{row['answer']} {tok.eos_token}"
        assert kept.tolist() == tok(f" {row['answer']}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        # the supervised tokens are the last real tokens, never padding
        assert bool((labels[r, lengths[r] :] == -100).all())
        assert labels[r, lengths[r] - 1].item() == tok.eos_token_id
        assert bool((ids[r][labels[r] != -100] == kept).all())


def test_eval_collator_left_pads_prompts(processor):
    rows = _rows("test", 16)
    batch = VQACollator(processor, train=False)(rows)
    assert batch["answers"] == [r["answer"] for r in rows]
    assert batch["questions"] == [r["question"] for r in rows]
    assert "labels" not in batch
    tok = processor.tokenizer
    assistant = tok.convert_tokens_to_ids("<|assistant|>")
    assert bool((batch["input_ids"][:, -1] == assistant).all()), "prompts end with the generation prompt"
    assert bool((batch["attention_mask"][:, -1] == 1).all()), "generation batches are left-padded"


def test_augment_keeps_shape_and_ids_share_pixels(processor):
    rows = _rows("train", 30)
    aug = EasyVQAAugment(seed=0)
    image = rows[0]["image"].convert("RGB")
    out = aug(image)
    assert out.size == image.size
    # the shape is only moved or mirrored: same number of shape pixels
    import numpy as np

    def n_fg(im):
        a = np.asarray(im).astype(int)
        return int((np.abs(a - a[0, 0]).max(-1) > 24).sum())

    for _ in range(5):
        assert n_fg(aug(image)) == n_fg(image)
    batch = VQACollator(processor, train=True, image_transform=aug)(rows)
    pv = batch["pixel_values"]
    for i in range(len(rows)):
        for j in range(len(rows)):
            same = bool(torch.equal(pv[i], pv[j]))
            assert same == (rows[i]["image_id"] == rows[j]["image_id"])


def test_image_grouped_sampler():
    ids = [0, 0, 1, 1, 1, 2, 3, 3, 4]
    sampler = ImageGroupedBatchSampler(ids, 2, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3
    assert sorted(i for b in batches for i in b) == list(range(len(ids)))
    for b in batches:
        assert len({ids[i] for i in b}) <= 2
    assert list(sampler) != batches or len(batches) == 1  # reshuffled per epoch


# ---------------------------------------------------------------- training script


def test_training_loss_equals_stock_forward(script, processor):
    args = script.parse_args(
        ["--output", "unused", "--vision-hidden", "32", "--vision-layers", "2", "--vision-heads", "2",
         "--text-hidden", "32", "--text-layers", "1", "--text-heads", "2"]
    )
    torch.manual_seed(0)
    model = script.build_model(args, processor.tokenizer)
    rows = _rows("train", 25)  # ~3 images, several questions each
    batch = VQACollator(processor, train=True, image_transform=EasyVQAAugment(seed=0))(rows)
    ref = model(**batch).loss
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    loss = script.training_loss(model, batch)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.allclose(loss, ref, atol=1e-6)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-6)


def test_smoke_training_run_is_loadable(tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    out = tmp_path / "base"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--output", str(out), "--limit", "32", "--epochs", "1", "--threads", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (out / "model.safetensors").exists()
    curve = [json.loads(line) for line in (out / "learning_curve.jsonl").read_text().splitlines()]
    assert any(r["type"] == "eval" for r in curve) and curve[-1]["type"] == "final"

    model = LlavaForConditionalGeneration.from_pretrained(out)
    proc_loaded = AutoProcessor.from_pretrained(out)
    assert type(proc_loaded).__name__ == "LlavaProcessor"
    assert model.config.vision_config.num_hidden_layers >= 2
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == "default"
    rows = _rows("test", 4)
    batch = VQACollator(proc_loaded, train=False)(rows)
    batch.pop("answers"), batch.pop("questions")
    with torch.no_grad():
        gen = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert gen.shape[0] == 4 and gen.shape[1] > batch["input_ids"].shape[1]
