"""Where to split: accuracy on easy-VQA for each candidate split site, with the bundled model's recipe.

    python examples/split_study.py --base artifacts/base-easyvqa --runs runs/split_study
    python examples/split_study.py --base artifacts/base-easyvqa --runs runs/split_study --only input_0

Every candidate is finetuned exactly as the bundled model was (`build_bundled_model.py`: K = 4096, DLP, LoRA
r = 16, k-means on 2,000 training images, two epochs, lr 5e-4, batch 32) and scored over real wire frames on
the validation split (2,839 questions on 300 held-out training images: the site is chosen on these) and on the
full easy-VQA test split (9,673 questions: what is reported), first with the PyTorch edge and exact search, then
with the
deployable ONNX edges: fp32 with the shortlist search, and int8 (calibrated on 256 training images) with the
shortlist search. Runs are resumable: each candidate's model is kept in ``RUNS/NAME`` and its scores in
``RUNS/results/NAME[__variant].json`` (test scores, the validation scores under ``validation``); what is done
is skipped, and results from before the validation split (trained on its images) are refused. The edge cost of each site at LLaVA-1.5 scale
comes from `benchmarks/edge_encode.py`; `examples/split_report.py` joins both into docs/edge.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: E402

from transformers_alignedvq import LlavaAlignedVQForConditionalGeneration  # noqa: E402
from transformers_alignedvq.edge_runtime import load_edge_runtime  # noqa: E402
from transformers_alignedvq.entropy import load_entropy_model  # noqa: E402
from transformers_alignedvq.evaluation import evaluate_vqa  # noqa: E402
from transformers_alignedvq.export.edge_export import export_edge  # noqa: E402
from transformers_alignedvq.export.search import SearchConfig  # noqa: E402
from transformers_alignedvq.training.data import load_easy_vqa  # noqa: E402
from transformers_alignedvq.training.finetune import main as run_finetune  # noqa: E402

# name -> (split_layer, split_site, extra finetune flags)
CANDIDATES = {
    "input_0": (0, "input", []),
    "ln1_0": (0, "ln1", []),
    "mlp_0": (0, "mlp", []),
    "mlp_1": (1, "mlp", []),
    # Not in the paper's recipe: LoRA in the cloud's vision blocks too (the edge and its frames are unchanged).
    "input_0_cloud_lora": (0, "input", ["--lora-cloud-vision"]),
    # Not in the paper: the patch embeddings before the position embeddings (the cloud adds them), so the
    # codebook spends its entries on content only.
    "patch_0": (0, "patch", []),
    "patch_0_cloud_lora": (0, "patch", ["--lora-cloud-vision"]),
    # More bits per token where the edge is cheap: residual VQ (2-3 codebooks, each coding what the previous
    # left), grouped VQ (the feature split in two, one code each), a 4x larger codebook.
    "patch_0_rvq2": (0, "patch", ["--num-codebooks", "2"]),
    "patch_0_rvq3": (0, "patch", ["--num-codebooks", "3"]),
    "patch_0_g2": (0, "patch", ["--num-groups", "2"]),
    "patch_0_k16k": (0, "patch", ["--codebook-size", "16384"]),
    "patch_0_rvq2_cloud_lora": (0, "patch", ["--num-codebooks", "2", "--lora-cloud-vision"]),
    "input_0_rvq2": (0, "input", ["--num-codebooks", "2"]),
}
SHORTLIST = SearchConfig("shortlist", rank=32, candidates=8)
# variant -> export_edge options (the calibration images are added where int8)
EDGE_VARIANTS = {"onnx_shortlist": dict(format="onnx", search=SHORTLIST),
                 "onnx_int8_shortlist": dict(format="onnx", int8=True, search=SHORTLIST)}


def finetune(args, name: str, layer: int, site: str, extra: list[str]) -> Path:
    output = Path(args.runs) / name
    if (output / "training_log.json").is_file():  # the finetune's last file: a run that stopped early is redone
        return output
    argv = ["--base", args.base, "--output", str(output), "--epochs", str(args.epochs), "--lr", "5e-4",
            "--batch-size", "32", "--codebook-size", "4096", "--calibration-images", str(args.calibration_images),
            "--kmeans-iters", str(args.kmeans_iters), "--seed", str(args.seed),
            "--split-layer", str(layer), "--split-site", site, "--no-progress", "--logging-steps", "50", *extra]
    if args.limit:
        argv += ["--limit", str(args.limit), "--kmeans-iters", "2"]
    run_finetune(argv)
    return output


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--runs", default="runs/split_study")
    p.add_argument("--only", nargs="*", choices=sorted(CANDIDATES), help="run only these candidates")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="finetune seeds (k-means, LoRA init, data order)")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--calibration-images", type=int, default=2000)
    p.add_argument("--kmeans-iters", type=int, default=20)
    p.add_argument("--screen", action="store_true",
                   help="choose candidates: the ablation budget (0.25 epoch, k-means on 256 images, 10 iterations), "
                        "validation only, no exported edges")
    p.add_argument("--limit", type=int, default=None, help="smoke runs: first N train/validation/test questions")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.screen:
        args.epochs, args.calibration_images, args.kmeans_iters = 0.25, 256, 10
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = Path(args.runs) / "results"
    results.mkdir(parents=True, exist_ok=True)
    processor = AutoProcessor.from_pretrained(args.base)
    data = {"validation": load_easy_vqa("validation", limit=args.limit)}
    if not args.screen:
        data["test"] = load_easy_vqa("test", limit=args.limit)
    calibration = [row["image"] for row in load_easy_vqa("train").select(range(0, 2560, 10))]
    refuse_stale(results)
    if not (results / "base.json").is_file():  # the base LLaVA on the PNG images, the reference
        base = LlavaForConditionalGeneration.from_pretrained(args.base).eval()
        (results / "base.json").write_text(json.dumps({**score(base, processor, data), "name": "base"}))
    for candidate in args.only or CANDIDATES:
        for seed in args.seeds:
            args.seed = seed
            name = f"{candidate}__s{seed}"
            run_candidate(args, name, CANDIDATES[candidate], processor, data)
            recode(args, name, processor, data)
            for variant, options in ({} if args.screen else edge_variants(CANDIDATES[candidate])).items():
                evaluate_edge(args, name, variant, options, calibration, processor, data)


def edge_variants(candidate: tuple) -> dict:
    """The exported edges to score: at ``patch`` the convolution is folded into the codebook, so there is no
    front to quantize and the int8 export would be the fp32 graph again."""
    return {k: v for k, v in EDGE_VARIANTS.items() if not (candidate[1] == "patch" and v.get("int8"))}


def run_candidate(args, name: str, candidate: tuple, processor, data: dict) -> None:
    """Finetune and score one candidate with ``args.seed``, unless its result exists."""
    path = Path(args.runs) / "results" / f"{name}.json"
    if path.is_file():
        return
    layer, site, extra = candidate
    started = time.time()
    folder = finetune(args, name, layer, site, extra)
    train_seconds = time.time() - started
    model = LlavaAlignedVQForConditionalGeneration.from_pretrained(folder).eval()
    result = score(model, processor, data, entropy_model=load_entropy_model(folder))
    result.update(name=name, split_layer=layer, split_site=site, train_seconds=train_seconds, epochs=args.epochs,
                  seed=args.seed, codes_per_token=model.config.codes_per_token,
                  codebook_size=model.config.codebook_size)
    path.write_text(json.dumps(result, indent=1))
    test = f", {result['accuracy']:.4f} on test" if "test" in data else ""
    print(f"{name}: accuracy {result['validation']['accuracy']:.4f} on validation{test}", flush=True)


def recode(args, name: str, processor, data: dict) -> None:
    """Coded frame sizes for a result that has none (its finetune fitted no entropy model, e.g. one from before
    the coder took several codes per token): fit one on the training split (validation images excluded), save it
    with the model, and measure the coded frames of every scored question's image, without generating again."""
    from transformers_alignedvq.training.finetune import fit_entropy_model

    path = Path(args.runs) / "results" / f"{name}.json"
    result = json.loads(path.read_text())
    if "entropy_coded_bytes_per_image" in result:
        return
    folder = Path(args.runs) / name
    model = LlavaAlignedVQForConditionalGeneration.from_pretrained(folder).eval()
    entropy = load_entropy_model(folder)
    if entropy is None:
        entropy = fit_entropy_model(model, processor, load_easy_vqa("train", limit=args.limit))
        entropy.save(folder)
    for split, scores in (("validation", result["validation"]), ("test", result)):
        if scores.get("eval_split") == split and split in data:
            scores["entropy_coded_bytes_per_image"] = coded_sizes(model, processor, data[split], entropy)
    if "test" not in data:
        result["entropy_coded_bytes_per_image"] = result["validation"]["entropy_coded_bytes_per_image"]
    path.write_text(json.dumps(result, indent=1))
    print(f"{name}: coded frames {result['entropy_coded_bytes_per_image']:.1f} B", flush=True)


