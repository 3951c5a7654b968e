"""Reading our checkpoints, strictly: a tensor missing, unexpected, mis-shaped or mis-typed, a truncated file, or
an adapter whose base has another architecture raises `CheckpointMismatchError` naming it; nothing is left at
its random initialisation. Also the `Trainer`'s way back in (`module_state_dict`, `check_complete_load`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import CheckpointMismatchError
from ..lora import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, has_lora, load_lora
from ..ptq import PTQ_CONFIG_NAME, PTQ_WEIGHTS_NAME, load_ptq
from ..settings import SPLIT_SETTINGS, TRAINING_SETTINGS
from .files import (
    _ALIGNEDVQ_PREFIX,
    _EMA_BUFFERS,
    _HUB_KWARGS,
    _SAFETENSORS_DTYPES,
    ALIGNEDVQ_WEIGHTS_NAME,
    LORA_SUBFOLDER,
    _resolve,
    check_tensor_dtypes,
    check_weight_files,
    hub_kwargs_from,
    weight_files,
)


def module_state_dict(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` read from one of our weights files, renamed to ``model``'s own names: the files keep the
    llava-hf names (``language_model.model.*``, which Transformers renames on load) and base-weight names
    where a LoRA layer now wraps the module (``x.q_proj.weight`` -> ``x.q_proj.base_layer.weight``). Names
    that match nothing are kept, so the caller sees them as unexpected."""
    from transformers.core_model_loading import revert_weight_conversion

    own = model.state_dict(keep_vars=True)
    if all(key in own for key in state):  # already the model's names (PEFT loading an adapter, a user's dict)
        return state
    module_of = {id(tensor): key for key, tensor in own.items()}
    saved_names = revert_weight_conversion(model, {key.replace(".base_layer.", "."): own[key] for key in own})
    to_module = {name: module_of[id(tensor)] for name, tensor in saved_names.items() if id(tensor) in module_of}
    return {key if key in own else to_module.get(key, key): value for key, value in state.items()}


def check_complete_load(model, state: dict[str, torch.Tensor], result) -> None:
    """After ``model.load_state_dict(state, strict=False)`` of one of our whole-model checkpoints (the
    `Trainer` resuming, `load_best_model_at_end`): raise `CheckpointMismatchError` if a tensor of the model
    kept its fresh value or one of the checkpoint was dropped. Partial state dicts (PEFT loading an adapter)
    are not checked."""
    if not any(key.startswith(_ALIGNEDVQ_PREFIX) for key in state):
        return
    own = model.state_dict(keep_vars=True)
    loaded = {own[key].data_ptr() for key in own if key in state}
    missing = sorted(key for key in result.missing_keys if own[key].data_ptr() not in loaded)  # tied copies load
    unexpected = sorted(result.unexpected_keys)
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"The checkpoint does not fit the model it is loaded into: missing {missing[:5]}"
            f"{f' and {len(missing) - 5} more' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}. "
            "Resuming would continue from fresh values; prepare the model as the checkpoint was trained "
            "(prepare_for_finetuning with the same LoRA settings) before resuming."
        )




_ARCHITECTURE_FIELDS = (
    ("vision_config", "hidden_size"),
    ("vision_config", "num_hidden_layers"),
    ("vision_config", "image_size"),
    ("vision_config", "patch_size"),
    ("vision_config", "depth"),  # Qwen2.5-VL's tower counts its blocks here
    ("text_config", "hidden_size"),
    ("text_config", "num_hidden_layers"),
    ("text_config", "vocab_size"),
)


