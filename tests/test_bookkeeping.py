"""The step's bookkeeping (`sapo_ray.bookkeeping`): grouping, DAPO filtering, trimming, batching, advantages,
TIS weights and batch metrics, on small hand-built samples with hand-computed expectations."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sapo_ray import bookkeeping
from sapo_ray.algo import registry
from sapo_ray.batch import Sample
from sapo_ray.bookkeeping import Group


def sample(prompt_index: int, length: int = 2, tag: int = 0, finished: bool = True, prompt_len: int = 3) -> Sample:
    """A sample whose response tokens are `tag*100 + t` (so rows can be told apart)."""
    return Sample(prompt_ids=list(range(1, prompt_len + 1)), response_ids=[tag * 100 + t + 1 for t in range(length)],
                  rollout_logp=[-0.5] * length, rollout_entropy=[1.0] * length, text=f"s{tag}", finished=finished,
                  prompt_index=prompt_index)


def score(s: float, acc: float = 0.0, fmt: float = 0.0) -> dict:
    return {"score": s, "acc": acc, "format": fmt}


def group(i: int, n: int, accs=None, lengths=None, scores=None) -> Group:
    accs = accs if accs is not None else [0.0] * n
    lengths = lengths if lengths is not None else [2] * n
    scores = scores if scores is not None else accs
    return Group({"id": i}, [sample(i, lengths[k], tag=10 * i + k) for k in range(n)],
                 [score(scores[k], accs[k]) for k in range(n)])


# ----------------------------------------------------------------------------------------------
# group_samples
# ----------------------------------------------------------------------------------------------


def test_group_samples_orders_by_prompt_and_keeps_arrival_order():
    """Interleaved samples become one group per prompt, in prompt order, samples/scores in arrival order."""
    examples = [{"id": 0}, {"id": 1}, {"id": 2}, {"id": 3}]
    arrival = [2, 0, 2, 1, 0, 2]  # prompt 3 has no sample
    samples = [sample(p, tag=j) for j, p in enumerate(arrival)]
    scores = [score(float(j)) for j in range(len(arrival))]
    groups = bookkeeping.group_samples(samples, scores, examples)
    assert [g.example["id"] for g in groups] == [0, 1, 2]
    assert [[s.text for s in g.samples] for g in groups] == [["s1", "s4"], ["s3"], ["s0", "s2", "s5"]]
    assert [[x["score"] for x in g.scores] for g in groups] == [[1.0, 4.0], [3.0], [0.0, 2.0, 5.0]]
    assert [len(g) for g in groups] == [2, 1, 3]


def test_group_samples_empty_and_mismatch():
    """No samples gives no groups; samples and scores of different lengths raise."""
    assert bookkeeping.group_samples([], [], [{"id": 0}]) == []
    with pytest.raises(ValueError):
        bookkeeping.group_samples([sample(0), sample(0)], [score(1.0)], [{"id": 0}])


# ----------------------------------------------------------------------------------------------
# informative_groups
# ----------------------------------------------------------------------------------------------


def test_informative_groups_filters_on_accuracy_not_score():
    """Only the group with mixed accuracies survives; a format-only score difference does not count."""
    all_right = group(0, 2, accs=[1.0, 1.0])
    all_wrong = group(1, 2, accs=[0.0, 0.0])
    mixed = group(2, 3, accs=[0.0, 1.0, 0.0])
    format_only = Group({"id": 3}, [sample(3, tag=1), sample(3, tag=2)],
                        [score(0.1, acc=0.0, fmt=1.0), score(0.0, acc=0.0, fmt=0.0)])
    kept = bookkeeping.informative_groups([all_right, all_wrong, mixed, format_only])
    assert len(kept) == 1 and kept[0] is mixed
    assert bookkeeping.informative_groups([]) == []


def test_informative_groups_keeps_order():
    """Several informative groups come back in their input order."""
    gs = [group(i, 2, accs=[float(i % 2), 1.0 - i % 2] if i != 2 else [1.0, 1.0]) for i in range(5)]
    assert bookkeeping.informative_groups(gs) == [gs[0], gs[1], gs[3], gs[4]]


# ----------------------------------------------------------------------------------------------
# trim_groups
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count,max_groups,world,expected", [
    (3, 8, 2, 2),  # 9 rows -> drop one group -> 6 rows
    (1, 8, 2, 0),  # 3 rows cannot split over 2 ranks
    (4, 4, 2, 4),  # 12 rows
    (5, 4, 2, 4),  # max_groups first
    (5, 3, 2, 2),  # max 3 -> 9 rows -> 2 groups
    (4, 8, 4, 4),  # 12 rows over 4 ranks
    (3, 8, 4, 0),  # 9, 6, 3 rows: none divisible by 4
])
def test_trim_groups_hand_cases(count, max_groups, world, expected):
    """Groups of 3 rows: hand-counted number of whole groups kept from the front."""
    groups = [group(i, 3) for i in range(count)]
    kept = bookkeeping.trim_groups(groups, max_groups, world)
    assert kept == groups[:expected]
    assert isinstance(kept, list)


def _best_prefix(sizes: list[int], max_groups: int, world: int) -> int:
    """Brute force: the longest k <= max_groups with sum(sizes[:k]) divisible by world."""
    return max(k for k in range(min(max_groups, len(sizes)) + 1) if sum(sizes[:k]) % world == 0)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 5), count=st.integers(0, 12), max_groups=st.integers(0, 14), world=st.integers(1, 4))
def test_trim_groups_property_equal_groups(n, count, max_groups, world):
    """Equal-size groups: the result is the longest whole-group prefix within max_groups whose rows split evenly."""
    groups = [group(i, n) for i in range(count)]
    kept = bookkeeping.trim_groups(groups, max_groups, world)
    assert len(kept) <= max_groups
    assert all(a is b for a, b in zip(kept, groups))  # a prefix, the same objects
    assert all(len(g) == n for g in kept)  # no group cut
    assert sum(len(g) for g in kept) % world == 0
    assert len(kept) == _best_prefix([n] * count, max_groups, world)


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(1, 5), max_size=12), max_groups=st.integers(0, 14), world=st.integers(1, 4))
def test_trim_groups_property_mixed_sizes(sizes, max_groups, world):
    """Groups of different sizes: still the longest valid prefix, no group split."""
    groups = [group(i, n) for i, n in enumerate(sizes)]
    kept = bookkeeping.trim_groups(groups, max_groups, world)
    assert all(a is b for a, b in zip(kept, groups))
    assert [len(g) for g in kept] == sizes[: len(kept)]
    assert len(kept) == _best_prefix(sizes, max_groups, world)


# ----------------------------------------------------------------------------------------------
# Draws
# ----------------------------------------------------------------------------------------------


def _draw(first_prompt: int, accs: list[list[float]]):
    """A draw's samples (2 per prompt), scores and examples: prompt k's accuracies `accs[k]`."""
    samples, scores = [], []
    for k, pair in enumerate(accs):
        for j, a in enumerate(pair):
            samples.append(sample(k, tag=10 * (first_prompt + k) + j))
            scores.append(score(a, a))
    return samples, scores, [{"id": first_prompt + k} for k in range(len(accs))]


def test_dynamic_sampling_draws_until_the_batch_is_full_and_counts_across_draws():
    """DAPO, 3 groups wanted: the first draw keeps 2 of 3 groups (one all right), the second 2 of 3 (one all
    wrong); the batch takes the first 3 kept groups, whole. Failure counts add up over the draws, the
    reward's extra means are the last draw's, and the first draw's mean score is kept."""
    draws = bookkeeping.Draws(target=3, dynamic_sampling=True)
    full = draws.add(*_draw(0, [[1, 0], [1, 1], [0, 1]]), too_long=1,
                     counts={"reward/errors": 1.0, "reward/timeouts": 0.0, "reward/samples": 6.0}, means={"reward/x": 0.25},
                     staleness=1)
    assert not full
    full = draws.add(*_draw(3, [[0, 0], [1, 0], [0, 1]]), too_long=0,
                     counts={"reward/errors": 0.0, "reward/timeouts": 2.0, "reward/samples": 6.0}, means={"reward/x": 0.75})
    assert full
    batch, m = draws.batch(rows_multiple=2, pad_id=0)
    assert [g.example["id"] for g in draws.groups] == [0, 2, 4, 5]
    assert batch.group_index.tolist() == [0, 0, 1, 1, 2, 2] and batch.response_ids[:, 0].tolist() == [1, 101, 2001, 2101, 4001, 4101]
    assert m["rollout/dropped_groups"] == 2 and m["data/prompt_too_long"] == 1 and m["rollout/trimmed_groups"] == 0
    assert (m["reward/errors"], m["reward/timeouts"], m["reward/samples"], m["reward/x"]) == (1.0, 2.0, 12.0, 0.75)
    assert m["rollout/first_draw_score_mean"] == pytest.approx(4 / 6) and m["rollout/skipped_update"] == 0
    assert m["rollout/staleness"] == 1.0  # the first draw's (the second's weights are the current ones)


