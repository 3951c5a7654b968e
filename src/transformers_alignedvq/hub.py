"""The Hub-facing surface of the package: checkpoints (both kinds, strict loading, cards; `checkpoints/`), the
edge-only download a device uses (`edge_runtime.download_edge`), and what both need from LoRA and the entropy
model. Names are re-exported from where they live.
"""

from .checkpoints import *  # noqa: F403 (the public checkpoint surface, see checkpoints/__init__.py)
from .checkpoints import __all__ as _checkpoint_names
from .edge_runtime import EDGE_FILES, download_edge
from .entropy import ENTROPY_MODEL_NAME, load_entropy_model
from .errors import CheckpointMismatchError
from .lora import has_lora, merge_lora_

__all__ = [
    *_checkpoint_names, "ENTROPY_MODEL_NAME", "EDGE_FILES", "CheckpointMismatchError", "download_edge",
    "has_lora", "load_entropy_model", "merge_lora_",
]
