"""Hub checkpoints: the full and adapter-only kinds on disk, their model cards, what `push_to_hub` uploads,
loading with `trust_remote_code=True` where this package is not installed, and loading by repo id from a
Hub-compatible server (olah) on loopback, then offline from the cache.

Everything runs offline. Subprocesses are used where the environment must differ from this one: a Python
without `transformers_alignedvq`, and `HF_ENDPOINT`/`HF_HOME`, which huggingface_hub reads at import.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import peft
import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, constants
from huggingface_hub.hf_api import CommitInfo, RepoUrl
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModel

import transformers_alignedvq as tav
from tests.conftest import IMAGE_SIZE, NUM_PATCHES, prompt_ids, tiny_alignedvq, tiny_llava, tiny_llava_config
from transformers_alignedvq.hub import CheckpointMismatchError, checkpoint_files
from transformers_alignedvq.lora import add_lora, enable_lora, has_lora
from transformers_alignedvq.testing import WITHOUT_CLOUD_PACKAGES, save_tiny_deployment

KINDS = ("full", "adapter")
CODEBOOK_SIZE = 16
LORA_FILES = {"lora/adapter_config.json", "lora/adapter_model.safetensors"}
EDGE_FILES = {"edge_config.json", "edge_model.safetensors", "edge_model.onnx"}
EMA_KEYS = {"model.alignedvq.quantizer.cluster_size", "model.alignedvq.quantizer.embed_sum"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
GENERIC_CARD = "This is the model card of a 🤗 transformers model"
CHILD_TIMEOUT = 300


def run_model(model, pixels, input_ids):
    with torch.no_grad():
        indices = model.encode_edge(pixels)
        logits = model(input_ids=input_ids, pixel_values=pixels).logits
    return indices, logits


def assert_same_outputs(model, expected, *, atol=0.0):
    indices, logits = run_model(model.eval(), expected.pixels, expected.input_ids)
    assert torch.equal(indices, expected.indices)
    torch.testing.assert_close(logits, expected.logits, rtol=0, atol=atol)


def safetensors_keys(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def set_config(folder: Path, **values) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny AlignedVQ model with non-trivial DLP, EMA state and LoRA, saved as both kinds."""
    root = tmp_path_factory.mktemp("hub")
    base_dir = root / "base"
    tiny_llava(seed=0).save_pretrained(base_dir)
    model = tiny_alignedvq(seed=0, codebook_size=CODEBOOK_SIZE)  # built on tiny_llava(seed=0): the saved base
    with torch.no_grad():
        layer = model.model.alignedvq
        # Gates start at 0 (DLP = identity): a DLP lost on the way would go unnoticed.
        layer.dlp_in.gate.fill_(0.5)
        layer.dlp_out.gate.fill_(-0.3)
        quantizer = layer.quantizer
        generator = torch.Generator().manual_seed(7)
        quantizer.cluster_size.copy_(torch.rand(quantizer.cluster_size.shape, generator=generator) + 0.5)
        quantizer.embed_sum.copy_(torch.randn(quantizer.embed_sum.shape, generator=generator))
    model.config.base_model_name_or_path = str(base_dir)
    torch.manual_seed(1)
    add_lora(model, peft.LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False))
    model.eval()

    pixels = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(123))
    input_ids = prompt_ids()
    indices, logits = run_model(model, pixels, input_ids)
    enable_lora(model, False)
    _, logits_without_lora = run_model(model, pixels, input_ids)
    enable_lora(model)
    # Otherwise a checkpoint that dropped the LoRA would pass every comparison below.
    assert not torch.allclose(logits, logits_without_lora, atol=1e-3)

    expected = SimpleNamespace(pixels=pixels, input_ids=input_ids, indices=indices, logits=logits)
    expected_path = root / "expected.safetensors"  # for the subprocesses; safetensors, never pickle
    save_file({k: v.contiguous() for k, v in vars(expected).items()}, str(expected_path))

    dirs = {kind: root / kind for kind in KINDS}
    for kind, directory in dirs.items():
        model.save_pretrained(directory, checkpoint_kind=kind)
    return SimpleNamespace(root=root, base_dir=base_dir, model=model, expected=expected, expected_path=expected_path, dirs=dirs)


