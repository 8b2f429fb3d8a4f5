"""The tools environment: a turn's calls answered in order, a turn without one ends the episode."""

from __future__ import annotations

from collections import Counter

import pytest
from PIL import Image

from sapo_ray.envs.env import ENVS, Step, ToolEnv, env_factory, step_all
from sapo_ray.envs.pool import InlineTools, ToolPool


@pytest.fixture(scope="module")
def tools():
    with ToolPool(num_workers=1, timeout_s=5.0) as pool:
        yield pool


def test_calls_are_answered_in_order_and_an_answer_ends_the_episode(tools):
    image = Image.new("RGB", (20, 20), (38, 90, 210))  # synthvista's blue
    env = ToolEnv({"images": [image]}, tools)
    step = env.step('<think>Which colour?</think><tool_call>{"name": "colour_at", "arguments": {"x": 3, "y": 4}}'
                    '</tool_call><tool_call>{"name": "calculator", "arguments": {"expression": "2 * 3.5"}}</tool_call>'
                    '<tool_call>{"name": "zoom", "arguments": {}}</tool_call>')
    assert step.observation.count("<tool_response>") == 3
    assert step.observation.index("\nblue\n") < step.observation.index("\n7\n") < step.observation.index("no tool 'zoom'")
    assert step.tool_calls == 3 and step.tool_errors == Counter({"unknown_tool": 1})
    assert step.observation.endswith("<|im_start|>assistant\n")
    final = env.step("<think>It is blue.</think> The answer is \\boxed{blue}.")
    assert final.observation is None and final.tool_calls == 0


class CountingTools(InlineTools):
    """Runs calls inline and keeps how many each `run` got."""

    def __init__(self):
        self.runs = []

    def run(self, calls):
        self.runs.append(len(calls))
        return super().run(calls)


def _calc(*expressions):
    return "".join(f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{e}"}}}}</tool_call>'
                   for e in expressions)


def test_a_rounds_tool_calls_go_to_the_pool_together_and_each_episode_gets_its_own_answers():
    """`step_all` over one round: the calls of three tool episodes reach the pool in one `run` (4 calls),
    each episode's observation holds its own results in its own order; an episode whose turn calls nothing
    ends; another environment (and a `ToolEnv` subclass with a `step` of its own) answers through its `step`,
    and one that raises ends its episode counted."""
    tools = CountingTools()

    class Louder(ToolEnv):
        def step(self, text):
            return Step("LOUD", tool_calls=0)

    class Broken:
        def step(self, text):
            raise RuntimeError("no")

    envs = [ToolEnv({}, tools), ToolEnv({}, tools), Louder({}, tools), ToolEnv({}, tools), Broken(), ToolEnv({}, tools)]
    texts = [_calc("1 + 1", "2 * 3"), "The answer is 5.", "", _calc("10 - 1"), "", _calc("7 * 6")]
    steps = step_all(list(zip(envs, texts)))
    assert tools.runs == [4]
    assert "\n2\n" in steps[0].observation and "\n6\n" in steps[0].observation
    assert steps[0].observation.index("\n2\n") < steps[0].observation.index("\n6\n") and steps[0].tool_calls == 2
    assert steps[1].observation is None and steps[2].observation == "LOUD"
    assert "\n9\n" in steps[3].observation and "\n42\n" in steps[5].observation
    assert "\n9\n" not in steps[5].observation and steps[5].tool_calls == 1
    assert steps[4].observation is None and steps[4].tool_errors == Counter({"env_raised": 1})


def test_environments_by_name_or_file(tmp_path):
    assert env_factory("tools") is ENVS["tools"] is ToolEnv
    (tmp_path / "mine.py").write_text("class Echo:\n    def __init__(self, example, tools):\n        pass\n"
                                      "    def step(self, text):\n        return None\n")
    assert env_factory(f"{tmp_path}/mine.py:Echo").__name__ == "Echo"
    with pytest.raises(ValueError, match="unknown environment 'nope'"):
        env_factory("nope")
    with pytest.raises(ValueError, match="needs a tool pool"):
        ToolEnv({}, None)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["sapo", "ppo"])
