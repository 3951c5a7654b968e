"""Checkpoints of LLaVA-NeXT, LLaVA-OneVision and Qwen2.5-VL split by AlignedVQ, as LLaVA's (`test_hub.py`): both
kinds through the Auto classes with an unmerged LoRA, strict loading, the family's edge files and card, and the
flattened remote code, loaded with `trust_remote_code=True` in a Python without this package."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import peft
import pytest
import test_family_next as nx
import test_family_onevision as ov
import test_family_qwen2_5_vl as qw
import torch
from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.hf_api import CommitInfo, RepoUrl
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForImageTextToText

from transformers_alignedvq.hub import REMOTE_CODE, CheckpointMismatchError, checkpoint_files, flat_source
from transformers_alignedvq.lora import add_lora, enable_lora, has_lora
from transformers_alignedvq.models.family import from_vlm

pytestmark = pytest.mark.skipif(not ov._HAS_MM_ENCODER_OUTPUTS, reason="the families need forward(mm_encoder_outputs)")

KINDS = ("full", "adapter")
LORA_FILES = {"lora/adapter_config.json", "lora/adapter_model.safetensors"}
TILED_EDGE = {"edge_config.json", "edge_model.safetensors", "edge_model.onnx"}
QWEN_EDGE = {"qwen_edge.json", "qwen_edge.onnx"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
CHILD_TIMEOUT = 300


@dataclass
class Family:
    base: Callable[[int], torch.nn.Module]  # the tiny random base VLM of the family's own tests
    vq: dict
    pixels: Callable[[], torch.Tensor]
    geometry: dict  # what encode_edge and forward take beside the pixels
    prompt: Callable[[torch.nn.Module], dict]
    title: str
    tag: str
    edge_files: set


FAMILIES = {
    "llava_next": Family(nx.tiny_next, dict(split_layer=0, split_site="ln1"), nx.pixels, {"image_sizes": nx.SIZES},
                         lambda model: {"input_ids": nx.prompt(model)}, "LLaVA-NeXT", "llava-next", TILED_EDGE),
    "llava_onevision": Family(ov.tiny_onevision, dict(split_layer=1, split_site="mlp"), ov.pixels,
                              {"image_sizes": ov.SIZES}, lambda model: {"input_ids": ov.prompt(model)},
                              "LLaVA-OneVision", "llava-onevision", TILED_EDGE),
    "qwen2_5_vl": Family(qw.tiny_qwen, dict(split_layer=1, split_site="mlp"), qw.pixels, {"image_grid_thw": qw.GRID},
                         lambda model: dict(zip(("input_ids", "attention_mask"), qw.prompt())), "Qwen2.5-VL",
                         "qwen2.5-vl", QWEN_EDGE),
}


def run_model(model, family: Family, prompt: dict):
    pixels = family.pixels()
    with torch.no_grad():
        indices = model.encode_edge(pixels, *family.geometry.values())
        logits = model(pixel_values=pixels, **family.geometry, **prompt).logits
    return indices, logits


def assert_same_outputs(model, setup, *, atol=1e-5):
    indices, logits = run_model(model.eval(), setup.family, setup.prompt)
    assert torch.equal(indices, setup.indices)
    torch.testing.assert_close(logits, setup.logits, rtol=0, atol=atol)


@pytest.fixture(scope="module", params=list(FAMILIES))
def setup(request, tmp_path_factory):
    """A tiny split model of the family, converted from a saved base, with non-trivial DLP, EMA state and an
    unmerged LoRA, saved as both kinds."""
    name, family = request.param, FAMILIES[request.param]
    root = tmp_path_factory.mktemp(name)
    family.base(0).save_pretrained(root / "base")
    model = from_vlm(str(root / "base"), codebook_size=16, **family.vq)
    torch.manual_seed(1)
    model.init_codebook([{"pixel_values": family.pixels(), **family.geometry}], iters=3)
    with torch.no_grad():
        layer = model.model.alignedvq
        layer.dlp_in.gate.fill_(0.5)  # gates start at 0 (DLP = identity): a DLP lost on the way would go unnoticed
        layer.dlp_out.gate.fill_(-0.3)
        layer.quantizer.cluster_size.uniform_(0.5, 1.5)
        layer.quantizer.embed_sum.normal_()
    add_lora(model, peft.LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False))
    model.eval()
    prompt = family.prompt(model)
    indices, logits = run_model(model, family, prompt)
    enable_lora(model, False)
    assert not torch.allclose(logits, run_model(model, family, prompt)[1], atol=1e-3)  # the LoRA matters
    enable_lora(model)
    dirs = {kind: root / kind for kind in KINDS}
    for kind, directory in dirs.items():
        model.save_pretrained(directory, checkpoint_kind=kind)
    expected = {"pixel_values": family.pixels(), **family.geometry, **prompt, "indices": indices, "logits": logits}
    save_file({key: value.contiguous() for key, value in expected.items()}, str(root / "expected.safetensors"))
    return SimpleNamespace(name=name, family=family, root=root, model=model, prompt=prompt, indices=indices,
                           logits=logits, dirs=dirs, expected_path=root / "expected.safetensors")


# ------------------------------------------------------------------------------------------------------------
# both kinds, through the Auto classes
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_both_kinds_round_trip_with_their_lora(setup, kind):
    directory = setup.dirs[kind]
    files = set(checkpoint_files(directory))
    assert not [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    assert LORA_FILES | setup.family.edge_files | {"config.json", "README.md"} <= files
    assert ("model.safetensors" in files) == (kind == "full") and ("alignedvq.safetensors" in files) == (kind == "adapter")
    config = json.loads((directory / "config.json").read_text())
    assert config["checkpoint_kind"] == kind and config["auto_map"] == REMOTE_CODE[config["model_type"]].auto_map()
    loaded = AutoModelForImageTextToText.from_pretrained(directory)
    assert type(loaded) is type(setup.model) and has_lora(loaded)
    assert loaded.config.checkpoint_kind == kind and loaded.config.base_model_name_or_path == str(setup.root / "base")
    assert_same_outputs(loaded, setup)
    assert type(AutoModel.from_pretrained(directory)) is type(setup.model)


def test_adapter_kind_holds_only_the_alignedvq_and_lora_tensors(setup):
    with safe_open(str(setup.dirs["adapter"] / "alignedvq.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys and all(key.startswith("model.alignedvq.") for key in keys)
    assert not any(key.endswith(("cluster_size", "embed_sum")) for key in keys)  # no EMA state by default
    sizes = checkpoint_files(setup.dirs["adapter"])
    assert sizes["alignedvq.safetensors"] < checkpoint_files(setup.dirs["full"])["model.safetensors"] / 5


def test_merged_lora_saves_a_full_checkpoint_without_adapter_files(setup, tmp_path):
    copy.deepcopy(setup.model).save_pretrained(tmp_path, merge_lora=True, save_edge=False)
    assert not LORA_FILES & set(checkpoint_files(tmp_path))
    loaded = AutoModel.from_pretrained(tmp_path)
    assert not has_lora(loaded)
    assert_same_outputs(loaded, setup)


def test_ema_state_travels_in_full_checkpoints(setup):
    loaded = AutoModel.from_pretrained(setup.dirs["full"])
    for name in ("cluster_size", "embed_sum"):
        assert torch.equal(getattr(loaded.model.alignedvq.quantizer, name),
                           getattr(setup.model.model.alignedvq.quantizer, name))


def test_the_trainers_way_back_in_restores_every_tensor_and_refuses_a_partial_file(setup):
    """The `Trainer` resumes by `load_state_dict(file, strict=False)` into the model it trains (LoRA included)."""
    model = copy.deepcopy(setup.model)
    with torch.no_grad():
        model.model.alignedvq.quantizer.codebook.normal_()
        model.model.alignedvq.dlp_in.gate.zero_()
        next(p for n, p in model.named_parameters() if ".lora_B." in n).zero_()
    state = load_file(str(setup.dirs["full"] / "model.safetensors"))
    model.load_state_dict(state, strict=False)
    assert_same_outputs(model, setup, atol=0.0)
    state.pop("model.alignedvq.quantizer.codebook")
    with pytest.raises(CheckpointMismatchError, match="quantizer.codebook"):
        model.load_state_dict(state, strict=False)


def test_weights_in_memory_load_as_strictly_as_a_folder(setup):
    state = load_file(str(setup.dirs["full"] / "model.safetensors"))
    state = {key: value for key, value in state.items() if ".lora_" not in key}  # a model without LoRA layers
    cls = type(setup.model)
    config = cls.config_class.from_pretrained(setup.dirs["full"])
    loaded = cls.from_pretrained(None, config=config, state_dict=state)
    assert loaded.model.alignedvq.quantizer.codebook.equal(setup.model.model.alignedvq.quantizer.codebook)
    state.pop("model.alignedvq.dlp_out.proj.weight")
    with pytest.raises(CheckpointMismatchError, match="dlp_out.proj.weight"):
        cls.from_pretrained(None, config=config, state_dict=state)


# ------------------------------------------------------------------------------------------------------------
# strict loading
# ------------------------------------------------------------------------------------------------------------
def _drop(prefix):
    return lambda state: [state.pop(key) for key in [key for key in state if key.startswith(prefix)]]


def _set(key_pattern, make):
    def change(state):
        key = next(key for key in sorted(state) if re.search(key_pattern, key))
        state[key] = make(state[key])
    return change


STRICT_CASES = {
    "codebook removed": (_drop("model.alignedvq.quantizer.codebook"), r"missing \['model.alignedvq.quantizer.codebook'\]"),
    "language-model layer removed": (_drop("model.language_model.layers.1."), r"missing \['model.language_model.layers.1"),
    "unexpected tensor": (lambda state: state.update(extra=torch.zeros(3)), r"unexpected \['extra'\]"),
    "one tensor half precision": (_set(r"lm_head\.weight", torch.Tensor.half), r"lm_head.weight \(F16, the others are F32\)"),
    "codebook in bf16": (_set(r"quantizer\.codebook", torch.Tensor.bfloat16), r"codebook \(BF16, must be F32\)"),
    "DLP of another shape": (_set(r"dlp_in\.proj\.bias", lambda t: torch.zeros(t.numel() + 1)),
                             r"of another shape \['model.alignedvq.dlp_in.proj.bias'"),
}


@pytest.mark.parametrize("case", STRICT_CASES)
def test_full_checkpoints_load_strictly(setup, tmp_path, case):
    change, message = STRICT_CASES[case]
    shutil.copytree(setup.dirs["full"], tmp_path, dirs_exist_ok=True)
    path = tmp_path / "model.safetensors"
    state = load_file(str(path))
    change(state)
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError, match=message):
        AutoModelForImageTextToText.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "trailing"])
@pytest.mark.parametrize("kind", KINDS)
def test_damaged_weights_files_fail_with_the_same_error_type(setup, tmp_path, kind, damage):
    shutil.copytree(setup.dirs[kind], tmp_path, dirs_exist_ok=True)
    path = tmp_path / ("model.safetensors" if kind == "full" else "alignedvq.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100] if damage == "truncated" else data + b"\0" * 16)
    with pytest.raises(CheckpointMismatchError, match=path.name):
        AutoModel.from_pretrained(tmp_path)


def test_an_adapter_for_another_architecture_is_refused_before_reading_weights(setup, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(setup.root / "base", base)
    config = json.loads((base / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 3
    config["text_config"].pop("layer_types", None)  # rebuilt from the layer count
    (base / "config.json").write_text(json.dumps(config))
    (base / "model.safetensors").write_bytes(b"not read")
    adapter = tmp_path / "adapter"
    shutil.copytree(setup.dirs["adapter"], adapter)
    config = json.loads((adapter / "config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (adapter / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError, match="text_config.num_hidden_layers: adapter expects 2, base has 3"):
        AutoModel.from_pretrained(adapter)


def test_a_damaged_base_is_refused_when_converted(setup, tmp_path):
    shutil.copytree(setup.root / "base", tmp_path, dirs_exist_ok=True)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointMismatchError, match="model.safetensors is truncated"):
        from_vlm(str(tmp_path), codebook_size=16, **setup.family.vq)


def test_a_plain_checkpoint_is_refused_with_the_way_to_convert_it(setup):
    with pytest.raises(CheckpointMismatchError, match=r"not an AlignedVQ one.*from_vlm"):
        type(setup.model).from_pretrained(setup.root / "base")


# ------------------------------------------------------------------------------------------------------------
# the edge files and the card
# ------------------------------------------------------------------------------------------------------------
def test_the_checkpoint_edge_gives_encode_edges_indices(setup):
    pytest.importorskip("onnxruntime")
    folder = setup.dirs["full"]
    if setup.name == "qwen2_5_vl":
        from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil_processing

        from transformers_alignedvq.qwen_edge_runtime import load_qwen_edge

        photo = np.random.default_rng(3).integers(0, 256, (40, 56, 3), dtype=np.uint8)
        processor = pil_processing.Qwen2VLImageProcessorPil(patch_size=qw.PATCH, merge_size=qw.MERGE,
                                                            temporal_patch_size=qw.TEMPORAL)
        batch = processor(photo, return_tensors="pt")
        indices, grid = load_qwen_edge(folder, threads=1)(photo)
        assert grid == tuple(batch["image_grid_thw"][0].tolist())
        expected = setup.model.encode_edge(batch["pixel_values"], batch["image_grid_thw"]).numpy()
    else:
        from PIL import Image

        from transformers_alignedvq.edge_tiles import load_tiled_edge
        from transformers_alignedvq.export.tiled_edge import model_tiling

        assert json.loads((folder / "edge_config.json").read_text())["family"] == setup.name
        image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (20, 30, 3), dtype=np.uint8))
        indices = load_tiled_edge(folder, backend="onnx", threads=1).encode_image(image).indices
        tiles = torch.from_numpy(model_tiling(setup.model)(image).pixels)
        expected = setup.model.encode_edge(tiles, [image.size[::-1]]).numpy()
    assert len(np.unique(expected)) >= 4  # a real choice among codewords
    np.testing.assert_array_equal(indices, expected)


@pytest.mark.parametrize("mode", ["int8", "safetensors"])
def test_other_edge_modes(setup, tmp_path, mode):
    """The tiled families write the PyTorch edge alone or an int8 front calibrated on real images; Qwen's edge has
    neither form and says so."""
    from PIL import Image

    images = [Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 30, 3), dtype=np.uint8))
              for seed in range(2)]
    model = copy.deepcopy(setup.model)
    if setup.name == "qwen2_5_vl":
        with pytest.raises(ValueError, match="fp32 ONNX only"):
            model.save_pretrained(tmp_path, save_edge=mode, edge_calibration_images=images)
        assert not list(tmp_path.iterdir())  # refused before anything is written
        return
    if mode == "int8":
        pytest.importorskip("onnxruntime")
    model.save_pretrained(tmp_path, save_edge=mode, edge_calibration_images=images)
    config = json.loads((tmp_path / "edge_config.json").read_text())
    assert (tmp_path / "edge_model.safetensors").is_file()
    assert (tmp_path / "edge_model.onnx").is_file() == (mode == "int8")
    if mode == "int8":
        assert config["onnx"]["calibration_images"] == 2


@pytest.mark.parametrize("kind", KINDS)
def test_model_card_names_the_family(setup, kind):
    card = ModelCard.load(setup.dirs[kind] / "README.md")
    title = setup.family.title
    assert card.data.model_name.startswith(f"{title} AlignedVQ (block ") and setup.family.tag in card.data.tags
    assert f"A {title} model split" in card.text and "LlavaForConditionalGeneration`" not in card.text
    geometry = next(iter(setup.family.geometry))
    assert f"model.encode_edge(pixel_values, {geometry})" in card.text
    assert f"checkpoint kind | {kind}" in card.text
    if setup.name == "qwen2_5_vl":  # the count follows from the grid of the model's own patch size
        assert f"one index per {setup.model.config.vision_config.patch_size}-px patch" in card.text
    for name in setup.family.edge_files:
        assert f"- `{name}`" in card.text


@pytest.mark.parametrize("kind", KINDS)
def test_push_to_hub_uploads_the_checkpoint_with_the_familys_card(setup, tmp_path, kind):
    """`push_to_hub` with only its two network calls replaced (offline otherwise): the files of a save, our card
    titled with the repo's name, and a checkpoint that loads."""
    endpoint, uploads = constants.ENDPOINT, {}

    def create_commit(self, repo_id, operations, **kwargs):
        uploads.update({op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations})
        return CommitInfo(commit_url=f"{endpoint}/{repo_id}/commit/{'0' * 40}", commit_message="",
                          commit_description="", oid="0" * 40, _endpoint=endpoint)

    model = copy.deepcopy(setup.model)
    model.config.checkpoint_kind = kind  # push_to_hub saves with the configured kind
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        patch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: RepoUrl(f"{endpoint}/{repo_id}", endpoint=endpoint))
        patch.setattr(HfApi, "create_commit", create_commit)
        model.push_to_hub(f"org/{setup.name}-alignedvq-{kind}")
    assert set(uploads) == set(checkpoint_files(setup.dirs[kind]))
    card = ModelCard(uploads["README.md"].decode())
    assert f"\n# {setup.name}-alignedvq-{kind}\n" in card.text and setup.family.tag in card.data.tags
    for name, data in uploads.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    assert_same_outputs(AutoModel.from_pretrained(tmp_path), setup)


