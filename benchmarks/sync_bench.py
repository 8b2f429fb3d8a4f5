"""Bytes and seconds of one weight sync, full fine-tuning against LoRA, through the run's own groups: a policy
group and one hf rollout worker built from the run config, synced `REPEATS` times by each method (the first
sync of each is left out), every sync checked by its fingerprints. Prints one JSON object.

    python benchmarks/sync_bench.py [MODEL] [LORA_RANK] [REPEATS]

MODEL defaults to bundled:tiny-vlm. The 3B and 7B figures come from the memory plan's adapter count
(`sapo_ray.plan.adapter_params`) in `model.dtype`, beside the full models' bytes.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import ray


def measure(model: str, rank: int, method: str, repeats: int) -> dict:
    from sapo_ray.config import compose_config, learner_worker_config, rollout_worker_config
    from sapo_ray.learner.group import PolicyGroup
    from sapo_ray.rollout.worker import RolloutWorker
    from sapo_ray.sync import WeightSync
    from sapo_ray.utils import actor_env

    cfg = compose_config(f"model.path={model}", f"actor.lora.rank={rank}", "actor.num_cpus=0.5", "rollout.num_cpus=0.5",
                         "actor.num_threads=1", "rollout.num_threads=1")
    group = PolicyGroup(learner_worker_config(cfg, "actor", sync_adapters=rank > 0))
    worker = ray.remote(RolloutWorker).options(num_cpus=0.5, runtime_env={"env_vars": actor_env(1)}).remote(
        rollout_worker_config(cfg, 0))
    try:
        sync = WeightSync(group, [worker], method, cfg.rollout.sync_bucket_mb * 2**20)
        runs = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            metrics = sync()
            runs.append((time.perf_counter() - t0, metrics))
        seconds = [s for s, _ in runs[1:]]
        return {"bytes": runs[-1][1]["sync/bytes"], "seconds_median": statistics.median(seconds),
                "verified": all(m["sync/verified"] == 1.0 for _, m in runs)}
    finally:
        ray.kill(worker)
        group.shutdown()


def plan_figures(rank: int) -> dict:
    """Full model against rank-`rank` adapters, in bfloat16, for the shipped 3B and 7B configs."""
    from sapo_ray.config import LoraConfig
    from sapo_ray.plan import adapter_params, model_shape

    out = {}
    for name in ("qwen2_5_vl_3b", "qwen2_5_vl_7b"):
        path = f"bundled:configs/{name}"
        out[name] = {"full_gb": round(2 * model_shape(path).params / 1e9, 2),
                     "lora_mb": round(2 * adapter_params(path, LoraConfig(rank=rank)) / 1e6, 1)}
    return out


def main(model: str = "bundled:tiny-vlm", rank: int = 16, repeats: int = 5) -> dict:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = {"model": model, "lora_rank": rank, "repeats": repeats}
        for method in ("object_store", "broadcast"):
            for label, r in (("full", 0), ("lora", rank)):
                result[f"{method}/{label}"] = measure(model, r, method, repeats)
        result["plan_bf16"] = plan_figures(rank)
        return result
    finally:
        ray.shutdown()


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(main(*(a if i == 0 else int(a) for i, a in enumerate(args))), indent=1))
