"""Names and files of our checkpoints, and the checks that run before any weight is read (no model code).

Weights are safetensors only; `read_safetensors_header` checks that a file holds exactly the bytes its header
describes, `check_tensor_dtypes` that every weight has one storage dtype and the codebook state fp32.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointMismatchError

ALIGNEDVQ_WEIGHTS_NAME = "alignedvq.safetensors"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
LORA_SUBFOLDER = "lora"
_ALIGNEDVQ_PREFIX = "model.alignedvq."
_EMA_BUFFERS = ("quantizer.cluster_size", "quantizer.embed_sum")
# The model folder is what a checkpoint carries for `trust_remote_code=True`: its files, copied as they are.
MODEL_FOLDER = Path(__file__).parents[1] / "models" / "llava_alignedvq"
REMOTE_CODE_FILES = tuple(sorted(p.name for p in MODEL_FOLDER.glob("*.py") if p.name != "__init__.py"))
AUTO_MAP = {
    "AutoConfig": "configuration_alignedvq.AlignedVQConfig",
    "AutoModel": "modeling_alignedvq.LlavaAlignedVQForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_alignedvq.LlavaAlignedVQForConditionalGeneration",
}


@dataclass(frozen=True)
class RemoteCode:
    """What a checkpoint of one model type carries for ``trust_remote_code=True``: the family's model folder plus
    the modules it imports from elsewhere in the package, flattened into the checkpoint folder (Transformers loads
    remote code from one folder, following ``from .module import`` lines only), and the ``auto_map``."""

    folder: Path
    shared: tuple[Path, ...]
    config_class: str
    model_class: str

    def sources(self) -> dict[str, Path]:
        """File name in the checkpoint -> source file in the package."""
        paths = [p for p in sorted(self.folder.glob("*.py")) if p.name != "__init__.py"] + list(self.shared)
        return {path.name: path for path in paths}

    def auto_map(self) -> dict[str, str]:
        return {"AutoConfig": self.config_class, "AutoModel": self.model_class,
                "AutoModelForImageTextToText": self.model_class}


_MODELS = MODEL_FOLDER.parent
_LLAVA_FILES = tuple(MODEL_FOLDER / name for name in REMOTE_CODE_FILES)
_FAMILY_SHARED = (*_LLAVA_FILES, _MODELS / "family.py", _MODELS / "tiled_alignedvq.py")
REMOTE_CODE = {
    "llava_alignedvq": RemoteCode(MODEL_FOLDER, (), AUTO_MAP["AutoConfig"], AUTO_MAP["AutoModel"]),
    "llava_next_alignedvq": RemoteCode(
        _MODELS / "llava_next_alignedvq", _FAMILY_SHARED, "configuration_llava_next_alignedvq.LlavaNextAlignedVQConfig",
        "modeling_llava_next_alignedvq.LlavaNextAlignedVQForConditionalGeneration"),
    "llava_onevision_alignedvq": RemoteCode(
        _MODELS / "llava_onevision_alignedvq", _FAMILY_SHARED,
        "configuration_llava_onevision_alignedvq.LlavaOnevisionAlignedVQConfig",
        "modeling_llava_onevision_alignedvq.LlavaOnevisionAlignedVQForConditionalGeneration"),
    "qwen2_5_vl_alignedvq": RemoteCode(
        _MODELS / "qwen2_5_vl_alignedvq", _FAMILY_SHARED, "configuration_qwen2_5_vl_alignedvq.Qwen2_5_VLAlignedVQConfig",
        "modeling_qwen2_5_vl_alignedvq.Qwen2_5_VLAlignedVQForConditionalGeneration"),
}
# `from ..llava_alignedvq.split import x`, `from .llava_alignedvq.split import x`, `from ..family import x`: in the
# flat folder every module is a sibling, `from .split import x`.
_PACKAGE_IMPORT = re.compile(r"^(\s*)from \.+(?:\w+\.)*(\w+) import", flags=re.MULTILINE)


def flat_source(path: Path) -> str:
    """``path``'s text with its package-relative imports made sibling imports, as the flat folder needs."""
    return _PACKAGE_IMPORT.sub(r"\1from .\2 import", path.read_text())


def _resolve(path_or_id, filename: str, hub_kwargs: dict, *, required: bool = True) -> str | None:
    from transformers.utils import cached_file

    return cached_file(
        path_or_id, filename, _raise_exceptions_for_missing_entries=required, **hub_kwargs
    )


_HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "subfolder")


def hub_kwargs_from(kwargs: dict) -> dict:
    return {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}


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


def checkpoint_files(directory: str | os.PathLike) -> dict[str, int]:
    """Name -> size in bytes of every file a checkpoint folder holds (what an upload would send)."""
    directory = Path(directory)
    return {p.relative_to(directory).as_posix(): p.stat().st_size for p in sorted(directory.rglob("*")) if p.is_file()}


def read_json(path: str | os.PathLike) -> dict:
    return json.loads(Path(path).read_text())


__all__ = [
    "ALIGNEDVQ_WEIGHTS_NAME",
    "AUTO_MAP",
    "FP32_TENSORS",
    "LORA_SUBFOLDER",
    "MODEL_FOLDER",
    "REMOTE_CODE",
    "REMOTE_CODE_FILES",
    "RemoteCode",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "check_tensor_dtypes",
    "check_weight_files",
    "checkpoint_files",
    "flat_source",
    "hub_kwargs_from",
    "read_json",
    "read_safetensors_header",
    "weight_files",
]
