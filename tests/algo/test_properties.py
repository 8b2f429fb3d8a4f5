"""Property tests (hypothesis) over random shapes, lengths, masks and entropy ties.

References here are per-row Python loops written from SAPO_SPEC.md, independent of the
vectorised library code.
"""

import math
from fractions import Fraction

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sapo_ray.algo import advantages, losses
from sapo_ray.algo.segments import Segments, segment

D = torch.float64
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FRACS = ["0.05", "0.1", "0.2", "0.25", "0.3", "0.5", "0.7", "1.0"]


@st.composite
def batches(draw, holes=False):
    B = draw(st.integers(1, 4))
    T = draw(st.integers(1, 12))
    if holes:
        rows = [draw(st.lists(st.booleans(), min_size=T, max_size=T)) for _ in range(B)]
        mask = torch.tensor(rows, dtype=torch.bool)
    else:
        lengths = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
        mask = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    # few distinct levels -> many ties
    ent = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=B * T, max_size=B * T))
    entropy = torch.tensor(ent, dtype=torch.float32).reshape(B, T)
    frac = draw(st.sampled_from(FRACS))
    seed = draw(st.integers(0, 2**16))
    return mask, entropy, frac, seed


def reference_ends(mask, entropy, frac):
    """k = max(1, ceil(frac * T_b)) highest entropies, ties to the earlier position, + the last valid."""
    B, T = mask.shape
    ends = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        pos = [t for t in range(T) if mask[b, t]]
        if not pos:
            continue
        k = min(len(pos), max(1, math.ceil(Fraction(frac) * len(pos))))
        ranked = sorted(pos, key=lambda t: (-float(entropy[b, t]), t))
        for t in ranked[:k] + [pos[-1]]:
            ends[b, t] = True
    return ends


def check_partition(seg, mask):
    B, T = mask.shape
    for b in range(B):
        ids = [int(seg.seg_id[b, t]) for t in range(T) if mask[b, t]]
        assert all(int(seg.seg_id[b, t]) == -1 for t in range(T) if not mask[b, t])
        if not ids:
            assert int(seg.num_segments[b]) == 0
            continue
        # ids start at 0 and grow by 0 or 1 along the valid tokens: contiguous segments, each token once
        assert ids[0] == 0 and all(j - i in (0, 1) for i, j in zip(ids, ids[1:]))
        assert int(seg.num_segments[b]) == ids[-1] + 1
        valid_pos = [t for t in range(T) if mask[b, t]]
        assert bool(seg.end_mask[b, valid_pos[-1]])  # last valid token is an end
        for i, t in enumerate(valid_pos):  # an end closes its segment; a start opens one
            is_end = i == len(valid_pos) - 1 or ids[i + 1] != ids[i]
            is_start = i == 0 or ids[i - 1] != ids[i]
            assert bool(seg.end_mask[b, t]) == is_end and bool(seg.start_mask[b, t]) == is_start
        assert seg.lengths[b, : ids[-1] + 1].tolist() == [ids.count(m) for m in range(ids[-1] + 1)]
    assert not (seg.end_mask & ~mask).any() and not (seg.start_mask & ~mask).any()


@SETTINGS
@given(batches())
def test_entropy_topk_equals_reference_and_partitions(batch):
    mask, entropy, frac, _ = batch
    seg = segment("entropy_topk", mask=mask, entropy=entropy, frac=float(frac))
    assert torch.equal(seg.end_mask, reference_ends(mask, entropy, frac))
    check_partition(seg, mask)


@SETTINGS
@given(batches(holes=True), st.sampled_from(["entropy_topk", "token", "sequence", "fixed"]))
def test_every_strategy_partitions_masks_with_holes(batch, strategy):
    mask, entropy, frac, _ = batch
    options = {"entropy_topk": {"entropy": entropy, "frac": float(frac)}, "fixed": {"n": 3}}.get(strategy, {})
    seg = segment(strategy, mask=mask, **options)
    check_partition(seg, mask)
    if strategy == "entropy_topk":
        assert torch.equal(seg.end_mask, reference_ends(mask, entropy, frac))


def reference_segment_gae(rewards, values, mask, ends, gamma, lam, anchor):
    """Per-row loop over segments, from SAPO_SPEC.md section 2 (unwhitened)."""
    B, T = mask.shape
    adv = torch.zeros(B, T, dtype=D)
    ret = torch.zeros(B, T, dtype=D)
    for b in range(B):
        pos = [t for t in range(T) if mask[b, t]]
        segs, cur = [], []
        for t in pos:
            cur.append(t)
            if ends[b, t]:
                segs.append(cur)
                cur = []
        r = [sum(float(rewards[b, t]) for t in s) for s in segs]
        v = [float(values[b, s[-1] if anchor == "seg_end_prev" else s[0]]) for s in segs]
        a_next = 0.0
        for m in reversed(range(len(segs))):
            v_next = v[m + 1] if m + 1 < len(segs) else 0.0
            a_next = r[m] + gamma * v_next - v[m] + gamma * lam * a_next
            for t in segs[m]:
                adv[b, t] = a_next
                ret[b, t] = a_next + v[m]
    return adv, ret


