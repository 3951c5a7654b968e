"""examples/ptq_report.py and examples/deployable_edge.py: documents written from results files, with seeds and
paired verdicts, and nothing carried over from the document they replace."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from transformers_alignedvq.evaluation.significance import correctness_bits

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = 1000


@pytest.fixture
def examples():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        yield SimpleNamespace(ptq_report=importlib.import_module("ptq_report"),
                              deployable_edge=importlib.import_module("deployable_edge"))
    finally:
        sys.path.remove(str(ROOT / "examples"))


def _scores(correct: int, split: str = "test", questions: int = QUESTIONS) -> dict:
    bits = correctness_bits([1.0] * correct + [0.0] * (questions - correct))
    return {"accuracy": correct / questions, "correct": bits, "eval_split": split, "eval_questions": questions}


def _quantized(correct: int, seconds: float = 10.0, edge: bool = False, **fields) -> dict:
    blocks = [["vision.0"], ["vision.1.edge"]] if edge else [["vision.0"], ["vision.1"]]
    report = {"search_seconds": seconds, "blocks": blocks}
    return {**_scores(correct), "report": report, "memory": {"bytes": 2.5e6, "fp_bytes": 12.9e6}, **fields}


def _write(runs: Path, results: dict[str, dict]) -> None:
    (runs / "results").mkdir(parents=True, exist_ok=True)
    for name, result in results.items():
        (runs / "results" / f"{name}.json").write_text(json.dumps(result))


def _runs(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    results = {"base_fp": {**_scores(998), "fp_bytes": 12.9e6}, "alignedvq_fp": {**_scores(995), "fp_bytes": 13e6}}
    for seed in range(3):
        for model in ("base", "alignedvq"):
            results[f"{model}_qvlm_w6a6_s{seed}"] = _quantized(997)
            results[f"{model}_layerwise_w6a6_s{seed}"] = _quantized(996)
            results[f"{model}_rtn_w4a4_s{seed}"] = _quantized(800)
            results[f"{model}_layerwise_w4a4_s{seed}"] = _quantized(960)
            results[f"{model}_qvlm_w4a4_s{seed}"] = _quantized(965, seconds=50.0)
            results[f"ablation_{model}_qvlm_w4a4_alljoint_s{seed}"] = _quantized(960, seconds=100.0 + 60 * seed)
            results[f"{model}_dependency_s{seed}"] = {"pairs": [
                {"layer": "vision.0", "next": "vision.1", "entropy": [0.9, 0.95], "ded": [1e-3, 2e-3],
                 "r2": 0.1 * (seed + 1)}]}
    _write(runs, results)
    return runs


def test_the_document_is_read_from_the_runs_alone(tmp_path, examples):
    runs, doc = _runs(tmp_path), tmp_path / "ptq.md"
    doc.write_text("old text\n\n## Earlier results, not regenerated\n\n| stale | 1.00 |\n")
    examples.ptq_report.write(runs, doc, SimpleNamespace(seeds=[0, 1, 2], calibration_images=256))
    text = doc.read_text()
    assert "Earlier results" not in text and "stale" not in text and "old text" not in text
    assert "| model | method | W6A6 | W4A4 |" in text  # no column for a width nobody ran
    assert "96.50 ± 0.00" in text
    assert "| vision.0 (vision.1) | 0.9250 | 1.50e-03 | 0.100 / 0.200 / 0.300 |" in text


def test_the_claims_decide_draw_by_draw(tmp_path, examples):
    runs, doc = _runs(tmp_path), tmp_path / "ptq.md"
    examples.ptq_report.write(runs, doc, SimpleNamespace(seeds=[0, 1, 2], calibration_images=256))
    text = doc.read_text()
    search = next(line for line in text.splitlines() if line.startswith("- Entropy-guided blocks") and "base" in line)
    assert "50 s vs 100 s, 50 s vs 160 s, 50 s vs 220 s" in search and search.endswith("**agrees**.")
    entropy = next(line for line in text.splitlines() if line.startswith("- Activation entropy predicts"))
    assert "between 0.100 and 0.300" in entropy and entropy.endswith("**disagrees**.")
    w6 = next(line for line in text.splitlines() if "W6A6 Q-VLM within 0.5 point" in line and "base" in line)
    assert "-0.10 points" in w6


def test_an_edge_without_layers_is_not_an_ablation_part(tmp_path, examples):
    results = examples.ptq_report.Results({"alignedvq_qvlm_w4a4_s0": _quantized(965)})
    assert examples.ptq_report._parts(results, "alignedvq") == ("vision", "projector", "language_model")
    results = examples.ptq_report.Results({"alignedvq_qvlm_w4a4_s0": _quantized(965, edge=True)})
    assert examples.ptq_report._parts(results, "alignedvq")[0] == "edge"


def test_the_int8_check_is_a_paired_test(examples):
    fp32, int8 = {**_scores(994), "model": "fp32"}, {**_scores(990), "model": "int8"}
    line = examples.ptq_report._int8_within([fp32, int8])
    assert "-0.40 points (0 vs 4 of 1,000 questions" in line and "**" in line
    unpaired = examples.ptq_report._int8_within([{"accuracy": 0.9}, {"accuracy": 0.9}])
    assert "not testable" in unpaired


def test_the_deployable_table_gives_same_answers_and_a_verdict(examples):
    reference = {**_scores(4975, questions=5000), "edge": "PyTorch, exact search (reference)"}
    same = {**_scores(4975, questions=5000), "edge": "ONNX fp32, shortlist search", "same_answers": 1.0}
    worse = {**_scores(4500, questions=5000), "edge": "ONNX int8 front, shortlist search", "same_answers": 0.9}
    lines = examples.deployable_edge.table([reference, same, worse])
    assert lines[2].startswith("| PyTorch, exact search (reference) | 99.50 |")
    assert "100.00%" in lines[3] and lines[3].endswith("**agrees** |")  # 0 of 5,000 discordant: within 0.1 point
    assert lines[4].endswith("**disagrees** |")
    few = [{**_scores(16, questions=16), "edge": name, "same_answers": 1.0} for name in ("reference", "onnx")]
    assert examples.deployable_edge.table(few)[3].endswith("**inconclusive** |")  # 16 questions show nothing


def test_a_kernel_with_wrong_output_gets_no_time_and_no_speedup(examples):
    kernels = {"threads": 1, "accuracy": [], "speed": [
        {"tokens": 1, "variant": "fp32 eager", "ms": 50.0, "vs_fp32_eager": 1.0, "relative_error": 0.0},
        {"tokens": 1, "variant": "int8 eager", "ms": 40.0, "vs_fp32_eager": 1.25, "relative_error": 0.0},
        {"tokens": 1, "variant": "int8 compiled", "ms": None, "vs_fp32_eager": None, "relative_error": 1e7},
        {"tokens": 600, "variant": "fp32 eager", "ms": 1000.0, "vs_fp32_eager": 1.0, "relative_error": 0.0}]}
    text = "\n".join(examples.ptq_report._kernels(examples.ptq_report.Results({"kernels": kernels})))
    assert "| 1 | int8 compiled | wrong output (relative error 1.0e+07) | — |" in text
    assert "Wrong output, so no time: int8 compiled at 1 token(s)" in text
    claim = examples.ptq_report._speed_claim(kernels)
    assert "decode token 1.25x faster (int8 eager)" in claim
    assert "prefill no int8 variant computed the right output" in claim
