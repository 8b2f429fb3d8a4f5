"""Multi-turn episodes on any engine, token in and token out.

Every turn continues its episode from the episode's exact token ids: the prompt, then each token the
engine sampled and each observation token appended so far. An observation is tokenized once, on its own,
and appended; nothing is ever re-tokenized, so the learner trains on exactly the ids the engine produced
or appended (re-tokenizing a conversation between turns changes its ids: verl #3960, TRL #5224).

Episodes advance in rounds: all first turns in one `generate` call (`n` per prompt), then each round
the environments answer the turns that ended (`step_all`: the round's tool calls run side by side in the
pool) and every live episode's next turn is generated in one call, each episode a prompt of its own ids
(the engine computes the prefix again). An episode ends when its environment says so, when a turn stops at
its length limit, after `max_turns` turns, or when the next observation or turn would pass `max_tokens`
tokens of response (turns and observations together).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Callable

from sapo_ray.batch import EpisodeStats, Prompt, Sample, SamplingParams
from sapo_ray.envs.env import Env, Step, checked_step, env_factory, step_all
from sapo_ray.envs.pool import ToolPool
from sapo_ray.envs.tools import load_tool, tool_schemas
from sapo_ray.utils import derive_seed


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int  # the model's turns
    max_tokens: int  # the whole response: the model's turns and the observations


@dataclass
class _Episode:
    prompt: Prompt
    prompt_index: int
    env: Env
    ids: list[int] = field(default_factory=list)  # the response: turns and observations
    observed: list[int] = field(default_factory=list)  # 1 on observation tokens
    rewards: list[float] = field(default_factory=list)  # each turn's own reward, at its last token
    logp: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    text: str = ""  # the last turn's text
    finished: bool = False  # the last turn ended with an end-of-turn token
    turns: int = 0
    tool_calls: int = 0
    tool_errors: Counter = field(default_factory=Counter)
    done: bool = False
    cut: bool = False

    def add_turn(self, sample: Sample) -> None:
        self.ids += sample.response_ids
        self.observed += [0] * len(sample.response_ids)
        self.rewards += [0.0] * len(sample.response_ids)
        self.logp += sample.rollout_logp
        self.entropy += sample.rollout_entropy
        self.text, self.finished, self.turns = sample.text, sample.finished, self.turns + 1

    def add_observation(self, ids: list[int]) -> None:
        self.ids += ids
        self.observed += [1] * len(ids)
        self.rewards += [0.0] * len(ids)
        self.logp += [0.0] * len(ids)
        self.entropy += [0.0] * len(ids)

    def answered(self, step: Step) -> None:
        """Count what the environment's answer to the last turn says that turn did."""
        self.tool_calls += step.tool_calls
        self.tool_errors.update(step.tool_errors)
        self.rewards[-1] += step.reward

    def sample(self, tokenizer) -> Sample:
        stats = EpisodeStats(self.turns, self.tool_calls, dict(self.tool_errors), self.cut, tokenizer.decode(self.ids),
                             sum(self.rewards))
        return Sample(list(self.prompt.ids), self.ids, self.logp, self.entropy, self.text,
                      self.finished and not self.cut, self.prompt_index, self.prompt.vision, self.observed, stats,
                      self.rewards if any(self.rewards) else None)


def _cut(sample: Sample, budget: int, tokenizer) -> Sample:
    """`sample` with at most `budget` tokens (then unfinished)."""
    if len(sample.response_ids) <= budget:
        return sample
    ids = sample.response_ids[:budget]
    return replace(sample, response_ids=ids, rollout_logp=sample.rollout_logp[:budget],
                   rollout_entropy=sample.rollout_entropy[:budget], finished=False,
                   text=tokenizer.decode(ids, skip_special_tokens=True))


