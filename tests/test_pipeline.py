"""Smoke run of the whole easy-VQA pipeline on a few dozen examples: base training, AlignedVQ finetuning,
evaluation over the wire format, and the results document."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("easy_vqa")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=ROOT):
    result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_pipeline_smoke(tmp_path):
    base = tmp_path / "base"
    run("examples/train_base_easyvqa.py", "--output", base, "--limit", "32", "--epochs", "1", "--skip-final-eval",
        "--vision-hidden", "32", "--text-hidden", "32", "--vision-layers", "3")
    runs, doc = tmp_path / "paper", tmp_path / "doc" / "results.md"
    common = ["examples/paper_in_miniature.py", "--base", base, "--runs", runs, "--doc", doc, "--train-limit", "24",
              "--test-limit", "16", "--ablation-eval", "16", "--ablation-epochs", "1", "--headline-epochs", "1",
              "--calibration-images", "8", "--kmeans-iters", "2", "--ablation-calibration-images", "8",
              "--ablation-kmeans-iters", "2", "--batch-size", "8", "--threads", "1"]
    run(*common, "--only", "base_raw", "base_jpeg10", "alignedvq_headline", "table1_mlp", "table1_ln1",
        "bits_K4096", "diag_L1", "figure4", "block_input")
    results = {p.stem: json.loads(p.read_text()) for p in (runs / "results").glob("*.json")}
    # finetunes are stored per seed (here the default, 0); the baselines and Figure 4 have none
    assert set(results) == {"base_raw", "base_jpeg10", "alignedvq_headline_s0", "alignedvq_headline_mlp_s0",
                            "table1_mlp_s0", "table1_ln1_s0", "bits_K4096_s0", "diag_L1_residual_kept_s0",
                            "diag_L1_mean_scale_s0", "figure4_magnitudes", "block_input_stats"}
    # --only matches name prefixes; the diagnostics are keyed apart from the real split they resemble
    for name in ("residual_kept", "mean_scale"):
        diagnostic = results[f"diag_L1_{name}_s0"]
        assert diagnostic["diagnostic"] == name and "same_run_as" not in diagnostic and diagnostic["seed"] == 0
    # the mean and scale travel beside the frame: two fp16 per token (65 tokens)
    scaled = results["diag_L1_mean_scale_s0"]
    assert scaled["side_bytes_per_image"] == 260 and scaled["bytes_per_image"] == 121 + 260
    # bits_K4096 is table1_ln1's configuration (block 0, ln1, K=4096, same seed): reused, not trained again
    assert results["bits_K4096_s0"]["same_run_as"] == "table1_ln1_s0"
    assert results["bits_K4096_s0"]["accuracy"] == results["table1_ln1_s0"]["accuracy"]
    results["table1_ln1"], results["alignedvq_headline"] = results["table1_ln1_s0"], results["alignedvq_headline_s0"]
    assert json.loads(results["table1_ln1"]["config_key"])["split_site"] == "ln1"
    assert results["table1_ln1"]["eval_split"] == "validation" and results["table1_ln1"]["eval_questions"] == 16
    head = results["alignedvq_headline"]
    assert head["eval_split"] == "test" and head["validation"]["eval_questions"] == 16
    assert results["base_raw"]["validation"]["eval_split"] == "validation"
    # 65 tokens x 12 bits = 98 payload bytes + 36-byte header + 4-byte CRC
    assert head["bytes_per_image"] == 121 and head["num_examples"] == 16 and 0 <= head["accuracy"] <= 1
    # easy-VQA's 64x64 flat-colour PNGs are a few hundred bytes: smaller than any JPEG (whose header alone is
    # ~600 bytes), so only sanity is checked here; the results document reports the real numbers.
    assert results["base_jpeg10"]["bytes_per_image"] > 600 and 0 < results["base_raw"]["bytes_per_image"] < 2000
    assert all(results["figure4_magnitudes"][s]["cv"] >= 0 for s in ("ln1", "attn", "ln2", "mlp"))
    # the inputs of blocks 0 and 1 of the 3-block tower: block 0's is the pre-LayerNorm's output
    stats = results["block_input_stats"]
    assert set(stats) == {"0", "1", "2", "eval_split"} and all(stats[b]["scale_cv"] >= 0 for b in "012")
    assert (runs / "alignedvq_headline_s0" / "model.safetensors").is_file()
    text = doc.read_text()
    assert "Table 2/3" in text and "Figure 4" in text and (doc.parent / "figures" / "figure4_magnitudes.png").is_file()
    assert "block-input diagnostic" in text
    # a second seed is a run of its own (not the first seed's result reused), and the tables show both
    run(*common, "--seeds", "0", "1", "--only", "table1_ln1")
    second = json.loads((runs / "results" / "table1_ln1_s1.json").read_text())
    assert second["seed"] == 1 and "same_run_as" not in second and "--seeds 0 1" in doc.read_text()
    assert " ± " in doc.read_text().split("## Table 1")[1].split("##")[0]
    # resuming: a second run finds every result and trains nothing
    again = run(*common, "--only", "base_raw", "alignedvq_headline")
    assert "k-means" not in again and "wrote" in again


def test_concurrent_workers_claim_each_experiment_once(tmp_path):
    import argparse
    import importlib.util
    import os

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        spec = importlib.util.spec_from_file_location("paper_in_miniature", ROOT / "examples" / "paper_in_miniature.py")
        paper = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(paper)
    finally:
        sys.path.remove(str(ROOT / "examples"))
    runner = paper.Runner.__new__(paper.Runner)
    runner.args = argparse.Namespace(only=None)
    runner.runs = tmp_path
    runner.pending = []
    (tmp_path / "results").mkdir()
    assert runner.claim("a")
    assert (tmp_path / "results" / "a.lock").read_text() == str(os.getpid())
    assert not runner.claim("a") and runner.pending == ["a"]  # a live worker (this one) holds it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "results" / "b.lock").write_text(dead.stdout.strip())
    assert runner.claim("b")  # the owner is gone: taken over
    runner.record("a", {"accuracy": 0.5, "eval_split": "validation"})
    assert not (tmp_path / "results" / "a.lock").exists() and runner.done("a")["accuracy"] == 0.5
    assert not runner.claim("a")  # done
    # a result scored before the validation split existed is not reused: it is run again
    runner.record("stale", {"accuracy": 0.5})
    assert runner.done("stale") is None and runner.claim("stale")
    # an ablation whose configuration was already run (same seed) reuses that result instead of training again
    runner.seed = 0
    key = runner._config_key(0.25, False, True, {"codebook_size": 4096}, seed=0)
    runner.record("table1_ln1_s0", {"accuracy": 0.9, "config_key": key, "eval_split": "validation"})
    runner.alignedvq("bits_K4096", epochs=0.25, codebook_size=4096)
    assert runner.done("bits_K4096_s0")["same_run_as"] == "table1_ln1_s0"
    assert runner.done("bits_K4096_s0")["accuracy"] == 0.9
    # ... but not across seeds, nor for a diagnostic of the same configuration
    assert runner._config_key(0.25, False, True, {"codebook_size": 4096}, seed=1) != key
    assert runner._config_key(0.25, False, True, {"codebook_size": 4096}, seed=0, diagnostic="mean_scale") != key
