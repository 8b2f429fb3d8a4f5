"""FSDP2 learner workers as Ray actors: data-parallel parity and weight sync into a rollout engine."""

from __future__ import annotations

import dataclasses

import pytest
import ray
import torch

from helpers import learner_cfg, local_process_group, rollout_cfg, sample_batch
from sapo_ray.algo import registry
from sapo_ray.learner.group import CriticGroup, PolicyGroup
from sapo_ray.learner.worker import PolicyWorker
from sapo_ray.rollout.worker import RolloutWorker
from sapo_ray.utils import actor_env


def _train_batch(path, spec):
    batch, engine = sample_batch(path, prompts=4, n=2, max_new_tokens=12)
    mask = batch.response_mask
    gen = torch.Generator().manual_seed(0)
    seg = registry.make_segments(spec, mask, entropy=torch.rand(mask.shape, generator=gen))
    data = {"old_logp": batch.rollout_logp, "advantages": torch.randn(mask.shape, generator=gen) * mask}
    if seg is not None:
        data["seg_end"] = seg.end_mask
    return batch.with_fields(**data), engine.pad_id


def test_two_fsdp_ranks_match_one_rank_update(ray_cluster, random_tiny_models):
    """Same batch, one optimizer step: 2 ranks x 4 rows == 1 rank x 8 rows (two micro-batches)."""
    path = random_tiny_models["vlm"]
    spec = registry.get_algorithm("sapo")
    batch, _ = _train_batch(path, spec)
    states, metrics = [], []
    for world in (1, 2):
        group = PolicyGroup(learner_cfg(path, world_size=world))
        metrics.append(group.update(batch).get()[0])
        states.append(group.full_state_dict())
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
    group = PolicyGroup(learner_cfg(path, freeze_vision_tower=True))
    group.update(batch).get()
    state = group.full_state_dict()
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
    group = PolicyGroup(learner_cfg(path, algorithm="rloo"))
    rollout = ray.remote(RolloutWorker).options(num_cpus=0.1, runtime_env={"env_vars": actor_env(1)}).remote(
        rollout_cfg(path, max_batch_size=64))
    before = group.compute_logprobs(batch).get().logp
    group.update(batch).get()
    after = group.compute_logprobs(batch).get().logp
    mask = batch.response_mask.bool()
    assert float((after - before).abs()[mask].max()) > 1e-3, "the update did not change the policy"

    sync = WeightSync(group, [rollout], method, 64 * 1024)  # small buckets: several of them
    metrics = sync()
    assert metrics["sync/buckets"] > 1
    assert metrics["sync/bytes"] > 0
    assert metrics["sync/verified"] == 1.0
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
    learner = group.compute_logprobs(fresh).get()
    m = fresh.response_mask.bool()
    diff = float((learner.logp - fresh.rollout_logp).abs()[m].max())
    assert diff < 1e-4, f"engine and learner log-probs disagree by {diff} after the sync"
    diff = float((learner.entropy - fresh.rollout_entropy).abs()[m].max())
    assert diff < 1e-4, f"engine and learner entropies disagree by {diff} after the sync"
    ray.kill(rollout)
    group.shutdown()


def test_the_update_measures_the_engine_learner_gap_before_its_first_step(ray_cluster, random_tiny_models):
    """`actor.recompute_old_logp=false`: `rollout/logp_gap_*` are |engine - learner| log-probs of the first
    mini-batch's tokens, scored before any optimizer step. The sampling engine holds the learner's weights (float32
    both: a gap of ~1e-6), so engine log-probs shifted by 0, 0.25 and 0.5 by row give the shifts' token mean and max."""
    path = random_tiny_models["vlm"]
    batch, _ = _train_batch(path, registry.get_algorithm("rloo"))
    mask = batch.response_mask.bool()
    shift = (torch.arange(len(batch)) % 3 * 0.25)[:, None].expand_as(mask)
    engine = batch.rollout_logp - shift * mask
    batch = batch.with_fields(rollout_logp=engine, old_logp=engine)
    group = PolicyGroup(learner_cfg(path, algorithm="rloo", mini_batch_size=4, recompute_old_logp=False))
    metrics = group.update(batch).get()[0]
    group.shutdown()
    first = mask[:4]  # no shuffling: the first mini-batch is rows 0-3; the second is scored after a step
    assert metrics["rollout/logp_gap_mean"] == pytest.approx(float(shift[:4][first].mean()), abs=1e-4)
    assert metrics["rollout/logp_gap_max"] == pytest.approx(0.5, abs=1e-4)
    recomputing = PolicyGroup(learner_cfg(path, algorithm="rloo", recompute_old_logp=True))
    assert "rollout/logp_gap_mean" not in recomputing.update(batch).get()[0]  # the trainer measures the whole batch
    recomputing.shutdown()