def test_draws_without_a_usable_group_skip_the_update():
    """Groups of 2 rows cannot split over 4 ranks one group at a time: with 1 group wanted, nothing is left."""
    draws = bookkeeping.Draws(target=1, dynamic_sampling=False)
    assert draws.add(*_draw(0, [[1, 0]]), too_long=0, counts={}, means={})
    batch, m = draws.batch(rows_multiple=4, pad_id=0)
    assert batch is None and m["rollout/skipped_update"] == 1.0 and m["batch/rows"] == 0.0
    assert m["rollout/trimmed_groups"] == 1.0 and "rollout/first_draw_score_mean" not in m


# ----------------------------------------------------------------------------------------------
# make_batch
# ----------------------------------------------------------------------------------------------


def test_make_batch_rows_fields_and_masks():
    """Rows follow group order; group_index, scores, acc, format, finished and masks are the hand values."""
    g0 = Group({"id": 7}, [sample(7, 3, tag=1, finished=True), sample(7, 1, tag=2, finished=False)],
               [score(1.1, 1.0, 1.0), score(0.0, 0.0, 0.0)])
    g1 = Group({"id": 2}, [sample(2, 2, tag=3, finished=True, prompt_len=5)], [score(0.1, 0.0, 1.0)])
    b = bookkeeping.make_batch([g0, g1], pad_id=-1)
    assert len(b) == 3
    assert b.group_index.tolist() == [0, 0, 1]
    assert b.group_index.dtype == torch.long
    assert torch.allclose(b.scores, torch.tensor([1.1, 0.0, 0.1]))
    assert b.acc.tolist() == [1.0, 0.0, 0.0]
    assert b.format.tolist() == [1.0, 0.0, 1.0]
    assert b.finished.tolist() == [True, False, True]
    assert b.response_mask.sum(1).tolist() == [3.0, 1.0, 2.0]
    assert b.response_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert b.response_ids.tolist() == [[101, 102, 103], [201, -1, -1], [301, 302, -1]]
    assert b.prompt_mask.sum(1).tolist() == [3, 3, 5]


