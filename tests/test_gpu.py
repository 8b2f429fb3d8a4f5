"""GPU checks (marked `gpu`, skipped without CUDA): what the paper's run does, at the tiny model's size.

The hf engine on CUDA; FSDP2 over NCCL with the production dtype (bf16 compute, float32 masters); two
ranks built on the meta device where two GPUs exist; the critic and the frozen reference; both weight
sync methods; DCP save/load; learner offload between phases; a long generation at Qwen2.5's 151,936-token
vocabulary. `make gpu-check` runs these and records the results.
"""

from __future__ import annotations

import pytest
import ray
import torch

from helpers import encode, learner_cfg, rollout_cfg
from sapo_ray.algo import registry
from sapo_ray.batch import Batch, Prompt, SamplingParams
from sapo_ray.data.datasets import load_dataset_split
from sapo_ray.learner.group import CriticGroup, PolicyGroup
from sapo_ray.models import load_processor
from sapo_ray.rollout.engine import HFEngine
from sapo_ray.utils import actor_env

pytestmark = pytest.mark.gpu
MODEL = "bundled:tiny-vlm"
BF16 = {"dtype": "bfloat16"}


def _cuda_batch(dtype: str = "float32"):
    cfg = rollout_cfg(MODEL, num_gpus=0.5)
    cfg.model.dtype = dtype
    engine = HFEngine.from_config(cfg)
    assert engine.device.type == "cuda"
    processor = load_processor(MODEL)
    prompts = [encode(processor, e) for e in load_dataset_split("synthvista", None, "train", n=8, seed=0)]
    samples = engine.generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=48, seed=0))
    return Batch.from_samples(samples, engine.pad_id), engine


def _train_batch():
    batch, engine = _cuda_batch()
    spec = registry.get_algorithm("sapo")
    mask = batch.response_mask
    seg = registry.make_segments(spec, mask, entropy=batch.rollout_entropy)
    gen = torch.Generator().manual_seed(0)
    return batch.with_fields(old_logp=batch.rollout_logp, advantages=torch.randn(mask.shape, generator=gen) * mask,
                           seg_end=seg.end_mask), engine


def _moved(before: dict, after: dict) -> float:
    return max(float((after[k].float() - before[k].float()).abs().max()) for k in after)


# Two runs of the same update on CUDA need not agree bit for bit: SDPA's backward under a mask and
# index_put / scatter accumulate with atomics in no fixed order. At lr <= 1e-3 such reorderings move a
# weight by far less than this, while a wrong update (another batch, lost optimizer state) moves it by
# more than 1e-4.
SAME_WEIGHTS = 1e-5


def test_hf_engine_on_cuda_matches_learner_logprobs(ray_cluster):
    batch, _ = _cuda_batch()
    group = PolicyGroup(learner_cfg(MODEL, num_gpus=0.5))
    out = group.compute_logprobs(batch).get()
    mask = batch.response_mask.bool()
    assert float((out.logp - batch.rollout_logp).abs()[mask].max()) < 1e-3
    group.shutdown()


def test_fsdp2_nccl_bf16_update_keeps_float32_masters(ray_cluster):
    """`model.dtype=bfloat16` (the paper's run): bf16 compute through FSDP2's mixed precision, float32
    master weights that move at lr 1e-6, finite metrics, no skipped step."""
    from sapo_ray.config import OptimConfig

    batch, _ = _train_batch()
    group = PolicyGroup(learner_cfg(MODEL, num_gpus=0.5, micro_batch_size=8, mini_batch_size=32,
                                                  model=BF16, optim=OptimConfig(lr=1e-6)))
    before = group.full_state_dict()
    metrics = group.update(batch).get()[0]
    after = group.full_state_dict()
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert metrics["actor/skipped_steps"] == 0
    assert _moved(before, after) > 0
    assert all(t.dtype == torch.float32 for t in after.values())
    group.shutdown()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_nccl_ranks_match_one(ray_cluster):
    """World size 2 over NCCL (rank 1 built on the meta device, filled from rank 0; the loss denominators
    all-reduced on the GPU) gives the update of one rank with the whole batch."""
    batch, _ = _train_batch()
    states = []
    for world in (1, 2):
        group = PolicyGroup(learner_cfg(MODEL, num_gpus=1, world_size=world, micro_batch_size=8,
                                                      mini_batch_size=32))
        group.update(batch).get()
        states.append(group.full_state_dict())
        group.shutdown()
    assert max(float((states[0][k] - states[1][k]).abs().max()) for k in states[0]) < 1e-4


