"""Format reward: reasoning in one `<think>` block first, then a final answer in `\\boxed{}`."""

from __future__ import annotations

from sapo_ray.reward.extract import last_boxed


def format_reward(response: str) -> float:
    """1.0 iff `response` is `<think>REASONING</think> ... \\boxed{ANSWER}`, else 0.0.

    Leading whitespace is allowed; exactly one think block, which opens the response and has
    non-blank reasoning; after it, a balanced last box with a non-blank answer.
    """
    if not isinstance(response, str):
        return 0.0
    text = response.lstrip()
    if not text.startswith("<think>") or text.count("<think>") != 1 or text.count("</think>") != 1:
        return 0.0
    thought, _, rest = text[len("<think>") :].partition("</think>")
    answer = last_boxed(rest)
    return float(bool(thought.strip()) and answer is not None and bool(answer.strip()))