def test_episodes_train_end_to_end(algorithm, ray_cluster, tmp_path):
    """Two steps on episodes of two turns with an observation between (a scripted environment from a file):
    the rollout workers run the episodes, the metrics count their turns, and the policy and the critic
    update over responses with observations in them (SAPO's segments and PPO's per-token GAE skip them)."""
    import json
    from pathlib import Path

    from helpers import tiny_cfg
    from sapo_ray.main import run

    env = f"{Path(__file__).with_name('scripted_env.py')}:OneObservation"
    run(tiny_cfg(tmp_path / "run", "bundled:tiny-vlm", f"algorithm={algorithm}", f"env.name={env}", "env.max_turns=2",
                 "env.max_tokens=160", "rollout.max_new_tokens=64", "data.hint=false", "trainer.dump_rollouts=true"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    trained = rows[1:]
    assert all(r["actor/grad_norm"] > 0 and r["critic/grad_norm"] > 0 for r in trained)
    assert max(r["episode/turns"] for r in trained) > 1 and max(r["episode/observation_tokens"] for r in trained) > 0
    dumped = [json.loads(line) for f in (tmp_path / "run" / "generations").glob("rollout_*.jsonl")
              for line in f.read_text().splitlines()]
    two = [d for d in dumped if d["turns"] == 2]
    assert two and all("<tool_response>\n7\n</tool_response>" in d["transcript"] and d["tool_calls"] == 1 for d in two)
    # The experience dumps (`sapo_ray.inspect`): every trained row per token, its observations marked, the
    # loss's trace once the policy trains, the images beside them.
    gen = tmp_path / "run" / "generations"
    experience = {step: [json.loads(line) for line in (gen / f"experience_step_{step:06d}.jsonl").read_text().splitlines()]
                  for step in (1, 2)}
    assert [len(experience[s]) for s in (1, 2)] == [r["batch/rows"] for r in trained]
    for record in experience[1] + experience[2]:
        n = len(record["tokens"])
        assert all(len(record[k]) == n for k in ("observation", "entropy", "advantages", "values", "returns", "anchors"))
        assert (record["seg_end"] is None) == (algorithm == "ppo")
        observed = "".join(t for t, o in zip(record["tokens"], record["observation"]) if o)
        assert ("<tool_response>\n7\n</tool_response>" in observed) == (record["episode"]["turns"] == 2)
        assert not any(a for a, o in zip(record["advantages"], record["observation"]) if o)
        assert all((gen / image).is_file() for image in record["images"]) and record["images"]
    traced = [r for r in experience[1] + experience[2] if r["log_ratio"] is not None]
    assert traced and all(len(r["log_ratio"]) == len(r["clipped"]) == len(r["tokens"]) for r in traced)
    assert not any(x for r in traced for x, o in zip(r["log_ratio"], r["observation"]) if o)


def test_prompts_list_the_tools_where_the_chat_template_has_a_place_for_them():
    """`episode_tools` gives the configured tools as function schemas; a template with a tools section lists
    them, one without renders the prompt as before."""
    from sapo_ray.config import EnvConfig
    from sapo_ray.models import load_tokenizer
    from sapo_ray.rollout.engine import encode_prompt
    from sapo_ray.rollout.episodes import episode_tools

    assert episode_tools(EnvConfig()) is None
    tools = episode_tools(EnvConfig(name="tools", tools=["calculator"]))
    assert [t["function"]["name"] for t in tools] == ["calculator"]
    example = {"pid": "x", "query": "What is 3 + 4?", "images": []}
    plain = load_tokenizer("bundled:tiny-lm")
    assert encode_prompt(plain, example, tools=tools).ids == encode_prompt(plain, example).ids
    listing = load_tokenizer("bundled:tiny-lm")
    listing.chat_template = ("{% if tools %}Tools: {{ tools | map(attribute='function') | map(attribute='name') "
                             "| join(', ') }}\n{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert listing.decode(encode_prompt(listing, example, tools=tools).ids).startswith("Tools: calculator\n")


@pytest.mark.slow
def test_the_agent_demo_runs_tool_using_episodes(ray_cluster, tmp_path):
    """`+experiment=agent_demo`, cut to one step of 4 prompts: its bundled warm start calls `colour_at` in its
    episodes (the colour questions' tool), the calls succeed, and validation runs the episodes too."""
    import json

    from sapo_ray.config import compose_config
    from sapo_ray.main import run

    run(compose_config("+experiment=agent_demo", f"trainer.run_dir={tmp_path / 'run'}", "trainer.steps=1",
                       "trainer.val_every=0", "trainer.loggers=[jsonl]", "data.prompts_per_step=4", "data.val_size=4",
                       "rollout.n=2", "rollout.val_n=1", "algorithm.critic_warmup=0", "actor.mini_batch_size=8",
                       "actor.micro_batch_size=8", "critic.mini_batch_size=8", "critic.micro_batch_size=8"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trained = rows[1]
    assert trained["episode/tool_calls"] > 0 and trained["episode/turns"] > 1
    assert trained["actor/grad_norm"] > 0 and "val/episode/tool_calls" in rows[-1]
