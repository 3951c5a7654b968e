"""examples/split_report.py: the split study's tables from results files, into the marked sections of a document."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from transformers_alignedvq.evaluation.significance import correctness_bits

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = 400


@pytest.fixture
def split_report():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        yield importlib.import_module("split_report")
    finally:
        sys.path.remove(str(ROOT / "examples"))


def _result(correct: int, split: str, **fields) -> dict:
    bits = correctness_bits([1.0] * correct + [0.0] * (QUESTIONS - correct))
    return {"accuracy": correct / QUESTIONS, "correct": bits, "eval_split": split, "bytes_per_image": 218.0, **fields}


def _write(folder: Path, name: str, result: dict) -> None:
    (folder / "results").mkdir(parents=True, exist_ok=True)
    (folder / "results" / f"{name}.json").write_text(json.dumps(result))


def test_tables_land_between_the_markers_with_seeds_and_verdicts(tmp_path, split_report):
    screen, full = tmp_path / "screen", tmp_path / "full"
    _write(screen, "base", {**_result(400, "validation"), "validation": _result(400, "validation")})
    _write(screen, "patch_0__s0", {**_result(380, "validation"), "entropy_coded_bytes_per_image": 41.0})
    _write(screen, "patch_0_rvq2__s0", {**_result(392, "validation"), "entropy_coded_bytes_per_image": 51.0})
    _write(full, "base", {**_result(400, "test"), "validation": _result(400, "validation")})
    for seed, correct in enumerate((399, 398, 380)):  # the last seed is 5 points off: not within 0.5 point
        _write(full, f"patch_0_rvq2__s{seed}", {**_result(correct, "test"), "validation": _result(399, "validation"),
                                                "split_site": "patch", "split_layer": 0, "codes_per_token": 2,
                                                "entropy_coded_bytes_per_image": 59.0})
    bench = {"args": {"stages": 2}, "rows": [
        {"site": "patch_0", "method": "onnx, shortlist", "ms": 20.0, "agreement": 0.94},
        {"site": "patch_0", "method": "dense search: PyTorch addmm + argmin", "ms": 100.0, "agreement": 1.0}]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    doc = tmp_path / "edge.md"
    (tmp_path / "figures").mkdir()
    markers = "".join(f"<!-- split-report:{n} -->\nold\n<!-- /split-report:{n} -->\n" for n in ("screen", "report", "bench"))
    doc.write_text("# kept\n" + markers + "kept too\n")
    split_report.main(["--screen", str(screen), "--runs", str(full), "--edge", str(tmp_path / "bench.json"),
                       "--doc", str(doc)])
    text = doc.read_text()
    assert text.startswith("# kept\n") and text.endswith("kept too\n") and "\nold\n" not in text
    rvq2 = next(line for line in text.splitlines() if line.startswith("| patch embeddings, residual VQ, 2 stages |")
                and "seeds" in line)
    assert "98.08 ± 2.67 (3 seeds)" in rvq2 and "disagrees: **disagrees**" in rvq2
    assert "218 / 59.0" in rvq2 and "20.0 (0.20x)" in rvq2
    assert "+3.00 points" in text  # the screen's paired comparison with one codebook
    assert "| 2 | patch_0 | onnx, shortlist | 20.0 | 0.20x | 94.00% |" in text
    assert (tmp_path / "figures" / "split_choice.png").is_file()


def test_a_document_without_the_markers_is_refused(tmp_path, split_report):
    for folder in ("screen", "full"):
        _write(tmp_path / folder, "base", {**_result(400, "test"), "validation": _result(400, "validation")})
    doc = tmp_path / "edge.md"
    doc.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="no <!-- split-report:screen -->"):
        split_report.main(["--screen", str(tmp_path / "screen"), "--runs", str(tmp_path / "full"), "--doc", str(doc)])