def run_episodes(generate: Callable[[list[Prompt], SamplingParams], list[Sample]], tokenizer, prompts: list[Prompt],
                 examples: list[dict], params: SamplingParams, make_env: Callable[[dict], Env],
                 limits: EpisodeLimits) -> list[Sample]:
    """`params.n` episodes per prompt (`examples[i]` is prompt i's row, `make_env` gives an episode its
    environment), as one `Sample` each: the response holds every turn and observation, in order,
    `observation_mask` marking the observations."""
    first = generate(prompts, replace(params, max_new_tokens=min(params.max_new_tokens, limits.max_tokens)))
    episodes = [_Episode(prompts[s.prompt_index], s.prompt_index, make_env(examples[s.prompt_index])) for s in first]
    for episode, sample in zip(episodes, first):
        episode.add_turn(sample)
    for turn in range(1, limits.max_turns + 1):
        for episode in episodes:
            if not episode.done and not episode.finished:  # cut at the length limit: no complete turn to answer
                episode.done = episode.cut = True
        answering = [episode for episode in episodes if not episode.done]
        live = []
        for episode, step in zip(answering, step_all([(e.env, e.text) for e in answering])):
            episode.answered(step)
            if step.observation is None:
                episode.done = True
                continue
            observation = tokenizer(step.observation, add_special_tokens=False)["input_ids"]
            if turn == limits.max_turns or len(episode.ids) + len(observation) >= limits.max_tokens:
                episode.done = episode.cut = True
                continue
            episode.add_observation(observation)
            live.append(episode)
        if not live:
            break
        # One call for all: the longest budget, each turn then cut to its own episode's (a cut turn is unfinished).
        budgets = [min(params.max_new_tokens, limits.max_tokens - len(e.ids)) for e in live]
        continued = [Prompt(list(e.prompt.ids) + e.ids, e.prompt.vision, e.prompt.images) for e in live]
        turn_params = replace(params, n=1, max_new_tokens=max(budgets), seed=derive_seed(params.seed, "turn", turn))
        for episode, budget, sample in zip(live, budgets, generate(continued, turn_params)):
            episode.add_turn(_cut(sample, budget, tokenizer))
    return [episode.sample(tokenizer) for episode in episodes]


def replay_episode(tokenizer, prompt: Prompt, turns: list[str], env: Env, prompt_index: int = 0) -> Sample:
    """The episode a model writing `turns` would have with `env`, laid out as `run_episodes` lays one out
    (each turn's ids and its end-of-turn token, each observation tokenized on its own): a warm start's
    training sample, with the observations masked."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    episode = _Episode(prompt, prompt_index, env)
    for i, text in enumerate(turns):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [end]
        episode.add_turn(Sample(list(prompt.ids), ids, [0.0] * len(ids), [0.0] * len(ids), text, True, prompt_index))
        step = checked_step(env.step(text))
        episode.answered(step)
        if (step.observation is None) != (i == len(turns) - 1):
            raise ValueError(f"turn {i} of {len(turns)} {'ends' if step.observation is None else 'does not end'} "
                             "the episode")
        if step.observation is not None:
            episode.add_observation(tokenizer(step.observation, add_special_tokens=False)["input_ids"])
    return episode.sample(tokenizer)


class Episodes:
    """A rollout worker's episodes: the environment class, the tool pool its environments call, the limits."""

    def __init__(self, make_env: Callable[[dict], Env], limits: EpisodeLimits, tools=None):
        self.make_env, self.limits, self.tools = make_env, limits, tools

    @classmethod
    def from_config(cls, cfg) -> "Episodes":
        """From an `EnvConfig` (`env.name` set)."""
        factory = env_factory(cfg.name)
        tool_schemas(list(cfg.tools))  # every named tool exists
        tools = ToolPool(cfg.tool_workers, cfg.tool_timeout_s, cfg.max_tool_chars, tuple(cfg.tool_files), tuple(cfg.tools))
        return cls(lambda example: factory(example, tools), EpisodeLimits(cfg.max_turns, cfg.max_tokens), tools)

    def run(self, engine, prompts: list[Prompt], examples: list[dict], params: SamplingParams) -> list[Sample]:
        if examples is None or len(examples) != len(prompts):
            raise ValueError("multi-turn episodes need each prompt's example (its environment's input)")
        return run_episodes(engine.generate, engine.tokenizer, prompts, examples, params, self.make_env, self.limits)


def episode_tools(cfg) -> list[dict] | None:
    """The tools an `EnvConfig`'s episodes may call, as chat templates list them (None without episodes of
    the tools environment); the user's tool files are loaded here too."""
    if cfg.name != "tools":
        return None
    return tool_schemas(list(cfg.tools) + [load_tool(spec) for spec in cfg.tool_files])