# --------------------------------------------------------------------------------------------------------
# 1. both kinds round trip through a folder
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_both_kinds_round_trip_with_their_lora(setup, kind):
    directory = setup.dirs[kind]
    files = checkpoint_files(directory)
    assert not [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    assert LORA_FILES <= set(files) and EDGE_FILES <= set(files)
    assert {"config.json", "README.md", "modeling_alignedvq.py", "split.py"} <= set(files) and "hub.py" not in files
    config = json.loads((directory / "config.json").read_text())
    assert config["checkpoint_kind"] == kind
    assert config["auto_map"]["AutoModel"] == "modeling_alignedvq.LlavaAlignedVQForConditionalGeneration"

    loaded = AutoModel.from_pretrained(directory)
    assert type(loaded) is tav.LlavaAlignedVQForConditionalGeneration
    assert has_lora(loaded)
    assert_same_outputs(loaded, setup.expected)


def test_an_unmerged_lora_loads_without_an_unexpected_keys_report(setup):
    """The full kind keeps the LoRA tensors in its weights file too (for the Trainer); the package applies the LoRA
    from lora/ strictly, so Transformers' own load report (a logged warning) must not call them unexpected."""
    import io
    import logging as std_logging

    from transformers.utils import logging

    stream = io.StringIO()
    handler = std_logging.StreamHandler(stream)
    logging.add_handler(handler)
    try:
        loaded = AutoModel.from_pretrained(setup.dirs["full"])
    finally:
        logging.remove_handler(handler)
    assert has_lora(loaded)
    assert "UNEXPECTED" not in stream.getvalue() and "lora_" not in stream.getvalue(), stream.getvalue()


def test_adapter_kind_holds_no_base_weights_and_is_much_smaller(setup):
    full, adapter = checkpoint_files(setup.dirs["full"]), checkpoint_files(setup.dirs["adapter"])
    assert "model.safetensors" in full and "model.safetensors" not in adapter
    assert "alignedvq.safetensors" in adapter and "alignedvq.safetensors" not in full
    # Everything else (config, sources, card, LoRA, edge) is shared by the two kinds.
    assert set(full) - {"model.safetensors"} == set(adapter) - {"alignedvq.safetensors"}
    assert all(k.startswith("model.alignedvq.") for k in safetensors_keys(setup.dirs["adapter"] / "alignedvq.safetensors"))
    base_keys = safetensors_keys(setup.dirs["full"] / "model.safetensors")
    # An unmerged LoRA is in PEFT's format in lora/, and in the weights file too, where the Trainer resumes from.
    assert {k.split(".lora_")[1] for k in base_keys if ".lora_" in k} == {"A.default.weight", "B.default.weight"}
    assert not any(".base_layer." in k for k in base_keys), "base weights keep their base names"
    own_weights = adapter["alignedvq.safetensors"] + adapter["lora/adapter_model.safetensors"]
    assert own_weights < full["model.safetensors"] / 10
    config = json.loads((setup.dirs["adapter"] / "config.json").read_text())
    assert config["base_model_name_or_path"] == str(setup.base_dir)


def test_merged_lora_gives_a_full_checkpoint_without_adapter_files(setup, tmp_path):
    model = copy.deepcopy(setup.model)  # merging consumes the adapter
    model.save_pretrained(tmp_path, checkpoint_kind="full", merge_lora=True)
    files = checkpoint_files(tmp_path)
    assert "model.safetensors" in files and not [name for name in files if "adapter" in name or name.startswith("lora/")]
    loaded = AutoModel.from_pretrained(tmp_path)
    assert not has_lora(loaded)
    assert_same_outputs(loaded, setup.expected, atol=1e-5)
    assert has_lora(setup.model), "merging must not touch the model it was copied from"


@pytest.mark.parametrize("merge", [False, True])
def test_a_checkpoint_loaded_with_its_lora_saves_again_under_its_own_names(setup, tmp_path, merge):
    """Load a full checkpoint with an unmerged LoRA, save it again (merged or not): the result loads unchanged."""
    loaded = AutoModel.from_pretrained(setup.dirs["full"])
    assert has_lora(loaded)
    loaded.save_pretrained(tmp_path, checkpoint_kind="full", merge_lora=merge)
    keys = safetensors_keys(tmp_path / "model.safetensors")
    saved = safetensors_keys(setup.dirs["full"] / "model.safetensors")
    assert keys == ({k for k in saved if ".lora_" not in k} if merge else saved)
    again = AutoModel.from_pretrained(tmp_path)
    assert has_lora(again) is not merge
    assert_same_outputs(again, setup.expected, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_ema_state_is_saved_by_default_in_full_checkpoints_only(setup, tmp_path, kind):
    """A full checkpoint (what the Trainer writes and resumes from) keeps the EMA statistics unless told not to;
    an adapter keeps them only when asked. Without them, EMA restarts from the codebook on load."""
    weights = "model.safetensors" if kind == "full" else "alignedvq.safetensors"
    default = kind == "full"
    assert (EMA_KEYS <= safetensors_keys(setup.dirs[kind] / weights)) is default
    setup.model.save_pretrained(tmp_path / "without", checkpoint_kind=kind, include_ema_state=False)
    assert not EMA_KEYS & safetensors_keys(tmp_path / "without" / weights)
    quantizer = AutoModel.from_pretrained(tmp_path / "without").model.alignedvq.quantizer
    assert torch.equal(quantizer.cluster_size, torch.ones_like(quantizer.cluster_size))
    assert torch.equal(quantizer.embed_sum, quantizer.codebook)

    setup.model.save_pretrained(tmp_path / "with", checkpoint_kind=kind, include_ema_state=True)
    assert EMA_KEYS <= safetensors_keys(tmp_path / "with" / weights)
    loaded = AutoModel.from_pretrained(tmp_path / "with")
    original = setup.model.model.alignedvq.quantizer
    assert torch.equal(loaded.model.alignedvq.quantizer.cluster_size, original.cluster_size)
    assert torch.equal(loaded.model.alignedvq.quantizer.embed_sum, original.embed_sum)
    assert_same_outputs(loaded, setup.expected)


# --------------------------------------------------------------------------------------------------------
# 2. mismatches fail clearly, and before any weights are read
# --------------------------------------------------------------------------------------------------------
def adapter_onto(setup, tmp_path, base_config) -> Path:
    """A copy of the adapter checkpoint pointing at a base made of ``base_config`` and garbage weights."""
    base = tmp_path / "base"
    base_config.save_pretrained(base)
    (base / "model.safetensors").write_bytes(b"\x93 not a safetensors file " * 64)
    adapter = tmp_path / "adapter"
    shutil.copytree(setup.dirs["adapter"], adapter)
    set_config(adapter, base_model_name_or_path=str(base))
    return adapter


def other_text_width():
    config = tiny_llava_config()
    config.text_config.hidden_size = 48
    return config, "text_config.hidden_size: adapter expects 32, base has 48"


def other_vision_depth():
    config = tiny_llava_config()
    config.vision_config.num_hidden_layers = 4
    return config, "vision_config.num_hidden_layers: adapter expects 3, base has 4"


@pytest.mark.parametrize("make_base", [other_text_width, other_vision_depth])
def test_mismatched_base_fails_before_its_weights_are_read(setup, tmp_path, make_base):
    config, message = make_base()
    adapter = adapter_onto(setup, tmp_path, config)
    with pytest.raises(CheckpointMismatchError, match=message):
        AutoModel.from_pretrained(adapter)
    assert issubclass(CheckpointMismatchError, ValueError)


def test_garbage_base_weights_are_read_when_the_architecture_matches(setup, tmp_path):
    # The control for the test above: with a matching config the same garbage file is read, and fails otherwise.
    adapter = adapter_onto(setup, tmp_path, tiny_llava_config())
    with pytest.raises(CheckpointMismatchError, match="model.safetensors is truncated or not a safetensors file"):
        AutoModel.from_pretrained(adapter)


@pytest.mark.parametrize("shape", [(1, 1, 2 * CODEBOOK_SIZE, 32), (1, 1, CODEBOOK_SIZE, 64)])
def test_codebook_of_another_shape_fails_clearly(setup, tmp_path, shape):
    shutil.copytree(setup.dirs["adapter"], tmp_path, dirs_exist_ok=True)
    state = load_file(str(tmp_path / "alignedvq.safetensors"))
    state["model.alignedvq.quantizer.codebook"] = torch.randn(shape)
    save_file(state, str(tmp_path / "alignedvq.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=rf"quantizer\.codebook: {re_shape(shape)} vs \(1, 1, 16, 32\)"):
        AutoModel.from_pretrained(tmp_path)


def re_shape(shape) -> str:
    return r"\(" + ", ".join(map(str, shape)) + r"\)"


def test_truncated_alignedvq_weights_fail_clearly(setup, tmp_path):
    shutil.copytree(setup.dirs["adapter"], tmp_path, dirs_exist_ok=True)
    path = tmp_path / "alignedvq.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointMismatchError, match="alignedvq.safetensors cannot be read"):
        AutoModel.from_pretrained(tmp_path)


def _tampered_full_checkpoint(setup, tmp_path, change) -> Path:
    shutil.copytree(setup.dirs["full"], tmp_path, dirs_exist_ok=True)
    path = tmp_path / "model.safetensors"
    state = load_file(str(path))
    change(state)
    save_file(state, str(path), metadata={"format": "pt"})
    return tmp_path


def _drop(prefix):
    return lambda state: [state.pop(k) for k in [k for k in state if k.startswith(prefix)]]


STRICT_CASES = {
    "codebook removed": (_drop("model.alignedvq.quantizer.codebook"), r"missing \['model.alignedvq.quantizer.codebook'\]"),
    # on disk Transformers writes llava-hf's original names; the error names the model's
    "language-model layer removed": (_drop("language_model.model.layers.1."), r"missing \['model.language_model.layers.1"),
    "unexpected tensor": (lambda s: s.update(extra=torch.zeros(3)), r"unexpected \['extra'\]"),
    "one tensor half precision": (
        lambda s: s.update({"multi_modal_projector.linear_1.weight": s["multi_modal_projector.linear_1.weight"].half()}),
        r"mis-typed tensors: multi_modal_projector.linear_1.weight \(F16, the others are F32\)",
    ),
    "codebook in bf16": (
        lambda s: s.update({"model.alignedvq.quantizer.codebook": s["model.alignedvq.quantizer.codebook"].bfloat16()}),
        r"model.alignedvq.quantizer.codebook \(BF16, must be F32\)",
    ),
    "DLP of another shape": (
        lambda s: s.update({"model.alignedvq.dlp_in.proj.bias": torch.zeros(33)}),
        r"of another shape \['model.alignedvq.dlp_in.proj.bias'",
    ),
}


@pytest.mark.parametrize("case", STRICT_CASES)
def test_full_checkpoints_load_strictly(setup, tmp_path, case):
    change, message = STRICT_CASES[case]
    folder = _tampered_full_checkpoint(setup, tmp_path, change)
    with pytest.raises(CheckpointMismatchError, match=message):
        AutoModel.from_pretrained(folder)


def test_whole_checkpoint_in_half_precision_is_not_mis_typed(setup, tmp_path):
    # One storage dtype for every weight (as the bundled model uses) is fine; only the odd tensor out is not.
    def to_half(state):
        state.update({k: v.half() for k, v in state.items() if not k.startswith("model.alignedvq.quantizer.")})

    folder = _tampered_full_checkpoint(setup, tmp_path, to_half)
    assert_same_outputs(AutoModel.from_pretrained(folder, dtype=torch.float32), setup.expected, atol=2e-2)


@pytest.mark.parametrize("damage", ["truncated", "header", "trailing"])
def test_damaged_weights_files_fail_with_the_same_error_type(setup, tmp_path, damage):
    shutil.copytree(setup.dirs["full"], tmp_path, dirs_exist_ok=True)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    data = {"truncated": data[: len(data) - 100], "header": data[:8] + b"{not json" + data[17:],
            "trailing": data + b"\0" * 16}[damage]
    path.write_bytes(data)
    with pytest.raises(CheckpointMismatchError, match="model.safetensors"):
        AutoModel.from_pretrained(tmp_path)


def test_a_lora_adapter_that_does_not_fit_is_refused(setup, tmp_path):
    shutil.copytree(setup.dirs["full"], tmp_path, dirs_exist_ok=True)
    path = tmp_path / "lora" / "adapter_model.safetensors"
    state = load_file(str(path))
    state.pop(sorted(state)[0])
    save_file(state, str(path))
    with pytest.raises(CheckpointMismatchError, match="missing"):
        AutoModel.from_pretrained(tmp_path)


# --------------------------------------------------------------------------------------------------------
# 3. model cards
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_model_card_has_hub_metadata_and_the_alignedvq_settings(setup, tmp_path, kind):
    card = ModelCard.load(setup.dirs[kind] / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-text-to-text"
    assert card.data.license == "apache-2.0"
    assert {"alignedvq", "llava", "vector-quantization"} <= set(card.data.tags)
    assert card.data.base_model is None  # a local folder is no Hub id; the text names it
    if kind == "adapter":
        assert f"applies to `{setup.base_dir}`" in card.text
    bits = math.ceil(math.log2(CODEBOOK_SIZE))
    tokens = NUM_PATCHES + 1  # patches + CLS
    text = card.text
    assert f"| checkpoint kind | {kind}" in text
    assert "| split | block 0, site `ln1` |" in text
    assert f"group(s) of {CODEBOOK_SIZE} codewords" in text
    assert f"| bits per token | {bits} |" in text
    assert f"{tokens} tokens → {math.ceil(tokens * bits / 8)} bytes" in text
    assert "- `lora/adapter_model.safetensors`" in text and "- `edge_model.safetensors`" in text
    assert "## Evaluation" not in text

    setup.model.save_pretrained(
        tmp_path, checkpoint_kind=kind, eval_results={"results": {"VQAv2 accuracy": 76.4, "bits per image": 204}}
    )
    card = ModelCard.load(tmp_path / "README.md")
    assert "## Evaluation" in card.text
    assert "| VQAv2 accuracy | 76.4 |" in card.text and "| bits per image | 204 |" in card.text
    results = {(r.metric_name, r.metric_value) for r in card.data.eval_results}  # the Hub's model-index
    assert results == {("VQAv2 accuracy", 76.4), ("bits per image", 204)}
    assert card.data.model_name == card.text.split("\n# ", 1)[1].split("\n")[0]
    assert "block 0 ln1" in card.data.model_name and tmp_path.name not in card.data.model_name


def test_card_names_the_hub_base_of_a_cache_snapshot(setup, tmp_path):
    """`from_llava` on a Hub-cache folder records the repo id and commit, which the card's metadata carries."""
    snapshot = tmp_path / "models--llava-hf--tiny-llava" / "snapshots" / ("ab" * 20)
    shutil.copytree(setup.base_dir, snapshot)
    model = tav.LlavaAlignedVQForConditionalGeneration.from_llava(snapshot, codebook_size=CODEBOOK_SIZE)
    assert (model.config.base_model_name_or_path, model.config.base_model_revision) == ("llava-hf/tiny-llava", "ab" * 20)
    model.save_pretrained(tmp_path / "out")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == "llava-hf/tiny-llava" and card.data.model_name.startswith("tiny-llava AlignedVQ")


# --------------------------------------------------------------------------------------------------------
# 4. push_to_hub, with only the two network calls replaced
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pushed(setup):
    """What `push_to_hub` commits for each kind: path in repo -> bytes, read from its working folder at commit time.

    Offline mode is switched on, so any Hub request other than the two replaced ones fails loudly (reading an
    existing card falls back to "no card yet", as for a new repo)."""
    endpoint = constants.ENDPOINT  # only used to build well-formed return values
    uploads = {}

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"{endpoint}/{repo_id}", endpoint=endpoint)

    def create_commit(self, repo_id, operations, **kwargs):
        uploads[repo_id] = SimpleNamespace(
            kinds={type(op).__name__ for op in operations},
            files={op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations},
        )
        return CommitInfo(
            commit_url=f"{endpoint}/{repo_id}/commit/{'0' * 40}", commit_message=kwargs.get("commit_message") or "",
            commit_description="", oid="0" * 40, _endpoint=endpoint,
        )

    model = setup.model
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        patch.setattr(HfApi, "create_repo", create_repo)
        patch.setattr(HfApi, "create_commit", create_commit)
        original = model.config.checkpoint_kind
        for kind in KINDS:
            model.config.checkpoint_kind = kind  # push_to_hub saves with the configured kind
            try:
                model.push_to_hub(f"org/llava-alignedvq-{kind}")
            finally:
                model.config.checkpoint_kind = original
    return {kind: uploads[f"org/llava-alignedvq-{kind}"] for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_push_to_hub_uploads_the_checkpoint_with_our_card(setup, pushed, tmp_path, kind):
    upload = pushed[kind]
    assert upload.kinds == {CommitOperationAdd.__name__}
    local = setup.dirs[kind]
    sizes = {name: len(data) for name, data in upload.files.items()}
    assert set(sizes) == set(checkpoint_files(local))
    for name, data in upload.files.items():
        if name != "README.md":  # the card's title is the folder's name
            assert data == (local / name).read_bytes(), name
    weights = {"full": "model.safetensors", "adapter": "alignedvq.safetensors"}[kind]
    assert sizes[weights] == (local / weights).stat().st_size

    card = ModelCard(upload.files["README.md"].decode())
    assert GENERIC_CARD not in card.text
    assert card.data.pipeline_tag == "image-text-to-text" and "alignedvq" in card.data.tags
    assert f"| checkpoint kind | {kind}" in card.text

    for name, data in upload.files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert has_lora(loaded)
    assert_same_outputs(loaded, setup.expected)


def test_pushed_card_is_titled_with_the_repo_name(pushed):
    assert "\n# llava-alignedvq-full\n" in pushed["full"].files["README.md"].decode()


# --------------------------------------------------------------------------------------------------------
# 5. trust_remote_code=True in a Python without this package
# --------------------------------------------------------------------------------------------------------
REMOTE_CODE_CHILD = r"""
import importlib.util, json, sys
assert importlib.util.find_spec("transformers_alignedvq") is None, "transformers_alignedvq is importable here"
import torch
torch.set_num_threads(1)
from safetensors.torch import load_file
from transformers import AutoModel

expected = load_file(sys.argv[1])
report = {}
for folder in sys.argv[2:]:
    try:
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    except OSError as exc:
        report[folder] = f"refused: {exc}"
        continue
    with torch.no_grad():
        indices = model.encode_edge(expected["pixels"])
        logits = model(input_ids=expected["input_ids"], pixel_values=expected["pixels"]).logits
    assert torch.equal(indices, expected["indices"]), folder
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
    report[folder] = type(model).__module__
assert "transformers_alignedvq" not in sys.modules
print(json.dumps(report))
"""


def run_child(python, script, args, env, cwd):
    result = subprocess.run(
        [str(python), "-c", script, *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=CHILD_TIMEOUT,
    )
    assert result.returncode == 0, f"child failed:\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_checkpoints_load_with_trust_remote_code_without_the_package(setup, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    # PYTHONPATH shares this environment's packages (torch, transformers, ...) but, unlike site-packages seen
    # through `site`, does not run their .pth files: the editable install of transformers_alignedvq is one.
    site_dirs = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
    env = {
        **os.environ, "PYTHONPATH": os.pathsep.join(site_dirs), "PYTHONNOUSERSITE": "1", "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
    }
    env.pop("HF_MODULES_CACHE", None)
    merged = tmp_path / "merged"
    copy.deepcopy(setup.model).save_pretrained(merged, checkpoint_kind="full", merge_lora=True)
    folders = [merged, setup.dirs["full"], setup.dirs["adapter"]]
    report = run_child(python, REMOTE_CODE_CHILD, [setup.expected_path, *folders], env, tmp_path)
    assert set(report) == {str(f) for f in folders}
    assert report[str(merged)].startswith("transformers_modules."), report
    # An unmerged LoRA and the adapter-only kind need the package's loader: without it, a clear refusal.
    assert "unmerged LoRA" in report[str(setup.dirs["full"])] and "merge_lora=True" in report[str(setup.dirs["full"])]
    assert "adapter-only" in report[str(setup.dirs["adapter"])] and "pip install" in report[str(setup.dirs["adapter"])]


def test_checkpoints_carry_exactly_the_model_folder_as_remote_code(setup):
    """What Transformers' remote-code loader resolves from the auto_map's files is the model folder, whole."""
    from transformers.dynamic_module_utils import get_relative_import_files

    from transformers_alignedvq.hub import MODEL_FOLDER, REMOTE_CODE_FILES

    folder = setup.dirs["full"]
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    entry_files = {folder / (reference.split(".")[0] + ".py") for reference in auto_map.values()}
    resolved = set(entry_files) | {Path(f) for entry in entry_files for f in get_relative_import_files(str(entry))}
    assert {p.name for p in resolved} == set(REMOTE_CODE_FILES)
    assert set(REMOTE_CODE_FILES) == {p.name for p in MODEL_FOLDER.glob("*.py")} - {"__init__.py"}
    for name in REMOTE_CODE_FILES:
        assert (folder / name).read_bytes() == (MODEL_FOLDER / name).read_bytes()


# --------------------------------------------------------------------------------------------------------
# 6. by repo id from a Hub-compatible server on loopback (olah, offline, serving git mirrors)
# --------------------------------------------------------------------------------------------------------
def git(*args, cwd):
    subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "init.defaultBranch=main", *args],
        cwd=cwd, check=True, capture_output=True, timeout=60,
    )


def git_repo(folder: Path) -> str:
    """Commit ``folder`` as a git repository on branch main; returns the commit."""
    git("init", "-q", cwd=folder)
    git("add", "-A", cwd=folder)
    git("commit", "-q", "-m", "checkpoint", cwd=folder)
    git("branch", "-M", "main", cwd=folder)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, check=True, capture_output=True, text=True)
    return head.stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def hub_server(setup, tmp_path_factory):
    if importlib.util.find_spec("olah") is None:
        pytest.skip("olah (a Hugging Face Hub mirror server) is not installed")
    if shutil.which("git") is None:
        pytest.skip("git is needed for olah's mirror repositories")
    root = tmp_path_factory.mktemp("olah")
    models = root / "mirrors" / "models" / "org"  # olah serves <mirrors-path>/<repo type>/<org>/<repo> git repos
    shutil.copytree(setup.base_dir, models / "llava-tiny-base")
    base_commit = git_repo(models / "llava-tiny-base")
    config, model = setup.model.config, setup.model
    saved = config.base_model_name_or_path, config.base_model_revision
    # Pinned to a commit, as an adapter on the Hub should be. It also keeps olah on the routes its offline mode
    # answers: a branch name with a file missing from the mirror comes back as "repository not found".
    config.base_model_name_or_path, config.base_model_revision = "org/llava-tiny-base", base_commit
    try:
        for kind in KINDS:
            model.save_pretrained(models / f"llava-alignedvq-{kind}", checkpoint_kind=kind)
            git_repo(models / f"llava-alignedvq-{kind}")
    finally:
        config.base_model_name_or_path, config.base_model_revision = saved
    save_tiny_deployment(models / "tiny-deployment")  # with a processor, so a server can answer for it
    git_repo(models / "tiny-deployment")

    port = free_port()
    settings = root / "olah.toml"
    settings.write_text(
        "[basic]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        f"repos-path = {json.dumps(str(root / 'cache'))}\n"
        f"mirrors-path = [{json.dumps(str(root / 'mirrors'))}]\n"
        "[accessibility]\noffline = true\n"
    )
    log_path = root / "olah.log"
    endpoint = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:  # a file, not a pipe nobody reads, which would block the server once full
        server = subprocess.Popen(
            [sys.executable, "-m", "olah.server", "--config", str(settings), "--log-path", str(root / "logs")],
            stdout=log, stderr=subprocess.STDOUT, cwd=root,
        )
    try:
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                pytest.fail(f"olah exited with {server.returncode}: {log_path.read_text(errors='replace')[-1500:]}")
            try:
                with no_proxy.open(f"{endpoint}/api/models/org/llava-tiny-base/revision/main", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"olah did not answer within 60 s: {log_path.read_text(errors='replace')[-1500:]}")
            time.sleep(0.3)
        yield SimpleNamespace(endpoint=endpoint, root=root, models=models)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


HUB_CHILD = r"""
import json, sys
import torch
torch.set_num_threads(1)
from safetensors.torch import load_file
from transformers import AutoModel
import transformers_alignedvq
from transformers_alignedvq.hub import download_edge
from transformers_alignedvq.lora import has_lora

expected_path, revision, edge_cache = sys.argv[1], sys.argv[2] or None, sys.argv[3]
expected = load_file(expected_path)
report = {"loaded": {}}
for repo_id in ("org/llava-alignedvq-full", "org/llava-alignedvq-adapter"):
    model = AutoModel.from_pretrained(repo_id, revision=revision).eval()
    with torch.no_grad():
        indices = model.encode_edge(expected["pixels"])
        logits = model(input_ids=expected["input_ids"], pixel_values=expected["pixels"]).logits
    assert torch.equal(indices, expected["indices"]), repo_id
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-5)
    report["loaded"][repo_id] = {"kind": model.config.checkpoint_kind, "lora": has_lora(model)}
if edge_cache:
    folder, size = download_edge("org/llava-alignedvq-full", cache_dir=edge_cache)
    report["edge"] = {"files": sorted(p.name for p in folder.iterdir()), "bytes": size}
print(json.dumps(report))
"""


def test_load_by_repo_id_from_a_hub_server_then_offline_and_edge_only_download(setup, hub_server, tmp_path):
    env = {
        **os.environ, "HF_ENDPOINT": hub_server.endpoint, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    }
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN"):
        env.pop(name, None)
    edge_cache = tmp_path / "edge-cache"
    # revision="main": olah's offline mode answers repo info only on /api/models/<id>/revision/<rev>, while
    # Transformers asks /api/models/<id> when no revision is given (the real Hub answers both).
    online = run_child(sys.executable, HUB_CHILD, [setup.expected_path, "main", edge_cache], env, tmp_path)
    expected_loaded = {
        f"org/llava-alignedvq-{kind}": {"kind": kind, "lora": True} for kind in KINDS
    }
    assert online["loaded"] == expected_loaded

    full = hub_server.models / "llava-alignedvq-full"
    llava_edge_files = [name for name in EDGE_FILES if not name.startswith("qwen_edge.")]  # Qwen's are its own
    assert online["edge"]["files"] == sorted(llava_edge_files)
    assert online["edge"]["bytes"] == sum((full / name).stat().st_size for name in llava_edge_files)
    blobs = list(edge_cache.glob("models--org--llava-alignedvq-full/blobs/*"))
    assert sum(b.stat().st_size for b in blobs) == online["edge"]["bytes"], "only the edge files were fetched"
    print(f"edge-only download: {online['edge']['files']}, {online['edge']['bytes']} bytes")

    # Offline, from the cache the first run filled, with no revision; nothing listens at the endpoint now.
    offline_env = {**env, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    offline = run_child(sys.executable, HUB_CHILD, [setup.expected_path, "", ""], offline_env, tmp_path)
    assert offline["loaded"] == expected_loaded


# A device without PyTorch or Transformers: `alignedvq ask --edge org/repo` fetches only the edge files (their
# ONNX edge) from the Hub server and asks the cloud; then download_edge into a snapshot folder that also holds
# the model's weights reports the edge files' bytes only.
DEVICE_CHILD = WITHOUT_CLOUD_PACKAGES + r"""
import contextlib, io, json, sys
from huggingface_hub import hf_hub_download
from transformers_alignedvq import cli
from transformers_alignedvq.edge_runtime import EDGE_FILES, download_edge

server_url, image, cache = sys.argv[1:4]
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = cli.main(["ask", "--server", server_url, "--edge", "org/tiny-deployment", "--image", image,
                     "--retry-window", "0", "--threads", "1", "--json", "what color is the shape?"])
assert code == 0, err.getvalue()
hf_hub_download("org/tiny-deployment", "model.safetensors", cache_dir=cache)
folder, size = download_edge("org/tiny-deployment", cache_dir=cache)
print(json.dumps({"answer": json.loads(out.getvalue())["answer"], "torch": "torch" in sys.modules,
                  "transformers": "transformers" in sys.modules, "folder": sorted(p.name for p in folder.iterdir()),
                  "size": size}))
"""


def test_a_device_without_torch_asks_with_the_onnx_edge_of_a_hub_checkpoint(hub_server, tmp_path):
    from PIL import Image

    from transformers_alignedvq import edge_runtime
    from transformers_alignedvq.client import EdgeClient
    from transformers_alignedvq.serving import BackgroundServer, create_app

    local = hub_server.models / "tiny-deployment"
    assert {"edge_model.onnx", "edge_config.json"} <= set(checkpoint_files(local))  # save_pretrained wrote it
    image = tmp_path / "picture.png"
    Image.new("RGB", (40, 40), (200, 30, 30)).save(image)
    env = {
        **os.environ, "HF_ENDPOINT": hub_server.endpoint, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1",
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    }
    for name in ("HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_TOKEN"):
        env.pop(name, None)
    with BackgroundServer(create_app(local, max_new_tokens=4, max_wait_ms=1)) as server:
        device = run_child(sys.executable, DEVICE_CHILD, [server.url, image, tmp_path / "cache"], env, tmp_path)
        with EdgeClient(local, server.url, backend="onnx", threads=1) as client:
            expected = client.ask(str(image), "what color is the shape?").text
    assert not device["torch"] and not device["transformers"]
    assert device["answer"] == expected
    assert "model.safetensors" in device["folder"]  # the snapshot folder holds more than the edge...
    edge_names = [name for name in device["folder"] if name in edge_runtime.EDGE_FILES]
    assert device["size"] == sum((local / name).stat().st_size for name in edge_names)  # ...its size does not
    assert {"edge_model.onnx", "edge_config.json", "processor_config.json"} <= set(edge_names)


def _families_build() -> bool:
    from transformers_alignedvq.models.qwen2_5_vl_alignedvq.modeling_qwen2_5_vl_alignedvq import (
        _HAS_MM_ENCODER_OUTPUTS,
    )

    return _HAS_MM_ENCODER_OUTPUTS


@pytest.mark.skipif(not _families_build(), reason="Qwen2.5-VL with AlignedVQ needs transformers>=5.19")
def test_download_edge_fetches_the_edge_files_of_a_qwen_checkpoint(tmp_path, monkeypatch):
    """A Qwen2.5-VL checkpoint's edge is ``qwen_edge.json`` and ``qwen_edge.onnx`` (and the entropy model beside them):
    `download_edge` asks the Hub for those (filtered here by huggingface_hub's own pattern matching over a saved
    checkpoint, as a snapshot download filters a repository) and never the weights; the client then opens the repo
    id as a Qwen edge that sends coded frames."""
    import huggingface_hub
    import numpy as np
    from huggingface_hub.utils import filter_repo_objects

    from tests.test_serving_qwen import tiny_served_qwen
    from transformers_alignedvq import wire
    from transformers_alignedvq.client import EdgeClient
    from transformers_alignedvq.edge_runtime import download_edge
    from transformers_alignedvq.training.entropy_fit import fit_patch_grid_model

    repo = tmp_path / "repo"
    tiny_served_qwen().save_pretrained(repo)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (int(h), int(w), 3), dtype=np.uint8) for h, w in rng.integers(40, 90, (6, 2))]
    fit_patch_grid_model(repo, images).save(repo)
    asked = []

    def snapshot_download(repo_id, *, allow_patterns, revision=None, cache_dir=None, local_dir=None, token=None):
        asked.append((repo_id, revision))
        folder = tmp_path / "snapshot"
        folder.mkdir(exist_ok=True)
        for name in filter_repo_objects(sorted(checkpoint_files(repo)), allow_patterns=allow_patterns):
            shutil.copyfile(repo / name, folder / name)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    folder, size = download_edge("org/qwen-tiny", revision="main")
    fetched = sorted(path.name for path in folder.iterdir())
    assert fetched == ["entropy_model.safetensors", "qwen_edge.json", "qwen_edge.onnx"], fetched
    assert {"model.safetensors", "config.json"} <= set(checkpoint_files(repo))  # there, and not fetched
    assert size == sum((repo / name).stat().st_size for name in fetched) and asked == [("org/qwen-tiny", "main")]
    with EdgeClient("org/qwen-tiny", "http://127.0.0.1:9", entropy_coding=True) as client:
        assert client.device_edge.family == "qwen2_5_vl" and client.entropy_model.patch_grids
        frame = wire.decode_frame(client.encode(images[0], "what is it?"), entropy_model=client.entropy_model)
    assert frame.entropy_coded and frame.prompt == "what is it?" and frame.geometry.kind == 2
