"""Finetuning glue for the Hugging Face `Trainer`: what to train, and logging of the VQ terms.

The paper's recipe (Section 3.2.3): one joint finetune of the codebook (EMA updates in the forward pass, no
gradient), the Dual Linear Projections, and LoRA adapters in the language model, with the commitment loss
(Eq. 3) added to the task loss. Everything else stays frozen.
"""

from __future__ import annotations

import math

import torch
from transformers import Trainer

# LoRA goes into the language model only; CLIP's attention also has q_proj/k_proj/v_proj, which must not match.
DEFAULT_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def prepare_for_finetuning(
    model,
    *,
    lora_r: int | None = 16,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.05,
    target_modules: str | list[str] = DEFAULT_LORA_TARGETS,
    train_dlp: bool = True,
):
    """Freeze the model except the AlignedVQ projections and (if ``lora_r``) fresh LoRA adapters.

    Args:
        model: a `LlavaAlignedVQForConditionalGeneration`.
        lora_r: LoRA rank for the language model; ``None`` or 0 trains no LoRA (the paper's "VQ-LN1-DLP").
        lora_alpha: LoRA scaling numerator; defaults to ``2 * lora_r``.
        target_modules: PEFT ``target_modules`` (a regex over module names, or a list).
        train_dlp: train the DLP (and the codebook projections when ``codebook_dim`` is smaller).

    Returns the model, with ``requires_grad`` set; the codebook itself follows the EMA during training.
    """
    for param in model.parameters():
        param.requires_grad_(False)
    if lora_r:
        from peft import LoraConfig

        model.add_adapter(
            LoraConfig(r=lora_r, lora_alpha=lora_alpha or 2 * lora_r, lora_dropout=lora_dropout,
                       target_modules=target_modules)
        )
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.requires_grad_(True)
    if train_dlp:
        for param in model.model.alignedvq.parameters():
            param.requires_grad_(True)
    return model


def trainable_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


class AlignedVQTrainer(Trainer):
    """`Trainer` that also logs the commitment loss, codebook perplexity and usage of the steps since the
    last log (means over micro-batches, and over processes under `torch.distributed`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._vq_sums: dict[str, float] = {}
        self._vq_count = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            for name in ("commitment_loss", "codebook_perplexity", "codebook_usage", "lm_loss"):
                value = getattr(outputs, name, None)
                if value is not None:
                    self._vq_sums[name] = self._vq_sums.get(name, 0.0) + float(value.detach())
            self._vq_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs):
        if self._vq_count and "loss" in logs:
            names = sorted(self._vq_sums)
            values = torch.tensor([self._vq_sums[n] for n in names] + [float(self._vq_count)], dtype=torch.float64)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(values)
            count = values[-1].item()
            for name, total in zip(names, values[:-1].tolist()):
                logs[name] = round(total / count, 6) if not math.isnan(total) else total
            self._vq_sums, self._vq_count = {}, 0
        super().log(logs, *args, **kwargs)