# ----------------------------------------------------------------------------------------------
# advantages
# ----------------------------------------------------------------------------------------------


def _batch_with_policy_data(groups: list[Group]):
    b = bookkeeping.make_batch(groups, pad_id=0)
    # The reference as the policy (GRPO's KL loss reads it in the learner; the advantages do not).
    return b.with_fields(old_logp=b.rollout_logp, entropy=b.rollout_entropy, ref_logp=b.rollout_logp)


def test_advantages_grpo_hand_values():
    """GRPO: (R - mean)/(unbiased std + 1e-6) per group on valid tokens, 0 on padding, no segments."""
    groups = [group(0, 2, lengths=[3, 1], scores=[1.0, 0.0]), group(1, 2, lengths=[2, 2], scores=[0.1, 0.1])]
    b = _batch_with_policy_data(groups)
    spec = registry.get_algorithm("grpo")
    out, metrics = bookkeeping.advantages(spec, b, bookkeeping.segments(spec, b), response_tokens=8)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)  # [1, 0]: mean 0.5, unbiased std sqrt(0.5)
    expected = torch.tensor([[a, a, a], [-a, 0, 0], [0, 0, 0], [0, 0, 0]])
    assert torch.allclose(out.advantages, expected, atol=1e-6)
    # returns: the outcome on the valid tokens
    assert torch.allclose(out.returns, torch.tensor([[1, 1, 1], [0, 0, 0], [0.1, 0.1, 0], [0.1, 0.1, 0]]))
    assert "seg_end" not in out.filled() and "value_mask" not in out.filled()
    assert metrics["critic/advantages/max"] == pytest.approx(a, abs=1e-6)
    assert metrics["critic/advantages/min"] == pytest.approx(-a, abs=1e-6)
    assert "segments/per_response" not in metrics


