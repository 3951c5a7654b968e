"""Writing our checkpoints: the full and adapter-only kinds, safetensors only, with the model folder as remote
code, the LoRA in PEFT's format, post-training quantizers, the edge files and a model card.

A full checkpoint holds every weight under its base-model name, an unmerged LoRA both in ``lora/`` (PEFT's
format) and in the weights file (where the `Trainer` resumes from), and the EMA state unless asked not to.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..export.edge_export import CHECKPOINT_EDGE_MODES, onnx_export_available, write_checkpoint_edge
from ..lora import has_lora, merge_lora_, save_lora
from ..ptq import is_quantized, save_ptq
from .cards import write_model_card
from .files import (
    _ALIGNEDVQ_PREFIX,
    _EMA_BUFFERS,
    ALIGNEDVQ_WEIGHTS_NAME,
    LORA_SUBFOLDER,
    REMOTE_CODE,
    flat_source,
    weight_files,
)


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


def write_remote_code(directory: Path, config) -> None:
    """Copy the modeling sources next to the weights and point `auto_map` at them: the family's folder,
    flattened with the modules it shares (`files.RemoteCode`; LLaVA's folder shares none and comes out as it is)."""
    code = REMOTE_CODE[config.model_type]
    for name, source in code.sources().items():
        (directory / name).write_text(flat_source(source))
    config.auto_map = code.auto_map()


def _family(model) -> str:
    return getattr(getattr(model.model, "adapter", None), "name", "llava")


def check_edge_mode(model, mode: bool | str, calibration_images=None) -> str:
    """``mode`` as the name `write_edge` uses for a family other than LLaVA (whose edge export checks its own);
    `ValueError` before anything is written for a mode the family's edge has not."""
    mode = "onnx" if mode is True else mode
    if mode not in CHECKPOINT_EDGE_MODES:
        raise ValueError(f"save_edge={mode!r} must be True, False or one of {CHECKPOINT_EDGE_MODES}")
    if mode == "int8" and calibration_images is None:
        raise ValueError("save_edge='int8' needs edge_calibration_images (real images the edge will see)")
    if _family(model) == "qwen2_5_vl" and mode != "onnx":
        raise ValueError(f"save_edge={mode!r}: the Qwen2.5-VL edge is written as fp32 ONNX only (save_edge=True)")
    return mode


def write_edge(model, directory: Path, mode: bool | str = True, *, calibration_images=None) -> None:
    """The edge files of ``model``'s family beside its weights (``mode`` as for
    `edge_export.write_checkpoint_edge`): LLaVA's edge; the tiled families' per-tile edge (`export_tiled_edge`:
    ``edge_config.json`` with the tiling, ``edge_model.safetensors`` and, but for ``"safetensors"``,
    ``edge_model.onnx``); Qwen2.5-VL's windowed ONNX edge (`export_qwen_edge`: ``qwen_edge.onnx`` and
    ``qwen_edge.json``), which has no PyTorch form and no int8 front."""
    family = _family(model)
    if family == "llava":
        write_checkpoint_edge(model, directory, mode, calibration_images=calibration_images)
        return
    mode = check_edge_mode(model, mode, calibration_images)
    if family != "qwen2_5_vl":
        from ..export.tiled_edge import export_tiled_edge

        export_tiled_edge(model, directory, format="safetensors")
        if mode == "safetensors":
            return
    if not onnx_export_available(directory, mode):
        return
    if family == "qwen2_5_vl":
        from ..export.qwen_edge_onnx import export_qwen_edge

        export_qwen_edge(model, directory)
    else:
        export_tiled_edge(model, directory, format="onnx", int8=mode == "int8", calibration_images=calibration_images)


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

    if save_edge and _family(model) != "llava":
        check_edge_mode(model, save_edge, edge_calibration_images)
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
                    "(and base_model_revision) to the base checkpoint it applies to."
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
            write_edge(model, directory, save_edge, calibration_images=edge_calibration_images)
        write_model_card(model, directory, kind=kind, eval_results=eval_results)
    finally:
        config.checkpoint_kind = original_kind
    return directory


__all__ = [
    "alignedvq_state_dict",
    "check_edge_mode",
    "save_checkpoint",
    "write_edge",
    "write_remote_code",
]
