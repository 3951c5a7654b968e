"""The AlignedVQ finetune recipe (the paper's Section 3.2.3) as a command; `examples/finetune_alignedvq.py` runs it.

`from_vlm` on the base (LLaVA-1.5 or an any-resolution family, LLaVA-NeXT / OneVision; a Qwen2.5-VL base converts
too, but no easy-VQA Qwen processor exists here to test the recipe on), k-means codebook initialisation on
calibration images (every tile of the tiled families), then one joint finetune of the
codebook (EMA), the Dual Linear Projections and LoRA adapters in the language model, with the commitment loss,
through the Hugging Face `Trainer` with its usual options: an evaluation split carved from the training images
(never the test split) with ``eval_loss`` and VQA accuracy from `generate`, checkpoints every ``--save-steps``,
exact resuming, ``--report-to``, ``--push-to-hub``. After training, the entropy model of coded wire frames is
fitted for the new codebook (`entropy.EntropyModel`), so the frames stay small.

Here (CPU, the small easy-VQA LLaVA this repository trains):

    python examples/finetune_alignedvq.py --base artifacts/base-easyvqa --output runs/alignedvq-easyvqa \\
        --eval-images 200 --save-steps 200

On LLaVA-1.5-7B with a GPU and a Hub dataset with image/question/answer columns:

    python examples/finetune_alignedvq.py --base llava-hf/llava-1.5-7b-hf --dataset ORG/DATASET \\
        --bf16 --gradient-checkpointing --batch-size 16 --output llava-1.5-7b-alignedvq

Under `torchrun --nproc_per_node N` (or `accelerate launch`) every process trains on its shard of the data and
the codebooks stay identical across processes (the quantizer synchronises its EMA statistics).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoProcessor, TrainingArguments

from ..models.family import from_vlm
from .data import VQACollator, load_easy_vqa
from .trainer import AlignedVQTrainer, checkpointing_argument, prepare_for_finetuning, trainable_parameters

SITES = ["patch", "input", "ln1", "attn", "ln2", "mlp"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="LLaVA checkpoint: Hub id or folder (with its processor)")
    p.add_argument("--output", required=True)
    p.add_argument("--dataset", default="easy-vqa", help="'easy-vqa' (offline) or a Hub dataset id")
    p.add_argument("--train-split", default="train")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training examples")
    _vq_options(p)
    _optimisation_options(p)
    _evaluation_and_saving_options(p)
    p.add_argument("--checkpoint-kind", default="full", choices=["full", "adapter"])
    p.add_argument("--merge-lora", action="store_true", help="merge LoRA into the weights of a full checkpoint")
    p.add_argument("--no-entropy-model", action="store_true",
                   help="do not fit the entropy model of coded frames (frames then go bit-packed)")
    return p.parse_args(argv)


def _vq_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split-layer", type=int, default=0)
    p.add_argument("--split-site", default="ln1", choices=SITES)
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


def _optimisation_options(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--seed", type=int, default=0, help="seeds k-means, LoRA's initialisation and the data order")
    p.add_argument("--logging-steps", type=int, default=20)
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")


def _evaluation_and_saving_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-images", type=int, default=0,
                   help="hold out the questions of N training images (fixed seed) as the evaluation split: "
                   "eval_loss and VQA accuracy every --eval-steps (default: at every save, else every epoch)")
    p.add_argument("--eval-steps", type=int, default=None)
    p.add_argument("--eval-vqa-questions", type=int, default=500,
                   help="questions of the evaluation split answered with generate for VQA accuracy (0: none)")
    p.add_argument("--save-steps", type=int, default=0,
                   help="write a Trainer checkpoint every N steps (0: none), to resume from")
    p.add_argument("--save-total-limit", type=int, default=None)
    p.add_argument("--load-best-model-at-end", action="store_true",
                   help="keep the checkpoint with the best --metric-for-best-model (needs --eval-images)")
    p.add_argument("--metric-for-best-model", default="eval_loss", help="eval_loss or eval_vqa_accuracy")
    p.add_argument("--resume-from-checkpoint", default=None,
                   help="a checkpoint folder, or 'last' for the newest one under OUTPUT/trainer")
    p.add_argument("--report-to", default="none", help="tensorboard, wandb, trackio, all, ... (Trainer's names)")
    p.add_argument("--push-to-hub", action="store_true", help="upload OUTPUT to the Hub at the end")
    p.add_argument("--hub-model-id", default=None, help="the Hub repo (default: OUTPUT's folder name)")
    p.add_argument("--hub-private", action="store_true")


# ------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------
def load_train_data(args: argparse.Namespace):
    if args.dataset == "easy-vqa":
        return load_easy_vqa(args.train_split, limit=args.limit)
    import datasets

    data = datasets.load_dataset(args.dataset, split=args.train_split)
    return data.select(range(min(args.limit, len(data)))) if args.limit else data


def split_off_images(data, count: int, *, seed: int = 0):
    """``(train, held_out)``: the questions of ``count`` training images (drawn with ``seed``) held out, by
    image, so no held-out image is trained on. Rows without an ``image_id`` column count as one image each."""
    ids = list(data["image_id"]) if "image_id" in data.column_names else list(range(len(data)))
    distinct = sorted(set(ids))
    if not 0 < count < len(distinct):
        raise ValueError(f"--eval-images must be between 1 and {len(distinct) - 1}, got {count}")
    held = set(random.Random(seed).sample(distinct, count))
    held_rows = [i for i, image in enumerate(ids) if image in held]
    train_rows = [i for i, image in enumerate(ids) if image not in held]
    return data.select(train_rows), data.select(held_rows)


def calibration_batches(data, processor, count: int, batch_size: int = 32):
    """The image processor's outputs (``pixel_values`` and, for the families, ``image_sizes`` or
    ``image_grid_thw``) for batches of up to ``count`` distinct images, for k-means."""
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
        yield dict(processor.image_processor(images=images[start : start + batch_size], return_tensors="pt"))


# ------------------------------------------------------------------------------------------------------------
# model, Trainer
# ------------------------------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace, processor, data):
    """The converted model (`from_vlm`: LLaVA-1.5 or a family), its codebook k-means-initialised, prepared for
    the joint finetune."""
    started = time.time()
    model = from_vlm(
        args.base,
        load_kwargs={"dtype": torch.bfloat16 if args.bf16 else torch.float32},
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
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    count = model.init_codebook(
        calibration_batches(data, processor, args.calibration_images), iters=args.kmeans_iters, seed=args.seed
    )
    print(f"k-means on {count} site features -> {args.codebook_size} codewords ({time.time() - started:.0f}s)")
    prepare_for_finetuning(model, lora_r=args.lora_r or None, train_dlp=not args.no_dlp,
                           lora_cloud_vision=args.lora_cloud_vision)
    trainable, total = trainable_parameters(model)
    print(f"trainable parameters: {trainable:,} of {total:,}")
    return model


def training_arguments(args: argparse.Namespace, *, evaluate: bool) -> TrainingArguments:
    saving = args.save_steps > 0
    if args.load_best_model_at_end and not (evaluate and saving):
        raise ValueError("--load-best-model-at-end needs --eval-images and --save-steps")
    eval_steps = args.eval_steps or (args.save_steps if saving else None)
    return TrainingArguments(
        output_dir=str(Path(args.output) / "trainer"),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_ratio,  # a float below 1 is a ratio of the total steps
        logging_steps=args.logging_steps,
        eval_strategy=("steps" if eval_steps else "epoch") if evaluate else "no",
        eval_steps=eval_steps,
        save_strategy="steps" if saving else "no",
        save_steps=args.save_steps or 500,
        save_total_limit=args.save_total_limit,
        load_best_model_at_end=args.load_best_model_at_end,
        metric_for_best_model=args.metric_for_best_model if args.load_best_model_at_end else None,
        greater_is_better=None if not args.load_best_model_at_end else "accuracy" in args.metric_for_best_model,
        report_to=args.report_to,
        # The collator reads the raw image/question/answer columns, as in TRL's vision-language scripts.
        remove_unused_columns=False,
        bf16=args.bf16,
        **checkpointing_argument(args.gradient_checkpointing),
        dataloader_num_workers=0,
        disable_tqdm=args.no_progress,
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
    )


def images_per_batch(args: argparse.Namespace, data) -> int | None:
    if args.images_per_batch is not None:
        return args.images_per_batch or None
    if "image_id" not in data.column_names:
        return None
    per_image = len(data) / max(len(set(data["image_id"])), 1)
    return max(1, round(args.batch_size / per_image))


def resume_point(args: argparse.Namespace) -> str | None:
    if args.resume_from_checkpoint != "last":
        return args.resume_from_checkpoint
    from transformers.trainer_utils import get_last_checkpoint

    folder = Path(args.output) / "trainer"
    last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    if last is None:
        raise FileNotFoundError(f"--resume-from-checkpoint last: no checkpoint-* folder in {folder}")
    return last


# ------------------------------------------------------------------------------------------------------------
# after training
# ------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def fit_entropy_model(model, processor, data, *, batch_size: int = 64, max_images: int = 5000):
    """The entropy model of coded frames for ``model``'s codebook, fitted on the edge's indices of (up to
    ``max_images``) distinct training images (the tiled families': every tile, each coded on its own;
    Qwen2.5-VL's: each image's patch grid) and on every training question; ``None`` where frames cannot be
    coded (more codes per token than `entropy.MAX_STAGES`)."""
    from ..entropy import MAX_STAGES, EntropyModel
    from ..evaluation.family_wire import patch_layout

    config = model.config
    if config.codes_per_token > MAX_STAGES:
        return None
    if _patch_grid_family(model):
        images = _patch_grid_indices(model, calibration_batches(data, processor, max_images, batch_size))
        return EntropyModel.fit_patch_grids(images, codebook_size=config.codebook_size,
                                            questions=list(data["question"]))
    grid, has_cls_token = patch_layout(config)
    indices = []
    for batch in calibration_batches(data, processor, max_images, batch_size):
        layout = [batch["image_sizes"].to(model.device)] if "image_sizes" in batch else []  # the tiled families
        found = model.encode_edge(batch["pixel_values"].to(model.device), *layout)
        indices.append(found.cpu().numpy())  # (images or tiles, tokens[, codes])
    return EntropyModel.fit(np.concatenate(indices), codebook_size=config.codebook_size, grid=grid,
                            has_cls_token=has_cls_token, questions=list(data["question"]))


def _patch_grid_indices(model, batches) -> list:
    """``(indices (t*h*w[, codes]), (t, h, w))`` of every image: Qwen2.5-VL's edge on each batch, cut per image."""
    images = []
    for batch in batches:
        grids = batch["image_grid_thw"]
        found = model.encode_edge(batch["pixel_values"].to(model.device), grids.to(model.device)).cpu().numpy()
        ends = np.cumsum([t * h * w for t, h, w in grids.tolist()])
        images += [(part, tuple(grid)) for part, grid in zip(np.split(found, ends[:-1]), grids.tolist())]
    return images


