"""The device layer loads neither PyTorch nor Transformers, even here where both are installed; the lazy package
root still registers the model with Transformers' Auto classes for the cloud side.

Each check runs in a fresh interpreter: this test process has long imported torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import transformers_alignedvq

pytestmark = pytest.mark.bundled_model
CLOUD = ("torch", "transformers", "fastapi", "uvicorn", "peft", "accelerate")
_REPORT = "import json, sys; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(%r))))" % (CLOUD,)


def _run(code: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env)


def _cloud_modules_after(code: str, *args: str) -> list[str]:
    out = _run(code + "\n" + _REPORT, *args)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", ["client", "client_edges", "wire", "wire_geometry", "entropy", "entropy_symbols",
                                    "preprocess", "edge_runtime", "cli", "errors", "extras"])
def test_device_module_imports_no_cloud_package(module):
    assert _cloud_modules_after(f"import transformers_alignedvq.{module}") == []


def test_package_root_is_light_and_lists_the_model_names():
    code = "import transformers_alignedvq as t; assert 'AlignedVQConfig' in dir(t) and t.DEFAULT_MODEL"
    assert _cloud_modules_after(code) == []


def test_ask_runs_the_onnx_edge_without_the_cloud_stack(tmp_path):
    """`alignedvq ask` end to end up to the network: bundled ONNX edge, a closed port, no retries."""
    image = tmp_path / "red.png"
    Image.fromarray(np.full((48, 48, 3), (200, 30, 30), dtype=np.uint8)).save(image)
    code = (
        "import sys\nfrom transformers_alignedvq import cli\n"
        "rc = cli.main(['ask', '--server', 'http://127.0.0.1:9', '--image', sys.argv[1], '--retry-window', '0',"
        " '--threads', '1', 'what color is the shape?'])\nassert rc == 1, rc\n"
        "from transformers_alignedvq.client import EdgeClient\n"
        "assert EdgeClient(sys.argv[2], 'http://127.0.0.1:9').edge.backend == 'onnx'"
    )
    out = _run(code + "\n" + _REPORT, str(image), transformers_alignedvq.DEFAULT_MODEL)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert out.stderr.startswith("alignedvq: error: GET http://127.0.0.1:9") or "failed after 1 attempt" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


_IMPORT_ORDERS = {
    "transformers first": "import transformers\nimport transformers_alignedvq\n",
    "ours first": "import transformers_alignedvq\nimport transformers\n",
    # A model file first: Transformers is then imported from inside it, while it is half-run.
    "a model file first": "import transformers_alignedvq.models.llava_alignedvq.modeling_alignedvq\n"
                          "import transformers_alignedvq\n",
    # A subpackage whose modules the model files import, first: half-run when Transformers arrives.
    "the PTQ package first": "import transformers_alignedvq.ptq\nimport transformers_alignedvq\n",
    "the checkpoints package first": "import transformers_alignedvq.checkpoints.loading\nimport transformers_alignedvq\n",
}


@pytest.mark.parametrize("order", list(_IMPORT_ORDERS))
def test_auto_classes_load_the_bundled_model_in_either_import_order(order):
    code = "import warnings\nwarnings.simplefilter('error', RuntimeWarning)\n" + _IMPORT_ORDERS[order] + (
        "from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText\n"
        "path = transformers_alignedvq.DEFAULT_MODEL\n"
        "assert type(AutoConfig.from_pretrained(path)).__name__ == 'AlignedVQConfig'\n"
        "assert type(AutoModel.from_pretrained(path)).__name__ == 'LlavaAlignedVQForConditionalGeneration'\n"
        "assert AutoModelForImageTextToText.from_pretrained(path).config.model_type == 'llava_alignedvq'\n"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr[-2000:]


def test_model_names_resolve_on_first_use():
    code = ("import transformers_alignedvq as t\nassert 'torch' not in __import__('sys').modules\n"
            "assert t.AlignedVQConfig.model_type == 'llava_alignedvq' and t.bits_per_index(1024) == 10\n"
            "from transformers_alignedvq import SPLIT_SITES, split\nassert 'mlp' in SPLIT_SITES")
    assert "torch" in _cloud_modules_after(code)


def test_unsupported_transformers_blocks_only_the_cloud_side():
    """The version check runs where the cloud side is used, never on the device path."""
    fake_version = (
        "import importlib.metadata as md\nreal = md.version\n"
        "md.version = lambda name: '4.40.0' if name == 'transformers' else real(name)\n"
    )
    code = fake_version + (
        "import transformers_alignedvq as t\nfrom transformers_alignedvq import client, wire\n"
        "try:\n    t.LlavaAlignedVQForConditionalGeneration\nexcept ImportError as exc:\n    print(exc)\n"
        "else:\n    raise SystemExit('no ImportError')\n"
    )
    out = _run(code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "transformers>=5.16.1,<6 (found 4.40.0)" in out.stdout and "[cloud]" in out.stdout
    # imported after Transformers, the root warns instead of failing, so a device module still imports
    out = _run(fake_version + "import warnings\nimport transformers\n"
               "with warnings.catch_warnings(record=True) as caught:\n    warnings.simplefilter('always')\n"
               "    from transformers_alignedvq.client import EdgeClient\n"
               "print('warned:', [str(w.message) for w in caught if w.category is RuntimeWarning])\n")
    assert out.returncode == 0 and "warned:" in out.stdout and "found 4.40.0" in out.stdout, out.stderr[-2000:]
