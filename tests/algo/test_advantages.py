"""Advantages: segment GAE, token GAE, rewards and group baselines, with hand-worked numbers."""

import math

import pytest
import torch

from sapo_ray.algo import advantages
from sapo_ray.algo.segments import Segments, segment

D = torch.float64


def lmask(lengths, T):
    return torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def two_segments():
    """One row of 4 valid tokens (+1 padding), segments {0,1} and {2,3}."""
    mask = lmask([4], 5)
    seg = Segments.from_end_mask(torch.tensor([[False, True, False, False, False]]), mask)
    values = torch.tensor([[0.5, 0.2, 0.4, 0.6, 99.0]], dtype=D)
    rewards = torch.tensor([[-0.01, -0.02, 0.0, 1.0, 0.0]], dtype=D)
    return mask, seg, values, rewards


def test_segment_gae_seg_end_prev_by_hand():
    mask, seg, values, rewards = two_segments()
    adv, ret = advantages.segment_gae(rewards, values, mask, seg, gamma=1.0, lam=0.9, whiten=False, clip=None)
    # V_0 = values[e_0 = 1] = 0.2, V_1 = values[e_1 = 3] = 0.6; r_0 = -0.03, r_1 = 1.0
    # delta_1 = 1.0 + 0 - 0.6 = 0.4                ; A_1 = 0.4
    # delta_0 = -0.03 + 0.6 - 0.2 = 0.37           ; A_0 = 0.37 + 0.9 * 0.4 = 0.73
    # R_0 = 0.73 + 0.2 = 0.93 ; R_1 = 0.4 + 0.6 = 1.0
    torch.testing.assert_close(adv, torch.tensor([[0.73, 0.73, 0.4, 0.4, 0.0]], dtype=D))
    torch.testing.assert_close(ret, torch.tensor([[0.93, 0.93, 1.0, 1.0, 0.0]], dtype=D))


def test_segment_gae_seg_start_by_hand():
    mask, seg, values, rewards = two_segments()
    adv, ret = advantages.segment_gae(
        rewards, values, mask, seg, gamma=1.0, lam=0.9, value_anchor="seg_start", whiten=False, clip=None
    )
    # V_0 = values[b_0 = 0] = 0.5, V_1 = values[b_1 = 2] = 0.4
    # delta_1 = 1.0 - 0.4 = 0.6 ; A_1 = 0.6 ; delta_0 = -0.03 + 0.4 - 0.5 = -0.13 ; A_0 = -0.13 + 0.54 = 0.41
    torch.testing.assert_close(adv, torch.tensor([[0.41, 0.41, 0.6, 0.6, 0.0]], dtype=D))
    torch.testing.assert_close(ret, torch.tensor([[0.91, 0.91, 1.0, 1.0, 0.0]], dtype=D))


def test_segment_gae_discount_by_hand():
    mask, seg, values, rewards = two_segments()
    adv, ret = advantages.segment_gae(rewards, values, mask, seg, gamma=0.5, lam=0.9, whiten=False, clip=None)
    # delta_1 = 1.0 - 0.6 = 0.4 ; delta_0 = -0.03 + 0.5 * 0.6 - 0.2 = 0.07 ; A_0 = 0.07 + 0.45 * 0.4 = 0.25
    torch.testing.assert_close(adv, torch.tensor([[0.25, 0.25, 0.4, 0.4, 0.0]], dtype=D))
    torch.testing.assert_close(ret, torch.tensor([[0.45, 0.45, 1.0, 1.0, 0.0]], dtype=D))


def test_segment_gae_whitening_and_clamp_by_hand():
    mask, seg, values, rewards = two_segments()
    # unwhitened [0.73, 0.73, 0.4, 0.4]: mean 0.565, deviations +-0.165, unbiased var = 4 * 0.165^2 / 3,
    # so whitened = +-0.165 / sqrt(4 * 0.165^2 / 3) = +-sqrt(3)/2; returns are unchanged by whitening
    adv, ret = advantages.segment_gae(rewards, values, mask, seg, gamma=1.0, lam=0.9, whiten=True, clip=None)
    h = math.sqrt(3) / 2
    torch.testing.assert_close(adv, torch.tensor([[h, h, -h, -h, 0.0]], dtype=D))
    torch.testing.assert_close(ret, torch.tensor([[0.93, 0.93, 1.0, 1.0, 0.0]], dtype=D))
    adv, _ = advantages.segment_gae(rewards, values, mask, seg, gamma=1.0, lam=0.9, whiten=True, clip=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5, -0.5, -0.5, 0.0]], dtype=D))


