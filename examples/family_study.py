#!/usr/bin/env python
"""AlignedVQ on a second family: the easy-VQA LLaVA-NeXT (`train_family_easyvqa.py`) against its own base.

The split setting is the one the LLaVA-1.5 study chose on validation and ships (`split_study.py`: the patch
site, two residual codebooks of 4096, the finetune recipe at its full budget); nothing here is chosen on this
family's test split. Every seed is finetuned with `python -m transformers_alignedvq.training.finetune` (the same
command for every family), loaded back through the Auto classes, and scored on validation and then, once, on
test with its images crossing the wire as frames with their tile geometry (entropy-coded sizes too). The base
is scored on the same questions from pixels. Each seed gets a paired test against the base on the same
questions and a verdict on "within half a point of the base".

    python examples/family_study.py --base runs/next-base --runs runs/family_study --seeds 0 1 2
    python examples/family_study.py --runs runs/family_study --report     # the table, from the saved results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

from transformers_alignedvq.entropy import load_entropy_model  # noqa: E402
from transformers_alignedvq.evaluation import evaluate_vqa  # noqa: E402
from transformers_alignedvq.evaluation.significance import (  # noqa: E402
    combine_verdicts,
    compare_results,
    format_mean_sd,
    verdict_no_worse,
)
from transformers_alignedvq.training.data import load_easy_vqa  # noqa: E402
from transformers_alignedvq.training.finetune import main as run_finetune  # noqa: E402

RECIPE = ["--split-layer", "0", "--split-site", "patch", "--num-codebooks", "2", "--codebook-size", "4096",
          "--lr", "5e-4", "--batch-size", "32"]
MARGIN = 0.005  # half a point


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="runs/next-base")
    p.add_argument("--runs", default="runs/family_study")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--calibration-images", type=int, default=2000)
    p.add_argument("--kmeans-iters", type=int, default=20)
    p.add_argument("--limit", type=int, default=None, help="smoke runs: first N train/validation/test questions")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report", action="store_true", help="print the table from the saved results and stop")
    return p.parse_args(argv)


def score(model, processor, data: dict, **options) -> dict:
    """Test scores with the validation scores under ``validation``."""
    validation = evaluate_vqa(model, processor, data["validation"], batch_size=128, **options)
    result = evaluate_vqa(model, processor, data["test"], batch_size=128, **options)
    return {**result, "validation": validation}


def score_base(args, processor, data: dict, results: Path) -> None:
    path = results / "base.json"
    if not path.is_file():
        base = AutoModelForImageTextToText.from_pretrained(args.base).eval()
        path.write_text(json.dumps({**score(base, processor, data, mode="pixels"), "name": "base"}))


def finetune_seed(args, seed: int, processor, data: dict, results: Path) -> None:
    path = results / f"s{seed}.json"
    if path.is_file():
        return
    folder = Path(args.runs) / f"s{seed}"
    argv = ["--base", args.base, "--output", str(folder), "--epochs", str(args.epochs), "--seed", str(seed),
            "--calibration-images", str(args.calibration_images), "--kmeans-iters", str(args.kmeans_iters),
            "--threads", str(args.threads), "--no-progress", "--logging-steps", "50", *RECIPE]
    if args.limit:
        argv += ["--limit", str(args.limit)]
    started = time.time()
    run_finetune(argv)
    seconds = time.time() - started
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()  # strict: no missing or unexpected keys
    result = score(model, processor, data, entropy_model=load_entropy_model(folder))
    result.update(name=f"s{seed}", seed=seed, train_seconds=seconds, epochs=args.epochs)
    path.write_text(json.dumps(result, indent=1))
    print(f"s{seed}: {result['validation']['accuracy']:.4f} validation, {result['accuracy']:.4f} test", flush=True)


def report(results: Path) -> str:
    """The markdown table: the base, each seed, mean ± sd, and the paired verdicts against the base."""
    base = json.loads((results / "base.json").read_text())
    runs = [json.loads(p.read_text()) for p in sorted(results.glob("s*.json"))]
    lines = ["| model | validation | test | bytes / image raw | coded | test vs base (paired) | within 0.5 point |",
             "|---|---:|---:|---:|---:|---|---|",
             f"| base LLaVA-NeXT (pixels) | {100 * base['validation']['accuracy']:.2f}% | "
             f"{100 * base['accuracy']:.2f}% | {base['bytes_per_image']:.0f} (PNG) | | | |"]
    verdicts = []
    for run in runs:
        test = compare_results(run, base)
        verdicts.append(verdict_no_worse(test, MARGIN))
        lines.append(f"| AlignedVQ seed {run['seed']} | {100 * run['validation']['accuracy']:.2f}% | "
                     f"{100 * run['accuracy']:.2f}% | {run['bytes_per_image']:.1f} | "
                     f"{run.get('entropy_coded_bytes_per_image', float('nan')):.1f} | {test.describe()} | "
                     f"{verdicts[-1]} |")
    if len(runs) > 1:
        lines.append(f"| AlignedVQ, {len(runs)} seeds | {format_mean_sd([r['validation']['accuracy'] for r in runs])} "
                     f"| {format_mean_sd([r['accuracy'] for r in runs])} | | | | {combine_verdicts(verdicts)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    results = Path(args.runs) / "results"
    if args.report:
        print(report(results))
        return
    torch.set_num_threads(args.threads)
    results.mkdir(parents=True, exist_ok=True)
    processor = AutoProcessor.from_pretrained(args.base)
    data = {split: load_easy_vqa(split, limit=args.limit) for split in ("validation", "test")}
    score_base(args, processor, data, results)
    for seed in args.seeds:
        finetune_seed(args, seed, processor, data, results)
    print(report(results))


if __name__ == "__main__":
    main()
