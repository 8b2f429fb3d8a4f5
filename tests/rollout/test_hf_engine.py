"""The hf rollout engine: grouping, stopping, reproducibility and agreement with the learner's maths."""

from __future__ import annotations

import torch

from helpers import encode, engine_for
from sapo_ray.batch import Batch
from sapo_ray.data.datasets import load_dataset_split
from sapo_ray.learner.forward import policy_forward
from sapo_ray.batch import SamplingParams

MODEL = "bundled:tiny-vlm"


def _prompts(processor, n=3):
    return [encode(processor, e) for e in load_dataset_split("synthvista", None, "train", n=n, seed=1)]


def test_samples_are_grouped_stop_at_eos_and_never_banned():
    engine, processor = engine_for(MODEL)
    samples = engine.generate(_prompts(processor), SamplingParams(n=4, temperature=1.0, max_new_tokens=96, seed=0))
    assert [s.prompt_index for s in samples] == [0] * 4 + [1] * 4 + [2] * 4
    banned = set(engine.banned.tolist())
    for s in samples:
        assert len(s.response_ids) == len(s.rollout_logp) == len(s.rollout_entropy) > 0
        assert not banned & set(s.response_ids)
        eos_at = [i for i, t in enumerate(s.response_ids) if t in engine.eos_ids]
        if s.finished:
            assert eos_at == [len(s.response_ids) - 1]  # cut right after the first end-of-turn token
        else:
            assert not eos_at and len(s.response_ids) == 96
    assert any(s.finished for s in samples)


def test_same_seed_same_samples_other_seed_other_samples():
    engine, processor = engine_for(MODEL)
    prompts = _prompts(processor, 2)
    run = lambda seed: [s.response_ids for s in engine.generate(prompts, SamplingParams(n=3, max_new_tokens=24, seed=seed))]
    assert run(5) == run(5)
    assert run(5) != run(6)


def test_rollout_logprobs_and_entropies_equal_the_learner_forward():
    """Sampled at T = 0.7 and scored by `policy_forward` at the same temperature (left-padded batch)."""
    engine, processor = engine_for(MODEL)
    samples = engine.generate(_prompts(processor, 4), SamplingParams(n=2, temperature=0.7, max_new_tokens=32, seed=2))
    batch = Batch.from_samples(samples, engine.pad_id)
    with torch.no_grad():
        logp, entropy = policy_forward(engine.model, batch, 0.7, engine.banned, engine.vision_tokens)
    mask = batch.response_mask.bool()
    assert float((logp - batch.rollout_logp).abs()[mask].max()) < 1e-4
    assert float((entropy - batch.rollout_entropy).abs()[mask].max()) < 1e-4


def test_greedy_is_the_argmax_path():
    engine, processor = engine_for(MODEL)
    samples = engine.generate(_prompts(processor, 2), SamplingParams(n=2, temperature=0.0, max_new_tokens=24))
    assert samples[0].response_ids == samples[1].response_ids  # greedy ignores n's randomness
    batch = Batch.from_samples(samples[:1], engine.pad_id)
    with torch.no_grad():
        logits = engine.model(**batch.model_inputs(engine.vision_tokens)).logits[0]
    P = batch.prompt_ids.shape[1]
    predicted = logits[P - 1 : P - 1 + len(samples[0].response_ids)].index_fill(-1, engine.banned, -1e9).argmax(-1)
    assert predicted.tolist() == samples[0].response_ids


def test_a_sleeping_engine_is_woken_before_it_generates_or_loads_weights():
    """rollout.enable_sleep_mode: the worker sleeps the engine after a rollout; the next generate or
    weight load wakes it first (once), whichever comes first."""
    from sapo_ray.rollout.worker import RolloutWorker

    class Recorder:
        def __init__(self):
            self.calls = []

        def __getattr__(self, name):
            return lambda *args: self.calls.append(name) or ([] if name == "generate" else 8)

    worker = RolloutWorker.__new__(RolloutWorker)
    worker.engine, worker.asleep, worker.episodes = Recorder(), False, None
    worker.generate([], SamplingParams())
    worker.sleep()
    assert worker.receive_weights([["spec"], ["spec"]])[0] == 16
    worker.generate([], SamplingParams())
    worker.sleep()
    worker.generate([], SamplingParams())
    assert worker.engine.calls == ["generate", "sleep", "wake_up", "begin_weight_update", "receive_weights",
                                   "receive_weights", "finish_weight_update", "generate", "sleep", "wake_up", "generate"]


