"""Forward passes over a `Batch`: per-token log-probs, entropies and values of the response tokens.

Position `P - 1 + t` of `[prompt | response]` predicts response token `t` (P = padded prompt
length), so logits and values are sliced there. Logits are divided by the rollout temperature and
the tokens the rollout engine never samples (special/vision tokens) are masked out exactly as the
engine masks them, so learner and engine describe the same distribution.
"""

from __future__ import annotations

import torch

from sapo_ray.batch import Batch

_MASKED = -1e9  # finite, so padded targets and entropies never produce inf - inf


def response_logits(model, batch: Batch, image_token_id: int | None) -> torch.Tensor:
    """Logits `[B, R, V]` at the positions that predict the response tokens."""
    R = batch.response_ids.shape[1]
    out = model(**batch.model_inputs(image_token_id), use_cache=False, logits_to_keep=R + 1)
    return out.logits[:, :R].float()


def logprobs_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, banned: torch.Tensor | None, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`log pi(target)` and the entropy of `pi = softmax(logits / temperature)` with `banned` ids masked."""
    logits = logits / temperature
    if banned is not None and banned.numel():
        logits = logits.index_fill(-1, banned.to(logits.device), _MASKED)
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, entropy


def policy_forward(model, batch: Batch, temperature: float, banned: torch.Tensor | None,
                   image_token_id: int | None, with_entropy: bool = True):
    """Response log-probs `[B, R]` and entropies `[B, R]` (None unless asked) of `model` on `batch`."""
    logits = response_logits(model, batch, image_token_id)
    return logprobs_and_entropy(logits, batch.response_ids, temperature, banned, with_entropy)


def value_forward(model, batch: Batch, image_token_id: int | None) -> torch.Tensor:
    """Critic values `[B, R]`: `values[:, t] = V(x, y_<t)`."""
    P, R = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    values = model(**batch.model_inputs(image_token_id))
    return values[:, P - 1 : P - 1 + R].float()
