"""Checkpoints on disk and on the Hub: full and adapter-only kinds, edge-only downloads, model cards.

Two checkpoint kinds, both safetensors only:

* ``full``: every weight (``model.safetensors``, base names unchanged). A LoRA adapter is either merged into
  the weights or, unmerged, saved beside them in PEFT's format (``lora/adapter_config.json`` +
  ``lora/adapter_model.safetensors``) and re-applied on load.
* ``adapter``: only what AlignedVQ adds to a base LLaVA: ``alignedvq.safetensors`` (codebook, DLP; EMA state
  only if asked) and the LoRA adapter in PEFT's format (``lora/``), plus ``config.json`` naming the base
  checkpoint (``base_model_name_or_path``) and its revision. Loading fetches the base and applies the rest.

The LoRA files live in ``lora/``, not at the top: Transformers reads a top-level ``adapter_config.json`` in a
Hub repo as "this repo is a PEFT adapter" and loads the base named in it instead (``AutoModel`` and
``from_pretrained`` by repo id), which is not what either kind is.

A quantized model (`ptq.py`) saves as a full checkpoint with its quantizers beside the weights
(``ptq_config.json`` + ``ptq.safetensors``), re-applied strictly after loading.

Both kinds also carry the edge encoder (``edge_config.json``, ``edge_model.safetensors`` and the fp32
``edge_model.onnx`` a device runs without PyTorch) so a device can download only that (:func:`download_edge`),
the modeling source files with an ``auto_map`` (so ``trust_remote_code=True`` works without this package), and
a model card.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .edge_export import write_checkpoint_edge
from .edge_runtime import EDGE_FILES, download_edge  # noqa: F401 (re-exported; torch-free, for devices)
from .entropy import ENTROPY_MODEL_NAME, load_entropy_model  # noqa: F401 (re-exported)
from .errors import CheckpointMismatchError
from .lora import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, has_lora, load_lora, merge_lora_, save_lora
from .ptq import PTQ_CONFIG_NAME, PTQ_WEIGHTS_NAME, is_quantized, load_ptq, save_ptq
from .settings import SPLIT_SETTINGS, TRAINING_SETTINGS

ALIGNEDVQ_WEIGHTS_NAME = "alignedvq.safetensors"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
LORA_SUBFOLDER = "lora"
_ALIGNEDVQ_PREFIX = "model.alignedvq."
_EMA_BUFFERS = ("quantizer.cluster_size", "quantizer.embed_sum")
# The model folder is what a checkpoint carries for `trust_remote_code=True`: its files, copied as they are.
MODEL_FOLDER = Path(__file__).parent / "models" / "llava_alignedvq"
REMOTE_CODE_FILES = tuple(sorted(p.name for p in MODEL_FOLDER.glob("*.py") if p.name != "__init__.py"))
AUTO_MAP = {
    "AutoConfig": "configuration_alignedvq.AlignedVQConfig",
    "AutoModel": "modeling_alignedvq.LlavaAlignedVQForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_alignedvq.LlavaAlignedVQForConditionalGeneration",
}


# --------------------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------------------
def alignedvq_state_dict(model, *, include_ema_state: bool = False) -> dict[str, torch.Tensor]:
    """The tensors AlignedVQ adds (codebook, DLP, projections), under their model names."""
    state = {}
    for key, value in model.model.alignedvq.state_dict().items():
        if key in _EMA_BUFFERS and not include_ema_state:
            continue
        state[_ALIGNEDVQ_PREFIX + key] = value.detach().cpu().contiguous()
    return state


def _base_state_dict(model) -> dict[str, torch.Tensor]:
    """State dict under base-model names: LoRA wrappers' `base_layer.` removed, LoRA tensors kept under their
    own names (``...q_proj.lora_A.default.weight``), so the `Trainer`, which resumes by loading this file into
    the model it trains, restores them too (see `module_state_dict`)."""
    return {key.replace(".base_layer.", "."): value for key, value in model.state_dict().items()}


def module_state_dict(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` read from one of our weights files, renamed to ``model``'s own names: the files keep the
    llava-hf names (``language_model.model.*``, which Transformers renames on load) and base-weight names
    where a LoRA layer now wraps the module (``x.q_proj.weight`` -> ``x.q_proj.base_layer.weight``). Names
    that match nothing are kept, so the caller sees them as unexpected."""
    from transformers.core_model_loading import revert_weight_conversion

    own = model.state_dict(keep_vars=True)
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


