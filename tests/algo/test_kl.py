"""KL estimators k1/k2/k3 and the KL loss, with hand-worked numbers."""

import math

import pytest
import torch

from sapo_ray.algo import kl

D = torch.float64


def test_estimators_by_hand():
    logp = torch.tensor([-1.0, -1.5, -2.0], dtype=D)
    ref = torch.tensor([-1.5, -1.0, -2.0], dtype=D)
    # d = logp - ref = [0.5, -0.5, 0]
    torch.testing.assert_close(kl.estimate(logp, ref, "k1"), torch.tensor([0.5, -0.5, 0.0], dtype=D))
    torch.testing.assert_close(kl.estimate(logp, ref, "k2"), torch.tensor([0.125, 0.125, 0.0], dtype=D))
    # k3 = exp(-d) + d - 1: e^-0.5 - 0.5 = 0.106531 ; e^0.5 - 1.5 = 0.148721 ; 0
    torch.testing.assert_close(
        kl.estimate(logp, ref, "k3"), torch.tensor([0.10653065971263342, 0.1487212707001282, 0.0], dtype=D)
    )
    with pytest.raises(ValueError, match="k1"):
        kl.estimate(logp, ref, "k4")


def test_k3_is_finite_for_extreme_log_ratios():
    out = kl.estimate(torch.tensor([-200.0, 0.0]), torch.tensor([0.0, -200.0]), "k3")
    assert torch.isfinite(out).all()
    # d = -200 clamped to log(pi_ref/pi) = 20: e^20 - 20 - 1, then k3 itself clamped to 10 (verl's low_var_kl)
    assert math.exp(20) - 21 > 10 and float(out[0]) == 10.0
    # d = 200 -> log(pi_ref/pi) = -20: e^-20 + 20 - 1 = 19.000000002, clamped to 10 too
    assert float(out[1]) == 10.0
    # inside the clamp nothing changes: d = -2 -> e^2 - 2 - 1 = 4.389056
    assert float(kl.estimate(torch.tensor([-2.0]), torch.tensor([0.0]), "k3")) == pytest.approx(math.exp(2) - 3)


def test_kl_loss_masked_mean_and_gradient():
    logp = torch.tensor([[-1.0, -1.5, 7.0]], dtype=D, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, 0.0]], dtype=D)
    mask = torch.tensor([[True, True, False]])
    loss = kl.kl_loss(logp, ref, mask, kind="k3")
    # (0.106531 + 0.148721) / 2 = 0.127626
    assert loss.item() == pytest.approx((0.10653065971263342 + 0.1487212707001282) / 2)
    loss.backward()
    # d k3 / d logp = 1 - exp(ref - logp): 1 - e^-0.5 = 0.393469 ; 1 - e^0.5 = -0.648721 ; /2 for the mean
    torch.testing.assert_close(
        logp.grad, torch.tensor([[0.3934693402873666 / 2, -0.6487212707001282 / 2, 0.0]], dtype=D)
    )


def test_dr_grpos_kl_loss_takes_the_policy_losss_length_normaliser():
    """Dr.GRPO aggregates `mean_rows(sum_t l / norm_len)`: with `algorithm.kl_loss=true` its KL term divides by
    the same `norm_len` (the response length limit, 32 here) as the policy loss, not by the width of the
    micro-batch (12): rows of 12 and 5 tokens with k1 = 0.5 per token give (6 / 32 + 2.5 / 32) / 2."""
    from sapo_ray.algo import registry

    spec = registry.get_algorithm("dr_grpo", kl_loss=True, kl_loss_coef=1.0, kl_loss_kind="k1")
    mask = (torch.arange(12).unsqueeze(0) < torch.tensor([[12], [5]])).float()
    logp, ref = torch.full((2, 12), -1.0, dtype=torch.float64), torch.full((2, 12), -1.5, dtype=torch.float64)
    term = registry.kl_loss(spec, logp, ref, mask, norm_len=32)
    assert float(term) == pytest.approx((6 / 32 + 2.5 / 32) / 2, abs=1e-12)
    assert float(registry.kl_loss(spec, logp, ref, mask)) == pytest.approx((6 / 12 + 2.5 / 12) / 2, abs=1e-12)
