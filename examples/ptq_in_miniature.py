"""Q-VLM's tables in miniature: post-training quantization of the easy-VQA base LLaVA and the bundled AlignedVQ
model, per method and bit-width, and the paper's entropy/dependency correlation.

    python examples/ptq_in_miniature.py --base artifacts/base-easyvqa --runs docs/data/ptq --doc docs/ptq.md \
        --seeds 0 1 2

Every experiment writes ``RUNS/results/<name>.json`` and is never run again, so the command resumes where it
stopped; the document is rewritten from those files after every experiment (`ptq_report.py`). Experiments run
one at a time, in this order:

* ``<model>_fp``: full precision.
* ``<model>_<method>_<bits>``: ``rtn`` / ``layerwise`` / ``qvlm`` at W6A6 and W4A4 (headline; W8A8 and W4A16
  after the two items below); every part quantized (for AlignedVQ: the edge too, where it runs vision blocks);
  full test split (9,673 questions).
* ``<model>_dependency``: layer-wise vs joint search error difference against activation entropy, per layer.
* ``ablation_*``, on ``--ablation-eval`` validation questions (what choices are made on): Q-VLM at W4A4 as in the headline rows (the reference
  on the same questions) and on one part at a time, with the visual encoder optimization, the full-precision
  model after that optimization alone, depth-1 blocks, one joint block per stack; Q-VLM on the AlignedVQ edge
  alone (W8A8, W4A4). The W8A8 and W4A16 rows and the remaining one-part runs come last.

Calibration: ``--calibration-images`` training images, one random question each, drawn anew for every seed of
``--seeds`` (the same draw for every experiment at that seed). Every experiment that calibrates runs once per seed,
stored as ``RUNS/results/<name>_s<seed>.json``; full-precision runs involve no draw and run once. The report shows
mean ± sd over the seeds and a paired test per seed. docs/ptq.md's results files (per-question correctness
included) are kept in the repository under ``docs/data/ptq``, so the page can be rewritten and its tests checked
without running again.
Results without an ``eval_split`` field predate the validation split (their ablations were scored on test) and are
run again.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoProcessor, LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).parent))

import ptq_report  # noqa: E402

import transformers_alignedvq  # noqa: E402
from transformers_alignedvq.evaluation import evaluate_vqa  # noqa: E402
from transformers_alignedvq.ptq import (  # noqa: E402
    PTQConfig,
    dependency_analysis,
    model_bits,  # noqa: E402
    quantize_model,
)
from transformers_alignedvq.training.data import VQACollator, load_easy_vqa, one_question_per_image  # noqa: E402

BITS = {"w8a8": (8, 8), "w6a6": (6, 6), "w4a4": (4, 4), "w4a16": (4, None)}
METHODS = ("rtn", "layerwise", "qvlm")
# Q-VLM's headline rows: entropy-guided blocks searched jointly, without the visual encoder optimization, which
# the validation ablations (three draws, both models) did not show helping; the `veo` ablation runs it with
# eta = VEO_WEIGHT.
VEO_WEIGHT = 0.1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the base LLaVA (e.g. artifacts/base-easyvqa)")
    p.add_argument("--alignedvq", default=transformers_alignedvq.TINY_EASYVQA, help="the AlignedVQ model")
    p.add_argument("--runs", default="docs/data/ptq", help="where results are kept (docs/ptq.md's are in the repository)")
    p.add_argument("--doc", default="docs/ptq.md")
    p.add_argument("--calibration-images", type=int, default=256)
    p.add_argument("--ablation-eval", type=int, default=2000, help="validation questions scored per ablation")
    p.add_argument("--test-limit", type=int, default=None, help="smoke runs: first N test (and validation) questions only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", nargs="*", default=None, help="run only experiments whose name starts with these")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="calibration draws (which training images, which question of each)")
    return p.parse_args(argv)


def calibrates(spec: dict) -> bool:
    """Whether an experiment depends on the calibration draw (everything but full precision)."""
    return "bits" in spec or bool(spec.get("dependency"))


def experiments() -> list[tuple[str, dict]]:
    """(name, spec) in the order they run: the headline rows, the correlation check and Q-VLM's ablations first."""
    models = ("base", "alignedvq")
    out = [(f"{model}_fp", {"model": model}) for model in models]

    def bit_widths(*widths):
        return [(f"{model}_{method}_{bits}", {"model": model, "method": method, "bits": bits})
                for bits in widths for model in models for method in METHODS]

    out += bit_widths("w6a6", "w4a4")
    out += [(f"{model}_dependency", {"model": model, "bits": "w4a4", "dependency": True}) for model in models]
    ablations = {
        "plain": {},
        "veo": {"veo_weight": VEO_WEIGHT},
        "veo_fp": {"veo_weight": VEO_WEIGHT, "fp_after_veo": True},
        "depth1": {"max_block_depth": 1},
        "alljoint": {"entropy_threshold": 0.0, "max_block_depth": 99},
    }

    def ablation(model, key):
        return (f"ablation_{model}_qvlm_w4a4_{key}",
                {"model": model, "method": "qvlm", "bits": "w4a4", "subset": True, **ablations[key]})

    def one_part(model, part, bits):
        return (f"ablation_{model}_qvlm_{bits}_{part}",
                {"model": model, "method": "qvlm", "bits": bits, "subset": True, "parts": [part]})

    # Where W4A4 loses (one part at a time), the edge alone (what an int8 or int4 edge device costs the split
    # model), then Q-VLM's components.
    out += [(f"ablation_{model}_fp", {"model": model, "subset": True}) for model in models]
    out.append(ablation("base", "plain"))
    out += [one_part("base", part, "w4a4") for part in ("vision", "projector", "language_model")]
    out += [ablation("base", "veo"), ablation("alignedvq", "plain")]
    out += [one_part("alignedvq", "edge", bits) for bits in ("w8a8", "w4a4")]
    out += [one_part("alignedvq", part, "w4a4") for part in ("vision", "projector", "language_model")]
    out += [ablation(model, key) for key in ("veo_fp", "depth1", "alljoint") for model in models]
    out.append(ablation("alignedvq", "veo"))
    out += bit_widths("w8a8", "w4a16")
    out += [one_part(model, part, "w8a8") for model in models for part in ("vision", "projector", "language_model")]
    return out