def write_remote_code(directory: Path, config) -> None:
    """Copy the modeling sources next to the weights and point `auto_map` at them."""
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(MODEL_FOLDER / name, directory / name)
    config.auto_map = dict(AUTO_MAP)


def save_checkpoint(
    model,
    directory: str | os.PathLike,
    *,
    kind: str | None = None,
    merge_lora: bool = False,
    include_ema_state: bool | None = None,
    save_edge: bool | str = True,
    edge_calibration_images=None,
    eval_results: dict | None = None,
    save_function=None,
    **save_kwargs,
) -> Path:
    """Write ``model`` as a ``full`` or ``adapter`` checkpoint (default: ``model.config.checkpoint_kind``).

    Returns the directory. ``save_function`` is the stock `PreTrainedModel.save_pretrained` used for the
    full kind (the model class passes its parent's). ``include_ema_state`` defaults to True for the full kind
    (what the `Trainer` saves and resumes from: nothing restarts) and False for the adapter kind. ``save_edge``
    and ``edge_calibration_images``: which edge files to add (`edge_export.write_checkpoint_edge`: by default
    the PyTorch and the fp32 ONNX edge).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config
    kind = kind or config.checkpoint_kind
    if kind not in ("full", "adapter"):
        raise ValueError(f"kind={kind!r} must be 'full' or 'adapter'.")
    if merge_lora and has_lora(model):
        merge_lora_(model)
    lora = has_lora(model)
    quantized = is_quantized(model)
    if quantized and kind != "full":
        raise ValueError("A quantized model (transformers_alignedvq.ptq) saves as a full checkpoint only.")

    if include_ema_state is None:
        include_ema_state = kind == "full"
    original_kind = config.checkpoint_kind
    try:
        config.checkpoint_kind = kind
        write_remote_code(directory, config)
        if kind == "full":
            state = _base_state_dict(model)
            if not include_ema_state:
                state = {k: v for k, v in state.items() if k[len(_ALIGNEDVQ_PREFIX):] not in _EMA_BUFFERS}
            # The stock path writes only adapter weights when Transformers' PEFT integration added the layers;
            # we want every weight. A `state_dict` passed in (the Trainer passes the model's own) is replaced
            # by the one computed here, under base-model names.
            save_kwargs.pop("state_dict", None)
            integration = getattr(model, "_hf_peft_config_loaded", False)
            model._hf_peft_config_loaded = False
            try:
                save_function(model, str(directory), state_dict=state, **save_kwargs)
            finally:
                model._hf_peft_config_loaded = integration
            if quantized:  # after the weights: the quantizers are bound to those files' digests
                save_ptq(model, directory, weight_files(directory, {}))
        else:
            if not config.base_model_name_or_path:
                raise ValueError(
                    "An adapter-only checkpoint must name its base: set model.config.base_model_name_or_path "
                    "(and base_model_revision) to the LLaVA checkpoint it applies to."
                )
            save_file(
                alignedvq_state_dict(model, include_ema_state=include_ema_state),
                str(directory / ALIGNEDVQ_WEIGHTS_NAME),
                metadata={"format": "pt"},
            )
            config.save_pretrained(str(directory))
            if model.can_generate() and model.generation_config is not None:
                model.generation_config.save_pretrained(str(directory))
        if lora:
            save_lora(model, directory / LORA_SUBFOLDER)
        if save_edge:
            write_checkpoint_edge(model, directory, save_edge, calibration_images=edge_calibration_images)
        write_model_card(model, directory, kind=kind, eval_results=eval_results)
    finally:
        config.checkpoint_kind = original_kind
    return directory


# --------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------
_ARCHITECTURE_FIELDS = (
    ("vision_config", "hidden_size"),
    ("vision_config", "num_hidden_layers"),
    ("vision_config", "image_size"),
    ("vision_config", "patch_size"),
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


def _resolve(path_or_id, filename: str, hub_kwargs: dict, *, required: bool = True) -> str | None:
    from transformers.utils import cached_file

    return cached_file(
        path_or_id, filename, _raise_exceptions_for_missing_entries=required, **hub_kwargs
    )


_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "subfolder")


def hub_kwargs_from(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}


def load_adapter_checkpoint(cls, path_or_id, config, **kwargs):
    """Build the model an adapter-only checkpoint describes: base LLaVA + codebook/DLP + LoRA."""
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
    model = cls.from_llava(base, load_kwargs=load_kwargs, **options)
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


# --------------------------------------------------------------------------------------------------------
# strict loading
# --------------------------------------------------------------------------------------------------------
# Kept in fp32 whatever the model's dtype (see `VectorQuantizer._apply`).
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
FP32_TENSORS = frozenset(_ALIGNEDVQ_PREFIX + "quantizer." + name for name in ("codebook", "cluster_size", "embed_sum"))


def read_safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """``{tensor name: {"dtype", "shape", "data_offsets"}}`` of a safetensors file, after checking that the
    file holds exactly the bytes its header describes. Reads only the header."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < length <= size - 8:
            raise CheckpointMismatchError(f"{path.name} is truncated or not a safetensors file ({size} bytes)")
        try:
            header = json.loads(handle.read(length))
            header.pop("__metadata__", None)
            end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
            [(entry["dtype"], entry["shape"]) for entry in header.values()]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise CheckpointMismatchError(f"{path.name} has a corrupt safetensors header: {exc}") from None
    if 8 + length + end != size:
        raise CheckpointMismatchError(
            f"{path.name} is truncated or corrupt: its header describes {8 + length + end} bytes, the file has {size}"
        )
    return header


