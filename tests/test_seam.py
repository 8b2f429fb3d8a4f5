"""The seam between the driver and the actors: every config field set on the command line reaches the
worker config that crosses into the actor, and every learner field is read where it takes effect.

The first test walks the worker-facing config classes (model, rollout, actor, critic, algorithm) and
sets every leaf field to a value other than its default in one command line; the second runs a policy
and a critic rank in this process with configs that record which fields they read. Either would have
caught `model.gradient_checkpointing` never reaching the learners, and the second `critic.shuffle`
being ignored.
"""

from __future__ import annotations

import dataclasses
import types
import typing

import pytest
import torch
from torch.distributed.fsdp import FSDPModule
from omegaconf import OmegaConf

from helpers import learner_cfg, local_process_group, sample_batch
from sapo_ray.algo import registry
from sapo_ray.algo.registry import AlgorithmSpec
from sapo_ray.config import compose_config as compose_cfg
from sapo_ray.config import (LearnerConfig, LoraConfig, ModelConfig, RolloutConfig, learner_worker_config,
                             rollout_worker_config)

SECTIONS = {"model": ModelConfig, "rollout": RolloutConfig, "actor": LearnerConfig, "critic": LearnerConfig,
            "algorithm": AlgorithmSpec}


def leaf_fields(cls, prefix: str):
    """`(key, type)` of every leaf field of the dataclass `cls` (nested dataclasses walked)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaf_fields(hints[f.name], f"{prefix}.{f.name}")
        else:
            yield f"{prefix}.{f.name}", hints[f.name]



def other_value(kind, default):
    """A value of type `kind` that differs from `default`."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        kind = args[0]
    if kind is bool:
        return not default
    if kind is int:
        return 7 if default is None else default + 7
    if kind is float:
        return 0.625 if default is None else default * 2 + 0.125
    if kind is str:
        return "other" if default is None else f"{default}_x"
    if kind is dict or typing.get_origin(kind) is dict:
        return {"k": 1}
    if kind is list or typing.get_origin(kind) is list:
        return [0.5, 0.25]
    raise TypeError(f"no test value for {kind}")


def override(key: str, value) -> str:
    if isinstance(value, dict):
        return f"++{key}={{{', '.join(f'{k}: {v}' for k, v in value.items())}}}"  # as users add keys
    if isinstance(value, list):
        return f"{key}=[{','.join(map(str, value))}]"
    return f"{key}={str(value).lower() if isinstance(value, bool) else value}"


def get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def test_every_worker_facing_field_reaches_the_worker_config():
    base = compose_cfg()
    values = {key: other_value(kind, OmegaConf.select(base, key)) for section, cls in SECTIONS.items()
              for key, kind in leaf_fields(cls, section)}
    assert "model.gradient_checkpointing" in values and "critic.shuffle" in values and len(values) > 80
    cfg = compose_cfg(*[override(k, v) for k, v in values.items()])
    rollout = rollout_worker_config(cfg, 0)
    actor, critic = learner_worker_config(cfg, "actor"), learner_worker_config(cfg, "critic")
    # Where each section lands in the worker configs.
    places = {"model": [(rollout, "model"), (actor, "model"), (critic, "model")],
              "rollout": [(rollout, "rollout"), (actor, "rollout"), (critic, "rollout")],
              "actor": [(actor, "learner")], "critic": [(critic, "learner")],
              "algorithm": [(actor, "algorithm"), (critic, "algorithm")]}
    for key, value in values.items():
        section, rest = key.split(".", 1)
        for worker_cfg, attr in places[section]:
            assert get(getattr(worker_cfg, attr), rest) == value, f"{key}={value!r} did not reach the {attr} config"
    assert isinstance(actor.learner, LearnerConfig) and isinstance(actor.algorithm, AlgorithmSpec)


def test_pixel_budget_reaches_the_rollout_worker():
    """data.max_pixels / data.min_pixels are data fields the vllm engine's own image processor needs."""
    for values in ({"max_pixels": 602112, "min_pixels": 3136}, {"max_pixels": None, "min_pixels": None}):
        cfg = compose_cfg(*[f"data.{k}={'null' if v is None else v}" for k, v in values.items()])
        rollout = rollout_worker_config(cfg, 0)
        assert {k: getattr(rollout, k) for k in values} == values


