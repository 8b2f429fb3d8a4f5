"""Groups of learner ranks as Ray actors: creation, rendezvous, and the calls the driver makes on them.

The driver calls a group's methods (`actor.compute_logprobs(batch, model="reference")`); each runs the
worker method of the same name on the ranks: with the same arguments on every rank (collectives such
as saving or gathering weights), or with rank r's equal row shard of a batch. Calls that return a
`Pending` start at once and are waited for with `.get()`, so phases that need nothing of each other
(the critic beside the policy) run at the same time. Every wait is bounded by the group's timeout, and a
dead or silent rank raises `sapo_ray.remote.ActorFailure` naming it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Generic, Literal, TypeVar

import ray
import torch

from sapo_ray.algo.losses import LossTrace
from sapo_ray.batch import Batch, LogProbs
from sapo_ray.config import LearnerWorkerConfig, learner_worker_config
from sapo_ray.learner.worker import CriticWorker, FSDPWorker, PolicyWorker
from sapo_ray.remote import wait_all
from sapo_ray.utils import actor_env

T = TypeVar("T")


class Pending(Generic[T]):
    """A call in flight on every rank of a group; `get()` waits for it and returns the combined result."""

    def __init__(self, group: "WorkerGroup", refs: list, finish: Callable[[list], T]):
        self.group, self.refs, self.finish = group, refs, finish

    def get(self) -> T:
        return self.finish(self.group.wait(self.refs))


class WorkerGroup:
    """`cfg.learner.world_size` Ray actors of `worker` (a `FSDPWorker` class) forming one torch.distributed
    group; the calls every learner role answers."""

    worker: type[FSDPWorker] = FSDPWorker

    def __init__(self, cfg: LearnerWorkerConfig, placement=None, hide_gpus: bool = False, timeout_s: float = 3600.0):
        """`placement` (a `sapo_ray.placement.PlacementGroup`) pins rank r to its bundle; `hide_gpus` runs
        ranks holding logical GPU shares on the CPU (`cluster.simulate_gpus`); `timeout_s` bounds each
        call and the group's collectives."""
        g = cfg.learner
        actor = ray.remote(self.worker)
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
        host, port = self.address("learners")
        self.wait([w.init_group.remote(host, port, timeout_s) for w in self.workers])
        self._each(self.worker.setup)

    @property
    def world_size(self) -> int:
        return len(self.workers)

    def wait(self, refs: list) -> list:
        """The results of one call per rank (rank order), bounded by the group's timeout."""
        return wait_all(refs, self.names, self.timeout_s)

    # -- how a call reaches the ranks -------------------------------------------------------------
    def _each(self, method: Callable, *args) -> list:
        """`method` (a worker method) on every rank with the same arguments; the per-rank results."""
        return self.wait([getattr(w, method.__name__).remote(*args) for w in self.workers])

    def _sharded(self, method: Callable, batch: Batch, *args, finish: Callable[[list], T] = lambda parts: parts) -> Pending[T]:
        """`method` on every rank with its row shard of `batch` (rank r: rows `[r n / W, (r + 1) n / W)`)."""
        n = len(batch)
        assert n % self.world_size == 0, f"{self.name}: batch of {n} rows is not divisible by {self.world_size} ranks"
        size = n // self.world_size
        refs = [getattr(w, method.__name__).remote(batch.select(slice(r * size, (r + 1) * size)), *args)
                for r, w in enumerate(self.workers)]
        return Pending(self, refs, finish)

    def _rows(self, method: Callable, batch: Batch, *args) -> Pending:
        """`_sharded` whose result is the ranks' per-row outputs concatenated back to `batch`'s rows."""
        return self._sharded(method, batch, *args, finish=lambda parts: concat_rows(parts, batch.response_ids.shape[1]))

    # -- the calls ----------------------------------------------------------------------------------
    def address(self, group: str) -> tuple[str, int]:
        """Rank 0's host and a free port there, where the ranks of `group` meet."""
        return self.wait([self.workers[0].address.remote(group)])[0]

    def update(self, batch: Batch) -> Pending[list[dict[str, float]]]:
        """The role's update on its row shards; per-rank metrics."""
        return self._sharded(self.worker.update, batch)

    def onload(self) -> None:
        self._each(FSDPWorker.onload)

    def offload(self) -> None:
        self._each(FSDPWorker.offload)

    def release_cache(self) -> None:
        self._each(FSDPWorker.release_cache)

    def save_checkpoint(self, path: str) -> None:
        self._each(FSDPWorker.save_checkpoint, path)

    def load_checkpoint(self, path: str) -> None:
        self._each(FSDPWorker.load_checkpoint, path)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded master weights (float32, on the host), gathered from every rank."""
        return self._each(FSDPWorker.full_state_dict)[0]

    def lr(self) -> float:
        """The learning rate of the next optimizer step."""
        return self.wait([self.workers[0].lr.remote()])[0]

    def peak_memory_mb(self) -> list[dict[str, float]]:
        """Each rank's `sapo_ray.utils.peak_memory_mb()`."""
        return self._each(FSDPWorker.peak_memory_mb)

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)


