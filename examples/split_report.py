"""Write the split study's tables into docs/edge.md: the choice on validation, the report on test with seeds.

    python examples/split_study.py --base artifacts/base-easyvqa --runs runs/split_screen --screen
    python examples/split_study.py --base artifacts/base-easyvqa --runs runs/split_full --seeds 0 1 2 \\
        --only patch_0_rvq2
    python benchmarks/edge_encode.py --sites patch_0 --json runs/edge_encode.json
    python benchmarks/edge_encode.py --sites patch_0 --stages 2 --json runs/edge_encode_2.json
    python examples/split_report.py --screen runs/split_screen --runs runs/split_full \\
        --edge runs/edge_encode.json runs/edge_encode_2.json --doc docs/edge.md

Every number in the tables is read from those files. The tables replace what stands between the
``<!-- split-report:NAME -->`` and ``<!-- /split-report:NAME -->`` lines of the document (``screen``, ``report``,
and ``bench`` when benchmark files are given), so the hand-written text around them stays.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

from transformers_alignedvq.evaluation.significance import (
    combine_verdicts,
    compare_results,
    format_mean_sd,
    mean_sd,
    verdict,
    verdict_no_worse,
)

LABEL = {
    "input_0": "input of block 0",
    "ln1_0": "ln1 of block 0 (the paper's site)",
    "mlp_0": "output of block 0",
    "mlp_1": "output of block 1 (the bundled model until now)",
    "input_0_cloud_lora": "input of block 0, LoRA in the cloud's vision blocks",
    "patch_0": "patch embeddings (before positions)",
    "patch_0_cloud_lora": "patch embeddings, LoRA in the cloud's vision blocks",
    "patch_0_rvq2": "patch embeddings, residual VQ, 2 stages",
    "patch_0_rvq3": "patch embeddings, residual VQ, 3 stages",
    "patch_0_g2": "patch embeddings, grouped VQ, 2 groups",
    "patch_0_k16k": "patch embeddings, K = 16,384",
    "patch_0_rvq2_cloud_lora": "patch embeddings, residual VQ, 2 stages, LoRA in the cloud's vision blocks",
    "input_0_rvq2": "input of block 0, residual VQ, 2 stages",
}


def load(runs: Path) -> tuple[dict, dict[str, dict[int, dict]]]:
    """``(base result, {candidate: {seed: result}})`` of a split-study folder (edge variants left out)."""
    base, found = None, defaultdict(dict)
    for path in sorted((runs / "results").glob("*.json")):
        result = json.loads(path.read_text())
        match = re.fullmatch(r"(.+)__s(\d+)", path.stem)
        if path.stem == "base":
            base = result
        elif match:
            found[match.group(1)][int(match.group(2))] = result
    return base, dict(found)


def variants(runs: Path, name: str, seed: int) -> dict[str, dict]:
    return {path.stem.split("__")[-1]: json.loads(path.read_text())
            for path in sorted((runs / "results").glob(f"{name}__s{seed}__*.json"))}


def pct(value: float) -> str:
    return f"{100 * value:.2f}"


def coded(result: dict) -> str:
    size = result.get("entropy_coded_bytes_per_image")
    return "n/a" if size is None else f"{size:.1f}"


def screen_table(base: dict, screened: dict) -> list[str]:
    """One row per candidate at the ablation budget, on validation (what the choice is made on)."""
    reference = screened.get("patch_0", {}).get(0)
    lines = ["| candidate | validation accuracy (%) | vs base (points) | vs patch embeddings, 1 stage (paired) | "
             "frame bytes (raw) | frame bytes (coded) |", "|---|---:|---:|---|---:|---:|"]
    for name in sorted(screened, key=lambda n: -screened[n].get(0, {}).get("accuracy", 0)):
        result = screened[name].get(0)
        if result is None:
            continue
        test = compare_results(result, reference) if reference is not result else None
        versus = "–" if test is None else f"{test.describe()}: {verdict(test)}"
        lines.append(f"| {LABEL.get(name, name)} | {pct(result['accuracy'])} | "
                     f"{100 * (result['accuracy'] - base['accuracy']):+.2f} | {versus} | "
                     f"{result['bytes_per_image']:.0f} | {coded(result)} |")
    return lines


def edge_ms(benches: list[dict], result: dict) -> str:
    """The shipped ONNX edge's ms at LLaVA-1.5 scale and its ratio to the fastest dense search, same run: the
    benchmark of the result's site and residual stages (codes per token)."""
    site = f"{result['split_site']}_{result['split_layer']}"
    for bench in benches:
        if bench["args"].get("stages", 1) != result.get("codes_per_token", 1):
            continue
        rows = [r for r in bench["rows"] if r["site"] == site]
        shipped = [r for r in rows if r["method"] in ("onnx int8, shortlist", "onnx, shortlist")]
        dense = [r["ms"] for r in rows if r["method"].startswith("dense search")]
        if shipped and dense:
            fast = min(shipped, key=lambda r: r["ms"])
            return f"{fast['ms']:.1f} ({fast['ms'] / min(dense):.2f}x)"
    return "n/a"


