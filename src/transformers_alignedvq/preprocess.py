"""Image preprocessing for the edge: resize, centre crop, rescale, normalise, with numpy and Pillow only.

It reproduces Transformers' PIL-backed CLIP-style image processors step by step (shortest-edge resize with
Pillow, centre crop, ``x * rescale_factor`` in float64, ``(x - mean) / std`` in float32), so the edge needs
neither Transformers nor PyTorch; `tests/test_preprocess.py` checks it against Transformers' own processor.

The settings travel in the edge folder's ``edge_config.json`` (``"preprocessing"``), read from the model's
image processor when the edge is exported from a model folder, or, for an edge saved straight from a model
object, the defaults of the vision tower's family (CLIP: OpenAI's mean and std, bicubic shortest-edge resize
and centre crop to the tower's image size; SigLIP: mean = std = 0.5, bilinear resize to a square).
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_BICUBIC, _BILINEAR = 3, 2


class ImageInputError(ValueError):
    """The input cannot be read as an image (not an image file, an unsupported array, an empty image)."""


@dataclass(frozen=True)
class ImagePreprocessing:
    """How pixels are made from an image; ``__call__`` returns float32 ``(1, 3, crop_height, crop_width)``.

    Attributes:
        resize: ``{"shortest_edge": n}`` (keep the aspect ratio) or ``{"height": h, "width": w}``; None skips.
        resample: Pillow resampling filter code (3 = bicubic, 2 = bilinear).
        crop: ``(height, width)`` of the centre crop (zero-padded where the image is smaller); None skips.
        rescale_factor: multiplies the 0-255 values (None skips).
        image_mean, image_std: per-channel normalisation (None skips).
    """

    resize: dict | None
    resample: int
    crop: tuple[int, int] | None
    rescale_factor: float | None
    image_mean: tuple[float, float, float] | None
    image_std: tuple[float, float, float] | None

    # ----------------------------------------------------------------------------------------------------
    @classmethod
    def for_vision_config(cls, model_type: str, image_size: int) -> "ImagePreprocessing":
        """The standard preprocessing of a vision tower family at ``image_size``."""
        if model_type == "clip_vision_model":
            return cls({"shortest_edge": image_size}, _BICUBIC, (image_size, image_size), 1 / 255,
                       OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        if model_type == "siglip_vision_model":
            return cls({"height": image_size, "width": image_size}, _BILINEAR, None, 1 / 255,
                       (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        raise ValueError(
            f"no default preprocessing for a {model_type!r} vision tower; pass the model's image processor"
        )

    @classmethod
    def from_image_processor(cls, settings: dict) -> "ImagePreprocessing":
        """From a Transformers image processor's saved settings (``preprocessor_config.json``, or the
        ``image_processor`` entry of ``processor_config.json``)."""
        size = settings.get("size") if settings.get("do_resize", True) else None
        if isinstance(size, int):
            size = {"shortest_edge": size}
        crop = settings.get("crop_size") if settings.get("do_center_crop", False) else None
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        return cls(
            resize={k: int(v) for k, v in size.items() if v is not None} if size else None,
            resample=int(settings.get("resample", _BICUBIC)),
            crop=(int(crop["height"]), int(crop["width"])) if crop else None,
            rescale_factor=float(settings.get("rescale_factor", 1 / 255)) if settings.get("do_rescale", True) else None,
            image_mean=_triple(settings.get("image_mean")) if settings.get("do_normalize", True) else None,
            image_std=_triple(settings.get("image_std")) if settings.get("do_normalize", True) else None,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ImagePreprocessing":
        try:
            crop = values["crop"]
            return cls(
                resize=dict(values["resize"]) if values["resize"] else None,
                resample=int(values["resample"]),
                crop=(int(crop[0]), int(crop[1])) if crop else None,
                rescale_factor=None if values["rescale_factor"] is None else float(values["rescale_factor"]),
                image_mean=_triple(values["image_mean"]),
                image_std=_triple(values["image_std"]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"invalid preprocessing settings {values!r}: {exc}") from None

    # ----------------------------------------------------------------------------------------------------
    def __call__(self, image) -> np.ndarray:
        """An image (PIL image, path, encoded bytes, or HxWxC uint8 array) -> pixels ``(1, 3, H, W)`` float32."""
        pil = load_image(image)
        if self.resize:
            pil = pil.resize(self._resized_size(pil.width, pil.height), resample=self.resample)
        pixels = np.asarray(pil)  # (H, W, 3) uint8
        if self.crop:
            pixels = _center_crop(pixels, *self.crop)
        pixels = rescale_and_normalize(pixels.transpose(2, 0, 1), self.rescale_factor, self.image_mean, self.image_std)
        return pixels[None]

    def _resized_size(self, width: int, height: int) -> tuple[int, int]:
        """Pillow's ``(width, height)`` after the resize, as Transformers computes it."""
        if "shortest_edge" in self.resize:
            short_side = self.resize["shortest_edge"]
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(short_side * long / short)
            return (short_side, new_long) if width <= height else (new_long, short_side)
        return int(self.resize["width"]), int(self.resize["height"])


