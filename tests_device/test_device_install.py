"""The device install: `pip install "transformers-alignedvq[edge]"`, no PyTorch, no Transformers.

Run by .ci/run in a venv made for it, with an ONNX edge exported beforehand by the cloud venv and the cloud
venv's Python to start a server (`ALIGNEDVQ_ONNX_EDGE`, `ALIGNEDVQ_CLOUD_PYTHON`); skipped without them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

EDGE = os.environ.get("ALIGNEDVQ_ONNX_EDGE")
CLOUD_PYTHON = os.environ.get("ALIGNEDVQ_CLOUD_PYTHON")
pytestmark = pytest.mark.skipif(not (EDGE and CLOUD_PYTHON), reason="needs ALIGNEDVQ_ONNX_EDGE and ALIGNEDVQ_CLOUD_PYTHON")
QUESTION = "what color is the shape?"


@pytest.fixture(scope="module")
def server_url():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([CLOUD_PYTHON, "-m", "transformers_alignedvq.cli", "serve", "--port", str(port),
                                "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    assert process.poll() is None, process.stderr.read().decode()[-2000:]
    yield url
    process.terminate()
    process.wait(30)


def _picture(path: Path) -> Path:
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[16:48, 16:48] = (220, 30, 30)  # a red square
    Image.fromarray(pixels).save(path)
    return path


def test_torch_and_transformers_are_not_installed():
    for name in ("torch", "transformers"):
        with pytest.raises(ModuleNotFoundError):
            __import__(name)


def test_edge_client_imports_only_the_light_stack():
    """What the client loads; how long that takes is measured by benchmarks/edge_footprint.py, not here."""
    code = "import json, sys; from transformers_alignedvq.client import EdgeClient; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert not {"torch", "transformers", "fastapi", "uvicorn"} & {name.split(".")[0] for name in json.loads(out)}


def test_onnx_edge_answers_through_the_cloud(server_url, tmp_path):
    from transformers_alignedvq.client import EdgeClient

    with EdgeClient(EDGE, server_url, threads=1) as client:
        assert client.edge.backend == "onnx"
        assert client.check_server()["codebook_fingerprint"] == client.fingerprint.hex()
        answer = client.ask(_picture(tmp_path / "red.png"), QUESTION)
    assert answer.text == "red"


def test_cli_ask_on_the_device(server_url, tmp_path):
    picture = _picture(tmp_path / "red.png")
    args = [sys.executable, "-m", "transformers_alignedvq.cli", "ask", "--server", server_url, "--edge", EDGE,
            "--image", str(picture), QUESTION, "--json"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["answer"] == "red"
    bad = subprocess.run(args[:-3] + [str(Path(EDGE) / "edge_config.json"), QUESTION], capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.startswith("alignedvq: error: cannot read the image")


def test_cloud_commands_name_their_extra_and_info_reads_the_onnx_edge(tmp_path):
    cli = [sys.executable, "-m", "transformers_alignedvq.cli"]
    for argv, extra in ((["serve"], "serve"), (["export-edge", "--output", str(tmp_path / "e")], "export")):
        out = subprocess.run(cli + argv, capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
        assert f'pip install "transformers-alignedvq[{extra}]"' in out.stderr
    info = subprocess.run(cli + ["info", "--model", EDGE, "--json"], capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["checkpoint"].startswith("edge (onnx")
