"""Policy and value losses, masked statistics (SAPO_SPEC.md sections 3-5).

All functions are pure tensor code. Shapes: ``[B, T]`` per-token tensors, ``mask`` 1 on valid
response tokens. Masked statistics are NaN-free: positions outside the mask are never read
(``torch.where``, not multiplication), and empty masks give 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from sapo_ray.algo.segments import Segments

__all__ = [
    "RATIO_LEVELS",
    "LOSS_AGGS",
    "POLICY_LOSSES",
    "register_ratio_level",
    "register_loss_agg",
    "agg_units",
    "LossAgg",
    "register_policy_loss",
    "masked_sum",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "explained_variance",
    "aggregate",
    "log_ratio",
    "policy_loss",
    "LossTrace",
    "loss_trace",
    "value_loss",
]

# Log-ratios are clamped before exp (as verl does) so one wild token cannot overflow the ratio.
LOG_RATIO_CLAMP = 20.0


# --------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------


def _zero_outside(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), x, x.new_zeros(()))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over ``mask`` (values outside the mask are never read, so may be NaN)."""
    z = _zero_outside(x, mask)
    return z.sum() if dim is None else z.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``sum(x * mask) / sum(mask)``; 0 where the mask is empty."""
    valid = mask.bool()
    count = torch.count_nonzero(valid) if dim is None else valid.sum(dim=dim, dtype=torch.int32)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all masked entries; unbiased (``n - 1``) by default; 0 if ``n < 2``."""
    n = torch.count_nonzero(mask.bool())
    mean = masked_mean(x, mask)
    ss = masked_sum((x - mean).square(), mask)
    denom = (n - 1) if unbiased else n
    return torch.where(n >= 2, ss / denom.clamp(min=1).to(x.dtype), torch.zeros_like(ss))


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` with token-weighted mean and unbiased variance over ``mask``.

    Entries outside the mask are returned as 0. ``shift_mean=False`` adds the mean back.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return _zero_outside(out, mask)


def explained_variance(returns: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(R - V) / Var(R)`` over ``mask`` (pass the critic-loss mask, e.g. the anchors).

    Returns 0 (not NaN) when ``Var(R)`` is 0 or fewer than 2 entries are masked.
    """
    var_r = masked_var(returns, mask)
    var_res = masked_var(returns - values, mask)
    ok = var_r > 0
    return torch.where(ok, 1.0 - var_res / torch.where(ok, var_r, torch.ones_like(var_r)), torch.zeros_like(var_r))


# --------------------------------------------------------------------------------------------
# Registries: ratio levels, loss aggregations, policy losses
# --------------------------------------------------------------------------------------------

# A ratio level: fn(l, valid, segments) -> per-token log ratio ``log s`` (0 on padding), where
# ``l = clamp(logp - old_logp, -20, 20)``.
RatioFn = Callable[[torch.Tensor, torch.Tensor, "Segments | None"], torch.Tensor]
RATIO_LEVELS: dict[str, RatioFn] = {}
# A loss aggregation: fn(loss_mat, valid, *, segments, norm_len, agg_denom) -> scalar.
AggFn = Callable[..., torch.Tensor]
# What an aggregation's outer mean counts: fn(valid [B, T] bool, segments) -> number of units.
UnitsFn = Callable[[torch.Tensor, "Segments | None"], torch.Tensor]


@dataclass(frozen=True)
class LossAgg:
    """A registered loss aggregation: how a per-token loss becomes a scalar (`reduce`), the units its outer
    mean divides by (`units`: tokens, non-empty rows or segments; summed over a whole mini-batch and its
    ranks, they make accumulated micro-batch gradients equal one big batch's), whether it needs segments,
    and the aggregation a per-token KL term added to the loss uses (None: this one)."""

    reduce: AggFn
    units: UnitsFn
    needs_segments: bool = False
    kl_agg: str | None = None


LOSS_AGGS: dict[str, LossAgg] = {}
# A policy loss: fn(log_s, adv, valid, *, clip_low, clip_high, dual_clip) -> (per-token loss, {metric: bool mask});
# each mask's share of the valid tokens is reported under its name.
PolicyLossFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def _registrar(table: dict, kind: str):
    def register(name: str):
        def decorator(fn):
            if name in table and table[name] is not fn:
                raise ValueError(f"{kind} {name!r} is already registered ({table[name]})")
            table[name] = fn
            return fn
        return decorator
    return register


register_ratio_level = _registrar(RATIO_LEVELS, "ratio level")
register_policy_loss = _registrar(POLICY_LOSSES, "policy loss")


def register_loss_agg(name: str, units: UnitsFn, needs_segments: bool = False, kl_agg: str | None = None):
    """Register the decorated `reduce` function as loss aggregation `name` (`LossAgg`)."""
    def decorator(fn: AggFn) -> AggFn:
        if name in LOSS_AGGS and LOSS_AGGS[name].reduce is not fn:
            raise ValueError(f"loss aggregation {name!r} is already registered ({LOSS_AGGS[name]})")
        LOSS_AGGS[name] = LossAgg(fn, units, needs_segments, kl_agg)
        return fn
    return decorator


def agg_units(agg: str, mask: torch.Tensor, segments: Segments | None = None) -> torch.Tensor:
    """How many units (tokens, non-empty rows or segments) of `mask` the aggregation `agg` averages over."""
    return _lookup(LOSS_AGGS, agg, "loss aggregation").units(mask.bool(), segments)


def _tokens(valid: torch.Tensor, segments=None) -> torch.Tensor:
    return valid.sum()


def _rows(valid: torch.Tensor, segments=None) -> torch.Tensor:
    return (valid.sum(1) > 0).sum()


def _segments(valid: torch.Tensor, segments: Segments | None) -> torch.Tensor:
    if segments is None:
        raise ValueError("agg='segment_mean' needs segments=")
    return segments.end_mask.float().mul(valid).sum()


def _lookup(table: dict, name: str, kind: str):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {sorted(table)}")
    return table[name]


# --------------------------------------------------------------------------------------------
# Loss aggregation
# --------------------------------------------------------------------------------------------


def aggregate(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    agg: str = "token_mean",
    segments: Segments | None = None,
    norm_len: float | None = None,
    agg_denom: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss ``[B, T]`` to a scalar with the registered aggregation ``agg``.

    Modes (``n`` = valid tokens of the micro-batch, rows/segments with no valid token are skipped):
      * ``token_mean``: ``sum_{b,t} l / n`` (PPO/SAPO default; DAPO's "token-sum / total tokens").
      * ``seq_mean_token_mean``: mean over rows of each row's token mean (GRPO paper, GSPO).
      * ``segment_mean``: mean over segments of each segment's token mean (needs ``segments``).
      * ``seq_mean_token_sum_norm``: mean over rows of ``sum_t l / norm_len`` (Dr.GRPO); pass a
        constant ``norm_len`` (the max response length); ``None`` uses ``T`` of this batch.

    ``agg_denom`` replaces the micro-batch count in the outer mean (tokens, rows or segments of
    the whole mini-batch) so that gradients accumulated over micro-batches equal one big batch.
    """
    reduce = _lookup(LOSS_AGGS, agg, "loss aggregation").reduce
    return reduce(loss_mat, mask.bool(), segments=segments, norm_len=norm_len, agg_denom=agg_denom)


@register_loss_agg("token_mean", units=_tokens)
def _token_mean(loss_mat, valid, *, agg_denom=None, **_) -> torch.Tensor:
    denom = torch.count_nonzero(valid).clamp(min=1) if agg_denom is None else agg_denom
    return masked_sum(loss_mat, valid) / denom


def _row_mean(per_row: torch.Tensor, lengths: torch.Tensor, agg_denom) -> torch.Tensor:
    denom = (lengths > 0).sum().clamp(min=1) if agg_denom is None else agg_denom
    return per_row.sum() / denom


@register_loss_agg("seq_mean_token_mean", units=_rows)
def _seq_mean_token_mean(loss_mat, valid, *, agg_denom=None, **_) -> torch.Tensor:
    lengths = valid.sum(dim=1, dtype=torch.int32).long()
    per_row = masked_sum(loss_mat, valid, dim=1) / lengths.clamp(min=1).to(loss_mat.dtype)
    return _row_mean(per_row, lengths, agg_denom)


@register_loss_agg("seq_mean_token_sum_norm", units=_rows)
def _seq_mean_token_sum_norm(loss_mat, valid, *, norm_len=None, agg_denom=None, **_) -> torch.Tensor:
    lengths = valid.sum(dim=1, dtype=torch.int32).long()
    per_row = masked_sum(loss_mat, valid, dim=1) / float(norm_len if norm_len is not None else loss_mat.shape[-1])
    return _row_mean(per_row, lengths, agg_denom)


# A per-token KL term beside it is a token mean: a KL has no segment structure.
@register_loss_agg("segment_mean", units=_segments, needs_segments=True, kl_agg="token_mean")
def _segment_mean(loss_mat, valid, *, segments=None, agg_denom=None, **_) -> torch.Tensor:
    if segments is None:
        raise ValueError("agg='segment_mean' needs segments=")
    if not torch.equal(segments.mask, valid):
        segments = Segments.from_end_mask(segments.end_mask, valid)  # a narrower loss mask
    lengths = segments.lengths
    per_seg = segments.segment_sum(loss_mat) / lengths.clamp(min=1).to(loss_mat.dtype)
    denom = (lengths > 0).sum().clamp(min=1) if agg_denom is None else agg_denom
    return per_seg.sum() / denom


# --------------------------------------------------------------------------------------------
# Importance ratio levels
# --------------------------------------------------------------------------------------------


def log_ratio(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    mask: torch.Tensor,
    level: str = "segment",
    segments: Segments | None = None,
) -> torch.Tensor:
    """Per-token log importance ratio ``log s`` at the registered ``level`` (SAPO_SPEC.md section 3).

    ``l_t = clamp(logp_t - old_logp_t, -20, 20)``;
      * ``token``:    ``log s_t = l_t``
      * ``segment``:  ``log s_t = L_m = mean_{u in z_m} l_u`` for ``t in z_m`` (needs ``segments``)
      * ``sequence``: ``log s_t = mean_{u valid} l_u`` (GSPO)
    Gradients flow through the means. 0 on padding.
    """
    fn = _lookup(RATIO_LEVELS, level, "ratio level")
    lr = torch.clamp(logp - old_logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return fn(lr, mask.bool(), segments)


@register_ratio_level("token")
def _token_ratio(lr, valid, segments) -> torch.Tensor:
    return _zero_outside(lr, valid)


@register_ratio_level("segment")
def _segment_ratio(lr, valid, segments) -> torch.Tensor:
    if segments is None:
        raise ValueError("level='segment' needs segments= (see sapo_ray.algo.segments.segment)")
    if segments.seg_id.shape != lr.shape:
        raise ValueError(f"segments are {tuple(segments.seg_id.shape)} but log-probs are {tuple(lr.shape)}")
    return segments.segment_mean(lr)


@register_ratio_level("sequence")
def _sequence_ratio(lr, valid, segments) -> torch.Tensor:
    seq = masked_mean(lr, valid, dim=1)
    return _zero_outside(seq.unsqueeze(1).expand_as(lr), valid)


# --------------------------------------------------------------------------------------------
# Policy loss
# --------------------------------------------------------------------------------------------


@register_policy_loss("clipped")
def clipped_surrogate(log_s, adv, valid, *, clip_low: float, clip_high: float,
                      dual_clip: float | None, **_) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate with an optional dual clip, per token (``adv`` is 0 on padding)::

        pg = max(-A * s, -A * clip(s, 1 - clip_low, 1 + clip_high))
        pg = min(pg, -A * dual_clip)            if A < 0 and dual_clip is not None

    Masks: ``pg_clipfrac`` (the clipped branch is active), ``pg_clipfrac_lower`` (the dual clip is).
    """
    if dual_clip is not None and not dual_clip > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}")
    ratio = torch.exp(log_s)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(loss_unclipped, loss_clipped)
    masks = {"pg_clipfrac": (loss_clipped > loss_unclipped).detach() & valid,
             "pg_clipfrac_lower": torch.zeros_like(valid)}
    if dual_clip is not None:
        # the dual clip only bounds A < 0: -A * c there, no bound elsewhere
        bound = torch.where(adv < 0, -adv * dual_clip, torch.full((), float("inf"), dtype=adv.dtype, device=adv.device))
        masks["pg_clipfrac_lower"] = (pg.detach() > bound) & valid
        pg = torch.minimum(pg, bound)
    return pg, masks


@register_policy_loss("soft_gate")
def soft_gate(log_s, adv, valid, *, tau_pos: float, tau_neg: float, **_) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Soft Adaptive Policy Optimization's gate in place of the clip (Gao et al., arXiv 2511.20347;
    verl's ``loss_mode=sapo``), per token::

        f(s) = sigmoid(tau (s - 1)) * 4 / tau,   tau = tau_pos if A > 0 else tau_neg
        pg   = -f(s) * A

    Its gradient is ``-A * 4 sigmoid (1 - sigmoid) * s * grad log s``: the plain policy gradient at
    ``s = 1``, fading smoothly as the ratio leaves 1 (faster for a larger ``tau``). Mask: ``pg_gate_faded``,
    the tokens whose gradient weight ``4 sigmoid (1 - sigmoid)`` is below one half.
    """
    if not (tau_pos > 0 and tau_neg > 0):
        raise ValueError(f"tau_pos and tau_neg must be > 0, got {tau_pos} and {tau_neg}")
    ratio = torch.exp(log_s)
    tau = torch.where(adv > 0, torch.as_tensor(tau_pos, dtype=ratio.dtype), torch.as_tensor(tau_neg, dtype=ratio.dtype))
    gate = torch.sigmoid(tau * (ratio - 1.0))
    pg = -gate * (4.0 / tau) * adv
    return pg, {"pg_gate_faded": (4 * gate * (1 - gate) < 0.5).detach() & valid}


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    level: str = "segment",
    segments: Segments | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = 3.0,
    agg: str = "token_mean",
    is_weights: torch.Tensor | None = None,
    norm_len: float | None = None,
    agg_denom: float | torch.Tensor | None = None,
    kind: str = "clipped",
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The registered policy loss ``kind`` at ratio level ``level``, aggregated by ``agg`` (SAPO_SPEC.md 3-4).

    ``s = exp(log_ratio(...))`` per valid token; the per-token loss (``clipped``: PPO's dual-clip
    surrogate, see :func:`clipped_surrogate`; ``soft_gate``: :func:`soft_gate` with ``tau_pos`` and
    ``tau_neg``) is multiplied by ``is_weights`` (optional per-token
    truncated-IS weights for a rollout/learner mismatch; treated as constants), then aggregated.

    Returns ``(loss, metrics)``; metrics are detached 0-dim tensors: the loss's masks as shares of
    the valid tokens (``pg_clipfrac``, ``pg_clipfrac_lower`` for ``clipped``) and ``ppo_kl``, the
    masked mean of ``-log s`` (approximate KL(old || new) at the chosen level).
    """
    valid = mask.bool()
    pg, masks, log_s = _policy_terms(logp, old_logp, adv, valid, level, segments, kind, clip_low=clip_low,
                                     clip_high=clip_high, dual_clip=dual_clip, tau_pos=tau_pos, tau_neg=tau_neg)
    if is_weights is not None:
        pg = pg * is_weights.detach()
    loss = aggregate(pg, valid, agg, segments=segments, norm_len=norm_len, agg_denom=agg_denom)
    with torch.no_grad():
        n = torch.count_nonzero(valid).clamp(min=1).to(logp.dtype)
        metrics = {name: torch.count_nonzero(m & valid).to(logp.dtype) / n for name, m in masks.items()}
        metrics["ppo_kl"] = -log_s.detach().sum() / n
    return loss, metrics


def _policy_terms(logp, old_logp, adv, valid, level, segments, kind, **knobs):
    """The per-token loss of the registered policy loss `kind`, its masks and the log ratio ``log s``."""
    fn = _lookup(POLICY_LOSSES, kind, "policy loss")
    log_s = log_ratio(logp, old_logp, valid, level, segments)  # 0 on padding
    adv = _zero_outside(adv.detach(), valid)  # so every padding term is exactly 0
    pg, masks = fn(log_s, adv, valid, **knobs)
    return pg, masks, log_s


@dataclass
class LossTrace:
    """Per token `[B, R]`, what a policy loss saw: the log importance ratio at its level, and where its clip
    (or gate) held the token's gradient back, the union of the loss's masks (an inspector's view of an update)."""

    log_ratio: torch.Tensor
    held: torch.Tensor  # bool


def loss_trace(logp, old_logp, adv, mask, level: str = "segment", segments: Segments | None = None,
               clip_low: float = 0.2, clip_high: float = 0.28, dual_clip: float | None = 3.0, kind: str = "clipped",
               tau_pos: float = 1.0, tau_neg: float = 1.05) -> LossTrace:
    """The `LossTrace` of `policy_loss` with the same arguments."""
    valid = mask.bool()
    with torch.no_grad():
        _, masks, log_s = _policy_terms(logp.detach(), old_logp, adv, valid, level, segments, kind, clip_low=clip_low,
                                        clip_high=clip_high, dual_clip=dual_clip, tau_pos=tau_pos, tau_neg=tau_neg)
        held = torch.zeros_like(valid)
        for m in masks.values():
            held |= m & valid
    return LossTrace(log_s, held)


# --------------------------------------------------------------------------------------------
# Value loss
# --------------------------------------------------------------------------------------------


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    loss_mask: torch.Tensor,
    clip: float | None = 0.5,
    agg_denom: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss (SAPO_SPEC.md section 5), token-mean over ``loss_mask``::

        0.5 * mean(max((v - R)^2, (clip(v, v_old - clip, v_old + clip) - R)^2))

    For SAPO pass ``loss_mask = advantages.anchor_mask(seg, value_anchor)`` (one position per
    segment); for token-level PPO the response mask. ``clip=None`` disables clipping.
    Metrics: ``vf_clipfrac`` (fraction where the clipped term is the larger one).
    """
    valid = loss_mask.bool()
    err = (values - returns).square()
    if clip is None:
        per_token = err
        clipfrac = values.new_zeros(())
    else:
        v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        err_clipped = (v_clipped - returns).square()
        per_token = torch.maximum(err, err_clipped)
        with torch.no_grad():
            clipfrac = masked_mean((err_clipped > err).to(values.dtype), valid)
    loss = 0.5 * aggregate(per_token, valid, "token_mean", agg_denom=agg_denom)
    return loss, {"vf_clipfrac": clipfrac.detach()}