@SETTINGS
@given(
    batches(holes=True),
    st.floats(0.0, 1.0),
    st.floats(0.0, 1.0),
    st.sampled_from(["seg_end_prev", "seg_start"]),
)
def test_segment_gae_equals_reference_loop(batch, gamma, lam, anchor):
    mask, entropy, frac, seed = batch
    g = torch.Generator().manual_seed(seed)
    B, T = mask.shape
    rewards = torch.randn(B, T, generator=g, dtype=D)
    values = torch.randn(B, T, generator=g, dtype=D)
    # garbage on padding must not matter
    rewards = torch.where(mask, rewards, float("nan"))
    values = torch.where(mask, values, float("inf"))
    seg = segment("entropy_topk", mask=mask, entropy=entropy, frac=float(frac))
    adv, ret = advantages.segment_gae(rewards, values, mask, seg, gamma, lam, anchor, whiten=False, clip=None)
    exp_adv, exp_ret = reference_segment_gae(rewards, values, mask, seg.end_mask, gamma, lam, anchor)
    torch.testing.assert_close(adv, exp_adv)
    torch.testing.assert_close(ret, exp_ret)

    adv_w, ret_w = advantages.segment_gae(rewards, values, mask, seg, gamma, lam, anchor, whiten=True, clip=5.0)
    torch.testing.assert_close(ret_w, exp_ret)  # returns are taken before whitening
    a = exp_adv[mask]
    if a.numel() >= 2:
        a = ((a - a.mean()) / torch.sqrt(a.var(unbiased=True) + 1e-8)).clamp(-5, 5)
    else:
        a = torch.zeros_like(a)
    torch.testing.assert_close(adv_w[mask], a)
    assert torch.equal(adv_w[~mask], torch.zeros_like(adv_w[~mask]))


@SETTINGS
@given(batches(), st.floats(0.0, 1.0), st.floats(0.0, 1.0))
def test_token_gae_equals_segment_gae_with_token_segments(batch, gamma, lam):
    mask, _, _, seed = batch
    g = torch.Generator().manual_seed(seed)
    B, T = mask.shape
    rewards, values = torch.randn(B, T, generator=g, dtype=D), torch.randn(B, T, generator=g, dtype=D)
    seg = segment("token", mask=mask)
    for whiten in (False, True):
        a_tok, r_tok = advantages.token_gae(rewards, values, mask, gamma, lam, whiten=whiten, clip=5.0)
        a_seg, r_seg = advantages.segment_gae(rewards, values, mask, seg, gamma, lam, whiten=whiten, clip=5.0)
        torch.testing.assert_close(a_tok, a_seg)
        torch.testing.assert_close(r_tok, r_seg)
        assert torch.isfinite(a_tok).all() and torch.isfinite(r_tok).all()


def reference_segment_policy_loss(logp, old, adv, mask, ends, eps_low, eps_high, c):
    """Token-mean PPO-clip with the segment ratio exp(mean of token log-ratios), per-row loops."""
    total, n = 0.0, 0
    for b in range(mask.shape[0]):
        cur = []
        for t in range(mask.shape[1]):
            if not mask[b, t]:
                continue
            cur.append(t)
            if ends[b, t]:
                s = math.exp(sum(float(logp[b, u] - old[b, u]) for u in cur) / len(cur))
                for u in cur:
                    a = float(adv[b, u])
                    loss = max(-a * s, -a * min(max(s, 1 - eps_low), 1 + eps_high))
                    if a < 0:
                        loss = min(loss, -a * c)
                    total += loss
                    n += 1
                cur = []
    return total / max(n, 1)


@SETTINGS
@given(batches(holes=True))
def test_segment_policy_loss_equals_reference_loop_and_is_finite(batch):
    mask, entropy, frac, seed = batch
    g = torch.Generator().manual_seed(seed)
    B, T = mask.shape
    old = -torch.rand(B, T, generator=g, dtype=D) * 3
    logp = old + torch.randn(B, T, generator=g, dtype=D)
    adv = torch.randn(B, T, generator=g, dtype=D)
    seg = segment("entropy_topk", mask=mask, entropy=entropy, frac=float(frac))
    loss, metrics = losses.policy_loss(logp, old, adv, mask, level="segment", segments=seg)
    expected = reference_segment_policy_loss(logp, old, adv, mask, seg.end_mask, 0.2, 0.28, 3.0)
    assert abs(float(loss) - expected) < 1e-9
    for agg in losses.LOSS_AGGS:
        out, m = losses.policy_loss(logp, old, adv, mask, level="segment", segments=seg, agg=agg)
        assert torch.isfinite(out) and all(torch.isfinite(v) for v in m.values())
        assert 0.0 <= float(m["pg_clipfrac"]) <= 1.0 and 0.0 <= float(m["pg_clipfrac_lower"]) <= 1.0


@SETTINGS
@given(batches())
def test_segments_round_trip_through_end_mask_and_select(batch):
    mask, entropy, frac, _ = batch
    seg = segment("entropy_topk", mask=mask, entropy=entropy, frac=float(frac))
    again = Segments.from_end_mask(seg.end_mask, mask)
    assert torch.equal(again.seg_id, seg.seg_id) and torch.equal(again.start_mask, seg.start_mask)
    rows = torch.arange(mask.shape[0]).flip(0)
    sub = seg.select(rows)
    assert torch.equal(sub.seg_id, seg.seg_id[rows])
