"""transformers-alignedvq: AlignedVQ edge-cloud split inference for LLaVA-style models.

Importing the package registers ``AlignedVQConfig`` (model type ``llava_alignedvq``) with ``AutoConfig`` and
``LlavaAlignedVQForConditionalGeneration`` with ``AutoModel`` and ``AutoModelForImageTextToText``, and
teaches Transformers' checkpoint loader that llava-hf checkpoints map onto it unchanged.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .alignedvq_layer import AlignedVQLayer, AlignedVQLayerOutput
from .configuration_alignedvq import SPLIT_SITES, AlignedVQConfig
from .dlp import DualLinearProjection
from .errors import CheckpointMismatchError
from .modeling_alignedvq import (
    AlignedVQImageOutput,
    LlavaAlignedVQCausalLMOutputWithPast,
    LlavaAlignedVQForConditionalGeneration,
    LlavaAlignedVQModel,
)
from .quantizer import VectorQuantizer, bits_per_index

__version__ = "0.1.0"

from pathlib import Path as _Path

#: Path for `evaluate.load(...)`: VQA accuracy with the VQA-v2 answer normalisation.
VQA_ACCURACY_METRIC = str(_Path(__file__).parent / "metrics" / "vqa_accuracy")

# The AlignedVQ easy-VQA model shipped inside the package (built by examples/build_bundled_model.py): what
# the demo and the server use when no model is named. Defined only when the build includes it.
if (_Path(__file__).parent / "assets" / "tiny-easyvqa" / "config.json").is_file():
    TINY_EASYVQA = str(_Path(__file__).parent / "assets" / "tiny-easyvqa")
    DEFAULT_MODEL = TINY_EASYVQA


def _register() -> None:
    AutoConfig.register(AlignedVQConfig.model_type, AlignedVQConfig, exist_ok=True)
    AutoModel.register(AlignedVQConfig, LlavaAlignedVQForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(AlignedVQConfig, LlavaAlignedVQForConditionalGeneration, exist_ok=True)



_register()

__all__ = [
    "SPLIT_SITES",
    "VQA_ACCURACY_METRIC",
    "AlignedVQConfig",
    "CheckpointMismatchError",
    "AlignedVQImageOutput",
    "AlignedVQLayer",
    "AlignedVQLayerOutput",
    "DualLinearProjection",
    "LlavaAlignedVQCausalLMOutputWithPast",
    "LlavaAlignedVQForConditionalGeneration",
    "LlavaAlignedVQModel",
    "VectorQuantizer",
    "bits_per_index",
]