def test_segment_gae_whitening_is_token_weighted_across_rows():
    # row 0: one segment of 3 tokens, A = 1 - 0 = 1 ; row 1: one segment of 1 token, A = 0 - 0 = 0
    # tokens [1, 1, 1, 0]: mean 0.75, unbiased var = (3 * 0.0625 + 0.5625) / 3 = 0.25
    # whitened: (1 - 0.75) / 0.5 = 0.5 and (0 - 0.75) / 0.5 = -1.5
    mask = lmask([3, 1], 3)
    seg = segment("sequence", mask=mask)
    rewards = advantages.token_rewards(torch.tensor([1.0, 0.0], dtype=D), mask)
    adv, _ = advantages.segment_gae(rewards, torch.zeros(2, 3, dtype=D), mask, seg, lam=1.0, whiten=True, clip=None)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5, 0.5], [-1.5, 0.0, 0.0]], dtype=D))


def test_segment_gae_identity_gamma_lam_one_gives_score_minus_value():
    torch.manual_seed(0)
    B, T = 4, 12
    mask = lmask([12, 7, 1, 5], T)
    seg = segment("entropy_topk", mask=mask, entropy=torch.rand(B, T), frac=0.3)
    scores = torch.tensor([1.0, 0.0, 0.3, -2.0], dtype=D)
    values = torch.randn(B, T, dtype=D)
    rewards = advantages.token_rewards(scores, mask)
    adv, ret = advantages.segment_gae(rewards, values, mask, seg, gamma=1.0, lam=1.0, whiten=False, clip=None)
    expected = torch.zeros(B, T, dtype=D)
    for b in range(B):
        n = int(mask[b].sum())
        for t in range(n):
            e = next(u for u in range(t, n) if seg.end_mask[b, u])  # end of t's segment
            expected[b, t] = scores[b] - values[b, e]  # A_m = score - V_m with V_m = values[e_m]
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(ret, torch.where(mask, scores.unsqueeze(1), 0.0))


def test_segment_gae_with_frac_one_equals_token_gae():
    torch.manual_seed(1)
    B, T = 5, 9
    mask = lmask([9, 4, 1, 0, 6], T)
    seg = segment("entropy_topk", mask=mask, entropy=torch.rand(B, T), frac=1.0)
    rewards = torch.randn(B, T, dtype=D)
    values = torch.randn(B, T, dtype=D)
    for whiten in (False, True):
        a_seg, r_seg = advantages.segment_gae(rewards, values, mask, seg, gamma=0.9, lam=0.8, whiten=whiten, clip=None)
        a_tok, r_tok = advantages.token_gae(rewards, values, mask, gamma=0.9, lam=0.8, whiten=whiten, clip=None)
        torch.testing.assert_close(a_seg, a_tok)
        torch.testing.assert_close(r_seg, r_tok)


def textbook_gae(rewards, values, mask, gamma, lam):
    """Per-row, per-token loop: the definition, independent of the library."""
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=rewards.dtype)
    for b in range(B):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            v_next = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * v_next - float(values[b, t])
            last = delta + gamma * lam * last
            adv[b, t] = last
    return adv, torch.where(mask, adv + values, 0.0)


def test_token_gae_by_hand_and_against_textbook_loop():
    mask = lmask([3], 4)
    values = torch.tensor([[0.5, 0.2, 0.4, 7.0]], dtype=D)
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=D)
    adv, ret = advantages.token_gae(rewards, values, mask, gamma=1.0, lam=0.5, whiten=False)
    # delta_2 = 1 - 0.4 = 0.6, A_2 = 0.6 ; delta_1 = 0.4 - 0.2 = 0.2, A_1 = 0.2 + 0.5 * 0.6 = 0.5
    # delta_0 = 0.2 - 0.5 = -0.3, A_0 = -0.3 + 0.5 * 0.5 = -0.05 ; R = A + V = [0.45, 0.7, 1.0]
    torch.testing.assert_close(adv, torch.tensor([[-0.05, 0.5, 0.6, 0.0]], dtype=D))
    torch.testing.assert_close(ret, torch.tensor([[0.45, 0.7, 1.0, 0.0]], dtype=D))

    torch.manual_seed(2)
    B, T = 6, 150  # > 32 positions: the blockwise scan crosses block boundaries
    mask = lmask([150, 149, 32, 33, 1, 0], T)
    rewards, values = torch.randn(B, T, dtype=D), torch.randn(B, T, dtype=D)
    adv, ret = advantages.token_gae(rewards, values, mask, gamma=0.99, lam=0.95, whiten=False)
    exp_adv, exp_ret = textbook_gae(rewards, values, mask, 0.99, 0.95)
    torch.testing.assert_close(adv, exp_adv)
    torch.testing.assert_close(ret, exp_ret)


