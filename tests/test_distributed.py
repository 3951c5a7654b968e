import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist


def run_torchrun(args: list, *, timeout: float, env: dict) -> subprocess.CompletedProcess:
    """torchrun on 2 processes; on a timeout its workers are stopped too, and the failure shows both streams' tails.

    subprocess.run's own timeout SIGKILLs torchrun alone, leaving its workers (and their busy gloo threads)
    running for the rest of the session, and reports the output cut short.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)  # torchrun passes it on to its workers (each in its own session)
            try:
                stdout, stderr = process.communicate(timeout=60)
            except subprocess.TimeoutExpired:  # torchrun itself is stuck: the context's wait() would block forever
                process.kill()
                stdout, stderr = process.communicate()
            pytest.fail(f"torchrun ran past {timeout:.0f}s\n--- stdout\n{stdout[-3000:]}\n--- stderr\n{stderr[-5000:]}")
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_two_process_training_keeps_identical_codebooks():
    script = Path(__file__).parent / "scripts" / "distributed_codebook.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = run_torchrun([script], timeout=240, env=env)
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
    result = run_torchrun(
        [root / "examples" / "finetune_alignedvq.py", "--base", root / "artifacts" / "base-easyvqa",
         "--output", out, "--limit", "48", "--max-steps", "4", "--batch-size", "8", "--calibration-images", "8",
         "--kmeans-iters", "2", "--codebook-size", "16", "--no-progress", "--logging-steps", "2", "--threads", "1"],
        timeout=300, env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = json.loads((out / "training_log.json").read_text())
    steps = [e for e in log if "commitment_loss" in e]
    assert len(steps) == 2 and all(e["codebook_perplexity"] >= 1 for e in steps)
    weights = load_file(out / "model.safetensors")
    assert weights["model.alignedvq.quantizer.codebook"].shape[-2] == 16  # (codebooks, K, dim)
    assert (out / "lora" / "adapter_model.safetensors").is_file()
    assert torch.isfinite(weights["model.alignedvq.quantizer.codebook"]).all()
