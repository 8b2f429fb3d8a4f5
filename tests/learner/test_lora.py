"""LoRA on the policy (`sapo_ray.models.lora`, `actor.lora`): the merge by hand, the targeted layers, the
adapted model against its merged copy, and a LoRA policy group's update, reference and weight sync."""

from __future__ import annotations

import dataclasses
import re

import pytest
import ray
import torch

from helpers import learner_cfg, rollout_cfg, sample_batch
from sapo_ray.config import LoraConfig, OptimConfig, resolve_model_path
from sapo_ray.models import lora
from sapo_ray.learner.group import PolicyGroup
from sapo_ray.models import load_policy
from sapo_ray.rollout.worker import RolloutWorker
from sapo_ray.utils import actor_env


def test_merged_state_dict_by_hand():
    """`W + scale * B @ A` under the layer's name; the bias renamed, the adapters gone, other tensors as they were."""
    state = {
        "layer.base_layer.weight": torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]]),
        "layer.base_layer.bias": torch.tensor([0.5, -0.5]),
        "layer.lora_A.default.weight": torch.tensor([[1.0, 2.0, 3.0]]),  # rank 1
        "layer.lora_B.default.weight": torch.tensor([[1.0], [-2.0]]),
        "norm.weight": torch.tensor([3.0]),
    }
    merged = lora.merged_state_dict(state, scale=0.5)
    assert list(merged) == ["layer.weight", "layer.bias", "norm.weight"]
    # B @ A = [[1, 2, 3], [-2, -4, -6]], times 0.5, plus W
    assert torch.equal(merged["layer.weight"], torch.tensor([[1.5, 1.0, 3.5], [-1.0, -1.0, -4.0]]))
    assert torch.equal(merged["layer.bias"], state["layer.base_layer.bias"])
    assert torch.equal(merged["norm.weight"], state["norm.weight"])
    assert lora.adapter_scale(LoraConfig(rank=8, alpha=16.0)) == 2.0


def _linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_the_adapted_layers_are_the_language_models_projections_unless_vision_is_asked():
    model = load_policy(resolve_model_path("bundled:tiny-vlm"))
    names = _linear_names(model)
    language = [n for n in names if re.fullmatch(lora.target_pattern(LoraConfig(rank=2)), n)]
    assert language and all(".visual." not in n and n.rsplit(".", 1)[1].endswith("_proj") for n in language)
    assert len(language) == 7 * model.config.text_config.num_hidden_layers
    both = [n for n in names if re.fullmatch(lora.target_pattern(LoraConfig(rank=2, vision=True)), n)]
    vision = sorted(set(both) - set(language))
    assert vision == sorted(n for n in names if ".visual.blocks." in n)  # every block layer, not the merger
    with pytest.raises(ValueError, match="names no linear layer"):
        lora.add_adapters(model, LoraConfig(rank=2, target_modules=["no_such_layer"]))