def two_turns():
    """A two-turn episode: the model's tokens 0-1, an observation at 2-3 (its values must not count), the
    model's tokens 4-5, padding at 6."""
    mask = torch.tensor([[True, True, False, False, True, True, False]])
    observation = torch.tensor([[0, 0, 1, 1, 0, 0, 0]])
    values = torch.tensor([[0.5, 0.2, 9.0, 9.0, 0.4, 0.6, 99.0]], dtype=D)
    rewards = torch.tensor([[-0.01, -0.02, 0.0, 0.0, 0.0, 1.0, 0.0]], dtype=D)
    return mask, observation, values, rewards


def test_token_gae_skips_an_observation_by_hand():
    mask, _, values, rewards = two_turns()
    adv, ret = advantages.token_gae(rewards, values, mask, gamma=1.0, lam=0.9, whiten=False)
    # t=5: 1.0 - 0.6 = 0.4 ; t=4: 0.6 - 0.4 = 0.2, A = 0.2 + 0.9 * 0.4 = 0.56
    # t=1: -0.02 + V_4 0.4 - 0.2 = 0.18, A = 0.18 + 0.9 * 0.56 = 0.684 ; t=0: -0.01 + 0.2 - 0.5 + 0.9 * 0.684 = 0.3056
    torch.testing.assert_close(adv, torch.tensor([[0.3056, 0.684, 0, 0, 0.56, 0.4, 0]], dtype=D))
    torch.testing.assert_close(ret, torch.tensor([[0.8056, 0.884, 0, 0, 0.96, 1.0, 0]], dtype=D))


@pytest.mark.parametrize("anchor, expected", [("seg_end_prev", [0.73, 0.73, 0, 0, 0.4, 0.4, 0]),
                                              ("seg_start", [0.41, 0.41, 0, 0, 0.6, 0.6, 0])])
def test_turn_segments_by_hand(anchor, expected):
    """The `turn` segmenter: segments {0, 1} and {4, 5}. seg_end_prev: V = values[1] 0.2 and values[5] 0.6,
    r = -0.03 and 1.0: A_1 = 0.4, A_0 = -0.03 + 0.6 - 0.2 + 0.9 * 0.4 = 0.73. seg_start: V = values[0] 0.5 and
    values[4] 0.4: A_1 = 0.6, A_0 = -0.03 + 0.4 - 0.5 + 0.9 * 0.6 = 0.41."""
    mask, observation, values, rewards = two_turns()
    seg = segment("turn", mask=mask, observation_mask=observation)
    assert seg.seg_id.tolist() == [[0, 0, -1, -1, 1, 1, -1]]
    adv, _ = advantages.segment_gae(rewards, values, mask, seg, gamma=1.0, lam=0.9, value_anchor=anchor,
                                    whiten=False, clip=None)
    torch.testing.assert_close(adv, torch.tensor([expected], dtype=D))


