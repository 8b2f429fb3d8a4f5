"""The typed batch (fields filled by phases, rows kept aligned), micro-batches by token budget
(`sapo_ray.batch.pack_by_tokens`) and the padding they leave, and rank outputs put back together."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sapo_ray.batch import Batch, LogProbs, MissingField, Sample, pack_by_tokens
from sapo_ray.learner.group import concat_rows


def cost(rows, prompts, responses):
    return len(rows) * (max(prompts[i] for i in rows) + max(responses[i] for i in rows))


def test_packs_longest_first_within_the_budget_by_hand():
    # Longest response first: 1 (60), 3 (50), 2 (40), 5 (30), 0 (20), 4 (10).
    prompts = [10, 50, 20, 50, 10, 25]
    responses = [20, 60, 40, 50, 10, 30]
    # Budget 220: [1, 3] costs 2 x (50 + 60) = 220; adding 2 would be 3 x 110. [2, 5] costs 2 x (25 + 40) = 130,
    # with 0: 3 x 65 = 195, with 4: 4 x 65 = 260 > 220, so 4 starts the last micro-batch.
    assert pack_by_tokens(prompts, responses, 220) == [[1, 3], [2, 5, 0], [4]]
    # Exactly 4: the largest micro-batch ([2, 5, 0]) is halved; exactly 5: then [1, 3] (the first of the largest).
    assert pack_by_tokens(prompts, responses, 220, count=4) == [[1, 3], [2], [5, 0], [4]]
    assert pack_by_tokens(prompts, responses, 220, count=5) == [[1], [3], [2], [5, 0], [4]]
    with pytest.raises(ValueError, match="cannot split 6 rows into 2"):
        pack_by_tokens(prompts, responses, 220, count=2)
    assert pack_by_tokens(prompts, responses, 50) == [[1], [3], [2], [5], [0], [4]]  # rows over budget: alone


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300)), min_size=1, max_size=40),
       st.integers(1, 4000), st.integers(0, 40))
def test_every_row_once_within_budget_and_count(rows, budget, extra):
    prompts, responses = [p for p, _ in rows], [r for _, r in rows]
    groups = pack_by_tokens(prompts, responses, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(rows)))
    assert all(len(g) == 1 or cost(g, prompts, responses) <= budget for g in groups)
    count = min(len(groups) + extra, len(rows))
    split = pack_by_tokens(prompts, responses, budget, count=count)
    assert len(split) == count and all(split)
    assert sorted(i for g in split for i in g) == list(range(len(rows)))
    assert all(len(g) == 1 or cost(g, prompts, responses) <= budget for g in split)


def test_sorting_leaves_little_padding():
    """Templated prompts (50-60 tokens) and responses of 5-96 tokens: 4 rows per micro-batch in arrival
    order compute 19% padding; packed into the same padded size per micro-batch, 5%."""
    import random

    rng = random.Random(0)
    prompts = [rng.randint(50, 60) for _ in range(64)]
    responses = [rng.randint(5, 96) for _ in range(64)]
    real = sum(prompts) + sum(responses)
    fixed = sum(cost(list(range(s, s + 4)), prompts, responses) for s in range(0, 64, 4))
    packed = sum(cost(g, prompts, responses) for g in pack_by_tokens(prompts, responses, 4 * (60 + 96)))
    assert 1 - real / fixed > 0.15
    assert 1 - real / packed < 0.07


def test_rows_of_one_prompt_are_packed_together_when_they_fit():
    # Prompt keys 0: rows 0, 2, 4; 1: rows 1, 3, 5. Budget 3 x (10 + 50) = 180 fits a whole prompt's rows.
    prompts = [10] * 6
    responses = [10, 50, 40, 20, 30, 5]
    # Unit 0 (longest response 40) then unit 1 (50): unit 1 first; each alone fills the budget.
    assert pack_by_tokens(prompts, responses, 180, together=[0, 1, 0, 1, 0, 1]) == [[1, 3, 5], [2, 4, 0]]
    # Budget 120 = 2 x 60: unit 1 is cut into [1, 3] and [5], unit 0 into [2, 4] and [0]; pieces go longest
    # response first, and the two short ones ([0], then [5]) share the last micro-batch.
    assert pack_by_tokens(prompts, responses, 120, together=[0, 1, 0, 1, 0, 1]) == [[1, 3], [2, 4], [0, 5]]
    # Without `together` rows go by length alone and the prompts mix.
    assert pack_by_tokens(prompts, responses, 180) == [[1, 2, 4], [3, 0, 5]]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300), st.integers(0, 5)), min_size=1, max_size=40),
       st.integers(1, 4000))
def test_packing_prompts_together_keeps_every_row_once_within_budget(rows, budget):
    prompts, responses, keys = [p for p, _, _ in rows], [r for _, r, _ in rows], [k for _, _, k in rows]
    groups = pack_by_tokens(prompts, responses, budget, together=keys)
    assert sorted(i for g in groups for i in g) == list(range(len(rows)))
    assert all(len(g) == 1 or cost(g, prompts, responses) <= budget for g in groups)
    for key in set(keys):  # a prompt whose rows fit the budget lands in one micro-batch
        unit = [i for i in range(len(rows)) if keys[i] == key]
        if cost(unit, prompts, responses) <= budget:
            assert any(set(unit) <= set(g) for g in groups)


def test_distinct_prompts_compare_tokens_and_images():
    """Rows share a prompt when their tokens and images are equal, whatever their padding or tensor identity."""
    import torch

    from sapo_ray.batch import Batch, Sample, Vision

    img, grid = torch.ones(4, 3), torch.tensor([[1, 2, 2]])

    def sample(ids, pixels=None, grids=None, **video):
        vision = Vision(pixels, grids, **video) if pixels is not None else None
        return Sample(ids, [7], [0.0], [0.0], "", True, 0, vision)

    clip = dict(pixel_values_videos=img, video_grid_thw=grid)
    batch = Batch.from_samples([
        sample([1, 2, 3]), sample([5, 2, 3]), sample([1, 2, 3]),         # 0 and 2 share; 1 differs by a token
        sample([9, 9], img, grid), sample([9, 9], img.clone(), grid),    # equal images in different tensors
        sample([9, 9], img + 1, grid), sample([9, 9], img, torch.tensor([[1, 1, 4]])),  # other pixels, other grid
        sample([2, 3]),                                                  # a suffix of row 0, padded further left
        sample([9, 9], img, grid, **clip), sample([9, 9], img.clone(), grid, **clip),  # same images and video
        sample([9, 9], img, grid, pixel_values_videos=img - 1, video_grid_thw=grid),   # another video
    ], pad_id=0)
    first, share = batch.distinct_prompts()
    assert first == [0, 1, 3, 5, 6, 7, 8, 10]
    assert share.tolist() == [0, 1, 0, 2, 2, 3, 4, 5, 6, 6, 7]


def test_vision_inputs_concatenate_in_row_order_and_token_types_mark_placeholders():
    from sapo_ray.batch import Vision, VisionTokens

    a = Vision(torch.zeros(4, 2), torch.tensor([[1, 2, 2]]))
    b = Vision(pixel_values_videos=torch.ones(8, 2), video_grid_thw=torch.tensor([[2, 2, 2]]),
               second_per_grid_ts=torch.tensor([0.5]))
    c = Vision(torch.full((4, 2), 2.0), torch.tensor([[1, 2, 2]]))
    inputs = Vision.model_inputs([a, None, b, c])
    assert inputs["pixel_values"][:, 0].tolist() == [0] * 4 + [2] * 4  # a's image, then c's
    assert inputs["image_grid_thw"].tolist() == [[1, 2, 2], [1, 2, 2]]
    assert inputs["video_grid_thw"].tolist() == [[2, 2, 2]] and inputs["second_per_grid_ts"].tolist() == [0.5]
    assert Vision.model_inputs([None, None]) == {}
    ids = torch.tensor([[5, 11, 11, 5, 12, 12, 12, 5]])
    assert VisionTokens(image=11, video=12).types(ids).tolist() == [[0, 1, 1, 0, 2, 2, 2, 0]]
    assert VisionTokens(image=11).types(ids).tolist() == [[0, 1, 1, 0, 0, 0, 0, 0]]


def _scored_batch() -> Batch:
    """Three rows (responses of 3, 1 and 2 tokens) with the reward's fields filled."""
    samples = [Sample([1, 2], [5, 6, 7], [-0.1, -0.2, -0.3], [1.0, 1.1, 1.2], "a", True, 0),
               Sample([3], [8], [-0.4], [0.5], "b", False, 1),
               Sample([4, 4, 4], [9, 9], [-0.5, -0.6], [0.7, 0.8], "c", True, 1)]
    batch = Batch.from_samples(samples, pad_id=0)
    return batch.with_fields(scores=torch.tensor([1.0, 0.0, 0.5]), group_index=torch.tensor([0, 1, 1]))


