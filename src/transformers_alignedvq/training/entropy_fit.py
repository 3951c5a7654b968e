"""Fit the entropy model of coded wire frames for a model or edge folder on easy-VQA (the bundled model's).

Runs the folder's edge part (``edge_config.json`` + edge weights; a full checkpoint without them is exported
first) on every distinct image of a split, and fits `entropy.EntropyModel` on those indices and on every
question of the split. `examples/fit_entropy_model.py` runs it and writes the result beside the checkpoint;
`finetune.fit_entropy_model` does the same in process right after a finetune, for any dataset.

A Qwen2.5-VL folder (``qwen_edge.json``, which its checkpoints carry) gets a model of patch grids
(`fit_patch_grid_model`): its ONNX edge runs on each image at the size Qwen's processor resizes it to, and the
model is fitted on every image's grid, whatever its size.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from .. import wire
from ..edge_runtime import EDGE_CONFIG_NAME, frame_geometry, load_edge_runtime
from ..entropy import EntropyModel
from ..qwen_edge_runtime import QWEN_EDGE_CONFIG, load_qwen_edge


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


def fit_patch_grid_model(edge_dir: str | Path, images, questions=(), *, threads: int | None = None) -> EntropyModel:
    """The entropy model of a Qwen2.5-VL edge folder's frames, fitted on ``images`` (paths, PIL images, encoded bytes
    or uint8 arrays, any sizes) run through that edge and on ``questions``."""
    edge = load_qwen_edge(edge_dir, threads=threads)
    sent = [edge(image) for image in images]
    return EntropyModel.fit_patch_grids(sent, codebook_size=int(edge.config["codebook_size"]),
                                        questions=list(questions))


def _fit_qwen(model_dir: Path) -> EntropyModel:
    import easy_vqa

    paths = easy_vqa.get_train_image_paths()
    questions = list(easy_vqa.get_train_questions()[0])
    started = time.perf_counter()
    model = fit_patch_grid_model(model_dir, [paths[i] for i in sorted(paths)], questions)
    print(f"fitted on {len(paths)} training images and {len(questions)} questions in "
          f"{time.perf_counter() - started:.1f} s: {model!r}")
    return model


def fit(model_dir: Path) -> EntropyModel:
    if (Path(model_dir) / QWEN_EDGE_CONFIG).is_file():
        return _fit_qwen(Path(model_dir))
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


__all__ = ["easy_vqa_indices", "fit", "fit_patch_grid_model"]
