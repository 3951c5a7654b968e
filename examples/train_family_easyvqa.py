#!/usr/bin/env python
"""Train a small LLaVA-NeXT on easy-VQA: the base that the LLaVA-NeXT AlignedVQ finetune is measured against.

No pretrained LLaVA-NeXT is available offline, and training a VLM from scratch here costs 40 minutes and lands
on a plateau for some seeds (docs/base-model.md). So the NeXT is warm-started from this repository's easy-VQA
LLaVA (``artifacts/base-easyvqa``), as LLaVA-NeXT itself started from LLaVA-1.5's recipe and weights: the
same CLIP tower, projector and Llama language model, LLaVA-NeXT's any-resolution tiling (base view + tiles of
the best pinpoint, un-padding, a learned ``image_newline`` after each row of tile features), then trained
end to end on the easy-VQA train split (validation images held out) with the same loss and schedule as the
LLaVA base. The validation subset scores each epoch end and the test split is scored once, at the end.

An easy-VQA image is 64×64, so with 64-px tiles every image is its base view plus a 1×1 grid: 2 tiles, 64 + 72
image tokens (8 rows of 8 features and a newline), against LLaVA's 64.

    python examples/train_family_easyvqa.py --output runs/next-base --threads 1
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from train_base_easyvqa import Examples, evaluate, lr_at  # noqa: E402
from transformers import (  # noqa: E402
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
)
from transformers import logging as hf_logging  # noqa: E402
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil  # noqa: E402

from transformers_alignedvq.training import shared_image_prefix_loss  # noqa: E402
from transformers_alignedvq.training.data import (  # noqa: E402
    EasyVQAAugment,
    ImageGroupedBatchSampler,
    VQACollator,
    load_easy_vqa,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="artifacts/base-easyvqa", help="the easy-VQA LLaVA to start from")
    p.add_argument("--output", required=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--min-lr-ratio", type=float, default=0.02)
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--images-per-batch", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="first N questions of each split (smoke runs)")
    p.add_argument("--eval-subset", type=int, default=1000)
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--log-every", type=int, default=50)
    return p.parse_args(argv)


def pinpoints(tile: int) -> list[list[int]]:
    """Grids of up to 2×2 tiles. LLaVA-NeXT's default list starts at 1×2 tiles; with 1×1 first, a square image
    is its base view and one tile (2 tiles) instead of a 1×2 grid whose second tile is padding (3)."""
    return [[tile, tile], [tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]


def next_from_llava(llava: LlavaForConditionalGeneration) -> LlavaNextForConditionalGeneration:
    """A LLaVA-NeXT with ``llava``'s tower, projector and language model; only ``image_newline`` is new."""
    c = llava.config
    config = LlavaNextConfig(
        vision_config=c.vision_config.to_dict(), text_config=c.text_config.to_dict(),
        image_token_index=c.image_token_id, projector_hidden_act=c.projector_hidden_act,
        vision_feature_layer=c.vision_feature_layer, vision_feature_select_strategy=c.vision_feature_select_strategy,
        image_grid_pinpoints=pinpoints(c.vision_config.image_size),
        tie_word_embeddings=c.text_config.tie_word_embeddings,
    )
    model = LlavaNextForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(llava.state_dict(), strict=False)
    if set(missing) - {"model.image_newline", "lm_head.weight"} or unexpected:
        raise RuntimeError(f"LLaVA -> NeXT weights: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = llava.generation_config
    return model


def next_processor(llava_processor) -> LlavaNextProcessor:
    clip = llava_processor.image_processor
    tile = clip.crop_size["height"]
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile}, image_grid_pinpoints=pinpoints(tile),
        image_mean=clip.image_mean, image_std=clip.image_std,
    )
    return LlavaNextProcessor(
        image_processor=image_processor, tokenizer=llava_processor.tokenizer, patch_size=llava_processor.patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=llava_processor.chat_template,
    )


def train_loop(model, loader, args, log) -> int:
    steps = len(loader) * args.epochs
    warmup = max(1, int(args.warmup_ratio * steps))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, steps, warmup, args.min_lr_ratio))
    step, started = 0, time.time()
    for epoch in range(1, args.epochs + 1):
        for batch in loader:
            shared = shared_image_prefix_loss(model, batch)
            loss = shared.lm_loss if shared is not None else model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % args.log_every == 0:
                log({"type": "train", "step": step, "loss": round(loss.item(), 5),
                     "elapsed_s": round(time.time() - started, 1)})
        yield epoch, step


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    hf_logging.set_verbosity_error()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    processor = next_processor(AutoProcessor.from_pretrained(args.base))
    model = next_from_llava(LlavaForConditionalGeneration.from_pretrained(args.base))
    train = Examples(load_easy_vqa("train", limit=args.limit))
    validation = Examples(load_easy_vqa("validation", limit=args.limit))
    test = Examples(load_easy_vqa("test", limit=args.limit))
    subset = torch.randperm(len(validation), generator=torch.Generator().manual_seed(args.seed))[: args.eval_subset]
    validation_subset = [validation[i] for i in sorted(subset.tolist())]
    sampler = ImageGroupedBatchSampler([r["image_id"] for r in train.rows], args.images_per_batch, seed=args.seed)
    collate = VQACollator(processor, train=True, image_transform=EasyVQAAugment(seed=args.seed))
    loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, collate_fn=collate, num_workers=0)
    curve = (out / "learning_curve.jsonl").open("w")

    def log(record):
        print(json.dumps(record), flush=True)
        curve.write(json.dumps(record) + "\n")
        curve.flush()

    started = time.time()
    before = evaluate(model, processor, validation_subset, args.eval_batch_size)
    log({"type": "eval", "epoch": 0, "validation_subset_acc": round(before["acc"], 4), "by_type": before["by_type"]})
    model.train()
    for epoch, step in train_loop(model, loader, args, log):
        ev = evaluate(model, processor, validation_subset, args.eval_batch_size)
        log({"type": "eval", "epoch": epoch, "step": step, "validation_subset_acc": round(ev["acc"], 4),
             "by_type": ev["by_type"], "elapsed_s": round(time.time() - started, 1)})
    train_s = time.time() - started
    model.save_pretrained(out)
    processor.save_pretrained(out)
    final = evaluate(model, processor, test, args.eval_batch_size)
    summary = {"args": vars(args), "train_wall_s": round(train_s, 1), "train_questions": len(train),
               "final": {"test_acc": round(final["acc"], 5), "n": final["n"], "by_type": final["by_type"],
                         "method": "greedy model.generate, exact match after strip"}}
    log({"type": "final", **summary["final"]})
    curve.close()
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
