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


# Positions scored per piece: one piece's float32 temporaries (log-softmax, its exp, the gradient) are
# alive at a time, ~80 MB each at a 151,936-token vocabulary, instead of [B, R, V] each.
CHUNK_TOKENS = 128


def response_logits(model, batch: Batch, image_token_id: int | None) -> torch.Tensor:
    """Logits `[B, R + 1, V]` (the model's compute dtype) from the position predicting response token 0
    on; the last one (after the last response token) predicts nothing and is left unscored, not sliced
    off (a slice would cost a copy of the logits in the backward pass)."""
    R = batch.response_ids.shape[1]
    return model(**batch.model_inputs(image_token_id), use_cache=False, logits_to_keep=R + 1).logits


def _log_softmax(logits: torch.Tensor, temperature: float, banned: torch.Tensor | None) -> torch.Tensor:
    logits = logits.float() / temperature
    if banned is not None and banned.numel():
        logits = logits.index_fill(-1, banned.to(logits.device), _MASKED)
    return torch.log_softmax(logits, dim=-1)


def _entropy(logp_all: torch.Tensor) -> torch.Tensor:
    return -(logp_all.exp() * logp_all).sum(-1)


def log_softmax_and_entropy(logits: torch.Tensor, temperature: float, banned: torch.Tensor | None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """`log pi` over the vocabulary and the entropy of `pi = softmax(logits / temperature)` with `banned` ids masked."""
    logp_all = _log_softmax(logits, temperature, banned)
    return logp_all, _entropy(logp_all)


def _pieces(rows: int, length: int):
    """`(row, positions)` pieces of at most `CHUNK_TOKENS` positions covering `rows x length`."""
    for b in range(rows):
        for s in range(0, length, CHUNK_TOKENS):
            yield b, slice(s, min(s + CHUNK_TOKENS, length))


class _Score(torch.autograd.Function):
    """Per-position `log pi(target)` and entropy `H` of `pi = softmax(z)`, `z = logits / T` with the banned
    ids masked, computed `CHUNK_TOKENS` positions at a time in both passes. The backward pass writes the
    logits' gradient piece by piece from the closed forms (`log pi_t` by `z_j`: `1[j = t] - pi_j`;
    `H` by `z_j`: `-pi_j (log pi_j + H)`; both over T, zero at banned ids): memory is the logits, their
    gradient and one piece's temporaries, where autograd would keep several `[B, R, V]` float32 copies.
    `logits` may have more positions than `targets` (the model's output, one past the last response
    token): those are not scored, get a zero gradient, and are never copied out."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, banned):
        logp = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        entropy = torch.empty_like(logp)
        for b, pos in _pieces(*targets.shape):
            lp = _log_softmax(logits[b, pos], temperature, banned)
            logp[b, pos] = lp.gather(-1, targets[b, pos, None]).squeeze(-1)
            entropy[b, pos] = _entropy(lp)
        ctx.save_for_backward(logits, targets)
        ctx.temperature, ctx.banned = temperature, banned
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        for b, pos in _pieces(*targets.shape):
            lp = _log_softmax(logits[b, pos], ctx.temperature, ctx.banned)
            p = lp.exp()
            g = torch.zeros_like(p)
            if grad_logp is not None:
                g -= p * grad_logp[b, pos, None]
                g.scatter_add_(-1, targets[b, pos, None], grad_logp[b, pos, None])
            if grad_entropy is not None:
                g -= grad_entropy[b, pos, None] * p * (lp + _entropy(lp)[:, None])
            if ctx.banned is not None and ctx.banned.numel():
                g.index_fill_(-1, ctx.banned.to(g.device), 0.0)
            grad[b, pos] = g / ctx.temperature
        return grad, None, None, None


def logprobs_and_entropy(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, banned: torch.Tensor | None,
    with_entropy: bool, entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`log pi(target)` `[B, R]` and the entropy of `pi = softmax(logits / temperature)` with `banned` ids
    masked, from `logits` `[B, >= R, V]` (positions past R ignored), scored piece by piece (`_Score`).
    With `entropy_grad=False` the entropy is a detached metric."""
    logp, entropy = _Score.apply(logits, targets, temperature, banned)
    if not with_entropy:
        return logp, None
    return logp, entropy if entropy_grad else entropy.detach()


def policy_forward(model, batch: Batch, temperature: float, banned: torch.Tensor | None,
                   image_token_id: int | None, with_entropy: bool = True, entropy_grad: bool = True):
    """Response log-probs `[B, R]` and entropies `[B, R]` (None unless asked) of `model` on `batch`."""
    logits = response_logits(model, batch, image_token_id)
    return logprobs_and_entropy(logits, batch.response_ids, temperature, banned, with_entropy, entropy_grad)


def value_forward(model, batch: Batch, image_token_id: int | None) -> torch.Tensor:
    """Critic values `[B, R]`: `values[:, t] = V(x, y_<t)`."""
    P, R = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    values = model(**batch.model_inputs(image_token_id))
    return values[:, P - 1 : P - 1 + R].float()
