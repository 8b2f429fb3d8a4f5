"""Whether bfloat16 compute pays on this CPU, decided at run time.

CPUs differ by more than an order of magnitude here: with AVX512-BF16 (or AMX) a bf16 matmul takes about
half the time of a float32 one; on an AVX2-only CPU oneDNN emulates bf16 and the same matmul is 40-60x
slower (benchmarks/RESULTS.md, "Precision by machine"). The CPU flags alone do not settle it (a
hypervisor or `ONEDNN_MAX_CPU_ISA` can hide the instructions the flags report), so `auto` times a few
matmuls in both dtypes and keeps bf16 only where it is clearly faster. The answer is cached per machine
(CPU model, flags, torch build, ISA limits): every run on a machine computes in the same precision, so a
continued run trains as the uninterrupted one did.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sapo_ray.utils import cpu_model, cpuinfo

log = logging.getLogger(__name__)

# The values of `actor.autocast_bf16`, `critic.autocast_bf16` and `sapo_ray.sft`'s `autocast_bf16`.
SETTINGS = ("auto", "true", "false")
# bf16 is kept only when its matmuls are this much faster: autocast also casts the float32 weights at
# every forward, which eats part of a small gain.
MIN_SPEEDUP = 1.25
# Square matmuls of the tiny models' widths (hidden 256, MLP 1024) and a larger one.
PROBE_SIZES = (256, 512)
# Environment variables that limit the kernels torch may use, hence part of what "this machine" is.
ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


@dataclass(frozen=True)
class Probe:
    """Milliseconds for the probe's matmuls in each dtype (the best of several repetitions)."""
    float32_ms: float
    bfloat16_ms: float

    @property
    def speedup(self) -> float:
        """How many times faster bf16 is (below 1: slower)."""
        return self.float32_ms / self.bfloat16_ms


@dataclass(frozen=True)
class Decision:
    use_bf16: bool
    reason: str


def normalize(value) -> str:
    """A config value (`auto`, or a boolean that Hydra may have turned into "True") as one of `SETTINGS`;
    anything else is returned as given, for validation to name."""
    text = str(value).strip().lower()
    return text if text in SETTINGS else str(value)


def decide(setting, probe) -> Decision:
    """`true` and `false` as set; `auto` from `probe()` (a `Probe`): bf16 only when at least
    `MIN_SPEEDUP` times faster."""
    setting = normalize(setting)
    if setting not in SETTINGS:
        raise ValueError(f"autocast_bf16={setting!r}: use one of {', '.join(SETTINGS)}")
    if setting != "auto":
        return Decision(setting == "true", f"autocast_bf16={setting} in the config")
    result = probe()
    use = result.speedup >= MIN_SPEEDUP
    verdict = "faster" if result.speedup >= 1 else "slower"
    factor = result.speedup if result.speedup >= 1 else 1 / result.speedup
    return Decision(use, f"auto: bf16 matmuls {factor:.1f}x {verdict} than float32 on this CPU, "
                         f"{result.bfloat16_ms:.2f} vs {result.float32_ms:.2f} ms")


def measure(sizes: tuple[int, ...] = PROBE_SIZES, repeats: int = 3) -> Probe:
    """Time square matmuls of `sizes` in float32 and in bfloat16 on one thread (~0.1 s where bf16 is
    native, ~0.5 s where it is emulated)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(0)
        totals = {}
        for dtype in (torch.float32, torch.bfloat16):
            total = 0.0
            for n in sizes:
                a, b = (torch.randn(n, n, generator=gen).to(dtype) for _ in range(2))
                a @ b  # the first call pays for kernel selection
                best = float("inf")
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    a @ b
                    best = min(best, time.perf_counter() - t0)
                total += best
            totals[dtype] = total * 1e3
        return Probe(totals[torch.float32], totals[torch.bfloat16])
    finally:
        torch.set_num_threads(threads)


def machine_key() -> str:
    """What the probe's answer depends on: the CPU, its flags, the torch build and its kernel limits."""
    import torch

    parts = [cpu_model(), cpuinfo("flags", "Features") or "", torch.__version__, torch.backends.cpu.get_cpu_capability(),
             *(f"{k}={os.environ.get(k, '')}" for k in ISA_LIMITS)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "sapo_ray" / "cpu_precision.json"


def cached_probe(path: Path | None = None) -> Probe:
    """This machine's probe, measured once and kept in `path` (default `cache_path()`) under `machine_key()`."""
    path = path or cache_path()
    key = machine_key()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("float32_ms"), float) and isinstance(entry.get("bfloat16_ms"), float):
        return Probe(entry["float32_ms"], entry["bfloat16_ms"])
    probe = measure()
    known[key] = {**asdict(probe), "cpu": cpu_model()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(path)
    except OSError as err:  # a read-only home: the answer is measured again next time
        log.debug("could not cache the precision probe in %s: %s", path, err)
    return probe


def decide_here(setting) -> Decision:
    """`decide` with this machine's cached probe."""
    return decide(setting, cached_probe)


def use_bf16(setting) -> bool:
    return decide_here(setting).use_bf16


def resolve_learners(cfg) -> dict[str, Decision]:
    """Replace `auto` in `actor.autocast_bf16` and `critic.autocast_bf16` of the composed config by the
    decision for this machine (`true` / `false`), so the run's `config.yaml` records what it computed in.
    GPU ranks compute in bf16 through FSDP2's mixed precision whatever the key says: no probe for them."""
    decisions = {}
    for role in ("actor", "critic"):
        group = cfg[role]
        if group.num_gpus > 0 and normalize(group.autocast_bf16) == "auto":
            decision = Decision(False, "GPU ranks: FSDP2's mixed precision computes in bf16 (the key is for CPUs)")
        else:
            decision = decide_here(group.autocast_bf16)
        group.autocast_bf16 = "true" if decision.use_bf16 else "false"
        decisions[role] = decision
    return decisions
