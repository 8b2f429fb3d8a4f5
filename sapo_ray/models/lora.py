"""LoRA on the policy (`actor.lora.rank > 0`), built on `peft`.

The policy's linear layers named by `actor.lora.target_modules` (the language model's attention and MLP
projections; the vision tower's blocks too with `actor.lora.vision`) get a low-rank adapter
`W x + (alpha / rank) B A x`, `A` drawn at random and `B` zero, so the adapted model starts as the base.
Everything else is frozen and held in `model.dtype`: gradients, optimizer state and float32 masters exist for
the adapters alone, and a checkpoint holds those (the base is the model at `model.path`). The
adapters are injected into the model in place (`peft.inject_adapter_in_model`), which keeps its class, its
attributes and its names (a layer's weight becomes `X.base_layer.weight` beside `X.lora_A.default.weight`
and `X.lora_B.default.weight`). The frozen reference is the same model with its adapters switched off
(`adapters_off`): no second copy of the weights.

What leaves the learner is the plain model: `merged_state_dict` folds each adapter into its base weight
under the Hugging Face names, so the engines, the sync's fingerprints and the exported checkpoint see a
model of the base architecture.
"""

from __future__ import annotations

import contextlib
import re

import torch

from sapo_ray.config import LoraConfig

# peft's names for the pieces of an adapted linear layer `X` (its single adapter is named "default").
BASE, ADAPTER_A, ADAPTER_B = ".base_layer.", ".lora_A.default.", ".lora_B.default."


def target_pattern(cfg: LoraConfig) -> str:
    """The regular expression (matched against whole module names, as peft does) of the adapted layers: the
    `target_modules` outside the vision tower, and with `vision` the `vision_target_modules` inside it."""
    language = rf"(?!.*\bvisual\.).*\.({'|'.join(map(re.escape, cfg.target_modules))})"
    if not cfg.vision:
        return language
    return rf"{language}|.*\bvisual\..*\.({'|'.join(map(re.escape, cfg.vision_target_modules))})"


def add_adapters(model: torch.nn.Module, cfg: LoraConfig, base_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """`model` with an adapter injected into each targeted linear layer, in place; only the adapters train. With
    `base_dtype` (the learner's case) the adapters are float32 masters and every other, frozen, parameter is cast
    to `base_dtype`: a weight that never changes needs no float32 master, so a bf16 model's base takes half the
    memory. A config that adapts nothing is an error naming the keys."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    pattern = target_pattern(cfg)
    if not any(re.fullmatch(pattern, name) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)):
        raise ValueError(f"actor.lora.target_modules={list(cfg.target_modules)} (vision={cfg.vision}) names no "
                         f"linear layer of {type(model).__name__}")
    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=pattern,
                              bias="none")
    model = inject_adapter_in_model(peft_cfg, model)
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter(name))
        if base_dtype is not None and param.is_floating_point():
            param.data = param.data.to(torch.float32 if is_adapter(name) else base_dtype)
    return model


def is_adapter(name: str) -> bool:
    """Whether the parameter `name` is an adapter's (`A` or `B`)."""
    return ADAPTER_A in name or ADAPTER_B in name


@contextlib.contextmanager
def adapters_off(model: torch.nn.Module):
    """Inside, `model` computes as its base (every adapter switched off): the frozen reference."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def merged_state_dict(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """An adapted model's full state dict as the base model's: each adapted layer's weight is `W + scale * B @ A`
    (computed in float32, returned in `W`'s dtype) under the layer's own name, and the adapters' tensors are
    gone. `scale` is `alpha / rank` (`adapter_scale`)."""
    out = {}
    for name, tensor in state.items():
        if is_adapter(name):
            continue
        if BASE in name:
            layer, kind = name.split(BASE)
            if kind == "weight":
                a, b = state[f"{layer}{ADAPTER_A}weight"], state[f"{layer}{ADAPTER_B}weight"]
                tensor = (tensor.float() + scale * (b.float() @ a.float())).to(tensor.dtype)
            name = f"{layer}.{kind}"
        out[name] = tensor
    return out


def adapter_scale(cfg: LoraConfig) -> float:
    """The factor of an adapter's output, `alpha / rank`."""
    return cfg.alpha / cfg.rank


def save_adapter(state: dict[str, torch.Tensor], cfg: LoraConfig, base_path: str, out_dir) -> None:
    """Write the adapters of an adapted model's `state` as a `peft` adapter directory (`adapter_config.json`,
    `adapter_model.safetensors`), which `peft.PeftModel.from_pretrained(base, out_dir)` loads onto the base."""
    from peft import LoraConfig as PeftLoraConfig
    from safetensors.torch import save_file

    PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target_pattern(cfg),
                   bias="none", base_model_name_or_path=base_path).save_pretrained(str(out_dir))
    # peft's file names each adapter tensor under the wrapper's prefix, without the adapter's name.
    tensors = {f"base_model.model.{name.replace('.default.', '.')}": t.contiguous()
               for name, t in state.items() if is_adapter(name)}
    save_file(tensors, f"{out_dir}/adapter_model.safetensors")