def test_an_adapted_model_computes_as_its_merged_copy_and_as_its_base_with_adapters_off():
    path = resolve_model_path("bundled:tiny-vlm")
    base = load_policy(path)
    cfg = LoraConfig(rank=4, alpha=8.0)
    adapted = lora.add_adapters(load_policy(path), cfg)
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    ids = torch.randint(10, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        start = base(input_ids=ids).logits
        assert torch.equal(adapted(input_ids=ids).logits, start)  # B = 0: the adapters start as nothing
        gen = torch.Generator().manual_seed(1)
        for name, p in adapted.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        moved = adapted(input_ids=ids).logits
        assert float((moved - start).abs().max()) > 1e-2
        with lora.adapters_off(adapted):
            assert torch.equal(adapted(input_ids=ids).logits, start)
        merged = load_policy(path)
        merged.load_state_dict(lora.merged_state_dict(adapted.state_dict(), lora.adapter_scale(cfg)))
        assert float((merged(input_ids=ids).logits - moved).abs().max()) < 1e-5


def test_a_lora_policy_trains_its_adapters_keeps_its_base_as_reference_and_syncs_them(ray_cluster):
    """An update at lr 1e-2 moves the adapters alone; the reference's log-probs are the unchanged base's. The sync
    sends the adapters alone (their bytes, not the model's) to an hf engine holding the base with adapters, which
    then samples with the learner's log-probs; the merged model (what vLLM and the export get) scores the same."""
    from sapo_ray.batch import Batch, SamplingParams
    from sapo_ray.rollout.engine import HFEngine
    from sapo_ray.sync import WeightSync

    path = resolve_model_path("bundled:tiny-vlm")
    batch, engine = sample_batch(path, prompts=4, n=2, max_new_tokens=12)
    gen = torch.Generator().manual_seed(0)
    batch = batch.with_fields(old_logp=batch.rollout_logp, advantages=torch.randn(batch.response_mask.shape, generator=gen))
    adapters = LoraConfig(rank=4, alpha=8.0)
    cfg = learner_cfg(path, algorithm="rloo", lora=adapters)
    cfg = dataclasses.replace(cfg, needs_ref=True, sync_adapters=True, learner=dataclasses.replace(
        cfg.learner, optim=dataclasses.replace(cfg.learner.optim, lr=1e-2)))
    group = PolicyGroup(cfg)
    before = group.compute_logprobs(batch).get().logp
    group.update(batch).get()
    state = group.full_state_dict()
    initial = load_policy(path).state_dict()
    mask = batch.response_mask.bool()
    for name, tensor in state.items():
        if not lora.is_adapter(name):
            assert torch.equal(tensor, initial[name.replace(".base_layer.", ".")]), f"{name} moved"
    assert max(float(t.abs().max()) for n, t in state.items() if ".lora_B." in n) > 1e-3
    after = group.compute_logprobs(batch).get().logp
    assert float((after - before).abs()[mask].max()) > 1e-2, "the update did not change the policy"
    reference = group.compute_logprobs(batch, model="reference").get().logp
    assert float((reference - before).abs()[mask].max()) < 1e-5  # the base, adapters off

    rollout = ray.remote(RolloutWorker).options(num_cpus=0.1, runtime_env={"env_vars": actor_env(1)}).remote(
        dataclasses.replace(rollout_cfg(path, max_batch_size=64), lora=adapters))
    metrics = WeightSync(group, [rollout], "object_store", 1 << 20)()
    adapter_bytes = sum(4 * t.numel() for n, t in state.items() if lora.is_adapter(n))
    assert metrics["sync/verified"] == 1.0 and metrics["sync/bytes"] == adapter_bytes
    assert adapter_bytes < 0.1 * sum(4 * t.numel() for t in initial.values())
    prompts, params = _prompts(path), SamplingParams(n=2, temperature=1.0, max_new_tokens=10, seed=3)
    fresh = Batch.from_samples(ray.get(rollout.generate.remote(prompts, params)), engine.pad_id)
    learner = group.compute_logprobs(fresh).get().logp
    m = fresh.response_mask.bool()
    assert float((learner - fresh.rollout_logp).abs()[m].max()) < 1e-4
    merged = HFEngine(load_policy(path), engine.tokenizer, 64)
    merged.update_weights(group.engine_state_dict().items())
    again = Batch.from_samples(merged.generate(prompts, params), engine.pad_id)
    assert again.response_ids.tolist() == fresh.response_ids.tolist()
    assert float((again.rollout_logp - fresh.rollout_logp).abs()[m].max()) < 1e-4
    ray.kill(rollout)
    group.shutdown()


def _prompts(path: str) -> list:
    from helpers import encode
    from sapo_ray.data.datasets import load_dataset_split
    from sapo_ray.models import load_processor

    processor = load_processor(path)
    return [encode(processor, e) for e in load_dataset_split("synthvista", None, "train", n=3, seed=5)]


def test_a_bf16_lora_policy_holds_its_base_in_bf16_and_checkpoints_its_adapters_alone(tmp_path):
    """With `model.dtype=bfloat16` the frozen base is held in bf16 and the adapters are float32 masters (the only
    tensors with optimizer state). A checkpoint holds the adapters and their AdamW moments alone; a fresh rank
    that loads it holds the weights and optimizer state of the saved one, and its next update is the same."""
    import torch.distributed.checkpoint as dcp

    from helpers import local_process_group
    from sapo_ray.learner.worker import PolicyWorker

    path = resolve_model_path("bundled:tiny-vlm")
    batch, _ = sample_batch(path, prompts=2, n=2, max_new_tokens=8)
    gen = torch.Generator().manual_seed(0)
    batch = batch.with_fields(old_logp=batch.rollout_logp, advantages=torch.randn(batch.response_mask.shape, generator=gen))
    cfg = learner_cfg(path, algorithm="rloo", model={"dtype": "bfloat16"}, lora=LoraConfig(rank=4, alpha=8.0),
                      mini_batch_size=4)
    with local_process_group():
        saved = PolicyWorker(0, 1, cfg)
        saved.setup()
        dtypes = {n: p.dtype for n, p in saved.model.named_parameters()}
        assert {d for n, d in dtypes.items() if lora.is_adapter(n)} == {torch.float32}
        assert {d for n, d in dtypes.items() if not lora.is_adapter(n)} == {torch.bfloat16}
        saved.update(batch)
        saved.save_checkpoint(str(tmp_path))
        meta = dcp.FileSystemReader(str(tmp_path)).read_metadata().state_dict_metadata
        stored = {k for k in meta if k.startswith("model.")}
        assert stored == {f"model.{n}" for n in dtypes if lora.is_adapter(n)}
        assert all(lora.is_adapter(k) for k in meta if k.startswith("optim.state."))

        loaded = PolicyWorker(0, 1, cfg)
        loaded.setup()
        loaded.load_checkpoint(str(tmp_path))
        for worker in (saved, loaded):
            worker.update(batch)
        a, b = saved.full_state_dict(), loaded.full_state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert max(float(t.abs().max()) for n, t in a.items() if ".lora_B." in n) > 0


def test_a_bf16_lora_policy_sharded_over_two_ranks_computes_as_one_rank(ray_cluster):
    """FSDP2 over two ranks gathers a bf16 base and float32 adapters in one all-gather (mixed dtypes): the
    log-probs before and after an update and the gradient norm are one rank's, within bf16 noise."""
    path = resolve_model_path("bundled:tiny-vlm")
    batch, _ = sample_batch(path, prompts=4, n=2, max_new_tokens=8)
    gen = torch.Generator().manual_seed(0)
    batch = batch.with_fields(old_logp=batch.rollout_logp, advantages=torch.randn(batch.response_mask.shape, generator=gen))
    runs = []
    for world_size in (1, 2):
        group = PolicyGroup(learner_cfg(path, algorithm="rloo", model={"dtype": "bfloat16"},
                                        lora=LoraConfig(rank=4, alpha=8.0), world_size=world_size,
                                        optim=OptimConfig(lr=1e-2)))
        before = group.compute_logprobs(batch).get().logp
        metrics = group.update(batch).get()[0]
        runs.append((before, metrics, group.compute_logprobs(batch).get().logp))
        group.shutdown()
    (before1, m1, after1), (before2, m2, after2) = runs
    mask = batch.response_mask.bool()
    assert float((after1 - before1).abs()[mask].max()) > 1e-2, "the update did not change the policy"
    torch.testing.assert_close(before2[mask], before1[mask], rtol=0, atol=2e-2)
    torch.testing.assert_close(after2[mask], after1[mask], rtol=0, atol=2e-2)
    assert m2["actor/grad_norm"] == pytest.approx(m1["actor/grad_norm"], rel=2e-2)
