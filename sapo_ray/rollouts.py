"""The rollout workers as one group (the counterpart of `sapo_ray.learner.group`): start, generate,
replace, sleep, and the samples of a generation in flight.

Nothing here decides what to do when a worker dies: a wait raises `ActorFailure` naming the worker
(`worker_name`), and the trainer replaces it (`RolloutGroup.replace`) and generates its part again
(`Rollout.resubmit`).
"""

from __future__ import annotations

import math
from dataclasses import replace
import ray

from sapo_ray.batch import Prompt, Sample, SamplingParams
from sapo_ray.config import rollout_worker_config
from sapo_ray.remote import ActorFailure, wait_all
from sapo_ray.rollout.worker import RolloutWorker
from sapo_ray.utils import actor_env, derive_seed


def worker_name(i: int) -> str:
    """How errors and warnings name rollout worker `i` (`ActorFailure.actor`)."""
    return f"rollout worker {i}"


class RolloutGroup:
    """`rollout.num_workers` engines as Ray actors; `workers` is replaced in place when one is (the weight
    sync holds the same list)."""

    def __init__(self, cfg, placement):
        self.cfg, self.placement = cfg, placement
        self.workers = [self._start(i) for i in range(cfg.rollout.num_workers)]
        self.wait([w.ready.remote() for w in self.workers])

    def __len__(self) -> int:
        return len(self.workers)

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

    def index_of(self, failure: ActorFailure) -> int | None:
        """The worker `failure` names, or None if it names another actor."""
        names = [worker_name(i) for i in range(len(self.workers))]
        return names.index(failure.actor) if failure.actor in names else None

    def replace(self, i: int) -> None:
        """A new worker `i` in place of a dead or silent one (it loads `model.path`: sync the policy to it)."""
        ray.kill(self.workers[i], no_restart=True)
        self.workers[i] = self._start(i)
        self.wait([self.workers[i].ready.remote()], [i])

    def sleep(self) -> None:
        """Every engine frees its GPU memory until the next weight sync (`rollout.enable_sleep_mode`)."""
        self.wait([w.sleep.remote() for w in self.workers])

    def peak_memory_mb(self) -> list[dict[str, float]]:
        return self.wait([w.peak_memory_mb.remote() for w in self.workers])

    def generate(self, prompts: list[Prompt], params: SamplingParams, stream: tuple, examples: list[dict],
                 too_long: int, policy_version: int) -> "Rollout":
        """Start sampling `prompts` (those of `examples`; `too_long` more were left out), split evenly over
        the workers, worker i with seed `derive_seed(seed, *stream, i)`."""
        per = math.ceil(len(prompts) / len(self.workers)) if prompts else 0
        parts = [(i, (prompts[i * per:(i + 1) * per], replace(params, seed=derive_seed(self.cfg.seed, *stream, i)), i * per))
                 for i in range(len(self.workers)) if prompts[i * per:(i + 1) * per]]
        return Rollout([(i, args, self.workers[i].generate.remote(*args)) for i, args in parts], examples, too_long,
                       policy_version, timeout_s=self.cfg.trainer.rpc_timeout_s)

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

