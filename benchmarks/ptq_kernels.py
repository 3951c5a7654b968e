"""Real int8 kernels for the language model, through Transformers' `quantization_config` and torchao.

    pip install torchao==0.18.0
    python benchmarks/ptq_kernels.py --threads 1 --json docs/data/ptq/results/kernels.json

Two measurements, each side by side in one run:

1. Speed at LLaVA-1.5-7B size: the seven linear layers of one language-model layer (4096 wide, MLP 11008; random
   weights) on a prefill of 600 tokens and on one decode token, in fp32 and with torchao's
   `Int8DynamicActivationInt8WeightConfig` (int8 weights per channel, int8 activations per token, computed at
   run time), eager and under `torch.compile` (which is what turns the int8 layers into int8 matrix products).
   Every variant's output is checked against eager execution of the same weights first: one that computes
   something else (torch.compile's int8 decode on this CPU build does) is reported as wrong, without a time.
2. Accuracy: the bundled AlignedVQ model loaded with
   `quantization_config=TorchAoConfig(FqnToConfig({LM_LINEARS: Int8DynamicActivationInt8WeightConfig()}))`
   (only the language model's linear layers in int8, through the package's strict loader), scored on `--eval` easy-VQA test
   questions against the same model in fp32 (per-question correctness stored, for a paired test).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
from torch import nn

LLAMA_7B = {"hidden": 4096, "intermediate": 11008}
# The language model's linear layers (a pattern for the whole language model would also match its norms' weights).
LM_LINEARS = r"re:model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"


def layer_linears(hidden: int, intermediate: int) -> nn.ModuleDict:
    torch.manual_seed(0)
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, hidden), "v_proj": (hidden, hidden),
              "o_proj": (hidden, hidden), "gate_proj": (hidden, intermediate), "up_proj": (hidden, intermediate),
              "down_proj": (intermediate, hidden)}
    return nn.ModuleDict({name: nn.Linear(i, o, bias=False) for name, (i, o) in shapes.items()}).eval()


def run_layer(linears: nn.ModuleDict, x: torch.Tensor) -> torch.Tensor:
    attention = linears["o_proj"](linears["q_proj"](x) + linears["k_proj"](x) + linears["v_proj"](x))
    h = x + attention
    return h + linears["down_proj"](torch.nn.functional.silu(linears["gate_proj"](h)) * linears["up_proj"](h))


def timed(fn, repeats: int) -> float:
    with torch.no_grad():
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
    return (time.perf_counter() - start) / repeats * 1000


MAX_ERROR = 1e-2  # relative error against the eager layer of the same weights above which an output is wrong


def speed(repeats: int) -> list[dict]:
    """Milliseconds per call of every variant, and its output's relative error against eager execution of the
    same weights (fp32 or int8): a variant whose output is wrong gets no time, however fast it ran."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    fp = layer_linears(LLAMA_7B["hidden"], LLAMA_7B["intermediate"])
    int8 = layer_linears(LLAMA_7B["hidden"], LLAMA_7B["intermediate"])
    quantize_(int8, Int8DynamicActivationInt8WeightConfig())
    variants = {"fp32 eager": lambda x: run_layer(fp, x), "int8 eager": lambda x: run_layer(int8, x),
                "fp32 compiled": torch.compile(lambda x: run_layer(fp, x)),
                "int8 compiled": torch.compile(lambda x: run_layer(int8, x))}
    rows = []
    for tokens in (600, 1):
        x = torch.randn(1, tokens, LLAMA_7B["hidden"])
        with torch.no_grad():
            outputs = {name: f(x) for name, f in variants.items()}
        times = {name: timed(lambda f=f: f(x), repeats) for name, f in variants.items()}
        for name, ms in times.items():
            reference = outputs[name.split()[0] + " eager"]
            error = float((outputs[name] - reference).norm() / reference.norm())
            valid = error <= MAX_ERROR
            rows.append({"tokens": tokens, "variant": name, "ms": ms if valid else None, "relative_error": error,
                         "vs_fp32_eager": times["fp32 eager"] / ms if valid else None})
    return rows


def accuracy(questions: int) -> list[dict]:
    from torchao.quantization import FqnToConfig, Int8DynamicActivationInt8WeightConfig
    from transformers import AutoModel, AutoProcessor, TorchAoConfig

    import transformers_alignedvq as tav
    from transformers_alignedvq.evaluation import evaluate_vqa
    from transformers_alignedvq.training.data import load_easy_vqa

    config = TorchAoConfig(FqnToConfig({LM_LINEARS: Int8DynamicActivationInt8WeightConfig()}))
    processor = AutoProcessor.from_pretrained(tav.TINY_EASYVQA)
    data = load_easy_vqa("test").shuffle(seed=0).select(range(questions))
    rows = []
    for name, kwargs in (("fp32", {}), ("language model int8 (torchao)", {"quantization_config": config})):
        model = AutoModel.from_pretrained(tav.TINY_EASYVQA, **kwargs).eval()
        start = time.perf_counter()
        result = evaluate_vqa(model, processor, data, batch_size=256)
        rows.append({"model": name, "accuracy": result["accuracy"], "questions": questions,
                     "eval_seconds": time.perf_counter() - start, "correct": result["correct"],
                     "eval_split": "test"})
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--eval", type=int, default=2000, help="easy-VQA test questions for the accuracy check")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "speed": speed(args.repeats), "accuracy": accuracy(args.eval)}
    print("| tokens | variant | ms | vs fp32 eager |\n|---:|---|---:|---:|")
    for row in result["speed"]:
        if row["ms"] is None:
            print(f"| {row['tokens']} | {row['variant']} | wrong output (relative error {row['relative_error']:.1e}) "
                  "| — |")
        else:
            print(f"| {row['tokens']} | {row['variant']} | {row['ms']:.1f} | {row['vs_fp32_eager']:.2f}x |")
    print("\n| model | accuracy (%) | questions | eval (s) |\n|---|---:|---:|---:|")
    for row in result["accuracy"]:
        print(f"| {row['model']} | {100 * row['accuracy']:.2f} | {row['questions']} | {row['eval_seconds']:.1f} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
