"""A real run stopped by real signals: Ctrl-C as a terminal sends it, SIGTERM as `ray job stop` does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import TINY_OVERRIDES, tiny_cfg

STEPS = 6


# Periodic saves off: what a stopped run continues from is the checkpoint written on the way out. No run
# directory given: the default, outputs/<project>/<experiment> below the working directory.
COMMAND = [sys.executable, "-m", "sapo_ray.main", "model.path=bundled:tiny-vlm", *TINY_OVERRIDES,
           "trainer.export_hf=false", "trainer.save_every=0", f"trainer.steps={STEPS}"]
RUN_DIR = Path("outputs") / "sapo-ray" / "sapo-seed0"


def metrics(run_dir: Path) -> dict[int, dict]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return {row["step"]: row for row in rows}


def descendants(pid: int) -> set[int]:
    """`pid` and every process below it (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        found.add(p)
        todo += children.get(p, [])
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def stop_after(cwd: Path, step: int, signum: int, whole_group: bool) -> tuple[int, float, set[int], str]:
    """Start the run in `cwd`, send `signum` once `step` is logged (to its process group, or the driver
    alone); returns the exit status, the seconds from the signal to the exit, every process the run had,
    and what it printed."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    run_dir, log = cwd / RUN_DIR, cwd / f"run-{step}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(COMMAND, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    seen: set[int] = set()
    try:
        while proc.poll() is None and max(metrics(run_dir), default=-1) < step:
            seen |= descendants(proc.pid)
            time.sleep(0.05)
        assert proc.poll() is None, f"the run ended before step {step}"
        seen |= descendants(proc.pid)
        t0 = time.monotonic()
        os.killpg(proc.pid, signum) if whole_group else os.kill(proc.pid, signum)
        status = proc.wait(timeout=60)
        return status, time.monotonic() - t0, seen, log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def latest_checkpoint_step(run_dir: Path) -> int:
    name = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / name / "trainer_state.json").exists()
    return int(name.split("_")[1])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_stopped_twice_the_run_continues_as_if_never_stopped(ray_cluster, tmp_path):
    """Ctrl-C (SIGINT to the process group) after step 2, then SIGTERM to the driver alone after step 4:
    each ends the run within 10 s with exit status 130 / 143 and no process of it left, and leaves a
    checkpoint of the last finished step though periodic saves are off. The same command in the same
    directory continues each time, and every step's metrics equal an uninterrupted run's."""
    from sapo_ray import precision
    from sapo_ray.main import run

    cwd = tmp_path / "stopped"
    cwd.mkdir()
    run_dir = cwd / RUN_DIR
    for step, signum, whole_group, expected in ((2, signal.SIGINT, True, 130), (4, signal.SIGTERM, False, 143)):
        status, seconds, processes, printed = stop_after(cwd, step, signum, whole_group)
        assert ("starting a fresh run" if step == 2 else "continuing from checkpoint") in printed
        assert status == expected and seconds < 10, (signal.Signals(signum).name, status, seconds)
        time.sleep(0.5)
        assert not [p for p in processes if alive(p)], "processes of the stopped run are left"
        logged = max(metrics(run_dir))
        # The step in progress is saved when the signal came during its update (its validation then runs
        # on continuing), else the last logged one.
        assert latest_checkpoint_step(run_dir) in (logged, logged + 1) and logged >= step
    saved = (run_dir / "config.yaml").read_text()
    resolved = "true" if precision.use_bf16("auto") else "false"
    assert f"autocast_bf16: '{resolved}'" in saved and "autocast_bf16: auto" not in saved

    done = subprocess.run(COMMAND, cwd=cwd, env={**os.environ, "RAY_ADDRESS": ""},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "continuing from checkpoint" in done.stdout + done.stderr

    run(tiny_cfg(tmp_path / "straight", "bundled:tiny-vlm", f"trainer.steps={STEPS}", "trainer.save_every=0",
                 "trainer.export_hf=false"))
    a, b = metrics(tmp_path / "straight"), metrics(run_dir)
    assert sorted(b) == list(range(STEPS + 1)) == sorted(a)
    for step in range(1, STEPS + 1):
        keys = [k for k in a[step] if not k.startswith(("timing_s", "perf/", "sync/gb_per_s"))]
        assert len(keys) > 20 and set(keys) <= set(b[step])
        for k in keys:
            assert a[step][k] == pytest.approx(b[step][k], rel=1e-5, abs=1e-6), (step, k)
