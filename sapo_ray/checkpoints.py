"""A run's checkpoints on disk: `checkpoints/step_NNNNNN/` with the learners' shards (`actor/`, `critic/`),
the driver's state (`trainer_state.json`), the config the weights were trained with, and the rollout in
flight (`rollout.max_staleness`); `checkpoints/latest` names the newest complete one.

A checkpoint is written to `<name>.tmp` and renamed once complete, so a save cut short (a kill, a full
disk) never leaves a directory that looks complete; `latest` is replaced atomically after the rename.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import ray
import torch

from sapo_ray.errors import StopRun
from sapo_ray.utils import fsync_tree, write_atomic

log = logging.getLogger(__name__)
STATE = "trainer_state.json"
# A checkpoint's in-flight rollout (`rollout.max_staleness`): the next step's samples, already drawn.
IN_FLIGHT = "in_flight_rollout.pt"


class Checkpoints:
    """The checkpoints under `directory`, the newest `keep` of them kept (0 keeps all)."""

    def __init__(self, directory: Path, keep: int):
        self.directory, self.keep = Path(directory), keep

    def save(self, state: dict, learners: dict, config_yaml: str, in_flight: dict | None = None) -> Path:
        """Save the learners (`{role: group}`), the driver's `state` (its `step` names the checkpoint), the
        run's config and the in-flight rollout's state. A save that fails (a full disk) removes what it
        wrote and raises `StopRun`, the last complete checkpoint untouched."""
        path = self.directory / f"step_{state['step']:06d}"
        tmp = path.with_name(path.name + ".tmp")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for role, group in learners.items():
                group.save_checkpoint(str(tmp / role))
            (tmp / STATE).write_text(json.dumps(state))
            # The config these weights were trained with (the run dir's is rewritten at every start), where
            # `python -m sapo_ray.export` finds the model's architecture and dtype.
            (tmp / "config.yaml").write_text(config_yaml)
            if in_flight is not None:
                # The next step's first draw, sampled on weights this checkpoint no longer holds: saved as it
                # came out, so a resumed run trains on exactly what the uninterrupted one does.
                torch.save(in_flight, tmp / IN_FLIGHT)
            check_shards(tmp, {role: group.world_size for role, group in learners.items()})
            fsync_tree(tmp)
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)  # a checkpoint directory exists only once it is complete
            write_atomic(self.directory / "latest", path.name)
            for old in stale_checkpoints(self.directory, self.keep):
                shutil.rmtree(old)
        except (OSError, ray.exceptions.RayTaskError) as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StopRun(f"saving {path} failed ({type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}); "
                          f"the last complete checkpoint is {self.latest() or 'none'}: free space and run the same "
                          "command again to continue from it") from err
        return path

    def latest(self) -> Path | None:
        """The checkpoint `latest` names, else (a save cut short) the newest complete one. Temporaries of
        an interrupted save are removed."""
        for tmp in list(self.directory.glob("*.tmp")):
            log.warning("removing %s, left by an interrupted save", tmp)
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        latest = self.directory / "latest"
        name = latest.read_text().strip() if latest.exists() else ""
        if name and (self.directory / name / STATE).exists():
            return self.directory / name
        complete = [p for p in sorted(self.directory.glob("step_*")) if (p / STATE).exists()]
        if complete:
            log.warning("%s does not name a complete checkpoint: continuing from the newest one, %s", latest, complete[-1])
        return complete[-1] if complete else None

    def to_resume(self, resume: str) -> Path | None:
        """The checkpoint `trainer.resume` asks for: none (`never`), the latest if any (`auto`), or a path."""
        if resume == "never":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / STATE).exists():
            raise FileNotFoundError(f"trainer.resume={resume!r}: no checkpoint there ({STATE} missing)")
        return path

    @staticmethod
    def load(path: Path, learners: dict) -> tuple[dict, dict | None]:
        """Load the learners' state of checkpoint `path`; returns the driver's state and the in-flight
        rollout's (None if the checkpoint has none)."""
        for role, group in learners.items():
            group.load_checkpoint(str(path / role))
        in_flight = torch.load(path / IN_FLIGHT, weights_only=False) if (path / IN_FLIGHT).exists() else None
        return json.loads((path / STATE).read_text()), in_flight


def check_shards(checkpoint: Path, ranks: dict[str, int]) -> None:
    """Every learner rank's shards (`ranks`: `{role: world size}`) must be where the driver sees them:
    ranks on other nodes write to their own disks unless the run directory is shared storage."""
    for role, world_size in ranks.items():
        missing = [r for r in range(world_size) if not any((checkpoint / role).glob(f"__{r}_*.distcp"))]
        if missing:
            raise StopRun(f"checkpoint {checkpoint}: the {role} shards of ranks {missing} are not in {checkpoint / role} "
                          "as the driver sees it; ranks on other nodes need trainer.run_dir on storage every node "
                          "shares (NFS, a parallel file system)")


def stale_checkpoints(directory: Path, keep: int) -> list[Path]:
    """The complete checkpoints in `directory` beyond the newest `keep` (0 keeps all), oldest first."""
    done = sorted(p for p in directory.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    return done[:-keep] if keep > 0 else []
