"""Where to split: accuracy on easy-VQA for each candidate split site, with the bundled model's recipe.

    python examples/split_study.py --base artifacts/base-easyvqa --runs runs/split_study
    python examples/split_study.py --base artifacts/base-easyvqa --runs runs/split_study --only input_0

Every candidate is finetuned exactly as the bundled model was (`build_bundled_model.py`: K = 4096, DLP, LoRA
r = 16, k-means on 2,000 training images, two epochs, lr 5e-4, batch 32) and scored on the full easy-VQA test
split (9,673 questions) over real wire frames, first with the PyTorch edge and exact search, then with the
deployable ONNX edges: fp32 with the shortlist search, and int8 (calibrated on 256 training images) with the
shortlist search. Runs are resumable: each candidate's model is kept in ``RUNS/NAME`` and its scores in
``RUNS/results/NAME[__variant].json``; what is done is skipped. The edge cost of each site at LLaVA-1.5 scale
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
from transformers_alignedvq.edge_export import export_edge  # noqa: E402
from transformers_alignedvq.edge_runtime import load_edge_runtime  # noqa: E402
from transformers_alignedvq.evaluation import evaluate_vqa  # noqa: E402
from transformers_alignedvq.search import SearchConfig  # noqa: E402
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
}
SHORTLIST = SearchConfig("shortlist", rank=32, candidates=8)
# variant -> export_edge options (the calibration images are added where int8)
EDGE_VARIANTS = {"onnx_shortlist": dict(format="onnx", search=SHORTLIST),
                 "onnx_int8_shortlist": dict(format="onnx", int8=True, search=SHORTLIST)}


def finetune(args, name: str, layer: int, site: str, extra: list[str]) -> Path:
    output = Path(args.runs) / name
    if (output / "config.json").is_file():
        return output
    argv = ["--base", args.base, "--output", str(output), "--epochs", str(args.epochs), "--lr", "5e-4",
            "--batch-size", "32", "--codebook-size", "4096", "--calibration-images", str(args.calibration_images),
            "--split-layer", str(layer), "--split-site", site, "--no-progress", "--logging-steps", "50", *extra]
    if args.limit:
        argv += ["--limit", str(args.limit), "--kmeans-iters", "2"]
    run_finetune(argv)
    return output


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--runs", default="runs/split_study")
    p.add_argument("--only", nargs="*", choices=sorted(CANDIDATES), help="run only these candidates")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--calibration-images", type=int, default=2000)
    p.add_argument("--limit", type=int, default=None, help="smoke runs: first N train/test questions")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = Path(args.runs) / "results"
    results.mkdir(parents=True, exist_ok=True)
    processor = AutoProcessor.from_pretrained(args.base)
    test = load_easy_vqa("test", limit=args.limit)
    calibration = [row["image"] for row in load_easy_vqa("train").select(range(0, 2560, 10))]
    if not (results / "base.json").is_file():  # the base LLaVA on the PNG images, the reference
        base = LlavaForConditionalGeneration.from_pretrained(args.base).eval()
        result = evaluate_vqa(base, processor, test, batch_size=256)
        (results / "base.json").write_text(json.dumps({**result, "name": "base", "eval_questions": len(test)}))
    for name in args.only or CANDIDATES:
        path = results / f"{name}.json"
        layer, site, extra = CANDIDATES[name]
        if not path.is_file():
            started = time.time()
            folder = finetune(args, name, layer, site, extra)
            train_seconds = time.time() - started
            model = LlavaAlignedVQForConditionalGeneration.from_pretrained(folder).eval()
            result = evaluate_vqa(model, processor, test, batch_size=256)
            result.update(name=name, split_layer=layer, split_site=site, train_seconds=train_seconds,
                          eval_questions=len(test), epochs=args.epochs)
            path.write_text(json.dumps(result, indent=1))
            print(f"{name}: accuracy {result['accuracy']:.4f} on {len(test)} questions", flush=True)
        for variant, options in EDGE_VARIANTS.items():
            evaluate_edge(args, name, variant, options, calibration, processor, test)


def evaluate_edge(args, name: str, variant: str, options: dict, calibration, processor, test) -> None:
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
    result = evaluate_vqa(model, processor, test, batch_size=256, edge=edge.encode)
    result.update(name=name, variant=variant, eval_questions=len(test),
                  same_answers=sum(a == b for a, b in zip(result["predictions"], exact["predictions"])) / len(test))
    path.write_text(json.dumps(result, indent=1))
    print(f"{name} {variant}: accuracy {result['accuracy']:.4f}", flush=True)


if __name__ == "__main__":
    main()
