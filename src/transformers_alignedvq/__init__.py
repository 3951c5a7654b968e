"""transformers-alignedvq: AlignedVQ edge-cloud split inference for LLaVA-style models.

Where PyTorch and Transformers are installed, importing the package registers ``AlignedVQConfig`` (model type
``llava_alignedvq``) with ``AutoConfig`` and ``LlavaAlignedVQForConditionalGeneration`` with ``AutoModel`` and
``AutoModelForImageTextToText``, and teaches Transformers' checkpoint loader that llava-hf checkpoints map onto
it unchanged. On a device with only the ``edge`` extra (onnxruntime, numpy, Pillow, httpx) it imports nothing
heavy, and the edge modules (`client`, `edge_runtime`, `preprocess`, `wire`) work on their own.
"""

from importlib.util import find_spec as _find_spec
from pathlib import Path as _Path

from .errors import CheckpointMismatchError

__version__ = "0.1.0"

#: Path for `evaluate.load(...)`: VQA accuracy with the VQA-v2 answer normalisation.
VQA_ACCURACY_METRIC = str(_Path(__file__).parent / "metrics" / "vqa_accuracy")

# The AlignedVQ easy-VQA model shipped inside the package (built by examples/build_bundled_model.py): what
# the demo, the server and the client use when no model is named. Defined only when the build includes it.
if (_Path(__file__).parent / "assets" / "tiny-easyvqa" / "config.json").is_file():
    TINY_EASYVQA = str(_Path(__file__).parent / "assets" / "tiny-easyvqa")
    DEFAULT_MODEL = TINY_EASYVQA

__all__ = ["VQA_ACCURACY_METRIC", "CheckpointMismatchError"]

if _find_spec("torch") and _find_spec("transformers"):
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    from .alignedvq_layer import AlignedVQLayer, AlignedVQLayerOutput
    from .configuration_alignedvq import SPLIT_SITES, AlignedVQConfig
    from .dlp import DualLinearProjection
    from .modeling_alignedvq import (
        AlignedVQImageOutput,
        LlavaAlignedVQCausalLMOutputWithPast,
        LlavaAlignedVQForConditionalGeneration,
        LlavaAlignedVQModel,
    )
    from .quantizer import VectorQuantizer, bits_per_index

    AutoConfig.register(AlignedVQConfig.model_type, AlignedVQConfig, exist_ok=True)
    AutoModel.register(AlignedVQConfig, LlavaAlignedVQForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(AlignedVQConfig, LlavaAlignedVQForConditionalGeneration, exist_ok=True)

    __all__ += [
        "SPLIT_SITES",
        "AlignedVQConfig",
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