def check_base_compatible(config, base_config) -> None:
    """Raise `CheckpointMismatchError` if ``base_config`` is not the architecture ``config`` was made for."""
    wrong = []
    for sub, field in _ARCHITECTURE_FIELDS:
        ours = getattr(getattr(config, sub), field, None)
        theirs = getattr(getattr(base_config, sub, None), field, None)
        if ours != theirs:
            wrong.append(f"{sub}.{field}: adapter expects {ours}, base has {theirs}")
    if wrong:
        raise CheckpointMismatchError(
            f"The base model {config.base_model_name_or_path!r} does not match this AlignedVQ adapter ("
            + "; ".join(wrong)
            + "). Load the adapter onto the base it was trained on."
        )


def load_adapter_checkpoint(cls, path_or_id, config, **kwargs):
    """Build the model an adapter-only checkpoint describes: its base (converted by ``cls._convert_base``, LLaVA's
    `from_llava` or another family's `from_base`) + codebook/DLP + LoRA."""
    from transformers import AutoConfig

    hub_kwargs = hub_kwargs_from(kwargs)
    base = config.base_model_name_or_path
    if not base:
        raise CheckpointMismatchError("This adapter checkpoint's config does not name its base model.")
    base_kwargs = {k: v for k, v in hub_kwargs.items() if k not in ("revision", "subfolder")}
    if config.base_model_revision:
        base_kwargs["revision"] = config.base_model_revision
    check_base_compatible(config, AutoConfig.from_pretrained(base, **base_kwargs))

    weights_path = _resolve(path_or_id, ALIGNEDVQ_WEIGHTS_NAME, hub_kwargs)
    try:
        state = load_file(weights_path)
    except Exception as exc:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointMismatchError(f"{ALIGNEDVQ_WEIGHTS_NAME} cannot be read (truncated or corrupt?): {exc}") from exc

    # `adapter_kwargs` (added by AutoModel, with the revision it resolved for *this* repo) describe this
    # checkpoint, whose LoRA `maybe_load_lora` applies below; passed on to the base load they would make
    # Transformers look the base up at this repo's commit.
    load_kwargs = {k: v for k, v in kwargs.items() if k not in _HUB_KWARGS and k not in ("config", "adapter_kwargs")}
    load_kwargs.update(base_kwargs)
    options = {key: getattr(config, key) for key in SPLIT_SETTINGS + TRAINING_SETTINGS}
    model = cls._convert_base(base, load_kwargs=load_kwargs, **options)
    apply_alignedvq_state(model, state)
    model.config.checkpoint_kind = "adapter"
    model.config.base_model_name_or_path = base
    model.config.base_model_revision = config.base_model_revision
    maybe_load_lora(model, path_or_id, kwargs)
    return model.eval()


def apply_alignedvq_state(model, state: dict[str, torch.Tensor]) -> None:
    """Load codebook/DLP tensors into ``model``; EMA state is optional (rebuilt from the codebook if absent)."""
    layer = model.model.alignedvq
    own = layer.state_dict()
    local = {k[len(_ALIGNEDVQ_PREFIX):]: v for k, v in state.items() if k.startswith(_ALIGNEDVQ_PREFIX)}
    unexpected = sorted(set(local) - set(own)) + sorted(k for k in state if not k.startswith(_ALIGNEDVQ_PREFIX))
    missing = sorted(set(own) - set(local) - set(_EMA_BUFFERS))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{ALIGNEDVQ_WEIGHTS_NAME} does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    check_tensor_dtypes({k: _SAFETENSORS_DTYPES.get(v.dtype, str(v.dtype)) for k, v in state.items()},
                        source=ALIGNEDVQ_WEIGHTS_NAME)
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in local.items() if v.shape != own[k].shape]
    if wrong:
        raise CheckpointMismatchError(
            f"{ALIGNEDVQ_WEIGHTS_NAME} holds tensors of other shapes than the config describes "
            f"(a codebook for another model?): {wrong[:5]}."
        )
    with torch.no_grad():
        for key, value in local.items():
            own[key].copy_(value)
        quantizer = layer.quantizer
        if "quantizer.embed_sum" not in local:
            quantizer.cluster_size.fill_(1.0)
            quantizer.embed_sum.copy_(quantizer.codebook)