def test_advantages_sapo_parity_with_registry():
    """SAPO: advantages/returns/seg_end/value_mask equal the registry's own calls; metrics are present."""
    torch.manual_seed(0)
    groups = [group(0, 2, lengths=[5, 3], scores=[1.0, 0.0]), group(1, 1, lengths=[4], scores=[0.5])]
    b = bookkeeping.make_batch(groups, pad_id=0)
    shape = b.response_mask.shape
    mask = b.response_mask
    old_logp = -torch.rand(shape) * mask
    ref_logp = -torch.rand(shape) * mask
    b = b.with_fields(old_logp=old_logp, ref_logp=ref_logp, entropy=torch.rand(shape) * mask,
                    values=torch.randn(shape) * mask)
    spec = registry.get_algorithm("sapo")
    out, metrics = bookkeeping.advantages(spec, b, bookkeeping.segments(spec, b), response_tokens=8)

    seg = registry.make_segments(spec, mask, entropy=b.entropy, logprobs=old_logp)
    adv, ret = registry.compute_advantages(spec, scores=b.scores, mask=mask, values=b.values,
                                           segments=seg, group_index=b.group_index, old_logp=old_logp,
                                           ref_logp=ref_logp)
    assert torch.equal(out.advantages, adv)
    assert torch.equal(out.returns, ret)
    assert torch.equal(out.seg_end, seg.end_mask)
    assert torch.equal(out.value_mask, registry.critic_mask(spec, mask, seg).float())
    assert metrics["segments/per_response"] == pytest.approx(float(seg.num_segments.float().mean()))
    assert "critic/vf_explained_var" in metrics
    # k1 KL: mean over the 12 valid tokens of old - ref
    assert metrics["actor/reward_kl"] == pytest.approx(float((old_logp - ref_logp).sum() / 12), abs=1e-6)


def test_dapo_overlong_penalty_hand_values():
    """DAPO with max 10 tokens: buffer 2; lengths 8, 9, 10 get penalties 0, -0.5, -1."""
    spec = registry.get_algorithm("dapo", overlong_buffer_len=None)
    assert spec.overlong_buffer(10) == 2
    shaped = registry.shape_scores(spec, torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([3, 8, 9, 10]), 10)
    assert torch.allclose(shaped, torch.tensor([1.0, 1.0, 0.5, 0.0]))


def test_advantages_dapo_uses_shaped_scores():
    """DAPO through `advantages`: equal raw scores, lengths 8/9/10 of 10 -> shaped [1, .5, 0] -> GRPO [1, 0, -1]."""
    groups = [group(0, 3, lengths=[8, 9, 10], scores=[1.0, 1.0, 1.0])]
    b = _batch_with_policy_data(groups)
    spec = registry.get_algorithm("dapo")
    out, _ = bookkeeping.advantages(spec, b, bookkeeping.segments(spec, b), response_tokens=10)
    a = 0.5 / (0.5 + 1e-6)  # mean 0.5, unbiased std sqrt((.25 + 0 + .25) / 2) = 0.5
    first = out.advantages[:, 0]
    assert torch.allclose(first, torch.tensor([a, 0.0, -a]), atol=1e-6)
    assert out.advantages[0, 8:].abs().sum() == 0  # padding of the 8-token row
    assert torch.allclose(out.returns[:, 0], torch.tensor([1.0, 0.5, 0.0]))


