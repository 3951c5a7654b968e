"""transformers-alignedvq: AlignedVQ edge-cloud split inference for LLaVA-style models.

Where PyTorch and Transformers are installed, importing the package registers ``AlignedVQConfig`` (model type
``llava_alignedvq``) with ``AutoConfig`` and ``LlavaAlignedVQForConditionalGeneration`` with ``AutoModel`` and
``AutoModelForImageTextToText``, and teaches Transformers' checkpoint loader that llava-hf checkpoints map onto
it unchanged. On a device with only the ``edge`` extra (onnxruntime, numpy, Pillow, httpx) it imports nothing
heavy, and the edge modules (`client`, `edge_runtime`, `preprocess`, `wire`) work on their own.
"""

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


def _installed_cloud_side() -> bool:
    """Whether torch and transformers import (the [cloud] extra); False on an edge install."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name in ("torch", "transformers"):
            return False
        raise
    return True


def _check_cloud_versions() -> None:
    """A base install does not pin Transformers (the [cloud] extra does): refuse an untested release here."""
    from importlib.metadata import version

    installed = version("transformers")
    numbers = tuple(int(part) for part in installed.split(".")[:3] if part.isdigit())
    if not (5, 16, 1) <= numbers < (6,):
        raise ImportError(
            f"transformers-alignedvq needs transformers>=5.16.1,<6 (found {installed}); "
            'install "transformers-alignedvq[cloud]"'
        )


if _installed_cloud_side():
    _check_cloud_versions()
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    from .models.llava_alignedvq.alignedvq_layer import AlignedVQLayer, AlignedVQLayerOutput
    from .models.llava_alignedvq.configuration_alignedvq import SPLIT_SITES, AlignedVQConfig
    from .models.llava_alignedvq.dlp import DualLinearProjection
    from .models.llava_alignedvq.modeling_alignedvq import (
        AlignedVQImageOutput,
        LlavaAlignedVQCausalLMOutputWithPast,
        LlavaAlignedVQForConditionalGeneration,
        LlavaAlignedVQModel,
    )
    from .models.llava_alignedvq.quantizer import VectorQuantizer
    from .wire import bits_per_index

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
