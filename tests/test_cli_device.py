"""The ``alignedvq`` command on a device install (`[edge]`: no PyTorch, no Transformers), emulated in a fresh
interpreter where importing them fails: every subcommand works or says in one line which extra it needs, and
every bad ``ask`` input gets one line and exit status 1, never a traceback."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from transformers_alignedvq.testing import WITHOUT_CLOUD_PACKAGES

pytestmark = pytest.mark.bundled_model

# Runs `cli.main` once per argument list (JSON in argv[1]) and reports each exit status and stderr.
_RUN_COMMANDS = WITHOUT_CLOUD_PACKAGES + """
import contextlib, io, json, sys
from transformers_alignedvq import cli
results = []
for argv in json.loads(sys.argv[1]):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = cli.main(argv)
    results.append({"code": code, "err": err.getvalue(), "out": out.getvalue()})
print(json.dumps({"results": results, "torch": "torch" in sys.modules}))
"""


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds none: a decompression bomb's header."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _run(commands: list[list[str]], tmp_path, **env) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), **env}
    out = subprocess.run([sys.executable, "-c", _RUN_COMMANDS, json.dumps(commands)], capture_output=True,
                         text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert not report["torch"]
    return report["results"]


def _one_line_error(result: dict) -> str:
    assert result["code"] == 1, result
    assert result["err"].startswith("alignedvq: error: ") and result["err"].count("\n") == 1, result["err"]
    return result["err"]


def test_cloud_commands_name_the_extra_they_need_and_info_works(tmp_path):
    commands = {
        "serve": (["serve"], "[serve]"),
        "demo": (["demo"], "[serve,train]"),
        "export-edge": (["export-edge", "--output", str(tmp_path / "edge")], "[export]"),
        "export-vllm": (["export-vllm", "--output", str(tmp_path / "vllm")], "[cloud]"),
    }
    results = _run([argv for argv, _ in commands.values()] + [["info", "--json"]], tmp_path)
    for (name, (_, extra)), result in zip(commands.items(), results):
        err = _one_line_error(result)
        assert f"`alignedvq {name}` needs torch" in err or f"`alignedvq {name}` needs transformers" in err, err
        assert f'pip install "transformers-alignedvq{extra}"' in err, err
    info = results[-1]
    assert info["code"] == 0, info["err"]
    assert json.loads(info["out"])["checkpoint"] == "full"


def test_missing_package_messages_name_the_right_extra():
    from transformers_alignedvq.extras import missing_package_message

    def missing(name):
        return ModuleNotFoundError(f"No module named {name!r}", name=name)

    assert missing_package_message("ask", missing("torch")).endswith('pip install "transformers-alignedvq[cloud]"')
    assert missing_package_message("serve", missing("fastapi")).endswith('"transformers-alignedvq[serve]"')
    assert missing_package_message("demo", missing("easy_vqa")).endswith('"transformers-alignedvq[train]"')
    assert missing_package_message("ask", missing("onnxruntime")).endswith('"transformers-alignedvq[edge]"')
    assert missing_package_message("serve", missing("vllm")) == (
        "`alignedvq serve` needs the Python package 'vllm', which is not installed")
    assert missing_package_message("info", ImportError("transformers 4.0 is too old")) == (
        "`alignedvq info`: transformers 4.0 is too old")


def test_bad_ask_inputs_get_one_line(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_header(15000, 15000))  # over twice Pillow's limit: its error
    (tmp_path / "big.png").write_bytes(_png_header(12000, 12000))  # over the limit, under twice: only a warning
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "pictures").mkdir()
    ask = ["ask", "--server", "http://127.0.0.1:9", "--retry-window", "0"]
    cases = [
        (["--image", "bomb.png", "q"], "cannot read the image: Image size (225000000 pixels) exceeds limit"),
        (["--image", "big.png", "q"], "the image is 12000x12000 pixels, more than the 89478485 allowed"),
        (["--image", "pictures", "q"], "--image pictures is a folder; give one image file"),
        (["--image", "https://example.com/cat.png", "q"], "is a URL; give a local image file"),
        (["--image", "small.png", "--edge", "edges/tiny/typo", "q"], "edge folder edges/tiny/typo not found"),
        (["--image", "small.png", "--edge", "./edge", "q"], "edge folder ./edge not found"),
        # a Hub id that cannot be fetched: one line with the first line of the Hub's reason
        (["--image", "small.png", "--edge", "org/no-such-repo", "q"],
         "edge folder org/no-such-repo not found here, nor as a Hub repo id: "),
    ]
    results = _run([ask + argv for argv, _ in cases], tmp_path, HF_ENDPOINT="http://127.0.0.1:9",
                   HF_HUB_ETAG_TIMEOUT="2", HF_HUB_DOWNLOAD_TIMEOUT="2")
    for (argv, message), result in zip(cases, results):
        assert message in _one_line_error(result), (argv, result["err"])


def test_load_image_refuses_oversized_images_before_decoding(tmp_path):
    from transformers_alignedvq.preprocess import ImageInputError, load_image

    with pytest.raises(ImageInputError, match="12000x12000 pixels"):
        load_image(_png_header(12000, 12000))
    with pytest.raises(ImageInputError, match="is a folder"):
        load_image(tmp_path)
    assert load_image(np.zeros((4, 5, 3), dtype=np.uint8)).size == (5, 4)