class Runner:
    def __init__(self, args):
        self.args = args
        self.results = Path(args.runs) / "results"
        self.results.mkdir(parents=True, exist_ok=True)
        self.paths = {"base": args.base, "alignedvq": args.alignedvq}
        self.processors = {name: AutoProcessor.from_pretrained(path) for name, path in self.paths.items()}
        self.test = load_easy_vqa("test", limit=args.test_limit)
        validation = load_easy_vqa("validation", limit=args.test_limit)
        self.subset = validation.shuffle(seed=0).select(range(min(args.ablation_eval, len(validation))))
        self.train = load_easy_vqa("train")
        self.seed = 0

    @property
    def calibration(self):
        """The current seed's draw: ``--calibration-images`` random training images, one random question each."""
        if getattr(self, "_drawn", (None,))[0] != self.seed:
            images = sorted(set(self.train["image_id"]))
            chosen = set(random.Random(self.seed).sample(images, self.args.calibration_images))
            rows = [i for i, image in enumerate(self.train["image_id"]) if image in chosen]
            self._drawn = (self.seed, one_question_per_image(self.train.select(rows), len(chosen), seed=self.seed))
        return self._drawn[1]

    def load(self, model: str):
        cls = LlavaForConditionalGeneration if model == "base" else AutoModel
        return cls.from_pretrained(self.paths[model]).eval()

    def batches(self, model: str) -> list[dict]:
        collator = VQACollator(self.processors[model], train=True)
        rows = [self.calibration[i] for i in range(len(self.calibration))]
        return [collator(rows[start : start + 32]) for start in range(0, len(rows), 32)]

    def config(self, spec: dict) -> PTQConfig:
        weight_bits, act_bits = BITS[spec["bits"]]
        options = {k: spec[k] for k in ("max_block_depth", "entropy_threshold", "veo_weight") if k in spec}
        parts = spec.get("parts") or (("vision", "projector", "language_model") if spec["model"] == "base"
                                      else ("edge", "vision", "projector", "language_model"))
        return PTQConfig(method=spec.get("method", "qvlm"), weight_bits=weight_bits, act_bits=act_bits,
                         parts=tuple(parts), **options)

    def run(self, name: str, spec: dict) -> None:
        model = self.load(spec["model"])
        result = {"spec": spec, "seed": self.seed if calibrates(spec) else None, "fp_bytes": model_bits(model)["fp_bytes"]}
        if spec.get("dependency"):
            start = time.perf_counter()
            result["pairs"] = dependency_analysis(model, self.batches(spec["model"]), self.config(spec))
            result["seconds"] = time.perf_counter() - start
            return self.record(name, result)
        if "bits" in spec:
            config = self.config(spec)
            if spec.get("fp_after_veo"):
                from transformers_alignedvq.ptq import optimize_visual_encoder

                result["report"] = optimize_visual_encoder(model, self.batches(spec["model"]), config)
            else:
                result["report"] = quantize_model(model, self.batches(spec["model"]), config)
            result["memory"] = model_bits(model)
        data = self.subset if spec.get("subset") else self.test
        start = time.perf_counter()
        evaluation = evaluate_vqa(model, self.processors[spec["model"]], data, batch_size=256)
        evaluation.pop("predictions")
        result.update(evaluation, eval_seconds=time.perf_counter() - start, eval_questions=len(data),
                      eval_split="validation" if spec.get("subset") else "test")
        self.record(name, result)

    def done(self, name: str) -> bool:
        """Recorded, and scored on the split this version chooses on (dependency runs score nothing)."""
        path = self.results / f"{name}.json"
        if not path.is_file():
            return False
        result = json.loads(path.read_text())
        return "eval_split" in result or "accuracy" not in result

    def record(self, name: str, result: dict) -> None:
        path = self.results / f"{name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(path)
        print(f"[{name}] accuracy {result.get('accuracy')}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    runner = Runner(args)
    for seed in args.seeds:
        runner.seed = seed
        for name, spec in experiments():
            wanted = args.only is None or any(name.startswith(prefix) for prefix in args.only)
            name = f"{name}_s{seed}" if calibrates(spec) else name
            if wanted and not runner.done(name):
                print(f"[{name}] running", flush=True)
                runner.run(name, spec)
                ptq_report.write(Path(args.runs), Path(args.doc), runner.args)
    ptq_report.write(Path(args.runs), Path(args.doc), runner.args)


if __name__ == "__main__":
    main()