# Files that hold a Transformers image processor's settings, newest first (Transformers 5 keeps them inside
# processor_config.json; older checkpoints have preprocessor_config.json).
IMAGE_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def saved_image_processor(directory: str | os.PathLike, *, having: tuple[str, ...] = ()) -> dict | None:
    """A Transformers image processor's settings saved in ``directory`` (``processor_config.json``'s
    ``image_processor`` entry, or ``preprocessor_config.json``), the first with one of the keys ``having`` (any,
    when empty); None without them. `ValueError` naming the file when one is not valid JSON."""
    for name in IMAGE_PROCESSOR_FILES:
        path = Path(directory) / name
        if path.is_file():
            try:
                values = json.loads(path.read_text())
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                raise ValueError(f"{path} is not valid JSON: {exc}") from None
            values = values.get("image_processor", values) if isinstance(values, dict) else None
            if isinstance(values, dict) and (not having or any(key in values for key in having)):
                return values
    return None


def read_preprocessing(directory: str | os.PathLike, edge_config: dict) -> ImagePreprocessing:
    """The preprocessing of an edge folder: a Transformers image processor saved in the folder wins (a full
    checkpoint folder, or an edge folder of an older release), then ``edge_config["preprocessing"]``, then
    the defaults of the tower's family."""
    values = saved_image_processor(directory, having=("size", "crop_size"))
    if values is not None:
        return ImagePreprocessing.from_image_processor(values)
    if edge_config.get("preprocessing"):
        return ImagePreprocessing.from_dict(edge_config["preprocessing"])
    vision = edge_config.get("vision_config") or {}
    return ImagePreprocessing.for_vision_config(vision.get("model_type"), vision.get("image_size"))


def rescale_and_normalize(pixels: np.ndarray, rescale_factor: float | None, image_mean, image_std) -> np.ndarray:
    """``(3, H, W)`` uint8 -> contiguous float32: ``x * rescale_factor`` in float64 (None skips), then
    ``(x - mean) / std`` in float32 (None skips), as Transformers' PIL-backed image processors compute it."""
    if rescale_factor is not None:
        pixels = (pixels.astype(np.float64) * rescale_factor).astype(np.float32)
    pixels = pixels.astype(np.float32, copy=False)
    if image_mean is not None:
        mean = np.asarray(image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(image_std, dtype=np.float32)[:, None, None]
        pixels = (pixels - mean) / std
    return np.ascontiguousarray(pixels, dtype=np.float32)


def _triple(values) -> tuple[float, float, float] | None:
    if values is None:
        return None
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values] * 3)]
    if len(values) != 3:
        raise ValueError(f"expected 3 channel values, got {values}")
    return tuple(values)


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre crop of an ``(H, W, C)`` array, zero-padded (centred) where the image is smaller."""
    h, w = pixels.shape[:2]
    if h < height or w < width:
        out_h, out_w = max(h, height), max(w, width)
        padded = np.zeros((out_h, out_w, pixels.shape[2]), dtype=pixels.dtype)
        top, left = -(-(out_h - h) // 2), -(-(out_w - w) // 2)
        padded[top:top + h, left:left + w] = pixels
        pixels, h, w = padded, out_h, out_w
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[top:top + height, left:left + width]


def _open_checked(source) -> Image.Image:
    """`Image.open` (header only), refusing an image over Pillow's decompression-bomb limit before it is
    decoded. Pillow only warns up to twice that limit: the edge resizes every image to a few hundred pixels a
    side, so such a file is a mistake or an attack, and decoding it could exhaust a device's memory."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused just below, as an error
        opened = Image.open(source)
    limit = Image.MAX_IMAGE_PIXELS
    if limit and opened.width * opened.height > limit:
        opened.close()
        raise ImageInputError(
            f"the image is {opened.width}x{opened.height} pixels, more than the {limit} allowed; downscale it first"
        )
    return opened


def load_image(image) -> Image.Image:
    """An RGB PIL image from a PIL image, a path, encoded bytes, or an HxW / HxWxC uint8 array. Raises
    `ImageInputError` (a `ValueError`) naming the problem for anything that is not a readable image."""
    try:
        if isinstance(image, Image.Image):
            pil = image
        elif isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
            if isinstance(image, (str, os.PathLike)) and os.path.isdir(image):
                raise ImageInputError(f"{image} is a folder, not an image file")
            source = image if isinstance(image, (str, os.PathLike)) else io.BytesIO(bytes(image))
            with _open_checked(source) as opened:
                opened.load()
                pil = opened.copy()
        elif isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise ImageInputError(f"an image array must be uint8 HxW or HxWxC, got {image.dtype} {image.shape}")
            pil = Image.fromarray(image)
        else:
            raise ImageInputError(
                f"image must be a PIL image, a path, encoded bytes or a uint8 array, got {type(image).__name__}"
            )
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        # Pillow's errors for non-images, bad files and over-large images
        raise ImageInputError(f"cannot read the image: {exc}") from None
    if pil.width == 0 or pil.height == 0:
        raise ImageInputError("the image is empty (0 pixels wide or high)")
    if "A" in pil.getbands() or pil.info.get("transparency") is not None:
        # Transparency goes onto white, as Transformers' image processors do.
        background = Image.new("RGBA", pil.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, pil.convert("RGBA")).convert("RGB")
    return pil.convert("RGB")


__all__ = [
    "IMAGE_PROCESSOR_FILES",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ImageInputError",
    "ImagePreprocessing",
    "load_image",
    "read_preprocessing",
    "rescale_and_normalize",
]
