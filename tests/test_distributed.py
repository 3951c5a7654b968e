import os
import subprocess
import sys
from pathlib import Path

import torch.distributed as dist
import pytest


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