def maybe_load_lora(model, path_or_id, kwargs: dict) -> None:
    """Re-apply an unmerged LoRA adapter saved beside the weights (in ``lora/``)."""
    if has_lora(model):  # Transformers' loader already applied an adapter (e.g. given as `adapter_kwargs`)
        return
    hub_kwargs = hub_kwargs_from(kwargs)
    config_path = _resolve(path_or_id, f"{LORA_SUBFOLDER}/{ADAPTER_CONFIG_NAME}", hub_kwargs, required=False)
    if config_path is None:
        return
    # Both files land in the same local folder (the checkpoint's `lora/` or its Hub cache snapshot).
    weights_path = _resolve(path_or_id, f"{LORA_SUBFOLDER}/{ADAPTER_WEIGHTS_NAME}", hub_kwargs, required=False)
    if weights_path is None:
        raise CheckpointMismatchError(
            f"{path_or_id} has {LORA_SUBFOLDER}/{ADAPTER_CONFIG_NAME} but no {LORA_SUBFOLDER}/{ADAPTER_WEIGHTS_NAME}"
        )
    load_lora(model, Path(weights_path).parent)


def load_from_state_dict(load, config, *model_args, config_class=None, **kwargs):
    """``from_pretrained(None, config=..., state_dict=...)``, Transformers' own path for weights in memory,
    with the loading report checked as strictly as a folder's."""
    if config_class is None:
        from ..models.llava_alignedvq.configuration_alignedvq import AlignedVQConfig as config_class

    if not isinstance(config, config_class) or kwargs.get("state_dict") is None:
        raise CheckpointMismatchError(
            f"from_pretrained(None, ...) needs config={config_class.__name__}(...) and state_dict=... (or a folder or "
            "Hub id)"
        )
    want_info = kwargs.pop("output_loading_info", False)
    model, info = load(None, *model_args, config=config, output_loading_info=True, **kwargs)
    check_loading_info(info, source="state_dict")
    return (model, info) if want_info else model


