"""The device side of the any-resolution families (LLaVA-OneVision, LLaVA-NeXT): numpy/Pillow tiling against
their Transformers image processors, and the ONNX edge run per tile without PyTorch against `encode_edge`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from transformers_alignedvq.edge_runtime import load_edge_runtime
from transformers_alignedvq.edge_tiles import load_tiled_edge
from transformers_alignedvq.errors import EdgeCheckpointError
from transformers_alignedvq.export.tiled_edge import export_tiled_edge, model_tiling, tiles_of
from transformers_alignedvq.models.family import from_vlm
from transformers_alignedvq.models.llava_onevision_alignedvq.modeling_llava_onevision_alignedvq import (
    _HAS_MM_ENCODER_OUTPUTS,
)
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


# ------------------------------------------------------------------------------------------------------------
# the edge: tiny random models (16-px tiles, 4-px patches), the ONNX graph run by ONNX Runtime without PyTorch
# ------------------------------------------------------------------------------------------------------------
TILE = 16
TINY_PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]
# (height, width) of the photos the device encodes: 2x2 + base, 1x1 + base, 2x1 + base, 1x2 + base
TINY_SHAPES = [(20, 30), (16, 16), (40, 12), (9, 31)]


needs_model = pytest.mark.skipif(not _HAS_MM_ENCODER_OUTPUTS, reason="the tiled families need transformers>=5.19")


def _processor(family: str, pinpoints):
    if family == "llava_onevision":  # a checkpoint's own mean and std, not the class defaults
        return LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE}, image_grid_pinpoints=pinpoints,
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                      image_grid_pinpoints=pinpoints)


def _tiny_split(family: str, site: str, layer: int, pinpoints):
    if family == "llava_onevision":
        from test_family_onevision import tiny_onevision as base
    else:
        from test_family_next import tiny_next as base
    model = from_vlm(base(), split_layer=layer, split_site=site, codebook_size=16, image_grid_pinpoints=pinpoints)
    tiles, _ = tiles_of(model, [_photo(*shape, seed=10 + i) for i, shape in enumerate(TINY_SHAPES)],
                        _processor(family, pinpoints))
    torch.manual_seed(0)
    model.init_codebook([torch.from_numpy(tiles)], iters=3)
    return model.eval()


_DEVICE = """
import json, sys
for name in ("torch", "transformers"):
    sys.modules[name] = None  # any import of them fails: the device has neither
from transformers_alignedvq.edge_tiles import load_tiled_edge
edge = load_tiled_edge(sys.argv[1], backend="onnx", threads=1)
out = []
for path in sys.argv[2:]:
    sent = edge.encode_image(path)
    out.append({"indices": sent.indices.tolist(), "image_size": list(sent.image_size), "grid": list(sent.grid)})