def test_dapo_overlong_penalty_counts_an_episodes_observations():
    """An episode is cut at its whole length (`env.max_tokens`): the 9-token row with one observation token
    (8 of the model's) is shaped as a 9-token response, 0.5, as above."""
    b = _batch_with_policy_data([group(0, 3, lengths=[8, 9, 10], scores=[1.0, 1.0, 1.0])])
    b.response_mask[1, 3], b.observation_mask[1, 3] = 0.0, 1.0
    spec = registry.get_algorithm("dapo")
    out, _ = bookkeeping.advantages(spec, b, bookkeeping.segments(spec, b), response_tokens=10)
    assert torch.allclose(out.returns[:, 0], torch.tensor([1.0, 0.5, 0.0]))


def test_dr_grpos_constant_length_is_an_episodes_budget():
    """The learners' `response_tokens` (Dr.GRPO's constant): `rollout.max_new_tokens` for one turn, the
    episode's `env.max_tokens` for multi-turn episodes."""
    from sapo_ray.config import compose_config, learner_worker_config

    one = compose_config("algorithm=dr_grpo", "rollout.max_new_tokens=96")
    episodes = compose_config("algorithm=dr_grpo", "rollout.max_new_tokens=96", "env.name=tools", "env.max_tokens=400")
    assert learner_worker_config(one, "actor").response_tokens == 96
    assert learner_worker_config(episodes, "actor").response_tokens == 400


# ----------------------------------------------------------------------------------------------
# tis_weights
# ----------------------------------------------------------------------------------------------


def test_tis_weights_hand_values():
    """Ratios 0.5, 3, 1 capped at 2 -> 0.5, 2, 1 on valid tokens, 0 on padding; clipfrac 1/3."""
    b = bookkeeping.make_batch([group(0, 2, lengths=[2, 1])], pad_id=0)
    rollout = torch.tensor([[-1.0, -2.0], [-0.3, 0.0]])
    old = torch.tensor([[-1.0 + math.log(0.5), -2.0 + math.log(3.0)], [-0.3, 5.0]])  # padding differs by 5
    out, metrics = bookkeeping.tis_weights(b.with_fields(rollout_logp=rollout, old_logp=old), cap=2.0)
    assert torch.allclose(out.is_weights, torch.tensor([[0.5, 2.0], [1.0, 0.0]]))
    assert metrics["rollout/tis_clipfrac"] == pytest.approx(1 / 3)
    assert metrics["rollout/tis_weight_mean"] == pytest.approx(3.5 / 3)


# ----------------------------------------------------------------------------------------------
# batch_metrics
# ----------------------------------------------------------------------------------------------


def test_batch_metrics_hand_counts():
    """3 groups x 2 rows: 6 rows, 3 groups, mean accuracy/format/lengths/clip ratio by hand."""
    gs = [Group({"id": i}, [sample(i, 2, finished=True), sample(i, 4, finished=(i != 1))],
                [score(1.0, acc=float(i == 0), fmt=1.0), score(0.0, acc=0.0, fmt=0.0)]) for i in range(3)]
    b = bookkeeping.make_batch(gs, pad_id=0)
    b = b.with_fields(old_logp=b.rollout_logp)
    m = bookkeeping.batch_metrics(b, compare_rollout_logp=False)
    assert m["batch/rows"] == 6 and m["batch/groups"] == 3
    assert m["reward/accuracy"] == pytest.approx(1 / 6)
    assert m["reward/format"] == pytest.approx(0.5)
    assert m["response_length/mean"] == pytest.approx(3.0)
    assert m["response_length/max"] == 4 and m["response_length/min"] == 2
    assert m["response_length/clip_ratio"] == pytest.approx(1 / 6)
    assert m["critic/score/mean"] == pytest.approx(0.5)
    assert "rollout/logp_gap_max" not in m and "rollout/logp_gap_mean" not in m
    assert m["batch/groups_without_signal"] == pytest.approx(2 / 3)  # groups 1 and 2: both samples wrong