def test_a_turn_reward_is_credited_to_its_turn_by_hand():
    """An environment's reward of 0.5 for the first turn (at its last token, 1) beside the score 1.0: SAPO's turn
    segments get r = 0.5 and 1.0, so with V = values[1] 0.2 and values[5] 0.6 (gamma 1, lambda 0.9):
    A_2 = 1.0 - 0.6 = 0.4, A_1 = 0.5 + 0.6 - 0.2 + 0.9 * 0.4 = 1.26 (0.36 more than without it). A group of two
    episodes alike but for that reward: outcomes 1.5 and 1.0, GRPO's +-0.25 / 0.3536 = +-0.7071."""
    from sapo_ray.algo import registry

    mask, observation, values, _ = two_turns()
    turn = torch.tensor([[0.0, 0.5, 0, 0, 0, 0, 0]], dtype=D)
    seg = segment("turn", mask=mask, observation_mask=observation)
    sapo = registry.get_algorithm("sapo", gamma=1.0, lam=0.9, whiten=False, adv_clip=None, value_anchor="seg_end_prev",
                                  kl_coef=0.0)
    adv, ret = registry.compute_advantages(sapo, scores=torch.tensor([1.0], dtype=D), mask=mask, values=values,
                                           segments=seg, turn_rewards=turn)
    torch.testing.assert_close(adv, torch.tensor([[1.26, 1.26, 0, 0, 0.4, 0.4, 0]], dtype=D))
    torch.testing.assert_close(ret[0, [1, 5]], torch.tensor([1.46, 1.0], dtype=D))
    grpo = registry.get_algorithm("grpo", kl_coef=0.0)
    both = lambda x: x.repeat(2, 1)
    adv, _ = registry.compute_advantages(grpo, scores=torch.tensor([1.0, 1.0], dtype=D), mask=both(mask),
                                         group_index=[0, 0], turn_rewards=torch.cat([turn, torch.zeros_like(turn)]))
    torch.testing.assert_close(adv[:, 0], torch.tensor([0.7071, -0.7071], dtype=D), atol=1e-4, rtol=0)


@pytest.mark.parametrize("M", [1, 5, 32, 33, 64, 200, 1100, 4200])  # 1, 2 and 3 levels of blocks
@pytest.mark.parametrize("c", [0.0, 0.3, 0.95, 1.0])
def test_discounted_reverse_cumsum_matches_loop(M, c):
    torch.manual_seed(M)
    x = torch.randn(2, M, dtype=D)
    out = advantages.discounted_reverse_cumsum(x, c)
    expected = torch.zeros_like(x)
    acc = torch.zeros(2, dtype=D)
    for m in reversed(range(M)):
        acc = x[:, m] + c * acc
        expected[:, m] = acc
    torch.testing.assert_close(out, expected)


def test_all_padding_rows_give_zeros_not_nan():
    mask = lmask([0, 0], 4)
    nan = torch.full((2, 4), float("nan"))  # garbage on padding must never be read
    seg = segment("entropy_topk", mask=mask, entropy=torch.rand(2, 4), frac=0.3)
    for whiten in (True, False):
        adv, ret = advantages.segment_gae(nan, nan, mask, seg, whiten=whiten)
        assert torch.equal(adv, torch.zeros(2, 4)) and torch.equal(ret, torch.zeros(2, 4))
        adv, ret = advantages.token_gae(nan, nan, mask, whiten=whiten)
        assert torch.equal(adv, torch.zeros(2, 4)) and torch.equal(ret, torch.zeros(2, 4))
    # a single valid token in the batch: whitening has no variance -> 0, not NaN
    mask1 = lmask([1, 0], 4)
    seg1 = segment("token", mask=mask1)
    adv, _ = advantages.segment_gae(torch.ones(2, 4), torch.zeros(2, 4), mask1, seg1)
    assert torch.equal(adv, torch.zeros(2, 4))


def test_token_rewards_by_hand():
    mask = lmask([3, 0], 4)
    old = torch.tensor([[-1.0, -2.0, -3.0, 5.0], [0.0] * 4])
    ref = torch.tensor([[-1.5, -2.0, -2.5, 0.0], [0.0] * 4])
    # k1: kl = old - ref = [0.5, 0, -0.5]; r = -0.1 * kl + score at the last token (t=2)
    r = advantages.token_rewards(torch.tensor([2.0, 1.0]), mask, old, ref, kl_coef=0.1, kl_kind="k1")
    torch.testing.assert_close(r, torch.tensor([[-0.05, 0.0, 2.05, 0.0], [0.0] * 4]))
    r = advantages.token_rewards(torch.tensor([2.0, 1.0]), mask)
    assert r.tolist() == [[0.0, 0.0, 2.0, 0.0], [0.0] * 4]
    with pytest.raises(ValueError, match="old_logp"):
        advantages.token_rewards(torch.tensor([2.0, 1.0]), mask, kl_coef=0.1)


