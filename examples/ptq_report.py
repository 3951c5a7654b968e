"""Writes docs/ptq.md from the `results/*.json` of `ptq_in_miniature.py` (and `benchmarks/ptq_kernels.py`)."""

from __future__ import annotations

import json
from pathlib import Path

from paper_report import Results, per_seed, seed_verdict

from transformers_alignedvq.evaluation.significance import ALPHA, compare_results, verdict, verdict_no_worse

MODELS = {"base": "base LLaVA (`artifacts/base-easyvqa`)", "alignedvq": "AlignedVQ (bundled model)"}
METHODS = {"rtn": "RTN min-max", "layerwise": "layer-wise clipping search", "qvlm": "Q-VLM"}
BITS = ("w8a8", "w6a6", "w4a4", "w4a16")

METHOD_NOTES = [
    "## What is quantized, and how",
    "",
    "* **Layers**: every `nn.Linear` of the selected parts (`transformers_alignedvq.ptq.PTQConfig.parts`): "
    "`edge` (the vision blocks the device runs; AlignedVQ only), `vision` (the other vision blocks up to the "
    "feature layer LLaVA reads), `projector`, `language_model`. The headline rows quantize all of them (for an "
    "AlignedVQ model the edge too, as an int8/int4 edge would; the bundled model splits at the patch embeddings, "
    "so its edge runs no vision block and has no layer to quantize). Full precision stays: the patch embedding, "
    "embeddings, LayerNorm/RMSNorm, the attention products, the AlignedVQ layer (DLP and codebook; the edge's "
    "codeword search runs against the folded codebook) and `lm_head` (tied to the token embeddings).",
    "* **Quantizers** (`transformers_alignedvq.ptq`): weights symmetric per output channel; input activations "
    "asymmetric per tensor, static (calibrated once), the form integer GEMM kernels and ONNX "
    "`QuantizeLinear`/`DequantizeLinear` take. W4A16 quantizes weights only. Fake quantization throughout.",
    "* **Calibration**: 256 random training images, one random question each, drawn anew for each seed, as full "
    "conversations (prompt and answer). "
    "Layers are calibrated in execution order, each on inputs that went through the quantized layers before it "
    "(for the AlignedVQ model: through the codewords a quantized edge picks).",
    "* **RTN min-max**: the observed input range and each channel's largest weight.",
    "* **Layer-wise clipping search**: each layer alone minimises its own output error: the input range clipped "
    "to 1.0 ... 0.4 of the observed one, then each output channel's weight clipping (separable given the input), "
    "twice, on 4,096 input rows.",
    "* **Q-VLM**: the layer-wise result, then blocks of consecutive transformer layers (vision blocks, projector, "
    "language-model layers; never across the split) searched jointly: coordinate descent over multipliers "
    "(0.8, 0.9, 1.1, 1.25) of every layer's input range and weight scales, each kept only if it lowers the "
    "block's output error on 64 calibration samples. Layer l joins layer l+1 when the activation entropy of its "
    "output is at least 0.9 (normalised, see below), up to 3 layers per block (`PTQConfig`'s defaults). The "
    "visual encoder optimization (`veo_weight`, the paper's eta = 0.1) is measured as an ablation on validation; "
    "the headline rows run without it, since it was not shown to improve validation accuracy (*Where we agree with Q-VLM*).",
    "* **Activation entropy**: per channel, the entropy of the activation magnitudes across a sample's tokens "
    "(`p_t = |h_tc| / sum_t |h_tc|`), divided by log T and averaged over channels: 1 when every token carries a "
    "channel equally, 0 when one token carries it all.",
    "* **Visual encoder optimization, and the split**: AdamW (lr 1e-5, 32 calibration batches) on the vision blocks "
    "the cloud runs, minimising the language-model loss plus eta times the entropy of the vision output (the "
    "projector's input). For the AlignedVQ model only the blocks after the split move: the edge, the codebook and "
    "its fingerprint stay bit-identical, so deployed edges and their frames stay valid. A checkpoint saved after "
    "it carries the changed cloud blocks in `model.safetensors`.",
    "* **Memory** counts the model's parameters: quantized weights at their bit-width plus one fp32 scale per "
    "output channel, everything else at its stored dtype (fp32). Buffers (the AlignedVQ codebook, 2.1 MB) are "
    "left out of both columns.",
    "",
    "## Files of a quantized checkpoint",
    "",
    "`python examples/quantize_ptq.py --model DIR --output OUT --method qvlm --weight-bits 6 --act-bits 6` writes a "
    "normal full checkpoint (`model.safetensors` with every parameter under its usual name, in full precision) "
    "plus `ptq_config.json` (method, bit-widths, every quantized layer with its part and shape, and the SHA-256 of "
    "the weights files the scales belong to) and `ptq.safetensors` (`<layer>.weight_scale` F32 `(out_features,)`, "
    "`<layer>.input_scale` F32 `()`, `<layer>.input_zero_point` I32 `()`). `AutoModel.from_pretrained(OUT)` and "
    "`alignedvq serve --model OUT` re-apply them after loading; a layer that is not an `nn.Linear` of the "
    "recorded shape, a missing, unexpected, mis-typed or mis-shaped tensor, an invalid scale or zero point, or "
    "other weights than the recorded ones raise `CheckpointMismatchError`. The script quantizes the cloud's parts "
    "by default; with `--parts edge ...` the edge's quantizers are stored as well. The edge folder beside the "
    "model stays in full precision; `transformers_alignedvq.ptq.edge_quantizers(model)` returns the edge's "
    "calibrated quantizers under the edge encoder's module names (`encoder.layers.0.self_attn.q_proj`, ...) for an "
    "int8 exporter: `x_q = clamp(round(x / input_scale) + input_zero_point, 0, 2^b - 1)` (uint8 at 8 bits) and "
    "`w_q = clamp(round(w / weight_scale[c]), -2^(b-1), 2^(b-1) - 1)` per output channel `c` (int8 at 8 bits), "
    "both rounding half to even as ONNX does.",
    "",
]

