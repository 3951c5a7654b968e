import contextlib
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch.distributed as dist


def worker_pids(parent: int) -> list[int]:
    """The direct children of `parent`, read from /proc (empty where there is none)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def stop_hung_torchrun(process: subprocess.Popen) -> tuple[str, str]:
    """Stops a torchrun that ran past its timeout, with its workers, and returns both streams.

    Each worker gets SIGABRT first: with PYTHONFAULTHANDLER set it prints every thread's Python stack, and its
    death makes torchrun stop the rest. SIGTERM and then SIGKILL follow if torchrun is still there.
    """
    for pid in worker_pids(process.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGABRT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        return process.communicate(timeout=30)
    process.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        return process.communicate(timeout=30)
    process.kill()
    return process.communicate()


def hang_report(timeout: float, stdout: str, stderr: str) -> str:
    """The tail of stdout, then each worker's stacks (faulthandler's blocks), last so a cut log keeps them."""
    stacks, inside = [], False
    for line in stderr.splitlines():
        if line.startswith("Fatal Python error"):
            inside = True
        elif not line.startswith(("Current thread", "Thread 0x", "  File ")) and line.strip():
            inside = False
        if inside:
            stacks.append(line)
    stacks = "\n".join(stacks)
    return f"torchrun ran past {timeout:.0f}s\n--- stdout (tail)\n{stdout[-1500:]}\n--- worker stacks\n{stacks[-6000:]}"


def run_torchrun(args: list, *, timeout: float, env: dict, attempts: int = 1) -> subprocess.CompletedProcess:
    """torchrun on 2 gloo processes; a run that passes `timeout` is stopped with its workers' stacks printed.

    With `attempts` > 1 a hung run is retried, with a warning that carries the stacks.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, args)]
    env = {**env, "PYTHONFAULTHANDLER": "1"}
    for attempt in range(1, attempts + 1):
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as process:
            try:
                stdout, stderr = process.communicate(timeout=timeout)
                return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
            except subprocess.TimeoutExpired:
                report = hang_report(timeout, *stop_hung_torchrun(process))
        if attempt < attempts:
            warnings.warn(f"attempt {attempt} of {attempts}: {report}", stacklevel=2)
    pytest.fail(report)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_two_process_training_keeps_identical_codebooks():
    script = Path(__file__).parent / "scripts" / "distributed_codebook.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = run_torchrun([script], timeout=150, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "codebooks identical on 2 ranks" in result.stdout


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_finetune_teardown_does_not_deadlock():
    """100 rounds of the finetune's teardown under DDP (its `--plain` variant deadlocks within 20 rounds here)."""
    script = Path(__file__).parent / "scripts" / "distributed_teardown.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = run_torchrun([script, "100"], timeout=120, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count(": 100 teardowns") == 2


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_finetune_script_under_torchrun(tmp_path):
    """The user-facing finetune (Trainer, image-grouped batches, LoRA, EMA codebook) on 2 gloo processes.

    Its teardown deadlock is fixed and tested above. One earlier hang, inside training, was never seen again nor
    explained, so a hang here is retried once and its stacks are kept in a warning rather than lost.
    """
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
        timeout=180, env=env, attempts=2,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = json.loads((out / "training_log.json").read_text())
    steps = [e for e in log if "commitment_loss" in e]
    assert len(steps) == 2 and all(e["codebook_perplexity"] >= 1 for e in steps)
    weights = load_file(out / "model.safetensors")
    assert weights["model.alignedvq.quantizer.codebook"].shape[-2] == 16  # (codebooks, K, dim)
    assert (out / "lora" / "adapter_model.safetensors").is_file()
    assert torch.isfinite(weights["model.alignedvq.quantizer.codebook"]).all()
