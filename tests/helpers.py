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
