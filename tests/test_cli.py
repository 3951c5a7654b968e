"""The ``alignedvq`` command line (`transformers_alignedvq.cli`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import transformers_alignedvq
from transformers_alignedvq import cli
from transformers_alignedvq.export.edge import AlignedVQEdgeEncoder
from transformers_alignedvq.serving import BackgroundServer, create_app

SUBCOMMANDS = {
    "serve": ["--model", "--host", "--port", "--max-batch-size", "--engine", "--tensor-parallel-size",
              "--distributed-executor-backend", "--vllm-checkpoint", "--vllm-arg"],
    "ask": ["--server", "--edge", "--image", "question"],
    "export-edge": ["--model", "--output"],
    "export-vllm": ["--model", "--output", "--dtype"],
    "info": ["--model", "--json"],
    "demo": ["--model", "--images"],
}


@pytest.fixture(scope="module")
def info_subprocess(deployment):
    """``python -m transformers_alignedvq.cli info`` in a fresh interpreter, started before the other tests
    of this module (autouse below) so its start-up overlaps them."""
    process = subprocess.Popen(
        [sys.executable, "-m", "transformers_alignedvq.cli", "info", "--model", str(deployment), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(autouse=True, scope="module")
def _start_subprocess_early(info_subprocess):
    yield


@pytest.fixture(scope="module")
def server(deployment):
    with BackgroundServer(create_app(deployment, max_new_tokens=4, max_wait_ms=1)) as running:
        yield running


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: alignedvq {command}")
    for option in SUBCOMMANDS[command]:
        assert option in text


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(command in text for command in SUBCOMMANDS)
    with pytest.raises(SystemExit) as exit_info:
        cli.main([])
    assert exit_info.value.code == 2  # a subcommand is required


def test_export_edge_and_info(deployment, tmp_path, capsys):
    out = tmp_path / "edge"
    assert cli.main(["export-edge", "--model", str(deployment), "--output", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["edge_config.json", "edge_model.safetensors"]
    edge = AlignedVQEdgeEncoder.from_pretrained(out)

    assert cli.main(["info", "--model", str(out), "--json"]) == 0
    edge_info = json.loads(capsys.readouterr().out)
    assert cli.main(["info", "--model", str(deployment), "--json"]) == 0
    full_info = json.loads(capsys.readouterr().out)
    assert (edge_info.pop("checkpoint"), full_info.pop("checkpoint")) == ("edge", "full")
    assert edge_info == full_info
    assert full_info["codebook_fingerprint"] == edge.codebook_fingerprint().hex()
    assert (full_info["codebook_size"], full_info["bits_per_index"], full_info["num_tokens"]) == (12, 4, 17)
    # 13 fixed header bytes, varints K, T, C and the 4 x 4 grid, ceil(17 * 4 / 8) payload bytes, CRC
    assert full_info["frame_bytes"] == 13 + 5 + 9 + 4

    assert cli.main(["info", "--model", str(deployment)]) == 0
    assert re.search(r"^bits_per_index\s+4$", capsys.readouterr().out, re.M)


def test_info_and_export_errors_exit_1(tmp_path, capsys):
    assert cli.main(["info", "--model", str(tmp_path)]) == 1
    assert "neither config.json nor edge_config.json" in capsys.readouterr().err
    assert cli.main(["export-edge", "--model", str(tmp_path), "--output", str(tmp_path / "e")]) == 1
    assert "no config.json" in capsys.readouterr().err


def test_ask_prints_answer_bytes_and_time_split(deployment, server, tmp_path, capsys):
    picture = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(picture)
    edge = tmp_path / "edge"
    assert cli.main(["export-edge", "--model", str(deployment), "--output", str(edge)]) == 0
    capsys.readouterr()
    args = ["ask", "--server", server.url, "--edge", str(edge), "--image", str(picture), "what color is the shape ?"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"^answer: +\S", out, re.M)
    assert re.search(r"^bytes sent: 57$", out, re.M)  # 31-byte frame + 1-byte length + 25-byte question
    assert re.search(r"edge [\d.]+ \+ transfer [\d.]+ \+ cloud [\d.]+ = [\d.]+", out)
    assert cli.main(args + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bytes_sent"] == 57 and result["server"]["bytes_received"] == 57
    assert result["answer"] in out


def test_ask_streams_samples_and_saves_the_frame(deployment, server, tmp_path, capsys):
    picture = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(picture)
    base = ["ask", "--server", server.url, "--edge", str(deployment), "--image", str(picture)]
    question = "what color is the shape ?"
    assert cli.main([*base, "--json", question]) == 0
    greedy = json.loads(capsys.readouterr().out)["answer"]
    assert cli.main([*base, "--stream", question]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].strip() == greedy and re.search(r"^bytes sent: 57$", out, re.M)
    assert cli.main([*base, "--stream", "--json", question]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "".join(line["delta"] for line in lines[:-1]).strip() == lines[-1]["answer"] == greedy
    sampled = [*base, "--temperature", "1.5", "--top-p", "0.9", "--seed", "7", "--max-new-tokens", "2", "--json"]
    assert cli.main([*sampled, question]) == 0
    first = json.loads(capsys.readouterr().out)
    assert cli.main([*sampled, question]) == 0
    assert json.loads(capsys.readouterr().out)["answer"] == first["answer"]
    assert first["server"]["generated_tokens"] <= 2
    frame = tmp_path / "frame.bin"
    assert cli.main(["ask", "--edge", str(deployment), "--image", str(picture), "--save-frame", str(frame),
                     question]) == 0
    assert "frame of 57 bytes written" in capsys.readouterr().err and len(frame.read_bytes()) == 57
    assert cli.main(["ask", "--edge", str(deployment), "--image", str(picture), question]) == 1
    assert "give --server URL to ask, or --save-frame FILE" in capsys.readouterr().err
    # Several questions: the frame once, then follow-ups (13 bytes and the UTF-8 question here).
    assert cli.main([*base, question, "what shape is in the image ?"]) == 0
    sent = re.findall(r"^bytes sent: (\d+)$", capsys.readouterr().out, re.M)
    assert sent == ["57", str(13 + len("what shape is in the image ?"))]


def test_ask_errors_are_one_line_and_exit_1(deployment, server, tmp_path, capsys):
    picture = tmp_path / "picture.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(picture)
    (tmp_path / "notes.png").write_text("not an image")
    cases = [
        (["--edge", str(deployment), "--image", str(tmp_path / "none.png"), "q"], "image .* not found"),
        (["--edge", str(deployment), "--image", str(tmp_path / "notes.png"), "q"], "cannot read the image"),
        (["--edge", str(deployment), "--image", str(picture), "   "], "the question is empty"),
        (["--edge", str(deployment / "config.json"), "--image", str(picture), "q"], "is a file; give the edge folder"),
        (["--edge", str(tmp_path / "nowhere"), "--image", str(picture), "q"], "edge folder .* not found"),
    ]
    for args, message in cases:
        assert cli.main(["ask", "--server", server.url, *args]) == 1
        err = capsys.readouterr().err
        assert re.fullmatch(rf"alignedvq: error: .*{message}.*\n", err), err
    url = server.url.removeprefix("http://")
    assert cli.main(["ask", "--server", url, "--edge", str(deployment), "--image", str(picture), "q"]) == 1
    assert re.fullmatch(r"alignedvq: error: server URL .* must start with http:// or https://.*\n", capsys.readouterr().err)


@pytest.mark.bundled_model
def test_ask_and_info_default_to_the_bundled_model(tmp_path, capsys):
    picture = tmp_path / "picture.png"
    Image.fromarray(np.full((64, 64, 3), 255, dtype=np.uint8)).save(picture)
    with BackgroundServer(create_app(transformers_alignedvq.DEFAULT_MODEL, max_new_tokens=4)) as bundled:
        assert cli.main(["ask", "--server", bundled.url, "--image", str(picture), "what shape is in the image?"]) == 0
    assert re.search(r"^answer: +\S", capsys.readouterr().out, re.M)
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["split_layer"], info["split_site"]) == (0, "patch")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"alignedvq {transformers_alignedvq.__version__}"


@pytest.mark.parametrize("command", ["serve", "demo"])
def test_without_model_and_without_bundled_model(command, monkeypatch, capsys):
    monkeypatch.delattr(transformers_alignedvq, "DEFAULT_MODEL", raising=False)
    assert cli.main([command]) == 1
    assert cli.NO_BUNDLED_MODEL in capsys.readouterr().err


def test_demo_on_easy_vqa(deployment, capsys):
    assert cli.main(["demo", "--model", str(deployment), "--images", "2", "--questions-per-image", "2",
                     "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.rstrip().endswith(tuple("0123456789")) and "?" in line]
    assert len(rows) == 4, out
    assert re.search(r"^accuracy: \d/4 = ", out, re.M)


def test_module_entry_point_in_a_fresh_interpreter(info_subprocess, deployment):
    out, err = info_subprocess.communicate(timeout=240)
    assert info_subprocess.returncode == 0, err[-3000:]
    info = json.loads(out)
    assert info["checkpoint"] == "full" and info["codebook_size"] == 12 and info["split_site"] == "ln1"


def serve_kwargs(monkeypatch, argv: list[str]) -> dict:
    """What ``alignedvq serve ARGV`` passes to `serve` (which is not run)."""
    from transformers_alignedvq.serving import runner

    calls = []
    monkeypatch.setattr(runner, "serve", lambda model, **kwargs: calls.append(kwargs))
    assert cli.main(["serve", *argv]) == 0
    return calls[0]


def test_serve_passes_the_engine_and_vllm_arguments(monkeypatch, tmp_path):
    assert serve_kwargs(monkeypatch, [])["engine"] == "transformers"
    assert "vllm_args" not in serve_kwargs(monkeypatch, [])
    kwargs = serve_kwargs(monkeypatch, [
        "--engine", "vllm", "--tensor-parallel-size", "2", "--pipeline-parallel-size", "2",
        "--distributed-executor-backend", "ray", "--enforce-eager", "--vllm-checkpoint", str(tmp_path),
        "--vllm-arg", "kv_cache_memory_bytes=1073741824", "--vllm-arg", "kv_cache_dtype=fp8",
    ])
    assert kwargs["engine"] == "vllm" and kwargs["vllm_checkpoint"] == str(tmp_path)
    assert kwargs["vllm_args"] == {"tensor_parallel_size": 2, "pipeline_parallel_size": 2,
                                   "distributed_executor_backend": "ray", "enforce_eager": True,
                                   "kv_cache_memory_bytes": 1073741824, "kv_cache_dtype": "fp8"}


@pytest.mark.parametrize("argv", [["--tensor-parallel-size", "2"], ["--vllm-arg", "seed=1"],
                                  ["--engine", "vllm", "--vllm-arg", "no-equals-sign"]])
def test_serve_refuses_vllm_options_it_cannot_use(argv, capsys):
    assert cli.main(["serve", *argv]) == 1
    assert "vllm" in capsys.readouterr().err.lower()


def test_export_vllm_writes_a_llava_folder(deployment, tmp_path, capsys):
    out = tmp_path / "vllm"
    assert cli.main(["export-vllm", "--model", str(deployment), "--output", str(out)]) == 0
    assert f"--vllm-checkpoint {out}" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava"


_BUNDLED_EDGE_WITHOUT_TORCH = """
import json, sys
import numpy as np
from transformers_alignedvq import DEFAULT_MODEL
from transformers_alignedvq.edge_runtime import load_edge_runtime

