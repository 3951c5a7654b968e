"""transformers-alignedvq: AlignedVQ edge-cloud split inference for LLaVA-style models.

The package root is lazy, like Transformers' own: importing it, or any device module under it (`client`,
`wire`, `entropy`, `preprocess`, `edge_runtime`, the ``alignedvq ask`` command), loads neither PyTorch nor
Transformers, even where both are installed. The model names (``AlignedVQConfig``,
``LlavaAlignedVQForConditionalGeneration``, ``from_vlm``, ...) are imported on first use (PEP 562 ``__getattr__``).

Transformers' Auto classes learn our model types (``llava_alignedvq``, ``llava_next_alignedvq``,
``llava_onevision_alignedvq``, ``qwen2_5_vl_alignedvq``) as soon as both this package and Transformers are imported, in either order, so
``import transformers_alignedvq`` followed by ``AutoModel.from_pretrained(path)`` keeps working:

* imported after Transformers: registered right here;
* imported before it: a one-shot import hook registers right after ``import transformers`` finishes (where
  one of our modules imported it, once that module has run);
* on first use of a model name, or by calling `register()`.

A process that never imports Transformers (a device) never pays for it, and never runs the Transformers
version check either.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
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

# Name -> module of the names that need PyTorch and Transformers (the [cloud] extra).
_MODEL = "models.llava_alignedvq."
_NEXT = "models.llava_next_alignedvq."
_ONEVISION = "models.llava_onevision_alignedvq."
_QWEN2_5_VL = "models.qwen2_5_vl_alignedvq."
_CLOUD_NAMES = {
    "SPLIT_SITES": _MODEL + "configuration_alignedvq",
    "AlignedVQConfig": _MODEL + "configuration_alignedvq",
    "AlignedVQImageOutput": _MODEL + "modeling_alignedvq",
    "AlignedVQLayer": _MODEL + "alignedvq_layer",
    "AlignedVQLayerOutput": _MODEL + "alignedvq_layer",
    "DualLinearProjection": _MODEL + "dlp",
    "LlavaAlignedVQCausalLMOutputWithPast": _MODEL + "modeling_alignedvq",
    "LlavaAlignedVQForConditionalGeneration": _MODEL + "modeling_alignedvq",
    "LlavaAlignedVQModel": _MODEL + "modeling_alignedvq",
    "LlavaAlignedVQModelOutputWithPast": _MODEL + "modeling_alignedvq",
    "VectorQuantizer": _MODEL + "quantizer",
    "bits_per_index": "wire",
    "FamilyAdapter": "models.family",
    "FrameGeometry": "models.family",
    "from_vlm": "models.family",
    "LlavaNextAlignedVQConfig": _NEXT + "configuration_llava_next_alignedvq",
    "LlavaNextAlignedVQForConditionalGeneration": _NEXT + "modeling_llava_next_alignedvq",
    "LlavaOnevisionAlignedVQConfig": _ONEVISION + "configuration_llava_onevision_alignedvq",
    "LlavaOnevisionAlignedVQForConditionalGeneration": _ONEVISION + "modeling_llava_onevision_alignedvq",
    "Qwen2_5_VLAlignedVQConfig": _QWEN2_5_VL + "configuration_qwen2_5_vl_alignedvq",
    "Qwen2_5_VLAlignedVQForConditionalGeneration": _QWEN2_5_VL + "modeling_qwen2_5_vl_alignedvq",
}

__all__ = ["VQA_ACCURACY_METRIC", "CheckpointMismatchError", "register", *_CLOUD_NAMES]

_registered = False


def _check_cloud_versions() -> None:
    """A base install does not pin Transformers (the [cloud] extra does): refuse an untested release here."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("transformers")
        version("torch")
    except PackageNotFoundError as exc:
        raise ImportError(f'{exc.name} is not installed; install "transformers-alignedvq[cloud]"') from exc
    numbers = tuple(int(part) for part in installed.split(".")[:3] if part.isdigit())
    if not (5, 16, 1) <= numbers < (6,):
        raise ImportError(
            f"transformers-alignedvq needs transformers>=5.16.1,<6 (found {installed}); "
            'install "transformers-alignedvq[cloud]"'
        )


