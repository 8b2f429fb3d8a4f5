"""Checks before any actor exists: the cluster's resources, the memory plan, and a run directory that
holds a run with another config. Each raises (or warns) with the numbers and what to change."""

from __future__ import annotations

import logging
from pathlib import Path

import ray
from omegaconf import OmegaConf

from sapo_ray.tracking import flatten

log = logging.getLogger(__name__)


def placement_plan(cfg, needs_critic: bool):
    """The placement of the actors (`sapo_ray.placement.plan`), checked: without one (CPU runs) the cluster
    must have the CPUs they ask for; with GPUs the memory plan must fit."""
    from sapo_ray import placement

    plan = placement.plan(cfg, needs_critic)
    if plan is None:
        check_resources(cfg, needs_critic)
    elif any(b.get("GPU") for b in plan.bundles):
        check_memory(cfg)
    return plan


def check_resources(cfg, needs_critic: bool) -> None:
    """Fail with the numbers when the actors cannot all fit (Ray would otherwise wait forever)."""
    groups = [("rollout", cfg.rollout.num_workers, cfg.rollout), ("actor", cfg.actor.world_size, cfg.actor)]
    if needs_critic:
        groups.append(("critic", cfg.critic.world_size, cfg.critic))
    available = ray.cluster_resources()
    for kind in ("num_cpus", "num_gpus"):
        need = sum(n * g[kind] for _, n, g in groups)
        have = available.get("CPU" if kind == "num_cpus" else "GPU", 0.0)
        if need > have + 1e-9:
            detail = ", ".join(f"{name}: {n} x {g[kind]}" for name, n, g in groups)
            raise RuntimeError(f"the actors ask for {need:g} {kind[4:].upper()}s ({detail}) but the Ray cluster has "
                               f"{have:g}; lower rollout.{kind} / actor.{kind} / critic.{kind} (Ray resources may be "
                               f"fractional) or add nodes")


def check_memory(cfg) -> None:
    """The memory plan (`python -m sapo_ray.plan`): stop if a GPU is over budget."""
    from sapo_ray.plan import format_plan, memory_plan

    estimate = memory_plan(cfg)
    if not estimate["fits"]:
        raise RuntimeError(f"the memory plan exceeds cluster.gpu_memory_gb={cfg.cluster.gpu_memory_gb:g} GiB "
                           f"on some GPU (lower micro-batches or lengths, turn on model.gradient_checkpointing or "
                           f"rollout.enable_sleep_mode, or raise the budget if the GPUs are larger):\n"
                           f"{format_plan(estimate)}")


def check_videos(cfg, most: int) -> None:
    """Data whose rows hold up to `most` videos needs an engine that takes them (`EngineTraits.videos`) and
    `rollout.videos_per_prompt` that many (the memory plan counts their tokens)."""
    from sapo_ray.rollout.engine import engine_traits

    if most and not engine_traits(cfg.rollout.engine).videos:
        raise ValueError(f"rollout.engine={cfg.rollout.engine} does not take videos, and the data has rows with "
                         "videos: use rollout.engine=hf, or data without videos")
    if most > cfg.rollout.videos_per_prompt:
        raise ValueError(f"rollout.videos_per_prompt={cfg.rollout.videos_per_prompt}, but rows of the data hold up to "
                         f"{most} videos: set rollout.videos_per_prompt={most} (the memory plan counts their tokens)")


def warn_config_changes(cfg, run_dir: Path) -> None:
    """A run directory that already holds a run with another config: say which keys differ (the run
    continues its checkpoint with the new values, as `trainer.resume=auto` asks)."""
    old_path = run_dir / "config.yaml"
    if cfg.trainer.resume != "auto" or not (run_dir / "checkpoints" / "latest").exists():
        return
    old = flatten(OmegaConf.to_container(OmegaConf.load(old_path)))
    new = flatten(OmegaConf.to_container(cfg, resolve=True))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        log.warning("%s holds a run whose config differs in %s; continuing it with the new values",
                    run_dir, ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed))