STATIC_NOTES = [
    "Differences of method, beyond the scale (4 vision blocks, a projector and 2 language-model layers here, so "
    "blocks hold at most 3 layers; 32 language-model layers in LLaVA-7B):",
    "",
    "- The paper's baselines are AWQ and QLoRA-style quantization; ours are RTN min-max and a layer-wise clipping "
    "search with the same quantizers, so the comparison isolates the search.",
    "- The paper searches \"rounding functions\"; we search clipping ranges (input range and per-channel weight "
    "scale), as its published code does (it shrinks activation ranges by factors 1.0 ... 0.4).",
    "- The published code quantizes language-model activations with per-channel ranges and vision activations per "
    "token, which integer GEMM kernels cannot take; ours are per tensor. Its block rule is a threshold (37) on an "
    "unnormalised entropy of L2-normalised activations with at most 3 layers per block; ours is the normalised "
    "entropy above with threshold 0.9 and the same depth.",
    "- We could not find the visual encoder being trained in the published code (its vision quantizer adds a "
    "constant entropy term to a range search); ours follows the paper's text and trains the cloud-side vision "
    "blocks with the entropy term.",
    "",
]


def _load(runs: Path, seeds: int = 1) -> Results:
    """The runs by experiment name and calibration seed (`<name>_s<seed>.json`; full precision has none)."""
    return Results({p.stem: json.loads(p.read_text()) for p in sorted((runs / "results").glob("*.json"))},
                   expected_seeds=seeds)


def _pct(results: Results, name: str) -> str:
    return results.cell(name) if results.get(name, {}).get("accuracy") is not None else "—"


def _mb(value: float) -> str:
    return f"{value / 1e6:.2f}"


def _widths(results: Results) -> tuple[str, ...]:
    """The bit-widths with at least one quantized run (a width nobody ran gets no column)."""
    ran = tuple(bits for bits in BITS if any(results.get(f"{model}_{method}_{bits}") for model in MODELS
                                             for method in METHODS))
    return ran or ("w6a6", "w4a4")


def _accuracy_table(results: Results) -> list[str]:
    widths = _widths(results)
    out = ["| model | method | " + " | ".join(b.upper() for b in widths) + " |",
           "|---|---|" + "---:|" * len(widths)]
    for model, label in MODELS.items():
        out.append(f"| {label} | full precision | " + " | ".join([_pct(results, f"{model}_fp")] * len(widths)) + " |")
        for method, method_label in METHODS.items():
            cells = [_pct(results, f"{model}_{method}_{bits}") for bits in widths]
            out.append(f"| {label} | {method_label} | " + " | ".join(cells) + " |")
    return out


