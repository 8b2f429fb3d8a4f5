"""`benchmarks/warm_start_bench.py`'s bookkeeping: which procedure a response took, what it read, and the
pass@k / no-signal estimators, against the generator's own solutions and hand-computed numbers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from sapo_ray.data.synthvista import TEMPLATES, generate, question_answer_solution

_spec = importlib.util.spec_from_file_location(
    "warm_start_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "warm_start_bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("template", TEMPLATES)
def test_the_shortcut_is_told_from_the_right_procedure(template):
    rows = generate(20, seed=3, split="train", templates=(template,))
    for row in rows:
        params = json.loads(row["metadata"]["params"])
        right, shortcut = question_answer_solution(params)[2], question_answer_solution(params, shortcut=True)[2]
        assert not bench.took_shortcut(right, params), right
        assert bench.took_shortcut(shortcut, params), shortcut
        # Both procedures read the picture alike.
        assert bench.reading(right) == bench.reading(shortcut) and bench.reading(right)[0]


def test_reading_takes_numbers_and_colours_of_the_first_step_only():
    text = "<think>Step 1: The bars are red 5, blue 3. Step 2: Red is 5 and blue is 3. Step 3: 5 - 3 = 2.</think>"
    assert bench.reading(text) == (["5", "3"], ["red", "blue"])
    assert bench.reading("<think>Step 1: The shapes are red circle, green square.</think>") == (
        ["circle", "square"], ["red", "green"])
    assert bench.reading("no steps at all") is None


def test_estimators_by_hand():
    # 4 samples, 1 right: pass@1 = 1/4; pass@2 = 1 - C(3,2)/C(4,2) = 1 - 3/6.
    assert bench.pass_at(1, 4, 1) == pytest.approx(0.25)
    assert bench.pass_at(2, 4, 1) == pytest.approx(0.5)
    assert bench.pass_at(2, 4, 3) == 1.0
    # 6 samples, 2 right, groups of 2: all right C(2,2)=1, all wrong C(4,2)=6, of C(6,2)=15.
    assert bench.no_signal(6, 2, 2) == pytest.approx(7 / 15)
    assert bench.no_signal(4, 0, 4) == 1.0 and bench.no_signal(8, 4, 4) == pytest.approx(2 / 70)


@pytest.mark.parametrize("template", ["bar_argmax", "bar_sum", "bar_diff"])
def test_the_shortcut_is_told_in_a_tool_episodes_transcript(template):
    """`benchmarks/branch_choices.py` reads dumped tool episodes with `took_shortcut`: an episode's turns and
    observations, the sloppy teacher's needless calculator call (`1 + 2 + 3`, no `=`) among them, tell the
    two procedures apart as a single response does."""
    import sapo_ray.data.synthvista as sv

    k = sv.Knobs(templates=(template,))
    for row in generate(6, seed=5, split="train", templates=(template,)):
        params = json.loads(row["metadata"]["params"])
        for shortcut in (False, True):
            turns = sv.tool_turns(params, k, needless=True, stepwise=True, target=True, shortcut=shortcut)
            transcript = "<|im_end|>\n<|im_start|>user\n<tool_response>\nred\n</tool_response><|im_end|>\n".join(turns)
            assert bench.took_shortcut(transcript, {"template": template}) == shortcut, transcript
