import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_two_process_training_keeps_identical_codebooks():
    script = Path(__file__).parent / "scripts" / "distributed_codebook.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "codebooks identical on 2 ranks" in result.stdout


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_finetune_script_under_torchrun(tmp_path):
    """The user-facing finetune (Trainer, image-grouped batches, LoRA, EMA codebook) on 2 gloo processes."""
    pytest.importorskip("easy_vqa")
    import json

    import torch
    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(root / "examples" / "finetune_alignedvq.py"), "--base", str(root / "artifacts" / "base-easyvqa"),
         "--output", str(out), "--limit", "48", "--max-steps", "4", "--batch-size", "8", "--calibration-images", "8",
         "--kmeans-iters", "2", "--codebook-size", "16", "--no-progress", "--logging-steps", "2", "--threads", "1"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = json.loads((out / "training_log.json").read_text())
    steps = [e for e in log if "commitment_loss" in e]
    assert len(steps) == 2 and all(e["codebook_perplexity"] >= 1 for e in steps)
    weights = load_file(out / "model.safetensors")
    assert weights["model.alignedvq.quantizer.codebook"].shape[-2] == 16  # (codebooks, K, dim)
    assert (out / "lora" / "adapter_model.safetensors").is_file()
    assert torch.isfinite(weights["model.alignedvq.quantizer.codebook"]).all()
