"""The language-model side of an AlignedVQ checkpoint as the plain checkpoint of its base model, for vLLM.

vLLM runs LLaVA, LLaVA-NeXT, LLaVA-OneVision and Qwen2.5-VL from Hugging Face folders and knows nothing of
AlignedVQ. The cloud computes the image features itself (codebook lookup, output DLP, the rest of the vision
tower, the projector; for the tiled families also the packing, for Qwen2.5-VL the merger) and gives vLLM only
those, so vLLM needs the base model: `export_for_vllm` writes it, family by family (`FAMILIES`), with

* ``config.json``: the base model's config (``LlavaConfig``, ``LlavaNextConfig``, ``LlavaOnevisionConfig``,
  ``Qwen2_5_VLConfig``; `base_config`) with vLLM's architecture name and without the AlignedVQ fields;
* ``model.safetensors``: every base weight under a name both vLLM and Transformers load (`checkpoint_name`): the
  LLaVA families' llava-hf original names (``language_model.model.*``, ``language_model.lm_head.*``,
  ``multi_modal_projector.*``, ``vision_tower.vision_model.*``, ``image_newline``), Qwen2.5-VL's Transformers
  names (``model.language_model.*``, ``model.visual.*``, ``lm_head.*``); the codebook and DLP left out, a LoRA
  adapter merged into its weights (the model itself is not changed);
* the family's processor (`vllm_processor`: tokenizer, chat template, image processor), which vLLM builds at
  start-up to expand the image token and size its dummy inputs;
* ``alignedvq_export.json``: a SHA-256 digest of those weights, so a folder exported once (to storage every
  node of a cluster reads) is served only with the checkpoint it came from (`check_export`).

vLLM builds the vision tower and the projector of such a folder too and runs them only on its own dummy images at
start-up: requests bring precomputed image features. Nothing here imports vLLM.
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
_LLAVA_PREFIXES = (  # our module names -> llava-hf's original checkpoint names
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.image_newline", "image_newline"),  # the any-resolution families' row separator
)
# Qwen2.5-VL keeps Transformers' own names, which vLLM's Qwen2.5-VL maps itself.
_QWEN_PREFIXES = (("model.language_model.", "model.language_model."), ("model.visual.", "model.visual."),
                  ("lm_head.", "lm_head."))


@dataclasses.dataclass(frozen=True)
class VllmFamily:
    """What vLLM serves for one AlignedVQ family: the plain model (its ``model_type`` and vLLM's architecture
    name), where each of our weights goes, and the processor class vLLM builds from the folder."""

    model_type: str
    architecture: str
    processor: str
    prefixes: tuple[tuple[str, str], ...]


FAMILIES = {  # our config's model_type -> the plain model vLLM runs
    "llava_alignedvq": VllmFamily("llava", VLLM_ARCHITECTURE, "LlavaProcessor", _LLAVA_PREFIXES),
    "llava_next_alignedvq": VllmFamily("llava_next", "LlavaNextForConditionalGeneration", "LlavaNextProcessor",
                                       _LLAVA_PREFIXES),
    "llava_onevision_alignedvq": VllmFamily("llava_onevision", "LlavaOnevisionForConditionalGeneration",
                                            "LlavaOnevisionProcessor", _LLAVA_PREFIXES),
    "qwen2_5_vl_alignedvq": VllmFamily("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor",
                                       _QWEN_PREFIXES),
}


def vllm_family(config) -> VllmFamily:
    """The `VllmFamily` of an AlignedVQ config; ``ValueError`` for another model."""
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise ValueError(f"{type(config).__name__} is not an AlignedVQ config vLLM can serve (model types: "
                         f"{', '.join(FAMILIES)})")
    return family


def base_config(config):
    """The Transformers config of an AlignedVQ config's base model (`LlavaConfig`, `LlavaNextConfig`, ...): our
    fields dropped, vLLM's architecture name set."""
    import transformers

    family = vllm_family(config)
    parent = transformers.CONFIG_MAPPING[family.model_type]
    ours = {field.name for field in dataclasses.fields(type(config))} - {
        field.name for field in dataclasses.fields(parent)}
    values = config.to_dict()
    for key in (*ours, "model_type", "architectures", "auto_map", "transformers_version"):
        values.pop(key, None)
    base = parent(**values)
    base.architectures = [family.architecture]
    return base


def llava_config(config):
    """The `LlavaConfig` of an `AlignedVQConfig`'s base model (`base_config` of LLaVA-1.5)."""
    return base_config(config)


def checkpoint_name(name: str, family: VllmFamily = FAMILIES["llava_alignedvq"]) -> str | None:
    """The name vLLM loads one of our parameters under (llava-hf's original one for the LLaVA families); None
    for AlignedVQ's own."""
    if name.startswith("model.alignedvq."):
        return None
    if name.startswith("model.vision_tower."):
        rest = name[len("model.vision_tower."):]
        # Transformers releases differ in whether CLIPVisionModel nests its weights under `vision_model.`.
        return "vision_tower.vision_model." + rest.removeprefix("vision_model.")
    for ours, theirs in family.prefixes:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    raise ValueError(f"parameter {name!r} has no name in a {family.model_type} checkpoint for vLLM; is this an "
                     f"AlignedVQ {family.model_type} model?")


