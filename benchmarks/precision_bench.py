"""float32 against bf16 autocast on this CPU: the precision probe and a policy update of the demo's size.

    .venv/bin/python benchmarks/precision_bench.py [--rows 16] [--seq 150] [--repeats 1] [--isa both|native|avx2]

For each kernel set (`native`: what this CPU has; `avx2`: torch and oneDNN limited to AVX2 through
ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2, as on an AVX2-only CPU) it runs, in a fresh process:
`sapo_ray.precision.measure()` (what `autocast_bf16=auto` decides from) and the forward and backward pass of
the bundled tiny VLM's policy over `rows` x `seq` tokens, in float32 and under bf16 autocast, one thread.
Prints a JSON line per kernel set and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def measure_here(rows: int, seq: int, repeats: int) -> dict:
    import torch

    from sapo_ray.config import resolve_model_path
    from sapo_ray.models.loading import load_policy
    from sapo_ray.precision import MIN_SPEEDUP, measure
    from sapo_ray.utils import cpu_model

    torch.set_num_threads(1)
    probe = measure()
    model = load_policy(resolve_model_path("bundled:tiny-vlm"), attn_implementation="sdpa")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(20, 400, (rows, seq), generator=gen)
    seconds = {}
    for name, bf16 in (("float32", False), ("bf16_autocast", True)):
        best = float("inf")
        for _ in range(repeats + 1):  # the first pass selects kernels
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=ids).logits
            logits.float().logsumexp(-1).mean().backward()
            model.zero_grad(set_to_none=True)
            best = min(best, time.perf_counter() - t0)
        seconds[name] = round(best, 3)
    return {"cpu": cpu_model(), "kernels": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "probe_float32_ms": round(probe.float32_ms, 2), "probe_bfloat16_ms": round(probe.bfloat16_ms, 2),
            "auto_picks_bf16": probe.speedup >= MIN_SPEEDUP, "rows": rows, "seq": seq,
            "update_float32_s": seconds["float32"], "update_bf16_s": seconds["bf16_autocast"],
            "update_bf16_over_float32": round(seconds["bf16_autocast"] / seconds["float32"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seq", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--isa", choices=("both", "native", "avx2"), default="both")
    ap.add_argument("--here", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.here:
        print(json.dumps(measure_here(args.rows, args.seq, args.repeats)))
        return
    results = {}
    for isa in ("native", "avx2") if args.isa == "both" else (args.isa,):
        env = {**os.environ, "OMP_NUM_THREADS": "1", **(AVX2 if isa == "avx2" else {})}
        if isa == "native":
            for key in AVX2:
                env.pop(key, None)
        out = subprocess.run([sys.executable, __file__, "--here", f"--rows={args.rows}", f"--seq={args.seq}",
                              f"--repeats={args.repeats}"], env=env, capture_output=True, text=True, check=True)
        results[isa] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps({"isa": isa, **results[isa]}))
    print("\n| kernels | probe f32 / bf16 ms | auto picks | update f32 s | update bf16 s | bf16 / f32 |")
    print("|---|---|---|---|---|---|")
    for isa, r in results.items():
        print(f"| {isa} ({r['kernels']}) | {r['probe_float32_ms']} / {r['probe_bfloat16_ms']} | "
              f"{'bf16' if r['auto_picks_bf16'] else 'float32'} | {r['update_float32_s']} | {r['update_bf16_s']} | "
              f"{r['update_bf16_over_float32']}x |")
    print(f"\nmachine: {results[next(iter(results))]['cpu']}, {os.cpu_count()} cores; "
          f"{args.rows} x {args.seq} tokens, one thread")


if __name__ == "__main__":
    main()
