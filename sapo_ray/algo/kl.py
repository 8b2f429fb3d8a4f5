"""KL estimators between the policy and a reference policy (SAPO_SPEC.md section 6).

With ``d = logp - ref_logp`` per sampled token (Schulman, "Approximating KL divergence", 2020):

  * ``k1 = d``                         unbiased, high variance, can be negative
  * ``k2 = 0.5 * d**2``                biased, low variance, its gradient is the true KL gradient
  * ``k3 = exp(-d) - (-d) - 1``        unbiased, low variance, always >= 0 ("low_var_kl")

``d`` is clamped to ``[-20, 20]`` before ``exp`` so that k3 stays finite, and k3 itself to
``[-10, 10]`` (as verl's ``low_var_kl``): one token whose probability collapsed cannot dominate the
penalty or its gradient.
"""

from __future__ import annotations

import torch

from sapo_ray.algo.losses import aggregate

__all__ = ["KL_KINDS", "estimate", "kl_loss"]

K3_CLAMP = 10.0


def _k1(d: torch.Tensor) -> torch.Tensor:
    return d


def _k2(d: torch.Tensor) -> torch.Tensor:
    return 0.5 * d.square()


def _k3(d: torch.Tensor) -> torch.Tensor:
    neg = torch.clamp(-d, min=-20.0, max=20.0)  # log(pi_ref / pi)
    return torch.clamp(torch.exp(neg) - neg - 1.0, -K3_CLAMP, K3_CLAMP)


# The estimators by name (config keys `algorithm.kl_kind`, `algorithm.kl_loss_kind`): fn(logp - ref_logp).
KL_KINDS = {"k1": _k1, "k2": _k2, "k3": _k3}


def estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL estimate of ``KL(pi || pi_ref)`` from sampled-token log-probs (same shape)."""
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL estimator kind {kind!r}; choose one of {sorted(KL_KINDS)}")
    return KL_KINDS[kind](logp - ref_logp)


def kl_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "k3",
    agg: str = "token_mean",
    agg_denom: float | torch.Tensor | None = None,
    norm_len: float | None = None,
) -> torch.Tensor:
    """GRPO's optional KL loss: ``aggregate(estimate(logp, ref_logp, kind), mask, agg)``, with the policy
    loss's ``norm_len`` (Dr.GRPO's constant length; without it a row's sum would be divided by the width of
    each micro-batch, a weight that changes from one to the next).

    Multiply by the coefficient (``kl_loss_coef``) in the caller. Gradients flow through ``logp``.
    """
    return aggregate(estimate(logp, ref_logp, kind), mask, agg, norm_len=norm_len, agg_denom=agg_denom)
