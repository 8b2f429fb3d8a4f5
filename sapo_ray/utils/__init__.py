"""Small helpers shared by the driver and the actors: thread counts, timing, seeding."""

from __future__ import annotations

import hashlib
import os
import random
import time
from contextlib import contextmanager

import numpy as np
import torch

# Set in every actor's environment before its process starts (OpenMP reads them once, at load time).
THREAD_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def actor_env(num_threads: int, hide_gpus: bool = False) -> dict[str, str]:
    """Environment for an actor process that owns `num_threads` cores: no spinning, no oversubscription.
    `hide_gpus` (simulated GPUs): the actor sees no CUDA device, so it computes on the CPU over gloo
    whatever logical GPU share Ray gave it."""
    n = str(max(1, int(num_threads)))
    hidden = {"CUDA_VISIBLE_DEVICES": "", "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"} if hide_gpus else {}
    return {**THREAD_ENV, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, **hidden}


def compute_device(num_gpus: float, who: str) -> torch.device:
    """The device of an actor holding `num_gpus` of a GPU: the CPU without a share or on simulated GPUs
    (`actor_env` hides CUDA from it), else its GPU, made current. A share that torch cannot use raises,
    naming `who`: an actor that computed on the CPU instead would go unnoticed until the run crawled."""
    if num_gpus <= 0 or os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return torch.device("cpu")
    if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise RuntimeError(
            f"{who} holds a GPU share (num_gpus={num_gpus:g}) but torch cannot use a GPU here (torch "
            f"{torch.__version__}, {build}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
            "install a CUDA build of torch on the GPU nodes (docs/running.md), or try the topology on CPUs "
            "with cluster.simulate_gpus=N")
    torch.cuda.set_device(0)  # the first GPU Ray gave this process (it sets CUDA_VISIBLE_DEVICES)
    return torch.device("cuda", 0)


def set_threads(num_threads: int) -> None:
    """Pin torch's intra-op pool to this process's CPU share (the default, all cores, thrashes)."""
    n = max(1, int(num_threads))
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


def bucket_tensors(tensors: dict[str, torch.Tensor], bucket_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """`(name, tensor)` pairs in order, cut into buckets of at most `bucket_bytes` (a larger tensor gets
    a bucket of its own): the unit of one weight-sync transfer."""
    buckets, bucket, size = [], [], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            buckets.append(bucket)
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    return buckets + [bucket] if bucket else buckets


def cpuinfo(*fields: str) -> str | None:
    """The first of `fields` that /proc/cpuinfo has (Linux), its value; None elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(fields):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The processor's model name (for benchmark records)."""
    import platform

    return cpuinfo("model name") or platform.processor() or "unknown"


def peak_memory_mb() -> dict[str, float]:
    """This process's peak memory in MB: `host`, its resident memory; where it uses CUDA also `gpu`, the
    most its caching allocator reserved on the device (what the GPU had to hold for it, more than the
    tensors' own bytes). Two numbers, never one maximum of both: they are different memories."""
    import resource

    peaks = {"host": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks["gpu"] = torch.cuda.max_memory_reserved() / 2**20
    return peaks


@contextmanager
def timer(name: str, timing: dict[str, float]):
    """Add the wall time of the block to `timing[name]` (seconds)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timing[name] = timing.get(name, 0.0) + time.perf_counter() - start


def derive_seed(seed: int, stream: str, *index: int | str) -> int:
    """The seed of one random stream of a run: a 63-bit hash of `(seed, stream, *index)`.

    Every random stream is seeded through this function, so no two streams share a seed by
    accident (adjacent integers, as `seed + i`, collide as soon as one stream is indexed by
    workers and another by samples). The streams:

    | stream | index | seeds |
    |---|---|---|
    | `data/train` | | synthvista's generated training rows |
    | `data/val` | | synthvista's validation rows (from seed 0: one validation set for every run seed) |
    | `loader` | | the prompt order of each epoch |
    | `rollout` | step, draw, worker | one rollout worker's sampling in one draw of a training step |
    | `engine` | worker | vllm: the engine's own generator (each request also has its own seed) |
    | `sample` | prompt, k | vllm: the k-th response to a prompt (`SamplingParams.seed` is the base) |
    | `chunk` | chunk | hf: the sampling of one chunk of at most `rollout.max_batch_size` rows (`SamplingParams.seed` is the base) |
    | `validation` | worker | validation sampling (the same at every validation: common random numbers) |
    | `init` | role | a learner's fresh weights (the value head); every rank of a role draws the same |
    | `shuffle` | role, update | a learner's mini-batch order in its `update`-th call |
    | `sft/data`, `sft/teacher` | step | the warm start's rows and which of them the sloppy teacher solves |
    | `sft/eval` | | the warm start's held-out evaluation |

    The value fits torch's and vLLM's generators (< 2**63); numpy takes it modulo 2**32.
    """
    index = tuple(i if isinstance(i, str) else int(i) for i in index)  # numpy/torch integers hash as ints
    key = repr((int(seed), stream, *index)).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python/NumPy/torch RNG states as JSON-serialisable lists (checkpoints never pickle)."""
    np_state = np.random.get_state()
    return {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def fsync_tree(root) -> None:
    """Flush every file under `root`, and the directories themselves, to the disk (before a rename makes
    them a checkpoint: a crash right after must not leave a complete-looking directory of empty files)."""
    from pathlib import Path

    for path in sorted(Path(root).rglob("*")) + [Path(root)]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomic(path, text: str) -> None:
    """Replace `path` with `text` so that a reader (or a crash) sees the old file or the new, never a part."""
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
