"""Write docs/edge.md from the split study, the edge benchmarks and the network benchmark.

    python examples/split_study.py --base artifacts/base-easyvqa --runs runs/split_study
    python benchmarks/edge_encode.py --json runs/edge_encode.json
    python benchmarks/edge_footprint.py --markdown runs/edge_footprint.md
    sudo python benchmarks/network.py --markdown runs/network.md --plot docs/figures/network.png
    python examples/split_report.py --runs runs/split_study --edge runs/edge_encode.json \\
        --footprint runs/edge_footprint.md --network runs/network.md --doc docs/edge.md

Every number in the document is read from those files; the LLaVA 1+ row is read from docs/results.md, which
`examples/paper_in_miniature.py` wrote from its own run on the same test split.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from transformers_alignedvq.evaluation.significance import compare_results, verdict_no_worse

GOAL = {"agrees": "yes", "disagrees": "no", "inconclusive": "inconclusive"}

SITE_LABEL = {
    "input_0": "input of block 0 (pre-LayerNorm output)",
    "ln1_0": "ln1 of block 0 (the paper's site)",
    "mlp_0": "output of block 0",
    "mlp_1": "output of block 1 (the bundled model)",
    "input_0_cloud_lora": "input of block 0, LoRA also in the cloud's vision blocks",
    "patch_0": "patch embeddings, before positions (the cloud adds them)",
    "patch_0_cloud_lora": "patch embeddings, LoRA also in the cloud's vision blocks",
}
BENCH_SITE = {"input_0_cloud_lora": "input_0", "patch_0_cloud_lora": "patch_0"}  # same edge, same cost


def load_results(runs: Path) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text()) for path in sorted((runs / "results").glob("*.json"))}


def edge_rows(path: Path) -> dict[tuple[str, str], dict]:
    return {(row["site"], row["method"]): row for row in json.loads(path.read_text())["rows"]}


def shipped_edge(bench: dict, site: str) -> dict | None:
    """The fastest deployable edge of ``site``: int8 front + shortlist, or (``patch``, whose patch embedding is
    folded into the codebook, so there is no front to quantize) the shortlist alone."""
    return bench.get((site, "onnx int8, shortlist")) or bench.get((site, "onnx, shortlist"))


def llava_one_plus(results_doc: Path) -> str:
    match = re.search(r"\| LLaVA 1\+[^|]*\| ([\d.]+) \|", results_doc.read_text())
    return match.group(1) if match else "n/a"


def pct(value: float) -> str:
    return f"{100 * value:.2f}"


def validation(result: dict) -> str:
    """Validation accuracy (what the site is chosen on), or why there is none."""
    return pct(result["validation"]["accuracy"]) if "validation" in result else "n/a (chosen on test)"


def within_half_a_point(result: dict, base: dict) -> str:
    """Whether the test accuracy is within 0.5 point of the base's, by the paired test (`significance`)."""
    test = compare_results(result, base)
    return "n/a (unpaired)" if test is None else GOAL[verdict_no_worse(test, 0.005)]


def split_table(results: dict, bench: dict, base: float, one_plus: str) -> list[str]:
    lines = [
        "| split | validation accuracy (%) | test accuracy (%) | vs base (points) | within 0.5 point of base (paired, 95%) | ONNX int8 + shortlist edge: accuracy (%) | edge ms (shipped ONNX edge) | edge ms (PyTorch, exact) |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
        f"| base LLaVA on the PNG image | {validation(results['base'])} | {pct(base)} | – | – | – | – | – |",
        f"| LLaVA 1+ (docs/results.md) | – | {one_plus} | – | – | – | – | – |",
    ]
    for name, label in SITE_LABEL.items():
        if name not in results:
            continue
        site = BENCH_SITE.get(name, name)
        fast, slow = shipped_edge(bench, site), bench.get((site, "torch, exact"))
        int8 = results.get(f"{name}__onnx_int8_shortlist")
        lines.append(
            f"| {label} | {validation(results[name])} | {pct(results[name]['accuracy'])} | {100 * (results[name]['accuracy'] - base):+.2f} | "
            f"{within_half_a_point(results[name], results['base'])} | "
            f"{pct(int8['accuracy']) if int8 else 'n/a'} | {fast['ms']:.1f} | {slow['ms']:.1f} |"
            if fast and slow else
            f"| {label} | {validation(results[name])} | {pct(results[name]['accuracy'])} | {100 * (results[name]['accuracy'] - base):+.2f} | "
            f"{within_half_a_point(results[name], results['base'])} | "
            f"{pct(int8['accuracy']) if int8 else 'n/a'} | n/a | n/a |"
        )
    return lines


