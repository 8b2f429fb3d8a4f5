"""Builders shared by the system tests: small batches from a real engine, small configs."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from sapo_ray.algo.registry import get_algorithm
from sapo_ray.batch import Batch
from sapo_ray.config import (LearnerConfig, LearnerWorkerConfig, ModelConfig, OptimConfig, RolloutConfig,
                             RolloutWorkerConfig, compose_config)
from sapo_ray.data.datasets import load_dataset_split
from sapo_ray.batch import Prompt, SamplingParams
from sapo_ray.rollout.engine import HFEngine, encode_prompt


def encode(processor, example) -> Prompt:
    return encode_prompt(processor, example)


def rollout_cfg(path: str, engine: str = "hf", **rollout) -> RolloutWorkerConfig:
    """A rollout worker's config for the model at `path` (one thread, float32)."""
    return RolloutWorkerConfig(ModelConfig(path=path), RolloutConfig(engine=engine, num_threads=1, **rollout),
                               index=0, seed=0)


def engine_for(path: str) -> tuple[HFEngine, object]:
    from sapo_ray.models import load_processor

    return HFEngine.from_config(rollout_cfg(path)), load_processor(path)


# The smallest run of the trainer (tiny batches, one thread per actor, every step a full update), shared by
# the end-to-end, learning and cluster tests; each adds its model, steps and run directory.
TINY_OVERRIDES = [
    "trainer.val_every=0", "trainer.loggers=[jsonl]", "algorithm.critic_warmup=0", "data.prompts_per_step=4",
    "data.train_size=64", "data.val_size=4", "rollout.n=2", "rollout.max_new_tokens=8", "rollout.num_threads=1",
    "actor.num_threads=1", "critic.num_threads=1", "actor.mini_batch_size=8", "actor.micro_batch_size=4",
    "critic.mini_batch_size=8", "critic.micro_batch_size=4", "reward.num_workers=1",
]


def tiny_cfg(run_dir, model: str = "bundled:tiny-vlm", *overrides: str):
    """The smallest two-step run of `model` into `run_dir` (TINY_OVERRIDES), plus `overrides`."""
    return compose_config(f"model.path={model}", f"trainer.run_dir={run_dir}", "trainer.steps=2", *TINY_OVERRIDES,
                          *overrides)


def sample_batch(path: str, prompts: int = 4, n: int = 2, max_new_tokens: int = 12, seed: int = 0,
                 text_only: bool = False, **knobs) -> tuple[Batch, HFEngine]:
    """Real rollouts of the model at `path` on synthvista prompts (`knobs`: the generator's), as a Batch
    with rollout log-probs."""
    engine, processor = engine_for(path)
    examples = load_dataset_split("synthvista", None, "train", n=prompts, seed=seed, text_only=text_only, **knobs)
    samples = engine.generate([encode(processor, e) for e in examples],
                              SamplingParams(n=n, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed))
    batch = Batch.from_samples(samples, engine.pad_id)
    return batch.with_fields(group_index=torch.tensor([s.prompt_index for s in samples])), engine


def learner_cfg(path: str, role: str = "actor", algorithm: str = "sapo", model: dict | None = None,
                videos: bool = False, **learner) -> LearnerWorkerConfig:
    """One learner rank's config: the model at `path`, lr 1e-3, micro-batches of 4, mini-batches of 8,
    no shuffling, responses up to 12 tokens at temperature 1, float32 compute whatever the CPU (the parity
    tests compare at float32 tolerances; `videos`: the data has videos; `learner` overrides LearnerConfig fields)."""
    fields = {"num_cpus": 0.1, "num_threads": 1, "micro_batch_size": 4, "mini_batch_size": 8, "shuffle": False,
              "optim": OptimConfig(lr=1e-3), "autocast_bf16": "false", **learner}
    return LearnerWorkerConfig(role=role, model=ModelConfig(path=path, **(model or {})), learner=LearnerConfig(**fields),
                               algorithm=get_algorithm(algorithm), rollout=RolloutConfig(temperature=1.0, max_new_tokens=12),
                               seed=0, optimizer_steps=10, response_tokens=12, videos=videos)


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (held together while drawn, so none repeats)."""
    import socket

    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@contextmanager
def local_process_group():
    """A one-rank gloo group in this process, for running a learner rank without Ray."""
    import torch.distributed as dist

    from sapo_ray.net import LOOPBACK, listen, tcp_store

    listener = listen(LOOPBACK)
    store = tcp_store(LOOPBACK, listener.getsockname()[1], 1, listener)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