def _faulty_rollout_worker(cfg, fault: str, name: str, other: str):
    """A rollout worker whose engine mishandles the tensor `name` of every weight load: `skip` drops it, `stale`
    loads the engine's first value of it instead, `rename` loads it under `other` (a tensor of the same shape)."""

    class FaultyRolloutWorker(RolloutWorker):  # defined here so that Ray ships it by value
        def __init__(self, cfg):
            super().__init__(cfg)
            load, first = self.engine.update_weights, self.engine.model.state_dict()[name].clone()

            def faulty(named_tensors):
                out = []
                for n, t in named_tensors:
                    if n == name and fault == "skip":
                        continue
                    out.append((other if n == name and fault == "rename" else n,
                                first if n == name and fault == "stale" else t))
                return load(out)

            self.engine.update_weights = faulty

    return ray.remote(FaultyRolloutWorker).options(num_cpus=0.1, runtime_env={"env_vars": actor_env(1)}).remote(cfg)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_the_sync_check_catches_a_skipped_a_stale_and_a_misnamed_tensor(lora_rank, ray_cluster, random_tiny_models):
    """Engines that drop a tensor, keep its old value, or load it under another tensor's name: every sync method
    stops the run naming the tensor, where without the check the engine would sample from stale weights. With
    LoRA (`lora_rank`) the sync sends the adapters alone, and the tensor is an adapter."""
    from sapo_ray.config import LoraConfig
    from sapo_ray.errors import StopRun
    from sapo_ray.sync import WeightSync

    path = random_tiny_models["vlm"]
    batch, _ = _train_batch(path, registry.get_algorithm("rloo"))
    adapters = LoraConfig(rank=lora_rank)
    group = PolicyGroup(dataclasses.replace(learner_cfg(path, algorithm="rloo", lora=adapters), sync_adapters=lora_rank > 0))
    group.update(batch).get()
    layer = "model.language_model.layers.{}.mlp.down_proj" + (".lora_B.default.weight" if lora_rank else ".weight")
    name, other = layer.format(0), layer.format(1)
    assert name in group.full_state_dict() and other in group.full_state_dict()
    cfg = dataclasses.replace(rollout_cfg(path, max_batch_size=64), lora=adapters)
    faults = ["skip", "stale", "rename"]
    workers = [_faulty_rollout_worker(cfg, fault, name, other) for fault in faults]
    sync = WeightSync(group, workers, "object_store", 64 * 1024)
    for i, fault in enumerate(faults):
        with pytest.raises(StopRun, match=f"rollout worker {i} (does not hold|holds another) '{name}'"):
            sync(only=[i])
    # Broadcast: the same check over the process group (a group is built once per learner: one fault).
    workers.append(_faulty_rollout_worker(cfg, "stale", name, other))
    with pytest.raises(StopRun, match=f"rollout worker 0 holds another '{name}'"):
        WeightSync(group, workers[3:], "broadcast", 64 * 1024)()
    for w in workers:
        ray.kill(w)
    group.shutdown()


