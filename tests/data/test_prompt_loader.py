"""PromptLoader: seeded epochs, and a resumed loader continues with exactly the same batches."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sapo_ray.data.prompt_loader import PromptLoader

EXAMPLES = [{"pid": str(i)} for i in range(10)]


def _pids(batch):
    return [ex["pid"] for ex in batch]


def test_each_epoch_is_a_seeded_permutation():
    loader = PromptLoader(EXAMPLES, batch_size=3, seed=0, drop_last=False)
    assert len(loader) == 4
    epoch0 = [p for batch in loader for p in _pids(batch)]
    epoch1 = [p for batch in loader for p in _pids(batch)]
    assert sorted(epoch0) == sorted(epoch1) == sorted(ex["pid"] for ex in EXAMPLES)
    assert epoch0 != epoch1 and loader.state_dict()["epoch"] == 1
    same = PromptLoader(EXAMPLES, batch_size=3, seed=0, drop_last=False)
    assert [p for b in same for p in _pids(b)] == epoch0
    in_order = PromptLoader(EXAMPLES, batch_size=4, seed=0, shuffle=False)
    assert [_pids(b) for b in in_order] == [["0", "1", "2", "3"], ["4", "5", "6", "7"]]  # drop_last


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), batch_size=st.integers(1, 8), drop_last=st.booleans(),
       stop=st.integers(0, 20), more=st.integers(1, 20))
def test_resume_equals_uninterrupted_iteration(n, batch_size, drop_last, stop, more):
    examples = [{"pid": str(i)} for i in range(n)]
    if drop_last and batch_size > n:
        with pytest.raises(ValueError, match="no batch"):
            PromptLoader(examples, batch_size, seed=5, drop_last=drop_last)
        return
    full = PromptLoader(examples, batch_size, seed=5, drop_last=drop_last)
    expected = [_pids(full.next_batch()) for _ in range(stop + more)]

    first = PromptLoader(examples, batch_size, seed=5, drop_last=drop_last)
    got = [_pids(first.next_batch()) for _ in range(stop)]
    state = first.state_dict()
    resumed = PromptLoader(examples, batch_size, seed=123, drop_last=drop_last)  # seed comes from the state
    resumed.load_state_dict(state)
    got += [_pids(resumed.next_batch()) for _ in range(more)]
    assert got == expected


def test_resume_mid_epoch_with_for_loops():
    a = PromptLoader(EXAMPLES, batch_size=2, seed=1)
    uninterrupted = [_pids(b) for _ in range(2) for b in a]
    b = PromptLoader(EXAMPLES, batch_size=2, seed=1)
    it = iter(b)
    head = [_pids(next(it)) for _ in range(3)]
    c = PromptLoader(EXAMPLES, batch_size=2, seed=1)
    c.load_state_dict(b.state_dict())
    tail = [_pids(x) for x in c] + [_pids(x) for x in c]
    assert head + tail == uninterrupted


def test_state_from_another_dataset_is_refused():
    state = PromptLoader(EXAMPLES, batch_size=2, seed=1).state_dict()
    with pytest.raises(ValueError, match="same dataset"):
        PromptLoader(EXAMPLES[:8], batch_size=2, seed=1).load_state_dict(state)
