"""The rollout workers as one group (the counterpart of `sapo_ray.learner.group`): start, submit,
replace, sleep, sync, and the samples of a generation in flight.

A worker that dies or goes silent while the group waits on it is replaced within the run's restart budget
(`trainer.max_actor_restarts`): the new worker receives the current policy and generates the lost part
again. What the group cannot do alone it is given: the weight sync and the learners' way onto their
devices (`connect`), once the learners exist.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Callable

import ray

from sapo_ray.batch import Sample, SamplingParams
from sapo_ray.config import rollout_worker_config
from sapo_ray.errors import StopRun
from sapo_ray.remote import ActorFailure, Restarts, wait_all
from sapo_ray.rollout.engine import encode_prompt, engine_traits
from sapo_ray.rollout.episodes import episode_tools
from sapo_ray.rollout.worker import RolloutWorker
from sapo_ray.sync import WeightSync
from sapo_ray.utils import actor_env, derive_seed


def worker_name(i: int) -> str:
    """How errors and warnings name rollout worker `i` (`ActorFailure.actor`)."""
    return f"rollout worker {i}"


class RolloutGroup:
    """`rollout.num_workers` engines as Ray actors; `workers` is replaced in place when one is (the weight
    sync holds the same list). `processor` encodes the prompts."""

    def __init__(self, cfg, placement, processor, restarts: Restarts):
        self.cfg, self.placement, self.processor, self.restarts = cfg, placement, processor, restarts
        self.traits = engine_traits(cfg.rollout.engine)
        # The tools the prompts list (chat templates with a tools section render them; others ignore them).
        self.tools = episode_tools(cfg.env)
        self.workers = [self._start(i) for i in range(cfg.rollout.num_workers)]
        self.wait([w.ready.remote() for w in self.workers])
        self.weight_sync: WeightSync | None = None  # and the learners' context, once connected
        self.learners_on_device: Callable[[], AbstractContextManager] | None = None

    def connect(self, learners) -> None:
        """The weight sync from `learners` (a `sapo_ray.learner.group.Learners`) into these engines, and the
        learners' way onto their devices: what a sync, and a replacement's first one, need."""
        r = self.cfg.rollout
        ranks_per_engine = r.tensor_parallel_size if self.traits.tensor_parallel else 1
        self.weight_sync = WeightSync(learners.actor, self.workers, r.weight_sync, r.sync_bucket_mb * 2**20,
                                      ranks_per_engine, wait=self.wait)
        self.learners_on_device = learners.on_device

    def _start(self, i: int):
        r = self.cfg.rollout
        return (ray.remote(RolloutWorker)
                .options(num_cpus=r.num_cpus, num_gpus=r.num_gpus, resources=dict(r.resources) or None,
                         runtime_env={"env_vars": actor_env(r.num_threads, self.cfg.cluster.simulate_gpus > 0)},
                         **self.placement.options("rollout", i))
                .remote(rollout_worker_config(self.cfg, i)))

    def wait(self, refs: list, workers: list[int] | None = None) -> list:
        """Results of one call per worker (`workers`, default all, in order), bounded by
        `trainer.rpc_timeout_s`; a dead or silent worker raises `ActorFailure` naming it."""
        workers = range(len(self.workers)) if workers is None else workers
        return wait_all(refs, [worker_name(i) for i in workers], self.cfg.trainer.rpc_timeout_s)

    def replace(self, failure: ActorFailure) -> int:
        """A new worker, holding the current policy, in place of the dead or silent one `failure` names; its
        index. A failure of another actor is raised again."""
        names = [worker_name(i) for i in range(len(self.workers))]
        if failure.actor not in names:
            raise failure
        i = names.index(failure.actor)
        self.restarts.spend(failure)
        if self.cfg.rollout.weight_sync == "broadcast":
            raise StopRun(f"{failure}: an engine of a weight-broadcast group cannot be replaced alone "
                          "(rollout.weight_sync=object_store can); resume the run from its last checkpoint") from failure
        ray.kill(self.workers[i], no_restart=True)
        self.workers[i] = self._start(i)
        self.wait([self.workers[i].ready.remote()], [i])
        with self.learners_on_device():  # the new engine loaded model.path: give it the policy of now
            self.weight_sync(only=[i])
        return i

    def submit(self, examples: list[dict], params: SamplingParams, stream: tuple, policy_version: int) -> "Rollout":
        """Start sampling `examples` (those over `data.max_prompt_length` are left out and counted), split
        evenly over the workers, worker i with seed `derive_seed(seed, *stream, i)`."""
        d = self.cfg.data
        encoded = [(encode_prompt(self.processor, ex, d.instruction, keep_images=self.traits.raw_images,
                                  tools=self.tools), ex) for ex in examples]
        kept = [(p, ex) for p, ex in encoded if len(p.ids) <= d.max_prompt_length]
        prompts = [p for p, _ in kept]
        # Episodes' environments read their rows (a tool looks at the images); one-turn sampling needs none.
        rows = [ex for _, ex in kept] if self.cfg.env.name else None
        per = math.ceil(len(prompts) / len(self.workers)) if prompts else 0
        parts = [(i, (prompts[i * per:(i + 1) * per], replace(params, seed=derive_seed(self.cfg.seed, *stream, i)), i * per,
                      rows and rows[i * per:(i + 1) * per]))
                 for i in range(len(self.workers)) if prompts[i * per:(i + 1) * per]]
        return Rollout([(i, args, self.workers[i].generate.remote(*args)) for i, args in parts], [ex for _, ex in kept],
                       len(examples) - len(kept), policy_version, timeout_s=self.cfg.trainer.rpc_timeout_s)

    def generate(self, examples: list[dict], params: SamplingParams, stream: tuple,
                 policy_version: int = 0) -> tuple[list[Sample], list[dict], int]:
        """`submit` and wait: the samples (`prompt_index` into the kept examples), the kept examples, and how
        many were too long."""
        rollout = self.submit(examples, params, stream, policy_version)
        return self.samples(rollout), rollout.examples, rollout.too_long

    def samples(self, rollout: "Rollout") -> list[Sample]:
        """The rollout's samples; a worker that dies or goes silent meanwhile is replaced and its part
        generated again."""
        while True:
            try:
                return rollout.samples()
            except ActorFailure as failure:
                i = self.replace(failure)
                rollout.resubmit(i, self.workers[i])

    def sync(self) -> dict:
        """The policy's weights into every engine; an engine that dies meanwhile is replaced (and synced)."""
        try:
            return self.weight_sync()
        except ActorFailure as failure:
            self.replace(failure)
            return self.weight_sync()

    def sleep(self) -> None:
        """Every engine frees its GPU memory until the next weight sync (`rollout.enable_sleep_mode`)."""
        self.wait([w.sleep.remote() for w in self.workers])

    def peak_memory_mb(self) -> list[dict[str, float]]:
        return self.wait([w.peak_memory_mb.remote() for w in self.workers])

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)