# ------------------------------------------------------------------------------------------------------------
# remote code
# ------------------------------------------------------------------------------------------------------------
def test_checkpoints_carry_what_transformers_resolves_as_remote_code(setup):
    """What Transformers' remote-code loader resolves from the auto_map's files is exactly the shipped code, each
    file its package source with the package-relative imports made sibling ones."""
    from transformers.dynamic_module_utils import get_relative_import_files

    folder = setup.dirs["full"]
    config = json.loads((folder / "config.json").read_text())
    code = REMOTE_CODE[config["model_type"]]
    entry_files = {folder / (reference.split(".")[0] + ".py") for reference in config["auto_map"].values()}
    resolved = entry_files | {Path(f) for entry in entry_files for f in get_relative_import_files(str(entry))}
    shipped = {name for name in checkpoint_files(folder) if name.endswith(".py")}
    assert {path.name for path in resolved} == shipped == set(code.sources())
    for name, source in code.sources().items():
        text = (folder / name).read_text()
        assert text == flat_source(source) and not re.search(r"^\s*from \.\.|^\s*from \.\w+\.", text, re.MULTILINE)


REMOTE_CODE_CHILD = r"""
import importlib.util, json, sys
assert importlib.util.find_spec("transformers_alignedvq") is None, "transformers_alignedvq is importable here"
import torch
torch.set_num_threads(1)
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

report = {}
for expected_path, folder in zip(sys.argv[1::2], sys.argv[2::2]):
    expected = load_file(expected_path)
    try:
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    except OSError as exc:
        report[folder] = f"refused: {exc}"
        continue
    geometry = {k: v for k, v in expected.items() if k in ("image_sizes", "image_grid_thw")}
    prompt = {k: v for k, v in expected.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        indices = model.encode_edge(expected["pixel_values"], *geometry.values())
        logits = model(pixel_values=expected["pixel_values"], **geometry, **prompt).logits
    assert torch.equal(indices, expected["indices"]), folder
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
    report[folder] = type(model).__module__
assert "transformers_alignedvq" not in sys.modules
print(json.dumps(report))
"""


def test_checkpoints_load_with_trust_remote_code_without_the_package(setup, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    # PYTHONPATH shares this environment's packages but, unlike site-packages seen through `site`, does not run
    # their .pth files: the editable install of transformers_alignedvq is one.
    site_dirs = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(site_dirs), "PYTHONNOUSERSITE": "1",
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_MODULES_CACHE", None)
    merged = tmp_path / "merged"
    copy.deepcopy(setup.model).save_pretrained(merged, merge_lora=True, save_edge=False)
    folders = [merged, setup.dirs["full"], setup.dirs["adapter"]]
    args = [str(path) for folder in folders for path in (setup.expected_path, folder)]
    result = subprocess.run([str(python), "-c", REMOTE_CODE_CHILD, *args], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert result.returncode == 0, f"child failed:\n{result.stderr[-4000:]}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report[str(merged)].startswith("transformers_modules."), report
    # An unmerged LoRA and the adapter-only kind need the package's loader: without it, a clear refusal.
    assert "unmerged LoRA" in report[str(setup.dirs["full"])] and "merge_lora=True" in report[str(setup.dirs["full"])]
    assert "adapter-only" in report[str(setup.dirs["adapter"])] and "pip install" in report[str(setup.dirs["adapter"])]