def register() -> None:
    """Register ``AlignedVQConfig`` with ``AutoConfig`` and the model with ``AutoModel`` and
    ``AutoModelForImageTextToText`` (once; later calls do nothing). `ImportError` naming the ``[cloud]`` extra
    where PyTorch or a supported Transformers is missing."""
    global _registered
    if _registered:
        return
    _check_cloud_versions()
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    from .models.llava_alignedvq.configuration_alignedvq import AlignedVQConfig
    from .models.llava_alignedvq.modeling_alignedvq import LlavaAlignedVQForConditionalGeneration

    AutoConfig.register(AlignedVQConfig.model_type, AlignedVQConfig, exist_ok=True)
    AutoModel.register(AlignedVQConfig, LlavaAlignedVQForConditionalGeneration, exist_ok=True)
    AutoModelForImageTextToText.register(AlignedVQConfig, LlavaAlignedVQForConditionalGeneration, exist_ok=True)
    _register_tiled_families()
    _registered = True


def _register_tiled_families() -> None:
    """The LLaVA-NeXT, LLaVA-OneVision and Qwen2.5-VL variants (their classes refuse to build on Transformers
    releases whose parent forward lacks ``mm_encoder_outputs``)."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    for family, config_name, model_name in (
        ("llava_next", "LlavaNextAlignedVQConfig", "LlavaNextAlignedVQForConditionalGeneration"),
        ("llava_onevision", "LlavaOnevisionAlignedVQConfig", "LlavaOnevisionAlignedVQForConditionalGeneration"),
        ("qwen2_5_vl", "Qwen2_5_VLAlignedVQConfig", "Qwen2_5_VLAlignedVQForConditionalGeneration"),
    ):
        folder = f"{__name__}.models.{family}_alignedvq"
        config = getattr(importlib.import_module(f"{folder}.configuration_{family}_alignedvq"), config_name)
        model = getattr(importlib.import_module(f"{folder}.modeling_{family}_alignedvq"), model_name)
        AutoConfig.register(config.model_type, config, exist_ok=True)
        AutoModel.register(config, model, exist_ok=True)
        AutoModelForImageTextToText.register(config, model, exist_ok=True)


def _register_or_warn() -> None:
    """`register()` for the automatic paths: a failure there must not break ``import transformers`` nor a
    device module, so it is a warning; using a model name then raises the error itself."""
    try:
        register()
    except Exception as exc:  # ImportError (extra missing, version), or whatever a broken install raises
        warnings.warn(f"transformers_alignedvq: not registered with Transformers' Auto classes: {exc}",
                      RuntimeWarning, stacklevel=3)


class _RegisterAfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the loaders the other finders return, that of ``transformers`` to call
    `register()` once the module has run, and those of this package's submodules to count how many are running.
    Registration imports the model files, which import much of this package: when ``import transformers`` ends
    inside a half-run submodule (``transformers_alignedvq.ptq`` imported first), it waits for the outermost one
    to finish."""

    def __init__(self) -> None:
        self._running = 0
        self._pending = False

    def find_spec(self, name, path=None, target=None):
        ours = name.startswith(__name__ + ".")
        if name != "transformers" and not ours:
            return None
        spec = self._others_spec(name, path, target)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader.exec_module = self._wrap(spec.loader.exec_module, ours)
        return spec

    def _others_spec(self, name, path, target):
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    return spec
        return None

    def _wrap(self, run, ours: bool):
        def exec_module(module):
            self._running += ours
            try:
                run(module)
            finally:
                self._running -= ours
            self._pending = self._pending or not ours
            if self._pending and self._running == 0 and self in sys.meta_path:
                sys.meta_path.remove(self)
                _register_or_warn()

        return exec_module


if "transformers" in sys.modules:
    _register_or_warn()
elif not any(isinstance(finder, _RegisterAfterTransformers) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterTransformers())


def __getattr__(name: str):
    module = _CLOUD_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    register()
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_CLOUD_NAMES))