def _noise(results: Results) -> list[str]:
    """How a cell and a comparison carry their noise."""
    seeds = sorted({seed for runs in results.by_name.values() for seed in runs if seed is not None})
    if not seeds:
        return []
    return [f"A quantized cell is the mean ± sample sd over calibration draws {', '.join(map(str, seeds))} (which "
            "training images, which question of each); full precision involves no draw. Comparisons below are "
            "paired tests per draw on the same questions (*Where we agree with Q-VLM* below).", ""]


def _cost_table(results: dict) -> list[str]:
    out = ["| model | bits | method | search (s, first draw) | of which VEO (s) | model memory (MB) | vs FP32 |",
           "|---|---|---|---:|---:|---:|---:|"]
    for model, label in MODELS.items():
        fp = results.get(f"{model}_fp")
        if fp:
            out.append(f"| {label} | FP32 | — | — | — | {_mb(fp['fp_bytes'])} | 1.00x |")
        for bits in BITS:
            for method, method_label in METHODS.items():
                result = results.get(f"{model}_{method}_{bits}")  # the first draw's search
                if not result:
                    continue
                report, memory = result["report"], result["memory"]
                veo = report.get("veo_seconds", 0.0)
                out.append(f"| {label} | {bits.upper()} | {method_label} | {report['search_seconds'] + veo:.0f} | "
                           f"{veo:.0f} | {_mb(memory['bytes'])} | {memory['fp_bytes'] / memory['bytes']:.2f}x |")
    return out


def _ablation_table(results: dict, prefix: str) -> list[str]:
    out = ["| model | experiment | accuracy (%) | search (s) | blocks |", "|---|---|---:|---:|---|"]
    for name in sorted(results.by_name):
        if not name.startswith(prefix):
            continue
        report = results.get(name).get("report", {})
        seconds = report.get("search_seconds", 0.0) + report.get("veo_seconds", 0.0)
        blocks = " ".join("[" + ", ".join(b) + "]" for b in report.get("blocks", []))
        model = name.split("_")[1]
        out.append(f"| {model} | `{name}` | {_pct(results, name)} | {seconds:.0f} | {blocks} |")
    return out


def _draws(results: Results, name: str) -> list[dict]:
    return list(results.seeds(name).values())


def _dependency_table(results: Results) -> tuple[list[str], list[tuple[str, float, float]]]:
    """One row per layer pair: entropy and DED averaged over samples and draws, R² per draw."""
    from transformers_alignedvq.ptq import r_squared

    out = ["| model | layer l (next) | mean entropy of l | mean DED (relative MSE) | R² over samples, per draw |",
           "|---|---|---:|---:|---:|"]
    means = []
    for model, label in MODELS.items():
        draws = [run.get("pairs", []) for run in _draws(results, f"{model}_dependency")]
        for pairs in zip(*draws):
            entropy = sum(sum(p["entropy"]) / len(p["entropy"]) for p in pairs) / len(pairs)
            ded = sum(sum(p["ded"]) / len(p["ded"]) for p in pairs) / len(pairs)
            means.append((f"{model}:{pairs[0]['layer']}", entropy, ded))
            r2 = " / ".join(f"{p['r2']:.3f}" for p in pairs)
            out.append(f"| {label} | {pairs[0]['layer']} ({pairs[0]['next']}) | {entropy:.4f} | {ded:.2e} | {r2} |")
    if len(means) > 2:
        r2 = r_squared([m[1] for m in means], [m[2] for m in means])
        out.append(f"| all | per-layer means ({len(means)} layers) | | | {r2:.3f} |")
    return out, means


