"""Policy/value losses, aggregation modes and masked statistics, with hand-worked numbers."""

import math

import pytest
import torch

from sapo_ray.algo import losses
from sapo_ray.algo.segments import Segments, segment

D = torch.float64


def lmask(lengths, T):
    return torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def f(x):
    return float(x)


# ---- token level -----------------------------------------------------------------------------


def test_token_level_policy_loss_by_hand():
    mask = lmask([3], 4)
    old = torch.zeros(1, 4, dtype=D)
    logp = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1), 7.0]], dtype=D)
    adv = torch.tensor([[1.0, -1.0, 2.0, 5.0]], dtype=D)
    loss, m = losses.policy_loss(logp, old, adv, mask, level="token", clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    # t0: s=1.5, A=1  -> max(-1.5, -1.28) = -1.28 (clipped)
    # t1: s=0.5, A=-1 -> max(0.5, 0.8) = 0.8 (clipped), dual min(0.8, 3) = 0.8
    # t2: s=1.1, A=2  -> max(-2.2, -2.2) = -2.2 (not clipped)
    # token mean = (-1.28 + 0.8 - 2.2) / 3 = -0.893333
    assert f(loss) == pytest.approx(-0.8933333333, abs=1e-9)
    assert f(m["pg_clipfrac"]) == pytest.approx(2 / 3)
    assert f(m["pg_clipfrac_lower"]) == 0.0
    # ppo_kl = mean(-log s) = -(ln 1.5 + ln 0.5 + ln 1.1) / 3 = 0.0641240
    assert f(m["ppo_kl"]) == pytest.approx(0.06412396421581866, abs=1e-12)


def test_dual_clip_branch():
    mask = lmask([1], 1)
    logp = torch.tensor([[math.log(5.0)]], dtype=D)
    adv = torch.tensor([[-1.0]], dtype=D)
    # s=5, A=-1: max(5, 1.28) = 5 ; dual clip min(5, 3 * 1) = 3
    loss, m = losses.policy_loss(logp, torch.zeros_like(logp), adv, mask, level="token", dual_clip=3.0)
    assert f(loss) == pytest.approx(3.0)
    assert f(m["pg_clipfrac_lower"]) == 1.0 and f(m["pg_clipfrac"]) == 0.0
    loss, m = losses.policy_loss(logp, torch.zeros_like(logp), adv, mask, level="token", dual_clip=None)
    assert f(loss) == pytest.approx(5.0) and f(m["pg_clipfrac_lower"]) == 0.0
    with pytest.raises(ValueError, match="dual_clip"):
        losses.policy_loss(logp, torch.zeros_like(logp), adv, mask, level="token", dual_clip=0.5)


def test_clip_higher_branch():
    mask = lmask([1], 1)
    logp = torch.tensor([[math.log(1.25)]], dtype=D)
    adv = torch.ones(1, 1, dtype=D)
    # s=1.25 < 1 + 0.28: unclipped -> -1.25 ; symmetric 0.2 clips it to -1.2
    loss, m = losses.policy_loss(logp, torch.zeros_like(logp), adv, mask, level="token", clip_low=0.2, clip_high=0.28)
    assert f(loss) == pytest.approx(-1.25) and f(m["pg_clipfrac"]) == 0.0
    loss, m = losses.policy_loss(logp, torch.zeros_like(logp), adv, mask, level="token", clip_low=0.2, clip_high=0.2)
    assert f(loss) == pytest.approx(-1.2) and f(m["pg_clipfrac"]) == 1.0


def textbook_ppo_clip(logp, old, adv, mask, eps_low, eps_high, c):
    """PPO-clip with dual clip, token mean, written per token from the definition."""
    total, n = 0.0, 0
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            r = math.exp(float(logp[b, t] - old[b, t]))
            a = float(adv[b, t])
            surrogate = min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
            loss = -surrogate
            if a < 0:
                loss = min(loss, -c * a)
            total += loss
            n += 1
    return total / n


def test_token_level_equals_textbook_ppo():
    torch.manual_seed(0)
    B, T = 4, 16
    mask = lmask([16, 3, 1, 12], T)
    old = -torch.rand(B, T, dtype=D) * 2
    logp = old + torch.randn(B, T, dtype=D)  # large enough that every branch is taken
    adv = torch.randn(B, T, dtype=D)
    loss, m = losses.policy_loss(logp, old, adv, mask, level="token", clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    assert f(loss) == pytest.approx(textbook_ppo_clip(logp, old, adv, mask, 0.2, 0.28, 3.0), abs=1e-12)
    assert 0 < f(m["pg_clipfrac"]) < 1 and 0 < f(m["pg_clipfrac_lower"]) < 1  # all branches hit


# ---- segment and sequence levels -------------------------------------------------------------


def test_segment_ratio_by_hand():
    mask = lmask([4], 4)
    seg = Segments.from_end_mask(torch.tensor([[False, True, False, False]]), mask)  # {0,1} {2,3}
    old = torch.zeros(1, 4, dtype=D)
    logp = torch.tensor([[0.2, 0.0, -0.1, -0.3]], dtype=D)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=D)
    # L_0 = 0.1 -> s_0 = e^0.1 = 1.105171 (inside [0.8, 1.28]) -> pg = -1.105171 on t=0,1
    # L_1 = -0.2 -> s_1 = e^-0.2 = 0.818731 (inside) -> pg = +0.818731 on t=2,3
    # token mean = (2 * -1.105171 + 2 * 0.818731) / 4 = -0.143220 ; ppo_kl = -(2*0.1 - 2*0.2)/4 = 0.05
    loss, m = losses.policy_loss(logp, old, adv, mask, level="segment", segments=seg)
    assert f(loss) == pytest.approx(-0.14322008249883295, abs=1e-12)
    assert f(m["ppo_kl"]) == pytest.approx(0.05, abs=1e-12)
    assert f(m["pg_clipfrac"]) == 0.0
    ratio = losses.log_ratio(logp, old, mask, "segment", seg).exp()
    torch.testing.assert_close(ratio, torch.tensor([[1.1051709180756477] * 2 + [0.8187307530779818] * 2], dtype=D))


def test_one_segment_gives_the_gspo_sequence_ratio():
    torch.manual_seed(3)
    B, T = 3, 6
    mask = lmask([6, 2, 4], T)
    old = -torch.rand(B, T, dtype=D)
    logp = old + 0.05 * torch.randn(B, T, dtype=D)
    adv = torch.randn(B, 1, dtype=D).expand(B, T)
    seq_seg = segment("sequence", mask=mask)
    a = losses.policy_loss(logp, old, adv, mask, level="segment", segments=seq_seg, clip_low=3e-4, clip_high=4e-4)
    b = losses.policy_loss(logp, old, adv, mask, level="sequence", clip_low=3e-4, clip_high=4e-4)
    assert f(a[0]) == pytest.approx(f(b[0]), abs=1e-12)
    # GSPO: s_i = exp(mean_t (logp - old)) over the valid tokens of row i
    for i, n in enumerate([6, 2, 4]):
        s_i = math.exp(float((logp[i, :n] - old[i, :n]).mean()))
        got = losses.log_ratio(logp, old, mask, "sequence")[i, :n].exp()
        torch.testing.assert_close(got, torch.full((n,), s_i, dtype=D))


def test_segment_level_with_token_segments_equals_token_level():
    torch.manual_seed(4)
    B, T = 3, 5
    mask = lmask([5, 1, 3], T)
    old, logp, adv = -torch.rand(B, T, dtype=D), -torch.rand(B, T, dtype=D), torch.randn(B, T, dtype=D)
    tok_seg = segment("token", mask=mask)
    a, ma = losses.policy_loss(logp, old, adv, mask, level="segment", segments=tok_seg)
    b, mb = losses.policy_loss(logp, old, adv, mask, level="token")
    assert f(a) == pytest.approx(f(b), abs=1e-12)
    assert {k: f(v) for k, v in ma.items()} == pytest.approx({k: f(v) for k, v in mb.items()})


def test_segment_level_needs_segments():
    with pytest.raises(ValueError, match="segments"):
        losses.policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), lmask([2], 2), level="segment")
    with pytest.raises(ValueError, match="ratio level"):
        losses.policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), lmask([2], 2), level="word")