def report_table(base: dict, full: dict, runs: Path, benches: list[dict]) -> list[str]:
    """Full-budget candidates over their seeds, on test: mean ± sd, and each seed's paired verdict on
    "within 0.5 point of the base"."""
    lines = ["| candidate | test accuracy (%) | validation accuracy (%) | vs base (points) | within 0.5 point of "
             "the base (per seed, paired 95%) | ONNX shortlist edge: test accuracy (%) | frame bytes (raw / coded) | "
             "edge ms at LLaVA-1.5 scale (x dense) |", "|---|---:|---:|---:|---|---:|---:|---:|",
             f"| base LLaVA on the PNG image | {pct(base['accuracy'])} | {pct(base['validation']['accuracy'])} | – | – "
             f"| – | {base['bytes_per_image']:.0f} (PNG) | – |"]
    for name, seeds in full.items():
        results = [seeds[s] for s in sorted(seeds)]
        verdicts = [verdict_no_worse(compare_results(r, base), 0.005) for r in results]
        onnx = [variants(runs, name, s).get("onnx_shortlist") for s in sorted(seeds)]
        onnx_cell = format_mean_sd([v["accuracy"] for v in onnx]) if all(onnx) else "n/a"
        gap = mean_sd([r["accuracy"] - base["accuracy"] for r in results])[0]
        sizes = [coded(r) for r in results]
        size = "n/a" if "n/a" in sizes else f"{mean_sd([float(v) for v in sizes])[0]:.1f}"
        lines.append(
            f"| {LABEL.get(name, name)} | {format_mean_sd([r['accuracy'] for r in results])} | "
            f"{format_mean_sd([r['validation']['accuracy'] for r in results])} | {100 * gap:+.2f} | "
            f"{', '.join(verdicts)}: **{combine_verdicts(verdicts)}** | {onnx_cell} | "
            f"{results[0]['bytes_per_image']:.0f} / {size} | {edge_ms(benches, results[0])} |")
    return lines


def plot(base: dict, screened: dict, full: dict, path: Path) -> None:
    """Validation accuracy against coded frame bytes for the screened candidates (the choice), with the
    three-seed candidates' test accuracy beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4.5))
    for name, seeds in sorted(screened.items()):
        result = seeds.get(0)
        if result and "entropy_coded_bytes_per_image" in result:
            ax.scatter([result["entropy_coded_bytes_per_image"]], [100 * result["accuracy"]], s=40,
                       label=f"{LABEL.get(name, name)} (validation, 1 seed)")
    for name, seeds in full.items():
        results = [seeds[s] for s in sorted(seeds) if "entropy_coded_bytes_per_image" in seeds[s]]
        if results:
            ax.errorbar([mean_sd([r["entropy_coded_bytes_per_image"] for r in results])[0]],
                        [100 * mean_sd([r["accuracy"] for r in results])[0]],
                        yerr=[100 * (mean_sd([r["accuracy"] for r in results])[1] or 0)], fmt="k*", markersize=12,
                        label=f"{LABEL.get(name, name)} (test, {len(results)} seeds)")
    ax.axhline(100 * base["accuracy"] - 0.5, color="gray", linestyle=":", linewidth=1,
               label="base on test − 0.5 point")
    ax.set_xlabel("coded wire frame, bytes per image (question not included)")
    ax.set_ylabel("easy-VQA accuracy (%)")
    ax.set_title("Cheap edges: accuracy against bytes")
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=140)
    plt.close(fig)


def bench_table(benches: list[dict]) -> list[str]:
    """Every row of the edge benchmarks given, with its ratio to the fastest dense search of its run and site."""
    lines = ["| stages | site | method | ms/image | vs dense baseline | agreement with an exact fp64 search |",
             "|---:|---|---|---:|---:|---:|"]
    for bench in benches:
        stages, rows = bench["args"].get("stages", 1), bench["rows"]
        for row in rows:
            dense = min(r["ms"] for r in rows if r["site"] == row["site"] and r["method"].startswith("dense search"))
            lines.append(f"| {stages} | {row['site']} | {row['method']} | {row['ms']:.1f} | {row['ms'] / dense:.2f}x | "
                         f"{100 * row['agreement']:.2f}% |")
    return lines


def replace_section(text: str, name: str, body: list[str]) -> str:
    begin, end = f"<!-- split-report:{name} -->", f"<!-- /split-report:{name} -->"
    if begin not in text or end not in text:
        raise SystemExit(f"the document has no {begin} ... {end} section")
    head, rest = text.split(begin, 1)
    return head + begin + "\n" + "\n".join(body) + "\n" + end + rest.split(end, 1)[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--screen", default="runs/split_screen", help="split_study.py --screen folder")
    p.add_argument("--runs", default="runs/split_full", help="split_study.py folder of the full-budget seeds")
    p.add_argument("--edge", nargs="*", default=[], help="benchmarks/edge_encode.py --json files")
    p.add_argument("--doc", default="docs/edge.md")
    args = p.parse_args(argv)
    screen_base, screened = load(Path(args.screen))
    base, full = load(Path(args.runs))
    benches = [json.loads(Path(path).read_text()) for path in args.edge]
    doc = Path(args.doc)
    text = replace_section(doc.read_text(), "screen", screen_table(screen_base, screened))
    text = replace_section(text, "report", report_table(base, full, Path(args.runs), benches))
    if benches:
        text = replace_section(text, "bench", bench_table(benches))
    doc.write_text(text)
    plot(base, screened, full, doc.parent / "figures" / "split_choice.png")
    print(f"wrote the split tables into {doc} and docs/figures/split_choice.png")


if __name__ == "__main__":
    main()