def test_a_field_read_before_its_phase_fails_with_its_name_and_filler():
    batch = _scored_batch()
    with pytest.raises(MissingField, match=r"Batch\.values is not filled: the critic's forward"):
        batch.values
    with pytest.raises(MissingField, match=r"Batch\.advantages .*bookkeeping\.advantages"):
        batch.select([0]).advantages
    assert set(batch.filled()) == {"rollout_logp", "rollout_entropy", "turn_rewards", "scores", "group_index"}
    filled = batch.with_fields(values=torch.ones(3, 3))
    assert torch.equal(filled.values, torch.ones(3, 3)) and "values" not in batch.filled()  # a copy


def test_select_keeps_every_field_aligned_and_trims_padding():
    """Rows 2 and 1: their per-row and per-token fields move with them, and the columns no selected row
    uses (the third response token, the first prompt column) are cut from every per-token field."""
    batch = _scored_batch().with_fields(advantages=torch.arange(9.0).view(3, 3))
    part = batch.select([2, 1])
    assert part.response_ids.tolist() == [[9, 9], [8, 0]] and part.prompt_ids.tolist() == [[4, 4, 4], [0, 0, 3]]
    assert part.advantages.tolist() == [[6.0, 7.0], [3.0, 4.0]]
    torch.testing.assert_close(part.rollout_logp, torch.tensor([[-0.5, -0.6], [-0.4, 0.0]]))
    assert part.scores.tolist() == [0.5, 0.0] and part.group_index.tolist() == [1, 1]
    assert set(part.filled()) == set(batch.filled())


def test_rank_outputs_concatenate_back_to_the_batch_rows():
    """Two ranks' log-probs over row shards trimmed to 2 and 1 columns, padded back to the batch's 3."""
    parts = [LogProbs(torch.ones(2, 2), torch.full((2, 2), 2.0)), LogProbs(torch.ones(1, 1), torch.full((1, 1), 2.0))]
    out = concat_rows(parts, 3)
    assert out.logp.tolist() == [[1, 1, 0], [1, 1, 0], [1, 0, 0]]
    assert out.entropy.tolist() == [[2, 2, 0], [2, 2, 0], [2, 0, 0]]
    assert concat_rows([torch.ones(1, 1), torch.ones(1, 3)], 3).tolist() == [[1, 0, 0], [1, 1, 1]]
    assert concat_rows([LogProbs(torch.ones(1, 1))], 2).entropy is None
