"""An actor holding a GPU share computes on that GPU or stops, naming itself; never silently on the CPU."""

from __future__ import annotations

import pytest
import torch

from sapo_ray.utils import compute_device

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine where torch has no GPU")


def test_no_share_and_simulated_gpus_compute_on_the_cpu(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert compute_device(0, "actor rank 0") == torch.device("cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what `actor_env` sets for cluster.simulate_gpus
    assert compute_device(0.5, "actor rank 0") == torch.device("cpu")


def test_a_gpu_share_torch_cannot_use_is_an_error_naming_the_actor(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(RuntimeError, match=r"rollout worker 3 holds a GPU share \(num_gpus=0.5\) but torch cannot "
                                           r"use a GPU here .*CUDA_VISIBLE_DEVICES=0.*cluster.simulate_gpus"):
        compute_device(0.5, "rollout worker 3")


def test_the_learner_and_the_engine_refuse_too(monkeypatch):
    from sapo_ray.algo.registry import get_algorithm
    from sapo_ray.config import LearnerConfig, LearnerWorkerConfig, ModelConfig, RolloutConfig, RolloutWorkerConfig
    from sapo_ray.learner.worker import PolicyWorker
    from sapo_ray.rollout.engine import HFEngine

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cfg = LearnerWorkerConfig(role="critic", model=ModelConfig(), learner=LearnerConfig(num_gpus=1.0),
                              algorithm=get_algorithm("ppo"), rollout=RolloutConfig(), seed=0, optimizer_steps=1, response_tokens=96)
    with pytest.raises(RuntimeError, match="critic rank 1 holds a GPU share"):
        PolicyWorker(1, 2, cfg)
    with pytest.raises(RuntimeError, match="rollout worker 2 holds a GPU share"):
        HFEngine.from_config(RolloutWorkerConfig(ModelConfig(), RolloutConfig(num_gpus=0.25), index=2, seed=0))
