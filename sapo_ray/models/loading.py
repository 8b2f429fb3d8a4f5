"""Load a policy (any HF model directory, vision-language or text-only) by path."""

from __future__ import annotations

import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig

from sapo_ray.models import attention  # noqa: F401  (registers attn_implementation=sdpa_gqa)
from sapo_ray.models.processor import _check_dir


def is_vision_config(config: PretrainedConfig) -> bool:
    """True for vision-language configs (Qwen2-VL, Qwen2.5-VL, ...), False for text-only LMs."""
    return getattr(config, "vision_config", None) is not None


def model_class(config: PretrainedConfig):
    """The auto class that builds `config`: AutoModelForImageTextToText for VLMs, else AutoModelForCausalLM."""
    return AutoModelForImageTextToText if is_vision_config(config) else AutoModelForCausalLM


def load_policy(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    **kwargs,
) -> torch.nn.Module:
    """Load the policy in the HF directory `path` (the config key `model.path`).

    A VLM such as Qwen2.5-VL-3B-Instruct or `sapo_ray/assets/tiny-vlm` loads with
    AutoModelForImageTextToText, a text-only LM (`sapo_ray/assets/tiny-lm`) with
    AutoModelForCausalLM. Extra `kwargs` go to `from_pretrained`.
    """
    path = _check_dir(path)
    config = AutoConfig.from_pretrained(path)
    return model_class(config).from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation, **kwargs)


VISION_TOWER_NAMES = ("visual", "vision_tower", "vision_model")


def freeze_vision_tower(model: torch.nn.Module) -> int:
    """Stop training the vision encoder (and its patch merger): `requires_grad=False` on every parameter
    under a module named `visual` (Qwen2-VL / Qwen2.5-VL), `vision_tower` or `vision_model`.
    Returns the number of parameters frozen; raises ValueError when the model has no such module."""
    frozen = 0
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in VISION_TOWER_NAMES:
            for p in module.parameters():
                if p.requires_grad:
                    p.requires_grad_(False)
                    frozen += p.numel()
    if frozen == 0:
        raise ValueError(f"{type(model).__name__} has no vision tower (a module named one of {VISION_TOWER_NAMES}) "
                         "to freeze")
    return frozen


def build_from_config(
    config: PretrainedConfig, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa"
) -> torch.nn.Module:
    """A randomly initialised model of `config`'s architecture (VLM or causal LM)."""
    return model_class(config).from_config(config, dtype=dtype, attn_implementation=attn_implementation)


def empty_policy(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                 attn_implementation: str = "sdpa") -> torch.nn.Module:
    """The architecture of the HF directory `path` with freshly initialised weights, nothing read but its
    config (under `torch.device("meta")`: no memory at all, for a learner rank that receives its weights)."""
    return build_from_config(AutoConfig.from_pretrained(_check_dir(path)), dtype, attn_implementation)
