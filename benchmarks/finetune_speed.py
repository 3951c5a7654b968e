"""Finetuning throughput: the stock Trainer forward against image-grouped batches with the shared image prefix.

    python benchmarks/finetune_speed.py --base artifacts/base-easyvqa --steps 60 --threads 2

Same model (AlignedVQ at block 0 `ln1`, K=4096, DLP, LoRA r=16), same data (easy-VQA train), same optimizer;
each mode runs a few warm-up steps and then `--steps` timed steps, alternating modes `--rounds` times so both see
the same machine state. Prints questions per second and the ratio, measured side by side in one run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from transformers import AutoProcessor, TrainingArguments
from transformers.utils import logging as hf_logging

from transformers_alignedvq import LlavaAlignedVQForConditionalGeneration
from transformers_alignedvq.training import AlignedVQTrainer, prepare_for_finetuning
from transformers_alignedvq.training.data import VQACollator, load_easy_vqa


class CountingCollator(VQACollator):
    questions = 0

    def __call__(self, examples):
        CountingCollator.questions += len(examples)
        return super().__call__(examples)


def run(model, processor, data, *, steps: int, batch_size: int, images_per_batch: int | None) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=1e-4,
            report_to="none", save_strategy="no", remove_unused_columns=False, use_cpu=True, disable_tqdm=True,
            logging_steps=10_000, seed=0,
        )
        trainer = AlignedVQTrainer(model=model, args=args, train_dataset=data,
                                   data_collator=CountingCollator(processor, train=True), images_per_batch=images_per_batch)
        CountingCollator.questions = 0
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start, CountingCollator.questions


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="artifacts/base-easyvqa")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    processor = AutoProcessor.from_pretrained(args.base)
    model = LlavaAlignedVQForConditionalGeneration.from_llava(args.base, codebook_size=4096)
    prepare_for_finetuning(model, lora_r=16)
    data = load_easy_vqa("train")
    per_image = len(data) / len(set(data["image_id"]))
    grouped = max(1, round(args.batch_size / per_image))
    modes = {"stock forward, shuffled questions": None, f"grouped ({grouped} images/batch), shared prefix": grouped}
    rates: dict[str, list[float]] = {name: [] for name in modes}
    for name, ipb in modes.items():  # warm-up
        run(model, processor, data, steps=3, batch_size=args.batch_size, images_per_batch=ipb)
    for _ in range(args.rounds):
        for name, ipb in modes.items():
            seconds, questions = run(model, processor, data, steps=args.steps, batch_size=args.batch_size, images_per_batch=ipb)
            rates[name].append(questions / seconds)
    base = statistics.median(rates[next(iter(modes))])
    print(f"threads {torch.get_num_threads()}, {args.steps} steps x {args.rounds} rounds, batch ~{args.batch_size} questions")
    print("| mode | questions/s (median) | vs stock |")
    print("|---|---:|---:|")
    for name in modes:
        median = statistics.median(rates[name])
        print(f"| {name} | {median:.1f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
