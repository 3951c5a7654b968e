"""The paper's tables and figures in miniature, on easy-VQA with the small LLaVA this repository trains.

    python examples/paper_in_miniature.py --base runs/base-easyvqa --runs runs/paper --doc docs/results.md

Every experiment writes `RUNS/results/<name>.json`; a finished experiment is never run again, so the command
resumes where it stopped. Several copies of the command can run at once on the same `--runs` folder (e.g. two
one-thread workers on a two-core machine, which is faster than one two-thread worker for a model this small):
each experiment is claimed with a lock file (`results/<name>.lock`, with the owner's pid; locks of dead
processes are taken over), and the worker that finishes the last experiment writes the results document
(tables + matplotlib figures under `docs/figures/`). Ablations whose configuration equals an experiment already
run (block 0, `ln1`, K=4096, 1 codebook, 1 group, DLP and LoRA appears in Table 1, Figure 7, Table 4 and the
bits sweep) reuse its result instead of training the same model again. Experiments:

* Table 2/3: the base on raw (PNG) images, on JPEG-90 and JPEG-10 images, a LoRA finetune of the base for
  one more epoch on clean images ("LLaVA 1+"), and AlignedVQ (`ln1` of block `--headline-split-layer`, K=4096,
  DLP, LoRA; the headline run, finetuned for `--headline-epochs`), and the same recipe with VQ at the block
  output (`mlp`) instead; accuracy and bytes per image.
* Table 1: VQ at `ln1`, `attn`, `ln2`, `mlp` of block 0 (DLP and LoRA on).
* Figure 7: vanilla VQ (`mlp`) -> `ln1` -> + DLP -> + LoRA, at every split layer the tower allows.
* Table 4: 1-3 codebooks x 1-8 groups.
* Figure 4: histograms and coefficient of variation of feature magnitudes at the four sites (no training).
* Accuracy against bits: codebook sizes 16 ... 4096.
* A diagnostic for where we disagree with the paper: Figure 7's AlignedVQ (``ln1``, DLP, LoRA) at blocks 0, 1
  and 3 with the cloud given more than the indices: the block input kept unquantized for the residual connection
  (not deployable), or each token's mean and scale of it (two fp16 per token, counted in the bytes); see
  `residual_diagnostics.py`.

Finetunes run once per `--seeds` entry (the finetune's seed: k-means, LoRA initialisation, data order), each seed's
result stored apart; the document reports mean ± sd over seeds and a paired test per seed.

Ablations use `--ablation-epochs` of finetuning, a lighter k-means initialisation (`--ablation-calibration-images`,
`--ablation-kmeans-iters`) and score `--ablation-eval` validation questions (held-out training images, see
`load_easy_vqa`): they are what choices are made on. The headline and the baselines score the full test split
(9,673 questions), and the same validation questions too, so they compare with the ablations on equal terms.
The document states both. Results written before the validation split existed (no `eval_split` field) were
scored on test; they are not reused but run again.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from residual_diagnostics import DIAGNOSTICS, SIDE_BYTES_PER_TOKEN  # noqa: E402
from transformers import AutoProcessor, LlavaForConditionalGeneration, TrainingArguments  # noqa: E402

import transformers_alignedvq  # noqa: E402,F401
from transformers_alignedvq import LlavaAlignedVQForConditionalGeneration  # noqa: E402
from transformers_alignedvq.evaluation import evaluate_vqa  # noqa: E402
from transformers_alignedvq.models.llava_alignedvq.split import (  # noqa: E402
    SPLIT_SITES,
    edge_forward,
    edge_hidden_states,
)
from transformers_alignedvq.training import AlignedVQTrainer  # noqa: E402
from transformers_alignedvq.training.data import VQACollator, load_easy_vqa  # noqa: E402
from transformers_alignedvq.training.finetune import main as finetune  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--runs", default="runs/paper")
    p.add_argument("--doc", default="docs/results.md")
    p.add_argument("--headline-epochs", type=float, default=2.0)
    p.add_argument("--headline-split-layer", type=int, default=0,
                   help="vision block of the headline run (ablations quantize block 0 unless they sweep the layer); "
                        "the default is Figure 7's best block for AlignedVQ on validation (3 seeds)")
    p.add_argument("--split-runs", default="runs/split_full",
                   help="the full-budget runs of examples/split_study.py, whose shipped setting (patch_0_rvq2) "
                        "Table 2/3 shows beside the paper's recipe")
    p.add_argument("--ablation-epochs", type=float, default=0.25)
    p.add_argument("--ablation-eval", type=int, default=2000, help="validation questions scored per ablation")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="finetune seeds (k-means, LoRA initialisation, data order): every finetune runs once per "
                        "seed, stored as RUNS/results/<name>_s<seed>.json; the document shows mean ± sd and a "
                        "paired test per seed")
    p.add_argument("--only", nargs="*", default=None, help="run only experiments whose name starts with these")
    p.add_argument("--keep-models", action="store_true", help="keep every finetuned checkpoint, not just the headline")
    p.add_argument("--train-limit", type=int, default=None, help="smoke runs: first N training questions only")
    p.add_argument("--test-limit", type=int, default=None,
                   help="smoke runs: first N test (and validation) questions only")
    p.add_argument("--calibration-images", type=int, default=2000, help="k-means images of the headline run")
    p.add_argument("--kmeans-iters", type=int, default=20, help="k-means iterations of the headline run")
    p.add_argument("--ablation-calibration-images", type=int, default=256)
    p.add_argument("--ablation-kmeans-iters", type=int, default=10)
    return p.parse_args(argv)


class Runner:
    def __init__(self, args):
        self.args = args
        self.runs = Path(args.runs)
        (self.runs / "results").mkdir(parents=True, exist_ok=True)
        self.processor = AutoProcessor.from_pretrained(args.base)
        self.test = load_easy_vqa("test", limit=args.test_limit)
        validation = load_easy_vqa("validation", limit=args.test_limit)
        # the questions every choice is made on: the same fixed subset for every ablation and baseline
        self.validation = validation.shuffle(seed=0).select(range(min(args.ablation_eval, len(validation))))

        self.pending: list[str] = []  # wanted experiments left to another worker
        self.seed = args.seeds[0]  # of the finetunes run now; `experiments` sets each in turn

    def seeded(self, name: str) -> str:
        """The results name of finetune ``name`` at the current seed."""
        return f"{name}_s{self.seed}"

    def done(self, name: str) -> dict | None:
        """The recorded result of ``name``; ``None`` when absent or scored before the validation split existed."""
        path = self.runs / "results" / f"{name}.json"
        result = json.loads(path.read_text()) if path.is_file() else None
        return result if result is not None and "eval_split" in result else None

    def record(self, name: str, result: dict) -> dict:
        result = {k: v for k, v in result.items() if k != "predictions"}
        path = self.runs / "results" / f"{name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(path)  # atomic: a concurrent worker never reads half a file
        self._lock(name).unlink(missing_ok=True)
        print(f"[{name}] {json.dumps(result)}", flush=True)
        return result

    def wanted(self, name: str) -> bool:
        return self.args.only is None or any(name.startswith(prefix) for prefix in self.args.only)

    def _lock(self, name: str) -> Path:
        return self.runs / "results" / f"{name}.lock"

    def claim(self, name: str) -> bool:
        """True when this process should run ``name``: wanted, not done, and not claimed by a live worker."""
        if not self.wanted(name) or self.done(name):
            return False
        lock = self._lock(name)
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    owner = int(lock.read_text() or 0)
                    os.kill(owner, 0)  # raises when the owner is gone
                except (ValueError, ProcessLookupError, FileNotFoundError):
                    lock.unlink(missing_ok=True)  # stale claim of a dead worker: take it over
                    continue
                except PermissionError:
                    pass
                self.pending.append(name)
                return False
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            if self.done(name):  # finished by another worker between the check and the claim
                lock.unlink(missing_ok=True)
                return False
            return True
        self.pending.append(name)
        return False

    # ----------------------------------------------------------------------------------------------------
    def baseline(self, name: str, jpeg: int | None):
        if not self.claim(name):
            return
        model = LlavaForConditionalGeneration.from_pretrained(self.args.base).eval()
        start = time.time()
        result = self._evaluate(model, full_eval=True, jpeg_quality=jpeg)
        result.update(eval_seconds=time.time() - start)
        self.record(name, result)

    def _evaluate(self, model, *, full_eval: bool, **options) -> dict:
        """Scores on the validation questions; with ``full_eval`` (a reported configuration) on test too, with the
        validation scores under ``validation``."""
        validation = evaluate_vqa(model, self.processor, self.validation, batch_size=256, **options)
        validation.update(eval_questions=len(self.validation), eval_split="validation")
        if not full_eval:
            return validation
        result = evaluate_vqa(model, self.processor, self.test, batch_size=256, **options)
        result.update(eval_questions=len(self.test), eval_split="test",
                      validation={k: v for k, v in validation.items() if k != "predictions"})
        return result

    def llava_one_plus(self, name: str = "llava_1plus"):
        """LoRA-finetune the base for one more epoch on clean images (the paper's LLaVA 1+)."""
        name = self.seeded(name)
        if not self.claim(name):
            return
        torch.manual_seed(self.seed)  # LoRA's initialisation; the Trainer's seed orders the data
        model = LlavaForConditionalGeneration.from_pretrained(self.args.base)
        for param in model.parameters():
            param.requires_grad_(False)
        from peft import LoraConfig

        from transformers_alignedvq.lora import add_lora
        from transformers_alignedvq.training import DEFAULT_LORA_TARGETS

        add_lora(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=DEFAULT_LORA_TARGETS))
        for n, param in model.named_parameters():
            param.requires_grad_("lora_" in n)
        start = time.time()
        self._train(model, epochs=self.args.headline_epochs, output=self.runs / name)
        train_seconds = time.time() - start
        result = self._evaluate(model.eval(), full_eval=True)
        result.update(train_seconds=train_seconds, epochs=self.args.headline_epochs, seed=self.seed)
        self.record(name, result)

    def _train(self, model, *, epochs: float, output: Path):
        args = TrainingArguments(
            output_dir=str(output / "trainer"), num_train_epochs=epochs, per_device_train_batch_size=self.args.batch_size,
            learning_rate=self.args.lr, lr_scheduler_type="cosine", warmup_steps=0.03, logging_steps=50,
            save_strategy="no", report_to="none", remove_unused_columns=False, disable_tqdm=True, use_cpu=True,
            seed=self.seed, data_seed=self.seed,
        )
        data = load_easy_vqa("train", limit=self.args.train_limit)
        per_image = len(data) / len(set(data["image_id"]))
        trainer = AlignedVQTrainer(model=model, args=args, train_dataset=data,
                                   data_collator=VQACollator(self.processor, train=True),
                                   images_per_batch=max(1, round(self.args.batch_size / per_image)))
        trainer.train()
        return trainer.state.log_history

    @staticmethod
    def _config_key(epochs: float, full_eval: bool, lora: bool, options: dict, seed: int = 0,
                    diagnostic: str | None = None) -> str:
        settings = dict(split_layer=0, split_site="ln1", codebook_size=4096, num_codebooks=1, num_groups=1, no_dlp=False)
        settings.update(options)
        if diagnostic:  # a diagnostic is keyed apart from the real split it resembles
            settings["diagnostic"] = diagnostic
        return json.dumps({"epochs": epochs, "full_eval": full_eval, "lora": lora, "seed": seed, **settings},
                          sort_keys=True)

    def alignedvq(self, name: str, *, epochs: float, full_eval: bool = False, lora: bool = True,
                  diagnostic: str | None = None, **options):
        """Finetune and score one AlignedVQ configuration at the current seed; ``diagnostic`` (a name in
        `residual_diagnostics.DIAGNOSTICS`) runs it with the cloud given more than the indices."""
        name = self.seeded(name)
        if not self.wanted(name) or self.done(name):
            return
        key = self._config_key(epochs, full_eval, lora, options, self.seed, diagnostic)
        for other in sorted((self.runs / "results").glob("*.json")):
            result = json.loads(other.read_text())
            if result.get("config_key") == key and "eval_split" in result:
                self.record(name, {**result, "same_run_as": result.get("same_run_as", other.stem), "options": options})
                return
        if not self.claim(name):
            return
        output = self.runs / name
        argv = self._finetune_argv(output, epochs, full_eval, lora, options)
        start = time.time()
        with DIAGNOSTICS[diagnostic]() if diagnostic else contextlib.nullcontext():
            finetune(argv)
            train_seconds = time.time() - start
            model = LlavaAlignedVQForConditionalGeneration.from_pretrained(output).eval()
            result = self._evaluate(model, full_eval=full_eval)
        if diagnostic == "mean_scale":  # two fp16 numbers per token travel beside the frame
            side = SIDE_BYTES_PER_TOKEN * model.config.num_image_tokens
            for scores in (result, result.get("validation")):
                if scores:
                    scores.update(bytes_per_image=scores["bytes_per_image"] + side, side_bytes_per_image=side)
        result.update(train_seconds=train_seconds, epochs=epochs, options=options, lora=lora, seed=self.seed,
                      config_key=key, diagnostic=diagnostic)
        self.record(name, result)
        if not (self.args.keep_models or full_eval):
            import shutil

            shutil.rmtree(output, ignore_errors=True)

    def _finetune_argv(self, output: Path, epochs: float, full_eval: bool, lora: bool, options: dict) -> list[str]:
        argv = [
            "--base", self.args.base, "--output", str(output), "--epochs", str(epochs),
            "--batch-size", str(self.args.batch_size), "--lr", str(self.args.lr), "--no-progress",
            "--lora-r", "16" if lora else "0", "--logging-steps", "50", "--seed", str(self.seed),
        ]
        if full_eval:
            argv += ["--calibration-images", str(self.args.calibration_images), "--kmeans-iters", str(self.args.kmeans_iters)]
        else:
            argv += ["--calibration-images", str(self.args.ablation_calibration_images),
                     "--kmeans-iters", str(self.args.ablation_kmeans_iters)]
        if self.args.train_limit:
            argv += ["--limit", str(self.args.train_limit)]
        for option, value in options.items():
            flag = "--" + option.replace("_", "-")
            if value is True:
                argv.append(flag)
            elif value is not False:
                argv += [flag, str(value)]
        return argv

    def _test_pixels(self, images: int) -> torch.Tensor:
        """Pixels of ``images`` distinct test images (every tenth question's) for the feature statistics."""
        rows = self.test.select(range(min(images * 10, len(self.test))))
        return self.processor.image_processor(
            images=[r["image"].convert("RGB") for r in rows.select(range(0, len(rows), 10))], return_tensors="pt"
        )["pixel_values"]

    def block_input_statistics(self, name: str = "block_input_stats", images: int = 64):
        """How much each token's mean and scale vary over the tokens at each block's input (base model): what the
        mean-and-scale diagnostic can give back is at most what the LayerNorm took away."""
        if not self.claim(name):
            return
        model = LlavaForConditionalGeneration.from_pretrained(self.args.base).eval()
        tower = model.model.vision_tower
        with torch.no_grad():
            states = edge_hidden_states(tower, self._test_pixels(images), len(tower.encoder.layers) - 1)
        result = {}
        for block, x in enumerate(states):
            mean, scale = x.mean(-1), x.std(-1, unbiased=False)
            result[str(block)] = {"scale_cv": float(scale.std() / scale.mean()),
                                  "mean_sd_over_scale": float(mean.std() / scale.mean())}
        result["eval_split"] = "test"  # a statistic of the base's features; nothing is chosen on it
        self.record(name, result)

    def feature_magnitudes(self, name: str = "figure4_magnitudes", images: int = 64):
        if not self.claim(name):
            return
        model = LlavaForConditionalGeneration.from_pretrained(self.args.base).eval()
        pixel_values = self._test_pixels(images)
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
        result["eval_split"] = "test"  # a statistic of the base's features; nothing is chosen on it
        self.record(name, result)


