"""Free-form answer equivalence on top of the `math_verify` package (Hugging Face Math-Verify).

math_verify's own timeouts use `signal.alarm`, which only works in a process's main thread, so they
are disabled here (`parsing_timeout=None`, `timeout_seconds=None`): a slow or hanging comparison is
stopped from outside, by `sapo_ray.reward.pool.RewardPool`, which kills the worker process.
"""

from __future__ import annotations

import logging
import re

from math_verify import parse, verify


class _DropTimeoutDisabledWarning(logging.Filter):
    """math_verify warns once per process that its timeout is off; here that is intended."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


def parse_answer(answer: str) -> list:
    """Parse a bare answer (the content of a box, or a gold string) into math_verify's candidate list.

    The answer is wrapped in `\\boxed{}` so that math_verify reads it as one LaTeX expression; an empty
    list means it could not be parsed.
    """
    return parse(f"\\boxed{{{answer}}}", parsing_timeout=None)


def is_equivalent(prediction: str, gold: str) -> bool:
    """True iff math_verify finds `prediction` mathematically equal to `gold` (e.g. `\\frac{1}{2}` and `0.5`).

    Floats are compared after rounding to 6 decimals (math_verify's default), so `13.33` is not `40/3`.
    No timeout: run it in a process that can be killed (see RewardPool).
    """
    gold_parsed, prediction_parsed = parse_answer(gold), parse_answer(prediction)
    if not gold_parsed or not prediction_parsed:
        return False
    return verify(gold_parsed, prediction_parsed, timeout_seconds=None)


def plain(answer: str) -> str:
    """A whitespace-, `$`- and spacing-command-free lower-case form of an answer, for string comparison."""
    return re.sub(r"\s+|\$|\\[,!;:]|\\left|\\right", "", answer).rstrip(".").lower()
