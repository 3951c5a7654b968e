"""Qwen2.5-VL on the device: numpy preprocessing against Transformers' image processor, the windows the runtime
computes against the tower's own, and the ONNX edge's indices against PyTorch's `encode_edge` on the tiny random
model of `test_family_qwen2_5_vl.py`, without torch or Transformers on the device side."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_family_qwen2_5_vl import MERGE, PATCH, TEMPORAL, tiny_split
from transformers_alignedvq.errors import EdgeCheckpointError
from transformers_alignedvq.models.qwen2_5_vl_alignedvq.modeling_qwen2_5_vl_alignedvq import _HAS_MM_ENCODER_OUTPUTS
from transformers_alignedvq.preprocess import ImageInputError
from transformers_alignedvq.preprocess_qwen import QwenImagePreprocessing, patchify, raster_patches, smart_resize
from transformers_alignedvq.qwen_edge_runtime import load_qwen_edge, window_layout

pil_processing = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
# Photo shapes: square, landscape, portrait, very wide, tiny (scaled up to min_pixels), large (scaled down).
SHAPES = [(448, 448), (768, 1024), (1024, 700), (30, 700), (20, 17), (1500, 1200)]


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth image with detail (so resampling differences would show), uint8 HxWx3."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 127 + 60 * np.sin(x[..., None] / (7 + 3 * np.arange(3))) * np.cos(y[..., None] / 11)
    return np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing


def test_qwen2_5_vl_uses_qwen2_vl_image_processor():
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    assert "Qwen2VLImageProcessorPil" in str(IMAGE_PROCESSOR_MAPPING_NAMES["qwen2_5_vl"])


@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_preprocessing_matches_the_image_processor(height, width):
    processor = pil_processing.Qwen2VLImageProcessorPil()
    photo = _photo(height, width)
    expected = processor(photo, return_tensors="np")
    ours = QwenImagePreprocessing()
    pixel_values, grid = ours(Image.fromarray(photo))
    np.testing.assert_array_equal(grid, expected["image_grid_thw"])
    assert pixel_values.dtype == np.float32 and pixel_values.shape == expected["pixel_values"].shape
    np.testing.assert_allclose(pixel_values, expected["pixel_values"], rtol=0, atol=1e-5)
    # The edge's layout: the same patches in raster order, one temporal slot.
    patches, edge_grid = ours.edge_patches(photo)
    assert edge_grid == tuple(grid[0].tolist())
    _, h, w = edge_grid
    unit_order = (np.arange(h * w).reshape(h // 2, 2, w // 2, 2).transpose(0, 2, 1, 3).reshape(-1))
    raster = np.empty_like(pixel_values)
    raster[unit_order] = pixel_values
    first_slot = raster.reshape(h * w, 3, 2, 14 * 14)[:, :, 0].reshape(h * w, -1)
    np.testing.assert_array_equal(patches, first_slot)


def test_preprocessing_with_saved_settings_and_pixel_limits():
    """Other pixel limits, patch sizes and normalisation, read from the processor's saved settings."""
    processor = pil_processing.Qwen2VLImageProcessorPil(min_pixels=64 * 64, max_pixels=200 * 200, patch_size=16,
                                                        image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.5, 1.0])
    ours = QwenImagePreprocessing.from_image_processor(processor.to_dict())
    assert (ours.min_pixels, ours.max_pixels, ours.patch_size) == (64 * 64, 200 * 200, 16)
    assert QwenImagePreprocessing.from_dict(ours.to_dict()) == ours
    for height, width in [(480, 640), (33, 41), (90, 600)]:
        photo = _photo(height, width, seed=1)
        expected = processor(photo, return_tensors="np")
        pixel_values, grid = ours(photo)
        np.testing.assert_array_equal(grid, expected["image_grid_thw"])
        np.testing.assert_allclose(pixel_values, expected["pixel_values"], rtol=0, atol=1e-5)


def test_smart_resize_is_transformers():
    rng = np.random.default_rng(0)
    for height, width in rng.integers(1, 4000, (300, 2)).tolist():
        if max(height, width) / min(height, width) > 200:
            continue
        for limits in [{}, {"min_pixels": 256 * 28 * 28, "max_pixels": 12845056}]:
            assert smart_resize(height, width, **limits) == pil_processing.smart_resize(height, width, **limits)


def test_preprocessing_refuses_bad_input():
    with pytest.raises(ImageInputError, match="aspect ratio"):
        QwenImagePreprocessing()(np.zeros((2, 500, 3), np.uint8))
    with pytest.raises(ImageInputError, match="uint8"):
        QwenImagePreprocessing()(np.zeros((20, 20, 3), np.float32))
    with pytest.raises(ImageInputError, match="empty"):
        smart_resize(0, 28)
    with pytest.raises(ValueError, match="min_pixels"):
        QwenImagePreprocessing(min_pixels=100, max_pixels=10)
    with pytest.raises(ValueError, match="patch_size"):
        QwenImagePreprocessing(patch_size=0)
    with pytest.raises(ValueError, match="invalid"):
        QwenImagePreprocessing.from_image_processor({"size": {"longest_edge": "many"}})


