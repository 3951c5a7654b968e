"""Where to split: accuracy on easy-VQA for each candidate split site, with the bundled model's recipe.

    python examples/split_study.py --base artifacts/base-easyvqa --runs runs/split_study
    python examples/split_study.py --base artifacts/base-easyvqa --runs runs/split_study --only input_0

Every candidate is finetuned exactly as the bundled model was (`build_bundled_model.py`: K = 4096, DLP, LoRA
r = 16, k-means on 2,000 training images, two epochs, lr 5e-4, batch 32) and scored on the full easy-VQA test
split (9,673 questions) over real wire frames. Runs are resumable: each candidate's model is kept in
``RUNS/NAME`` and its score in ``RUNS/results/NAME.json``; a finished candidate is skipped. The edge cost of
each site at LLaVA-1.5 scale comes from `benchmarks/edge_encode.py`; `examples/split_report.py` joins both
into docs/split-study.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import finetune_alignedvq  # noqa: E402
from transformers import AutoProcessor  # noqa: E402

from transformers_alignedvq import LlavaAlignedVQForConditionalGeneration  # noqa: E402
from transformers_alignedvq.data import load_easy_vqa  # noqa: E402
from transformers_alignedvq.evaluation import evaluate_vqa  # noqa: E402

# name -> (split_layer, split_site, extra finetune flags)
CANDIDATES = {
    "input_0": (0, "input", []),
    "ln1_0": (0, "ln1", []),
    "mlp_0": (0, "mlp", []),
    "mlp_1": (1, "mlp", []),
    # Not in the paper's recipe: LoRA in the cloud's vision blocks too (the edge and its frames are unchanged).
    "input_0_cloud_lora": (0, "input", ["--lora-cloud-vision"]),
}


def finetune(args, name: str, layer: int, site: str, extra: list[str]) -> Path:
    output = Path(args.runs) / name
    if (output / "config.json").is_file():
        return output
    argv = ["--base", args.base, "--output", str(output), "--epochs", str(args.epochs), "--lr", "5e-4",
            "--batch-size", "32", "--codebook-size", "4096", "--calibration-images", str(args.calibration_images),
            "--split-layer", str(layer), "--split-site", site, "--no-progress", "--logging-steps", "50", *extra]
    if args.limit:
        argv += ["--limit", str(args.limit), "--kmeans-iters", "2"]
    finetune_alignedvq.main(argv)
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
    for name in args.only or CANDIDATES:
        path = results / f"{name}.json"
        if path.is_file():
            continue
        layer, site, extra = CANDIDATES[name]
        started = time.time()
        folder = finetune(args, name, layer, site, extra)
        train_seconds = time.time() - started
        model = LlavaAlignedVQForConditionalGeneration.from_pretrained(folder).eval()
        result = evaluate_vqa(model, processor, test, batch_size=256)
        result.update(name=name, split_layer=layer, split_site=site, train_seconds=train_seconds,
                      eval_questions=len(test), epochs=args.epochs)
        path.write_text(json.dumps(result, indent=1))
        print(f"{name}: accuracy {result['accuracy']:.4f} on {len(test)} questions", flush=True)


if __name__ == "__main__":
    main()