def test_batch_metrics_logp_gap_only_when_compared():
    """`rollout/logp_gap_*` appear only with compare_rollout_logp, with hand max/mean over valid tokens."""
    b = bookkeeping.make_batch([group(0, 2, lengths=[2, 1])], pad_id=0)
    rollout = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    old = torch.tensor([[-1.25, -1.5], [-0.5, 9.0]])  # |diff| 0.25, 0.5, 0 on valid; 9 on padding
    b = b.with_fields(rollout_logp=rollout, old_logp=old)
    m = bookkeeping.batch_metrics(b, compare_rollout_logp=True)
    assert m["rollout/logp_gap_max"] == pytest.approx(0.5)
    assert m["rollout/logp_gap_mean"] == pytest.approx(0.25)
    assert "rollout/logp_gap_max" not in bookkeeping.batch_metrics(b, compare_rollout_logp=False)


# ----------------------------------------------------------------------------------------------
# stability metrics
# ----------------------------------------------------------------------------------------------


def test_td_error_std_by_hand_for_token_gae():
    """PPO (gamma 1, reference = policy so no KL): row 0, score 1, values .2 .5 .7 -> deltas .3 .2 .3;
    row 1, score 0, values .1 .4 -> deltas .3 -.4; the metric is their (unbiased) standard deviation."""
    b = _batch_with_policy_data([group(0, 2, lengths=[3, 2], scores=[1.0, 0.0])])
    b = b.with_fields(ref_logp=b.old_logp, values=torch.tensor([[0.2, 0.5, 0.7], [0.1, 0.4, 0.0]]))
    spec = registry.get_algorithm("ppo")
    _, metrics = bookkeeping.advantages(spec, b, bookkeeping.segments(spec, b), response_tokens=8)
    deltas = torch.tensor([0.3, 0.2, 0.3, 0.3, -0.4])
    assert metrics["critic/td_error_std"] == pytest.approx(float(deltas.std()), abs=1e-6)


def test_stability_counts_spikes_and_latches_collapse():
    s = bookkeeping.Stability()
    norms = [1.0, 1.2, 0.9, 4.0, 1.0, 3.5, 2.9]
    out = [s.update({"actor/grad_norm": g, "response_length/mean": 40.0, "actor/entropy": 0.5}) for g in norms]
    # 4.0 > 3 x median(1, 1.2, .9) = 3; 3.5 > 3 x median(1, 1.2, .9, 4, 1) = 3; 2.9 is not.
    assert [o["actor/grad_norm_spikes"] for o in out] == [0, 0, 0, 1, 1, 2, 2]
    assert out[-1]["actor/grad_norm_std"] == pytest.approx(float(torch.tensor(norms).std(unbiased=False)))
    assert all(o["actor/collapsed"] == 0 for o in out)
    assert s.update({"response_length/mean": 21.0})["actor/collapsed"] == 0  # above half of the first 40
    assert s.update({"response_length/mean": 19.0})["actor/collapsed"] == 1
    assert s.update({"response_length/mean": 40.0})["actor/collapsed"] == 1  # once collapsed, it stays
    assert bookkeeping.Stability().update({"actor/entropy": 0.04})["actor/collapsed"] == 1


def test_stability_continues_from_its_saved_state():
    """Saved (as checkpoints do, through `asdict`) and restored, it counts as the uninterrupted one."""
    from dataclasses import asdict

    steps = [{"actor/grad_norm": g, "response_length/mean": 30.0 - i} for i, g in enumerate([1, 2, 1, 9, 1, 8])]
    whole = bookkeeping.Stability()
    expected = [whole.update(m) for m in steps]
    first = bookkeeping.Stability()
    got = [first.update(m) for m in steps[:3]]
    resumed = bookkeeping.Stability(**asdict(first))
    got += [resumed.update(m) for m in steps[3:]]
    assert got == expected


