"""Small index data for the wire-format and entropy-model tests: images with the structure the context model
is for, and a model fitted on them (numpy only)."""

from __future__ import annotations

import numpy as np

from transformers_alignedvq.entropy import EntropyModel

QUESTIONS = ["what color is the shape?", "what shape is in the image?", "is there a red shape?",
             "does the image contain a circle?"] * 3


def blocky_images(count: int, *, k: int = 64, side: int = 6, seed: int = 0) -> np.ndarray:
    """Flat-colour rectangles on a background, as token indices ``(count, side * side + 1)``: the spatial
    structure the context model is for."""
    rng = np.random.default_rng(seed)
    images = np.empty((count, side * side + 1), dtype=np.int64)
    for image in images:
        grid = np.full((side, side), rng.integers(k))
        top, left = rng.integers(0, side - 2, size=2)
        grid[top : top + rng.integers(2, side - top + 1), left : left + rng.integers(2, side - left + 1)] = rng.integers(k)
        image[0], image[1:] = rng.integers(k), grid.ravel()
    return images


def small_model(seed: int = 0, **kwargs) -> EntropyModel:
    return EntropyModel.fit(blocky_images(200, seed=seed), codebook_size=64, grid=(6, 6), has_cls_token=True,
                            questions=QUESTIONS, **kwargs)