def test_critic_and_reference_on_cuda(ray_cluster):
    """The critic's values and update, and the frozen bf16 reference's log-probs (equal to the policy's
    before any update, up to bf16 rounding)."""
    batch, _ = _train_batch()
    mask = batch.response_mask
    critic = CriticGroup(learner_cfg(MODEL, role="critic", num_gpus=0.25, model=BF16,
                                                   micro_batch_size=8, mini_batch_size=32))
    values = critic.compute_values(batch).get()
    assert torch.isfinite(values).all() and values.shape == mask.shape
    scored = batch.with_fields(values=values, returns=values + 1.0, value_mask=mask)
    metrics = critic.update(scored).get()[0]
    assert metrics["critic/skipped_steps"] == 0 and metrics["critic/vf_loss"] > 0
    critic.shutdown()
    from dataclasses import replace

    policy = PolicyGroup(replace(learner_cfg(MODEL, algorithm="grpo", num_gpus=0.25, model=BF16),
                                               needs_ref=True))
    ref = policy.compute_logprobs(batch, model="reference").get().logp
    old = policy.compute_logprobs(batch).get().logp
    assert float((ref - old).abs()[mask.bool()].mean()) < 5e-2
    policy.shutdown()


@pytest.mark.parametrize("method", ["object_store", pytest.param("broadcast", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL joins no two processes on one GPU: broadcast needs 2 GPUs"))])
def test_weight_sync_into_a_cuda_engine(method, ray_cluster):
    """After an update, either sync method makes the CUDA engine score like the learner (object_store with
    learner and engine sharing a GPU; broadcast with a GPU each, as config validation requires)."""
    from sapo_ray.rollout.worker import RolloutWorker
    from sapo_ray.sync import WeightSync

    batch, engine = _train_batch()
    share = 0.4 if method == "object_store" else 1.0
    group = PolicyGroup(learner_cfg(MODEL, num_gpus=share, micro_batch_size=8, mini_batch_size=32))
    rollout = ray.remote(RolloutWorker).options(num_cpus=0.1, num_gpus=share, runtime_env={"env_vars": actor_env(1)}
                                                ).remote(rollout_cfg(MODEL, num_gpus=share))
    group.update(batch).get()
    metrics = WeightSync(group, [rollout], method, 1 << 20)()
    assert metrics["sync/buckets"] > 1
    processor = load_processor(MODEL)
    prompts = [encode(processor, e) for e in load_dataset_split("synthvista", None, "train", n=3, seed=5)]
    samples = ray.get(rollout.generate.remote(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=16, seed=3)))
    fresh = Batch.from_samples(samples, engine.pad_id)
    learner = group.compute_logprobs(fresh).get()
    m = fresh.response_mask.bool()
    assert float((learner.logp - fresh.rollout_logp).abs()[m].max()) < 1e-3
    ray.kill(rollout)
    group.shutdown()


def test_dcp_checkpoint_round_trip_on_cuda(ray_cluster, tmp_path):
    """Save, update, load: the weights are the saved ones again, and the next update repeats exactly."""
    batch, _ = _train_batch()
    group = PolicyGroup(learner_cfg(MODEL, num_gpus=0.5, micro_batch_size=8, mini_batch_size=32,
                                                  model=BF16))
    group.save_checkpoint(str(tmp_path / "ckpt"))
    saved = group.full_state_dict()
    group.update(batch).get()
    first = group.full_state_dict()
    group.load_checkpoint(str(tmp_path / "ckpt"))
    assert _moved(saved, group.full_state_dict()) == 0  # loading copies: exact
    group.update(batch).get()
    assert _moved(first, group.full_state_dict()) < SAME_WEIGHTS
    group.shutdown()


def test_offload_frees_the_gpu_and_changes_no_update(ray_cluster):
    """`learner.offload`: after `offload` the rank holds under 5% of the GPU memory it held (without the
    option it keeps its state); onload, update: the same weights as a rank that never offloaded."""
    batch, _ = _train_batch()
    states = []
    for offload in (False, True):
        group = PolicyGroup(learner_cfg(MODEL, num_gpus=0.5, micro_batch_size=8, mini_batch_size=32,
                                                      offload=offload))
        group.update(batch).get()  # optimizer state exists from here on
        before = ray.get(group.workers[0].gpu_memory_mb.remote())
        group.offload()
        after = ray.get(group.workers[0].gpu_memory_mb.remote())
        if offload:
            assert after < 0.05 * before, f"{after} of {before} MB still on the GPU after offload"
        else:
            assert after > 0.9 * before
        group.onload()
        group.update(batch).get()
        states.append(group.full_state_dict())
        group.shutdown()
    assert _moved(states[0], states[1]) < SAME_WEIGHTS


def test_long_generation_at_the_full_vocabulary():
    """8 rows x 1024 steps at vocabulary 151,936 (a random narrow model): the engine's extra memory stays
    far below one step-by-vocabulary logits tensor (5 GB), and its log-probs equal the learner's."""
    from transformers import AutoConfig

    from sapo_ray.learner.forward import policy_forward
    from sapo_ray.models.loading import build_from_config
    from sapo_ray.models.processor import _check_dir

    path = _check_dir("bundled:tiny-lm")
    config = AutoConfig.from_pretrained(path)
    config.vocab_size = 151_936
    torch.manual_seed(0)
    model = build_from_config(config, torch.bfloat16, "sdpa").cuda()
    engine = HFEngine(model, load_processor(path), max_batch_size=8)
    engine.eos_ids = [config.vocab_size + 1]  # never drawn: every row runs all steps
    prompts = [Prompt(torch.randint(10, 400, (32,), generator=torch.Generator().manual_seed(i)).tolist()) for i in range(8)]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    samples = engine.generate(prompts, SamplingParams(n=1, temperature=1.0, max_new_tokens=1024, seed=0))
    extra_gb = (torch.cuda.max_memory_allocated() - base) / 2**30
    assert all(len(s.response_ids) == 1024 for s in samples)
    assert extra_gb < 1.0, f"generation took {extra_gb:.2f} GB above the model"
    batch = Batch.from_samples(samples[:2], engine.pad_id)
    batch = batch.to(torch.device("cuda"))
    with torch.no_grad():
        logp, _ = policy_forward(model, batch, 1.0, engine.banned, None, with_entropy=False)
    mask = batch.response_mask.bool()
    assert float((logp - batch.rollout_logp).abs()[mask].mean()) < 2e-2  # bf16 forward, two paths


def _attn_implementations() -> list[str]:
    import importlib.util

    return ["sdpa", "sdpa_gqa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


@pytest.mark.parametrize("attn", _attn_implementations())
def test_layouts_agree_on_cuda(attn, ray_cluster):
    """`learner.layout` padded, shared_prompt and packed (variable-length attention under
    flash_attention_2) give the same log-probs on CUDA, for each attention implementation available."""
    batch, _ = _cuda_batch()
    model = {"attn_implementation": attn} | (BF16 if attn == "flash_attention_2" else {})
    scored = {}
    for layout in ("padded", "shared_prompt", "packed"):
        group = PolicyGroup(learner_cfg(MODEL, num_gpus=0.5, model=model, layout=layout))
        scored[layout] = group.compute_logprobs(batch).get().logp
        group.shutdown()
    mask = batch.response_mask.bool()
    tolerance = 5e-2 if attn == "flash_attention_2" else 1e-4  # bf16 compute for flash-attention
    for layout in ("shared_prompt", "packed"):
        assert float((scored[layout] - scored["padded"]).abs()[mask].mean()) < tolerance, layout