def test_patch_layouts_agree():
    pixels = np.random.default_rng(0).standard_normal((3, 8, 12)).astype(np.float32)
    processor_order = patchify(pixels, patch_size=2, merge_size=2, temporal_patch_size=2)
    raster = raster_patches(pixels, patch_size=2)
    assert processor_order.shape == (24, 24) and raster.shape == (24, 12)
    np.testing.assert_array_equal(processor_order[1].reshape(3, 2, 4)[:, 0], raster[1].reshape(3, 4))  # (0, 1)
    np.testing.assert_array_equal(processor_order[2].reshape(3, 2, 4)[:, 1], raster[6].reshape(3, 4))  # (1, 0)


# ---------------------------------------------------------------------------------------------------------------
# Windows


@pytest.mark.parametrize(("height", "width"), [(6, 8), (4, 6), (2, 2), (16, 16), (54, 74), (32, 32), (10, 34)])
def test_windows_are_the_towers(height, width):
    """The runtime's windows hold the same patches as Transformers' `get_vision_window_index` windows (at the
    published window of 8x8 patches and the tiny one of 4x4), and its rotary positions are the tower's."""
    from transformers_alignedvq.models.qwen2_5_vl_alignedvq.split_qwen2_5_vl import token_layout

    for patch, window in [(14, 112), (2, 8)]:
        tower = type("Tower", (), {"spatial_merge_size": 2, "window_size": window, "patch_size": patch,
                                   "config": type("Config", (), {"_attn_implementation": "sdpa"})()})()
        layout = token_layout(tower, torch.tensor([[1, height, width]]))
        cuts = layout.cu_window_seqlens.tolist()
        theirs = {frozenset(layout.window_from_raster[a:b].tolist()) for a, b in zip(cuts, cuts[1:]) if b > a}
        ours = window_layout(height, width, window // patch)
        found = {frozenset(row[bias == 0].tolist()) for row, bias in zip(ours.padded_from_raster, ours.key_bias)}
        assert found == theirs
        flat = ours.padded_from_raster.reshape(-1)
        np.testing.assert_array_equal(flat[ours.raster_from_padded], np.arange(height * width))
        np.testing.assert_array_equal(ours.positions[layout.window_from_raster.numpy()], layout.positions.numpy())
        assert np.isneginf(ours.key_bias).sum() == flat.size - height * width


# ---------------------------------------------------------------------------------------------------------------
# The ONNX edge


needs_model = pytest.mark.skipif(not _HAS_MM_ENCODER_OUTPUTS, reason="needs Qwen2.5-VL's forward(mm_encoder_outputs)")
TINY_PREPROCESSING = QwenImagePreprocessing(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL,
                                            min_pixels=16, max_pixels=32 * 32)
# (H, W) photos -> grids (6, 8) (2x2 windows of 4x4 patches, two cut short), (4, 6) and (16, 10).
PHOTOS = [(12, 16), (8, 12), (31, 21)]


def _tiny_processor():
    return pil_processing.Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL,
                                                   size={"shortest_edge": 16, "longest_edge": 32 * 32})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from transformers_alignedvq.export.qwen_edge_onnx import export_qwen_edge

    folders, photos = {}, _tiny_processor()([_photo(h, w, seed=h) for h, w in PHOTOS], return_tensors="pt")
    for site, layer, vq in [("patch", 0, {}), ("mlp", 1, {}), ("ln1", 0, {}), ("patch", 0, {"num_codebooks": 2})]:
        model = tiny_split(site, layer, **vq)
        torch.manual_seed(0)  # codewords where these photos' features are, so that many of them are used
        model.init_codebook([dict(photos)], iters=5)
        folder = tmp_path_factory.mktemp(f"qwen_{site}_{layer}_{len(vq)}")
        export_qwen_edge(model, folder, preprocessing=TINY_PREPROCESSING)
        folders[site, layer, len(vq)] = model, folder
    return folders


@needs_model
@pytest.mark.parametrize("key", [("patch", 0, 0), ("mlp", 1, 0), ("ln1", 0, 0), ("patch", 0, 1)],
                         ids=["patch", "mlp-of-block-1", "ln1-of-block-0", "patch-residual"])