def test_bf16_model_keeps_float32_master_weights(ray_cluster, random_tiny_models, tmp_path):
    """`model.dtype=bfloat16` at lr 1e-6: the update still moves the (float32) master weights, which a bf16
    weight of this size could not take (its spacing is ~1e-4); the checkpoint stores float32, and the
    engines get the weights in bf16."""
    import torch.distributed.checkpoint as dcp

    from sapo_ray.config import OptimConfig

    path = random_tiny_models["vlm"]
    batch, _ = _train_batch(path, registry.get_algorithm("sapo"))
    group = PolicyGroup(learner_cfg(path, model={"dtype": "bfloat16"}, optim=OptimConfig(lr=1e-6)))
    before = group.full_state_dict()
    assert all(t.dtype == torch.float32 for t in before.values())
    metrics = group.update(batch).get()[0]
    assert metrics["actor/skipped_steps"] == 0
    after = group.full_state_dict()
    total = sum(t.numel() for t in after.values())
    moved = sum(int((after[k] != before[k]).sum()) for k in after)
    moved_bf16 = sum(int((after[k].bfloat16() != before[k].bfloat16()).sum()) for k in after)
    assert moved > 0.5 * total, f"only {moved} of {total} weights moved at lr 1e-6"
    # The same step rounded to bf16 would have left most weights where they were.
    assert moved_bf16 < 0.2 * moved
    group.save_checkpoint(str(tmp_path / "ckpt"))
    meta = dcp.FileSystemReader(str(tmp_path / "ckpt")).read_metadata().state_dict_metadata
    stored = {m.properties.dtype for k, m in meta.items() if k.startswith("model.") and hasattr(m, "properties")}
    assert stored == {torch.float32}
    buckets = group.engine_state_dict()
    assert all(t.dtype == torch.bfloat16 for t in buckets.values() if t.is_floating_point())
    group.shutdown()


def test_chunked_scoring_matches_the_whole_and_detaches_the_entropy(monkeypatch):
    """`logprobs_and_entropy` scores pieces of `CHUNK_TOKENS` positions with a hand-written backward pass:
    values and gradients (of log-probs, entropies, or both) equal autograd's through one whole-tensor
    computation; the logits' extra last position (the model's output) is unscored with a zero gradient;
    `entropy_grad=False` leaves the entropy out of the gradient."""
    from sapo_ray.learner import forward

    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11) * 3  # 5 response positions + the one after the last token
    targets = torch.randint(0, 11, (3, 5))
    banned = torch.tensor([2, 7])

    def whole(x):
        z = (x[:, :5] / 0.7).index_fill(-1, banned, -1e9)
        lp = torch.log_softmax(z, -1)
        return lp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(lp.exp() * lp).sum(-1)

    def grad_of(loss_fn, chunked, **kw):
        x = logits.clone().requires_grad_()
        logp, ent = forward.logprobs_and_entropy(x, targets, 0.7, banned, True, **kw) if chunked else whole(x)
        loss_fn(logp, ent).backward()
        return logp, ent, x.grad

    monkeypatch.setattr(forward, "CHUNK_TOKENS", 2)  # each row's 5 positions in pieces of 2, 2 and 1
    for loss in (lambda lp, h: lp.sum() + 0.3 * h.sum(), lambda lp, h: h.sum(), lambda lp, h: lp.sum()):
        ref_logp, ref_ent, ref_grad = grad_of(loss, False)
        logp, ent, grad = grad_of(loss, True)
        torch.testing.assert_close(logp, ref_logp)
        torch.testing.assert_close(ent, ref_ent)
        torch.testing.assert_close(grad, ref_grad)
        assert float(grad[:, 5].abs().max()) == 0.0

    _, ent, grad = grad_of(lambda lp, h: lp.sum() + 0.3 * h.sum(), True, entropy_grad=False)
    assert not ent.requires_grad
    torch.testing.assert_close(grad, grad_of(lambda lp, h: lp.sum(), False)[2])


