"""Reward hooks for learning tests, loaded by path (`reward.custom=tests/learning_hooks.py:NAME`)."""

from sapo_ray.reward.extract import last_boxed


def short_answer(response: str, example: dict) -> float:
    """1 for an empty response, falling linearly to 0 at 200 characters: a reward any policy can chase."""
    return max(0.0, 1.0 - len(response) / 200.0)


def boxed_seven(response: str, example: dict) -> float:
    """1 when the last boxed answer is 7, whatever the question."""
    return float((last_boxed(response) or "").strip() == "7")
