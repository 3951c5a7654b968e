"""Serving Qwen2.5-VL: one image a frame, sent as its patch grid ``(t, h, w)`` (`QwenImages`, which the engine asks
instead of a fixed token count, as it asks `tiled.TiledImages` for the any-resolution families).

* A frame must carry a geometry section of kind 2 (`wire_geometry`): one image and its patch grid. The server
  checks, before decoding the payload, that the grid is one Qwen's image processor makes for the served model: a
  still image (``t = 1``), ``h`` and ``w`` multiples of the merge size, and a resized pixel count
  (``h * w * patch_size²``) inside the processor's ``[min_pixels, max_pixels]`` (see `QwenImages.check` for the
  one case ``smart_resize`` exceeds ``max_pixels``). A frame that breaks any of these is a ``geometry mismatch``
  (422); one whose token count is not ``t * h * w`` was refused by the decoder (400).
* The prompt holds ``t * h * w / merge²`` image placeholders (the merger's output), as Qwen's processor expands
  its ``<|image_pad|>``; the model's ``generate`` computes the 3-D positions from them and ``image_grid_thw``.
* A batch's images are the patches of all its requests, in order, with one ``image_grid_thw`` row each.
* Frames may be coded under an entropy model fitted on patch grids (`entropy.EntropyModel.fit_patch_grids`), which
  codes any grid; a model of a fixed grid is refused at start-up.

The pixel limits are the served processor's (its image processor's ``size``), or those saved beside the model
when no processor could be built; without either, Qwen2-VL's image processor defaults, which is also what `export.qwen_edge_onnx.export_qwen_edge` writes for the edge by default.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import torch

from .. import wire
from ..errors import ServerConfigError
from ..preprocess import saved_image_processor
from ..preprocess_qwen import QwenImagePreprocessing
from ..wire_geometry import KIND_PATCHES, WireGeometry, max_section_bytes
from .tiled import FamilyImages, _mismatch


def _saved_image_processor(model) -> dict | None:
    """The image processor settings saved beside the model (``preprocessor_config.json``, or the
    ``image_processor`` entry of ``processor_config.json``), for a server whose processor could not be built
    (Qwen's own processor also wants a video processor): the pixel limits must still be the model's."""
    folder = getattr(model, "name_or_path", None) or ""
    if not folder or not os.path.isdir(folder):
        return None
    try:
        return saved_image_processor(folder)
    except ValueError as exc:
        raise ServerConfigError(str(exc)) from None


def served_preprocessing(model, processor) -> QwenImagePreprocessing:
    """The image processor's settings the server holds frames to: the served processor's when it has a Qwen2-VL
    image processor, else those saved beside the model, else the processor class defaults with the tower's sizes.
    `ServerConfigError` when the processor's patch or merge size is not the tower's."""
    vision = model.config.vision_config
    image_processor = getattr(processor, "image_processor", None)
    saved = image_processor.to_dict() if hasattr(image_processor, "to_dict") else _saved_image_processor(model)
    if saved is not None:
        try:
            settings = QwenImagePreprocessing.from_image_processor(saved)
        except ValueError as exc:
            raise ServerConfigError(str(exc)) from None
    else:
        settings = QwenImagePreprocessing(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                          temporal_patch_size=vision.temporal_patch_size)
    tower = (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
    if (settings.patch_size, settings.merge_size, settings.temporal_patch_size) != tower:
        raise ServerConfigError(f"the image processor's patch, merge and temporal sizes "
                                f"{(settings.patch_size, settings.merge_size, settings.temporal_patch_size)} are not "
                                f"the vision tower's {tower}")
    return settings


class QwenImages(FamilyImages):
    """The frame contract of a served Qwen2.5-VL model (see the module docstring)."""

    kind = KIND_PATCHES
    entropy_coding = True  # under a model of patch grids (`check_entropy_model`)

    def __init__(self, model, processor=None):
        super().__init__(model)
        self.preprocessing = served_preprocessing(model, processor)
        self.patch_size, self.merge = self.preprocessing.patch_size, self.preprocessing.merge_size
        factor = self.patch_size * self.merge
        # smart_resize clamps a side to one merge unit when scaling down would make it shorter; the other side
        # is then at most sqrt(200 * max_pixels) px (the processor refuses aspect ratios over 200).
        self.clamped_long_side = math.floor(math.sqrt(200 * self.preprocessing.max_pixels) / factor) * factor
        self.max_tokens = self._largest_grid_tokens()

    @staticmethod
    def serves(model) -> bool:
        """Whether ``model`` is a Qwen2.5-VL AlignedVQ model."""
        adapter = getattr(getattr(model, "model", None), "adapter", None)
        return getattr(adapter, "name", None) == "qwen2_5_vl"

    def _largest_grid_tokens(self) -> int:
        """Patches of the largest grid `check` admits (for the request size limit)."""
        in_range = self.preprocessing.max_pixels // self.patch_size**2
        clamped = self.merge * (self.clamped_long_side // self.patch_size)
        return max(in_range, clamped)

    def summary(self, fingerprint: bytes) -> dict[str, Any]:
        """The edge/cloud contract for ``/v1/model``: ``num_tokens`` is the largest image's patch count."""
        settings = self.preprocessing
        return self._summary(
            fingerprint, num_tokens=self.max_tokens, grid=None, has_cls_token=False, patch_size=self.patch_size,
            spatial_merge_size=self.merge, min_pixels=settings.min_pixels, max_pixels=settings.max_pixels)

    def max_frame_bytes(self, *, prompt_bytes: int, entropy_coded: bool) -> int:
        """The largest frame (raw, or coded too with ``entropy_coded``) of one image at the largest admitted grid."""
        return wire.max_frame_bytes(
            codebook_size=self.config.codebook_size, num_tokens=self.max_tokens, codes_per_token=self.codes,
            prompt_bytes=prompt_bytes, entropy_coded=entropy_coded) + max_section_bytes(KIND_PATCHES)

    def check_entropy_model(self, entropy_model: wire.EntropyModel) -> None:
        """`ServerConfigError` unless ``entropy_model`` codes this model's frames: patch grids, its K and codes."""
        if not entropy_model.patch_grids:
            raise ServerConfigError(f"the entropy model ({entropy_model!r}) codes a fixed grid; this Qwen2.5-VL model's "
                                    "frames carry patch grids: fit one with EntropyModel.fit_patch_grids")
        if (entropy_model.codebook_size, entropy_model.codes_per_token) != (self.config.codebook_size, self.codes):
            raise ServerConfigError(f"the entropy model ({entropy_model!r}) does not fit this model's frames "
                                    f"(K={self.config.codebook_size}, {self.codes} codes per token)")

    # -- frames -------------------------------------------------------------------------------------------
    def check(self, *, geometry: WireGeometry | None, num_tokens: int, grid, has_cls_token: bool) -> None:
        """`wire.decode_frame`'s ``check_geometry``: the grid is one this model's image processor makes."""
        image = self._one_image(
            geometry, other_kind="the frame carries tiles; this model takes one patch grid (t, h, w) per image",
            missing="this Qwen2.5-VL model takes patch grids: the frame must carry its image's grid (t, h, w) (a "
                    "geometry section)")
        # The decoder has already held the token count to t * h * w (`wire_geometry.tokens_per_tile`).
        self.check_grid(image.grid_thw)

    def check_grid(self, grid_thw: tuple[int, int, int]) -> None:
        t, h, w = grid_thw
        name, settings = f"patch grid {t}x{h}x{w}", self.preprocessing
        if t != 1:
            raise _mismatch(f"{name}: t must be 1 for a still image (videos are not served)")
        if h % self.merge or w % self.merge:
            raise _mismatch(f"{name}: h and w must be multiples of the merge size {self.merge}")
        height, width = h * self.patch_size, w * self.patch_size
        if height * width < settings.min_pixels:
            raise _mismatch(f"{name} is {width}x{height} px, fewer than this model's min_pixels="
                            f"{settings.min_pixels}; edge and cloud must resize with the same pixel limits")
        clamped = min(h, w) == self.merge and max(height, width) <= self.clamped_long_side
        if height * width > settings.max_pixels and not clamped:
            raise _mismatch(f"{name} is {width}x{height} px, more than this model's max_pixels="
                            f"{settings.max_pixels}; edge and cloud must resize with the same pixel limits")

    def image_tokens(self, grid_thw: tuple[int, int, int]) -> int:
        """Placeholders for an image of patch grid ``grid_thw``: the merger's output, ``t * h * w / merge²``."""
        t, h, w = grid_thw
        return t * h * w // self.merge**2

    def encode_processed(self, inputs) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """The edge run in the server on the image processor's output for one image: ``(indices (patches,
        codes), grid)``."""
        grid = inputs["image_grid_thw"]
        self.check_grid(tuple(int(v) for v in grid[0]))
        indices = self._encode_edge(inputs["pixel_values"], grid)
        return indices.reshape(indices.shape[0], -1), tuple(int(v) for v in grid[0])

    # -- batches ------------------------------------------------------------------------------------------
    def generate_inputs(self, indices: Sequence[torch.Tensor], grids: Sequence[tuple[int, int, int]]) -> dict:
        """``image_indices`` ``(patches[, codes])`` of a batch's images in order, and their ``image_grid_thw``."""
        patches = torch.cat([i.reshape(-1, self.codes) for i in indices])
        return {"image_indices": patches.squeeze(-1) if self.codes == 1 else patches,
                "image_grid_thw": torch.tensor([list(grid) for grid in grids], dtype=torch.long)}

    def warmup_image(self) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Zero indices of the smallest image the processor makes (the resize of a one-pixel-sided one)."""
        height, width = self.preprocessing.resized_size(self.patch_size * self.merge, self.patch_size * self.merge)
        grid = (1, height // self.patch_size, width // self.patch_size)
        return torch.zeros(grid[1] * grid[2], self.codes, dtype=torch.long), grid


__all__ = ["QwenImages", "served_preprocessing"]
