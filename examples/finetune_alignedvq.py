"""AlignedVQ finetuning of a LLaVA with the Hugging Face `Trainer` (the paper's Section 3.2.3 recipe).

`from_llava` on the base, k-means codebook initialisation on calibration images, then one joint finetune of the
codebook (EMA), the Dual Linear Projections and LoRA adapters in the language model, with the commitment loss.

Here (CPU, the small easy-VQA LLaVA this repository trains):

    python examples/finetune_alignedvq.py --base runs/base-easyvqa --output runs/alignedvq-easyvqa

On LLaVA-1.5-7B with a GPU and a Hub dataset with image/question/answer columns:

    python examples/finetune_alignedvq.py --base llava-hf/llava-1.5-7b-hf --dataset ORG/DATASET \\
        --bf16 --gradient-checkpointing --batch-size 16 --output llava-1.5-7b-alignedvq

Under `torchrun --nproc_per_node N` (or `accelerate launch`) every process trains on its shard of the data and
the codebooks stay identical across processes (the quantizer synchronises its EMA statistics).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import AutoProcessor, TrainingArguments

from transformers_alignedvq import LlavaAlignedVQForConditionalGeneration
from transformers_alignedvq.data import VQACollator, load_easy_vqa
from transformers_alignedvq.training import (
    AlignedVQTrainer,
    checkpointing_argument,
    prepare_for_finetuning,
    trainable_parameters,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="LLaVA checkpoint: Hub id or folder (with its processor)")
    p.add_argument("--output", required=True)
    p.add_argument("--dataset", default="easy-vqa", help="'easy-vqa' (offline) or a Hub dataset id")
    p.add_argument("--train-split", default="train")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training examples")
    # AlignedVQ
    p.add_argument("--split-layer", type=int, default=0)
    p.add_argument("--split-site", default="ln1", choices=["patch", "input", "ln1", "attn", "ln2", "mlp"])
    p.add_argument("--codebook-size", type=int, default=4096)
    p.add_argument("--num-codebooks", type=int, default=1)
    p.add_argument("--num-groups", type=int, default=1)
    p.add_argument("--no-dlp", action="store_true", help="plain VQ without Dual Linear Projection")
    p.add_argument("--lora-r", type=int, default=16, help="0 disables LoRA")
    p.add_argument("--lora-cloud-vision", action="store_true",
                   help="also LoRA in the vision blocks the cloud runs (not in the paper's recipe)")
    p.add_argument("--commitment-weight", type=float, default=0.25)
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--calibration-images", type=int, default=512)
    p.add_argument("--kmeans-iters", type=int, default=20)
    # optimisation
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--batch-size", type=int, default=32, help="questions per step (on average when grouped)")
    p.add_argument(
        "--images-per-batch", type=int, default=None,
        help="batches of all the questions of N images, with the image prefix computed once per image (same "
        "loss, several times faster when images have many questions). Default: when the data has an "
        "'image_id' column, N = batch-size / (questions per image); 0 turns grouping off",
    )
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logging-steps", type=int, default=20)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    # output
    p.add_argument("--checkpoint-kind", default="full", choices=["full", "adapter"])
    p.add_argument("--merge-lora", action="store_true", help="merge LoRA into the weights of a full checkpoint")
    return p.parse_args(argv)


def load_train_data(args):
    if args.dataset == "easy-vqa":
        return load_easy_vqa(args.train_split, limit=args.limit)
    import datasets

    data = datasets.load_dataset(args.dataset, split=args.train_split)
    return data.select(range(min(args.limit, len(data)))) if args.limit else data


def calibration_batches(data, processor, count: int, batch_size: int = 32):
    """Pixel batches of up to ``count`` distinct images for k-means."""
    seen, images = set(), []
    for row in data:
        key = row.get("image_id", len(seen))
        if key in seen:
            continue
        seen.add(key)
        images.append(row["image"].convert("RGB"))
        if len(images) >= count:
            break
    for start in range(0, len(images), batch_size):
        yield processor.image_processor(images=images[start : start + batch_size], return_tensors="pt")["pixel_values"]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    processor = AutoProcessor.from_pretrained(args.base)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = LlavaAlignedVQForConditionalGeneration.from_llava(
        args.base,
        load_kwargs={"dtype": dtype},
        split_layer=args.split_layer,
        split_site=args.split_site,
        codebook_size=args.codebook_size,
        num_codebooks=args.num_codebooks,
        num_groups=args.num_groups,
        use_dlp=not args.no_dlp,
        commitment_weight=args.commitment_weight,
        ema_decay=args.ema_decay,
    )
    model.config.base_model_name_or_path = args.base
    data = load_train_data(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    count = model.init_codebook(
        calibration_batches(data, processor, args.calibration_images), iters=args.kmeans_iters, seed=args.seed
    )
    print(f"k-means on {count} site features -> {args.codebook_size} codewords ({time.time() - started:.0f}s)")
    images_per_batch = args.images_per_batch
    if images_per_batch is None and "image_id" in data.column_names:
        per_image = len(data) / max(len(set(data["image_id"])), 1)
        images_per_batch = max(1, round(args.batch_size / per_image))
    if images_per_batch:
        print(f"batches of the questions of {images_per_batch} images (image prefix shared per image)")
    prepare_for_finetuning(model, lora_r=args.lora_r or None, train_dlp=not args.no_dlp,
                           lora_cloud_vision=args.lora_cloud_vision)
    trainable, total = trainable_parameters(model)
    print(f"trainable parameters: {trainable:,} of {total:,}")

    training_args = TrainingArguments(
        output_dir=str(Path(args.output) / "trainer"),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_ratio,  # a float below 1 is a ratio of the total steps
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        bf16=args.bf16,
        **checkpointing_argument(args.gradient_checkpointing),
        dataloader_num_workers=0,
        disable_tqdm=args.no_progress,
        seed=args.seed,
        use_cpu=device == "cpu",
    )
    trainer = AlignedVQTrainer(
        model=model,
        args=training_args,
        train_dataset=data,
        data_collator=VQACollator(processor, train=True),
        images_per_batch=images_per_batch or None,
    )
    trainer.train()
    model.eval()
    if trainer.is_world_process_zero():
        model.save_pretrained(args.output, checkpoint_kind=args.checkpoint_kind, merge_lora=args.merge_lora)
        processor.save_pretrained(args.output)
        log = [entry for entry in trainer.state.log_history]
        (Path(args.output) / "training_log.json").write_text(json.dumps(log, indent=1))
        print(f"saved to {args.output} ({time.time() - started:.0f}s in all)")
    return {"log_history": trainer.state.log_history, "output": args.output}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
