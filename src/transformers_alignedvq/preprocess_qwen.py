"""Qwen2.5-VL's image preprocessing for the edge, with numpy and Pillow only.

Qwen2.5-VL uses Qwen2-VL's image processor (Transformers' ``Qwen2VLImageProcessorPil`` is the reference; the
torchvision one resizes with its own kernels). It keeps an image close to its native size:

1. ``smart_resize``: height and width rounded to multiples of ``patch_size * merge_size`` (28 px), scaled down
   (or up) so the pixel count lies in ``[min_pixels, max_pixels]``, the aspect ratio kept as well as the rounding
   allows; then one Pillow resize (bicubic) to exactly that size;
2. ``x * rescale_factor`` in float64, then float32, and ``(x - mean) / std`` (OpenAI CLIP's);
3. a still image fills both temporal slots of a patch (``temporal_patch_size`` copies);
4. the patches flattened in the processor's order, ``(num_patches, C * T * P * P)``: 2x2 merge units row by row,
   the four patches of a unit row by row, each patch channel-major; and ``image_grid_thw = (1, h, w)``.

`QwenImagePreprocessing.__call__` gives exactly that (`tests/test_qwen_device.py` checks it against the
processor). The edge itself needs less: `edge_patches` gives each patch once per temporal slot (the slots are
equal, so the edge folds them into the patch embedding) in raster order (row by row), the order the wire uses.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImageInputError,
    _triple,
    load_image,
    rescale_and_normalize,
)

_BICUBIC = 3


def smart_resize(height: int, width: int, *, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """``(height, width)`` after Qwen's resize: multiples of ``factor`` with a pixel count in
    ``[min_pixels, max_pixels]`` (Transformers' ``smart_resize``, the same arithmetic). `ImageInputError` for an
    aspect ratio over 200, which the processor refuses too."""
    if height < 1 or width < 1:
        raise ImageInputError(f"the image is empty ({width}x{height} pixels)")
    if max(height, width) / min(height, width) > 200:
        raise ImageInputError(f"the image's aspect ratio must be at most 200, got {width}x{height}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(pixels: np.ndarray, *, patch_size: int, merge_size: int, temporal_patch_size: int) -> np.ndarray:
    """``(C, H, W)`` -> the processor's ``(num_patches, C * T * P * P)``: merge units row by row, each unit's
    patches row by row, a patch as ``(C, T, P, P)`` with the still image in every temporal slot."""
    channels, height, width = pixels.shape
    h, w = height // patch_size, width // patch_size
    units = pixels.reshape(channels, h // merge_size, merge_size, patch_size, w // merge_size, merge_size,
                           patch_size).transpose(1, 4, 2, 5, 0, 3, 6)  # (uh, uw, mh, mw, C, P, P)
    units = np.broadcast_to(units[:, :, :, :, :, None], (*units.shape[:5], temporal_patch_size, *units.shape[5:]))
    return np.ascontiguousarray(units).reshape(h * w, channels * temporal_patch_size * patch_size * patch_size)


def raster_patches(pixels: np.ndarray, *, patch_size: int) -> np.ndarray:
    """``(C, H, W)`` -> ``(num_patches, C * P * P)``, patches row by row, one temporal slot."""
    channels, height, width = pixels.shape
    h, w = height // patch_size, width // patch_size
    cut = pixels.reshape(channels, h, patch_size, w, patch_size).transpose(1, 3, 0, 2, 4)
    return np.ascontiguousarray(cut).reshape(h * w, channels * patch_size * patch_size)


@dataclass(frozen=True)
class QwenImagePreprocessing:
    """Qwen2-VL's image processor settings; defaults are its class defaults (Qwen2.5-VL's published
    ``preprocessor_config.json`` allows up to ``max_pixels=12845056``).

    Attributes:
        min_pixels, max_pixels: bounds on the resized pixel count (``size`` ``shortest_edge`` / ``longest_edge``).
        patch_size, merge_size, temporal_patch_size: the vision tower's; the resize factor is
            ``patch_size * merge_size``.
        resample: Pillow filter code (3 = bicubic).
        rescale_factor: multiplies the 0-255 values (None skips).
        image_mean, image_std: per-channel normalisation (None skips).
    """

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    resample: int = _BICUBIC
    rescale_factor: float | None = 1 / 255
    image_mean: tuple[float, float, float] | None = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] | None = OPENAI_CLIP_STD

    def __post_init__(self):
        for name in ("min_pixels", "max_pixels", "patch_size", "merge_size", "temporal_patch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")
        if (self.image_mean is None) != (self.image_std is None):
            raise ValueError("image_mean and image_std must be given together")

    @classmethod
    def from_image_processor(cls, settings: dict) -> "QwenImagePreprocessing":
        """From a Qwen2-VL image processor's saved settings (``preprocessor_config.json``, or the
        ``image_processor`` entry of ``processor_config.json``); ``size`` wins over the older ``min_pixels`` /
        ``max_pixels`` keys, as in the processor."""
        size = settings.get("size") or {}
        normalize = settings.get("do_normalize", True)
        defaults = cls()
        try:
            return cls(
                min_pixels=int(size.get("shortest_edge", settings.get("min_pixels", defaults.min_pixels))),
                max_pixels=int(size.get("longest_edge", settings.get("max_pixels", defaults.max_pixels))),
                patch_size=int(settings.get("patch_size", defaults.patch_size)),
                merge_size=int(settings.get("merge_size", defaults.merge_size)),
                temporal_patch_size=int(settings.get("temporal_patch_size", defaults.temporal_patch_size)),
                resample=int(settings.get("resample", _BICUBIC)),
                rescale_factor=float(settings.get("rescale_factor", 1 / 255)) if settings.get("do_rescale", True)
                else None,
                image_mean=_triple(settings.get("image_mean", OPENAI_CLIP_MEAN)) if normalize else None,
                image_std=_triple(settings.get("image_std", OPENAI_CLIP_STD)) if normalize else None,
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"invalid Qwen2-VL image processor settings: {exc}") from None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "QwenImagePreprocessing":
        try:
            values = dict(values)
            for key in ("image_mean", "image_std"):
                values[key] = _triple(values.get(key))
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid Qwen preprocessing settings {values!r}: {exc}") from None

    # ----------------------------------------------------------------------------------------------------
    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """``(height, width)`` an image of this size is resized to."""
        return smart_resize(height, width, factor=self.patch_size * self.merge_size, min_pixels=self.min_pixels,
                            max_pixels=self.max_pixels)

    def grid(self, height: int, width: int) -> tuple[int, int, int]:
        """The patch grid ``(t, h, w)`` of an image of this size (``t = 1``: a still image)."""
        resized_height, resized_width = self.resized_size(height, width)
        return 1, resized_height // self.patch_size, resized_width // self.patch_size

    def pixels(self, image) -> np.ndarray:
        """An image (PIL image, path, encoded bytes or uint8 array) -> resized, normalised ``(3, H, W)`` float32
        with ``H``, ``W`` multiples of ``patch_size * merge_size``."""
        pil = load_image(image)
        height, width = self.resized_size(pil.height, pil.width)
        if (height, width) != (pil.height, pil.width):
            pil = pil.resize((width, height), resample=self.resample)
        return rescale_and_normalize(np.asarray(pil).transpose(2, 0, 1), self.rescale_factor, self.image_mean,
                                     self.image_std)

    def __call__(self, image) -> tuple[np.ndarray, np.ndarray]:
        """What the image processor returns for one image: ``pixel_values`` ``(num_patches, C * T * P * P)``
        float32 in its order, and ``image_grid_thw`` ``(1, 3)`` int64."""
        pixels = self.pixels(image)
        patches = patchify(pixels, patch_size=self.patch_size, merge_size=self.merge_size,
                           temporal_patch_size=self.temporal_patch_size)
        return patches, self._grid_of(pixels)[None]

    def edge_patches(self, image) -> tuple[np.ndarray, tuple[int, int, int]]:
        """What the edge runs on: ``(num_patches, C * P * P)`` float32 in raster order (one temporal slot; the
        patch embedding sums its temporal kernels), and the grid ``(1, h, w)``."""
        pixels = self.pixels(image)
        return raster_patches(pixels, patch_size=self.patch_size), tuple(int(v) for v in self._grid_of(pixels))

    def _grid_of(self, pixels: np.ndarray) -> np.ndarray:
        return np.array([1, pixels.shape[1] // self.patch_size, pixels.shape[2] // self.patch_size], np.int64)


__all__ = ["QwenImagePreprocessing", "patchify", "raster_patches", "smart_resize"]
