"""Builders shared by the system tests: small batches from a real engine, small configs."""

from __future__ import annotations

import torch

from sapo_ray.batch import Batch
from sapo_ray.data.loaders import load_dataset_split
from sapo_ray.rollout.engine import HFEngine, Prompt, SamplingParams, encode_prompt


def encode(processor, example) -> Prompt:
    return encode_prompt(processor, example)


def engine_for(path: str) -> tuple[HFEngine, object]:
    from sapo_ray.models import load_processor

    engine = HFEngine.from_config({"path": path, "dtype": "float32", "attn_implementation": "sdpa"})
    return engine, load_processor(path)


# The smallest run of the trainer (tiny batches, one thread per actor, every step a full update), shared by
# the end-to-end, learning and cluster tests; each adds its model, steps and run directory.
TINY_OVERRIDES = [
    "trainer.val_every=0", "trainer.loggers=[jsonl]", "trainer.critic_warmup=0", "data.prompts_per_step=4",
    "data.train_size=64", "data.val_size=4", "rollout.n=2", "rollout.max_new_tokens=8", "rollout.num_threads=1",
    "actor.num_threads=1", "critic.num_threads=1", "actor.mini_batch_size=8", "actor.micro_batch_size=4",
    "critic.mini_batch_size=8", "critic.micro_batch_size=4", "reward.num_workers=1",
]


def sample_batch(path: str, prompts: int = 4, n: int = 2, max_new_tokens: int = 12, seed: int = 0,
                 text_only: bool = False) -> tuple[Batch, HFEngine]:
    """Real rollouts of the model at `path` on synthvista prompts, as a Batch with rollout log-probs."""
    engine, processor = engine_for(path)
    examples = load_dataset_split("synthvista", None, "train", n=prompts, seed=seed, text_only=text_only)
    samples = engine.generate([encode(processor, e) for e in examples],
                              SamplingParams(n=n, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed))
    batch = Batch.from_samples(samples, engine.pad_id)
    return batch.with_data(group_index=torch.tensor([s.prompt_index for s in samples])), engine


def learner_cfg(path: str, **overrides) -> dict:
    cfg = {"path": path, "dtype": "float32", "attn_implementation": "sdpa", "use_gpu": False, "seed": 0,
           "needs_ref": False, "temperature": 1.0, "micro_batch_size": 4, "mini_batch_size": 8, "ppo_epochs": 1,
           "shuffle": False, "optim": {"lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.0, "warmup_steps": 0,
                                       "schedule": "constant", "max_grad_norm": 1.0}}
    cfg.update(overrides)
    return cfg
