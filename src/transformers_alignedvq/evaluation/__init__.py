"""Evaluation: VQA accuracy (the VQA-v2 answer normalisation) of a model, with images over the real wire
format (`vqa.py`)."""

from .vqa import (
    evaluate_vqa,
    indices_over_the_wire,
    jpeg_roundtrip,
    normalize_answer,
    png_bytes,
    vqa_accuracy,
    vqa_score,
)

__all__ = [
    "evaluate_vqa",
    "indices_over_the_wire",
    "jpeg_roundtrip",
    "normalize_answer",
    "png_bytes",
    "vqa_accuracy",
    "vqa_score",
]
