"""KL estimators between the policy and a reference policy (SAPO_SPEC.md section 6).

With ``d = logp - ref_logp`` per sampled token (Schulman, "Approximating KL divergence", 2020):

  * ``k1 = d``                         unbiased, high variance, can be negative
  * ``k2 = 0.5 * d**2``                biased, low variance, its gradient is the true KL gradient
  * ``k3 = exp(-d) - (-d) - 1``        unbiased, low variance, always >= 0 ("low_var_kl")

``d`` is clamped to ``[-20, 20]`` before ``exp`` so that k3 stays finite.
"""

from __future__ import annotations

import torch

from sapo_ray.algo.losses import aggregate

__all__ = ["KL_KINDS", "estimate", "kl_loss"]

KL_KINDS = ("k1", "k2", "k3")


def estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL estimate of ``KL(pi || pi_ref)`` from sampled-token log-probs (same shape)."""
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d.square()
    if kind == "k3":
        neg = torch.clamp(-d, min=-20.0, max=20.0)  # log(pi_ref / pi)
        return torch.exp(neg) - neg - 1.0
    raise ValueError(f"unknown KL estimator kind {kind!r}; choose one of {KL_KINDS}")


def kl_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "k3",
    agg: str = "token_mean",
    agg_denom: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """GRPO's optional KL loss: ``aggregate(estimate(logp, ref_logp, kind), mask, agg)``.

    Multiply by the coefficient (``kl_loss_coef``) in the caller. Gradients flow through ``logp``.
    """
    return aggregate(estimate(logp, ref_logp, kind), mask, agg, agg_denom=agg_denom)