def experiments(runner: Runner, args):
    """Every experiment, once per seed (seeds outermost: a stopped run has whole seeds, and results without a
    seed, the baselines and Figure 4, run with the first)."""
    for seed in args.seeds:
        runner.seed = seed
        _experiments_at_seed(runner, args)


def _experiments_at_seed(runner: Runner, args):
    num_layers = transformers_alignedvq.AlignedVQConfig.from_llava_config(
        LlavaForConditionalGeneration.config_class.from_pretrained(args.base)
    ).feature_layer_indices()[0]
    ab = args.ablation_epochs
    runner.feature_magnitudes()
    runner.baseline("base_raw", None)
    runner.baseline("base_jpeg90", 90)
    runner.baseline("base_jpeg10", 10)
    runner.alignedvq("alignedvq_headline", epochs=args.headline_epochs, full_eval=True, codebook_size=4096,
                     split_layer=args.headline_split_layer)
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
    # Table 1 and Figure 7 disagree with the paper here (VQ on the block output beats VQ after LN1), so the
    # headline recipe is also run with VQ at the block output, to compare the two at full budget.
    runner.alignedvq("alignedvq_headline_mlp", epochs=args.headline_epochs, full_eval=True, codebook_size=4096,
                     split_layer=args.headline_split_layer, split_site="mlp")
    # Where does the LN1 site lose? Figure 7's AlignedVQ again with the cloud given more than the indices: the
    # unquantized block input for the residual (not deployable), or each token's mean and scale (deployable).
    runner.block_input_statistics()
    for layer in DIAGNOSTIC_BLOCKS:
        if layer < num_layers:
            for diagnostic in DIAGNOSTICS:
                runner.alignedvq(f"diag_L{layer}_{diagnostic}", epochs=ab, split_layer=layer, diagnostic=diagnostic)


DIAGNOSTIC_BLOCKS = (0, 1, 3)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runner = Runner(args)
    experiments(runner, args)
    if runner.pending:  # another worker still runs some of the wanted experiments
        still = [name for name in runner.pending if not runner.done(name)]
        if still:
            print(f"not writing {args.doc}: {len(still)} experiment(s) still running in another worker ({', '.join(still)})")
            return
    from paper_report import write_report

    write_report(runner.runs, Path(args.doc), args)


if __name__ == "__main__":
    main()