def _patch_grid_family(model) -> bool:
    return getattr(getattr(model.model, "adapter", None), "name", None) == "qwen2_5_vl"


def save_entropy_model(args: argparse.Namespace, model, processor, data) -> None:
    output = Path(args.output)
    from ..wire import encode_frame

    config = model.config
    raw = "bit-packed frames"
    if not (hasattr(config, "tokens_per_tile") or _patch_grid_family(model)):  # LLaVA-1.5: one size for all
        frame = encode_frame(np.zeros((config.num_image_tokens, config.codes_per_token), dtype=np.int64),
                             codebook_size=config.codebook_size, codebook_fingerprint=model.codebook_fingerprint())
        raw = f"bit-packed frames of {len(frame):,} B per image"
    if args.no_entropy_model:
        print(f"no entropy model (--no-entropy-model): {raw}; fit one later with "
              f"`python examples/fit_entropy_model.py --model {output}`")
        return
    entropy = fit_entropy_model(model, processor, data)
    if entropy is None:
        print(f"no entropy model: {model.config.codes_per_token} codes per token are sent as {raw}")
        return
    path = entropy.save(output)
    print(f"entropy model fitted for the new codebook: {path.name} ({path.stat().st_size:,} bytes)")


def push(args: argparse.Namespace) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    repo = args.hub_model_id or Path(args.output).name
    url = api.create_repo(repo, private=args.hub_private, exist_ok=True)
    api.upload_folder(repo_id=url.repo_id, folder_path=args.output, ignore_patterns=["trainer/*"],
                      commit_message="AlignedVQ finetune")
    print(f"pushed {args.output} to {url}")