@pytest.mark.parametrize("role", ["actor", "critic"])
def test_ranks_built_on_the_meta_device_receive_rank0s_weights_and_buffers(role, ray_cluster, random_tiny_models):
    """World size 2: only rank 0 reads the checkpoint, rank 1 builds on the meta device and is filled
    by broadcast. Every weight equals the checkpoint's, and both ranks score a batch exactly as the
    plainly loaded model does (which needs the non-persistent rotary buffers too)."""
    from sapo_ray.models import load_policy
    from sapo_ray.models.value import ValueModel

    path = random_tiny_models["vlm"]
    batch, _ = _train_batch(path, registry.get_algorithm("sapo"))
    group_cls = PolicyGroup if role == "actor" else CriticGroup
    score = lambda group: group.compute_logprobs(batch).get().logp if role == "actor" else group.compute_values(batch).get()
    group = group_cls(learner_cfg(path, role=role, world_size=2))
    state = group.full_state_dict()
    sharded = score(group)
    group.shutdown()
    torch.manual_seed(0)
    plain = load_policy(path) if role == "actor" else ValueModel.from_pretrained(path)
    reference = plain.state_dict()
    assert state.keys() == reference.keys()
    for k in reference:
        if role == "actor" or not k.startswith("value_head"):  # a fresh head: drawn from the seeded init
            torch.testing.assert_close(state[k], reference[k], rtol=0, atol=0, msg=k)
    single = group_cls(learner_cfg(path, role=role, world_size=1))
    expected = score(single)
    single.shutdown()
    torch.testing.assert_close(sharded, expected, rtol=0, atol=1e-5)


def _budget_batch(path):
    """A SAPO batch with critic targets, and a token budget that packs about two of its rows per micro-batch."""
    batch, _ = _train_batch(path, registry.get_algorithm("sapo"))
    mask = batch.response_mask
    batch = batch.with_fields(values=torch.zeros(mask.shape), returns=batch.advantages,
                            value_mask=batch.seg_end.float())
    return batch, 2 * int((batch.prompt_mask.sum(1) + mask.sum(1)).max()) + 1


def test_token_budget_micro_batches_give_the_padded_gradients(random_tiny_models):
    """`max_tokens_per_micro_batch`: rows regrouped by length give, for the policy and the critic, the
    gradient of fixed micro-batches of 4 rows (within 1e-5 in float32) with less padding computed."""
    from helpers import local_process_group
    from sapo_ray.learner.worker import CriticWorker

    path = random_tiny_models["vlm"]
    batch, budget = _budget_batch(path)
    with local_process_group():
        for cls, role in ((PolicyWorker, "actor"), (CriticWorker, "critic")):
            runs = []
            for tokens in (0, budget):
                worker = cls(0, 1, learner_cfg(path, role=role, mini_batch_size=len(batch), max_tokens_per_micro_batch=tokens))
                worker.setup()
                grads: dict[str, torch.Tensor] = {}
                worker.optimizer.step = lambda: grads.update(
                    {n: p.grad.full_tensor().clone() for n, p in worker.model.named_parameters() if p.grad is not None})
                metrics = worker.update(batch)
                runs.append((grads, metrics[f"{role}/padding_ratio"]))
            (fixed, pad_fixed), (packed, pad_packed) = runs
            assert fixed.keys() == packed.keys() and fixed
            for name in fixed:
                torch.testing.assert_close(packed[name], fixed[name], rtol=1e-5, atol=1e-5, msg=f"{role} {name}")
            assert pad_packed < pad_fixed


def test_token_budget_over_two_ranks_keeps_row_order_and_counts(ray_cluster, random_tiny_models):
    """Two ranks whose rows need different numbers of micro-batches run as many each (the larger count),
    return log-probs in the batch's row order, and compute the fixed micro-batches' loss and gradient norm."""
    path = random_tiny_models["vlm"]
    batch, budget = _budget_batch(path)
    results = []
    for tokens in (0, budget):
        group = PolicyGroup(learner_cfg(path, world_size=2, max_tokens_per_micro_batch=tokens))
        scored = group.compute_logprobs(batch).get().logp
        metrics = group.update(batch).get()[0]
        results.append((scored, metrics))
        group.shutdown()
    (scored0, m0), (scored1, m1) = results
    torch.testing.assert_close(scored1, scored0, rtol=0, atol=1e-5)
    for key in ("actor/pg_loss", "actor/grad_norm"):
        assert m1[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-7), key