def _kernels(results: dict) -> list[str]:
    kernels = results.get("kernels")
    if not kernels:
        return ["Not measured in this run: `pip install torchao==0.18.0`, then `python benchmarks/ptq_kernels.py "
                "--threads 1 --json docs/data/ptq/results/kernels.json` and this command again."]
    out = [f"`python benchmarks/ptq_kernels.py --threads {kernels['threads']} --json "
           "docs/data/ptq/results/kernels.json` (one CPU thread of a shared two-core machine: absolute times are noisy, the ratios are measured side by "
           "side in one run). One language-model layer's seven linear layers at LLaVA-1.5-7B size:", "",
           "| tokens | variant | ms | vs fp32 eager |", "|---:|---|---:|---:|"]
    out += [_kernel_row(r) for r in kernels["speed"]]
    wrong = [f"{r['variant']} at {r['tokens']} token(s)" for r in kernels["speed"] if r.get("ms") is None]
    if wrong:
        out += ["", f"Wrong output, so no time: {', '.join(wrong)} (its output differs from eager execution of the "
                "same weights; the benchmark checks every variant before timing it)."]
    out += ["", "The bundled AlignedVQ model with its language model in int8 (fixed random subset of the test split; "
            "torchao's int8 is computed at run time, with no calibration draw, so one run):", "",
            "| model | accuracy (%) | questions |", "|---|---:|---:|"]
    out += [f"| {r['model']} | {100 * r['accuracy']:.2f} | {r['questions']:,} |" for r in kernels["accuracy"]]
    return out + ["", _int8_within(kernels["accuracy"])]


def _int8_within(rows: list[dict]) -> str:
    """The paired test of the int8 language model against fp32 on the same questions."""
    test = compare_results(*rows[::-1]) if len(rows) == 2 else None
    if test is None:
        return "Int8 within 0.5 point of fp32: not testable (the run stored no per-question results)."
    return f"Int8 within 0.5 point of fp32: {test.describe()}: **{verdict_no_worse(test, 0.005)}** (paired 95% interval)."


def _kernel_row(row: dict) -> str:
    if row.get("ms") is None:
        return f"| {row['tokens']} | {row['variant']} | wrong output (relative error {row['relative_error']:.1e}) | — |"
    return f"| {row['tokens']} | {row['variant']} | {row['ms']:.1f} | {row['vs_fp32_eager']:.2f}x |"


def _speed_claim(kernels: dict) -> str:
    """The paper's speed claim next to the fastest correct int8 variant per token count."""
    def best(tokens):
        rows = [r for r in kernels["speed"] if r["tokens"] == tokens and r["variant"].startswith("int8")
                and r.get("ms") is not None]
        row = max(rows, key=lambda r: r["vs_fp32_eager"], default=None)
        return "no int8 variant computed the right output" if row is None else \
            f"{row['vs_fp32_eager']:.2f}x faster ({row['variant']})"

    return ("- Speed and memory (paper: 1.44x faster generation and 2.78x less memory for LLaVA-13B): real int8 "
            f"kernels run one 7B-size language-model layer on a 600-token prefill {best(600)}, and on one decode "
            f"token {best(1)}; a single run, a speed measurement with no verdict.")


def _ablation_split(results: dict) -> str:
    """The split the ablations were scored on: validation, or test for runs from before it existed."""
    return results.get("ablation_base_fp", {}).get("eval_split", "validation")


def _better(results: Results, name_a: str, name_b: str) -> tuple[str | None, str]:
    """(text, verdict) for "a is more accurate than b": McNemar's paired test per calibration draw
    (`significance`), one verdict when every draw gives the same, else inconclusive; a draw that stored no
    per-question results counts as inconclusive."""
    a, b = _acc(results, name_a), _acc(results, name_b)
    if a is None or b is None:
        return None, "inconclusive"
    tests = results.paired(name_a, name_b, split=None)
    verdicts = ["inconclusive" if t is None else verdict(t) for _, t in tests]
    return f"{a:.2f} vs {b:.2f}; per draw {per_seed(tests)}", seed_verdict(verdicts)


def _within(results: Results, name_a: str, name_b: str, points: float) -> str:
    """The verdict of "a is at most ``points`` less accurate than b", per draw as in `_better`."""
    tests = results.paired(name_a, name_b, split=None)
    return seed_verdict(["inconclusive" if t is None else verdict_no_worse(t, points / 100) for _, t in tests])


_MET = {"agrees": "met", "disagrees": "not met", "inconclusive": "inconclusive"}


def _acc(results: Results, name: str) -> float | None:
    return results.mean(name) if results.get(name, {}).get("accuracy") is not None else None