class Rollout:
    """Sampling in flight on the rollout workers (or finished, from a checkpoint): the kept examples, how
    many were too long, and the policy version whose weights sampled them. `parts` are `(worker, generate
    arguments, result)`."""

    def __init__(self, parts: list, examples: list[dict], too_long: int, policy_version: int,
                 samples: list[Sample] | None = None, timeout_s: float = 3600.0):
        self.parts, self.examples, self.too_long, self.policy_version = parts, examples, too_long, policy_version
        self._samples, self.timeout_s = samples, timeout_s
        self._done: dict[int, list[Sample]] = {}

    def samples(self) -> list[Sample]:
        """The samples, in prompt order, once every part is done; a dead or silent worker raises
        `ActorFailure` (the parts already done are kept: `resubmit` the failed one and ask again)."""
        if self._samples is None:
            for i, _, ref in self.parts:
                if i not in self._done:
                    self._done[i] = wait_all([ref], [worker_name(i)], self.timeout_s)[0]
            self._samples = [s for i, _, _ in self.parts for s in self._done[i]]
            self.parts, self._done = [], {}
        return self._samples

    def resubmit(self, i: int, worker) -> None:
        """Generate worker `i`'s part again (same prompts and seed) on `worker`, its replacement."""
        self.parts = [(j, args, worker.generate.remote(*args) if j == i else ref) for j, args, ref in self.parts]

    def state(self) -> dict:
        """What a checkpoint keeps of it (its samples: wait for them first)."""
        return {"samples": self.samples(), "examples": self.examples, "too_long": self.too_long,
                "policy_version": self.policy_version}

    @classmethod
    def from_state(cls, state: dict) -> "Rollout":
        return cls([], state["examples"], state["too_long"], state["policy_version"], state["samples"])