def test_non_finite_advantages_skip_the_optimizer_steps_and_count_them_in_a_row(random_tiny_models):
    """A NaN advantage (a reward gone wrong) makes every gradient non-finite: each optimizer step is
    skipped, the weights stay as they were, and `actor/skipped_in_a_row` grows across updates until a
    finite one resets it (the trainer stops past `trainer.max_skipped_steps`)."""
    from helpers import local_process_group

    path = random_tiny_models["vlm"]
    batch, _ = _train_batch(path, registry.get_algorithm("sapo"))
    bad = batch.with_fields(advantages=batch.advantages.masked_fill(batch.response_mask.bool(), float("nan")))
    with local_process_group():
        worker = PolicyWorker(0, 1, learner_cfg(path, mini_batch_size=4))
        worker.setup()
        before = {n: p.full_tensor().clone() for n, p in worker.model.named_parameters()}
        first, second = worker.update(bad), worker.update(bad)
        assert (first["actor/skipped_steps"], first["actor/skipped_in_a_row"]) == (2.0, 2.0)  # 8 rows / 4
        assert second["actor/skipped_in_a_row"] == 4.0
        assert all(torch.equal(p.full_tensor(), before[n]) for n, p in worker.model.named_parameters())
        assert worker.update(batch)["actor/skipped_in_a_row"] == 0.0


@pytest.mark.parametrize("kind", ["vlm", "lm"])
def test_every_layout_gives_the_padded_rows_outputs_and_gradients(kind, random_tiny_models):
    """`learner.layout`: each distinct prompt computed once with its cache shared by its samples
    (`shared_prompt`), and the rows packed end to end without padding (`packed`), give the log-probs,
    entropies, values and (policy and critic) gradients of whole padded `[prompt | response]` rows,
    within 1e-5 in float32, for a VLM (multimodal RoPE, images) and a text LM; rows in scrambled order."""
    from helpers import local_process_group
    from sapo_ray.learner.worker import CriticWorker

    path = random_tiny_models[kind]
    batch, _ = _budget_batch(path) if kind == "vlm" else _budget_batch_text(path)
    batch = _ragged(batch).select(torch.randperm(len(batch), generator=torch.Generator().manual_seed(1)))
    assert len(batch.distinct_prompts()[0]) < len(batch)
    assert bool((batch.prompt_mask == 0).any()) and bool((batch.response_mask == 0).any())
    with local_process_group():
        for cls, role in ((PolicyWorker, "actor"), (CriticWorker, "critic")):
            runs = {}
            for layout in ("padded", "shared_prompt", "packed"):
                worker = cls(0, 1, learner_cfg(path, role=role, mini_batch_size=len(batch), layout=layout))
                worker.setup()
                if role == "actor":
                    out = worker.compute_logprobs(batch)
                    scored = {"logp": out.logp, "entropy": out.entropy}
                else:
                    scored = {"values": worker.compute_values(batch)}
                grads: dict[str, torch.Tensor] = {}
                worker.optimizer.step = lambda: grads.update(
                    {n: p.grad.full_tensor().clone() for n, p in worker.model.named_parameters() if p.grad is not None})
                worker.update(batch)
                runs[layout] = (scored, grads)
            scored0, whole = runs["padded"]
            for layout in ("shared_prompt", "packed"):
                scored, grads = runs[layout]
                valid = batch.response_mask.bool()  # what padding positions hold is no layout's business
                for name in scored0:
                    torch.testing.assert_close(scored[name][valid], scored0[name][valid], rtol=0, atol=1e-5,
                                               msg=f"{role} {layout} {name}")
                assert whole.keys() == grads.keys() and whole
                for name in whole:
                    torch.testing.assert_close(grads[name], whole[name], rtol=1e-5, atol=1e-5, msg=f"{role} {layout} {name}")


