"""End-to-end: every algorithm trains a few steps through Ray with the tiny model; resume is exact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import tiny_cfg
from sapo_ray.config import resolve_model_path

ALGORITHMS = ["sapo", "ppo", "vc_ppo", "grpo", "dr_grpo", "rloo", "gspo", "dapo", "soft_sapo"]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_algorithm_runs(algorithm, ray_cluster, tmp_path):
    from sapo_ray.main import run

    # DAPO keeps only groups whose rewards differ: give the model room to answer (and sometimes not).
    extra = ["algorithm.overlong_buffer_len=8", "rollout.max_new_tokens=48", "rollout.n=4"] if algorithm == "dapo" else []
    result = run(tiny_cfg(tmp_path, "bundled:tiny-vlm", f"algorithm={algorithm}", *extra))
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    step = rows[-1]
    masks = {"soft_sapo": "actor/pg_gate_faded"}  # the soft gate clips nothing: its mask is the faded tokens
    expected = {"actor/pg_loss", masks.get(algorithm, "actor/pg_clipfrac"), "actor/ppo_kl", "actor/entropy", "actor/grad_norm",
                "critic/score/mean", "response_length/mean", "timing_s/gen", "timing_s/forward", "timing_s/update",
                "timing_s/update_weights", "perf/throughput", "val/accuracy", "val/accuracy_greedy",
                "rollout/logp_gap_mean", "rollout/logp_gap_max", "sync/verified"}
    if algorithm in ("sapo", "ppo", "vc_ppo"):
        expected |= {"critic/vf_loss", "critic/vf_explained_var", "critic/padding_ratio"}
    if algorithm == "sapo":
        expected |= {"segments/mean_len", "segments/per_response"}
    assert expected <= set(step), sorted(expected - set(step))
    assert all(v is not None and math.isfinite(v) for v in step.values()), step
    assert "val/accuracy" in result
    if algorithm == "dapo":
        assert all(r["rollout/skipped_update"] == 0 for r in rows[1:])
    assert (tmp_path / "hf_policy" / "model.safetensors").exists()


def test_critic_warmup_and_bf16_autocast(ray_cluster, tmp_path):
    """Warm-up steps update only the critic (no actor loss, no weight sync); bf16 autocast runs on the CPU."""
    from sapo_ray.main import run

    run(tiny_cfg(tmp_path, "bundled:tiny-vlm", "algorithm.critic_warmup=1", "actor.autocast_bf16=true",
                 "critic.autocast_bf16=true", "trainer.export_hf=false"))
    rows = {r["step"]: r for r in read_metrics(tmp_path)}
    assert "critic/vf_loss" in rows[1] and "actor/pg_loss" not in rows[1] and "sync/bytes" not in rows[1]
    assert rows[1]["rollout/logp_gap_mean"] < 0.1 and rows[2]["rollout/logp_gap_mean"] < 0.1  # bf16 learner, float32 engine
    assert {"critic/vf_loss", "actor/pg_loss", "sync/bytes"} <= set(rows[2])
    assert all(math.isfinite(v) for v in rows[2].values())


@pytest.mark.parametrize("staleness,lora_rank", [(1, 0), (0, 4)])
def test_resume_reproduces_uninterrupted_run(staleness, lora_rank, ray_cluster, tmp_path):
    """3 steps straight == 2 steps, stop, resume for the third (CPU, same seeds; the on-policy full run is
    `tests/faults/test_stop_signals.py`'s). One step off-policy (`rollout.max_staleness=1`), step 3 trains on
    samples drawn during step 2 with the weights before its update, kept in step 2's checkpoint. With LoRA
    (`actor.lora.rank`, KL in the reward: the reference is the policy with its adapters off), the adapters and
    their optimizer state resume, every sync is verified, and `hf_policy` is a plain model of the base
    architecture, loadable by transformers, whose weights differ from the base's only in the adapted layers."""
    from sapo_ray.main import run

    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["trainer.save_every=1", f"rollout.max_staleness={staleness}", f"actor.lora.rank={lora_rank}"]
    run(tiny_cfg(straight, "bundled:tiny-vlm", "trainer.steps=3", f"trainer.export_hf={lora_rank > 0}", *common))
    run(tiny_cfg(split, "bundled:tiny-vlm", "trainer.steps=2", "trainer.export_hf=false", *common))
    run(tiny_cfg(split, "bundled:tiny-vlm", "trainer.steps=3", "trainer.export_hf=false", *common))
    a = {r["step"]: r for r in read_metrics(straight)}
    b = {r["step"]: r for r in read_metrics(split)}
    assert [a[step]["rollout/staleness"] for step in (1, 2, 3)] == [0, staleness, staleness]
    keys = [k for k in a[3] if not k.startswith(("timing_s", "perf/", "sync/gb_per_s"))]
    assert len(keys) > 20
    for k in keys:
        assert a[3][k] == pytest.approx(b[3][k], rel=1e-5, abs=1e-6), k
    if lora_rank:
        _check_merged_export(a, straight)


def _check_merged_export(rows: dict[int, dict], run_dir: Path) -> None:
    from safetensors.torch import load_file

    from sapo_ray.models import load_policy

    assert all(rows[s]["sync/verified"] == 1.0 and math.isfinite(rows[s]["actor/reward_kl"]) for s in (1, 2, 3))
    exported = load_file(run_dir / "hf_policy" / "model.safetensors")
    assert not any("lora_" in k or "base_layer" in k for k in exported)
    model, base = load_policy(str(run_dir / "hf_policy")).state_dict(), load_policy(resolve_model_path("bundled:tiny-vlm")).state_dict()
    assert model.keys() == base.keys()
    moved = {k for k in model if not torch.equal(model[k].float(), base[k].float())}
    assert moved and all(k.rsplit(".", 2)[-2].endswith("_proj") and ".visual." not in k for k in moved), sorted(moved)


def test_steps_train_on_whole_groups_only(ray_cluster, tmp_path):
    """GRPO, 3 samples per prompt, 2 learner ranks, about half of the prompts too long: every update sees
    an even number of rows made of whole groups (`batch/rows` = 3 x `batch/groups`); steps left with an
    odd number of groups drop one whole group. (At 52 tokens the first six prompt batches keep 4, 2, 2,
    2, 3 and 3 prompts.)"""
    from sapo_ray.main import run

    run(tiny_cfg(tmp_path, "bundled:tiny-vlm", "algorithm=grpo", "rollout.n=3", "data.prompts_per_step=4",
                 "data.max_prompt_length=52", "actor.world_size=2", "actor.num_cpus=0.4", "trainer.steps=6",
                 "trainer.export_hf=false"))
    rows = read_metrics(tmp_path)[1:]
    assert len(rows) == 6
    for r in rows:
        usable = 4 - r["data/prompt_too_long"]
        if r["rollout/skipped_update"]:
            assert usable - r["rollout/trimmed_groups"] == 0 and r["batch/rows"] == r["batch/groups"] == 0
            continue
        assert r["batch/rows"] % 2 == 0 and r["batch/rows"] == 3 * r["batch/groups"]
        assert r["batch/groups"] == usable - r["rollout/trimmed_groups"]
    assert any(r["rollout/trimmed_groups"] > 0 for r in rows), "no step had an odd number of groups to trim"
    assert any(not r["rollout/skipped_update"] for r in rows)
