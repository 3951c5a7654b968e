"""benchmarks/wire_coding.py's measuring functions, on one and on two codes per token (the bundled model's)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

from transformers_alignedvq.entropy import EntropyModel

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        yield importlib.import_module("wire_coding")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.parametrize("codes", [1, 2])
def test_frame_sizes_and_times_take_one_or_more_codes_per_token(bench, codes, capsys):
    pytest.importorskip("constriction")
    rng = np.random.default_rng(0)
    shape = (8, 17) if codes == 1 else (8, 17, codes)
    training, test = rng.integers(0, 16, shape), rng.integers(0, 16, shape)
    model = EntropyModel.fit(training, codebook_size=16, grid=(4, 4), has_cls_token=True)
    rows = bench.frame_sizes(test, training, model, b"\0" * 16, None)
    assert ("v1 raw" in rows) == (codes == 1)  # version 1 carried one code per token
    assert all(len(sizes) == len(test) for sizes in rows.values())
    assert rows["v2 sent (smaller of the two)"] == [min(a, b) for a, b in zip(rows["v2 raw"],
                                                                              rows["v2 coded (context model)"])]
    bench.print_times(test, model, b"\0" * 16)
    assert "| v2 coded |" in capsys.readouterr().out

