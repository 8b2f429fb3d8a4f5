"""The rollout worker: a Ray actor that owns one engine and receives weights after every update."""

from __future__ import annotations

import time

import ray

from sapo_ray.batch import Sample
from sapo_ray.rollout.engine import Prompt, SamplingParams, build_engine
from sapo_ray.utils import peak_memory_mb, set_threads


class RolloutWorker:
    """Owns the engine named by `cfg["engine"]`; `cfg` as `sapo_ray.rollout.engine.build_engine` takes it."""

    def __init__(self, cfg: dict, num_threads: int):
        set_threads(num_threads)
        self.engine = build_engine(cfg["engine"], cfg)

    def generate(self, prompts: list[Prompt], params: SamplingParams, index_offset: int = 0) -> list[Sample]:
        samples = self.engine.generate(prompts, params)
        for s in samples:
            s.prompt_index += index_offset
        return samples

    def update_weights(self, bucket_refs: list) -> tuple[int, float]:
        """Load bucketed weights (each a Ray object of `(name, tensor)` pairs); returns (bytes, seconds)."""
        start = time.perf_counter()
        total = 0
        # Engines whose loading spans buckets (vllm: a layer may be split between two) bracket them.
        if hasattr(self.engine, "begin_weight_update"):
            self.engine.begin_weight_update()
        for ref in bucket_refs:
            total += self.engine.update_weights(ray.get(ref))
        if hasattr(self.engine, "finish_weight_update"):
            self.engine.finish_weight_update()
        return total, time.perf_counter() - start

    def ready(self) -> bool:
        return True

    def peak_memory_mb(self) -> float:
        return peak_memory_mb()
