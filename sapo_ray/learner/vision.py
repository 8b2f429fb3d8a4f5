"""The vision tower runs in every forward pass of a sharded vision-language model, images or not.

Under FSDP each vision block gathers its parameter shards before it runs and reduces its gradients after
its backward pass: collectives that every rank of the group must call in the same order. A rank whose
micro-batch holds no image would skip them while another rank's runs them, and the group deadlocks (NCCL
waits for its timeout; gloo aborts on the size mismatch). So whenever a forward pass computes no image
features, the tower encodes one blank image of the smallest grid and adds zero times its features to the
language model's input: every rank then calls each vision block once per forward pass, and the result
and the gradients are exactly those without it (the blank image's contribution is multiplied by 0).
Images and videos each run the tower once, so when the run's data has videos every forward pass runs it
twice, blanks filling in for what a micro-batch lacks.
"""

from __future__ import annotations

import torch


def _find(model: torch.nn.Module, suffix: str) -> torch.nn.Module | None:
    return next((m for name, m in model.named_modules() if name == suffix or name.endswith("." + suffix)), None)


def blank_image(visual: torch.nn.Module, vision_config) -> tuple[torch.Tensor, torch.Tensor]:
    """Patches and grid of the smallest image the tower takes: one merge window (m x m patches) of zeros."""
    merge = visual.spatial_merge_size
    width = vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size ** 2
    param = next(visual.parameters())
    return (torch.zeros(merge * merge, width, dtype=param.dtype, device=param.device),
            torch.tensor([[1, merge, merge]], device=param.device))


def run_vision_in_every_forward(model: torch.nn.Module, calls: int = 1) -> bool:
    """Hooks on `model` (a policy or a critic with a Qwen-VL backbone; call after sharding) so that each
    forward pass runs the vision tower exactly `calls` times (1 for images; 2 when videos may come too).
    Returns False for a model without a vision tower."""
    visual, language = _find(model, "visual"), _find(model, "language_model")
    if visual is None or language is None:
        return False
    vision_config = model.config.vision_config
    ran = [0]

    def forward_begins(module, args, kwargs):
        ran[0] = 0

    def tower_ran(module, args, output):
        ran[0] += 1

    def before_language_model(module, args, kwargs):
        if ran[0] >= calls:
            return None
        total = 0.0
        for _ in range(calls - ran[0]):
            pixels, grid = blank_image(visual, vision_config)
            out = visual(pixels, grid_thw=grid)
            features = out.pooler_output if hasattr(out, "pooler_output") else out[0]
            # Qwen3-VL's DeepStack mergers feed the language model too: their parameters need a gradient as well.
            total = total + features.sum() + sum(f.sum() for f in getattr(out, "deepstack_features", None) or [])
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:  # the caller gave token ids to the language model: nothing to add the zero to
            return None
        return args, {**kwargs, "inputs_embeds": embeds + 0.0 * total.to(embeds.dtype)}

    model.register_forward_pre_hook(forward_begins, with_kwargs=True)
    visual.register_forward_hook(tower_ran)
    language.register_forward_pre_hook(before_language_model, with_kwargs=True)
    return True
