"""Shared fixtures: thread limits, one local Ray cluster per session, tiny models built once."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(1)
SIMULATED_GPUS = 8


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster for the whole session (2 CPUs, no dashboard). Without CUDA it has 8 logical GPUs,
    so placement tests can put actors on simulated GPUs (they compute on the CPU)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=torch.cuda.device_count() or SIMULATED_GPUS, include_dashboard=False,
                 log_to_driver=False, _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def random_tiny_models(tmp_path_factory):
    """Randomly initialised tiny model directories (fresh weights): the Qwen2.5-VL-family VLM and its text-only
    twin (a tokenizer trained as the shipped one was), and a Qwen3-VL (the shipped tokenizer)."""
    from sapo_ray.models.tiny import build_tiny_lm, build_tiny_qwen3_vl, build_tiny_vlm

    root = tmp_path_factory.mktemp("tiny")
    return {"vlm": build_tiny_vlm(str(root / "vlm"), seed=0), "lm": build_tiny_lm(str(root / "lm"), seed=0),
            "qwen3_vl": build_tiny_qwen3_vl(str(root / "qwen3_vl"), seed=0, tokenizer="bundled:tiny-vlm")}
