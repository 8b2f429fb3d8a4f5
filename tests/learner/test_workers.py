"""FSDP2 learner workers as Ray actors: data-parallel parity and weight sync into a rollout engine."""

from __future__ import annotations

import pytest
import ray
import torch

from helpers import learner_cfg, rollout_cfg, sample_batch
from sapo_ray.algo import registry
from sapo_ray.learner.group import WorkerGroup
from sapo_ray.learner.worker import PolicyWorker
from sapo_ray.rollout.worker import RolloutWorker
from sapo_ray.utils import actor_env


def _train_batch(path, spec):
    batch, engine = sample_batch(path, prompts=4, n=2, max_new_tokens=12)
    mask = batch.response_mask
    gen = torch.Generator().manual_seed(0)
    seg = registry.make_segments(spec, mask, entropy=torch.rand(mask.shape, generator=gen))
    data = {"old_logp": batch.data["rollout_logp"], "advantages": torch.randn(mask.shape, generator=gen) * mask}
    if seg is not None:
        data["seg_end"] = seg.end_mask
    return batch.with_data(**data), engine.pad_id


def test_two_fsdp_ranks_match_one_rank_update(ray_cluster, random_tiny_models):
    """Same batch, one optimizer step: 2 ranks x 4 rows == 1 rank x 8 rows (two micro-batches)."""
    path = random_tiny_models["vlm"]
    spec = registry.get_algorithm("sapo")
    batch, _ = _train_batch(path, spec)
    states, metrics = [], []
    for world in (1, 2):
        group = WorkerGroup(PolicyWorker, learner_cfg(path, world_size=world))
        metrics.append(group.call_sharded("update", batch)[0])
        states.append(group.call("full_state_dict")[0])
        group.shutdown()
    from sapo_ray.models import load_policy

    initial = load_policy(path).state_dict()
    moved = max(float((states[0][k] - initial[k]).abs().max()) for k in states[0])
    assert moved > 1e-4, "the update left the weights unchanged"
    worst = max(float((states[0][k] - states[1][k]).abs().max()) for k in states[0])
    assert worst < 1e-5, f"2-rank update differs from 1-rank update by {worst}"


def test_frozen_vision_tower_keeps_its_weights(ray_cluster, random_tiny_models):
    """`freeze_vision_tower`: one update moves the language model and leaves every vision weight as it was."""
    path = random_tiny_models["vlm"]
    spec = registry.get_algorithm("sapo")
    batch, _ = _train_batch(path, spec)
    group = WorkerGroup(PolicyWorker, learner_cfg(path, freeze_vision_tower=True))
    group.call_sharded("update", batch)
    state = group.call("full_state_dict")[0]
    group.shutdown()
    from sapo_ray.models import load_policy

    initial = load_policy(path).state_dict()
    moved = {k: float((state[k] - initial[k]).abs().max()) for k in state}
    vision = [k for k in moved if ".visual." in f".{k}"]
    assert vision and max(moved[k] for k in vision) == 0.0
    assert max(v for k, v in moved.items() if k not in vision) > 1e-4


@pytest.mark.parametrize("method", ["object_store", "broadcast"])
def test_sync_makes_engine_sample_with_new_weights(method, ray_cluster, random_tiny_models):
    """After an update and a sync (either `rollout.weight_sync`), the engine's log-probs equal the learner's
    on the same tokens."""
    from sapo_ray.sync import WeightSync

    path = random_tiny_models["vlm"]
    spec = registry.get_algorithm("rloo")
    batch, pad_id = _train_batch(path, spec)
    group = WorkerGroup(PolicyWorker, learner_cfg(path, algorithm="rloo"))
    rollout = ray.remote(RolloutWorker).options(num_cpus=0.1, runtime_env={"env_vars": actor_env(1)}).remote(
        rollout_cfg(path, max_batch_size=64))
    before = group.gather_tensors("compute_logprobs", batch, "policy")["old_logp"]
    group.call_sharded("update", batch)
    after = group.gather_tensors("compute_logprobs", batch, "policy")["old_logp"]
    mask = batch.response_mask.bool()
    assert float((after - before).abs()[mask].max()) > 1e-3, "the update did not change the policy"

    sync = WeightSync(group, [rollout], method, 64 * 1024)  # small buckets: several of them
    metrics = sync()
    assert metrics["sync/buckets"] > 1
    assert metrics["sync/bytes"] > 0
    # Generate with the synced engine, then score the same tokens with the learner.
    from helpers import encode
    from sapo_ray.data.datasets import load_dataset_split
    from sapo_ray.models import load_processor
    from sapo_ray.batch import SamplingParams
    from sapo_ray.batch import Batch

    processor = load_processor(path)
    prompts = [encode(processor, e) for e in load_dataset_split("synthvista", None, "train", n=3, seed=5)]
    samples = ray.get(rollout.generate.remote(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=3)))
    fresh = Batch.from_samples(samples, pad_id)
    learner = group.gather_tensors("compute_logprobs", fresh, "policy")
    m = fresh.response_mask.bool()
    diff = float((learner["old_logp"] - fresh.data["rollout_logp"]).abs()[m].max())
    assert diff < 1e-4, f"engine and learner log-probs disagree by {diff} after the sync"
    diff = float((learner["entropy"] - fresh.data["rollout_entropy"]).abs()[m].max())
    assert diff < 1e-4, f"engine and learner entropies disagree by {diff} after the sync"
    ray.kill(rollout)
    group.shutdown()


def test_bf16_model_keeps_float32_master_weights(ray_cluster, random_tiny_models, tmp_path):
    """`model.dtype=bfloat16` at lr 1e-6: the update still moves the (float32) master weights, which a bf16
    weight of this size could not take (its spacing is ~1e-4); the checkpoint stores float32, and the
    engines get the weights in bf16."""
    import torch.distributed.checkpoint as dcp

    from sapo_ray.config import OptimConfig

    path = random_tiny_models["vlm"]
    batch, _ = _train_batch(path, registry.get_algorithm("sapo"))
    group = WorkerGroup(PolicyWorker, learner_cfg(path, model={"dtype": "bfloat16"}, optim=OptimConfig(lr=1e-6)))
    before = group.call("full_state_dict")[0]
    assert all(t.dtype == torch.float32 for t in before.values())
    metrics = group.call_sharded("update", batch)[0]
    assert metrics["actor/skipped_steps"] == 0
    after = group.call("full_state_dict")[0]
    total = sum(t.numel() for t in after.values())
    moved = sum(int((after[k] != before[k]).sum()) for k in after)
    moved_bf16 = sum(int((after[k].bfloat16() != before[k].bfloat16()).sum()) for k in after)
    assert moved > 0.5 * total, f"only {moved} of {total} weights moved at lr 1e-6"
    # The same step rounded to bf16 would have left most weights where they were.
    assert moved_bf16 < 0.2 * moved
    group.call("save_checkpoint", str(tmp_path / "ckpt"))
    meta = dcp.FileSystemReader(str(tmp_path / "ckpt")).read_metadata().state_dict_metadata
    stored = {m.properties.dtype for k, m in meta.items() if k.startswith("model.") and hasattr(m, "properties")}
    assert stored == {torch.float32}
    buckets = group.call("engine_state_dict")[0]
    assert all(t.dtype == torch.bfloat16 for t in buckets.values() if t.is_floating_point())
    group.shutdown()
