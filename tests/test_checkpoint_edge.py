"""The edge files a checkpoint carries (`edge_export.write_checkpoint_edge`, called by `save_pretrained`)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from tests.conftest import IMAGE_SIZE, tiny_alignedvq
from transformers_alignedvq.edge_runtime import load_edge_runtime

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")
PIXELS = np.random.default_rng(0).standard_normal((3, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)


@pytest.fixture(scope="module")
def model():
    return tiny_alignedvq(seed=3)


def _edge_files(folder) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.startswith("edge_") and not p.name.endswith(".py")}


def test_save_pretrained_writes_the_fp32_onnx_edge_beside_the_pytorch_one(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert _edge_files(tmp_path) == {"edge_config.json", "edge_model.safetensors", "edge_model.onnx"}
    assert json.loads((tmp_path / "edge_config.json").read_text())["onnx"]["int8"] is False
    onnx, torch_edge = load_edge_runtime(tmp_path, backend="onnx"), load_edge_runtime(tmp_path, backend="torch")
    assert onnx.fingerprint == torch_edge.fingerprint == model.codebook_fingerprint()
    assert np.array_equal(onnx.encode(PIXELS), torch_edge.encode(PIXELS))


def test_int8_edge_is_calibrated_on_the_images_given(model, tmp_path):
    images = [np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8) for i in range(6)]
    with pytest.raises(ValueError, match="edge_calibration_images"):
        model.save_pretrained(tmp_path / "no-images", save_edge="int8")
    model.save_pretrained(tmp_path, save_edge="int8", edge_calibration_images=images)
    assert json.loads((tmp_path / "edge_config.json").read_text())["onnx"] == {
        "file": "edge_model.onnx", "int8": True, "calibration_images": 6}
    assert load_edge_runtime(tmp_path, backend="onnx").encode(PIXELS).shape[0] == 3


@pytest.mark.parametrize("mode, files", [("safetensors", {"edge_config.json", "edge_model.safetensors"}),
                                         (False, set())])
def test_the_pytorch_edge_alone_or_no_edge(model, tmp_path, mode, files):
    model.save_pretrained(tmp_path, save_edge=mode)
    assert _edge_files(tmp_path) == files


def test_without_the_onnx_exporter_the_default_warns_and_int8_refuses(model, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.warns(RuntimeWarning, match="onnxscript not installed.*no ONNX edge"):
        model.save_pretrained(tmp_path / "default")
    assert _edge_files(tmp_path / "default") == {"edge_config.json", "edge_model.safetensors"}
    with pytest.raises(ImportError, match=r"transformers-alignedvq\[export\]"):
        model.save_pretrained(tmp_path / "int8", save_edge="int8", edge_calibration_images=[PIXELS[0]])
    with pytest.raises(ValueError, match="save_edge='fp16' must be"):
        model.save_pretrained(tmp_path / "bad", save_edge="fp16")
