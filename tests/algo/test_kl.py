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
