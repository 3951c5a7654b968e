"""The language-model side of an AlignedVQ checkpoint as a plain llava-hf checkpoint, for vLLM.

vLLM runs LLaVA models from llava-hf folders and knows nothing of AlignedVQ. The cloud computes the image
features itself (codebook lookup, output DLP, the rest of the vision tower, the projector) and gives vLLM only
those, so vLLM needs the base LLaVA: `export_for_vllm` writes it with

* ``config.json``: a `LlavaConfig` (``model_type: llava``, ``architectures: [LlavaForConditionalGeneration]``)
  without the AlignedVQ fields;
* ``model.safetensors``: every base weight under llava-hf's original names (``language_model.model.*``,
  ``language_model.lm_head.*``, ``multi_modal_projector.*``, ``vision_tower.vision_model.*``), which both vLLM
  and Transformers load; the codebook and DLP left out, a LoRA adapter merged into its weights (the model
  itself is not changed);
* the processor (tokenizer, chat template, image processor), which vLLM uses to expand the image token;
* ``alignedvq_export.json``: a SHA-256 digest of those weights, so a folder exported once (to storage every
  node of a cluster reads) is served only with the checkpoint it came from (`check_export`).

vLLM builds the vision tower and the projector of such a folder too and never runs them: it is only given
precomputed image features. Nothing here imports vLLM.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ...errors import CheckpointMismatchError

VLLM_ARCHITECTURE = "LlavaForConditionalGeneration"
EXPORT_RECORD_NAME = "alignedvq_export.json"
_PREFIXES = (  # our module names -> llava-hf's original checkpoint names
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def llava_config(config):
    """The `LlavaConfig` of an `AlignedVQConfig`'s base model."""
    from transformers import LlavaConfig

    ours = {field.name for field in dataclasses.fields(type(config))} - {
        field.name for field in dataclasses.fields(LlavaConfig)}
    values = config.to_dict()
    for key in (*ours, "model_type", "architectures", "auto_map", "transformers_version"):
        values.pop(key, None)
    base = LlavaConfig(**values)
    base.architectures = [VLLM_ARCHITECTURE]
    return base


def checkpoint_name(name: str) -> str | None:
    """llava-hf's original name of one of our parameters; None for AlignedVQ's own."""
    if name.startswith("model.alignedvq."):
        return None
    if name.startswith("model.vision_tower."):
        rest = name[len("model.vision_tower."):]
        # Transformers releases differ in whether CLIPVisionModel nests its weights under `vision_model.`.
        return "vision_tower.vision_model." + rest.removeprefix("vision_model.")
    for ours, theirs in _PREFIXES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise ValueError(f"parameter {name!r} has no llava-hf name; is this an AlignedVQ LLaVA model?")


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under our module names, each LoRA adapter merged into its base weight."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    state = {}
    lora_layers = {name: module for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
    for name, value in model.state_dict().items():
        if "lora_" in name:
            continue
        clean = name.replace(".base_layer.", ".")
        module_name = clean.rpartition(".")[0]
        layer = lora_layers.get(module_name)
        if layer is not None and clean.endswith(".weight") and not layer.merged:
            value = value + sum(layer.get_delta_weight(adapter) for adapter in layer.active_adapters)
        state[clean] = value
    return state


def vllm_state_dict(model) -> dict[str, torch.Tensor]:
    """What `export_for_vllm` writes to ``model.safetensors``: contiguous CPU tensors under llava-hf names."""
    tied = model.config.tie_word_embeddings or model.config.text_config.tie_word_embeddings
    tensors = {}
    with torch.no_grad():
        for name, value in merged_state_dict(model).items():
            target = checkpoint_name(name)
            if target is None or (tied and name == "lm_head.weight"):
                continue
            tensors[target] = value.detach().to("cpu").contiguous()
    return tensors


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors``, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def check_export(directory: str | os.PathLike, model) -> None:
    """Raise `CheckpointMismatchError` unless ``directory`` was exported from ``model``'s weights."""
    record = Path(directory) / EXPORT_RECORD_NAME
    try:
        recorded = json.loads(record.read_text())["weights_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointMismatchError(
            f"{directory} is not a folder written by export_for_vllm (no readable {EXPORT_RECORD_NAME}: {exc})"
        ) from exc
    if recorded != weights_digest(vllm_state_dict(model)):
        raise CheckpointMismatchError(
            f"the vLLM checkpoint in {directory} was exported from other weights than this model's; export it "
            "again (alignedvq export-vllm) or point at an empty folder"
        )


def export_for_vllm(model_or_dir, directory: str | os.PathLike, *, processor=None, dtype=None) -> Path:
    """Write the plain llava-hf checkpoint vLLM serves for an AlignedVQ model (see the module docstring).

    Args:
        model_or_dir: an AlignedVQ model folder or Hub id (loaded strictly), or a loaded
            `LlavaAlignedVQForConditionalGeneration` (``processor`` is then required).
        directory: the folder to write (created if needed).
        processor: the model's `LlavaProcessor` (default: the one saved with ``model_or_dir``).
        dtype: load a folder in this dtype (e.g. ``torch.bfloat16``); the weights are written as loaded.

    Returns the folder.
    """
    from transformers import AutoModel, AutoProcessor

    if isinstance(model_or_dir, (str, os.PathLike)):
        model = AutoModel.from_pretrained(str(model_or_dir), **({"dtype": dtype} if dtype is not None else {}))
        processor = processor or AutoProcessor.from_pretrained(str(model_or_dir))
    else:
        model = model_or_dir
    if processor is None:
        raise ValueError("export_for_vllm needs the processor of a model object: pass processor=")
    if not hasattr(model.config, "codebook_size"):
        raise ValueError(f"{type(model).__name__} is not an AlignedVQ model")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = vllm_state_dict(model)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    llava_config(model.config).save_pretrained(directory)
    processor.save_pretrained(directory)
    record = {"weights_sha256": weights_digest(tensors), "codebook_fingerprint": model.codebook_fingerprint().hex()}
    (directory / EXPORT_RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return directory


__all__ = ["EXPORT_RECORD_NAME", "VLLM_ARCHITECTURE", "check_export", "checkpoint_name", "export_for_vllm",
           "llava_config", "vllm_state_dict", "weights_digest"]
