"""Fit the entropy model of coded wire frames on easy-VQA's training split and store it with a checkpoint.

    python examples/fit_entropy_model.py --model src/transformers_alignedvq/assets/tiny-easyvqa

Runs the folder's edge part (``edge_config.json`` + ``edge_model.safetensors``; a full checkpoint without
them is exported first) on every distinct training image, fits `transformers_alignedvq.entropy.EntropyModel`
on those indices and on every training question, and writes ``entropy_model.safetensors`` into the folder
(`alignedvq export-edge` and the Hub's edge download carry it to devices). It prints the model id and the
mean coded frame on the training images; `benchmarks/wire_coding.py` measures it on the test images.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from transformers_alignedvq import wire
from transformers_alignedvq.edge_runtime import EDGE_CONFIG_NAME, frame_geometry, load_edge_runtime
from transformers_alignedvq.entropy import EntropyModel


def easy_vqa_indices(model_dir: Path, split: str, *, batch_size: int = 200) -> tuple[np.ndarray, list[str], object]:
    """Indices ``(images, tokens)`` of every distinct ``split`` image (by image id), the split's questions,
    and the edge runtime that made them."""
    import easy_vqa
    from PIL import Image

    with tempfile.TemporaryDirectory() as scratch:
        edge_dir = model_dir
        if not (model_dir / EDGE_CONFIG_NAME).is_file():
            from transformers_alignedvq.edge_export import export_edge

            edge_dir = export_edge(model_dir, Path(scratch) / "edge")
        edge = load_edge_runtime(edge_dir)
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    ids = sorted(paths)
    batches = []
    for start in range(0, len(ids), batch_size):
        pixels = np.concatenate([edge.preprocessing(Image.open(paths[i]).convert("RGB"))
                                 for i in ids[start : start + batch_size]])
        batches.append(edge.encode(pixels)[..., 0])
    questions = list(getattr(easy_vqa, f"get_{split}_questions")()[0])
    return np.concatenate(batches), questions, edge


def fit(model_dir: Path) -> EntropyModel:
    indices, questions, edge = easy_vqa_indices(model_dir, "train")
    geometry = frame_geometry(edge.image_size, edge.patch_size)
    started = time.perf_counter()
    model = EntropyModel.fit(indices, codebook_size=edge.codebook_size, grid=geometry["grid"],
                             has_cls_token=geometry["has_cls_token"], questions=questions)
    seconds = time.perf_counter() - started
    options = dict(codebook_size=edge.codebook_size, codebook_fingerprint=edge.fingerprint, grid=geometry["grid"],
                   has_cls_token=geometry["has_cls_token"], entropy_model=model)
    sizes = [len(wire.encode_frame(row, **options)) for row in indices]
    print(f"fitted on {len(indices)} training images and {len(questions)} questions in "
          f"{seconds:.1f} s: {model!r}")
    print(f"coded frame on the training images: mean {np.mean(sizes):.1f} B (min {min(sizes)}, max {max(sizes)})")
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model or edge folder to fit for and write into")
    args = parser.parse_args(argv)
    model_dir = Path(args.model)
    path = fit(model_dir).save(model_dir)
    print(f"wrote {path} ({path.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
