"""Actors killed mid-run: the run replaces them and finishes, losing nothing.

Each test runs the trainer in this process (as `sapo_ray.main.run` does) while a thread kills an actor's
process with SIGKILL once the run reaches a given step."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from helpers import tiny_cfg

pytestmark = pytest.mark.slow

# Metrics that differ between two identical runs: wall-clock times, speeds, memory, the fault count.
NOT_DETERMINISTIC = ("timing_s/", "perf/", "sync/gb_per_s", "faults/")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def pid_of(actor) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def kill_when(run_dir: Path, ready, actor_of, timeout_s: float = 300.0) -> threading.Thread:
    """A thread that waits until `ready(run_dir)`, then kills the process of `actor_of()` with SIGKILL."""
    def watch():
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not ready(run_dir):
            time.sleep(0.05)
        os.kill(pid_of(actor_of()), signal.SIGKILL)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def logged_step(n: int):
    return lambda run_dir: (run_dir / "metrics.jsonl").exists() and any(
        r["step"] >= n for r in read_metrics(run_dir))


def train(cfg, during=None):
    """`sapo_ray.main.run` in this process, with `during(trainer)` called once the actors exist."""
    from sapo_ray.config_checks import validate
    from sapo_ray.trainer import Trainer

    validate(cfg)
    trainer = Trainer(cfg)
    try:
        trainer.setup()
        watcher = during(trainer) if during else None
        trainer.fit()
        if watcher is not None:
            watcher.join(timeout=5)
        return trainer
    finally:
        trainer.close()


@pytest.mark.timeout(900)
def test_a_killed_rollout_worker_is_replaced_and_the_run_finishes(ray_cluster, tmp_path):
    """SIGKILL to the rollout worker during step 3 of 6: a new worker with the current weights redoes the
    lost generation; all 6 steps are logged with `faults/restarts` 1."""
    cfg = tiny_cfg(tmp_path, "bundled:tiny-vlm", "trainer.steps=6", "trainer.export_hf=false")
    train(cfg, lambda t: kill_when(tmp_path, logged_step(2), lambda: t.rollouts.workers[0]))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert rows[-1]["faults/restarts"] == 1.0 and rows[2]["faults/restarts"] == 0.0
    assert all(math.isfinite(v) for r in rows for v in r.values() if v is not None)


@pytest.mark.timeout(900)
def test_a_killed_policy_rank_is_rebuilt_from_the_checkpoint_and_the_run_matches(ray_cluster, tmp_path):
    """SIGKILL to the policy's rank once step 2's checkpoint exists (`trainer.save_every=2`): new learner
    groups continue from it, and steps 3-4 train exactly as in a run that was never interrupted."""
    common = ["trainer.steps=4", "trainer.save_every=2", "trainer.export_hf=false"]
    straight = tmp_path / "straight"
    train(tiny_cfg(straight, "bundled:tiny-vlm", *common))
    killed = tmp_path / "killed"
    saved = lambda run_dir: (run_dir / "checkpoints" / "latest").exists()
    trainer = train(tiny_cfg(killed, "bundled:tiny-vlm", *common),
                    lambda t: kill_when(killed, saved, lambda: t.learners.actor.workers[0]))
    assert trainer.restarts.used == 1
    expected, got = read_metrics(straight), read_metrics(killed)
    assert [r["step"] for r in got] == [0, 1, 2, 3, 4]
    for want, have in zip(expected[3:], got[3:]):
        keys = [k for k in want if not k.startswith(NOT_DETERMINISTIC)]
        assert {k: have[k] for k in keys} == {k: want[k] for k in keys}, want["step"]


@pytest.mark.timeout(900)
def test_a_hung_rollout_worker_is_treated_as_dead_after_the_timeout(ray_cluster, tmp_path):
    """SIGSTOP freezes the rollout worker (a hung engine call: alive, never answering): after
    `trainer.rpc_timeout_s` it is replaced like a dead one and the run finishes."""
    cfg = tiny_cfg(tmp_path, "bundled:tiny-vlm", "trainer.steps=3", "trainer.export_hf=false",
                   "trainer.rpc_timeout_s=25")
    frozen = []

    def freeze(trainer):
        def watch():
            while not logged_step(1)(tmp_path):
                time.sleep(0.05)
            frozen.append(pid_of(trainer.rollouts.workers[0]))
            os.kill(frozen[0], signal.SIGSTOP)

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        return thread

    trainer = train(cfg, freeze)  # without the timeout it would wait forever (the test's own timeout ends it)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and trainer.restarts.used == 1
    with pytest.raises(ProcessLookupError):  # the frozen process was killed, not left behind
        for _ in range(100):
            os.kill(frozen[0], 0)
            time.sleep(0.1)
