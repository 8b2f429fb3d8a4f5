"""Learning curves that must go up: the whole loop (rollout, scoring, advantages, update, weight sync)
moves the policy toward a reward any policy can chase (shorter answers, `tests/learning_hooks.py`)."""

from __future__ import annotations

import json

import pytest

from test_e2e import tiny_cfg


@pytest.mark.parametrize("algorithm", ["grpo", "sapo"])
def test_reward_rises(algorithm, ray_cluster, tmp_path):
    """Mean score of the last three of 12 steps over the first three. (SAPO's critic starts untrained here:
    on seed 0 its curve stays flat for 8 steps and rises after; 8 steps decided on numerical noise.)"""
    from sapo_ray.main import run

    run(tiny_cfg(tmp_path, "bundled:tiny-vlm", f"algorithm={algorithm}", "trainer.steps=12",
                 "reward.custom=tests/learning_hooks.py:short_answer", "data.prompts_per_step=8", "rollout.n=4",
                 "rollout.max_new_tokens=96", "actor.optim.lr=3e-4", "actor.recompute_old_logp=false",
                 "actor.mini_batch_size=16", "actor.micro_batch_size=16", "critic.mini_batch_size=16",
                 "critic.micro_batch_size=16", "critic.optim.lr=2e-4", "trainer.export_hf=false"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    score = [r["critic/score/mean"] for r in rows if "critic/score/mean" in r]
    length = [r["response_length/mean"] for r in rows if "response_length/mean" in r]
    assert len(score) == 12
    first, last = sum(score[:3]) / 3, sum(score[-3:]) / 3
    assert last > first + 0.05, f"{algorithm}: mean score went {first:.3f} -> {last:.3f} ({score})"
    assert sum(length[-3:]) < sum(length[:3]), length