def _next_processor(model, cls, tokenizer, template):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    config, tile = model.config, model.config.vision_config.image_size
    images = LlavaNextImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                        image_grid_pinpoints=config.image_grid_pinpoints)
    has_cls = config.tokens_per_tile == (tile // config.vision_config.patch_size) ** 2 + 1
    return cls(image_processor=images, tokenizer=tokenizer, patch_size=config.vision_config.patch_size,
               vision_feature_select_strategy=config.vision_feature_select_strategy,
               num_additional_image_tokens=int(has_cls), chat_template=template)


def _onevision_processor(model, cls, tokenizer, template):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    config, tile = model.config, model.config.vision_config.image_size
    size = {"height": tile, "width": tile}
    images = LlavaOnevisionImageProcessorPil(size=size, image_grid_pinpoints=config.image_grid_pinpoints)
    # vLLM sizes a video at start-up even when none may come: its placeholder must be the model's one token.
    video_token = tokenizer.convert_ids_to_tokens(config.video_token_id)
    return cls(image_processor=images, video_processor=LlavaOnevisionVideoProcessor(size=size), tokenizer=tokenizer,
               num_image_tokens=(tile // config.vision_config.patch_size) ** 2, video_token=video_token,
               vision_feature_select_strategy=config.vision_feature_select_strategy, chat_template=template)


def _qwen_processor(model, cls, tokenizer, template, served):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from ..qwen import served_preprocessing

    settings = served_preprocessing(model, served)  # the pixel limits the server holds frames to
    sizes = {"patch_size": settings.patch_size, "merge_size": settings.merge_size,
             "temporal_patch_size": settings.temporal_patch_size}
    images = Qwen2VLImageProcessorPil(size={"shortest_edge": settings.min_pixels, "longest_edge": settings.max_pixels},
                                      **sizes)
    return cls(image_processor=images, video_processor=Qwen2VLVideoProcessor(**sizes), tokenizer=tokenizer,
               chat_template=template)


def vllm_processor(model, processor):
    """The processor written beside the weights, which vLLM builds as the family's processor class: ``processor``
    itself when it is of that class (or LLaVA-1.5's), else one of that class around its tokenizer and chat
    template, with an image processor making the model's tiles or patches. vLLM counts the image placeholders of
    precomputed features from their shape; it runs the image processor only on its own dummy images at start-up.
    The family processors of OneVision and Qwen2.5-VL hold a video processor, which needs torchvision."""
    import transformers

    family = vllm_family(model.config)
    cls = getattr(transformers, family.processor)
    if family.model_type == "llava" or isinstance(processor, cls):
        return processor
    tokenizer = getattr(processor, "tokenizer", processor)
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    if family.model_type == "llava_next":
        built = _next_processor(model, cls, tokenizer, template)
    elif family.model_type == "llava_onevision":
        built = _onevision_processor(model, cls, tokenizer, template)
    else:
        built = _qwen_processor(model, cls, tokenizer, template, processor)
    if built.image_token_id != model.config.image_token_id:
        raise ValueError(f"{family.processor} takes {built.image_token!r} (id {built.image_token_id}) for the image, "
                         f"the model's image token id is {model.config.image_token_id}")
    return built


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
    family = vllm_family(model.config)
    # Qwen2.5-VL's text config has no flag of its own (5.19 raises for it).
    tied = model.config.tie_word_embeddings or getattr(model.config.text_config, "tie_word_embeddings", False)
    tensors = {}
    with torch.no_grad():
        for name, value in merged_state_dict(model).items():
            target = checkpoint_name(name, family)
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
    """Write the plain checkpoint vLLM serves for an AlignedVQ model of any family (see the module docstring).

    Args:
        model_or_dir: an AlignedVQ model folder or Hub id (loaded strictly), or a loaded AlignedVQ model
            (``processor`` is then required).
        directory: the folder to write (created if needed).
        processor: the model's processor, or its tokenizer for the tiled families (default: the one saved with
            ``model_or_dir``); see `vllm_processor`.
        dtype: load a folder in this dtype (e.g. ``torch.bfloat16``); the weights are written as loaded.

    Returns the folder.
    """
    if isinstance(model_or_dir, (str, os.PathLike)):
        from .base import load_model  # as the server loads it: a folder may hold a tokenizer only

        model, served, tokenizer = load_model(model_or_dir, processor, None, dtype)
        processor = served or tokenizer
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
    base_config(model.config).save_pretrained(directory)
    vllm_processor(model, processor).save_pretrained(directory)
    record = {"weights_sha256": weights_digest(tensors), "codebook_fingerprint": model.codebook_fingerprint().hex()}
    (directory / EXPORT_RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return directory


__all__ = ["EXPORT_RECORD_NAME", "FAMILIES", "VLLM_ARCHITECTURE", "VllmFamily", "base_config", "check_export",
           "checkpoint_name", "export_for_vllm", "llava_config", "vllm_family", "vllm_processor", "vllm_state_dict",
           "weights_digest"]
