"""Config sizes checked against the limits and the safetensors headers before anything is built."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from transformers_alignedvq.checkpoint_limits import CheckpointSizeError, check_model_folder, safetensors_shapes
from transformers_alignedvq.edge_runtime import EdgeCheckpointError, load_edge_runtime
from transformers_alignedvq.serving import ServerConfigError, create_app


def edited(source, target, name, edit):
    shutil.copytree(source, target)
    path = target / name
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return target


def test_a_good_deployment_passes_and_headers_are_read_without_the_data(deployment):
    check_model_folder(deployment)
    shapes = safetensors_shapes([deployment / "model.safetensors"])
    assert shapes["model.alignedvq.quantizer.codebook"] == [1, 1, 12, 32]


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(codebook_size=2**31), r"codebook_size=2147483648 is not an integer in \[0, 1048576\]"),
    (lambda c: c.update(codebook_size=13), r"codebook_size.*\[1, 1, 13, 32\].*\[1, 1, 12, 32\]"),
    (lambda c: c["vision_config"].update(num_hidden_layers=10**6), r"num_hidden_layers=1000000"),
    # 5, not 4: with the feature layer at -2, a config of 4 blocks whose weights hold 3 is a checkpoint saved
    # without its unused last block, which is allowed
    (lambda c: c["vision_config"].update(num_hidden_layers=5), r"vision num_hidden_layers=5 but the weights hold 3"),
    (lambda c: c["text_config"].update(num_hidden_layers=5), r"text num_hidden_layers=5 but the weights hold 2"),
    (lambda c: c["text_config"].update(vocab_size=10**5), r"vocab_size.*\[100000, 32\].*\[100, 32\]"),
])
def test_the_server_refuses_a_lying_config_before_building_it(deployment, tmp_path, edit, message):
    folder = edited(deployment, tmp_path / "model", "config.json", edit)
    start = time.perf_counter()
    with pytest.raises(ServerConfigError, match=message):
        create_app(folder, warmup=False)
    assert time.perf_counter() - start < 5  # refused from the headers, nothing allocated or built


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(codebook_size=2**31), r"codebook_size=2147483648"),
    (lambda c: c.update(codebook_size=64), r"codebook_size.*\[1, 1, 64, 32\].*\[1, 1, 12, 32\]"),
    (lambda c: c["vision_config"].update(num_hidden_layers=10**6), r"num_hidden_layers=1000000"),
    (lambda c: c["vision_config"].update(image_size=64), r"image tokens.*\[65, 32\].*\[17, 32\]"),
    (lambda c: c.update(split_layer=7), r"split_layer=7 is not a vision block of 3"),
])
def test_the_edge_refuses_a_lying_edge_config(deployment, tmp_path, edit, message):
    folder = edited(deployment, tmp_path / "model", "edge_config.json", edit)
    with pytest.raises(EdgeCheckpointError, match=message):
        load_edge_runtime(folder, backend="torch")


def test_a_file_that_is_not_safetensors_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointSizeError, match="model.safetensors: a header of"):
        safetensors_shapes([path])


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory):
    """Full checkpoints of the families that save Transformers' own names: OneVision (SigLIP tower, no CLS token)
    and Qwen2.5-VL (its own tower of `depth` blocks, `model.visual.blocks.N`)."""
    import test_family_onevision as ov
    import test_family_qwen2_5_vl as qw

    from transformers_alignedvq.models.family import from_vlm

    if not (ov._HAS_MM_ENCODER_OUTPUTS and qw._HAS_MM_ENCODER_OUTPUTS):
        pytest.skip("the families need a newer transformers")
    root = tmp_path_factory.mktemp("families")
    for name, base in (("onevision", ov.tiny_onevision), ("qwen", qw.tiny_qwen)):
        from_vlm(base(0), split_layer=1, split_site="mlp", codebook_size=16).save_pretrained(root / name,
                                                                                            save_edge=False)
    return root


@pytest.mark.parametrize("family, edit, message", [
    ("onevision", None, None),
    ("qwen", None, None),
    # SigLIP has no CLS token: 8x8 patches are 64 positions, not 65
    ("onevision", lambda c: c["vision_config"].update(image_size=32), r"image tokens.*\[64, 32\].*\[16, 32\]"),
    ("onevision", lambda c: c["text_config"].update(num_hidden_layers=3), r"text num_hidden_layers=3.*hold 2"),
    ("qwen", lambda c: c["vision_config"].update(depth=4), r"vision depth=4 but the weights hold 3"),
    ("qwen", lambda c: c["vision_config"].update(depth=10**6), r"depth=1000000 is not an integer in \[0, 512\]"),
    ("qwen", lambda c: c["text_config"].update(num_hidden_layers=3), r"text num_hidden_layers=3.*hold 2"),
])
def test_family_checkpoints_are_checked_under_their_own_names(family_folders, tmp_path, family, edit, message):
    if edit is None:
        check_model_folder(family_folders / family)
        return
    folder = edited(family_folders / family, tmp_path / family, "config.json", edit)
    with pytest.raises(CheckpointSizeError, match=message):
        check_model_folder(folder)


def test_a_checkpoint_without_the_blocks_after_the_feature_layer_passes(deployment, tmp_path):
    """A tower of 4 blocks read at layer -2 needs 3 of them: weights holding just those belong to the config."""
    folder = edited(deployment, tmp_path / "model", "config.json",
                    lambda c: c["vision_config"].update(num_hidden_layers=4) or c.update(vision_feature_layer=-2))
    check_model_folder(folder)
