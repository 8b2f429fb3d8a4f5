"""Qwen3-VL (DeepStack visual features, interleaved multimodal RoPE, 16 px patches) through every path:
the hf engine against the learner in each layout, the critic, two training steps with a weight sync, and
the exported policy loading with transformers. A tiny one built from a config, random weights."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import learner_cfg, local_process_group, sample_batch, tiny_cfg


def test_engine_and_learner_agree_in_every_layout(random_tiny_models):
    """The engine's per-token log-probs and entropies are the learner's within 1e-4, in each layout (the
    prompt's 3-D positions from the model's own rule), and the critic scores alike in each."""
    from sapo_ray.learner.worker import CriticWorker, PolicyWorker

    path = random_tiny_models["qwen3_vl"]
    batch, _ = sample_batch(path, prompts=3, n=2, max_new_tokens=10)
    assert batch.vision[0] is not None and batch.vision[0].image_grid_thw.tolist()[0][0] == 1
    valid = batch.response_mask.bool()
    values = {}
    with local_process_group():
        for layout in ("padded", "shared_prompt", "packed"):
            policy = PolicyWorker(0, 1, learner_cfg(path, layout=layout))
            policy.setup()
            out = policy.compute_logprobs(batch)
            assert float((out.logp - batch.rollout_logp).abs()[valid].max()) < 1e-4, layout
            assert float((out.entropy - batch.rollout_entropy).abs()[valid].max()) < 1e-4, layout
            critic = CriticWorker(0, 1, learner_cfg(path, role="critic", layout=layout))
            critic.setup()
            values[layout] = critic.compute_values(batch)
    for layout in ("shared_prompt", "packed"):
        torch.testing.assert_close(values[layout][valid], values["padded"][valid], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_two_steps_train_and_the_export_loads_with_transformers(ray_cluster, random_tiny_models, tmp_path):
    """SAPO (policy, reference, critic) for two steps with the hf engine: the weights change and reach the
    engine each step; the exported policy loads with `AutoModelForImageTextToText` and holds the
    checkpoint's weights."""
    from transformers import AutoModelForImageTextToText

    from sapo_ray.export import export
    from sapo_ray.main import run
    from sapo_ray.models import load_policy

    path = random_tiny_models["qwen3_vl"]
    run(tiny_cfg(tmp_path / "run", path, "trainer.export_hf=false"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["sync/bytes"] > 0 and r["actor/grad_norm"] > 0 for r in rows[1:])
    out = export(tmp_path / "run", tmp_path / "hf")
    exported = AutoModelForImageTextToText.from_pretrained(out)
    assert type(exported).__name__ == "Qwen3VLForConditionalGeneration"
    before, after = load_policy(path).state_dict(), exported.state_dict()
    assert before.keys() == after.keys()
    assert max(float((after[k] - before[k]).abs().max()) for k in before) > 0  # trained, and exported as trained