def _seconds(results: Results, name: str) -> float | None:
    reports = [r["report"] for r in results.seeds(name).values() if r.get("report")]
    if not reports:
        return None
    return sum(r["search_seconds"] + r.get("veo_seconds", 0.0) for r in reports) / len(reports)


def _claims(results: dict) -> list[str]:
    """The paper's claims next to what our numbers say, decided by the numbers (absent ones say so)."""
    out = []

    def claim(text, ours, decided):
        if ours is None:
            out.append(f"- {text}: not measured yet.")
        else:
            decided = decided if isinstance(decided, str) else "agrees" if decided else "disagrees"
            out.append(f"- {text}: {ours} — **{decided}**.")

    def better(name_a, name_b):
        return _better(results, name_a, name_b)

    for model, label in MODELS.items():
        for bits in ("w6a6", "w4a4"):
            claim(f"Q-VLM beats the layer-wise search ({label}, {bits.upper()})",
                  *better(f"{model}_qvlm_{bits}", f"{model}_layerwise_{bits}"))
        names = {key: f"ablation_{model}_qvlm_w4a4_{key}" for key in ("plain", "depth1", "alljoint", "veo")}
        claim(f"The visual encoder optimization improves W4A4 accuracy ({label}, {_ablation_split(results)} subset; "
              "with it vs without)",
              *better(names["veo"], names["plain"]))
        claim(f"Entropy-guided blocks cost less search than one joint block per stack ({label}, W4A4)",
              *_search_claim(results, f"{model}_qvlm_w4a4", names["alljoint"], names["depth1"]))
    kernels = results.get("kernels")
    if kernels:
        out.append(_speed_claim(kernels))
    memory = results.get("base_qvlm_w4a4", {}).get("memory")
    if memory:
        ratio = memory["fp_bytes"] / memory["bytes"]
        out.append(f"- Memory at W4A4 (base LLaVA): {ratio:.2f}x smaller than fp32, about {ratio / 2:.2f}x smaller "
                   "than fp16 (the paper's 2.78x is against fp16 for a model whose embeddings and head stay 16-bit).")
    claim("Activation entropy predicts the layer-wise vs joint error difference (paper: R² = 0.97)",
          *_dependency_claim(results))
    return out


SEARCH_NOISE = 0.2  # wall-clock seconds of the same work vary by tens of percent on this shared machine


def _search_claim(results: Results, blocks: str, joint: str, depth1: str) -> tuple[str | None, str]:
    """Whether ``blocks`` searched faster than ``joint``, draw by draw: a draw decides only when the two differ
    by more than ``SEARCH_NOISE``; the claim's verdict is the draws' common one."""
    a, b = _draws(results, blocks), _draws(results, joint)
    pairs = [(x["report"], y["report"]) for x, y in zip(a, b) if x.get("report") and y.get("report")]
    if not pairs:
        return None, "inconclusive"

    def seconds(report):
        return report["search_seconds"] + report.get("veo_seconds", 0.0)

    verdicts = ["agrees" if seconds(y) > (1 + SEARCH_NOISE) * seconds(x) else
                "disagrees" if seconds(x) > (1 + SEARCH_NOISE) * seconds(y) else "inconclusive" for x, y in pairs]
    text = ", ".join(f"{seconds(x):.0f} s vs {seconds(y):.0f} s" for x, y in pairs)
    one = _seconds(results, depth1)
    return f"per draw {text}" + (f" (depth-1 blocks: {one:.0f} s, mean)" if one is not None else ""), \
        seed_verdict(verdicts)


def _dependency_claim(results: Results) -> tuple[str | None, str]:
    """Per draw, the best layer's R²; agrees when every draw has one of at least 0.5, disagrees when none does."""
    draws = [run.get("pairs", []) for m in MODELS for run in _draws(results, f"{m}_dependency")]
    best = [max(p["r2"] for p in pairs) for pairs in draws if pairs]
    if not best:
        return None, "inconclusive"
    everything = [p["r2"] for pairs in draws for p in pairs]
    decided = "agrees" if min(best) >= 0.5 else "disagrees" if max(best) < 0.5 else "inconclusive"
    return f"R² per layer and draw between {min(everything):.3f} and {max(everything):.3f}", decided