def check_tensor_dtypes(dtypes: dict[str, str], *, source: str) -> None:
    """Every tensor in one floating dtype (the checkpoint's storage dtype), the codebook state in fp32."""
    wrong = [f"{name} ({dtype}, must be F32)" for name, dtype in dtypes.items() if name in FP32_TENSORS and dtype != "F32"]
    rest = {name: dtype for name, dtype in dtypes.items() if name not in FP32_TENSORS}
    counts: dict[str, int] = {}
    for dtype in rest.values():
        counts[dtype] = counts.get(dtype, 0) + 1
    storage = max(counts, key=counts.get, default="F32")
    if storage not in ("F32", "F16", "BF16", "F64"):
        wrong.append(f"every weight is {storage}, not a floating dtype")
    wrong += [f"{name} ({dtype}, the others are {storage})" for name, dtype in rest.items() if dtype != storage]
    if wrong:
        raise CheckpointMismatchError(f"{source} holds mis-typed tensors: {', '.join(sorted(wrong)[:5])}")


def weight_files(path_or_id, hub_kwargs: dict) -> list[str]:
    """Local paths of a checkpoint's safetensors weights (one file, or the shards its index names)."""
    single = _resolve(path_or_id, WEIGHTS_NAME, hub_kwargs, required=False)
    if single is not None:
        return [single]
    index = _resolve(path_or_id, WEIGHTS_INDEX_NAME, hub_kwargs, required=False)
    if index is None:
        raise CheckpointMismatchError(
            f"{path_or_id} has neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME}: AlignedVQ checkpoints are safetensors only"
        )
    try:
        shards = sorted(set(read_json(index)["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointMismatchError(f"{WEIGHTS_INDEX_NAME} of {path_or_id} is corrupt: {exc}") from None
    return [_resolve(path_or_id, shard, hub_kwargs) for shard in shards]


def check_weight_files(path_or_id, hub_kwargs: dict) -> set[str]:
    """Raise `CheckpointMismatchError` for a truncated or corrupt weights file or a mis-typed tensor; return
    the tensor names."""
    dtypes = {}
    for path in weight_files(path_or_id, hub_kwargs):
        dtypes.update({name: entry["dtype"] for name, entry in read_safetensors_header(path).items()})
    check_tensor_dtypes(dtypes, source=str(path_or_id))
    return set(dtypes)


def load_from_state_dict(load, config, *model_args, **kwargs):
    """``from_pretrained(None, config=..., state_dict=...)``, Transformers' own path for weights in memory,
    with the loading report checked as strictly as a folder's."""
    from .models.llava_alignedvq.configuration_alignedvq import AlignedVQConfig

    if not isinstance(config, AlignedVQConfig) or kwargs.get("state_dict") is None:
        raise CheckpointMismatchError(
            "from_pretrained(None, ...) needs config=AlignedVQConfig(...) and state_dict=... (or a folder or Hub id)"
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


def read_alignedvq_config(path_or_id, kwargs: dict):
    """The `AlignedVQConfig` of a saved AlignedVQ checkpoint; a plain LLaVA checkpoint is refused."""
    from .models.llava_alignedvq.configuration_alignedvq import AlignedVQConfig

    values, _ = AlignedVQConfig.get_config_dict(path_or_id, **hub_kwargs_from(kwargs))
    model_type = values.get("model_type")
    if model_type != AlignedVQConfig.model_type:
        raise CheckpointMismatchError(
            f"{path_or_id} is a {model_type!r} checkpoint, not an AlignedVQ one. Convert it with "
            f"LlavaAlignedVQForConditionalGeneration.from_llava({str(path_or_id)!r}, split_layer=..., "
            "codebook_size=...), then init_codebook and finetune."
        )
    return AlignedVQConfig.from_dict(values)


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
    """A plain `LlavaForConditionalGeneration` to convert. Its safetensors files are checked as ours are, and
    a checkpoint that leaves weights uninitialised is refused."""
    from transformers import LlavaForConditionalGeneration

    check_weight_files(path_or_id, hub_kwargs_from(load_kwargs))
    model, info = LlavaForConditionalGeneration.from_pretrained(path_or_id, output_loading_info=True, **load_kwargs)
    check_loading_info({"missing_keys": info.get("missing_keys", ())}, source=str(path_or_id))
    return model


# --------------------------------------------------------------------------------------------------------
# model cards
# --------------------------------------------------------------------------------------------------------
TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"


def write_model_card(
    model, directory: Path, *, kind: str, eval_results: dict | None = None, model_name: str | None = None
) -> Path:
    """README.md with Hub metadata and the AlignedVQ settings (and evaluation results when known)."""
    from huggingface_hub import ModelCard, ModelCardData

    from .wire import bits_per_index

    config = model.config
    bits = bits_per_index(config.codebook_size) * config.codes_per_token
    tokens = config.num_image_tokens
    base = config.base_model_name_or_path
    eval_results = eval_results or getattr(model, "alignedvq_eval_results", None) or {}
    model_name = model_name or eval_results.get("model_name") or card_title(config)
    card_data = ModelCardData(
        model_name=model_name,
        base_model=base if base and hub_reference(base)[0] == base else None,  # the Hub's field takes repo ids
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=["alignedvq", "llava", "vector-quantization", "edge-cloud", "split-inference"],
        datasets=eval_results.get("datasets"),
        license=eval_results.get("license", "apache-2.0"),
        eval_results=card_eval_results(eval_results) or None,
    )
    files = sorted(name for name in checkpoint_files(directory) if name != "README.md")
    template = TEMPLATE_PATH.read_text() if TEMPLATE_PATH.is_file() else None
    card = ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=model_name,
        kind=kind,
        base_model=base,
        base_model_revision=config.base_model_revision,
        split_layer=config.split_layer,
        split_site=config.split_site,
        codebook_size=config.codebook_size,
        num_codebooks=config.num_codebooks,
        num_groups=config.num_groups,
        use_dlp=config.use_dlp,
        bits_per_token=bits,
        num_tokens=tokens,
        bytes_per_image=(tokens * bits + 7) // 8,
        results=eval_results.get("results"),
        files=files,
    )
    path = directory / "README.md"
    card.save(str(path))
    return path


def card_title(config) -> str:
    """The card's title from the model: its base and where it is split (a folder's name, such as a Trainer's
    ``checkpoint-500``, says nothing)."""
    base = hub_reference(config.base_model_name_or_path)[0] if config.base_model_name_or_path else None
    name = base.split("/")[-1] if base else "LLaVA"
    return f"{name} AlignedVQ (block {config.split_layer} {config.split_site}, {config.codebook_size} codewords)"


def card_eval_results(eval_results: dict) -> list:
    """``eval_results["results"]`` as the Hub's ``model-index`` entries (visual question answering on the
    first of ``eval_results["datasets"]``)."""
    from huggingface_hub import EvalResult

    datasets = eval_results.get("datasets") or ["custom"]
    return [
        EvalResult(task_type="visual-question-answering", dataset_type=datasets[0], dataset_name=datasets[0],
                   metric_type="accuracy" if "accuracy" in name.lower() else name, metric_name=name,
                   metric_value=value)
        for name, value in (eval_results.get("results") or {}).items()
        if isinstance(value, (int, float))
    ]


def hub_reference(name_or_path) -> tuple[str | None, str | None]:
    """``(repo_id, revision)`` of a checkpoint named by Hub id or by a folder of the Hub cache
    (``.../models--ORG--NAME/snapshots/COMMIT``); ``(None, None)`` for any other local folder."""
    text = str(name_or_path)
    path = Path(text)
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name[len("models--"):].replace("--", "/"), path.name
    if path.exists() or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text):
        return None, None
    return text, None


def checkpoint_files(directory: str | os.PathLike) -> dict[str, int]:
    """Name -> size in bytes of every file a checkpoint folder holds (what an upload would send)."""
    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def read_json(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())
