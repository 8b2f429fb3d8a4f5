"""Per-phase time of a training step for the demo config, weight-sync speed and peak memory per actor.

    .venv/bin/python benchmarks/step_bench.py [--steps 6] [hydra overrides ...]

Runs the demo config (no validation, no checkpoints) for `--steps` steps, drops the first (warm-up)
and prints, per phase, the mean seconds and share of the step, then the share of the step spent in
generation + learner compute (the goal: >= 85%, i.e. framework overhead < 15%).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# Phases that are model compute (generation, forward passes, updates); the rest is framework overhead.
COMPUTE = ("gen", "forward", "update")


def machine() -> str:
    from sapo_ray.utils import cpu_model

    return f"{cpu_model()}, {os.cpu_count()} cores"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    args, overrides = ap.parse_known_args()
    run_dir = Path(tempfile.mkdtemp(prefix="step_bench_"))
    cmd = [sys.executable, "-m", "sapo_ray.main", f"trainer.steps={args.steps}", "trainer.val_every=0",
           "data.val_size=1", "algorithm.critic_warmup=0", "trainer.export_hf=false", "trainer.loggers=[jsonl]", f"trainer.run_dir={run_dir}",
           *overrides]
    subprocess.run(cmd, cwd=ROOT, check=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["step"] >= 2]  # step 0 is validation, step 1 warms up
    timing = {k[len("timing_s/"):]: float(np.mean([r[k] for r in rows])) for k in rows[0] if k.startswith("timing_s/")}
    step = timing.pop("step")
    print(f"machine: {machine()}; torch threads per actor from the config; command: {' '.join(cmd[1:])}")
    print(f"steps measured: {len(rows)} (after one warm-up step)\n")
    print("| phase | seconds | share of step |\n|---|---:|---:|")
    for k, v in sorted(timing.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v:.3f} | {100 * v / step:.1f}% |")
    compute = sum(timing.get(k, 0.0) for k in COMPUTE)
    print(f"| **step** | {step:.3f} | 100% |\n")
    print(f"generation + learner compute: {100 * compute / step:.1f}% of the step (overhead {100 - 100 * compute / step:.1f}%)")
    mean = lambda key: float(np.mean([r[key] for r in rows]))
    print(f"throughput: {mean('perf/throughput'):.0f} tokens/s (prompt + response), "
          f"{mean('perf/response_tokens') / step:.0f} response tokens/s")
    print(f"weight sync: {mean('sync/bytes') / 1e6:.1f} MB in {timing.get('update_weights', 0):.3f} s "
          f"({mean('sync/gb_per_s'):.2f} GB/s)")
    for key in sorted(k for k in rows[-1] if k.startswith(("perf/peak_host_mb/", "perf/peak_gpu_mb/"))):
        print(f"peak {key.split('_')[1]} memory {key.rsplit('/', 1)[-1]}: {rows[-1][key]:.0f} MB")


if __name__ == "__main__":
    main()
