"""Forward passes over a `Batch`: per-token log-probs, entropies and values of the response tokens.

Position `P - 1 + t` of `[prompt | response]` predicts response token `t` (P = padded prompt
length), so logits and values are sliced there. Logits are divided by the rollout temperature and
the tokens the rollout engine never samples (special/vision tokens) are masked out exactly as the
engine masks them, so learner and engine describe the same distribution.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from sapo_ray.batch import Batch, Vision, VisionTokens

_MASKED = -1e9  # finite, so padded targets and entropies never produce inf - inf


# Positions scored per piece: one piece's float32 temporaries (log-softmax, its exp, the gradient) are
# alive at a time, ~80 MB each at a 151,936-token vocabulary, instead of [B, R, V] each.
CHUNK_TOKENS = 128


def _positions(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The position ids the model's forward computes for `inputs` (multimodal RoPE for Qwen-VL: the
    backbone's own rule, which the policy and the critic share as `model.model`)."""
    if "position_ids" in inputs:
        return inputs["position_ids"]
    rope = {k: inputs.get(k) for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
    positions, _ = model.model.get_rope_index(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                              mm_token_type_ids=inputs["mm_token_type_ids"], **rope)
    return positions


def prompt_then_responses(model, batch: Batch, vision_tokens: VisionTokens, **prompt_kwargs):
    """`model` on `batch` in two passes: each distinct prompt once (its keys and values cached), then
    every response over a copy of its prompt's cache. Gradients reach the prompt pass through the
    cache, summed over the prompt's samples, so outputs and gradients are those of one pass over
    `[prompt | response]`; the prompt tokens, images and videos are computed once per prompt instead of once
    per sample (n samples per prompt: (n - 1) / n of the prompt's computation saved).

    Returns the prompt pass's output (one row per distinct prompt), the response pass's output (one
    row per batch row) and `share`, each row's distinct prompt."""
    inputs = batch.model_inputs(vision_tokens)
    positions = _positions(model, inputs)
    first, share = batch.distinct_prompts()
    share = share.to(batch.prompt_ids.device)
    P = batch.prompt_ids.shape[1]
    prompt = {"input_ids": batch.prompt_ids[first], "attention_mask": batch.prompt_mask[first],
              "position_ids": positions[..., first, :P]}
    if "mm_token_type_ids" in inputs:
        prompt.update(Vision.model_inputs([batch.vision[i] for i in first]),
                      mm_token_type_ids=inputs["mm_token_type_ids"][first, :P])
    cache = DynamicCache()
    prompt_out = model(**prompt, past_key_values=cache, use_cache=True, **prompt_kwargs)
    cache.batch_select_indices(share)
    response_out = model(input_ids=batch.response_ids, attention_mask=inputs["attention_mask"],
                         position_ids=positions[..., P:], past_key_values=cache, use_cache=True)
    return prompt_out, response_out, share


def packed(model, batch: Batch, vision_tokens: VisionTokens, logits_from: int | None = None):
    """`model` on the batch's rows laid end to end in one sequence `[1, N]` without padding (verl's
    `use_remove_padding`): positions restart at 0 with each row, which is how the attention tells rows
    apart (variable-length kernels with `flash_attention_2`; a block-diagonal causal mask with `sdpa`,
    exact anywhere but quadratic in N). Returns the output and, for each `[prompt | response]` column
    of the padded layout, its position in the output's sequence (0 on padding, which callers mask).
    With `logits_from` (a policy), logits only for the columns from there on: the output's sequence is
    those positions, and the index covers those columns."""
    inputs = batch.model_inputs(vision_tokens)
    positions = _positions(model, inputs)
    valid = inputs["attention_mask"].bool()
    text = (valid.long().cumsum(1) - 1)[valid][None]  # each row's own positions, from 0
    flat = {"input_ids": inputs["input_ids"][valid][None]}
    if positions.dim() == 3:  # multimodal RoPE: the text positions first, as the model's packed format asks
        flat["position_ids"] = torch.cat([text[None], positions[:, valid][:, None]], 0)
    else:
        flat["position_ids"] = text
    if "mm_token_type_ids" in inputs:
        flat.update(Vision.model_inputs(batch.vision), mm_token_type_ids=inputs["mm_token_type_ids"][valid][None])
    index = torch.zeros(valid.shape, dtype=torch.long, device=valid.device)
    index[valid] = torch.arange(int(valid.sum()), device=valid.device)
    if logits_from is None:
        return model(**flat, use_cache=False), index
    keep, index = torch.unique(index[:, logits_from:], sorted=True, return_inverse=True)
    return model(**flat, use_cache=False, logits_to_keep=keep), index


# How a forward pass lays out a micro-batch's rows (`learner.layout`); every layout computes the same
# log-probs, values and gradients (tests/learner/test_workers.py).
LAYOUTS = ("padded", "shared_prompt", "packed")


def response_logits(model, batch: Batch, vision_tokens: VisionTokens, layout: str = "padded") -> torch.Tensor:
    """Logits `[B, R + 1, V]` (the model's compute dtype) from the position predicting response token 0
    on; the last one (after the last response token) predicts nothing and is left unscored, not sliced
    off (a slice would cost a copy of the logits in the backward pass). `layout`: whole padded rows,
    `prompt_then_responses` or `packed`."""
    P, R = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    if layout == "padded":
        return model(**batch.model_inputs(vision_tokens), use_cache=False, logits_to_keep=R + 1).logits
    if layout == "shared_prompt":
        prompt_out, response_out, share = prompt_then_responses(model, batch, vision_tokens, logits_to_keep=1)
        return torch.cat([prompt_out.logits[share], response_out.logits], 1)
    if layout == "packed":
        out, index = packed(model, batch, vision_tokens, logits_from=P - 1)
        return out.logits[0, index]
    raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")


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
                   vision_tokens: VisionTokens, with_entropy: bool = True, entropy_grad: bool = True,
                   layout: str = "padded"):
    """Response log-probs `[B, R]` and entropies `[B, R]` (None unless asked) of `model` on `batch`."""
    logits = response_logits(model, batch, vision_tokens, layout)
    return logprobs_and_entropy(logits, batch.response_ids, temperature, banned, with_entropy, entropy_grad)


def value_forward(model, batch: Batch, vision_tokens: VisionTokens, layout: str = "padded") -> torch.Tensor:
    """Critic values `[B, R]`: `values[:, t] = V(x, y_<t)`."""
    P, R = batch.prompt_ids.shape[1], batch.response_ids.shape[1]
    if layout == "padded":
        values = model(**batch.model_inputs(vision_tokens))
        return values[:, P - 1 : P - 1 + R].float()
    if layout == "shared_prompt":
        prompt_values, response_values, share = prompt_then_responses(model, batch, vision_tokens)
        return torch.cat([prompt_values[share, -1:], response_values[:, : R - 1]], 1).float()
    if layout == "packed":
        values, index = packed(model, batch, vision_tokens)
        return values[0, index[:, P - 1 : P - 1 + R]].float()
    raise ValueError(f"layout={layout!r} is not one of {LAYOUTS}")
