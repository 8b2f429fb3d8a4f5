"""`benchmarks/gpu_check.py` runs its learner-throughput part on the CPU too (for checking the script
itself where there is no GPU): the real PolicyWorker on a cut architecture, numbers in the summary."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    return gpu_check


@pytest.mark.timeout(300)
def test_learner_throughput_on_the_cpu():
    gpu_check = load_script()
    r = gpu_check.learner_throughput("bundled:tiny-vlm", layers=2, rows=2, seq=64, checkpointing=True, repeats=1)
    assert (r["device"], r["layers"], r["rows"], r["seq"], r["checkpointing"]) == ("cpu", 2, 2, 64, True)
    assert r["tokens_per_s"] == pytest.approx(2 * 64 / r["step_s"], rel=1e-2)
    assert r["mfu"] is None and r["peak_mem_gb"] is None  # no GPU peak to compare against here
    assert 0 < r["plan_gb"] < 1 and r["params"] > 1_000_000
    # MFU counts what a text batch computes: not the vision tower.
    assert r["params"] - r["params_used"] > 1_000_000 and r["params_used"] > 1_000_000


def test_a_gpu_torch_cannot_use_is_refused_not_measured_as_a_cpu():
    gpu_check = load_script()
    refusal = gpu_check.unusable_gpu_error(False, "/dev/nvidia*", "2.13.0+cpu", None)
    assert "has an NVIDIA GPU (/dev/nvidia*) but torch 2.13.0+cpu (a CPU-only build) cannot use it" in refusal
    assert "built for CUDA 13.0" in gpu_check.unusable_gpu_error(False, "/proc/driver/nvidia/gpus", "2.13.0", "13.0")
    assert gpu_check.unusable_gpu_error(True, "/dev/nvidia*", "2.13.0", "13.0") is None  # usable: measure
    assert gpu_check.unusable_gpu_error(False, None, "2.13.0+cpu", None) is None  # no GPU: the CPU self-test