def _ragged(batch):
    """`batch` with every other row's response cut to a third of its length (responses of the random
    tiny models run to the limit), per-token fields and segments cut with it."""
    mask = batch.response_mask.clone()
    for b in range(1, len(batch), 2):
        mask[b, int(mask[b].sum()) // 3 :] = 0
    seg = registry.make_segments(registry.get_algorithm("sapo"), mask, entropy=batch.advantages.abs())
    cut = {k: v * mask if v.dim() == 2 and v.is_floating_point() else v for k, v in batch.filled().items()}
    cut.update(seg_end=seg.end_mask, value_mask=seg.end_mask.float())
    ids = torch.where(mask.bool(), batch.response_ids, torch.zeros_like(batch.response_ids))
    return batch.with_fields(response_ids=ids, response_mask=mask, **cut)


def _budget_batch_text(path):
    """`_budget_batch` on the text LM (text-only synthvista prompts)."""
    batch, _ = sample_batch(path, prompts=4, n=2, max_new_tokens=12, text_only=True)
    spec = registry.get_algorithm("sapo")
    mask = batch.response_mask
    gen = torch.Generator().manual_seed(0)
    seg = registry.make_segments(spec, mask, entropy=torch.rand(mask.shape, generator=gen))
    advantages = torch.randn(mask.shape, generator=gen) * mask
    return batch.with_fields(old_logp=batch.rollout_logp, advantages=advantages, seg_end=seg.end_mask,
                           values=torch.zeros(mask.shape), returns=advantages, value_mask=seg.end_mask.float()), None


def _mixed_batch(path, videos: bool = False):
    """4 rows with an image (`videos`: 2 with a clip, 2 with an image), then 4 text-only rows: split over 2
    ranks, one rank sees no image at all."""
    from helpers import encode, engine_for
    from sapo_ray.batch import Batch, SamplingParams
    from sapo_ray.data.datasets import load_dataset_split

    engine, processor = engine_for(path)
    knobs = {"templates": ["bar_grew", "bar_max"]} if videos else {}
    examples = (load_dataset_split("synthvista", None, "train", n=2, seed=3 if videos else 0, **knobs)
                + load_dataset_split("synthvista", None, "train", n=2, seed=1, text_only=True))
    assert not videos or sum(bool(e["videos"]) for e in examples) == 1
    samples = engine.generate([encode(processor, e) for e in examples],
                              SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=0))
    assert [s.vision is not None for s in samples] == [True] * 4 + [False] * 4
    batch = Batch.from_samples(samples, engine.pad_id)
    mask = batch.response_mask
    gen = torch.Generator().manual_seed(0)
    return batch.with_fields(group_index=torch.tensor([s.prompt_index for s in samples]),
                           old_logp=batch.rollout_logp, values=torch.zeros(mask.shape), value_mask=mask,
                           returns=torch.randn(mask.shape, generator=gen) * mask,
                           advantages=torch.randn(mask.shape, generator=gen) * mask)


@pytest.mark.parametrize("model, role, layout, videos", [
    ("vlm", "actor", "padded", False), ("vlm", "actor", "shared_prompt", False), ("vlm", "critic", "packed", False),
    ("qwen3_vl", "actor", "padded", False), ("vlm", "actor", "padded", True)])
def test_a_rank_without_images_runs_the_vision_collectives_too(model, role, layout, videos, ray_cluster,
                                                               random_tiny_models):
    """FSDP gathers and reduces the vision blocks by collectives: a rank whose rows hold no image must run
    them as the rank with images does (before, gloo aborted on the mismatch; NCCL hangs). 2 ranks, one
    without images, update exactly as 1 rank with all the rows (Qwen3-VL: its DeepStack mergers too; with
    videos, the rank with a clip and an image runs the tower twice, and so does the other)."""
    path = random_tiny_models[model]
    batch = _mixed_batch(path, videos)
    states = []
    for world in (1, 2):
        group = (PolicyGroup if role == "actor" else CriticGroup)(
                            learner_cfg(path, role=role, algorithm="rloo" if role == "actor" else "ppo", world_size=world,
                                        layout=layout, videos=videos), timeout_s=120)
        if role == "actor":
            group.compute_logprobs(batch).get()
        group.update(batch).get()
        states.append(group.full_state_dict())
        group.shutdown()
    if role == "actor":  # the vision tower trained (the image rows' gradient reached it) on both
        from sapo_ray.models import load_policy

        initial = load_policy(path).state_dict()
        assert max(float((states[1][k] - initial[k]).abs().max()) for k in initial if ".visual." in f".{k}") > 1e-4
    worst = max(float((states[0][k] - states[1][k]).abs().max()) for k in states[0])
    assert worst < 1e-5, f"2 ranks (one without images) differ from 1 rank by {worst}"


