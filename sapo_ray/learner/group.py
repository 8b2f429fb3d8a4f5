"""A group of learner ranks as Ray actors: creation, rendezvous and data-parallel calls."""

from __future__ import annotations

import ray
import torch

from sapo_ray.batch import Batch
from sapo_ray.config import LearnerWorkerConfig
from sapo_ray.remote import wait_all
from sapo_ray.utils import actor_env


class WorkerGroup:
    """`cfg.learner.world_size` Ray actors of `cls` forming one torch.distributed group.

    `call(method, ...)` runs a method on every rank with the same arguments (collectives such as
    weight gathering); `call_sharded(method, batch, ...)` gives rank r the r-th equal row shard. Every
    wait is bounded by `timeout_s` and a dead rank raises `sapo_ray.remote.ActorFailure` at once.
    """

    def __init__(self, cls, cfg: LearnerWorkerConfig, placement=None, hide_gpus: bool = False,
                 timeout_s: float = 3600.0):
        """`placement` (a `sapo_ray.placement.PlacementGroup`) pins rank r to its bundle; `hide_gpus` runs
        ranks holding logical GPU shares on the CPU (`cluster.simulate_gpus`); `timeout_s` bounds each
        call and the group's collectives."""
        g = cfg.learner
        actor = ray.remote(cls)
        self.name, self.timeout_s = cfg.role, timeout_s
        self.workers = [
            actor.options(
                num_cpus=g.num_cpus, num_gpus=g.num_gpus, resources=dict(g.resources) or None,
                runtime_env={"env_vars": actor_env(g.num_threads, hide_gpus)},
                **(placement.options(cfg.role, rank) if placement else {}),
            ).remote(rank, g.world_size, cfg)
            for rank in range(g.world_size)
        ]
        self.names = [f"{self.name} rank {r}" for r in range(g.world_size)]
        host, port = self.wait([self.workers[0].address.remote("learners")])[0]
        self.wait([w.init_group.remote(host, port, timeout_s) for w in self.workers])
        self.call("setup")

    @property
    def world_size(self) -> int:
        return len(self.workers)

    def wait(self, refs: list) -> list:
        """The results of one call per rank (rank order), bounded by the group's timeout."""
        return wait_all(refs, self.names, self.timeout_s)

    def call(self, method: str, *args, **kwargs) -> list:
        return self.wait([getattr(w, method).remote(*args, **kwargs) for w in self.workers])

    def submit_sharded(self, method: str, batch: Batch, *args, **kwargs) -> "Pending":
        """Start `method` on every rank with its row shard of `batch`; `.get()` waits for the per-rank results."""
        n = len(batch)
        assert n % self.world_size == 0, f"{self.name}: batch of {n} rows is not divisible by {self.world_size} ranks"
        size = n // self.world_size
        return Pending(self, [getattr(w, method).remote(batch.select(slice(r * size, (r + 1) * size)), *args, **kwargs)
                              for r, w in enumerate(self.workers)])

    def call_sharded(self, method: str, batch: Batch, *args, **kwargs) -> list:
        return self.submit_sharded(method, batch, *args, **kwargs).get()

    def submit_gather(self, method: str, batch: Batch, *args) -> "Pending":
        """`submit_sharded` whose `.get()` concatenates each rank's `{name: [rows, R_r]}` back to `[B, R]`."""
        R = batch.response_ids.shape[1]
        pad = lambda t: torch.nn.functional.pad(t, (0, R - t.shape[1])) if t.dim() == 2 else t
        return Pending(self, self.submit_sharded(method, batch, *args).refs,
                       lambda parts: {k: torch.cat([pad(p[k]) for p in parts]) for k in parts[0]})

    def gather_tensors(self, method: str, batch: Batch, *args) -> dict[str, torch.Tensor]:
        return self.submit_gather(method, batch, *args).get()

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)


class Pending:
    """A call in flight on every rank of a group: the driver starts calls on several groups, then waits
    for them (`get`), so that phases that do not need each other's results run at the same time."""

    def __init__(self, group: WorkerGroup, refs: list, finish=lambda parts: parts):
        self.group, self.refs, self.finish = group, refs, finish

    def get(self):
        return self.finish(self.group.wait(self.refs))