def test_segment_ratio_loss_gradcheck():
    torch.manual_seed(5)
    B, T = 2, 6
    mask = lmask([6, 4], T)
    seg = segment("entropy_topk", mask=mask, entropy=torch.rand(B, T), frac=0.4)
    old = -torch.rand(B, T, dtype=D)
    adv = torch.randn(B, T, dtype=D)
    logp = (old + 0.3 * torch.randn(B, T, dtype=D)).requires_grad_(True)

    def fn(lp):
        return losses.policy_loss(lp, old, adv, mask, level="segment", segments=seg, agg="token_mean")[0]

    assert torch.autograd.gradcheck(fn, (logp,))
    x = torch.randn(B, T, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(seg.segment_mean, (x,))


def test_importance_weights_scale_each_token():
    mask = lmask([2], 2)
    logp = torch.zeros(1, 2, dtype=D)
    adv = torch.tensor([[1.0, 2.0]], dtype=D)
    w = torch.tensor([[0.5, 2.0]], dtype=D)
    # s = 1 everywhere: pg = -A = [-1, -2]; weighted [-0.5, -4]; mean -2.25
    loss, _ = losses.policy_loss(logp, logp, adv, mask, level="token", is_weights=w)
    assert f(loss) == pytest.approx(-2.25)


def test_padding_garbage_does_not_leak():
    mask = lmask([2, 0], 3)
    nan = float("nan")
    logp = torch.tensor([[-1.0, -1.0, nan], [nan, nan, nan]])
    adv = torch.tensor([[1.0, -1.0, nan], [nan, nan, nan]])
    seg = segment("sequence", mask=mask)
    for level in ("token", "segment", "sequence"):
        for agg in losses.LOSS_AGGS:
            lp = logp.clone().requires_grad_(True)
            loss, m = losses.policy_loss(lp, logp, adv, mask, level=level, segments=seg, agg=agg)
            assert torch.isfinite(loss) and all(torch.isfinite(v) for v in m.values()), (level, agg)
            loss.backward()
            assert torch.isfinite(lp.grad).all() and (lp.grad[~mask] == 0).all(), (level, agg)


# ---- aggregation -----------------------------------------------------------------------------


def test_aggregation_modes_by_hand():
    mask = lmask([3, 1], 4)
    loss_mat = torch.tensor([[1.0, 2.0, 3.0, 50.0], [4.0, 60.0, 70.0, 80.0]], dtype=D)
    seg = Segments.from_end_mask(torch.tensor([[False, True, False, False], [False] * 4]), mask)
    # token_mean: (1+2+3+4)/4 = 2.5 ; seq_mean_token_mean: (2 + 4)/2 = 3
    # seq_mean_token_sum_norm (norm_len 4): (6/4 + 4/4)/2 = 1.25 ; segment_mean: segments {1,2},{3},{4} -> (1.5+3+4)/3
    assert f(losses.aggregate(loss_mat, mask, "token_mean")) == pytest.approx(2.5)
    assert f(losses.aggregate(loss_mat, mask, "seq_mean_token_mean")) == pytest.approx(3.0)
    assert f(losses.aggregate(loss_mat, mask, "seq_mean_token_sum_norm", norm_len=4)) == pytest.approx(1.25)
    assert f(losses.aggregate(loss_mat, mask, "seq_mean_token_sum_norm", norm_len=8)) == pytest.approx(0.625)
    assert f(losses.aggregate(loss_mat, mask, "segment_mean", segments=seg)) == pytest.approx(8.5 / 3)
    # agg_denom: the mini-batch's token count for gradient accumulation (DAPO token-sum / total tokens)
    assert f(losses.aggregate(loss_mat, mask, "token_mean", agg_denom=20)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="segments"):
        losses.aggregate(loss_mat, mask, "segment_mean")
    with pytest.raises(ValueError, match="aggregation"):
        losses.aggregate(loss_mat, mask, "mean")


def test_aggregation_skips_empty_rows():
    mask = lmask([2, 0], 2)
    loss_mat = torch.tensor([[1.0, 3.0], [100.0, 100.0]])
    assert f(losses.aggregate(loss_mat, mask, "seq_mean_token_mean")) == pytest.approx(2.0)
    assert f(losses.aggregate(torch.ones(1, 2), lmask([0], 2), "token_mean")) == 0.0


# ---- value loss and statistics ---------------------------------------------------------------


def test_value_loss_by_hand():
    values = torch.tensor([[1.5, 2.0, 9.0]], dtype=D)
    old = torch.tensor([[0.5, 2.0, 0.0]], dtype=D)
    returns = torch.tensor([[2.0, 1.0, 0.2]], dtype=D)
    loss_mask = torch.tensor([[True, True, False]])
    # t0: v=1.5, clip to [0, 1.0] -> 1.0 ; (1.5-2)^2 = 0.25, (1.0-2)^2 = 1 -> 1 (clipped term larger)
    # t1: v=2.0 = old -> (2-1)^2 = 1 both -> 1 ; t2 masked out
    # loss = 0.5 * (1 + 1) / 2 = 0.5 ; vf_clipfrac = 1/2
    loss, m = losses.value_loss(values, old, returns, loss_mask, clip=0.5)
    assert f(loss) == pytest.approx(0.5) and f(m["vf_clipfrac"]) == pytest.approx(0.5)
    # unclipped: 0.5 * (0.25 + 1) / 2 = 0.3125
    loss, _ = losses.value_loss(values, old, returns, loss_mask, clip=None)
    assert f(loss) == pytest.approx(0.3125)


def test_masked_statistics_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]], dtype=D)
    mask = lmask([3], 4)
    assert f(losses.masked_mean(x, mask)) == pytest.approx(2.0)
    assert f(losses.masked_var(x, mask)) == pytest.approx(1.0)  # unbiased: (1 + 0 + 1) / 2
    assert f(losses.masked_var(x, mask, unbiased=False)) == pytest.approx(2 / 3)
    torch.testing.assert_close(losses.masked_whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]], dtype=D))
    assert losses.masked_mean(x, lmask([0], 4)).item() == 0.0
    assert losses.masked_whiten(x, lmask([1], 4)).tolist() == [[0.0, 0.0, 0.0, 0.0]]


