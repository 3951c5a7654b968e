"""The paper's tables and figures in miniature, on easy-VQA with the small LLaVA this repository trains.

    python examples/paper_in_miniature.py --base runs/base-easyvqa --runs runs/paper --doc docs/results.md

Every experiment writes `RUNS/results/<name>.json`; a finished experiment is never run again, so the command
resumes where it stopped. When everything is done it writes the results document (tables + matplotlib
figures under `docs/figures/`). Experiments:

* Table 2/3: the base on raw (PNG) images, on JPEG-90 and JPEG-10 images, a LoRA finetune of the base for
  one more epoch on clean images ("LLaVA 1+"), and AlignedVQ (block 0, `ln1`, K=4096, DLP, LoRA; the
  headline run, finetuned for `--headline-epochs`); accuracy and bytes per image.
* Table 1: VQ at `ln1`, `attn`, `ln2`, `mlp` of block 0 (DLP and LoRA on).
* Figure 7: vanilla VQ (`mlp`) -> `ln1` -> + DLP -> + LoRA, at every split layer the tower allows.
* Table 4: 1-3 codebooks x 1-8 groups.
* Figure 4: histograms and coefficient of variation of feature magnitudes at the four sites (no training).
* Accuracy against bits: codebook sizes 16 ... 4096.

Ablations use `--ablation-epochs` of finetuning and score `--ablation-eval` test questions; the headline and
the baselines score the full test split (9,673 questions). The document states both.
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
from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainingArguments  # noqa: E402

import transformers_alignedvq  # noqa: E402,F401
from transformers_alignedvq import LlavaAlignedVQForConditionalGeneration  # noqa: E402
from transformers_alignedvq.data import VQACollator, load_easy_vqa  # noqa: E402
from transformers_alignedvq.evaluation import evaluate_vqa  # noqa: E402
from transformers_alignedvq.split import SPLIT_SITES, edge_forward  # noqa: E402
from transformers_alignedvq.training import AlignedVQTrainer, prepare_for_finetuning  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--runs", default="runs/paper")
    p.add_argument("--doc", default="docs/results.md")
    p.add_argument("--headline-epochs", type=float, default=1.0)
    p.add_argument("--ablation-epochs", type=float, default=0.25)
    p.add_argument("--ablation-eval", type=int, default=2000, help="test questions scored per ablation")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--only", nargs="*", default=None, help="run only experiments whose name starts with these")
    p.add_argument("--keep-models", action="store_true", help="keep every finetuned checkpoint, not just the headline")
    p.add_argument("--train-limit", type=int, default=None, help="smoke runs: first N training questions only")
    p.add_argument("--test-limit", type=int, default=None, help="smoke runs: first N test questions only")
    p.add_argument("--calibration-images", type=int, default=512)
    p.add_argument("--kmeans-iters", type=int, default=20)
    return p.parse_args(argv)


class Runner:
    def __init__(self, args):
        self.args = args
        self.runs = Path(args.runs)
        (self.runs / "results").mkdir(parents=True, exist_ok=True)
        self.processor = AutoProcessor.from_pretrained(args.base)
        self.test = load_easy_vqa("test", limit=args.test_limit)
        self.ablation_test = self.test.shuffle(seed=0).select(range(min(args.ablation_eval, len(self.test))))

    def done(self, name: str) -> dict | None:
        path = self.runs / "results" / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def record(self, name: str, result: dict) -> dict:
        result = {k: v for k, v in result.items() if k != "predictions"}
        (self.runs / "results" / f"{name}.json").write_text(json.dumps(result, indent=2))
        print(f"[{name}] {json.dumps(result)}", flush=True)
        return result

    def wanted(self, name: str) -> bool:
        return self.args.only is None or any(name.startswith(prefix) for prefix in self.args.only)

    # ----------------------------------------------------------------------------------------------------
    def baseline(self, name: str, jpeg: int | None):
        if self.done(name) or not self.wanted(name):
            return
        model = LlavaForConditionalGeneration.from_pretrained(self.args.base).eval()
        start = time.time()
        result = evaluate_vqa(model, self.processor, self.test, jpeg_quality=jpeg, batch_size=256)
        result.update(eval_seconds=time.time() - start, eval_questions=len(self.test))
        self.record(name, result)

    def llava_one_plus(self, name: str = "llava_1plus"):
        """LoRA-finetune the base for one more epoch on clean images (the paper's LLaVA 1+)."""
        if self.done(name) or not self.wanted(name):
            return
        model = LlavaForConditionalGeneration.from_pretrained(self.args.base)
        for param in model.parameters():
            param.requires_grad_(False)
        from peft import LoraConfig

        from transformers_alignedvq.training import DEFAULT_LORA_TARGETS

        model.add_adapter(LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=DEFAULT_LORA_TARGETS))
        for n, param in model.named_parameters():
            param.requires_grad_("lora_" in n)
        start = time.time()
        self._train(model, epochs=self.args.headline_epochs, output=self.runs / name)
        train_seconds = time.time() - start
        result = evaluate_vqa(model.eval(), self.processor, self.test, batch_size=256)
        result.update(train_seconds=train_seconds, eval_questions=len(self.test), epochs=self.args.headline_epochs)
        self.record(name, result)

    def _train(self, model, *, epochs: float, output: Path):
        args = TrainingArguments(
            output_dir=str(output / "trainer"), num_train_epochs=epochs, per_device_train_batch_size=self.args.batch_size,
            learning_rate=self.args.lr, lr_scheduler_type="cosine", warmup_steps=0.03, logging_steps=50,
            save_strategy="no", report_to="none", remove_unused_columns=False, disable_tqdm=True, use_cpu=True,
        )
        trainer = AlignedVQTrainer(model=model, args=args, train_dataset=load_easy_vqa("train", limit=self.args.train_limit),
                                   data_collator=VQACollator(self.processor, train=True))
        trainer.train()
        return trainer.state.log_history

    def alignedvq(self, name: str, *, epochs: float, full_eval: bool = False, lora: bool = True, **options):
        if self.done(name) or not self.wanted(name):
            return
        output = self.runs / name
        argv = [
            "--base", self.args.base, "--output", str(output), "--epochs", str(epochs),
            "--batch-size", str(self.args.batch_size), "--lr", str(self.args.lr), "--no-progress",
            "--lora-r", "16" if lora else "0", "--logging-steps", "50",
            "--calibration-images", str(self.args.calibration_images), "--kmeans-iters", str(self.args.kmeans_iters),
        ]
        if self.args.train_limit:
            argv += ["--limit", str(self.args.train_limit)]
        for key, value in options.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                argv.append(flag)
            elif value is not False:
                argv += [flag, str(value)]
        start = time.time()
        finetune_alignedvq.main(argv)
        train_seconds = time.time() - start
        model = LlavaAlignedVQForConditionalGeneration.from_pretrained(output).eval()
        test = self.test if full_eval else self.ablation_test
        result = evaluate_vqa(model, self.processor, test, batch_size=256)
        result.update(train_seconds=train_seconds, eval_questions=len(test), epochs=epochs, options=options, lora=lora)
        self.record(name, result)
        if not (self.args.keep_models or full_eval):
            import shutil

            shutil.rmtree(output, ignore_errors=True)

    def feature_magnitudes(self, name: str = "figure4_magnitudes", images: int = 64):
        if self.done(name) or not self.wanted(name):
            return
        model = LlavaForConditionalGeneration.from_pretrained(self.args.base).eval()
        rows = self.test.select(range(min(images * 10, len(self.test))))
        pixel_values = self.processor.image_processor(
            images=[r["image"].convert("RGB") for r in rows.select(range(0, len(rows), 10))], return_tensors="pt"
        )["pixel_values"]
        result = {}
        with torch.no_grad():
            for site in SPLIT_SITES:
                z = edge_forward(model.model.vision_tower, pixel_values, 0, site)
                norms = z.norm(dim=-1).flatten()
                result[site] = {
                    "cv": float(norms.std() / norms.mean()),
                    "mean": float(norms.mean()),
                    "histogram": torch.histogram(norms, bins=40).hist.tolist(),
                    "bin_edges": torch.histogram(norms, bins=40).bin_edges.tolist(),
                }
        self.record(name, result)


