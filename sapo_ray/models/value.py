"""Critic: the policy backbone (decoder without lm_head) plus a scalar value head."""

from __future__ import annotations

import json
import os
from dataclasses import fields

import torch
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from sapo_ray.batch import Vision
from sapo_ray.models.loading import empty_policy, is_vision_config, load_policy
from sapo_ray.models.processor import _check_dir

_VISION_INPUTS = (*(f.name for f in fields(Vision)), "mm_token_type_ids")


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return [os.path.join(path, n) for n in sorted(set(json.load(f)["weight_map"].values()))]
    single = os.path.join(path, "model.safetensors")
    return [single] if os.path.isfile(single) else []


def _has_value_head(path: str) -> bool:
    for file in _weight_files(path):
        with safe_open(file, "pt") as f:
            if "value_head.weight" in f.keys():
                return True
    return False


class ValueModel(nn.Module):
    """V(s_t) for every position: `values[b, t]` is the value of the prefix `input_ids[b, :t+1]`.

    Takes the same inputs as the policy (`input_ids`, `attention_mask`, and for VLMs
    the `Vision` tensors and `mm_token_type_ids`) and returns float32 values [B, S].
    Works for a VLM (backbone = `Qwen2_5_VLModel`, vision tower included) and for a text-only LM.
    Parameter names of the backbone match the policy's (`model.*`), so a critic initialised from
    the policy checkpoint shares its keys; the head is `value_head.{weight,bias}`.
    """

    def __init__(self, policy: nn.Module, head_init_std: float = 1e-3):
        super().__init__()
        self.config = policy.config
        self.is_vision = is_vision_config(self.config)
        self.model = getattr(policy, policy.base_model_prefix)  # drop lm_head
        hidden = self.config.get_text_config().hidden_size
        dtype = next(self.model.parameters()).dtype
        self.value_head = nn.Linear(hidden, 1, dtype=dtype)
        nn.init.normal_(self.value_head.weight, std=head_init_std)  # ~0 at start, backbone still gets gradient
        nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype = torch.float32,
        attn_implementation: str = "sdpa",
        head_init_std: float = 1e-3,
    ) -> "ValueModel":
        """A critic from a policy directory (new value head) or from a directory written by
        :meth:`save_pretrained` (backbone and head restored exactly)."""
        path = _check_dir(path)
        if not _has_value_head(path):
            return cls(load_policy(path, dtype=dtype, attn_implementation=attn_implementation), head_init_std)
        model = cls(empty_policy(path, dtype, attn_implementation), head_init_std)
        state = {}
        for file in _weight_files(path):
            state.update(load_file(file))
        model.load_state_dict(state, strict=True)
        return model

    @classmethod
    def empty(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
              attn_implementation: str = "sdpa") -> "ValueModel":
        """A critic of the architecture in `path` with uninitialised weights (build it under
        `torch.device("meta")` to allocate nothing; a learner rank then receives the weights)."""
        return cls(empty_policy(path, dtype, attn_implementation))

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict: dict | None = None, **_) -> None:
        """Write `config.json` and safetensors weights (sharded above 5 GB); `state_dict` lets an
        FSDP learner pass its gathered full state dict. Other HF keywords are accepted and ignored."""
        os.makedirs(save_directory, exist_ok=True)
        self.config.save_pretrained(save_directory)
        save_torch_state_dict(state_dict if state_dict is not None else self.state_dict(), save_directory)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        """Activation checkpointing in the backbone."""
        self.model.gradient_checkpointing_enable(**kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **inputs) -> torch.Tensor:
        """Values [B, S] (float32) for the policy's inputs; `None` entries are ignored."""
        inputs = {k: v for k, v in inputs.items() if v is not None}
        if not self.is_vision and any(k in inputs for k in _VISION_INPUTS):
            raise ValueError(f"text-only critic got vision inputs {sorted(set(inputs) & set(_VISION_INPUTS))}")
        # A cache only when one is passed in (`sapo_ray.learner.forward.prompt_then_responses`).
        inputs.setdefault("use_cache", "past_key_values" in inputs)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **inputs)
        # A fresh tensor, not a view of the head's output (FSDP2 warns on returned views).
        return self.value_head(out.last_hidden_state).squeeze(-1).to(torch.float32, copy=True)