def test_explained_variance_by_hand():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=D)
    values = torch.tensor([[1.0, 2.0, 3.0, 3.0]], dtype=D)
    # residual [0,0,0,1]: unbiased var 0.25 ; Var(R) = 5/3 -> 1 - 0.25 / (5/3) = 0.85
    assert f(losses.explained_variance(returns, values, lmask([4], 4))) == pytest.approx(0.85)
    assert f(losses.explained_variance(torch.ones(1, 4), values, lmask([4], 4))) == 0.0  # Var(R) = 0


def test_a_registered_policy_loss_is_used_through_the_spec():
    """`AlgorithmSpec.policy_loss` names a function in `losses.POLICY_LOSSES`: a plain (unclipped) policy
    gradient registered here gives -mean(A * s) by hand, with its own metric, through `registry.policy_loss`."""
    from sapo_ray.algo import registry

    @losses.register_policy_loss("test_unclipped")
    def unclipped(log_s, adv, valid, **_):
        return -adv * torch.exp(log_s), {"positive_adv": adv > 0}

    try:
        logp = torch.tensor([[-1.0, -2.0, 0.0]], dtype=torch.float64)
        old = torch.tensor([[-1.0 - math.log(2.0), -2.0, 0.0]], dtype=torch.float64)  # ratios 2, 1 (pad)
        adv = torch.tensor([[1.0, -3.0, 9.0]], dtype=torch.float64)
        mask = torch.tensor([[1.0, 1.0, 0.0]])
        spec = registry.get_algorithm("ppo", policy_loss="test_unclipped")
        loss, metrics = registry.policy_loss(spec, logp, old, adv, mask)
        assert float(loss) == pytest.approx(-(1.0 * 2.0 + -3.0 * 1.0) / 2)  # no clip at ratio 2
        assert float(metrics["positive_adv"]) == pytest.approx(0.5)
        assert float(metrics["ppo_kl"]) == pytest.approx(-math.log(2.0) / 2)
        clipped, _ = registry.policy_loss(registry.get_algorithm("ppo"), logp, old, adv, mask)
        assert float(clipped) == pytest.approx(-(1.0 * 1.2 + -3.0 * 1.0) / 2)  # the preset clips at 1.2
    finally:
        del losses.POLICY_LOSSES["test_unclipped"]


