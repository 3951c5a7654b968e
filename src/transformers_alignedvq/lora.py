"""LoRA adapters in the language model, through PEFT's own functions.

We call PEFT directly (`inject_adapter_in_model`, `get_peft_model_state_dict`, `set_peft_model_state_dict`)
rather than Transformers' PEFT integration (`model.add_adapter` / `load_adapter`): the integration's minimum
PEFT version moves with each Transformers release (5.24 asks for a PEFT newer than any published one), while
PEFT's functions are PEFT's stable API. A model that got its adapter from `model.add_adapter` works here too:
both keep the adapter's config in ``model.peft_config``.

On disk an adapter is PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys under
``base_model.model.``, as `peft.PeftModel.save_pretrained` writes them, loadable by PEFT on the same base.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointMismatchError

ADAPTER_NAME = "default"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


def lora_config(model):
    """The `peft.LoraConfig` of the adapter injected into ``model``, or None."""
    configs = getattr(model, "peft_config", None) or {}
    return configs.get(ADAPTER_NAME) or next(iter(configs.values()), None)


def has_lora(model) -> bool:
    return lora_config(model) is not None


def _adapter_name(model) -> str:
    configs = model.peft_config
    return ADAPTER_NAME if ADAPTER_NAME in configs else next(iter(configs))


def add_lora(model, config) -> None:
    """Inject fresh LoRA layers described by ``config`` (a `peft.LoraConfig`) into ``model`` in place."""
    from peft import inject_adapter_in_model

    if has_lora(model):
        raise ValueError("The model already carries a LoRA adapter; merge it (merge_lora) before adding another.")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)


def lora_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's on-disk names (``base_model.model.<module>.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=_adapter_name(model))
    return {_PEFT_PREFIX + key: value.detach() for key, value in state.items()}


def save_lora(model, directory: str | os.PathLike) -> Path:
    """Write the injected adapter in PEFT's format into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.cpu().contiguous() for key, value in lora_state_dict(model).items()}
    save_file(state, str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    lora_config(model).save_pretrained(str(directory))
    return directory


def load_lora(model, directory: str | os.PathLike) -> None:
    """Inject the adapter saved in ``directory`` and load its weights; every tensor must fit exactly."""
    from peft import LoraConfig, set_peft_model_state_dict

    directory = Path(directory)
    try:
        config = LoraConfig.from_pretrained(str(directory))
        state = load_file(str(directory / ADAPTER_WEIGHTS_NAME))
    except Exception as exc:  # PEFT and safetensors raise their own types for unreadable files
        raise CheckpointMismatchError(f"the LoRA adapter in {directory} cannot be read: {exc}") from exc
    config.inference_mode = False
    add_lora(model, config)
    expected = set(lora_state_dict(model))
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"the LoRA adapter in {directory} does not fit this model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    state = {key[len(_PEFT_PREFIX):]: value for key, value in state.items()}
    set_peft_model_state_dict(model, state, adapter_name=_adapter_name(model))


def enable_lora(model, enabled: bool = True) -> None:
    """Switch the injected adapter on or off (off: the model computes exactly its base weights)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(enabled)


def merge_lora_(model) -> None:
    """Merge every injected LoRA layer into its base weight and remove the adapter from the model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    model._hf_peft_config_loaded = False
    if hasattr(model, "peft_config"):
        del model.peft_config


__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "add_lora",
    "enable_lora",
    "has_lora",
    "load_lora",
    "lora_config",
    "lora_state_dict",
    "merge_lora_",
    "save_lora",
]
