"""The algorithm table (SAPO_SPEC.md section 6) and the trainer-facing entry points."""

import pytest
import torch

from sapo_ray.algo import advantages, losses, registry
from sapo_ray.algo.registry import ALGORITHMS, AlgorithmSpec
from sapo_ray.algo.segments import SEGMENTERS, segment

D = torch.float64


def lmask(lengths, T):
    return torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def test_table_matches_the_spec():
    assert set(ALGORITHMS) == {"sapo", "ppo", "vc_ppo", "grpo", "dr_grpo", "rloo", "gspo", "dapo", "soft_sapo"}
    sapo = ALGORITHMS["sapo"]
    assert (sapo.advantage, sapo.ratio_level, sapo.loss_agg) == ("segment_gae", "segment", "token_mean")
    assert (sapo.clip_low, sapo.clip_high, sapo.dual_clip) == (0.2, 0.28, 3.0)
    assert (sapo.gamma, sapo.lam, sapo.frac) == (1.0, 0.99, 0.3)
    assert (sapo.segmenter, sapo.value_anchor) == ("entropy_topk", "seg_end_prev")
    assert (sapo.kl_in_reward, sapo.kl_coef, sapo.kl_kind, sapo.kl_loss) == (True, 0.001, "k1", False)
    assert sapo.needs_critic and not sapo.needs_group and sapo.whiten and sapo.adv_clip == 5.0
    ppo = ALGORITHMS["ppo"]
    assert (ppo.advantage, ppo.ratio_level, ppo.lam, ppo.needs_critic) == ("token_gae", "token", 0.95, True)
    vc = ALGORITHMS["vc_ppo"]
    assert (vc.advantage, vc.lam, vc.lam_critic, vc.needs_critic) == ("token_gae", 0.99, 1.0, True)
    grpo = ALGORITHMS["grpo"]
    assert (grpo.advantage, grpo.group_kind, grpo.ratio_level, grpo.needs_group) == ("group", "grpo", "token", True)
    assert grpo.kl_loss and grpo.kl_loss_kind == "k3" and not grpo.needs_critic
    dr = ALGORITHMS["dr_grpo"]
    assert (dr.group_kind, dr.loss_agg) == ("dr_grpo", "seq_mean_token_sum_norm")
    assert ALGORITHMS["rloo"].group_kind == "rloo"
    gspo = ALGORITHMS["gspo"]
    assert (gspo.ratio_level, gspo.clip_low, gspo.clip_high, gspo.dual_clip) == ("sequence", 3e-4, 4e-4, None)
    dapo = ALGORITHMS["dapo"]
    assert (dapo.clip_low, dapo.clip_high, dapo.loss_agg, dapo.ratio_level) == (0.2, 0.28, "token_mean", "token")
    assert dapo.dynamic_sampling and dapo.overlong_penalty and dapo.group_kind == "grpo"
    soft = ALGORITHMS["soft_sapo"]  # GRPO's advantages and KL loss, the soft gate, verl's aggregation
    assert (soft.policy_loss, soft.tau_pos, soft.tau_neg, soft.loss_agg) == ("soft_gate", 1.0, 1.05, "seq_mean_token_mean")
    assert (soft.advantage, soft.group_kind, soft.ratio_level, soft.kl_loss) == ("group", "grpo", "token", True)
    for spec in ALGORITHMS.values():
        assert spec.advantage in registry.ADVANTAGES and spec.loss_agg in losses.LOSS_AGGS
        assert spec.ratio_level in losses.RATIO_LEVELS and spec.segmenter in SEGMENTERS
        assert spec.needs_group == (spec.advantage == "group")
        assert spec.needs_critic == (spec.advantage != "group")


def test_get_algorithm_overrides_and_errors():
    spec = registry.get_algorithm("sapo", frac=0.2, value_anchor="seg_start")
    assert spec.frac == 0.2 and spec.value_anchor == "seg_start" and ALGORITHMS["sapo"].frac == 0.3
    with pytest.raises(ValueError, match="unknown algorithm 'sappo'"):
        registry.get_algorithm("sappo")
    with pytest.raises(ValueError, match="topk_percent"):
        registry.get_algorithm("sapo", topk_percent=30)