def _parts(results: Results, model: str) -> tuple[str, ...]:
    """The parts that hold quantized layers: an edge that runs no vision block (the patch site) has none."""
    blocks = (results.get(f"{model}_qvlm_w4a4") or {}).get("report", {}).get("blocks", [])
    edge = any(name.endswith(".edge") for block in blocks for name in block)
    return ("edge",) * edge + ("vision", "projector", "language_model")


def _where_w4a4_loses(results: Results, model: str) -> list[str]:
    """Q-VLM at W4A4 on one part at a time, against full precision and all parts, on the same questions."""
    fp, everything = _acc(results, f"ablation_{model}_fp"), _acc(results, f"ablation_{model}_qvlm_w4a4_plain")
    single = {part: _acc(results, f"ablation_{model}_qvlm_w4a4_{part}") for part in _parts(results, model)}
    if fp is None or everything is None or None in single.values():
        return ["  Where the points go (one part at a time at W4A4): not measured yet."]
    questions = results.get(f"ablation_{model}_fp")["eval_questions"]
    losses = ", ".join(f"{part} {value - fp:+.2f}" for part, value in single.items())
    return [f"  Why not, on {questions:,} {_ablation_split(results)} questions (full precision {fp:.2f}, every part "
            f"at W4A4 {everything:.2f}, means over draws): Q-VLM at W4A4 on one part at a time loses {losses} points."]


def _goals(results: dict) -> list[str]:
    """The goals of this work next to the numbers."""
    out = []

    def acc(name):
        return _acc(results, name)

    for model, label in MODELS.items():
        fp = acc(f"{model}_fp")
        w6, w4 = acc(f"{model}_qvlm_w6a6"), acc(f"{model}_qvlm_w4a4")
        baselines = [acc(f"{model}_{m}_w4a4") for m in ("rtn", "layerwise")]
        if fp is None or w6 is None:
            out.append(f"- {label}, W6A6 Q-VLM within 0.5 point of full precision: not measured yet.")
        else:
            met = _MET[_within(results, f"{model}_qvlm_w6a6", f"{model}_fp", 0.5)]
            tests = per_seed(results.paired(f"{model}_qvlm_w6a6", f"{model}_fp", split=None))
            out.append(f"- {label}, W6A6 Q-VLM within 0.5 point of full precision: {w6 - fp:+.2f} points "
                       f"(**{met}**; paired 95% interval per draw; per draw {tests}).")
        if fp is None or w4 is None or None in baselines:
            out.append(f"- {label}, W4A4 Q-VLM ahead of both baselines and within 2 points: not measured yet.")
        else:
            best = max(("rtn", "layerwise"), key=lambda m: acc(f"{model}_{m}_w4a4"))
            text, decided = _better(results, f"{model}_qvlm_w4a4", f"{model}_{best}_w4a4")
            ahead = {"agrees": "ahead of", "disagrees": "behind", "inconclusive": "inconclusive against"}[decided]
            within = {"met": "within 2", "not met": "not within 2", "inconclusive": "inconclusive whether within 2"}[
                _MET[_within(results, f"{model}_qvlm_w4a4", f"{model}_fp", 2.0)]]
            tests = per_seed(results.paired(f"{model}_qvlm_w4a4", f"{model}_fp", split=None))
            out.append(f"- {label}, W4A4: Q-VLM {w4:.2f} vs RTN {baselines[0]:.2f} and layer-wise {baselines[1]:.2f} "
                       f"(**{ahead}** the better baseline: {text}), "
                       f"{w4 - fp:+.2f} points from full precision (**{within}**, paired 95% interval per draw; "
                       f"per draw {tests}).")
            if w4 - fp < -2:
                out += _where_w4a4_loses(results, model)
    return out


def _command(args) -> str:
    parts = ["python examples/ptq_in_miniature.py --base artifacts/base-easyvqa",
             f"--runs {getattr(args, 'runs', 'docs/data/ptq')} --doc {getattr(args, 'doc', 'docs/ptq.md')}"]
    if getattr(args, "seeds", [0]) != [0]:
        parts.append("--seeds " + " ".join(map(str, args.seeds)))
    command = " ".join(parts)
    if getattr(args, "only", None):  # a long list: named by what it covers, not spelled out
        return f"`{command} --only ...` (`--only` naming the {len(args.only)} experiments in the tables below)"
    return f"`{command}`"


