"""``alignedvq export-edge`` and ``alignedvq info`` on checkpoints of the families (LLaVA-OneVision, Qwen2.5-VL; the
tiny random models of their serving tests): the edge folder written is the family's own and gives the model's
indices, the contract printed is the family's (per tile or per patch), and what cannot be done is one line, exit 1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests import test_serving_qwen as qwen_serving
from tests import test_serving_tiled as tiled_serving
from transformers_alignedvq import cli, wire
from transformers_alignedvq.client_edges import open_edge

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.skipif(not tiled_serving._HAS_MM_ENCODER_OUTPUTS, reason="needs transformers>=5.19")


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen")
    model = qwen_serving.tiny_served_qwen()
    model.save_pretrained(folder, save_edge=False)
    qwen_serving.processor().save_pretrained(folder)  # pixel limits 64..768 px: the edge must take them
    entropy = wire.EntropyModel.fit_patch_grids([(np.zeros(16, int), (1, 4, 4))], codebook_size=16)
    entropy.save(folder)
    return folder, model, entropy


def _info(path, capsys) -> dict:
    assert cli.main(["info", "--model", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_qwen_checkpoint_exports_its_windowed_edge_and_describes_itself(qwen_checkpoint, tmp_path, capsys):
    folder, model, entropy = qwen_checkpoint
    out = tmp_path / "edge"
    assert cli.main(["export-edge", "--model", str(folder), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "qwen2_5_vl edge" in printed and "qwen_edge.onnx" in printed
    assert sorted(p.name for p in out.iterdir()) == ["entropy_model.safetensors", "qwen_edge.json", "qwen_edge.onnx"]
    edge = open_edge(out)
    assert (edge.runtime.preprocessing.min_pixels, edge.runtime.preprocessing.max_pixels) == (64, 768)
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    sent = edge.encode(image)
    inputs = qwen_serving.image_processor()(images=image, return_tensors="pt")
    with torch.no_grad():
        expected = model.encode_edge(inputs["pixel_values"], inputs["image_grid_thw"]).reshape(-1).numpy()
    assert sent.layout == tuple(inputs["image_grid_thw"][0].tolist())
    np.testing.assert_array_equal(sent.indices, expected)

    full, edge_info = _info(folder, capsys), _info(out, capsys)
    shared = ("family", "split_layer", "split_site", "codebook_size", "bits_per_index", "codes_per_token",
              "patch_size", "spatial_merge_size", "codebook_fingerprint", "entropy_model")
    assert {k: full[k] for k in shared} == {k: edge_info[k] for k in shared}
    assert full["family"] == "qwen2_5_vl" and full["checkpoint"] == "full" and full["codebook_size"] == 16
    assert full["codebook_fingerprint"] == edge.fingerprint.hex() and full["payload_bits_per_patch"] == 4
    assert full["entropy_model"] == entropy.model_id.hex() and full["entropy_model_codes"] == "patch grids"
    assert (edge_info["min_pixels"], edge_info["max_pixels"]) == (64, 768) and full["edge_files"] == []


def test_what_the_qwen_edge_cannot_be_is_one_line(qwen_checkpoint, tmp_path, capsys):
    from PIL import Image

    folder, _, _ = qwen_checkpoint
    (tmp_path / "images").mkdir()
    Image.new("RGB", (20, 30)).save(tmp_path / "images" / "a.png")
    for extra, words in ((["--format", "safetensors"], "drop --format safetensors"),
                         (["--int8", "--calibration-images", str(tmp_path / "images")], "drop --int8")):
        assert cli.main(["export-edge", "--model", str(folder), "--output", str(tmp_path / "e"), *extra]) == 1
        err = capsys.readouterr().err
        assert err == f"alignedvq: error: the Qwen2.5-VL edge is exported as fp32 ONNX only (qwen_edge.onnx): " \
                      f"{words}\n"  # before the model is read: nothing else printed
        assert not (tmp_path / "e").exists()


def test_onevision_checkpoint_exports_its_tiled_edge(tmp_path, capsys):
    model = tiled_serving.tiny_onevision_alignedvq()
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder, save_edge=False)
    out = tmp_path / "edge"
    assert cli.main(["export-edge", "--model", str(folder), "--output", str(out)]) == 0
    assert "llava_onevision edge" in capsys.readouterr().out
    edge = open_edge(out)
    image = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    sent = edge.encode(image)
    assert sent.geometry.num_tiles == 5 and sent.indices.shape == (5 * 16,)
    full, edge_info = _info(folder, capsys), _info(out, capsys)
    assert full["checkpoint"] == "full" and edge_info["checkpoint"] == "edge (onnx)" and full["edge_files"] == []
    for info in (full, edge_info):
        assert info["family"] == "llava_onevision" and info["tokens_per_tile"] == 16 and info["grid"] == [4, 4]
        assert not info["has_cls_token"] and info["max_tiles_per_image"] == 5 and info["payload_bytes_per_tile"] == 8
        assert info["codebook_fingerprint"] == edge.fingerprint.hex()


def test_info_names_what_a_folder_is_not(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    assert cli.main(["info", "--model", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "model_type 'qwen2_5_vl', not an AlignedVQ model's" in err and "from_vlm" in err and err.count("\n") == 1
