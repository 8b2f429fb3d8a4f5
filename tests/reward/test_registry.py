from pathlib import Path

import pytest

from sapo_ray.reward import compute_score, get_reward_fn, load_reward_fn, register_reward

HOOKS = str(Path(__file__).with_name("hooks.py"))
GOOD = r"<think>Count them.</think> The answer is \boxed{3}."
MC = {"question_type": "multi_choice", "answer_type": "text", "choices": ["red", "blue"], "answer": "blue"}


def mathvista(**fields):
    example = {"data_source": "mathvista", "question_type": "free_form", "answer_type": "integer",
               "precision": None, "choices": None, "answer": "3"}
    return {**example, **fields}


def test_compute_score_weights():
    assert compute_score(GOOD, mathvista()) == {"score": 1.0, "acc": 1.0, "format": 1.0}
    assert compute_score(r"\boxed{3}", mathvista()) == {"score": 0.9, "acc": 1.0, "format": 0.0}
    wrong = compute_score(r"<think>x</think>\boxed{4}", mathvista())
    assert wrong == {"score": pytest.approx(0.1), "acc": 0.0, "format": 1.0}
    assert compute_score("3", mathvista()) == {"score": 0.0, "acc": 0.0, "format": 0.0}
    assert compute_score(GOOD, mathvista(), acc_weight=0.5, format_weight=0.5)["score"] == 1.0


@pytest.mark.parametrize(
    "box, fields, acc",
    [
        ("3", {}, 1.0),
        ("3.7", {}, 1.0),  # MathVista truncates integers
        ("3 \\text{ apples}", {}, 1.0),
        ("$3$", {}, 1.0),
        ("1,003", {"answer": "1003"}, 1.0),
        ("30^\\circ", {"answer": "30"}, 1.0),
        ("45\\%", {"answer": "45"}, 1.0),
        ("4", {}, 0.0),
        ("three", {}, 0.0),
        ("1.25", {"answer_type": "float", "precision": 1, "answer": "1.2"}, 1.0),
        ("1.3", {"answer_type": "float", "precision": 1, "answer": "1.2"}, 0.0),
        ("[1, 2]", {"answer_type": "list", "answer": "[1, 2]"}, 1.0),
        ("B", MC, 1.0),
        ("(B)", MC, 1.0),
        ("\\text{B.}", MC, 1.0),
        ("blu", MC, 1.0),
        ("A", MC, 0.0),
        ("", {**MC, "answer": "red"}, 0.0),
    ],
)
def test_mathvista_and_synthvista_acc(box, fields, acc):
    response = f"<think>...</think> \\boxed{{{box}}}"
    for source in ("mathvista", "synthvista"):
        assert get_reward_fn(source)(response, mathvista(data_source=source, **fields)) == acc


def test_no_box_scores_zero_even_if_a_guess_would_match():
    example = mathvista(question_type="multi_choice", answer_type="text", choices=["red", "blue"], answer="red")
    assert compute_score("<think>x</think> red", example)["acc"] == 0.0


@pytest.mark.parametrize(
    "box, answer, acc",
    [
        ("\\frac{1}{2}", "0.5", 1.0),
        ("2\\sqrt{221}", "2 \\sqrt{221}", 1.0),
        ("\\sqrt{884}", "2\\sqrt{221}", 1.0),
        ("60", "60", 1.0),
        ("\\text{A}", "\\text{A}", 1.0),
        ("13.33", "\\frac{40}{3}", 0.0),
        ("7", "8", 0.0),
    ],
)
def test_geometry3k_acc(box, answer, acc):
    example = {"data_source": "geometry3k", "answer": answer}
    assert compute_score(f"<think>x</think>\\boxed{{{box}}}", example)["acc"] == acc


def test_unknown_source_names_the_fix():
    with pytest.raises(KeyError, match="no reward function for data_source 'nope'.*register_reward"):
        compute_score(GOOD, {"data_source": "nope"})


def test_register_reward():
    @register_reward("test-constant")
    def constant(response, example):
        return 1.0

    assert get_reward_fn("test-constant") is constant
    assert compute_score("", {"data_source": "test-constant"})["score"] == 0.9
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test-constant")(constant)


def test_load_user_hook():
    fn = load_reward_fn(f"{HOOKS}:always_half")
    assert compute_score(GOOD, {}, reward_fn=fn) == {"score": pytest.approx(0.55), "acc": 0.5, "format": 1.0}
    with pytest.raises(TypeError, match="'not_a_number' returned score='1'"):
        compute_score(GOOD, {}, reward_fn=load_reward_fn(f"{HOOKS}:not_a_number"))


@pytest.mark.parametrize(
    "spec, error, message",
    [
        (f"{HOOKS}:missing", AttributeError, r"hooks.py defines no function 'missing' \(callables there: .*half"),
        (str(Path(__file__).with_name("nope.py")) + ":fn", FileNotFoundError, r"nope.py does not exist"),
        (HOOKS, ValueError, "must look like 'path/to/file.py:function'"),
        (f"{HOOKS}:", ValueError, "must look like"),
    ],
)
def test_load_user_hook_errors(spec, error, message):
    with pytest.raises(error, match=message):
        load_reward_fn(spec)


def test_a_dict_carries_the_score_and_extra_numbers_and_bad_values_raise():
    fn = load_reward_fn(f"{HOOKS}:with_extras")
    assert compute_score(GOOD, mathvista(), reward_fn=fn) == {"score": 1.0, "acc": 1.0, "format": 1.0,
                                                              "chars": float(len(GOOD))}
    # format_weight=0: the accuracy alone (acc_weight defaults to 1 - format_weight)
    assert compute_score(r"\boxed{3}", mathvista(), format_weight=0.0)["score"] == 1.0
    with pytest.raises(ValueError, match="non-finite score"):
        compute_score(GOOD, {}, reward_fn=load_reward_fn(f"{HOOKS}:not_finite"))
    with pytest.raises(TypeError, match="without 'score'"):
        compute_score(GOOD, {}, reward_fn=lambda r, e: {"acc": 1.0})
    with pytest.raises(TypeError, match=r"named \['format'\]"):
        compute_score(GOOD, {}, reward_fn=lambda r, e: {"score": 1.0, "format": 2.0})
    with pytest.raises(ValueError, match="non-finite bonus"):
        compute_score(GOOD, {}, reward_fn=lambda r, e: {"score": 1.0, "bonus": float("inf")})
