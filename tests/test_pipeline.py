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
              "--calibration-images", "8", "--kmeans-iters", "2", "--batch-size", "8", "--threads", "1"]
    out = run(*common, "--only", "base_raw", "base_jpeg10", "alignedvq_headline", "table1_mlp", "figure4")
    results = {p.stem: json.loads(p.read_text()) for p in (runs / "results").glob("*.json")}
    assert set(results) == {"base_raw", "base_jpeg10", "alignedvq_headline", "table1_mlp", "figure4_magnitudes"}
    head = results["alignedvq_headline"]
    # 65 tokens x 12 bits = 98 payload bytes + 36-byte header + 4-byte CRC
    assert head["bytes_per_image"] == 138 and head["num_examples"] == 16 and 0 <= head["accuracy"] <= 1
    # easy-VQA's 64x64 flat-colour PNGs are a few hundred bytes: smaller than any JPEG (whose header alone is
    # ~600 bytes), so only sanity is checked here; the results document reports the real numbers.
    assert results["base_jpeg10"]["bytes_per_image"] > 600 and 0 < results["base_raw"]["bytes_per_image"] < 2000
    assert all(results["figure4_magnitudes"][s]["cv"] >= 0 for s in ("ln1", "attn", "ln2", "mlp"))
    assert (runs / "alignedvq_headline" / "model.safetensors").is_file()
    text = doc.read_text()
    assert "Table 2/3" in text and "Figure 4" in text and (doc.parent / "figures" / "figure4_magnitudes.png").is_file()
    # resuming: a second run finds every result and trains nothing
    again = run(*common, "--only", "base_raw", "alignedvq_headline")
    assert "k-means" not in again and "wrote" in again