@pytest.mark.parametrize("algorithm", sorted(registry.ALGORITHMS))
def test_the_first_update_sees_a_ratio_of_one_with_recomputed_old_logprobs(algorithm, random_tiny_models, monkeypatch):
    """`actor.recompute_old_logp`: the old log-probs come from the micro-batches, layout and bf16 autocast of
    the update's first pass, so before any optimizer step every token's ratio is 1 within 1e-6 (computed
    over the whole batch in its own order, they differed by the rounding of other matmul shapes: GSPO
    clipped 2.4% of its tokens at the first update). 32 shuffled rows, micro-batches of 16."""
    path = random_tiny_models["vlm"]
    spec = registry.get_algorithm(algorithm)
    batch, _ = sample_batch(path, prompts=8, n=4, max_new_tokens=12)
    gen = torch.Generator().manual_seed(0)
    seg = registry.make_segments(spec, batch.response_mask, entropy=torch.rand(batch.response_mask.shape, generator=gen))
    batch = batch.with_fields(advantages=torch.randn(batch.response_mask.shape, generator=gen) * batch.response_mask,
                              seg_end=None if seg is None else seg.end_mask)
    deviations = []
    policy_loss = registry.policy_loss

    def recording(spec, logp, old_logp, adv, mask, **kwargs):
        deviations.append(float((logp.detach() - old_logp).abs()[mask.bool()].max()))
        return policy_loss(spec, logp, old_logp, adv, mask, **kwargs)

    monkeypatch.setattr(registry, "policy_loss", recording)
    with local_process_group():
        worker = PolicyWorker(0, 1, learner_cfg(path, algorithm=algorithm, autocast_bf16="true", shuffle=True,
                                                micro_batch_size=16, mini_batch_size=len(batch)))
        worker.setup()
        old = worker.compute_logprobs(batch)
        worker.update(batch.with_fields(old_logp=old.logp, ref_logp=old.logp))
    assert len(deviations) == 2 and max(deviations) <= 1e-6, deviations


@pytest.mark.parametrize("algorithm", ["grpo", "sapo"])
def test_the_loss_trace_puts_what_the_loss_saw_back_on_each_row(algorithm, random_tiny_models):
    """`trace_loss`: old log-probs shifted by a constant `c_i` per row make every model token's log ratio `-c_i`
    at the first pass (a segment's and a token's alike); 16 shuffled rows in micro-batches of 4 come back in
    the batch's order, held exactly where the clip rule says, and nothing on padding."""
    path = random_tiny_models["vlm"]
    spec = registry.get_algorithm(algorithm)
    batch, _ = sample_batch(path, prompts=4, n=4, max_new_tokens=12)
    mask = batch.response_mask
    gen = torch.Generator().manual_seed(0)
    seg = registry.make_segments(spec, mask, entropy=torch.rand(mask.shape, generator=gen))
    adv = torch.randn(mask.shape, generator=gen) * mask
    shift = torch.linspace(-0.5, 0.5, len(batch))[torch.randperm(len(batch), generator=gen)]
    with local_process_group():
        worker = PolicyWorker(0, 1, dataclasses.replace(
            learner_cfg(path, algorithm=algorithm, shuffle=True, micro_batch_size=4, mini_batch_size=len(batch)),
            trace_loss=True))
        worker.setup()
        old = worker.compute_logprobs(batch).logp
        worker.update(batch.with_fields(old_logp=old + shift[:, None] * mask, ref_logp=old, advantages=adv,
                                        seg_end=None if seg is None else seg.end_mask))
        trace = worker.loss_trace()
    valid = mask.bool()
    expected = (-shift[:, None]).expand_as(mask)
    assert float((trace.log_ratio - expected)[valid].abs().max()) < 1e-5
    assert not trace.log_ratio[~valid].any() and not trace.held[~valid].any()
    ratio = torch.exp(expected)
    clipped = ((adv > 0) & (ratio > 1 + spec.clip_high)) | ((adv < 0) & (ratio < 1 - spec.clip_low))
    assert torch.equal(trace.held, clipped & valid) and trace.held.any() and not trace.held[valid].all()