def test_the_checkpoints_sampling_defaults_never_reach_generation(tmp_path):
    """A checkpoint whose generation_config.json says top_k=1 (argmax only), a repetition penalty and
    T=0.1 (Qwen2.5-VL-Instruct ships such values): the engine must still sample from the distribution
    `rollout_logp` describes. At T=1 that distribution picks the argmax only some of the time, and
    `E[log p(token)] = -H`, so the sampled tokens' mean log-prob matches minus the mean entropy."""
    import json
    import shutil
    from pathlib import Path

    import sapo_ray

    path = tmp_path / "model"
    shutil.copytree(Path(sapo_ray.__file__).parent / "assets" / "tiny-vlm", path)
    gen = json.loads((path / "generation_config.json").read_text())
    gen.update(do_sample=True, top_k=1, top_p=0.001, temperature=0.1, repetition_penalty=1.5)
    (path / "generation_config.json").write_text(json.dumps(gen))
    engine, processor = engine_for(str(path))
    samples = engine.generate(_prompts(processor, 4), SamplingParams(n=8, temperature=1.0, max_new_tokens=48, seed=3))
    batch = Batch.from_samples(samples, engine.pad_id)
    mask = batch.response_mask.bool()
    with torch.no_grad():
        logits = engine.model(**batch.model_inputs(engine.vision_tokens)).logits
        logp, entropy = policy_forward(engine.model, batch, 1.0, engine.banned, engine.vision_tokens)
    P = batch.prompt_ids.shape[1]
    probs = logits[:, P - 1 : -1].index_fill(-1, engine.banned, -1e9).softmax(-1)
    not_argmax = float((probs.argmax(-1) != batch.response_ids)[mask].float().mean())
    # At T 1 a token misses the argmax with probability 1 - max p; top_k=1, top_p=0.001 or T 0.1 would make
    # the share (near) 0. Sampling noise over the ~1000 positions is under 0.01.
    expected = float((1 - probs.max(-1).values)[mask].mean())
    assert expected > 0.03 and abs(not_argmax - expected) < 0.03, (not_argmax, expected)
    assert float((logp - batch.rollout_logp).abs()[mask].max()) < 1e-4
    n = int(mask.sum())
    gap = float(logp[mask].mean() + entropy[mask].mean())
    spread = float((logp[mask] + entropy[mask]).std()) / n ** 0.5
    assert abs(gap) < 4 * spread, (gap, spread, n)


def test_top_p_samples_from_the_nucleus_only():
    """pi = (0.5, 0.3, 0.15, 0.05): top-p 0.7 keeps the first two (the mass before the third is 0.8),
    renormalised to 0.625 / 0.375; top-p 0.45 keeps the first alone; greedy takes the argmax."""
    from sapo_ray.rollout.engine import sample_tokens

    logp = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    drawn = sample_tokens(logp, 0.7, False, gen)
    assert set(drawn.tolist()) == {0, 1}
    assert abs(float((drawn == 0).float().mean()) - 0.625) < 0.03
    assert set(sample_tokens(logp, 0.45, False, gen).tolist()) == {0}
    assert set(sample_tokens(logp, 1.0, False, gen).tolist()) == {0, 1, 2, 3}
    assert sample_tokens(logp[:2].flip(-1), 1.0, True, None).tolist() == [3, 3]


def test_chunks_keep_a_prompts_samples_together_and_respect_the_batch_limit():
    engine, processor = engine_for(MODEL)
    prompts = _prompts(processor, 3)
    engine.max_batch_size = 9
    assert [[(i, k) for i, _, k in c] for c in engine._chunks(prompts, 4)] == [[(0, 4), (1, 4)], [(2, 4)]]
    engine.max_batch_size = 3
    assert [[(i, k) for i, _, k in c] for c in engine._chunks(prompts[:2], 4)] == [[(0, 3)], [(0, 1)], [(1, 3)], [(1, 1)]]
    samples = engine.generate(prompts[:2], SamplingParams(n=4, temperature=0.7, max_new_tokens=24, seed=1))
    assert [s.prompt_index for s in samples] == [0] * 4 + [1] * 4
    batch = Batch.from_samples(samples, engine.pad_id)
    with torch.no_grad():
        logp, _ = policy_forward(engine.model, batch, 0.7, engine.banned, engine.vision_tokens)
    assert float((logp - batch.rollout_logp).abs()[batch.response_mask.bool()].max()) < 1e-4


def test_dropping_ended_rows_changes_nothing_but_the_work():
    """Greedy, so the tokens are determined: the same responses and log-probs whether ended rows leave
    the batch as soon as one ends, or never (each prompt's samples share its prefill either way)."""
    engine, processor = engine_for(MODEL)
    prompts = _prompts(processor, 4)
    params = SamplingParams(n=2, temperature=0.0, max_new_tokens=64)
    engine.COMPACT_FRACTION = 0.0
    eager = engine.generate(prompts, params)
    engine.COMPACT_FRACTION = 2.0
    never = engine.generate(prompts, params)
    assert len({len(s.response_ids) for s in eager}) > 1  # rows did end at different steps
    for a, b in zip(eager, never):
        assert a.response_ids == b.response_ids and a.finished == b.finished
        assert max(abs(x - y) for x, y in zip(a.rollout_logp, b.rollout_logp)) < 1e-5