def write(runs: Path, doc: Path, args=None) -> None:
    results = _load(runs, len(getattr(args, "seeds", None) or [0]))
    base_fp = results.get("base_fp", {})
    full = base_fp.get("eval_questions", 9673)
    lines = [
        "# Post-training quantization (Q-VLM) in miniature: easy-VQA",
        "",
        f"Generated by {_command(args)} (one CPU thread); every number is read from that run's `results/*.json`. "
        "Accuracy is exact "
        f"match on the easy-VQA test split ({full:,} questions) unless a table says otherwise; the AlignedVQ "
        "model's images cross the split as wire frames, as in `docs/results.md`. Calibration: "
        f"{getattr(args, 'calibration_images', 256)} random training images, one question each, drawn anew for each "
        "seed. A dash marks a run the "
        "command has not finished yet (running it again resumes).",
        "",
        *METHOD_NOTES,
        "## Accuracy (%) per method and bit-width",
        "",
        *_accuracy_table(results),
        "",
        *_noise(results),
        "## Search cost and model memory",
        "",
        "Search seconds are wall-clock time of `quantize_model` (calibration passes, searches and, where used, the "
        "visual encoder optimization) on one CPU thread of a shared two-core machine while other jobs ran: the "
        "same work varies by tens of percent between runs, so only large differences mean something.",
        "",
        *_cost_table(results),
        "",
        f"## Ablations (W4A4 and per part, on a fixed subset of {_ablation_split(results)} questions)",
        "",
        *(["These ablations predate the validation split: they, and the choice of leaving the visual encoder "
           "optimization out of the headline rows, were scored on test.", ""]
          if _ablation_split(results) == "test" else []),
        *_ablation_table(results, "ablation_"),
        "",
        "## Activation entropy against the layer-wise vs joint search error difference",
        "",
        "For every pair of consecutive transformer layers (l, l+1) inside one segment, starting from the layer-wise "
        "result, two searches are compared at the output of l+1: each layer refined on its own output, against "
        "the pair refined jointly. DED is the first error minus the second (relative MSE), per calibration sample "
        "(the first `joint_samples` = 64); R² is that of the least-squares line of DED on the entropy of layer "
        "l's output over those samples (the paper's Figure 3 has R² = 0.97 for layer 15 of LLaVA-7B), and, in the "
        "last row, over the layers' means.",
        "",
        *_dependency_table(results)[0],
        "",
        "## Real integer kernels",
        "",
        "Everything above is fake quantization (float math on quantized values): it measures accuracy, not speed. "
        "Where real integer kernels run, `benchmarks/ptq_kernels.py` measures them: the language model through "
        "Transformers' `quantization_config` with torchao 0.18 (`TorchAoConfig` with "
        "`Int8DynamicActivationInt8WeightConfig`: int8 weights per channel, int8 activations per token computed at "
        "run time, RTN; not our calibrated scales), measured at LLaVA-1.5-7B size and for accuracy on the bundled "
        "model. torchao's int4 weight-only configurations have no fast path on this CPU build "
        "(`Int4WeightOnlyConfig` needs the `mslk` kernels, `IntxWeightOnlyConfig` dequantizes in Python), so "
        "W4A16 and W4A4 are fake-quantized only. The int8 edge runs in onnxruntime (the edge's ONNX export); its "
        "calibrated scales can come from `ptq.edge_quantizers` (see *Files of a quantized checkpoint*).",
        "",
        *_kernels(results),
        "",
        "## Goals",
        "",
        *_goals(results),
        "",
        "## Where we agree with Q-VLM, and where we do not",
        "",
        f"Verdicts: McNemar's mid-p test on the questions both runs answered, alpha = {ALPHA} "
        "(`transformers_alignedvq.evaluation.significance`): **agrees** / **disagrees** when the difference is significant and "
        "goes the claimed way / the other way, **inconclusive** when it is not, or when a run stored no "
        "per-question results (runs from before they were recorded).",
        "",
        *_claims(results),
        "",
        *STATIC_NOTES,
    ]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(lines) + "\n")