def test_sapo_pipeline_matches_direct_calls():
    torch.manual_seed(0)
    B, T = 3, 10
    mask = lmask([10, 6, 0], T)
    entropy, values = torch.rand(B, T), torch.randn(B, T, dtype=D)
    old, ref = -torch.rand(B, T, dtype=D), -torch.rand(B, T, dtype=D)
    scores = torch.tensor([1.0, 0.0, 1.0], dtype=D)
    spec = ALGORITHMS["sapo"]
    seg = registry.make_segments(spec, mask, entropy=entropy, logprobs=old)  # extra inputs are ignored
    assert torch.equal(seg.end_mask, segment("entropy_topk", mask=mask, entropy=entropy, frac=0.3).end_mask)
    adv, ret = registry.compute_advantages(spec, scores=scores, mask=mask, values=values, segments=seg,
                                           old_logp=old, ref_logp=ref)
    rewards = advantages.token_rewards(scores, mask, old, ref, kl_coef=0.001, kl_kind="k1")
    exp_adv, exp_ret = advantages.segment_gae(rewards, values, mask, seg, gamma=1.0, lam=0.99)
    torch.testing.assert_close(adv, exp_adv)
    torch.testing.assert_close(ret, exp_ret)
    assert torch.equal(registry.critic_mask(spec, mask, seg), seg.end_mask)
    loss, _ = registry.policy_loss(spec, old + 0.1, old, adv, mask, segments=seg)
    exp_loss, _ = losses.policy_loss(old + 0.1, old, adv, mask, level="segment", segments=seg,
                                     clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    assert float(loss) == float(exp_loss)
    with pytest.raises(ValueError, match="values"):
        registry.compute_advantages(spec, scores=scores, mask=mask, segments=seg, old_logp=old, ref_logp=ref)
    with pytest.raises(ValueError, match="entropy="):
        registry.make_segments(spec, mask, entropy=None)
    low = registry.make_segments(spec.replace(segmenter="low_prob", segment_options={"rho": 0.5}), mask,
                                 entropy=entropy, logprobs=torch.log(torch.full((B, T), 0.4)))
    assert torch.equal(low.end_mask, mask)  # every sampled prob 0.4 < rho = 0.5


def test_vc_ppo_critic_returns_use_lam_critic():
    mask = lmask([3], 3)
    values = torch.tensor([[0.5, 0.2, 0.4]], dtype=D)
    spec = ALGORITHMS["vc_ppo"].replace(kl_in_reward=False)
    adv, ret = registry.compute_advantages(spec, scores=torch.tensor([1.0], dtype=D), mask=mask, values=values)
    # lam_critic = 1, gamma = 1: the return is the Monte-Carlo reward-to-go = score on every token
    torch.testing.assert_close(ret, torch.ones(1, 3, dtype=D))
    # the actor's advantages use lam = 0.99 (then whitening and the clamp)
    a, _ = advantages.token_gae(advantages.token_rewards(torch.tensor([1.0], dtype=D), mask), values, mask,
                                lam=0.99, whiten=True, clip=5.0)
    torch.testing.assert_close(adv, a)
    assert ALGORITHMS["ppo"].replace(kl_in_reward=False).lam_critic is None
    assert torch.equal(registry.critic_mask(spec, mask), mask)


def test_group_algorithms_through_the_single_entry_point():
    mask = lmask([2, 2, 1, 2], 2)
    scores = torch.tensor([1.0, 0.0, 3.0, 1.0], dtype=D)
    groups = [0, 0, 1, 1]
    exp = {"grpo": [0.707106, -0.707106, 0.707106, -0.707106],  # (R - mean) / (std + 1e-6), std = sqrt(0.5), sqrt(2)
           "dr_grpo": [0.5, -0.5, 1.0, -1.0], "rloo": [1.0, -1.0, 2.0, -2.0]}
    for name, kind in [("grpo", "grpo"), ("dr_grpo", "dr_grpo"), ("rloo", "rloo"), ("gspo", "grpo"), ("dapo", "grpo")]:
        spec = ALGORITHMS[name]
        assert registry.make_segments(spec, mask) is None
        adv, ret = registry.compute_advantages(spec, scores=scores, mask=mask, group_index=groups)
        want = torch.tensor(exp[kind], dtype=D).unsqueeze(1)
        torch.testing.assert_close(adv, torch.where(mask, want, 0.0), atol=2e-6, rtol=0)
        torch.testing.assert_close(ret, torch.where(mask, scores.unsqueeze(1), 0.0))
    with pytest.raises(ValueError, match="group_index"):
        registry.compute_advantages(ALGORITHMS["grpo"], scores=scores, mask=mask)


def test_kl_loss_switch():
    logp, ref, mask = torch.tensor([[-1.0]]), torch.tensor([[-1.5]]), lmask([1], 1)
    # grpo: 0.001 * k3(d = 0.5) = 0.001 * (e^-0.5 - 0.5) = 0.000106531
    assert registry.kl_loss(ALGORITHMS["grpo"], logp, ref, mask).item() == pytest.approx(1.0653065971263342e-4)
    assert registry.kl_loss(ALGORITHMS["sapo"], logp, ref, mask).item() == 0.0


def test_overlong_penalty_by_hand():
    # max_len 10, buffer 4: free up to 6 tokens, then -1/4 per token, -1 at 10
    pen = registry.overlong_penalty(torch.tensor([5, 6, 8, 10]), max_len=10, buffer_len=4, penalty=1.0)
    assert pen.tolist() == [0.0, 0.0, -0.5, -1.0]
    pen = registry.overlong_penalty(torch.tensor([9]), max_len=10, buffer_len=4, penalty=0.5)
    assert pen.tolist() == [-0.375]
    with pytest.raises(ValueError, match="buffer_len"):
        registry.overlong_penalty(torch.tensor([1]), max_len=4, buffer_len=8)
    dapo = ALGORITHMS["dapo"].replace(overlong_buffer_len=4)
    shaped = registry.shape_scores(dapo, torch.tensor([1.0, 1.0]), torch.tensor([6, 8]), max_response_len=10)
    assert shaped.tolist() == [1.0, 0.5]
    assert registry.shape_scores(ALGORITHMS["sapo"], torch.tensor([1.0]), None, None).tolist() == [1.0]
    with pytest.raises(ValueError, match="max_response_len"):
        registry.shape_scores(dapo, torch.tensor([1.0]))


def test_dynamic_sampling_drops_all_equal_groups():
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.5, 0.5])
    labels = ["p", "p", "q", "q", "r", "r", "s", "s"]
    # p all 1, q mixed, r all 0, s all 0.5: only q is kept; per group, in order of first appearance
    assert registry.dynamic_sampling_groups(scores, labels).tolist() == [False, True, False, False]
    # tensor ids: per group in sorted id order -> id 1 (mixed), id 3 (all 1)
    ids = torch.tensor([3, 3, 1, 1])
    assert registry.dynamic_sampling_groups(scores[:4], ids).tolist() == [True, False]


def test_new_algorithm_and_estimator_are_registrations():
    @registry.register_advantage("zero_test")
    def _zero(spec, *, rewards, mask, **_):
        return torch.zeros_like(rewards), rewards

    spec = AlgorithmSpec(name="zero_test_algo", advantage="zero_test", ratio_level="token", loss_agg="token_mean",
                         needs_critic=False, needs_group=False)
    registry.register_algorithm(spec)
    try:
        adv, ret = registry.compute_advantages(registry.get_algorithm("zero_test_algo"),
                                               scores=torch.tensor([2.0]), mask=lmask([2], 2))
        assert adv.tolist() == [[0.0, 0.0]] and ret.tolist() == [[0.0, 2.0]]
        with pytest.raises(ValueError, match="already registered"):
            registry.register_advantage("zero_test")(lambda spec, **_: None)
    finally:
        del registry.ALGORITHMS["zero_test_algo"], registry.ADVANTAGES["zero_test"]
