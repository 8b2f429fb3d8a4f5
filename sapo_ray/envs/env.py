"""Environments: what answers each turn of an episode.

An environment is made for one episode from its example (`make_env`) and answers each assistant turn,
given as text, with a `Step`: the observation to append before the model's next turn (None ends the
episode), what the turn did, and optionally the turn's own reward: it lands on the turn's last token,
beside the outcome score on the episode's last, so that an estimator with a critic credits the turn that
earned it. Environments are registered by name (`register_env`); a user's own is
`"file.py:ClassName"`, a class taking `(example, tools)` with a `step(text) -> Step` method.

`tools` (the built-in): a turn with `<tool_call>` blocks gets their `<tool_response>` blocks as the next
user turn; a turn without a call is the final answer and ends the episode. `step_all` answers a round of
episodes' turns at once: the calls of every `tools` episode in the round go to the pool together, so a slow
call holds one worker, not the episodes after it.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Protocol

from sapo_ray.envs.pool import ToolPool
from sapo_ray.envs.tools import BadCall, ToolCall, ToolContext, ToolResult, parse_tool_calls, tool_responses

log = logging.getLogger(__name__)


@dataclass
class Step:
    observation: str | None  # appended before the next turn, tokenized on its own; None ends the episode
    tool_calls: int = 0
    tool_errors: Counter = field(default_factory=Counter)  # by kind (`sapo_ray.envs.tools.ERROR_KINDS`)
    reward: float = 0.0  # the answered turn's own reward, added to the episode's return at that turn's end


class Env(Protocol):
    def step(self, text: str) -> Step: ...


ENVS: dict[str, Callable[[dict, ToolPool | None], Env]] = {}


def register_env(name: str) -> Callable:
    """Class decorator registering an environment `cls(example, tools)` under `name`."""

    def decorator(cls):
        if name in ENVS:
            raise ValueError(f"an environment named {name!r} is already registered")
        ENVS[name] = cls
        return cls

    return decorator


def env_factory(name: str) -> Callable[[dict, ToolPool | None], Env]:
    """The environment class `name` names: a registered one, or `"file.py:ClassName"`."""
    if name in ENVS:
        return ENVS[name]
    if ":" in name:
        from sapo_ray.reward import load_reward_fn  # the same file-and-name loader as a user's reward

        return load_reward_fn(name)
    raise ValueError(f"unknown environment {name!r}: one of {sorted(ENVS)} or 'file.py:ClassName'")


@register_env("tools")
class ToolEnv:
    """Runs the turn's tool calls in `tools` and answers with their responses; a turn without a call ends
    the episode."""

    def __init__(self, example: dict, tools: ToolPool | None):
        if tools is None:
            raise ValueError("the tools environment needs a tool pool")
        self.tools = tools
        self.context = ToolContext(list(example.get("images") or []))

    def step(self, text: str) -> Step:
        calls = self.calls(text)
        return self.answer(self.tools.run(calls)) if calls else Step(None)

    def calls(self, text: str) -> list[tuple[ToolCall | BadCall, ToolContext]]:
        """The turn's calls for the pool, in order (none: the turn answers, and ends the episode)."""
        return [(call, self.context) for call in parse_tool_calls(text)]

    @staticmethod
    def answer(results: list[ToolResult]) -> Step:
        """The step after a turn whose calls gave `results`."""
        return Step(tool_responses(results), len(results), Counter(r.error for r in results if r.error))


def step_all(turns: list[tuple[Env, str]]) -> list[Step]:
    """Each environment's answer to its turn's text, in order. The `tools` environments' calls go to their
    pool in one `run`, all of the round's together (a pool's workers then run calls of different episodes side
    by side); any other environment's `step` (a subclass's too) is called in turn. An environment that raises
    ends its episode with an `env_raised` error instead of the run."""
    steps: list[Step | None] = [None] * len(turns)
    batched: dict[int, tuple[ToolPool, list[tuple[int, list]]]] = {}  # by pool: (pool, [(turn, its calls)])
    for i, (env, text) in enumerate(turns):
        try:
            if type(env).step is ToolEnv.step:
                calls = env.calls(text)
                if calls:
                    batched.setdefault(id(env.tools), (env.tools, []))[1].append((i, calls))
                else:
                    steps[i] = Step(None)
            else:
                steps[i] = checked_step(env.step(text))
        except Exception as error:
            steps[i] = _raised(error)
    for pool, pending in batched.values():
        try:
            results = iter(pool.run([call for _, calls in pending for call in calls]))
        except Exception as error:
            for i, _ in pending:
                steps[i] = _raised(error)
            continue
        for i, calls in pending:
            steps[i] = ToolEnv.answer([next(results) for _ in calls])
    return steps


def _raised(error: Exception) -> Step:
    """The end of an episode whose environment raised: counted, not the run's end."""
    log.warning("an environment's step raised %s: %s; its episode ends there", type(error).__name__, error)
    return Step(None, tool_errors=Counter({"env_raised": 1}))


def checked_step(step: Step) -> Step:
    """`step`, if its reward is a finite number (else an environment's error, raised)."""
    if isinstance(step.reward, bool) or not isinstance(step.reward, numbers.Real) or not math.isfinite(step.reward):
        raise ValueError(f"a Step's reward must be a finite number, got {step.reward!r}")
    return step