edge = load_edge_runtime(DEFAULT_MODEL, threads=1)
image = np.random.default_rng(3).integers(0, 256, (80, 96, 3), dtype=np.uint8)
print(json.dumps({"backend": edge.backend, "indices": edge.encode_image(image).tolist(),
                  "torch": "torch" in sys.modules}))
"""


@pytest.mark.bundled_model
def test_the_bundled_models_edge_runs_without_torch_and_matches_the_pytorch_edge():
    """`alignedvq ask` without --edge on a device with only the [edge] extra: the bundled folder's ONNX edge."""
    from transformers_alignedvq.edge_runtime import load_edge_runtime
    from transformers_alignedvq.testing import WITHOUT_CLOUD_PACKAGES

    pytest.importorskip("onnxruntime")
    out = subprocess.run([sys.executable, "-c", WITHOUT_CLOUD_PACKAGES + _BUNDLED_EDGE_WITHOUT_TORCH],
                         capture_output=True, text=True, timeout=120, check=True)
    device = json.loads(out.stdout.splitlines()[-1])
    assert device["backend"] == "onnx" and not device["torch"]
    image = np.random.default_rng(3).integers(0, 256, (80, 96, 3), dtype=np.uint8)
    reference = load_edge_runtime(transformers_alignedvq.DEFAULT_MODEL, backend="torch").encode_image(image)
    got = np.asarray(device["indices"])
    # k-means leaves near-duplicate codewords (easy-VQA's flat backgrounds): fp32 rounding of the folded graph may
    # pick the twin of PyTorch's choice, which decodes to the same feature
    from safetensors.numpy import load_file

    codebook = load_file(f"{transformers_alignedvq.DEFAULT_MODEL}/edge_model.safetensors")["alignedvq.quantizer.codebook"]
    stages = range(codebook.shape[0])
    twins = np.all([np.abs(codebook[q, 0][got[:, q]] - codebook[q, 0][reference[:, q]]).max(-1) < 1e-3 for q in stages], 0)
    assert (got == reference).all(-1).mean() >= 0.95 and twins.mean() >= 0.999