class Recorder:
    """Wraps a config dataclass and records the names of the fields read through it."""

    def __init__(self, obj, reads: set, prefix: str):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_reads", reads)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name):
        value = getattr(self._obj, name)
        self._reads.add(f"{self._prefix}.{name}")
        return Recorder(value, self._reads, f"{self._prefix}.{name}") if dataclasses.is_dataclass(value) else value


# Learner fields the driver reads rather than the rank: Ray options and the group size (WorkerGroup),
# and whether the step recomputes old log-probs (Trainer.train_step).
DRIVER_SIDE = {"learner.world_size", "learner.num_cpus", "learner.resources", "learner.recompute_old_logp"}


@pytest.mark.timeout(300)
def test_learner_ranks_read_every_learner_field(random_tiny_models):
    """A policy and a critic rank, run in this process, read every learner and optimizer field (the
    driver-side ones aside) and the model's, and gradient checkpointing takes effect in both."""
    from sapo_ray.learner.worker import CriticWorker, PolicyWorker

    path = random_tiny_models["vlm"]
    batch, _ = sample_batch(path, prompts=2, n=2, max_new_tokens=8)
    mask = batch.response_mask
    gen = torch.Generator().manual_seed(0)
    seg = registry.make_segments(registry.get_algorithm("sapo"), mask, entropy=torch.rand(mask.shape, generator=gen))
    batch = batch.with_fields(old_logp=batch.rollout_logp, advantages=torch.randn(mask.shape, generator=gen) * mask,
                            seg_end=seg.end_mask, values=torch.zeros(mask.shape), returns=torch.ones(mask.shape),
                            value_mask=seg.end_mask.float())
    expected = {key for key, _ in leaf_fields(LearnerConfig, "learner")} - DRIVER_SIDE
    expected |= {"model.path", "model.dtype", "model.attn_implementation", "model.gradient_checkpointing"}
    with local_process_group():
        for cls, role in ((PolicyWorker, "actor"), (CriticWorker, "critic")):
            # The policy with LoRA adapters (vision tower too): what reads the lora fields; the critic trains
            # every weight (`critic.lora.rank` must be 0) and reads only the rank.
            lora = {"lora": LoraConfig(rank=2, vision=True)} if role == "actor" else {}
            cfg = learner_cfg(path, role=role, model={"gradient_checkpointing": True}, shuffle=True, ppo_epochs=2,
                              mini_batch_size=2, micro_batch_size=1, **lora)
            reads: set[str] = set()
            cfg.learner, cfg.model = Recorder(cfg.learner, reads, "learner"), Recorder(cfg.model, reads, "model")
            worker = cls(0, 1, cfg)
            worker.setup()
            worker.onload()  # the trainer's phase bracket (`Trainer.learners_on_device`)
            metrics = worker.update(batch)
            worker.offload()
            backbone = worker.model if role == "actor" else worker.model.model
            assert backbone.is_gradient_checkpointing, f"{role}: gradient checkpointing is off"
            # One FSDP unit per decoder block and per vision block, plus the root, for both roles.
            config = backbone.config
            units = sum(isinstance(m, FSDPModule) for m in worker.model.modules())
            assert units == config.text_config.num_hidden_layers + config.vision_config.depth + 1, (role, units)
            assert metrics[f"{role}/skipped_steps"] == 0 and f"{role}/lr" in metrics
            assert worker.scheduler.last_epoch == 4  # 2 epochs x 2 mini-batches of 2 rows
            missing = expected - reads - ({"model.critic_path"} if role == "actor" else set())
            if role == "critic":
                missing -= {key for key in expected if key.startswith("learner.lora.") and key != "learner.lora.rank"}
            assert not missing, f"{role} rank never reads {sorted(missing)}"
            assert role == "actor" or "model.critic_path" in reads