class PolicyGroup(WorkerGroup):
    """The actor's ranks: the policy (and the frozen reference), its updates and its weights' way out."""

    worker = PolicyWorker

    def compute_logprobs(self, batch: Batch, model: Literal["policy", "reference"] = "policy") -> Pending[LogProbs]:
        return self._rows(PolicyWorker.compute_logprobs, batch, model)

    def loss_trace(self, width: int) -> LossTrace:
        """What the policy loss saw per token in the last update, over the whole batch's rows (`width` columns)."""
        parts = self._each(PolicyWorker.loss_trace)
        return LossTrace(concat_rows([p.log_ratio for p in parts], width), concat_rows([p.held for p in parts], width))

    def engine_state_dict(self) -> dict[str, torch.Tensor]:
        """The full weights in the engines' dtype (`model.dtype`)."""
        return self._each(PolicyWorker.engine_state_dict)[0]

    def weight_buckets(self, bucket_bytes: int) -> tuple[list, dict[str, float]]:
        """The full weights as object-store references of at most `bucket_bytes` each, and their fingerprints."""
        return self._each(PolicyWorker.weight_buckets, bucket_bytes)[0]

    def init_weight_group(self, host: str, port: int, world_size: int) -> Pending[list]:
        """Rank 0 joins the weight-broadcast group (it returns once every engine has joined too)."""
        return Pending(self, [self.workers[0].init_weight_group.remote(host, port, world_size)], lambda parts: parts)

    def weight_bucket_specs(self, bucket_bytes: int) -> list:
        return self._each(PolicyWorker.weight_bucket_specs, bucket_bytes)[0]

    def broadcast_weights(self, bucket_bytes: int) -> dict[str, float]:
        """Broadcast the full weights from rank 0; their fingerprints."""
        return self._each(PolicyWorker.broadcast_weights, bucket_bytes)[0]

    def export_hf(self, out_dir: str) -> None:
        self._each(PolicyWorker.export_hf, out_dir)


class CriticGroup(WorkerGroup):
    """The critic's ranks."""

    worker = CriticWorker

    def compute_values(self, batch: Batch) -> Pending[torch.Tensor]:
        return self._rows(CriticWorker.compute_values, batch)


def concat_rows(parts: list, width: int):
    """Per-rank outputs over consecutive row shards (`[rows_r, R_r]` tensors, or `LogProbs` of them) as
    one output over all rows, each right-padded with zeros to `width` columns."""
    if isinstance(parts[0], LogProbs):
        entropy = None if parts[0].entropy is None else concat_rows([p.entropy for p in parts], width)
        return LogProbs(concat_rows([p.logp for p in parts], width), entropy)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in parts])


class Learners:
    """The policy's ranks and, for algorithms with a critic, the critic's: what a step moves, frees and
    saves together."""

    def __init__(self, actor: PolicyGroup, critic: CriticGroup | None = None):
        self.actor, self.critic = actor, critic

    @classmethod
    def start(cls, cfg, needs_critic: bool, placement=None, hide_gpus: bool = False, timeout_s: float = 3600.0,
              videos: bool = False) -> "Learners":
        """The groups of run config `cfg` (`learner_worker_config` gives each its config); `videos`: the run's
        data has videos."""
        from sapo_ray.rollout.engine import engine_traits

        adapters = cfg.actor.lora.rank > 0 and engine_traits(cfg.rollout.engine).adapters
        actor = PolicyGroup(learner_worker_config(cfg, "actor", videos, sync_adapters=adapters), placement, hide_gpus,
                            timeout_s)
        critic = (CriticGroup(learner_worker_config(cfg, "critic", videos), placement, hide_gpus, timeout_s)
                  if needs_critic else None)
        return cls(actor, critic)

    def groups(self) -> dict[str, WorkerGroup]:
        """The groups by role (a checkpoint's subdirectory names)."""
        return {"actor": self.actor} | ({"critic": self.critic} if self.critic else {})

    @property
    def rows_multiple(self) -> int:
        """Rows of a batch must be a multiple of this: every group splits them evenly over its ranks."""
        return math.lcm(*(g.world_size for g in self.groups().values()))

    @contextmanager
    def on_device(self):
        """The groups' state on their GPUs for the block (`learner.offload`), and their free GPU memory
        handed back after it, for colocated engines to generate in."""
        for group in self.groups().values():
            group.onload()
        try:
            yield
        finally:
            self.offload()

    def offload(self) -> None:
        for group in self.groups().values():
            group.offload()

    @contextmanager
    def timeout(self, seconds: float):
        """Every call of the block bounded by `seconds` instead of the groups' own timeouts."""
        groups = list(self.groups().values())
        saved = [g.timeout_s for g in groups]
        for g in groups:
            g.timeout_s = seconds
        try:
            yield
        finally:
            for g, t in zip(groups, saved):
                g.timeout_s = t

    def release_cache(self) -> None:
        """Every group's cached free GPU memory back to the device (before an engine wakes)."""
        for group in self.groups().values():
            group.release_cache()

    def peak_memory_mb(self) -> dict[str, list[dict[str, float]]]:
        return {role: group.peak_memory_mb() for role, group in self.groups().items()}

    def shutdown(self) -> None:
        for group in self.groups().values():
            group.shutdown()
