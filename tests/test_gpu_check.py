"""`benchmarks/gpu_check.py` runs its learner-throughput part on the CPU too (for checking the script
itself where there is no GPU): the real PolicyWorker on a cut architecture, numbers in the summary."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.timeout(300)
def test_learner_throughput_on_the_cpu():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    r = gpu_check.learner_throughput("bundled:tiny-vlm", layers=2, rows=2, seq=64, checkpointing=True, repeats=1)
    assert (r["device"], r["layers"], r["rows"], r["seq"], r["checkpointing"]) == ("cpu", 2, 2, 64, True)
    assert r["tokens_per_s"] == pytest.approx(2 * 64 / r["step_s"], rel=1e-2)
    assert r["mfu"] is None and r["peak_mem_gb"] is None  # no GPU peak to compare against here
    assert 0 < r["plan_gb"] < 1 and r["params"] > 1_000_000