def check_loading_info(info: dict, *, source: str, allowed_missing=()) -> None:
    """Raise `CheckpointMismatchError` naming the tensors if Transformers' loading report shows any missing
    (left at their random initialisation), unexpected or mis-shaped tensor, or any loading error."""
    problems = []
    missing = sorted(set(info.get("missing_keys", ())) - set(allowed_missing))
    if missing:
        problems.append(f"missing {missing[:5]}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    unexpected = sorted(info.get("unexpected_keys", ()))
    if unexpected:
        problems.append(f"unexpected {unexpected[:5]}")
    mismatched = sorted(info.get("mismatched_keys", ()))
    if mismatched:
        problems.append(f"of another shape {[m[0] if isinstance(m, tuple) else m for m in mismatched][:5]}")
    errors = list(info.get("error_msgs", ())) + list(dict(info.get("conversion_errors", {}) or {}).values())
    if errors:
        problems.append(f"errors {errors[:3]}")
    if problems:
        raise CheckpointMismatchError(f"{source} does not fit the model: tensors " + "; ".join(problems))


def read_alignedvq_config(path_or_id, kwargs: dict, config_class=None):
    """The config (``config_class``, default `AlignedVQConfig`) of a saved AlignedVQ checkpoint of that family; a
    plain checkpoint, or one of another family, is refused with the way to convert it."""
    if config_class is None:
        from ..models.llava_alignedvq.configuration_alignedvq import AlignedVQConfig as config_class

    values, _ = config_class.get_config_dict(path_or_id, **hub_kwargs_from(kwargs))
    model_type = values.get("model_type")
    if model_type != config_class.model_type:
        convert = (f"LlavaAlignedVQForConditionalGeneration.from_llava({str(path_or_id)!r}, split_layer=..., "
                   "codebook_size=...)" if config_class.model_type == "llava_alignedvq" else
                   f"transformers_alignedvq.from_vlm({str(path_or_id)!r}, split_layer=..., codebook_size=...)")
        raise CheckpointMismatchError(
            f"{path_or_id} is a {model_type!r} checkpoint, not an AlignedVQ one of type {config_class.model_type!r}. "
            f"Convert it with {convert}, then init_codebook and finetune."
        )
    return config_class.from_dict(values)


def load_full_checkpoint(load, path_or_id, config, *model_args, **kwargs):
    """A full AlignedVQ checkpoint through ``load`` (the stock `from_pretrained`), strictly: the weights
    files are checked before they are read, and the loading report after."""
    want_info = kwargs.pop("output_loading_info", False)
    # Transformers raises an untyped error on a mis-shaped tensor; asked to go on, it reports it to us instead.
    user_ignores_shapes = kwargs.pop("ignore_mismatched_sizes", False)
    names = check_weight_files(path_or_id, hub_kwargs_from(kwargs))
    lora_names = {name for name in names if ".lora_" in name}
    if lora_names and _resolve(path_or_id, f"{LORA_SUBFOLDER}/{ADAPTER_CONFIG_NAME}", hub_kwargs_from(kwargs),
                               required=False) is None:
        raise CheckpointMismatchError(
            f"{path_or_id} holds LoRA tensors but no {LORA_SUBFOLDER}/{ADAPTER_CONFIG_NAME} saying where they go"
        )
    model, info = load(path_or_id, *model_args, config=config, output_loading_info=True,
                       ignore_mismatched_sizes=True, **kwargs)
    if user_ignores_shapes:
        info = {**info, "mismatched_keys": ()}
    if lora_names:  # the unmerged LoRA is applied from lora/ below (same values: both come from one save)
        info = {**info, "unexpected_keys": [k for k in info.get("unexpected_keys", ()) if ".lora_" not in k]}
    check_loading_info(info, source=str(path_or_id))
    maybe_load_lora(model, path_or_id, kwargs)
    maybe_load_ptq(model, path_or_id, kwargs)
    return (model, info) if want_info else model


def maybe_load_ptq(model, path_or_id, kwargs: dict) -> None:
    """Re-apply post-training quantizers saved beside the weights (`ptq.py`), strictly."""
    hub_kwargs = hub_kwargs_from(kwargs)
    config_path = _resolve(path_or_id, PTQ_CONFIG_NAME, hub_kwargs, required=False)
    if config_path is None:
        return
    weights_path = _resolve(path_or_id, PTQ_WEIGHTS_NAME, hub_kwargs, required=False)
    load_ptq(model, config_path, weights_path, weight_files(path_or_id, hub_kwargs))


def load_llava(path_or_id, **load_kwargs):
    """A plain `LlavaForConditionalGeneration` to convert (`load_base`)."""
    from transformers import LlavaForConditionalGeneration

    return load_base(LlavaForConditionalGeneration, path_or_id, **load_kwargs)


def load_base(model_class, path_or_id, **load_kwargs):
    """A plain ``model_class`` (the family's Transformers class) to convert. Its safetensors files are checked as
    ours are, and a checkpoint that leaves weights uninitialised is refused."""
    check_weight_files(path_or_id, hub_kwargs_from(load_kwargs))
    model, info = model_class.from_pretrained(path_or_id, output_loading_info=True, **load_kwargs)
    check_loading_info({"missing_keys": info.get("missing_keys", ())}, source=str(path_or_id))
    return model


__all__ = [
    "apply_alignedvq_state",
    "check_base_compatible",
    "check_complete_load",
    "check_loading_info",
    "load_adapter_checkpoint",
    "load_base",
    "load_from_state_dict",
    "load_full_checkpoint",
    "load_llava",
    "maybe_load_lora",
    "maybe_load_ptq",
    "module_state_dict",
    "read_alignedvq_config",
]
