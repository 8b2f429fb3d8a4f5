"""`attn_implementation: sdpa_gqa` computes what Hugging Face's `sdpa` computes, on padded batches."""

from __future__ import annotations

import torch

from helpers import encode, sample_batch
from sapo_ray.batch import SamplingParams
from sapo_ray.data.datasets import load_dataset_split
from sapo_ray.learner.forward import policy_forward
from sapo_ray.models import load_policy, load_processor
from sapo_ray.rollout.engine import HFEngine


def test_sdpa_gqa_matches_sdpa_in_training_and_generation(random_tiny_models, monkeypatch):
    from sapo_ray.models import attention

    def no_copies(*_):
        raise AssertionError("sdpa_gqa repeated the key/value heads on the CPU")

    monkeypatch.setattr(attention, "repeat_kv", no_copies)  # the point of sdpa_gqa; HF's sdpa keeps its own
    path = random_tiny_models["vlm"]
    batch, engine = sample_batch(path, prompts=4, n=2, max_new_tokens=12)
    assert bool((batch.prompt_mask == 0).any()), "the batch must be padded: a mask is what sdpa_gqa changes"
    out, samples = {}, {}
    processor = load_processor(path)
    prompts = [encode(processor, e) for e in load_dataset_split("synthvista", None, "train", n=4, seed=1)]
    for name in ("sdpa", "sdpa_gqa"):
        model = load_policy(path, attn_implementation=name).train()
        text = model.config.get_text_config()
        assert text.num_key_value_heads < text.num_attention_heads  # grouped heads: what sdpa_gqa changes
        logp, entropy = policy_forward(model, batch, 1.0, engine.banned, engine.vision_tokens)
        (logp * batch.response_mask).sum().backward()
        out[name] = (logp.detach(), entropy.detach(), {n: p.grad for n, p in model.named_parameters()})
        # Decoding over the KV cache: one query per row under a padding mask.
        hf = HFEngine(model.eval(), processor.tokenizer, max_batch_size=8)
        samples[name] = hf.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=16, seed=3))
    (lp0, h0, g0), (lp1, h1, g1) = out["sdpa"], out["sdpa_gqa"]
    torch.testing.assert_close(lp1, lp0, rtol=0, atol=1e-5)
    torch.testing.assert_close(h1, h0, rtol=0, atol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-5, msg=n)
    for a, b in zip(samples["sdpa"], samples["sdpa_gqa"], strict=True):
        assert a.response_ids == b.response_ids
        torch.testing.assert_close(torch.tensor(b.rollout_logp), torch.tensor(a.rollout_logp), rtol=0, atol=1e-5)
