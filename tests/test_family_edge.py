"""The device side of the any-resolution families (LLaVA-OneVision, LLaVA-NeXT): numpy/Pillow tiling against
their Transformers image processors, and the ONNX edge run per tile without PyTorch against `encode_edge`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from transformers_alignedvq.preprocess_tiles import (
    TiledPreprocessing,
    cap_pinpoints,
    select_best_resolution,
)

ONEVISION_PINPOINTS = LlavaOnevisionImageProcessorPil.image_grid_pinpoints
NEXT_PINPOINTS = LlavaNextImageProcessorPil.image_grid_pinpoints
# (height, width): square, the 1024x768 photo, full HD, portrait, tiny, a panorama, just past a pinpoint
SHAPES = [(384, 384), (768, 1024), (1080, 1920), (900, 300), (20, 50), (100, 2000), (337, 673)]


def _processors():
    """The published settings: OneVision-0.5B's (SigLIP, mean = std = 0.5, 384-px tiles, 36 pinpoints) and
    LLaVA-NeXT's (CLIP-336, shortest edge + centre crop, 5 pinpoints)."""
    yield "onevision", LlavaOnevisionImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    yield "next", LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})


def _photo(height: int, width: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Noise: every resampling difference shows (a smooth photo would hide some)."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    values = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(values.squeeze(-1) if channels == 1 else values)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family,processor", list(_processors()))
def test_tiles_match_the_family_image_processor(family, processor, shape):
    ours = TiledPreprocessing.from_image_processor(processor.to_dict())
    image = _photo(*shape)
    expected = processor(image, return_tensors="np")
    tiled = ours(image)
    reference = expected["pixel_values"][0]
    assert tiled.num_tiles == reference.shape[0]
    assert tiled.image_size == tuple(expected["image_sizes"][0]) == shape
    pinpoints, tile = processor.image_grid_pinpoints, ours.tile_size
    assert tiled.num_tiles == image_size_to_num_patches(shape, pinpoints, tile)  # what the model's geometry says
    assert tiled.grid == tuple(get_anyres_image_grid_shape(shape, pinpoints, tile))
    assert tiled.pixels.dtype == np.float32 and tiled.pixels.shape[1:] == (3, tile, tile)
    np.testing.assert_allclose(tiled.pixels, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grey_and_transparent_images_tile_alike(mode):
    processor = dict(_processors())["onevision"]
    image = _photo(300, 500, seed=1, mode=mode)
    reference = image
    if mode == "RGBA":  # ours puts transparency onto white, as Transformers >= 5.2x does
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        reference = Image.alpha_composite(white, image).convert("RGB")
    expected = processor(reference, return_tensors="np")["pixel_values"][0]
    got = TiledPreprocessing.from_image_processor(processor.to_dict())(image).pixels
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_class_defaults_are_the_families_processors():
    image = _photo(200, 350, seed=2)
    for family, processor, pinpoints in (
        ("llava_onevision", LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}), [[32, 32], [32, 64]]),
        ("llava_next", LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
         [[32, 64], [64, 32], [64, 64]]),
    ):
        ours = TiledPreprocessing.for_family(family, 32, pinpoints)
        expected = processor(image, image_grid_pinpoints=pinpoints, return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(ours(image).pixels, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no tiling for family"):
        TiledPreprocessing.for_family("qwen2_5_vl", 32, pinpoints)


def test_a_multi_image_prompt_sends_each_image_as_a_padded_base_view():
    processor = dict(_processors())["onevision"]
    images = [_photo(200, 500, seed=3), _photo(400, 100, seed=4)]
    expected = processor([images], return_tensors="np")  # one sample with two images: base views only
    ours = TiledPreprocessing.from_image_processor(processor.to_dict())
    for index, image in enumerate(images):
        tiled = ours(image, tiled=False)
        assert tiled.num_tiles == 1 and tiled.grid == (0, 0)
        np.testing.assert_allclose(tiled.pixels[0], expected["pixel_values"][index, 0], atol=1e-5, rtol=0)


def test_a_capped_grid_tiles_as_the_capped_processor_does():
    capped = cap_pinpoints(ONEVISION_PINPOINTS, 384, max_grid_tiles=4)
    processor = LlavaOnevisionImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3, image_grid_pinpoints=capped)
    ours = TiledPreprocessing.from_image_processor(processor.to_dict())
    assert ours.pinpoints == tuple(map(tuple, capped))
    for shape in [(1080, 1920), (2048, 2048), (300, 1200)]:
        image = _photo(*shape, seed=5)
        tiled = ours(image)
        expected = processor(image, return_tensors="np")["pixel_values"][0]
        assert tiled.num_tiles == expected.shape[0] <= 5
        np.testing.assert_allclose(tiled.pixels, expected, atol=1e-5, rtol=0)


def test_tile_selection_and_bad_settings():
    # ties keep the first listed pinpoint, as Transformers' select_best_resolution does
    assert select_best_resolution((100, 100), [[336, 672], [672, 336]]) == (336, 672)
    assert select_best_resolution((1000, 300), NEXT_PINPOINTS) == (1008, 336)
    tiling = TiledPreprocessing.for_family("llava_onevision", 384, ONEVISION_PINPOINTS)
    assert tiling.num_tiles((768, 1024)) == 7 and tiling.grid((2048, 2048)) == (6, 6)
    with pytest.raises(ValueError, match="not multiples of the 384-px tile"):
        TiledPreprocessing.for_family("llava_onevision", 384, [[384, 500]])
    with pytest.raises(ValueError, match="no image_grid_pinpoints"):
        TiledPreprocessing.from_image_processor({"size": {"height": 384, "width": 384}})
    restored = TiledPreprocessing.from_config(tiling.tile.to_dict(), json.loads(json.dumps(tiling.tiling_dict())))
    assert restored == tiling
    with pytest.raises(ValueError, match="invalid tiling"):
        TiledPreprocessing.from_config(tiling.tile.to_dict(), {"tile_size": 384})
