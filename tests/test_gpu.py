"""GPU checks (marked `gpu`, skipped without CUDA): the hf engine on CUDA and FSDP2 over NCCL in bf16."""

from __future__ import annotations

import pytest
import torch

from helpers import encode, learner_cfg, rollout_cfg
from sapo_ray.algo import registry
from sapo_ray.batch import Batch, SamplingParams
from sapo_ray.data.datasets import load_dataset_split
from sapo_ray.learner.group import WorkerGroup
from sapo_ray.learner.worker import PolicyWorker
from sapo_ray.models import load_processor
from sapo_ray.rollout.engine import HFEngine

pytestmark = pytest.mark.gpu
MODEL = "bundled:tiny-vlm"


def _cuda_batch(dtype: str = "float32"):
    cfg = rollout_cfg(MODEL, num_gpus=0.5)
    cfg.model.dtype = dtype
    engine = HFEngine.from_config(cfg)
    assert engine.device.type == "cuda"
    processor = load_processor(MODEL)
    prompts = [encode(processor, e) for e in load_dataset_split("synthvista", None, "train", n=8, seed=0)]
    samples = engine.generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=48, seed=0))
    return Batch.from_samples(samples, engine.pad_id), engine


def test_hf_engine_on_cuda_matches_learner_logprobs(ray_cluster):
    batch, _ = _cuda_batch()
    group = WorkerGroup(PolicyWorker, learner_cfg(MODEL, num_gpus=0.5))
    out = group.gather_tensors("compute_logprobs", batch, "policy")
    mask = batch.response_mask.bool()
    assert float((out["old_logp"] - batch.data["rollout_logp"]).abs()[mask].max()) < 1e-3
    group.shutdown()


def test_fsdp2_nccl_bf16_update(ray_cluster):
    """One rank over NCCL with bf16 parameters in compute, fp32 master weights and reductions."""
    batch, engine = _cuda_batch()
    spec = registry.get_algorithm("sapo")
    mask = batch.response_mask
    seg = registry.make_segments(spec, mask, entropy=batch.data["rollout_entropy"])
    batch = batch.with_data(old_logp=batch.data["rollout_logp"], advantages=torch.randn(mask.shape) * mask,
                            seg_end=seg.end_mask)
    group = WorkerGroup(PolicyWorker, learner_cfg(MODEL, num_gpus=0.5, micro_batch_size=8, mini_batch_size=32))
    before = group.call("full_state_dict")[0]
    metrics = group.call_sharded("update", batch)[0]
    after = group.call("full_state_dict")[0]
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert metrics["actor/skipped_steps"] == 0
    assert max(float((after[k].float() - before[k].float()).abs().max()) for k in after) > 0
    assert all(t.dtype == torch.float32 for t in after.values())  # master weights stay fp32
    group.shutdown()