def test_onnx_edge_gives_encode_edges_indices(exported, key):
    """Image -> indices on the device equals Qwen's image processor + PyTorch `encode_edge`, token for token."""
    model, folder = exported[key]
    runtime = load_qwen_edge(folder, threads=1)
    processor = _tiny_processor()
    for height, width in PHOTOS:
        photo = _photo(height, width, seed=height)
        batch = processor(photo, return_tensors="pt")
        expected = model.encode_edge(batch["pixel_values"], batch["image_grid_thw"]).numpy()
        indices, grid = runtime(photo)
        assert grid == tuple(batch["image_grid_thw"][0].tolist())
        assert indices.dtype == np.int64 and indices.shape == expected.shape
        assert len(np.unique(expected)) >= 8  # a real choice among codewords, not a constant
        np.testing.assert_array_equal(indices, expected)


@needs_model
def test_edge_folder_and_inputs_are_checked(exported, tmp_path):
    from transformers_alignedvq.export.qwen_edge_onnx import export_qwen_edge

    _, folder = exported["mlp", 1, 0]
    config = json.loads((folder / "qwen_edge.json").read_text())
    assert config["split_site"] == "mlp" and config["window_patches"] == 4 and config["patch_dim"] == 12
    runtime = load_qwen_edge(folder)
    with pytest.raises(ValueError, match="shape"):
        runtime.encode_patches(np.zeros((10, 12), np.float32), (1, 6, 8))
    for grid in [(2, 6, 8), (1, 5, 8), (1, 0, 8), "668"]:
        with pytest.raises(ValueError, match="grid"):
            runtime.encode_patches(np.zeros((48, 12), np.float32), grid)
    with pytest.raises(ValueError, match="missing"):
        load_qwen_edge(tmp_path)
    (tmp_path / "qwen_edge.json").write_text(json.dumps({"format": "something else"}))
    (tmp_path / "qwen_edge.onnx").write_bytes(b"")
    with pytest.raises(ValueError, match="format"):
        load_qwen_edge(tmp_path)
    with pytest.raises(ValueError, match="grouped"):
        export_qwen_edge(tiny_split("patch", 0, num_groups=2), tmp_path / "grouped")
    _, patch_folder = exported["patch", 0, 0]
    (tmp_path / "qwen_edge.onnx").write_bytes((patch_folder / "qwen_edge.onnx").read_bytes())
    (tmp_path / "qwen_edge.json").write_text(json.dumps(config))  # a block site's settings for the patch graph
    with pytest.raises(EdgeCheckpointError, match="takes"):
        load_qwen_edge(tmp_path)


def test_a_broken_edge_folder_is_an_edge_checkpoint_error(tmp_path):
    """Every folder problem, the graph's included (ONNX Runtime raises its own types), is one typed error."""
    pytest.importorskip("onnxruntime")
    (tmp_path / "qwen_edge.onnx").write_bytes(b"not a graph")
    (tmp_path / "qwen_edge.json").write_text("{")
    with pytest.raises(EdgeCheckpointError, match="not valid JSON"):
        load_qwen_edge(tmp_path)
    config = {"format": "qwen2_5_vl_edge", "split_site": "patch", "patch_dim": 12, "window_patches": 4}
    (tmp_path / "qwen_edge.json").write_text(json.dumps(config))
    with pytest.raises(EdgeCheckpointError, match="lacks"):
        load_qwen_edge(tmp_path)
    (tmp_path / "qwen_edge.json").write_text(json.dumps({**config, "preprocessing": {"patch_size": 0}}))
    with pytest.raises(EdgeCheckpointError, match="patch_size"):
        load_qwen_edge(tmp_path)
    config["preprocessing"] = TINY_PREPROCESSING.to_dict()
    for fingerprint in (None, "00ff", "not hex"):  # none (exported before it was recorded), too short, malformed
        (tmp_path / "qwen_edge.json").write_text(json.dumps({**config, "codebook_fingerprint": fingerprint}))
        with pytest.raises(EdgeCheckpointError, match="no valid codebook_fingerprint"):
            load_qwen_edge(tmp_path)
    (tmp_path / "qwen_edge.json").write_text(json.dumps({**config, "codebook_fingerprint": "ab" * 16}))
    with pytest.raises(EdgeCheckpointError, match="qwen_edge.onnx cannot be loaded"):
        load_qwen_edge(tmp_path)


@needs_model
def test_runtime_imports_neither_torch_nor_transformers(exported):
    """Preprocess, lay out windows and run the exported block-site edge in a fresh interpreter."""
    _, folder = exported["mlp", 1, 0]
    code = (
        "import sys, json, numpy as np\n"
        "from transformers_alignedvq.qwen_edge_runtime import load_qwen_edge\n"
        "indices, grid = load_qwen_edge(sys.argv[1], threads=1)(np.full((12, 16, 3), 90, np.uint8))\n"
        "assert grid == (1, 6, 8) and indices.shape == (48,), (grid, indices.shape)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'})))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