def coded_sizes(model, processor, rows, entropy) -> float:
    """Mean coded frame bytes over ``rows`` (one frame per question's image, as `evaluate_vqa` counts)."""
    from transformers_alignedvq.evaluation.vqa import indices_over_the_wire

    sizes = []
    for start in range(0, len(rows), 256):
        images = [image.convert("RGB") for image in rows[start : start + 256]["image"]]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            sizes += indices_over_the_wire(model, pixels, entropy_model=entropy)[2]
    return sum(sizes) / len(sizes)


def score(model, processor, data: dict, **options) -> dict:
    """Test scores, with the validation scores (what choices are made on) under ``validation``; validation
    scores only when ``data`` has no test split (screening)."""
    validation = evaluate_vqa(model, processor, data["validation"], batch_size=256, **options)
    validation.update(eval_questions=len(data["validation"]), eval_split="validation")
    if "test" not in data:
        return {**validation, "validation": dict(validation)}
    result = evaluate_vqa(model, processor, data["test"], batch_size=256, **options)
    result.update(eval_questions=len(data["test"]), eval_split="test", validation=validation)
    return result


def refuse_stale(results: Path) -> None:
    """Results written before the validation split existed came from models trained on its images: a validation
    score of them would be flattered, so they must not be mixed with new ones."""
    stale = [path.name for path in sorted(results.glob("*.json")) if "validation" not in json.loads(path.read_text())]
    if stale:
        raise SystemExit(f"{results}: {', '.join(stale[:3])}{' ...' if len(stale) > 3 else ''} predate the validation "
                         "split (their models trained on its images); use a new --runs folder")


def evaluate_edge(args, name: str, variant: str, options: dict, calibration, processor, data: dict) -> None:
    """Score ``name`` with its edge exported as ``variant`` (the cloud half unchanged)."""
    path = Path(args.runs) / "results" / f"{name}__{variant}.json"
    if path.is_file():
        return
    folder = Path(args.runs) / name
    edge_dir = export_edge(folder, Path(args.runs) / f"{name}__{variant}", **options,
                           calibration_images=calibration if options.get("int8") else None)
    edge = load_edge_runtime(edge_dir, threads=args.threads)
    model = LlavaAlignedVQForConditionalGeneration.from_pretrained(folder).eval()
    exact = json.loads((Path(args.runs) / "results" / f"{name}.json").read_text())
    result = score(model, processor, data, edge=edge.encode)
    for scores, reference in ((result, exact), (result["validation"], exact["validation"])):
        same = sum(a == b for a, b in zip(scores["predictions"], reference["predictions"]))
        scores["same_answers"] = same / len(scores["predictions"])
    result.update(name=name, variant=variant)
    path.write_text(json.dumps(result, indent=1))
    print(f"{name} {variant}: accuracy {result['accuracy']:.4f}", flush=True)


if __name__ == "__main__":
    main()
