"""Quantize an AlignedVQ checkpoint after training (RTN, layer-wise clipping search or Q-VLM) and save it.

    python examples/quantize_ptq.py --model src/transformers_alignedvq/assets/tiny-easyvqa --output runs/w6a6 \\
        --method qvlm --weight-bits 6 --act-bits 6
    alignedvq serve --model runs/w6a6          # the server loads it with its quantizers re-applied

The output is a normal full checkpoint (`model.safetensors`, unchanged parameter names) plus `ptq_config.json`
and `ptq.safetensors` with every quantizer's scales (see `transformers_alignedvq.ptq`); `from_pretrained`
re-applies them, strictly. By default the cloud's parts are quantized and the edge is left as it is deployed;
`--parts edge ...` adds the edge's quantizers too (their scales and zero points are for an int8 edge exporter:
the edge folder written beside the model stays in full precision). Calibration: `--calibration-images`
training images of easy-VQA, or of a Hub dataset with image/question/answer columns, one question per image.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModel, AutoProcessor

import transformers_alignedvq  # noqa: F401  (registers the AlignedVQ Auto classes)
from transformers_alignedvq.evaluation import evaluate_vqa
from transformers_alignedvq.ptq import METHODS, PARTS, PTQConfig, model_bits, quantize_model
from transformers_alignedvq.training.data import VQACollator, load_easy_vqa, one_question_per_image


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="AlignedVQ model folder or Hub id")
    p.add_argument("--output", required=True)
    p.add_argument("--method", choices=METHODS, default="qvlm")
    p.add_argument("--weight-bits", type=int, default=8)
    p.add_argument("--act-bits", type=int, default=8, help="0 for weight-only quantization")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=["vision", "projector", "language_model"])
    p.add_argument("--veo-weight", type=float, default=0.0, help="Q-VLM's visual encoder optimization (eta)")
    p.add_argument("--calibration-images", type=int, default=256)
    p.add_argument("--dataset", default="easy-vqa", help="'easy-vqa' (offline) or a Hub dataset id")
    p.add_argument("--split", default="train")
    p.add_argument("--eval", type=int, default=0, help="score this many easy-VQA test questions afterwards")
    p.add_argument("--threads", type=int, default=None)
    return p.parse_args(argv)


def calibration_data(args):
    if args.dataset == "easy-vqa":
        data = load_easy_vqa(args.split)
    else:
        import datasets

        data = datasets.load_dataset(args.dataset, split=args.split)
        if "image_id" not in data.column_names:
            data = data.add_column("image_id", list(range(len(data))))
    return one_question_per_image(data, args.calibration_images)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModel.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    collator = VQACollator(processor, train=True)
    rows = list(calibration_data(args))
    batches = [collator(rows[start : start + 32]) for start in range(0, len(rows), 32)]
    config = PTQConfig(method=args.method, weight_bits=args.weight_bits, act_bits=args.act_bits or None,
                       parts=tuple(args.parts), veo_weight=args.veo_weight)
    report = quantize_model(model, batches, config)
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    summary = {"method": args.method, "bits": config.label, "parts": list(config.parts),
               "search_seconds": report["search_seconds"], "blocks": report["blocks"], **model_bits(model)}
    if args.eval:
        result = evaluate_vqa(model, processor, load_easy_vqa("test").shuffle(seed=0).select(range(args.eval)))
        summary.update(accuracy=result["accuracy"], eval_questions=args.eval)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
