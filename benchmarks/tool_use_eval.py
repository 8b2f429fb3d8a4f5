"""Greedy tool-using episodes of a checkpoint on synthvista's held-out split: how often it calls tools, how
many calls, which fail, and its accuracy, per template too (the measurement of a tool-use warm start, RESULTS.md).

    python benchmarks/tool_use_eval.py MODEL_DIR [N] [TEMPLATE,TEMPLATE,...] [MAX_TURNS]
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter

from sapo_ray.batch import SamplingParams
from sapo_ray.data.datasets import load_dataset_split
from sapo_ray.envs.env import ToolEnv
from sapo_ray.envs.pool import ToolPool
from sapo_ray.models import load_policy, load_processor
from sapo_ray.reward import compute_score
from sapo_ray.rollout.engine import HFEngine, encode_prompt
from sapo_ray.rollout.episodes import EpisodeLimits, run_episodes


# A colour answer and the next turn's first words, in a stepwise episode's transcript ("Bar 1 is red.").
ANSWER_THEN_SAID = re.compile(r"<tool_response>\n(\w+)\n</tool_response>.*?<think>Bar \d+ is (\w+)\.", re.S)


def main(path: str, n: int = 64, templates: str | None = None, max_turns: int = 3) -> dict:
    processor = load_processor(path)
    engine = HFEngine(load_policy(path), processor.tokenizer, 64)
    knobs = {"templates": tuple(templates.split(","))} if templates else {}
    examples = load_dataset_split("synthvista", None, "test", n=n, seed=0, hint=False, **knobs)
    prompts = [encode_prompt(processor, e) for e in examples]
    with ToolPool(2, 5.0) as pool:
        samples = run_episodes(engine.generate, processor.tokenizer, prompts, examples,
                               SamplingParams(n=1, temperature=0.0, max_new_tokens=320, seed=0),
                               lambda example: ToolEnv(example, pool), EpisodeLimits(max_turns=max_turns, max_tokens=900))
    acc = [compute_score(s.text, examples[s.prompt_index])["acc"] for s in samples]
    bars = [i for i, e in enumerate(examples) if e["metadata"]["template"] != "count"]
    calls = [samples[i].episode.tool_calls for i in bars]
    errors = sum((Counter(s.episode.tool_errors) for s in samples), Counter())
    pairs = [p for s in samples for p in ANSWER_THEN_SAID.findall(s.episode.transcript)]
    by_template: dict[str, list[float]] = {}
    for s, a in zip(samples, acc):
        by_template.setdefault(examples[s.prompt_index]["metadata"]["template"], []).append(a)
    return {"model": path, "n": n, "templates": templates, "max_turns": max_turns, "accuracy": sum(acc) / n, "bar_accuracy": sum(acc[i] for i in bars) / len(bars),
            "bar_episodes_calling": sum(c > 0 for c in calls) / len(bars), "calls_per_bar_episode": sum(calls) / len(bars),
            "turns": sum(s.episode.turns for s in samples) / n, "failed_calls": dict(errors),
            "answers_repeated": sum(a == b for a, b in pairs) / len(pairs) if pairs else None, "answers_then_said": len(pairs),
            "accuracy_by_template": {k: sum(v) / len(v) for k, v in sorted(by_template.items())}}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], *(int(a) if a.isdigit() else a for a in sys.argv[2:]))))
