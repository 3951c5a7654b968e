"""Writes the results document of `paper_in_miniature.py` from its `results/*.json` (tables + figures)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers_alignedvq.evaluation.significance import (
    ALPHA,
    combine_verdicts,
    compare_results,
    verdict_no_worse,
)


def _load(runs: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((runs / "results").glob("*.json"))}


def _pct(result: dict | None) -> str:
    return f"{100 * result['accuracy']:.2f}" if result else "—"


def _on_validation(result: dict | None) -> dict | None:
    """A reported run's scores on the validation questions the ablations use (itself for an ablation, and for
    runs written before the validation split existed, when everything was scored on test)."""
    return None if result is None else result.get("validation", result)


def _bytes(result: dict | None) -> str:
    return f"{result['bytes_per_image']:,.0f}" if result else "—"


def _agreement(get, layers, names) -> list[str]:
    """Each claim of the paper next to what our numbers say, with a verdict from a paired test."""
    out = ["## Where we agree with the paper, and where we do not", "",
           "Verdicts come from McNemar's mid-p test on the questions two runs both answered "
           f"(`transformers_alignedvq.evaluation.significance`, alpha = {ALPHA}): **agrees** or **disagrees** when the "
           "difference is significant and goes the claimed way or the other, **inconclusive** when it is not, or "
           "when a run stored no per-question results (runs from before they were recorded; only the difference is "
           "shown then). Claims of a bound (\"within x points\") use the 95% interval of the paired difference.", ""]

    def acc(name):
        r = get(name)
        return None if r is None else 100 * r["accuracy"]

    def compared(name_a, name_b, *, a_better=True):
        """(text, verdict) of "a is more accurate than b" (or less, with ``a_better=False``)."""
        test = compare_results(get(name_a), get(name_b))
        if test is None:
            return f"{acc(name_a) - acc(name_b):+.2f} (unpaired)", "inconclusive"
        return test.describe(), verdict(test, a_better=a_better)

    def within(name_a, name_b, points):
        test = compare_results(get(name_a), get(name_b))
        if test is None:
            return f"{acc(name_a) - acc(name_b):+.2f} points (unpaired)", "inconclusive"
        return test.describe(), verdict_no_worse(test, points / 100)

    def claim(text, ours, decided):
        out.append(f"- {text}: not measured." if ours is None else f"- {text}: {ours} — **{decided}**.")

    base, head = acc("base_raw"), acc("alignedvq_headline")
    if base is not None and head is not None:
        claim("AlignedVQ stays close to the original model (paper: -2.23 to +1.6 points)",
              *within("alignedvq_headline", "base_raw", 2.23))
        goal = {"agrees": "met", "disagrees": "not met", "inconclusive": "inconclusive"}
        for name, label in (("alignedvq_headline", "AlignedVQ at `ln1`"),
                            ("alignedvq_headline_mlp", "the same recipe with VQ at the block output")):
            if get(name):
                text, decided = within(name, "base_raw", 0.5)
                out.append(f"- Our own goal, within 0.5 points of the base: {label} {text} — **{goal[decided]}**.")
    ln_cv = [get("figure4_magnitudes", {}).get(s, {}).get("cv") for s in ("ln1", "ln2", "attn", "mlp")]
    if None not in ln_cv:  # a statistic of one model's features, not a noisy accuracy: decided by the numbers
        claim("Features after a LayerNorm have a lower coefficient of variation of their magnitudes (Figure 4)",
              f"ln1 {ln_cv[0]:.3f}, ln2 {ln_cv[1]:.3f} vs attn {ln_cv[2]:.3f}, mlp {ln_cv[3]:.3f}",
              "agrees" if max(ln_cv[:2]) < min(ln_cv[2:]) else "disagrees")
    if all(get(f"table1_{s}") for s in ("ln1", "ln2", "attn", "mlp")):
        tests = [compared(f"table1_{a}", f"table1_{b}") for a in ("ln1", "ln2") for b in ("attn", "mlp")]
        claim("VQ after a LayerNorm (ln1/ln2) beats VQ on the residual stream (attn/mlp) (Table 1)",
              "; ".join(f"{a} vs {b} {text}" for (a, b), (text, _) in
                        zip([(a, b) for a in ("ln1", "ln2") for b in ("attn", "mlp")], tests)),
              combine_verdicts([v for _, v in tests]))
    for key_a, key_b, text in (
        ("ln1", "vanilla", "Moving VQ from after the block to after LN1 helps at every split (Figure 7)"),
        ("ln1_dlp", "ln1", "Adding DLP helps at every split (Figure 7)"),
        ("alignedvq", "ln1_dlp", "Adding LoRA helps at every split (Figure 7)"),
    ):
        here = [layer for layer in layers if get(f"fig7_L{layer}_{key_a}") and get(f"fig7_L{layer}_{key_b}")]
        if here:
            tests = [compared(f"fig7_L{layer}_{key_a}", f"fig7_L{layer}_{key_b}") for layer in here]
            claim(text, "; ".join(f"block {layer}: {t} ({v})" for layer, (t, v) in zip(here, tests)),
                  combine_verdicts([v for _, v in tests]))
    rest = [f"table4_c{c}_g{g}" for c in (1, 2, 3) for g in (1, 2, 4, 8) if (c, g) != (1, 1) and get(f"table4_c{c}_g{g}")]
    if get("table4_c1_g1") and rest:
        best = max(rest, key=acc)
        claim("More codebooks or groups add little or nothing (Table 4; the best other setting at most 1 point "
              "ahead of one codebook, one group)", f"{best} vs 1x1: " + within("table4_c1_g1", best, 1.0)[0],
              within("table4_c1_g1", best, 1.0)[1])
    out.append("")
    ablation = get("table1_ln1")
    if ablation and acc("table1_ln1") is not None:
        n, p = ablation["eval_questions"], ablation["accuracy"]
        out += [f"Ablations are scored on {n:,} questions: at {100 * p:.1f}% that is a binomial standard error of "
                f"{100 * (p * (1 - p) / n) ** 0.5:.2f} points for one accuracy alone. Two runs on the same questions "
                "answer most of them alike, so the paired test above separates smaller differences than that "
                "suggests; it, not this error, decides the verdicts.", ""]
    out += [
        "### Why the LayerNorm site loses here",
        "",
        "Only indices cross the split. For a LayerNorm site that means the dequantized `ln1(x)` must also stand in "
        "for the residual stream `x` that the rest of the block adds it to, and a per-token LayerNorm has removed "
        "each token's mean and scale, which no linear map (the output DLP) can restore. At block 0 the residual "
        "stream is itself the output of CLIP's pre-LayerNorm, so this predicts the smallest loss there; deeper "
        "blocks add unnormalised updates to the stream, and the VQ-LN1 column of Figure 7 falls with depth while VQ "
        "on the block output (which quantizes the residual stream itself) does not. The paper's Figure 4 statistic "
        "holds here (LayerNorm outputs do have the lower coefficient of variation), but it did not decide accuracy. "
        "The paper does not say what its LN-site split feeds the residual connection. The diagnostic below runs "
        "Figure 7's VQ-LN1 again with the block input kept unquantized for the residual connection, "
        "`h = x + attn(q(ln1(x)))`, as a single-process simulation that quantizes only the LayerNorm output would "
        "compute; it is not a split anyone can deploy, since `x` would have to be sent as well.",
        "",
    ]
    diag = sorted(int(name.split("_")[1][1:]) for name in names if name.startswith("diag_L"))
    if diag:
        out += ["| split block | VQ-LN1, only indices cross | VQ-LN1, block input kept unquantized | VanillaVQ (mlp) |",
                "|---|---|---|---|"]
        closed = []
        for layer in diag:
            names_here = (f"fig7_L{layer}_ln1", f"diag_L{layer}_ln1_residual_kept", f"fig7_L{layer}_vanilla")
            out.append(f"| {layer} | " + " | ".join(_pct(get(name)) for name in names_here) + " |")
            ln, kept, vanilla = (acc(name) for name in names_here)
            if None not in (ln, kept, vanilla) and vanilla > ln:
                closed.append((layer, kept - ln, (kept - ln) / (vanilla - ln)))
        if closed:
            text = ", ".join(f"block {layer}: {gain:+.2f} points, {100 * share:.0f}% of the gap to the block output"
                             for layer, gain, share in closed)
            if all(share >= 0.5 for _, _, share in closed):
                verdict = ("so most of LN1's loss here is the residual stream being replaced, and the LayerNorm "
                           "site's advantage in the paper plausibly rests on its residual stream not being "
                           "quantized (we cannot check the paper's code)")
            else:
                verdict = "so the replaced residual stream does not explain most of LN1's loss here"
            out += ["", f"Keeping the residual unquantized recovers {text}; {verdict}.", ""]
    return out


def _base_curve(base: Path, figures: Path, plt) -> list[str]:
    """The base model's learning curve (from `train_base_easyvqa.py`'s `learning_curve.jsonl`), table + figure."""
    path = base / "learning_curve.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # curves written before the validation split existed scored a test subset at every epoch end
    split = "validation" if any("validation_subset_acc" in r for r in records) else "test"
    for r in records:
        r.setdefault("subset_acc", r.get(f"{split}_subset_acc"))
    vision = [r for r in records if r["type"] == "vision_pretrain"]
    evals = [r for r in records if r["type"] == "eval"]
    final = next((r for r in records if r["type"] == "final"), None)
    if not evals:
        return []
    lines = ["## The base model's learning curve", "",
             f"`examples/train_base_easyvqa.py` ({base}/learning_curve.jsonl): {len(vision)} epochs of supervised "
             "colour/shape pretraining of the vision tower (standing in for CLIP's pretraining), then LLaVA "
             f"training; accuracy after each epoch on a fixed 1,000-question {split} subset, by question type"
             + (" (this run predates the validation split: its epochs were scored, and it was chosen, on test)."
                if split == "test" else "."), "",
             "| epoch | train loss | accuracy (%) | colour | shape | yes/no | minutes |", "|---|---|---|---|---|---|---|"]
    for r in evals:
        t = r["by_type"]
        lines.append(f"| {r['epoch']} | {r['loss']:.4f} | {100 * r['subset_acc']:.1f} | {100 * t['color']:.1f} | "
                     f"{100 * t['shape']:.1f} | {100 * t['yes/no']:.1f} | {r['total_elapsed_s'] / 60:.1f} |")
    if final:
        t = final["by_type"]
        lines += ["", f"Final, all {final['n']:,} test questions: {100 * final['test_acc']:.2f}% (colour "
                  f"{100 * t['color']:.2f}, shape {100 * t['shape']:.2f}, yes/no {100 * t['yes/no']:.2f})."]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([r["epoch"] for r in evals], [100 * r["subset_acc"] for r in evals], marker="o", label="all")
    for key, label in (("color", "colour"), ("shape", "shape"), ("yes/no", "yes/no")):
        ax.plot([r["epoch"] for r in evals], [100 * r["by_type"][key] for r in evals], marker=".", label=label)
    ax.axhline(95, color="gray", linestyle=":", label="95% target")
    ax.set_xlabel("LLaVA training epoch")
    ax.set_ylabel(f"{split}-subset accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figures / "base_learning_curve.png", dpi=120)
    plt.close(fig)
    return lines + ["", "![base learning curve](figures/base_learning_curve.png)", ""]


def write_report(runs: Path, doc: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = _load(runs)
    ablation_split = results.get("table1_ln1", {}).get("eval_split", "test")
    figures = doc.parent / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    get = results.get
    lines = [
        "# AlignedVQ in miniature: easy-VQA",
        "",
        "Generated by `python examples/paper_in_miniature.py "
        f"--base {args.base} --runs {args.runs} --doc {args.doc}`; every number below is read from that run's "
        "`results/*.json`. The base model is the small LLaVA trained from scratch by "
        "`examples/train_base_easyvqa.py`. Accuracy is exact match after VQA-v2 normalisation "
        "(easy-VQA has one reference answer per question).",
        "",
        f"Headline run and baselines: full test split ({get('base_raw', {}).get('eval_questions', '—')} questions), "
        f"{args.headline_epochs} epoch(s) of finetuning, k-means on {args.calibration_images} images "
        f"({args.kmeans_iters} iterations). Ablations: {args.ablation_epochs} epoch(s) of finetuning, k-means on "
        f"{args.ablation_calibration_images} images ({args.ablation_kmeans_iters} iterations), scored on a fixed "
        f"random subset of {args.ablation_eval} {ablation_split} questions (the same subset for every ablation, "
        "and the LLaVA column and lines beside them are the base on the same questions)."
        + (" These results predate the validation split: the ablations, and the choices made from them, were "
           "scored on test." if ablation_split == "test" else ""),
        "",
        "## Table 2/3: accuracy and bytes per image",
        "",
        "| model | accuracy (%) | bytes per image on the wire |",
        "|---|---|---|",
        f"| LLaVA (PNG image) | {_pct(get('base_raw'))} | {_bytes(get('base_raw'))} |",
        f"| LLaVA-JPEG-90 | {_pct(get('base_jpeg90'))} | {_bytes(get('base_jpeg90'))} |",
        f"| LLaVA-JPEG-10 | {_pct(get('base_jpeg10'))} | {_bytes(get('base_jpeg10'))} |",
        f"| LLaVA 1+ (LoRA, {args.headline_epochs} more epoch(s), clean images) | {_pct(get('llava_1plus'))} | {_bytes(get('base_raw'))} |",
        f"| LLaVA-AlignedVQ (block {args.headline_split_layer}, ln1, K=4096) | {_pct(get('alignedvq_headline'))} | "
        f"{_bytes(get('alignedvq_headline'))} |",
        f"| same recipe, VQ at the block output (block {args.headline_split_layer}, mlp, K=4096) | "
        f"{_pct(get('alignedvq_headline_mlp'))} | {_bytes(get('alignedvq_headline_mlp'))} |",
        "",
        "AlignedVQ bytes are whole wire frames (40-byte header and CRC included); image bytes are the file sizes.",
        "",
        "## Table 1: where to quantize (block 0)",
        "",
        "| site | " + " | ".join(["ln1", "attn", "ln2", "mlp"]) + " | LLaVA |",
        "|---|---|---|---|---|---|",
        "| accuracy (%) | " + " | ".join(_pct(get(f"table1_{s}")) for s in ["ln1", "attn", "ln2", "mlp"])
        + f" | {_pct(_on_validation(get('base_raw')))} |",
        "",
    ]

    # Figure 7
    layers = sorted({int(k.split("_")[1][1:]) for k in results if k.startswith("fig7_L")})
    variants = [("vanilla", "VanillaVQ (mlp)"), ("ln1", "VQ-LN1"), ("ln1_dlp", "VQ-LN1-DLP"), ("alignedvq", "AlignedVQ")]
    if layers:
        lines += ["## Figure 7: design features across split layers", "",
                  "| split block | " + " | ".join(v[1] for v in variants) + " |", "|---" * (len(variants) + 1) + "|"]
        for layer in layers:
            lines.append(f"| {layer} | " + " | ".join(_pct(get(f"fig7_L{layer}_{v}")) for v, _ in variants) + " |")
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for key, label in variants:
            xs = [layer for layer in layers if get(f"fig7_L{layer}_{key}")]
            ax.plot(xs, [100 * get(f"fig7_L{layer}_{key}")["accuracy"] for layer in xs], marker="o", label=label)
        if get("base_raw"):
            ax.axhline(100 * _on_validation(get("base_raw"))["accuracy"], color="pink", linestyle="--", label="LLaVA")
        ax.set_xlabel("split block")
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(figures / "figure7_design_features.png", dpi=120)
        plt.close(fig)
        lines += ["", "![Figure 7](figures/figure7_design_features.png)", ""]

    # Table 4
    lines += ["## Table 4: codebooks x groups", "", "| codebooks \\ groups | 1 | 2 | 4 | 8 |", "|---|---|---|---|---|"]
    for books in (1, 2, 3):
        cells = []
        for groups in (1, 2, 4, 8):
            r = get(f"table4_c{books}_g{groups}")
            cells.append(f"{_pct(r)} ({_bytes(r)} B)" if r else "—")
        lines.append(f"| {books} | " + " | ".join(cells) + " |")
    lines.append("")

    # Figure 4
    mags = get("figure4_magnitudes")
    if mags:
        fig, axes = plt.subplots(1, 4, figsize=(12, 2.8))
        for ax, site in zip(axes, ["ln1", "attn", "ln2", "mlp"]):
            edges, hist = mags[site]["bin_edges"], mags[site]["histogram"]
            ax.bar(edges[:-1], hist, width=[b - a for a, b in zip(edges[:-1], edges[1:])], align="edge")
            ax.set_title(f"{site}: CV={mags[site]['cv']:.3f}")
            ax.set_xlabel("feature magnitude")
        fig.tight_layout()
        fig.savefig(figures / "figure4_magnitudes.png", dpi=120)
        plt.close(fig)
        lines += ["## Figure 4: feature magnitudes at the four sites of block 0 (base model)", "",
                  "| site | ln1 | attn | ln2 | mlp |", "|---|---|---|---|---|",
                  "| coefficient of variation | " + " | ".join(f"{mags[s]['cv']:.3f}" for s in ["ln1", "attn", "ln2", "mlp"]) + " |",
                  "", "![Figure 4](figures/figure4_magnitudes.png)", ""]

    # bits
    sizes = [k for k in (16, 64, 256, 1024, 4096) if get(f"bits_K{k}")]
    if sizes:
        lines += ["## Accuracy against bits", "", "| codebook size | bits per token | bytes per image | accuracy (%) |",
                  "|---|---|---|---|"]
        for k in sizes:
            r = get(f"bits_K{k}")
            lines.append(f"| {k} | {k.bit_length() - 1} | {_bytes(r)} | {_pct(r)} |")
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot([get(f"bits_K{k}")["bytes_per_image"] for k in sizes], [100 * get(f"bits_K{k}")["accuracy"] for k in sizes], marker="o", label="AlignedVQ")
        for name, label in (("base_jpeg90", "JPEG-90"), ("base_jpeg10", "JPEG-10"), ("base_raw", "PNG")):
            if get(name):
                ax.scatter([get(name)["bytes_per_image"]], [100 * _on_validation(get(name))["accuracy"]], label=label)
        ax.set_xscale("log")
        ax.set_xlabel("bytes per image")
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(figures / "accuracy_vs_bytes.png", dpi=120)
        plt.close(fig)
        lines += ["", "![accuracy vs bytes](figures/accuracy_vs_bytes.png)", ""]

    lines += _base_curve(Path(args.base), figures, plt)
    lines += _agreement(get, layers, results)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines) + "\n")
    print(f"wrote {doc}")
