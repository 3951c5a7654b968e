"""Checkpoints of the split model, kept beside the model folder: what the model class gets from this package.

* `files.py`: file names, the model folder shipped as remote code, the checks made before any weight is read.
* `saving.py`: the full and adapter-only kinds (`save_checkpoint`).
* `loading.py`: strict loading of both kinds, of a plain LLaVA to convert, and the `Trainer`'s resume.
* `cards.py`: model cards.
* `mixin.py`: `AlignedVQCheckpointMixin`, the model class's base that wires the above into
  `from_pretrained` / `save_pretrained` / `push_to_hub` / `load_state_dict`.
"""

from .cards import card_eval_results, card_title, hub_reference, write_model_card
from .files import (
    ALIGNEDVQ_WEIGHTS_NAME,
    AUTO_MAP,
    FP32_TENSORS,
    LORA_SUBFOLDER,
    MODEL_FOLDER,
    REMOTE_CODE,
    REMOTE_CODE_FILES,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    check_tensor_dtypes,
    check_weight_files,
    checkpoint_files,
    flat_source,
    hub_kwargs_from,
    read_json,
    read_safetensors_header,
    weight_files,
)
from .loading import (
    apply_alignedvq_state,
    check_base_compatible,
    check_complete_load,
    check_loading_info,
    load_adapter_checkpoint,
    load_base,
    load_from_state_dict,
    load_full_checkpoint,
    load_llava,
    maybe_load_lora,
    maybe_load_ptq,
    module_state_dict,
    read_alignedvq_config,
)
from .saving import alignedvq_state_dict, save_checkpoint, write_edge, write_remote_code

__all__ = [
    "ALIGNEDVQ_WEIGHTS_NAME", "AUTO_MAP", "FP32_TENSORS", "LORA_SUBFOLDER", "MODEL_FOLDER", "REMOTE_CODE", "REMOTE_CODE_FILES",
    "WEIGHTS_INDEX_NAME", "WEIGHTS_NAME", "alignedvq_state_dict", "apply_alignedvq_state", "card_eval_results",
    "card_title", "check_base_compatible", "check_complete_load", "check_loading_info", "check_tensor_dtypes",
    "check_weight_files", "checkpoint_files", "flat_source", "hub_kwargs_from", "hub_reference", "load_adapter_checkpoint", "load_base",
    "load_from_state_dict", "load_full_checkpoint", "load_llava", "maybe_load_lora", "maybe_load_ptq",
    "module_state_dict", "read_alignedvq_config", "read_json", "read_safetensors_header", "save_checkpoint",
    "weight_files", "write_edge", "write_model_card", "write_remote_code",
]