def variant_table(results: dict) -> list[str]:
    lines = ["| split | PyTorch edge, exact search (%) | ONNX fp32, shortlist (%) | same answers | ONNX int8, shortlist (%) | same answers |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, label in SITE_LABEL.items():
        if name not in results:
            continue
        cells = [pct(results[name]["accuracy"])]
        for variant in ("onnx_shortlist", "onnx_int8_shortlist"):
            result = results.get(f"{name}__{variant}")
            cells += [pct(result["accuracy"]), pct(result["same_answers"])] if result else ["n/a", "n/a"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def bench_table(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    rows, args = data["rows"], data["args"]
    pinned = (f" pinned to CPU {', '.join(map(str, data['cpus']))} of {data['cpu_count']} (`taskset`, "
              f"OMP_NUM_THREADS={data['omp_num_threads']}; the machine's other jobs share the cores, so the ratios, "
              "measured interleaved, are what to read)" if data.get("cpus") else "")
    lines = [f"CLIP ViT-L/14-336 (random weights), K = 4096, one thread{pinned}, {args['repeats']} interleaved repeats, "
             f"shortlist rank {args['rank']} with {args['candidates']} candidates. The dense baseline is the "
             "fastest dense exact search measured at that site (PyTorch, or ONNX Runtime's MatMul + ArgMin or "
             "Gemm + TopK).", "",
             "| site | edge | ms/image | vs PyTorch exact | vs dense baseline | agreement with an exact fp64 search |",
             "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        base = next(r["ms"] for r in rows if r["site"] == row["site"] and r["method"] == "torch, exact")
        # benchmark files written before the dense baseline was measured have no such rows
        dense = min((r["ms"] for r in rows if r["site"] == row["site"] and r["method"].startswith("dense search")),
                    default=None)
        versus_dense = "n/a" if dense is None else f"{row['ms'] / dense:.2f}x"
        lines.append(f"| {row['site']} | {row['method']} | {row['ms']:.1f} | {row['ms'] / base:.2f}x | "
                     f"{versus_dense} | {100 * row['agreement']:.2f}% |")
    profiled = [row for row in rows if row.get("profile")]
    if profiled:
        lines += ["", "ONNX Runtime's profile of the shipped edges (`--profile`; ms per image by op type, the costliest "
                  "first; a Scan's time is that of its body's MatMul and TopK, which are counted again under their "
                  "own names in profiles written before the benchmark left Scan out):", ""]
        lines += [f"* {row['site']}, {row['method']}: " + ", ".join(f"{op} {ms:.2f}" for op, ms in row["profile"])
                  for row in profiled]
    return lines


def plot(results: dict, bench: dict, base: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    markers = iter("osD^v<>p")
    for name, label in SITE_LABEL.items():
        site = BENCH_SITE.get(name, name)
        if name not in results or shipped_edge(bench, site) is None:
            continue
        x = shipped_edge(bench, site)["ms"]
        ax.scatter([x], [100 * results[name]["accuracy"]], s=45, marker=next(markers), label=label)
    ax.axhline(100 * base, color="gray", linestyle="--", linewidth=1, label="base LLaVA")
    ax.axhline(100 * base - 0.5, color="gray", linestyle=":", linewidth=1, label="base - 0.5 point; 15 ms")
    ax.axvline(15, color="gray", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("edge ms per image at LLaVA-1.5 scale, one core (ONNX, int8 front, shortlist search)")
    ax.set_ylabel("easy-VQA accuracy (%)")
    ax.set_title("Split sites: accuracy against edge cost")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=140)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default="runs/split_study")
    p.add_argument("--edge", default="runs/edge_encode.json")
    p.add_argument("--footprint", default="runs/edge_footprint.md", help="table written by edge_footprint.py --markdown")
    p.add_argument("--network", default="runs/network.md", help="table written by network.py --markdown")
    p.add_argument("--doc", default="docs/edge.md")
    args = p.parse_args(argv)
    results = load_results(Path(args.runs))
    bench = edge_rows(Path(args.edge))
    base = results["base"]["accuracy"]
    doc = Path(args.doc)
    figure = doc.parent / "figures" / "split_pareto.png"
    plot(results, bench, base, figure)
    sections = {
        "split": "\n".join(split_table(results, bench, base, llava_one_plus(doc.parent / "results.md"))),
        "variants": "\n".join(variant_table(results)),
        "bench": "\n".join(bench_table(Path(args.edge))),
        "footprint": Path(args.footprint).read_text().strip() if Path(args.footprint).is_file() else "n/a",
        "network": Path(args.network).read_text().strip() if Path(args.network).is_file() else "n/a",
    }
    template = (Path(__file__).parent / "edge_doc_template.md").read_text()
    doc.write_text(template.format(**sections, figure=figure.relative_to(doc.parent).as_posix()))
    print(f"wrote {doc} and {figure}")


if __name__ == "__main__":
    main()
