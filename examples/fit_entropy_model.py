"""Fit the entropy model of coded wire frames on easy-VQA's training split and store it with a checkpoint.

    python examples/fit_entropy_model.py --model src/transformers_alignedvq/assets/tiny-easyvqa

Runs the folder's edge part (``edge_config.json`` + ``edge_model.safetensors``; a full checkpoint without
them is exported first) on every distinct training image, fits `transformers_alignedvq.entropy.EntropyModel`
on those indices and on every training question, and writes ``entropy_model.safetensors`` into the folder
(`alignedvq export-edge` and the Hub's edge download carry it to devices). It prints the model id and the
mean coded frame on the training images; `benchmarks/wire_coding.py` measures it on the test images.
A Qwen2.5-VL folder (``qwen_edge.json``) gets a model of patch grids, fitted through its ONNX edge.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers_alignedvq.training.entropy_fit import fit


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model or edge folder to fit for and write into")
    args = parser.parse_args(argv)
    model_dir = Path(args.model)
    path = fit(model_dir).save(model_dir)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
