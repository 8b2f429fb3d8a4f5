"""The rollout worker: a Ray actor that owns one engine and receives weights after every update."""

from __future__ import annotations

import time

import ray

from sapo_ray.batch import Prompt, Sample, SamplingParams
from sapo_ray.config import RolloutWorkerConfig
from sapo_ray.rollout.engine import build_engine
from sapo_ray.rollout.episodes import Episodes
from sapo_ray.utils import peak_memory_mb, set_threads


class RolloutWorker:
    """Owns the engine named by `cfg.rollout.engine`."""

    def __init__(self, cfg: RolloutWorkerConfig):
        set_threads(cfg.rollout.num_threads)
        self.engine = build_engine(cfg)
        self.asleep = False
        self.episodes = Episodes.from_config(cfg.env) if cfg.env.name else None

    def generate(self, prompts: list[Prompt], params: SamplingParams, index_offset: int = 0,
                 examples: list[dict] | None = None) -> list[Sample]:
        """Samples of `prompts`; with an environment (`env.name`), multi-turn episodes, `examples[i]` the row
        of prompt i."""
        self._awake()
        if self.episodes is None:
            samples = self.engine.generate(prompts, params)
        else:
            samples = self.episodes.run(self.engine, prompts, examples, params)
        for s in samples:
            s.prompt_index += index_offset
        return samples

    def update_weights(self, bucket_refs: list) -> tuple[int, float]:
        """Load bucketed weights (each a Ray object of `(name, tensor)` pairs); returns (bytes, seconds)."""
        return self._load(self.engine.update_weights(ray.get(ref)) for ref in bucket_refs)

    def init_weight_group(self, host: str, port: int, rank: int, world_size: int) -> None:
        """Join the weight-broadcast group with learner rank 0 (`sapo_ray.sync`); this engine's first rank is `rank`."""
        self.engine.init_weight_group(host, port, rank, world_size)

    def receive_weights(self, specs: list) -> tuple[int, float]:
        """Receive the buckets learner rank 0 broadcasts (`sapo_ray.sync.bucket_specs`); returns (bytes, seconds)."""
        return self._load(self.engine.receive_weights(spec) for spec in specs)

    def weight_fingerprints(self) -> dict[str, float]:
        """The fingerprints of the weights the engine holds (`sapo_ray.sync.fingerprint`), by the learner's names."""
        return self.engine.weight_fingerprints()

    def _load(self, loads) -> tuple[int, float]:
        """Run `loads` (a lazy generator of per-bucket byte counts) inside the engine's update bracket."""
        start = time.perf_counter()
        self._awake()
        # Engines whose loading spans buckets (vllm: a layer may be split between two) bracket them.
        if hasattr(self.engine, "begin_weight_update"):
            self.engine.begin_weight_update()
        total = sum(loads)
        if hasattr(self.engine, "finish_weight_update"):
            self.engine.finish_weight_update()
        return total, time.perf_counter() - start

    def sleep(self) -> None:
        """Free the engine's GPU memory (weights, KV cache) while the learners use the GPUs
        (`rollout.enable_sleep_mode`); the next generate or weight load wakes it up."""
        self.engine.sleep()
        self.asleep = True

    def _awake(self) -> None:
        if self.asleep:
            self.engine.wake_up()
            self.asleep = False

    def ready(self) -> bool:
        return True

    def peak_memory_mb(self) -> dict[str, float]:
        return peak_memory_mb()