_LAST_BARRIER = []  # see leave_process_group


def leave_process_group() -> None:
    """Every process waits for the writer, then leaves the group (a process that exits with the group still up
    aborts in its communication threads: "terminate called without an active exception").

    The barrier's work is kept until the interpreter exits. Otherwise gloo's worker thread may be the one to free
    it, and with it the works it waited on, whose tensors belong to Python: that needs the GIL, while this thread,
    holding the GIL, frees DDP's reducer on leaving ``main`` and with it the group, whose destructor joins that
    worker. The finetune under torchrun deadlocked there about once in ten runs; a two-process loop of that
    teardown hangs within 20 rounds without the kept work and ran 1,000 rounds with it.
    """
    work = torch.distributed.barrier(async_op=True)
    work.wait()
    _LAST_BARRIER.append(work)
    torch.distributed.destroy_process_group()


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    processor = AutoProcessor.from_pretrained(args.base)
    data = load_train_data(args)
    held_out = None
    if args.eval_images:
        data, held_out = split_off_images(data, args.eval_images, seed=args.seed)
        print(f"evaluation split: {len(held_out)} questions of {args.eval_images} training images held out")
    model = build_model(args, processor, data)
    grouped = images_per_batch(args, data)
    if grouped:
        print(f"batches of the questions of {grouped} images (image prefix shared per image)")
    vqa_rows = held_out.select(range(min(args.eval_vqa_questions, len(held_out)))) if held_out else None
    trainer = AlignedVQTrainer(
        model=model,
        args=training_arguments(args, evaluate=held_out is not None),
        train_dataset=data,
        eval_dataset=held_out,
        data_collator=VQACollator(processor, train=True),
        images_per_batch=grouped,
        vqa_eval_dataset=vqa_rows if args.eval_vqa_questions else None,
        vqa_processor=processor,
    )
    trainer.train(resume_from_checkpoint=resume_point(args))
    model.eval()
    if trainer.is_world_process_zero():
        model.save_pretrained(args.output, checkpoint_kind=args.checkpoint_kind, merge_lora=args.merge_lora)
        processor.save_pretrained(args.output)
        save_entropy_model(args, model, processor, data)
        (Path(args.output) / "training_log.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        print(f"saved to {args.output} ({time.time() - started:.0f}s in all)")
        if args.push_to_hub:
            push(args)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        leave_process_group()
    return {"log_history": trainer.state.log_history, "output": args.output}


__all__ = [
    "SITES",
    "build_model",
    "calibration_batches",
    "fit_entropy_model",
    "images_per_batch",
    "load_train_data",
    "main",
    "parse_args",
    "push",
    "resume_point",
    "save_entropy_model",
    "split_off_images",
    "training_arguments",
]


if __name__ == "__main__":
    main()