def test_anchor_mask():
    mask, seg, _, _ = two_segments()
    assert advantages.anchor_mask(seg, "seg_end_prev").tolist() == [[False, True, False, True, False]]
    assert advantages.anchor_mask(seg, "seg_start").tolist() == [[True, False, True, False, False]]
    with pytest.raises(ValueError, match="value_anchor"):
        advantages.anchor_mask(seg, "middle")


# ---- group baselines -------------------------------------------------------------------------

SCORES = torch.tensor([1.0, 2.0, 0.0, 4.0, 0.0], dtype=D)
GROUPS = ["a", "b", "a", "b", "a"]  # a: [1, 0, 0], b: [2, 4]


def test_grpo_by_hand():
    mask = lmask([2, 1, 3, 2, 1], 3)
    adv = advantages.group_advantage(SCORES, GROUPS, mask, kind="grpo")
    # a: mean 1/3, unbiased std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3) = 0.57735
    #    -> (2/3) / (0.57735 + 1e-6) = 1.154699, (-1/3) / (0.57735 + 1e-6) = -0.577349
    # b: mean 3, std sqrt(2) -> -1 / (1.414214 + 1e-6) = -0.707106, +0.707106
    per_sample = torch.tensor([1.154699, -0.707106, -0.577349, 0.707106, -0.577349], dtype=D)
    torch.testing.assert_close(adv, torch.where(mask, per_sample.unsqueeze(1), 0.0), atol=2e-6, rtol=0)


def test_dr_grpo_and_rloo_by_hand():
    mask = lmask([2, 1, 3, 2, 1], 3)
    adv = advantages.group_advantage(SCORES, GROUPS, mask, kind="dr_grpo")
    # a: R - 1/3 ; b: R - 3
    exp = torch.tensor([2 / 3, -1.0, -1 / 3, 1.0, -1 / 3], dtype=D)
    torch.testing.assert_close(adv, torch.where(mask, exp.unsqueeze(1), 0.0))
    adv = advantages.group_advantage(SCORES, GROUPS, mask, kind="rloo")
    # a: 1 - (0+0)/2 = 1, 0 - (1+0)/2 = -0.5 (twice) ; b: 2 - 4 = -2, 4 - 2 = 2
    exp = torch.tensor([1.0, -2.0, -0.5, 2.0, -0.5], dtype=D)
    torch.testing.assert_close(adv, torch.where(mask, exp.unsqueeze(1), 0.0))


def test_group_index_as_tensor_and_singleton_groups_raise():
    mask = lmask([1, 1, 1, 1], 1)
    adv = advantages.group_advantage(torch.tensor([1.0, 3.0, 5.0, 5.0]), torch.tensor([7, 7, 2, 2]), mask, "dr_grpo")
    assert adv.flatten().tolist() == [-1.0, 1.0, 0.0, 0.0]  # all-equal group -> 0 advantage
    with pytest.raises(ValueError, match="needs >= 2 samples per prompt"):
        advantages.group_advantage(torch.tensor([1.0, 0.0, 1.0]), [0, 0, 1], lmask([1, 1, 1], 1), "grpo")
    with pytest.raises(ValueError, match="kind"):
        advantages.group_advantage(SCORES, GROUPS, lmask([1] * 5, 1), "ppo")


@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
def test_a_group_of_equal_scores_gets_exactly_zero(kind):
    """Eight scores of 0.9 and eight of 0.1 + 0.2 in float32: their group sums divided by 8 do not round back
    to the score (a residue of 6e-8 and 3e-8), which GRPO's division by a std of the same size inflated to
    0.056 and 0.029 (as verl still does). Equal scores carry no signal: exactly 0, while the mixed group
    beside them keeps its advantages."""
    scores = torch.tensor([0.9] * 8 + [0.1 + 0.2] * 8 + [1.0, 0.0], dtype=torch.float32)
    group = torch.tensor([0] * 8 + [1] * 8 + [2, 2])
    first = scores[:8] - torch.zeros(1).index_add_(0, torch.zeros(8, dtype=torch.long), scores[:8]) / 8
    assert float(first.abs().max()) > 0  # the residue the fix removes
    adv = advantages.group_advantage(scores, group, torch.ones(18, 3), kind=kind)
    assert adv[:16].abs().max() == 0
    expected = {"grpo": 0.5 / (math.sqrt(0.5) + 1e-6), "dr_grpo": 0.5, "rloo": 1.0}[kind]
    assert adv[16:, 0].tolist() == pytest.approx([expected, -expected], abs=1e-6)
