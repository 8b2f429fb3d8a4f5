"""Rewards: `score = acc_weight * acc + format_weight * format`, with `acc` chosen by the example's data source.

An accuracy function maps `(response, example)` to a float (the accuracy, in [0, 1] for the built-ins)
or to a dict with `score` (the accuracy) and any further numbers of the user's, which are kept beside it
in the sample's scores and logged as `reward/<name>`. Built-ins are registered by data source
(`mathvista`, `synthvista`, `geometry3k`, `custom`); a new source registers its own with
`@register_reward("name")`, and a user hook is loaded from a file with `load_reward_fn("file.py:fn")`.
`acc_weight` None means `1 - format_weight`, so `format_weight=0` scores by the accuracy alone.
`RewardPool` scores a batch in worker processes with a per-sample timeout.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
from collections.abc import Callable
from pathlib import Path

from sapo_ray.reward.extract import last_boxed, mathvista_extraction, outside_choices
from sapo_ray.reward.format import format_reward
from sapo_ray.reward.verify import is_equivalent, plain

RewardFn = Callable[[str, dict], "float | dict"]
# Names a user's extra numbers cannot take: the sample's own scores and the step's reward counters.
RESERVED = ("score", "acc", "format", "errors", "timeouts", "error_rate")
_REGISTRY: dict[str, RewardFn] = {}


def register_reward(data_source: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering an accuracy function `(response, example) -> float` for `data_source`."""

    def decorator(fn: RewardFn) -> RewardFn:
        if data_source in _REGISTRY:
            raise ValueError(f"a reward function is already registered for data_source {data_source!r}")
        _REGISTRY[data_source] = fn
        return fn

    return decorator


def get_reward_fn(data_source: str) -> RewardFn:
    """The accuracy function registered for `data_source`."""
    if data_source not in _REGISTRY:
        raise KeyError(
            f"no reward function for data_source {data_source!r} (registered: {sorted(_REGISTRY)}); "
            "register one with @sapo_ray.reward.register_reward or pass reward_fn='file.py:function'"
        )
    return _REGISTRY[data_source]


def load_reward_fn(spec: str) -> RewardFn:
    """Load a user accuracy function from `"path/to/file.py:function"` (path relative to the working dir)."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise ValueError(f"reward_fn {spec!r} must look like 'path/to/file.py:function'")
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise FileNotFoundError(f"reward_fn {spec!r}: file {file} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"sapo_ray_user_reward_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise AttributeError(f"reward_fn {spec!r}: {file} defines no function {name!r} (callables there: {found})")
    return fn


def compute_score(response: str, example: dict, acc_weight: float | None = None, format_weight: float = 0.1,
                  reward_fn: RewardFn | None = None, exact_choice: bool = False) -> dict[str, float]:
    """Score one response: {"score": acc_weight * acc + format_weight * format, "acc", "format", **extras}.

    `acc` comes from `reward_fn` when given, else from the function registered for
    `example["data_source"]`; `format` is `format_reward(response)`. `exact_choice`: an answer to a
    multiple-choice question that names none of its choices has `acc` 0 (`outside_choices`), whatever the
    function says (MathVista's own rule counts it as the most similar choice).
    """
    fn = reward_fn or get_reward_fn(example["data_source"])
    return combine(fn(response, example), response, acc_weight, format_weight, fn,
                   exact_choice and outside_choices(response, example))


def combine(value, response: str, acc_weight: float | None, format_weight: float, fn=None,
            wrong: bool = False) -> dict[str, float]:
    """A reward function's return value (a float, or a dict with `score` and extra numbers) as the
    sample's scores, `acc` 0 when `wrong`; raises on anything else or on a non-finite number (counted as an
    error by the pool)."""
    name = getattr(fn, "__name__", fn)
    extras = {}
    if isinstance(value, dict):
        if "score" not in value:
            raise TypeError(f"reward function {name!r} returned a dict without 'score': {sorted(value)}")
        extras = {k: v for k, v in value.items() if k != "score"}
        clash = sorted(set(extras) & set(RESERVED))
        if clash:
            raise TypeError(f"reward function {name!r} returned extra numbers named {clash}: reserved names {RESERVED}")
        value = value["score"]
    for key, number in {"score": value, **extras}.items():
        if not isinstance(number, numbers.Real):
            raise TypeError(f"reward function {name!r} returned {key}={number!r}; expected a float (or a dict of floats "
                            "with 'score')")
        if not math.isfinite(number):
            raise ValueError(f"reward function {name!r} returned a non-finite {key}: {number}")
    acc, fmt = 0.0 if wrong else float(value), format_reward(response)
    acc_weight = 1.0 - format_weight if acc_weight is None else acc_weight
    return {"score": acc_weight * acc + format_weight * fmt, "acc": acc, "format": fmt,
            **{k: float(v) for k, v in extras.items()}}


@register_reward("mathvista")
@register_reward("synthvista")
def mathvista_acc(response: str, example: dict) -> float:
    """1.0 iff the last box, normalised by MathVista's rules (choice, integer, float, list), equals the answer."""
    # Imported here so that `python -m sapo_ray.reward.mathvista` does not find the module pre-imported.
    from sapo_ray.reward.mathvista import judge

    extraction = mathvista_extraction(response, example)
    return float(judge(example, extraction)[1]) if extraction else 0.0


@register_reward("geometry3k")
@register_reward("custom")
def math_acc(response: str, example: dict) -> float:
    """1.0 iff the last box equals the gold answer as plain strings or by math_verify equivalence."""
    box = last_boxed(response)
    if box is None or not box.strip():
        return 0.0
    gold = str(example["answer"])
    return float(plain(box) == plain(gold) or is_equivalent(box, gold))


__all__ = [
    "compute_score",
    "format_reward",
    "get_reward_fn",
    "last_boxed",
    "load_reward_fn",
    "mathvista_extraction",
    "outside_choices",
    "register_reward",
]