def test_memory_metrics_keep_host_and_gpu_apart():
    """Host and GPU peaks are separate numbers, each the largest over a role's actors; no GPU key on CPUs."""
    m = bookkeeping.memory_metrics({"actor": [{"host": 900.0, "gpu": 30_000.0}, {"host": 1200.0, "gpu": 20_000.0}],
                                    "rollout": [{"host": 700.0}]})
    assert m == {"perf/peak_host_mb/actor": 1200.0, "perf/peak_gpu_mb/actor": 30_000.0,
                 "perf/peak_host_mb/rollout": 700.0}


# ----------------------------------------------------------------------------------------------
# multi-turn episodes
# ----------------------------------------------------------------------------------------------


def episode(turns: int, calls: int, errors: dict, cut: bool, observed: list[int], turn_reward: float = 0.0) -> Sample:
    from sapo_ray.batch import EpisodeStats

    n = len(observed)
    return Sample([1, 2], list(range(3, 3 + n)), [-0.5] * n, [1.0] * n, "x", not cut, 0,
                  observation_mask=observed, episode=EpisodeStats(turns, calls, errors, cut, turn_reward=turn_reward))


def test_episode_metrics_by_hand():
    samples = [episode(3, 2, {"timeout": 1}, False, [0, 1, 1, 0, 1, 0], turn_reward=0.5),
               episode(1, 0, {}, False, [0, 0]),
               episode(2, 1, {"unknown_tool": 1}, True, [0, 1, 0], turn_reward=-0.2)]
    metrics = bookkeeping.episode_metrics(samples, [score(1, 1), score(0, 0), score(0, 0)])
    assert metrics == {"episode/turns": 2.0, "episode/tool_calls": 1.0, "episode/tool_errors": 2 / 3,
                       "episode/observation_tokens": 4 / 3, "episode/cut": 1 / 3, "episode/turn_reward": pytest.approx(0.1),
                       "episode/tool_errors/timeout": 1.0, "episode/tool_errors/unknown_tool": 1.0,
                       "episode/acc_with_tools": 0.5, "episode/acc_without_tools": 0.0}
    assert bookkeeping.episode_metrics([sample(0)], [score(1)]) == {}


@pytest.mark.parametrize("segmenter, options", [("entropy_topk", {}), ("fixed", {"n": 4}), ("turn", {})])
def test_no_segment_spans_an_observation(segmenter, options):
    """SAPO's segments end at each turn's last token too, whatever the segmenter: they stay inside a turn, and
    observation tokens belong to none (the `turn` segmenter: exactly the turns); one-turn rows are unchanged."""
    from dataclasses import replace

    from sapo_ray.batch import Batch

    observed = [0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 0, 0]
    batch = Batch.from_samples([episode(3, 2, {}, False, observed), sample(0, length=5)], pad_id=0)
    gen = torch.Generator().manual_seed(0)
    batch = batch.with_fields(entropy=torch.rand(batch.response_mask.shape, generator=gen),
                              old_logp=torch.zeros(batch.response_mask.shape))
    spec = replace(registry.get_algorithm("sapo"), segmenter=segmenter, segment_options=options)
    ids = bookkeeping.segments(spec, batch).seg_id[0].tolist()
    assert [ids[t] for t in (3, 4, 9)] == [-1, -1, -1]
    turns = [[0, 1, 2], [5, 6, 7, 8], [10, 11]]
    for a, b in zip(turns, turns[1:]):
        assert max(ids[t] for t in a) < min(ids[t] for t in b)  # a later turn starts a new segment
    if segmenter == "turn":
        assert [ids[t] for t in sum(turns, [])] == [0, 0, 0, 1, 1, 1, 1, 2, 2]
