"""Throughput of the SAPO algorithm core on CPU (or CUDA with --device cuda).

Times, at B x T tokens (default 512 x 4096, response lengths uniform in [T/4, T]):
  1. segmentation (entropy_topk, frac 0.3)
  2. segment GAE (value_anchor seg_end_prev, whitening + clamp)
  3. segmentation + segment GAE together (target >= 20M tokens/s on CPU)
  4. segment-ratio policy loss, forward + backward
  5. token GAE (for reference)

Prints a markdown table plus the machine, torch version and command.

    OMP_NUM_THREADS=2 PYTHONPATH=. .venv/bin/python benchmarks/algo_bench.py
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import dataclasses
import os
import platform
import statistics
import sys
import time

import torch

from sapo_ray.algo import advantages, losses, segments
from sapo_ray.utils import cpu_model


def _keep_freed_memory() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    if not ok:
        raise SystemExit("mallopt failed (not glibc?); run without --keep-freed-memory")


def _time(fn, repeats: int, device: str) -> tuple[float, float]:
    """Median wall time and median process CPU time of ``fn()`` in seconds, after one warm-up call.

    On a shared machine the wall time includes waiting for a core; the CPU time does not.
    """
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--frac", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table for seg + GAE")
    ap.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="glibc mallopt: keep freed blocks up to 32 MiB in the process instead of returning them to the "
        "OS, so repeated [B, T] temporaries do not page-fault on every call (as with jemalloc/tcmalloc)",
    )
    args = ap.parse_args()
    if args.keep_freed_memory:
        _keep_freed_memory()

    B, T, dev = args.batch, args.length, args.device
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).to(dev)
    entropy = torch.rand(B, T, generator=g).to(dev)
    values = torch.randn(B, T, generator=g).to(dev)
    old_logp = (-torch.rand(B, T, generator=g) * 3).to(dev)
    new_logp = (old_logp.cpu() + 0.05 * torch.randn(B, T, generator=g)).to(dev)
    scores = torch.randint(0, 2, (B,), generator=g).float().to(dev)
    rewards = advantages.token_rewards(scores, mask)
    n_tokens = int(mask.sum())

    seg = segments.segment("entropy_topk", mask=mask, entropy=entropy, frac=args.frac)

    def run_seg():
        return segments.segment("entropy_topk", mask=mask, entropy=entropy, frac=args.frac)

    def run_gae():
        # a fresh Segments (no cached per-segment views) so the GAE pays for its own lengths/ends
        fresh = dataclasses.replace(seg)
        return advantages.segment_gae(rewards, values, mask, fresh, gamma=1.0, lam=0.99)

    def run_seg_gae():
        s = segments.segment("entropy_topk", mask=mask, entropy=entropy, frac=args.frac)
        return advantages.segment_gae(rewards, values, mask, s, gamma=1.0, lam=0.99)

    adv, _ = run_gae()

    def run_loss():
        logp = new_logp.clone().requires_grad_(True)
        loss, _ = losses.policy_loss(logp, old_logp, adv, mask, level="segment", segments=seg)
        loss.backward()

    def run_token_gae():
        return advantages.token_gae(rewards, values, mask, gamma=1.0, lam=0.95)

    rows = [
        ("segmentation (entropy_topk)", run_seg),
        ("segment GAE", run_gae),
        ("segmentation + segment GAE", run_seg_gae),
        ("segment-ratio policy loss fwd+bwd", run_loss),
        ("token GAE (reference)", run_token_gae),
    ]
    print(f"B={B} T={T} valid tokens={n_tokens:,} frac={args.frac} segments/row mean="
          f"{seg.num_segments.float().mean():.1f} device={dev}\n")
    print("| step | wall ms (median) | CPU ms (median) | tokens/s valid (wall) | tokens/s B*T (wall) |")
    print("|---|---:|---:|---:|---:|")
    for name, fn in rows:
        t, c = _time(fn, args.repeats, dev)
        print(f"| {name} | {t * 1e3:.1f} | {c * 1e3:.1f} | {n_tokens / t / 1e6:.1f}M | {B * T / t / 1e6:.1f}M |")

    print()
    print(f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}")
    print(f"- torch {torch.__version__}, python {platform.python_version()}")
    if hasattr(os, "getloadavg"):
        print(f"- load average at the end (other processes on the machine): {os.getloadavg()[0]:.2f}")
    kept = "freed blocks kept in the process (--keep-freed-memory)"
    print(f"- malloc: {kept if args.keep_freed_memory else 'glibc defaults'}")
    print(f"- command: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} {' '.join([sys.executable] + sys.argv)}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run_seg_gae()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
