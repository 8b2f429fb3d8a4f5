"""A save that cannot finish: the driver killed in the middle, the disk full. The last complete checkpoint
survives, and the same command again continues from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from helpers import TINY_OVERRIDES

ROOT = Path(__file__).resolve().parents[2]


def command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "sapo_ray.main", "model.path=bundled:tiny-vlm", f"trainer.run_dir={run_dir}",
            *TINY_OVERRIDES, "trainer.export_hf=false", "reward.num_workers=0", *overrides]


def steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_driver_killed_while_saving_resumes_from_the_last_complete_checkpoint(tmp_path):
    """SIGKILL to the driver as soon as step 2's checkpoint is being written (its temporary exists): the
    same command again finds step 1's checkpoint (or step 2's, if the save won the race), removes the
    temporary, and trains to the end."""
    run = command(tmp_path, "trainer.steps=3", "trainer.save_every=1")
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(run, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        tmp = tmp_path / "checkpoints" / "step_000002.tmp"
        while not tmp.exists() and proc.poll() is None:
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before its second save"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
        proc.wait()
    done = subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "continuing from checkpoint" in done.stdout + done.stderr
    assert steps_logged(tmp_path)[-1] == 3 and sorted(steps_logged(tmp_path)) == [0, 1, 2, 3]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


@pytest.fixture
def small_disk(tmp_path):
    """A 240 MB tmpfs: one checkpoint of the tiny actor and critic (~170 MB) fits, a second does not."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=240m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_full_disk_stops_the_run_cleanly_and_keeps_the_last_checkpoint(small_disk):
    run = command(small_disk / "run", "trainer.steps=4", "trainer.save_every=2")
    done = subprocess.run(run, cwd=ROOT, env={**os.environ, "RAY_ADDRESS": ""}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 1, done.stderr[-3000:]
    said = done.stdout + done.stderr
    assert "step_000004 failed" in said and "the last complete checkpoint is" in said
    checkpoints = small_disk / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_000002"]
    assert (checkpoints / "latest").read_text() == "step_000002"
    assert steps_logged(small_disk / "run") == [0, 1, 2, 3, 4]
