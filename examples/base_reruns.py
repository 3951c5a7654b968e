"""Is the base model's test accuracy a product of choosing it on test? Blind reruns of its recipe.

    python examples/train_base_easyvqa.py --output runs/base-rerun/seed0 --seed 0   # and seeds 1, 2
    python examples/base_reruns.py --runs runs/base-rerun --data docs/data/base_reruns --doc docs/base-model.md

The shipped base (``artifacts/base-easyvqa``) was picked among training runs on test accuracy, and trained on all
4,000 training images. The reruns use the training script's defaults as they are now: the validation images are
held out of training, only validation is read while training, and the last epoch is kept. This script scores every
rerun and the shipped base on the full validation and test splits with `evaluate_vqa` (the scorer of every other
report), picks the rerun with the best validation accuracy (what a user without test labels would do), and
compares each rerun with the shipped base on test, question by question (McNemar's mid-p; the bound "within 0.5
point" from a paired 95% interval). Scores go to ``--data`` (one JSON per model, per-question correctness
included; a model already scored there is not scored again) and the table replaces the ``base-reruns`` section
of ``--doc`` (between ``<!-- split-report:base-reruns -->`` and ``<!-- /split-report:base-reruns -->``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from split_report import replace_section  # noqa: E402

from transformers_alignedvq.evaluation.significance import (  # noqa: E402
    compare_results,
    format_mean_sd,
    verdict,
    verdict_no_worse,
)

PLATEAU_YES_NO = 0.95  # a run has left the plateau once its epoch-end yes/no accuracy on validation reaches this
MARGIN = 0.005  # "within half a point of the shipped base", by a paired 95% interval
SHIPPED = "shipped"


def learning_curve(run: Path) -> list[dict]:
    """The epoch-end validation records of a training run (``learning_curve.jsonl``)."""
    lines = (run / "learning_curve.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("type") == "eval" and "validation_subset_acc" in r]


def left_plateau(curve: list[dict]) -> int | None:
    """The first epoch whose yes/no accuracy on the epoch-end validation subset reaches `PLATEAU_YES_NO`."""
    for record in curve:
        if record.get("by_type", {}).get("yes/no", 0.0) >= PLATEAU_YES_NO:
            return record["epoch"]
    return None


def score(name: str, run: Path, data: Path) -> None:
    """Scores ``run``'s model on validation and test into ``data/<name>.json`` unless that file exists."""
    out = data / f"{name}.json"
    if out.is_file():
        return
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from transformers_alignedvq.evaluation import evaluate_vqa
    from transformers_alignedvq.training.data import load_easy_vqa

    model = LlavaForConditionalGeneration.from_pretrained(run).eval()
    processor = AutoProcessor.from_pretrained(run)
    record = {"name": name, "train_args": json.loads((run / "train_summary.json").read_text()).get("args", {})}
    for split in ("validation", "test"):
        result = evaluate_vqa(model, processor, load_easy_vqa(split), batch_size=256)
        record[split] = {"accuracy": result["accuracy"], "correct": result["correct"], "questions": len(result["correct"]),
                         "eval_split": split}
        print(f"{name} {split}: {result['accuracy']:.4f}", flush=True)
    record["curve"] = [{k: r[k] for k in ("epoch", "validation_subset_acc", "by_type")} for r in learning_curve(run)]
    data.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))


def chosen(reruns: list[dict]) -> dict:
    """The rerun a user would keep: the best validation accuracy (ties: the lower seed)."""
    return max(reruns, key=lambda r: (r["validation"]["accuracy"], -r["train_args"].get("seed", 0)))


def row(record: dict, shipped: dict, pick: dict) -> str:
    seed = record["train_args"].get("seed")
    label = "shipped base (chosen on test; trained on the validation images †)" if record is shipped else f"rerun, seed {seed}"
    if record is pick:
        label += " — chosen on validation"
    epoch = left_plateau(record["curve"])
    plateau = "–" if record is shipped else (f"epoch {epoch}" if epoch else "no")
    if record is shipped:
        return f"| {label} | {plateau} | {100 * record['validation']['accuracy']:.2f} † | " \
               f"{100 * record['test']['accuracy']:.2f} | – | – |"
    test = compare_results(record["test"], shipped["test"])
    return (f"| {label} | {plateau} | {100 * record['validation']['accuracy']:.2f} | {100 * record['test']['accuracy']:.2f} "
            f"| {test.describe()} | {verdict_no_worse(test, MARGIN)} |")


def report(shipped: dict, reruns: list[dict]) -> list[str]:
    pick = chosen(reruns)
    lines = ["| model | left the plateau (yes/no ≥ 95% on validation) | validation accuracy (%) | test accuracy (%) | "
             "test, against the shipped base (paired) | within 0.5 point of it |", "|---|---|---:|---:|---|---|"]
    lines += [row(r, shipped, pick) for r in [shipped, *reruns]]
    left = [r for r in reruns if left_plateau(r["curve"])]
    lines += ["", "† The shipped base trained on the validation images, so its validation accuracy is not held out.",
              "", f"- Reruns that left the plateau: {len(left)} of {len(reruns)}."]
    some = left and len(left) < len(reruns)
    lines.append(f"- Test accuracy over all reruns: {format_mean_sd([r['test']['accuracy'] for r in reruns])}"
                 + (f"; over those that left the plateau: {format_mean_sd([r['test']['accuracy'] for r in left])}."
                    if some else "."))
    tests = [compare_results(r["test"], shipped["test"]) for r in reruns]
    ahead = sum(verdict(t, a_better=False) == "agrees" for t in tests)
    lines.append(f"- The shipped base's lead over a rerun on test, in points: {format_mean_sd([-t.difference for t in tests])}; "
                 f"significant (mid-p < 0.05) for {ahead} of {len(reruns)} reruns.")
    test = compare_results(pick["test"], shipped["test"])
    lines.append(f"- The rerun chosen on validation (seed {pick['train_args'].get('seed')}) against the shipped base, "
                 f"on test: {test.describe()}; within 0.5 point of it: **{verdict_no_worse(test, MARGIN)}**.")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/base-rerun", help="folder of train_base_easyvqa.py runs, one per seed")
    p.add_argument("--shipped", default="artifacts/base-easyvqa")
    p.add_argument("--data", default="docs/data/base_reruns")
    p.add_argument("--doc", default="docs/base-model.md")
    args = p.parse_args(argv)
    data = Path(args.data)
    score(SHIPPED, Path(args.shipped), data)
    for run in sorted(Path(args.runs).glob("*/train_summary.json")):
        score(f"rerun_{run.parent.name}", run.parent, data)
    records = [json.loads(f.read_text()) for f in sorted(data.glob("*.json"))]
    shipped = next(r for r in records if r["name"] == SHIPPED)
    reruns = sorted((r for r in records if r["name"] != SHIPPED), key=lambda r: r["train_args"].get("seed", 0))
    if not reruns:
        raise SystemExit(f"no reruns in {args.runs} or {data}")
    lines = report(shipped, reruns)
    print("\n".join(lines))
    doc = Path(args.doc)
    doc.write_text(replace_section(doc.read_text(), "base-reruns", lines))


if __name__ == "__main__":
    main()
