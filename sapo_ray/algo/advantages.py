"""Advantage estimators: segment-level GAE (SAPO), token-level GAE (PPO), group baselines.

Conventions (SAPO_SPEC.md "Notation" and section 2):
  * ``mask [B, T]``: 1 on valid response tokens: left-aligned, or with holes where a multi-turn episode
    has observations between the model's tokens (the segments and the per-token GAE skip them).
  * ``values[b, t] = V(x, y_<t)``: the critic's output at the position that predicts token ``t``.
  * ``token_rewards[b, t] = r_t``: ``score * [t = last valid] + turn_t - beta * kl_t``, where ``turn_t`` is an
    environment's reward of a multi-turn episode's turn at that turn's last token (0 without one).
  * Returns are computed **before** whitening; whitening is token-weighted over all valid tokens
    of the batch (mean, unbiased variance, ``(A - mean) / sqrt(var + 1e-8)``), then ``clamp``.
  * Advantages and returns are 0 on padding; rows with no valid token give zeros (no NaN).

Everything here runs under ``torch.no_grad()`` and is vectorised over the batch.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch
import torch.nn.functional as F

from sapo_ray.algo import kl as kl_mod
from sapo_ray.algo.losses import masked_whiten
from sapo_ray.algo.segments import Segments, is_left_aligned, last_valid_mask

__all__ = [
    "VALUE_ANCHORS",
    "GROUP_KINDS",
    "anchor_mask",
    "discounted_reverse_cumsum",
    "segment_gae",
    "token_gae",
    "token_rewards",
    "group_ids",
    "group_advantage",
]

VALUE_ANCHORS = ("seg_end_prev", "seg_start")
GROUP_KINDS = ("grpo", "dr_grpo", "rloo")


def anchor_mask(seg: Segments, value_anchor: str = "seg_end_prev") -> torch.Tensor:
    """BoolTensor ``[B, T]``: the value-anchor position of each segment (the critic-loss mask).

    * ``seg_end_prev`` (default, the reference code): ``V_m = values[e_m]`` -- the value at the
      position predicting the segment's last token, i.e. ``V(x, y_<e_m)``.
    * ``seg_start`` (the paper's text): ``V_m = values[b_m]`` with ``b_m = e_{m-1} + 1``.
    """
    if value_anchor == "seg_end_prev":
        return seg.end_mask
    if value_anchor == "seg_start":
        return seg.start_mask
    raise ValueError(f"unknown value_anchor {value_anchor!r}; choose one of {VALUE_ANCHORS}")


# --------------------------------------------------------------------------------------------
# Discounted reverse scan
# --------------------------------------------------------------------------------------------

_SCAN_BLOCK = 32


def discounted_reverse_cumsum(x: torch.Tensor, c: float) -> torch.Tensor:
    """``out[:, m] = sum_{j >= m} c**(j - m) * x[:, j]`` along the last dim of a ``[B, M]`` tensor.

    Equivalent to the loop ``a = x[:, m] + c * a`` from ``m = M - 1`` down to 0, but done blockwise:
    inside blocks of 32 steps with one matmul against the ``[32, 32]`` upper-triangular matrix
    ``c**(j - i)``, and across blocks by the same function applied (recursively) to the block
    heads with factor ``c**32``. No powers of ``c`` beyond ``c**32`` are formed, so nothing
    overflows or loses precision for any ``0 <= c <= 1``.
    """
    B, M = x.shape
    if M == 0 or c == 0.0:
        return x.clone()
    if c == 1.0:
        return torch.flip(torch.cumsum(torch.flip(x, (1,)), dim=1), (1,))
    K = min(_SCAN_BLOCK, M)
    n_blocks = -(-M // K)
    xb = F.pad(x, (0, n_blocks * K - M)).reshape(B, n_blocks, K)
    ar = torch.arange(K, device=x.device)
    expo = (ar.unsqueeze(0) - ar.unsqueeze(1)).to(x.dtype)  # expo[i, j] = j - i
    disc = torch.where(expo >= 0, torch.pow(torch.tensor(c, dtype=x.dtype), expo.clamp(min=0)), 0.0)
    within = torch.matmul(xb, disc.T)  # within[b, n, i] = sum_{j >= i in block n} c^(j-i) x_j
    if n_blocks > 1:
        heads = discounted_reverse_cumsum(within[:, :, 0], c**K)  # full value at each block start
        next_head = F.pad(heads[:, 1:], (0, 1))  # value at the start of the following block
        tail = torch.pow(torch.tensor(c, dtype=x.dtype), (K - ar).to(x.dtype))  # c^(K - i)
        within = within + next_head.unsqueeze(-1) * tail
    return within.reshape(B, n_blocks * K)[:, :M]


# --------------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------------


def _finish(adv: torch.Tensor, valid: torch.Tensor, whiten: bool, clip: float | None) -> torch.Tensor:
    if whiten:
        adv = masked_whiten(adv, valid)
    if clip is not None:
        adv = torch.clamp(adv, -clip, clip)
    return torch.where(valid, adv, adv.new_zeros(()))


@torch.no_grad()
def segment_gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    seg: Segments,
    gamma: float = 1.0,
    lam: float = 0.99,
    value_anchor: str = "seg_end_prev",
    whiten: bool = True,
    clip: float | None = 5.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment-level GAE (SAPO_SPEC.md section 2). Returns ``(advantages, returns)``, both ``[B, T]``.

    For segments ``m = 0 .. M_b - 1`` of each row::

        r_m     = sum_{t in z_m} r_t
        V_m     = values[anchor_m]            (anchor_mask(seg, value_anchor)),  V_{M_b} = 0
        delta_m = r_m + gamma * V_{m+1} - V_m
        A_m     = delta_m + gamma * lam * A_{m+1}
        R_m     = A_m + V_m

    ``A_m`` and ``R_m`` are broadcast to every token of segment ``m``. Returns are taken before
    whitening; then advantages are whitened over the batch's valid tokens (``whiten``) and
    clamped to ``[-clip, clip]`` (``clip=None`` disables). With one segment per token this is
    exactly :func:`token_gae`.
    """
    valid = mask.bool()
    if seg.mask is not mask and not torch.equal(seg.mask, valid):
        raise ValueError("the segmentation was built on a different mask than the one passed to segment_gae")
    # Everything below works on compact per-segment tensors [B, M] (entries m >= M_b are 0).
    r_seg = seg.segment_sum(token_rewards)
    v_seg = seg.gather_at(values, anchor_mask(seg, value_anchor))
    v_next = F.pad(v_seg[:, 1:], (0, 1))  # V_{m+1}; 0 after each row's last segment
    delta = r_seg + gamma * v_next - v_seg
    adv_seg = discounted_reverse_cumsum(delta, gamma * lam)
    ret = seg.broadcast(adv_seg + v_seg)
    if whiten:
        # token-weighted batch statistics, computed per segment with weight = segment length
        adv_seg = _weighted_whiten(adv_seg, seg.lengths.to(adv_seg.dtype))
    if clip is not None:
        adv_seg = torch.clamp(adv_seg, -clip, clip)
    return seg.broadcast(adv_seg), ret


def _weighted_whiten(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Whitening of ``x`` where entry ``i`` stands for ``weight[i]`` identical tokens.

    Same numbers as ``losses.masked_whiten`` on the expanded tokens: mean ``sum(w x) / n``,
    unbiased variance ``sum(w (x - mean)^2) / (n - 1)`` (0 if ``n < 2``), ``n = sum(w)``.
    """
    n = weight.sum()
    mean = (weight * x).sum() / n.clamp(min=1)
    ss = (weight * (x - mean).square()).sum()
    var = torch.where(n >= 2, ss / (n - 1).clamp(min=1), torch.zeros_like(ss))
    return (x - mean) * torch.rsqrt(var + eps)


@torch.no_grad()
def token_gae(
    token_rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
    clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level GAE (PPO). Returns ``(advantages, returns)``, both ``[B, T]``.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V_T = 0`` after the last valid token,
    ``A_t = delta_t + gamma * lam * A_{t+1}``, ``R_t = A_t + V_t`` (before whitening); then optional
    whitening and clamping as in :func:`segment_gae`. A mask with holes (a multi-turn episode's observations
    between the model's tokens) takes each token as a segment of its own: ``V_{t+1}`` is then the value at
    the model's next token, past the observation.
    """
    valid = mask.bool()
    if not is_left_aligned(valid):
        per_token = Segments.from_end_mask(valid, valid, left_aligned=False)
        return segment_gae(token_rewards, values, valid, per_token, gamma, lam, "seg_end_prev", whiten, clip)
    zero = values.new_zeros(())
    v = torch.where(valid, values, zero)
    r = torch.where(valid, token_rewards, zero)
    v_next = F.pad(v[:, 1:], (0, 1))  # 0 past the last valid token (left-aligned)
    delta = torch.where(valid, r + gamma * v_next - v, zero)
    adv = discounted_reverse_cumsum(delta, gamma * lam)
    ret = torch.where(valid, adv + v, zero)
    return _finish(adv, valid, whiten, clip), ret


# --------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def token_rewards(
    scores: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_kind: str = "k1",
    turn_rewards: torch.Tensor | None = None,
) -> torch.Tensor:
    """``r_t = score * [t = last valid token] + turn_rewards_t - kl_coef * kl_t`` on valid tokens, 0 on padding.

    ``kl_t = kl.estimate(old_logp, ref_logp, kl_kind)`` (k1: ``old_logp - ref_logp``). ``scores``
    is ``[B]``; a row with no valid token gets no reward. ``turn_rewards [B, T]``: an episode's turn rewards,
    each at its turn's last token (`Batch.turn_rewards`).
    """
    valid = mask.bool()
    if scores.dim() != 1 or scores.shape[0] != valid.shape[0]:
        raise ValueError(f"scores must be [B]={valid.shape[0]}, got {tuple(scores.shape)}")
    dtype = scores.dtype if scores.is_floating_point() else torch.float32
    zero = torch.zeros((), dtype=dtype, device=scores.device)
    r = torch.where(last_valid_mask(valid), scores.to(dtype).unsqueeze(1), zero)
    if turn_rewards is not None:
        r = r + torch.where(valid, turn_rewards.to(dtype), zero)
    if kl_coef != 0.0:
        if old_logp is None or ref_logp is None:
            raise ValueError("a KL penalty in the reward (kl_coef != 0) needs old_logp= and ref_logp=")
        kl = kl_mod.estimate(old_logp, ref_logp, kl_kind).to(dtype)
        r = r - kl_coef * torch.where(valid, kl, torch.zeros((), dtype=dtype, device=kl.device))
    return r


# --------------------------------------------------------------------------------------------
# Group baselines (GRPO, Dr.GRPO, RLOO)
# --------------------------------------------------------------------------------------------


def group_ids(
    group_index: torch.Tensor | Sequence[Hashable], device: torch.device | None = None
) -> tuple[torch.Tensor, int]:
    """Dense group ids ``[B]`` in ``0 .. G-1`` and ``G`` from any per-sample group labels

    (a LongTensor, or a list / numpy array of hashables such as prompt uids). Groups are numbered
    in sorted order for a tensor and in order of first appearance for a sequence of labels.
    """
    if isinstance(group_index, torch.Tensor):
        _, dense = torch.unique(group_index, return_inverse=True)
        dense = dense.to(device) if device is not None else dense
    else:
        table: dict = {}
        ids = [table.setdefault(g, len(table)) for g in list(group_index)]
        dense = torch.tensor(ids, dtype=torch.long, device=device)
    num_groups = int(dense.max()) + 1 if dense.numel() else 0
    return dense, num_groups


@torch.no_grad()
def equal_groups(scores: torch.Tensor, dense: torch.Tensor, G: int) -> torch.Tensor:
    """BoolTensor ``[G]``: True for a group (dense ids ``[B]`` from :func:`group_ids`) whose scores are all equal."""
    hi = torch.full((G,), float("-inf"), dtype=scores.dtype, device=scores.device).scatter_reduce(0, dense, scores, "amax")
    lo = torch.full((G,), float("inf"), dtype=scores.dtype, device=scores.device).scatter_reduce(0, dense, scores, "amin")
    return hi == lo


def group_advantage(
    scores: torch.Tensor,
    group_index: torch.Tensor | Sequence[Hashable],
    mask: torch.Tensor,
    kind: str = "grpo",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Outcome advantages from a per-prompt group baseline, broadcast to the valid tokens ``[B, T]``.

    For sample ``i`` in group ``g`` of size ``n`` with scores ``R``:
      * ``grpo``:    ``(R_i - mean_g) / (std_g + eps)`` (``std`` unbiased, as ``torch.std``)
      * ``dr_grpo``: ``R_i - mean_g``
      * ``rloo``:    ``R_i - mean_{j != i} R_j = n / (n - 1) * (R_i - mean_g)``
    A group whose scores are all equal gets exactly 0. Every group needs ``n >= 2`` samples (rollout
    ``n >= 2``); a smaller group raises.
    """
    if kind not in GROUP_KINDS:
        raise ValueError(f"unknown group advantage kind {kind!r}; choose one of {GROUP_KINDS}")
    valid = mask.bool()
    scores = scores.to(torch.float32) if not scores.is_floating_point() else scores
    dense, G = group_ids(group_index, device=scores.device)
    if dense.shape[0] != scores.shape[0]:
        raise ValueError(f"group_index has {dense.shape[0]} entries but scores has {scores.shape[0]}")
    def per_group_sum(x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(G, dtype=x.dtype, device=x.device).index_add_(0, dense, x)

    count = per_group_sum(torch.ones_like(scores))
    if G and bool((count < 2).any()):
        bad = int(torch.nonzero(count < 2)[0])
        example = int(torch.nonzero(dense == bad)[0])
        raise ValueError(
            f"group advantage '{kind}' needs >= 2 samples per prompt (set rollout n >= 2); "
            f"the group of sample {example} has {int(count[bad])}"
        )
    mean = per_group_sum(scores) / count
    # A group whose scores are all equal has no signal: exactly 0, where rounding would leave a residue of
    # ~1e-8 that GRPO's division by a std of the same size inflates to ~0.05 (verl keeps that residue).
    centred = torch.where(equal_groups(scores, dense, G)[dense], scores.new_zeros(()), scores - mean[dense])
    if kind == "grpo":
        var = per_group_sum(centred.square()) / (count - 1)
        adv = centred / (var.sqrt()[dense] + eps)
    elif kind == "dr_grpo":
        adv = centred
    else:  # rloo
        n = count[dense]
        adv = centred * n / (n - 1)
    return torch.where(valid, adv.unsqueeze(1), adv.new_zeros(()))
