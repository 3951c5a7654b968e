"""Evaluation: VQA accuracy (the VQA-v2 answer normalisation) of a model, with images over the real wire
format (`vqa.py`), and the paired tests the reports decide claims with (`significance.py`)."""

from .vqa import *  # noqa: F403 (the public names of vqa.py, listed in its __all__)
from .vqa import __all__ as __all__
