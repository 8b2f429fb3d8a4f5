"""Environments: what answers each turn of an episode.

An environment is made for one episode from its example (`make_env`) and answers each assistant turn,
given as text, with a `Step`: the observation to append before the model's next turn (None ends the
episode), what the turn did, and optionally the turn's own reward: it lands on the turn's last token,
beside the outcome score on the episode's last, so that an estimator with a critic credits the turn that
earned it. Environments are registered by name (`register_env`); a user's own is
`"file.py:ClassName"`, a class taking `(example, tools)` with a `step(text) -> Step` method.

`tools` (the built-in): a turn with `<tool_call>` blocks gets their `<tool_response>` blocks as the next
user turn; a turn without a call is the final answer and ends the episode.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Protocol

from sapo_ray.envs.pool import ToolPool
from sapo_ray.envs.tools import ToolContext, parse_tool_calls, tool_responses


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
        calls = parse_tool_calls(text)
        if not calls:
            return Step(None)
        results = self.tools.run([(call, self.context) for call in calls])
        return Step(tool_responses(results), len(calls), Counter(r.error for r in results if r.error))
