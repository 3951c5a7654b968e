"""Fit the entropy model of coded wire frames for a model or edge folder on easy-VQA (the bundled model's).

Runs the folder's edge part (``edge_config.json`` + edge weights; a full checkpoint without them is exported
first) on every distinct image of a split, and fits `entropy.EntropyModel` on those indices and on every
question of the split. `examples/fit_entropy_model.py` runs it and writes the result beside the checkpoint;
`finetune.fit_entropy_model` does the same in process right after a finetune, for any dataset.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from .. import wire
from ..edge_runtime import EDGE_CONFIG_NAME, frame_geometry, load_edge_runtime
from ..entropy import EntropyModel


def easy_vqa_indices(model_dir: Path, split: str, *, batch_size: int = 200) -> tuple[np.ndarray, list[str], object]:
    """Indices ``(images, tokens, codes)`` of every distinct ``split`` image (by image id), the split's questions,
    and the edge runtime that made them."""
    import easy_vqa
    from PIL import Image

    with tempfile.TemporaryDirectory() as scratch:
        edge_dir = model_dir
        if not (model_dir / EDGE_CONFIG_NAME).is_file():
            from ..export.edge_export import export_edge

            edge_dir = export_edge(model_dir, Path(scratch) / "edge")
        edge = load_edge_runtime(edge_dir)
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    ids = sorted(paths)
    batches = []
    for start in range(0, len(ids), batch_size):
        pixels = np.concatenate([edge.preprocessing(Image.open(paths[i]).convert("RGB"))
                                 for i in ids[start : start + batch_size]])
        batches.append(edge.encode(pixels))  # (images, tokens, codes): one coded stage per code
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


__all__ = ["easy_vqa_indices", "fit"]
