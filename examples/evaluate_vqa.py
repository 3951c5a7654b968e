"""Evaluate a LLaVA (split by AlignedVQ, or stock) on easy-VQA: accuracy, bytes per image, compression.

    python examples/evaluate_vqa.py --model runs/alignedvq-easyvqa            # indices over the wire format
    python examples/evaluate_vqa.py --model runs/base-easyvqa --jpeg 90       # stock model on JPEG-90 images
    python examples/evaluate_vqa.py --model artifacts/base-easyvqa --by-template  # where the errors are

For an AlignedVQ model every image crosses the split as a wire frame (header, codebook fingerprint, bit-packed
indices, CRC), decoded and checked exactly as the cloud server does; bytes per image count the whole frame.
For a stock model the bytes are those of the image file (PNG, or JPEG at --jpeg quality).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

import transformers_alignedvq  # noqa: F401  (registers the AlignedVQ Auto classes)
from transformers_alignedvq.evaluation import evaluate_vqa
from transformers_alignedvq.training.data import EASY_VQA_COLORS, load_easy_vqa, question_template


def by_template(data, predictions) -> dict:
    """Accuracy per question template and per kind (colour / shape / yes-no about a colour / about a shape)."""
    templates, kinds = defaultdict(list), defaultdict(list)
    for question, answer, prediction in zip(data["question"], data["answer"], predictions):
        correct = float(prediction.strip().lower() == answer)
        template = question_template(question)
        templates[template].append(correct)
        if answer in ("yes", "no"):
            kind = "yes/no about a colour" if "<colour>" in template else "yes/no about a shape"
        else:
            kind = "colour" if answer in EASY_VQA_COLORS else "shape"
        kinds[kind].append(correct)

    def summary(groups):
        rows = {k: {"accuracy": round(sum(v) / len(v), 4), "questions": len(v)} for k, v in groups.items()}
        return dict(sorted(rows.items(), key=lambda item: item[1]["accuracy"]))

    return {"by_kind": summary(kinds), "by_template": summary(templates)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--split", default="test", choices=["train", "validation", "test"],
                   help="validation (held-out training images) for choices, test for the numbers reported")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--jpeg", type=int, default=None, help="JPEG quality for a stock model's images")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--by-template", action="store_true", help="also report accuracy per question template")
    p.add_argument("--json", default=None, help="write the result (without predictions) to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModelForImageTextToText.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    data = load_easy_vqa(args.split, limit=args.limit)
    result = evaluate_vqa(model, processor, data, jpeg_quality=args.jpeg, batch_size=args.batch_size)
    predictions = result.pop("predictions")
    if args.by_template:
        result.update(by_template(data, predictions))
    if hasattr(model, "encode_edge"):
        config = model.config
        result["fp16_feature_bytes"] = config.num_image_tokens * config.vision_config.hidden_size * 2
        result["compression_vs_fp16_features"] = result["fp16_feature_bytes"] / result["bytes_per_image"]
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
