"""Which pip extra of transformers-alignedvq brings which optional package, for one-line errors when a command
runs where its extra is not installed (a device with only ``[edge]`` running ``alignedvq serve``). Imports
nothing: the device CLI imports it."""

from __future__ import annotations

# Optional packages -> the extra that brings them. The cloud's core packages are named under the command's own
# extra instead (`serve` without torch needs [serve], which includes [cloud]).
_EXTRA_OF_PACKAGE = {
    "fastapi": "serve", "uvicorn": "serve", "starlette": "serve", "datasets": "train", "easy_vqa": "train",
    "evaluate": "train", "tokenizers": "train", "matplotlib": "train", "onnx": "export", "onnxscript": "export",
    "onnxruntime": "edge", "constriction": "edge", "huggingface_hub": "edge", "httpx": "edge",
}
_CLOUD_PACKAGES = ("torch", "transformers", "peft", "accelerate", "jinja2")
# `ask` needs the cloud packages only to export the edge of a folder that has none: [cloud] then.
_COMMAND_EXTRA = {"serve": "serve", "demo": "serve,train", "export-edge": "export", "export-vllm": "cloud",
                  "info": "cloud"}


def missing_package_message(command: str, exc: ImportError) -> str:
    """One line for an `ImportError` a subcommand hit: which extra to install for a missing package, else the
    error itself (e.g. an unsupported Transformers release)."""
    package = (getattr(exc, "name", None) or "").split(".")[0]
    if not isinstance(exc, ModuleNotFoundError) or not package:
        return f"`alignedvq {command}`: {exc}"
    extra = _COMMAND_EXTRA.get(command, "cloud") if package in _CLOUD_PACKAGES else _EXTRA_OF_PACKAGE.get(package)
    if extra is None:
        return f"`alignedvq {command}` needs the Python package {package!r}, which is not installed"
    return f'`alignedvq {command}` needs {package}, which is not installed: pip install "transformers-alignedvq[{extra}]"'


__all__ = ["missing_package_message"]