loaded = sorted({m.split(".")[0] for m, module in sys.modules.items() if module} & {"torch", "transformers"})
print(json.dumps({"images": out, "backend": edge.runtime.backend, "loaded": loaded}))
"""


@needs_model
@pytest.mark.parametrize("family,site,layer,capped", [
    ("llava_onevision", "ln1", 0, False), ("llava_onevision", "mlp", 1, True), ("llava_next", "mlp", 1, False),
    ("llava_next", "patch", 0, True),
])
def test_onnx_edge_without_torch_gives_encode_edges_indices(tmp_path, family, site, layer, capped):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    pinpoints = cap_pinpoints(TINY_PINPOINTS, TILE, max_grid_tiles=2) if capped else TINY_PINPOINTS
    model = _tiny_split(family, site, layer, pinpoints)
    processor = _processor(family, pinpoints)
    export_tiled_edge(model, tmp_path / "edge", image_processor=processor if family == "llava_onevision" else None)
    paths = []
    for index, shape in enumerate(TINY_SHAPES):
        paths.append(str(tmp_path / f"photo{index}.png"))
        _photo(*shape, seed=20 + index).save(paths[-1])
    # the cloud's reference: Transformers' processor and the model's own edge, all images in one batch
    batch = processor([Image.open(path) for path in paths], return_tensors="pt")
    expected = model.encode_edge(batch["pixel_values"], batch["image_sizes"])
    geometry = model.frame_geometry(batch["image_sizes"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", _DEVICE, str(tmp_path / "edge"), *paths], capture_output=True,
                         text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    device = json.loads(run.stdout.strip().splitlines()[-1])
    assert device["backend"] == "onnx" and device["loaded"] == []
    sent = [np.asarray(image["indices"]) for image in device["images"]]
    assert [len(s) for s in sent] == list(geometry.tiles_per_image)
    assert len(set(geometry.tiles_per_image)) > 1  # the graph ran several tile counts
    assert [tuple(image["grid"]) for image in device["images"]] == list(geometry.tile_grids)
    assert [tuple(image["image_size"]) for image in device["images"]] == [tuple(s) for s in batch["image_sizes"].tolist()]
    assert np.array_equal(np.concatenate(sent), expected.numpy())


@needs_model
def test_pytorch_tiled_edge_and_what_is_refused(tmp_path):
    from conftest import tiny_alignedvq

    model = _tiny_split("llava_next", "ln1", 0, TINY_PINPOINTS)
    export_tiled_edge(model, tmp_path / "edge", format="safetensors")
    edge = load_tiled_edge(tmp_path / "edge", backend="torch")
    image = _photo(20, 30, seed=7)
    sent = edge.encode_image(image)
    tiles = torch.from_numpy(model_tiling(model)(image).pixels)
    assert sent.num_tiles == 5 and sent.indices.shape == (5, model.config.tokens_per_tile)
    assert np.array_equal(sent.indices, model.encode_edge(tiles, [image.size[::-1]]).numpy())
    with pytest.raises(ValueError, match="tiles every image"):
        edge.encode_image(image, tiled=False)
    with pytest.raises(ValueError, match="tiled edge"):  # not squashed into one tile
        load_edge_runtime(tmp_path / "edge", backend="torch").encode_image(image)
    tiny_alignedvq().edge_encoder().save_pretrained(tmp_path / "llava")
    with pytest.raises(EdgeCheckpointError, match="no tiling"):
        load_tiled_edge(tmp_path / "llava")
    with pytest.raises(ValueError, match="pinpoints"):
        model_tiling(model, _processor("llava_next", [[16, 16]]))
    with pytest.raises(TypeError, match="tiled edge"):
        export_tiled_edge(tiny_alignedvq(), tmp_path / "x")


@needs_model
def test_a_tiled_edge_folder_that_disagrees_with_itself_is_refused(tmp_path):
    export_tiled_edge(_tiny_split("llava_next", "ln1", 0, TINY_PINPOINTS), tmp_path, format="safetensors")
    path = tmp_path / "edge_config.json"
    config = json.loads(path.read_text())
    larger_tiles = {"tiling": {"pinpoints": [[32, 32]]},
                    "preprocessing": {**config["preprocessing"], "resize": {"shortest_edge": 32}, "crop": [32, 32]}}
    for broken, message in [({"tiling": {"pinpoints": "16x16"}}, "invalid tiling"),
                            ({"tokens_per_tile": None}, "invalid tiling"),
                            (larger_tiles, "cuts 32-px tiles for a 16-px tower")]:
        path.write_text(json.dumps({**config, **broken}))
        with pytest.raises(EdgeCheckpointError, match=message):
            load_tiled_edge(tmp_path, backend="torch")
    path.write_text(json.dumps({**config, "tokens_per_tile": config["tokens_per_tile"] + 1}))
    with pytest.raises(EdgeCheckpointError, match="tokens per tile"):
        load_tiled_edge(tmp_path, backend="torch").encode_image(_photo(20, 30))


def test_the_tiled_device_modules_import_no_cloud_package():
    code = ("import sys\nimport transformers_alignedvq.edge_tiles, transformers_alignedvq.preprocess_tiles\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'onnx'}))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"


@needs_model
def test_int8_tiled_edge_is_calibrated_on_every_tile(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _tiny_split("llava_onevision", "mlp", 1, TINY_PINPOINTS)
    photos = [_photo(*shape, seed=30 + i) for i, shape in enumerate(TINY_SHAPES)]
    export_tiled_edge(model, tmp_path / "edge", int8=True, calibration_images=photos)
    config = json.loads((tmp_path / "edge" / "edge_config.json").read_text())
    assert config["onnx"]["int8"] and config["onnx"]["calibration_images"] == len(photos)
    edge = load_tiled_edge(tmp_path / "edge", backend="onnx")
    image = _photo(40, 12, seed=40)
    sent = edge.encode_image(image)
    tiles = torch.from_numpy(model_tiling(model)(image).pixels)
    expected = model.encode_edge(tiles, [image.size[::-1]]).numpy()
    assert sent.indices.shape == expected.shape == (3, model.config.tokens_per_tile)
    assert (sent.indices == expected).mean() > 0.7  # int8 moves a few features across codeword borders
    with pytest.raises(ValueError, match="calibration"):
        export_tiled_edge(model, tmp_path / "x", int8=True)
    with pytest.raises(ValueError, match="ONNX"):
        export_tiled_edge(model, tmp_path / "x", format="safetensors", int8=True)
