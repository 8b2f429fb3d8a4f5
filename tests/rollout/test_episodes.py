"""Multi-turn episodes: token in and token out, the learner sees what the engine saw, the limits hold."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from helpers import encode, engine_for
from sapo_ray.batch import Batch, SamplingParams
from sapo_ray.data.datasets import load_dataset_split
from sapo_ray.envs.env import Step
from sapo_ray.envs.tools import ToolResult, tool_responses
from sapo_ray.rollout.episodes import EpisodeLimits, run_episodes

OBSERVATION = tool_responses([ToolResult("7")])


class Scripted:
    """Answers each turn with `OBSERVATION` until the episode has had `turns` turns."""

    def __init__(self, example, turns: int = 3):
        self.turns, self.seen = turns, 0

    def step(self, text):
        self.seen += 1
        return Step(None if self.seen >= self.turns else OBSERVATION, tool_calls=1, tool_errors=Counter())


@pytest.fixture(scope="module")
def tiny():
    """The bundled warm-started tiny VLM (its turns end by themselves) on 3 synthvista prompts."""
    engine, processor = engine_for("bundled:tiny-vlm")
    examples = load_dataset_split("synthvista", None, "train", n=3, seed=0, hint=False)
    return engine, processor, examples, [encode(processor, e) for e in examples]


def _recorded(engine):
    calls = []

    def generate(prompts, params):
        samples = engine.generate(prompts, params)
        calls.append(([list(p.ids) for p in prompts], samples))
        return samples

    return generate, calls


def test_every_token_the_learner_sees_is_one_the_engine_sampled_or_was_given(tiny):
    engine, processor, examples, prompts = tiny
    generate, calls = _recorded(engine)
    observation = processor.tokenizer(OBSERVATION, add_special_tokens=False)["input_ids"]
    samples = run_episodes(generate, processor.tokenizer, prompts, examples,
                           SamplingParams(n=2, temperature=1.0, max_new_tokens=64, seed=0), Scripted,
                           EpisodeLimits(max_turns=3, max_tokens=400))
    assert len(samples) == 6 and max(s.episode.turns for s in samples) == 3
    for k, sample in enumerate(samples):
        # Rebuild the episode from what the engine was given and what it returned, round by round.
        rebuilt, mask, logp = [], [], []
        prefix = list(prompts[sample.prompt_index].ids)
        for turn in range(sample.episode.turns):
            inputs, outputs = calls[turn]
            row = k if turn == 0 else inputs.index(prefix + rebuilt)  # the engine got exactly the ids so far
            if turn:
                assert inputs[row] == prefix + rebuilt
            rebuilt += outputs[row].response_ids
            mask += [0] * len(outputs[row].response_ids)
            logp += outputs[row].rollout_logp
            if turn + 1 < sample.episode.turns:
                rebuilt, mask, logp = rebuilt + observation, mask + [1] * len(observation), logp + [0.0] * len(observation)
        assert sample.prompt_ids == prefix and sample.response_ids == rebuilt
        assert sample.observation_mask == mask and sample.rollout_logp == logp
    batch = Batch.from_samples(samples, engine.pad_id)
    for b, sample in enumerate(samples):
        length = len(sample.response_ids)
        assert batch.response_ids[b, :length].tolist() == sample.response_ids
        assert batch.observation_mask[b, :length].tolist() == sample.observation_mask
        assert batch.response_mask[b, :length].tolist() == [1 - o for o in sample.observation_mask]


@pytest.mark.parametrize("layout", ["padded", "shared_prompt", "packed"])
def test_the_learner_scores_each_turn_as_the_engine_did(tiny, layout):
    """Over `[prompt | turn | observation | turn ...]` the learner's log-probs of the model's tokens equal the
    engine's within 1e-4 in every layout: it attends to the observations and places every token as the
    engine did (multimodal RoPE included)."""
    from sapo_ray.learner.forward import policy_forward

    engine, processor, examples, prompts = tiny
    samples = run_episodes(engine.generate, processor.tokenizer, prompts, examples,
                           SamplingParams(n=2, temperature=1.0, max_new_tokens=64, seed=0), Scripted,
                           EpisodeLimits(max_turns=3, max_tokens=300))
    batch = Batch.from_samples(samples, engine.pad_id)
    assert batch.observation_mask.sum() > 0
    with torch.no_grad():
        logp, _ = policy_forward(engine.model.float(), batch, 1.0, engine.banned, engine.vision_tokens, layout=layout)
    model = batch.response_mask.bool()
    assert float((logp - batch.rollout_logp).abs()[model].max()) < 1e-4


def test_the_limits_hold(tiny):
    engine, processor, examples, prompts = tiny
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=64, seed=2)
    two = run_episodes(engine.generate, processor.tokenizer, prompts, examples, params,
                       lambda ex: Scripted(ex, turns=5), EpisodeLimits(max_turns=2, max_tokens=1000))
    assert all(s.episode.turns == 2 and s.episode.cut and not s.finished for s in two if s.episode.turns > 1)
    tight = run_episodes(engine.generate, processor.tokenizer, prompts, examples, params,
                         lambda ex: Scripted(ex, turns=5), EpisodeLimits(max_turns=5, max_tokens=90))
    assert all(len(s.response_ids) <= 90 for s in tight)
    assert any(s.episode.cut for s in tight)
    one = run_episodes(engine.generate, processor.tokenizer, prompts, examples, params,
                       lambda ex: Scripted(ex, turns=1), EpisodeLimits(max_turns=1, max_tokens=1000))
    assert all(s.episode.turns == 1 and not s.episode.cut and s.observation_mask == [0] * len(s.response_ids)
               for s in one if s.finished)


def test_an_environment_that_raises_ends_its_episode_counted(tiny):
    engine, processor, examples, prompts = tiny

    class Broken(Scripted):
        def step(self, text):
            if self.seen:
                raise KeyError("lost state")
            return super().step(text)

    samples = run_episodes(engine.generate, processor.tokenizer, prompts, examples,
                           SamplingParams(n=1, temperature=1.0, max_new_tokens=64, seed=0), Broken,
                           EpisodeLimits(max_turns=4, max_tokens=400))
    two = [s for s in samples if s.episode.turns == 2]
    assert two and all(s.episode.tool_errors == {"env_raised": 1} and not s.episode.cut for s in two)


def test_each_turn_reward_lands_on_its_turns_last_token_and_a_bad_one_ends_the_episode(tiny):
    """An environment rewarding turn k with 0.1 * k: each reward sits on its turn's last model token (the token
    before the observation, or the response's last), nowhere else; the batch carries them; a reward that is
    not a finite number ends its episode as an environment error."""
    engine, processor, examples, prompts = tiny

    class Paying(Scripted):
        def step(self, text):
            step = super().step(text)
            return Step(step.observation, step.tool_calls, step.tool_errors, reward=0.1 * self.seen)

    samples = run_episodes(engine.generate, processor.tokenizer, prompts, examples,
                           SamplingParams(n=2, temperature=1.0, max_new_tokens=64, seed=0), Paying,
                           EpisodeLimits(max_turns=3, max_tokens=400))
    answered = [s for s in samples if s.finished]
    assert answered and all(s.episode.turns == 3 for s in answered)
    for s in answered:
        observed = s.observation_mask + [1]
        ends = [t for t in range(len(s.response_ids)) if not observed[t] and observed[t + 1]]
        assert len(ends) == 3
        assert [t for t, r in enumerate(s.turn_rewards) if r] == ends
        assert [s.turn_rewards[t] for t in ends] == pytest.approx([0.1, 0.2, 0.3])
        assert s.episode.turn_reward == pytest.approx(0.6)
    batch = Batch.from_samples(samples, engine.pad_id)
    for b, s in enumerate(samples):
        assert batch.turn_rewards[b, :len(s.response_ids)].tolist() == pytest.approx(s.turn_rewards or [0.0] * len(s.response_ids))

    class Nan(Scripted):
        def step(self, text):
            return Step(OBSERVATION, reward=float("nan"))

    bad = run_episodes(engine.generate, processor.tokenizer, prompts, examples,
                       SamplingParams(n=1, temperature=1.0, max_new_tokens=64, seed=0), Nan,
                       EpisodeLimits(max_turns=3, max_tokens=400))
    assert all(s.episode.turns == 1 and s.episode.tool_errors == {"env_raised": 1} and s.turn_rewards is None
               for s in bad if s.finished)


def test_a_replayed_teacher_episode_is_laid_out_as_a_sampled_one(tiny):
    """`replay_episode` of synthvista's tool-using turns through the tools environment: each turn's ids and
    end-of-turn token, then the tools' answers tokenized on their own and masked; the warm start's loss
    counts the model's tokens only."""
    import json

    from sapo_ray.data import synthvista as sv
    from sapo_ray.envs.env import ToolEnv
    from sapo_ray.envs.pool import InlineTools
    from sapo_ray.learner.forward import policy_forward
    from sapo_ray.rollout.episodes import replay_episode

    engine, processor, examples, prompts = tiny
    tok = processor.tokenizer
    bars = [(i, e) for i, e in enumerate(examples) if e["metadata"]["template"] != "count"]
    i, example = bars[0]
    params = json.loads(example["metadata"]["params"])
    turns = sv.tool_turns(params, sv.Knobs(hint=False), needless=True)
    sample = replay_episode(tok, prompts[i], turns, ToolEnv(example, InlineTools()), prompt_index=i)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    first = tok(turns[0], add_special_tokens=False)["input_ids"] + [end]
    colours = [b["colour"] for b in params["bars"]]
    answers = tok(tool_responses([ToolResult(c) for c in colours] + [ToolResult(str(sum(b["value"] for b in params["bars"])))]),
                  add_special_tokens=False)["input_ids"]
    last = tok(turns[1], add_special_tokens=False)["input_ids"] + [end]
    assert sample.response_ids == first + answers + last
    assert sample.observation_mask == [0] * len(first) + [1] * len(answers) + [0] * len(last)
    assert sample.episode.turns == 2 and sample.episode.tool_calls == len(colours) + 1 and not sample.episode.tool_errors
    batch = Batch.from_samples([sample], engine.pad_id)
    with torch.no_grad():
        logp, _ = policy_forward(engine.model, batch, 1.0, engine.banned, engine.vision_tokens)
    assert int(batch.response_mask.sum()) == len(first) + len(last) and bool(torch.isfinite(logp).all())
    with pytest.raises(ValueError, match="does not end the episode"):
        replay_episode(tok, prompts[i], turns[:1], ToolEnv(example, InlineTools()))
