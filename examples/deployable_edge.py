"""The edge as a device runs it, against the PyTorch edge with the exact search, on the easy-VQA test split.

    python examples/deployable_edge.py --json docs/data/deployable_edge.json --doc docs/edge.md

The model (default: the bundled one) answers every test question over real wire frames three or four ways: with
its PyTorch edge and the exact codeword search (the reference), with the ONNX edge it ships (``edge_model.onnx``
beside the model, if any), with an ONNX export using the shortlist search (rank 32, 8 candidates), and, where the
edge has a front to quantize (not at the ``patch`` site, whose convolution is folded into the codebooks), with an
int8 ONNX export calibrated on 256 training images. Each row gives the accuracy, the share of answers equal to
the reference's, and McNemar's test on the same questions with the verdict on "within 0.1 point of the
reference" (a paired 95% interval). With ``--doc`` the table replaces the ``deployable`` section of that document
(between ``<!-- split-report:deployable -->`` and ``<!-- /split-report:deployable -->``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from split_report import replace_section  # noqa: E402
from transformers import AutoModel, AutoProcessor  # noqa: E402

import transformers_alignedvq as tav  # noqa: E402
from transformers_alignedvq.edge_runtime import load_edge_runtime  # noqa: E402
from transformers_alignedvq.evaluation import evaluate_vqa  # noqa: E402
from transformers_alignedvq.evaluation.significance import compare_results, verdict_no_worse  # noqa: E402
from transformers_alignedvq.export.edge_export import export_edge  # noqa: E402
from transformers_alignedvq.export.search import SearchConfig  # noqa: E402
from transformers_alignedvq.training.data import load_easy_vqa  # noqa: E402

SHORTLIST = SearchConfig("shortlist", rank=32, candidates=8)
MARGIN = 0.001  # "the same accuracy": within 0.1 point, by a paired 95% interval


def edges(model_dir: Path, site: str, scratch: Path, threads: int) -> dict:
    """Name -> edge runtime for every deployable variant of ``model_dir``'s edge."""
    out = {}
    if (model_dir / "edge_model.onnx").is_file():
        shipped = json.loads((model_dir / "edge_config.json").read_text())
        precision = "int8 front" if shipped.get("onnx", {}).get("int8") else "fp32"
        name = f"ONNX {precision}, as shipped ({shipped.get('search', {}).get('method', 'exact')} search)"
        out[name] = load_edge_runtime(model_dir, backend="onnx", threads=threads)
    shortlist = export_edge(model_dir, scratch / "shortlist", format="onnx", search=SHORTLIST)
    out["ONNX fp32, shortlist search"] = load_edge_runtime(shortlist, threads=threads)
    if site != "patch":
        calibration = [row["image"] for row in load_easy_vqa("train").select(range(0, 2560, 10))]
        int8 = export_edge(model_dir, scratch / "int8", format="onnx", int8=True, search=SHORTLIST,
                           calibration_images=calibration)
        out["ONNX int8 front, shortlist search"] = load_edge_runtime(int8, threads=threads)
    return out


def score(model_dir: Path, threads: int, limit: int | None) -> list[dict]:
    """The reference, then every deployable edge, on the same test questions."""
    model = AutoModel.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    data = load_easy_vqa("test", limit=limit)
    reference = evaluate_vqa(model, processor, data, batch_size=256)
    rows = [{"edge": "PyTorch, exact search (reference)", **reference}]
    with tempfile.TemporaryDirectory() as scratch:
        for name, edge in edges(model_dir, model.config.split_site, Path(scratch), threads).items():
            result = evaluate_vqa(model, processor, data, batch_size=256, edge=edge.encode)
            same = sum(a == b for a, b in zip(result["predictions"], reference["predictions"]))
            rows.append({"edge": name, **result, "same_answers": same / len(data)})
            print(f"{name}: accuracy {result['accuracy']:.4f}", flush=True)
    return [{k: v for k, v in row.items() if k != "predictions"} for row in rows]


def table(rows: list[dict]) -> list[str]:
    reference = rows[0]
    out = ["| edge | test accuracy (%) | same answers as the reference | vs the reference (paired) | "
           "within 0.1 point |", "|---|---:|---:|---|---|"]
    out.append(f"| {reference['edge']} | {100 * reference['accuracy']:.2f} | – | – | – |")
    for row in rows[1:]:
        test = compare_results({**row, "eval_split": "test"}, {**reference, "eval_split": "test"})
        out.append(f"| {row['edge']} | {100 * row['accuracy']:.2f} | {100 * row['same_answers']:.2f}% | "
                   f"{test.describe()} | **{verdict_no_worse(test, MARGIN)}** |")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=tav.TINY_EASYVQA)
    p.add_argument("--json", default=None, help="the scores (per-question correctness included): written after "
                   "scoring, or read instead of scoring when the file exists")
    p.add_argument("--doc", default=None, help="write the table into this document's deployable section")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="smoke runs: first N test questions")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    stored = Path(args.json) if args.json else None
    if stored and stored.is_file():  # scored before: only the table is written again
        rows = json.loads(stored.read_text())
    else:
        rows = score(Path(args.model), args.threads, args.limit)
        if stored:
            stored.parent.mkdir(parents=True, exist_ok=True)
            stored.write_text(json.dumps(rows))
    lines = table(rows)
    print("\n".join(lines))
    if args.doc:
        doc = Path(args.doc)
        doc.write_text(replace_section(doc.read_text(), "deployable", lines))


if __name__ == "__main__":
    main()
