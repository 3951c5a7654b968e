"""The finetune command (`transformers_alignedvq.training.finetune`, run by examples/finetune_alignedvq.py) with the
Trainer's usual options: a held-out split by image, eval_loss and VQA accuracy, checkpoints, exact resume,
the entropy model refitted for the new codebook."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from transformers_alignedvq.training.finetune import main, split_off_images

pytest.importorskip("easy_vqa")
BASE = Path(__file__).resolve().parents[1] / "artifacts" / "base-easyvqa"
TINY_RUN = ["--base", str(BASE), "--limit", "60", "--batch-size", "8", "--calibration-images", "8",
            "--kmeans-iters", "2", "--codebook-size", "16", "--split-layer", "1", "--split-site", "mlp",
            "--no-progress", "--logging-steps", "1", "--threads", "1", "--lr", "1e-3"]


def test_held_out_images_are_never_trained_on():
    from transformers_alignedvq.training.data import load_easy_vqa

    data = load_easy_vqa("train", limit=200)
    train, held = split_off_images(data, 3, seed=0)
    assert len(set(held["image_id"])) == 3 and not set(held["image_id"]) & set(train["image_id"])
    assert len(train) + len(held) == len(data)
    assert split_off_images(data, 3, seed=0)[1]["image_id"] == held["image_id"]  # fixed by the seed
    with pytest.raises(ValueError, match="eval-images"):
        split_off_images(data, 10_000)


def test_finetune_evaluates_saves_and_resumes_exactly(tmp_path, capsys):
    run = TINY_RUN + ["--max-steps", "4", "--eval-images", "2", "--eval-vqa-questions", "8", "--save-steps", "2"]
    straight = main(run + ["--output", str(tmp_path / "straight")])
    evals = [e for e in straight["log_history"] if "eval_loss" in e]
    assert len(evals) == 2 and all(e["eval_loss"] > 0 for e in evals)
    assert sum("eval_vqa_accuracy" in e for e in straight["log_history"]) == 2
    # A run preempted after step 2 resumes from that checkpoint and ends where the uninterrupted one did.
    checkpoint = tmp_path / "straight" / "trainer" / "checkpoint-2"
    main(run + ["--output", str(tmp_path / "resumed"), "--resume-from-checkpoint", str(checkpoint)])
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and any(".lora_B." in k for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    out = capsys.readouterr().out
    assert "entropy model fitted for the new codebook" in out
    assert (tmp_path / "resumed" / "entropy_model.safetensors").is_file()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        main(run + ["--output", str(tmp_path / "empty"), "--resume-from-checkpoint", "last"])


def test_skipping_the_entropy_model_says_what_frames_cost(tmp_path, capsys):
    main(TINY_RUN + ["--max-steps", "1", "--output", str(tmp_path), "--no-entropy-model"])
    line = [text for text in capsys.readouterr().out.splitlines() if text.startswith("no entropy model")]
    assert len(line) == 1 and "bit-packed frames of 53 B per image" in line[0]  # 65 tokens x 4 bits + header and "fit_entropy_model.py" in line[0]
    assert not (tmp_path / "entropy_model.safetensors").exists()
    assert json.loads((tmp_path / "training_log.json").read_text())
