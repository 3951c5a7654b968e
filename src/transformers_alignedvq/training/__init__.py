"""Finetuning: the paper's joint finetune of codebook, DLP and LoRA with the Hugging Face `Trainer`.

* `trainer.py`: what to train (`prepare_for_finetuning`), `AlignedVQTrainer` (VQ terms logged, the commitment
  loss weighted right under accumulation and several processes, image-grouped batches, VQA accuracy at
  evaluation), `shared_image_prefix_loss`.
* `data.py`: easy-VQA as a `datasets.Dataset` (train / validation / test), the collator and the image-grouped
  sampler.
* `finetune.py`: the whole recipe as a command (`python -m transformers_alignedvq.training.finetune`).
* `entropy_fit.py`: fitting the entropy model of coded frames for a trained model's folder.
"""

import importlib

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "AlignedVQTrainer",
    "SharedPrefixLoss",
    "cache_argument",
    "checkpointing_argument",
    "cloud_vision_lora_targets",
    "prepare_for_finetuning",
    "shared_image_prefix_loss",
    "trainable_parameters",
]


def __getattr__(name: str):
    """The trainer's names, imported on first use: `training.data` (which evaluation reads) then loads without
    the `Trainer`, and evaluation and training do not import each other at import time."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(".trainer", __name__), name)
    globals()[name] = value
    return value