def test_each_aggregation_counts_its_own_units_by_hand():
    """Rows of 3, 0 and 2 valid tokens; ends after tokens 0 and 2 of row 0 and token 1 of row 2: 5 tokens,
    2 non-empty rows, 3 segments. Only `segment_mean` needs the segments, and a KL term beside it is a
    token mean."""
    mask = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 1, 0]], dtype=torch.float32)
    seg = Segments.from_end_mask(torch.tensor([[1, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.bool), mask)
    expected = {"token_mean": 5, "seq_mean_token_mean": 2, "seq_mean_token_sum_norm": 2, "segment_mean": 3}
    assert {agg: int(losses.agg_units(agg, mask, seg)) for agg in losses.LOSS_AGGS} == expected
    assert [agg for agg, entry in losses.LOSS_AGGS.items() if entry.needs_segments] == ["segment_mean"]
    assert losses.LOSS_AGGS["segment_mean"].kl_agg == "token_mean"
    with pytest.raises(ValueError, match="needs segments"):
        losses.agg_units("segment_mean", mask)


# ---- the soft gate (Soft Adaptive Policy Optimization) ------------------------------------------


def _verl_sapo_loss(logp, old_logp, adv, mask, tau_pos=1.0, tau_neg=1.05):
    """verl's `compute_policy_loss_sapo` (verl/trainer/ppo/core_algos.py, loss_mode=sapo), restated from its
    definition: token ratio from the clamped log ratio, tau by the advantage's sign, the gate
    sigmoid(tau (r - 1)) 4 / tau, loss -gate A, aggregated seq-mean-token-mean."""
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    taus = torch.where(adv > 0, torch.tensor(tau_pos, dtype=adv.dtype), torch.tensor(tau_neg, dtype=adv.dtype))
    pg = -(torch.sigmoid(taus * (ratio - 1.0)) * 4.0 / taus) * adv
    m = mask.to(pg.dtype)
    per_row = (pg * m).sum(-1) / m.sum(-1).clamp(min=1)
    return per_row.sum() / (m.sum(-1) > 0).sum()


def test_soft_gate_by_hand():
    """At r = 1 the gate is 2 / tau and its gradient the plain policy gradient (4 sigmoid (1 - sigmoid) = 1);
    at r = e^2 with A = 1 (tau_pos = 1) the gate is 4 sigmoid(e^2 - 1) and its gradient weight
    4 sigmoid (1 - sigmoid) e^2, the gate part (0.007) under one half: that token counts as faded."""
    logp = torch.tensor([[0.0, 2.0]], dtype=D, requires_grad=True)
    old = torch.zeros(1, 2, dtype=D)
    adv = torch.tensor([[-2.0, 1.0]], dtype=D)
    loss, m = losses.policy_loss(logp, old, adv, torch.ones(1, 2), level="token", agg="token_mean", kind="soft_gate",
                                 tau_pos=1.0, tau_neg=1.05)
    sig = 1 / (1 + math.exp(-(math.exp(2) - 1)))
    assert f(loss.detach()) == pytest.approx((-(2 / 1.05) * -2.0 + -(4 * sig) * 1.0) / 2, abs=1e-12)
    loss.backward()
    assert logp.grad.tolist()[0] == pytest.approx([2.0 / 2, -4 * sig * (1 - sig) * math.exp(2) / 2], abs=1e-12)
    assert f(m["pg_gate_faded"]) == 0.5
    with pytest.raises(ValueError, match="tau_pos and tau_neg must be > 0"):
        losses.policy_loss(logp, old, adv, torch.ones(1, 2), level="token", kind="soft_gate", tau_pos=0.0)


def test_soft_gate_equals_verls_sapo_loss_in_value_and_gradient():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        B, T = 6, 9
        mask = lmask(torch.randint(0, T + 1, (B,), generator=gen).tolist(), T)
        old = -torch.rand(B, T, generator=gen, dtype=D) * 3
        logp = (old + torch.randn(B, T, generator=gen, dtype=D) * 0.5).requires_grad_(True)
        adv = torch.randn(B, 1, generator=gen, dtype=D).expand(B, T).clone()
        adv[0] = 0.0  # A = 0 takes tau_neg, as in verl
        tau_pos, tau_neg = 0.5 + trial / 10, 1.0 + trial / 7
        ours, _ = losses.policy_loss(logp, old, adv, mask, level="token", agg="seq_mean_token_mean", kind="soft_gate",
                                     tau_pos=tau_pos, tau_neg=tau_neg)
        (g_ours,) = torch.autograd.grad(ours, logp)
        ref = _verl_sapo_loss(logp, old, adv, mask, tau_pos, tau_neg)
        (g_ref,) = torch.autograd.grad(ref, logp)
        assert f(ours.detach()) == pytest.approx(f(ref.detach()), abs=1e-6)
        torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=1e-6)


def test_loss_trace_marks_the_tokens_whose_gradient_the_clip_or_gate_held_back():
    """The by-hand tokens above: s = 1.5 (A = 1) and s = 0.5 (A = -1) clipped, s = 1.1 not, padding never;
    s = 5 (A = -1) held by the dual clip; at the segment level each token carries its segment's mean log ratio;
    the soft gate's faded token (r = e^2, A = 1) is held, r = 1 is not."""
    mask = lmask([3], 4)
    logp = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1), 7.0]], dtype=D)
    adv = torch.tensor([[1.0, -1.0, 2.0, 5.0]], dtype=D)
    t = losses.loss_trace(logp, torch.zeros_like(logp), adv, mask, level="token", clip_low=0.2, clip_high=0.28,
                          dual_clip=3.0)
    assert t.held.tolist() == [[True, True, False, False]]
    assert t.log_ratio.tolist()[0][:3] == pytest.approx([math.log(1.5), math.log(0.5), math.log(1.1)])
    assert float(t.log_ratio[0, 3]) == 0.0
    five = torch.tensor([[math.log(5.0)]], dtype=D)
    held = losses.loss_trace(five, torch.zeros_like(five), -torch.ones(1, 1, dtype=D), lmask([1], 1), level="token").held
    assert held.tolist() == [[True]]
    seg = Segments.from_end_mask(torch.tensor([[False, True, True, False]]), mask)
    t = losses.loss_trace(logp, torch.zeros_like(logp), adv, mask, level="segment", segments=seg)
    assert t.log_ratio.tolist()[0][:3] == pytest.approx([math.log(0.75) / 2] * 2 + [math.log(1.1)])  # geometric mean
    logp = torch.tensor([[0.0, 2.0]], dtype=D)
    t = losses.loss_trace(logp, torch.zeros_like(logp), torch.tensor([[-2.0, 1.0]], dtype=D), torch.ones(1, 2),
                          level="token", kind="soft_gate", tau_pos=1.0, tau_neg=1.05)
    assert t.held.tolist() == [[False, True]]
