"""Micro-batches by token budget (`sapo_ray.batch.pack_by_tokens`) and the padding they leave."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sapo_ray.batch import pack_by_tokens


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