def experiments(runner: Runner, args):
    num_layers = transformers_alignedvq.AlignedVQConfig.from_llava_config(
        LlavaForConditionalGeneration.config_class.from_pretrained(args.base)
    ).feature_layer_indices()[0]
    ab = args.ablation_epochs
    runner.feature_magnitudes()
    runner.baseline("base_raw", None)
    runner.baseline("base_jpeg90", 90)
    runner.baseline("base_jpeg10", 10)
    runner.alignedvq("alignedvq_headline", epochs=args.headline_epochs, full_eval=True, codebook_size=4096)
    runner.llava_one_plus()
    for site in SPLIT_SITES:
        runner.alignedvq(f"table1_{site}", epochs=ab, split_site=site, codebook_size=4096)
    for layer in range(num_layers):
        runner.alignedvq(f"fig7_L{layer}_vanilla", epochs=ab, lora=False, split_layer=layer, split_site="mlp", no_dlp=True)
        runner.alignedvq(f"fig7_L{layer}_ln1", epochs=ab, lora=False, split_layer=layer, no_dlp=True)
        runner.alignedvq(f"fig7_L{layer}_ln1_dlp", epochs=ab, lora=False, split_layer=layer)
        runner.alignedvq(f"fig7_L{layer}_alignedvq", epochs=ab, split_layer=layer)
    for books in (1, 2, 3):
        for groups in (1, 2, 4, 8):
            runner.alignedvq(f"table4_c{books}_g{groups}", epochs=ab, num_codebooks=books, num_groups=groups)
    for size in (16, 64, 256, 1024, 4096):
        runner.alignedvq(f"bits_K{size}", epochs=ab, codebook_size=size)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runner = Runner(args)
    experiments(runner, args)
    from paper_report import write_report

    write_report(runner.runs, Path(args.doc), args)


if __name__ == "__main__":
    main()
