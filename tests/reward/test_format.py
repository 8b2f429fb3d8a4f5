import pytest

from sapo_ray.reward.format import format_reward


@pytest.mark.parametrize(
    "response",
    [
        r"<think>2+2=4</think>The answer is \boxed{4}.",
        "\n  <think>a\nb</think>\n\\boxed{\\frac{1}{2}}",
        r"<think>try \boxed{3}</think> no, \boxed{4}",
    ],
)
def test_good_format(response):
    assert format_reward(response) == 1.0


@pytest.mark.parametrize(
    "response",
    [
        "",
        r"\boxed{4}",  # no think block
        r"The answer: <think>x</think>\boxed{4}",  # think block not first
        r"<think>x</think> 4",  # no box
        r"<think>x \boxed{4}</think> 4",  # box only inside the think block
        r"<think>x</think> \boxed{ }",  # blank answer
        r"<think>x</think> \boxed{4",  # unbalanced
        r"<think>  </think> \boxed{4}",  # blank reasoning
        r"<think>x</think><think>y</think>\boxed{4}",  # two think blocks
        r"<think>x \boxed{4}",  # never closed
        None,
    ],
)
def test_bad_format(response):
    assert format_reward(response) == 0.0
