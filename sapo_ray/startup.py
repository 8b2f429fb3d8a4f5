"""The block a run prints before its first step: what will happen, where, and in which precision."""

from __future__ import annotations

import os
from pathlib import Path

from sapo_ray.config import algorithm_spec
from sapo_ray.precision import Decision, normalize
from sapo_ray.utils import cpu_model


def machine_line() -> str:
    """The GPUs torch sees, else the CPU's model and core count."""
    import torch

    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"{len(names)} GPU(s): " + ", ".join(sorted(set(names))) + f"; torch {torch.__version__}"
    return f"CPU: {cpu_model()}, {os.cpu_count()} cores ({torch.backends.cpu.get_cpu_capability()} kernels); " \
           f"torch {torch.__version__}"


def precision_line(cfg, decisions: dict[str, Decision] | None, needs_critic: bool) -> str:
    """Each learner role's compute precision and why (the resolved `autocast_bf16`)."""
    roles = ("actor", "critic") if needs_critic else ("actor",)
    said: dict[str, list[str]] = {}  # what each role computes in, and why -> the roles
    for role in roles:
        group = cfg[role]
        if group.num_gpus > 0:
            said.setdefault(f"{cfg.model.dtype} compute over float32 masters (FSDP2 mixed precision)", []).append(role)
            continue
        how = "bf16 autocast over float32 weights" if normalize(group.autocast_bf16) == "true" else "float32"
        if cfg.model.dtype != "float32":
            how = f"{cfg.model.dtype} autocast over float32 weights (model.dtype)"
        reason = decisions[role].reason if decisions and role in decisions else f"autocast_bf16={group.autocast_bf16}"
        said.setdefault(f"{how} ({reason})", []).append(role)
    return "; ".join(f"{' and '.join(r)}: {text}" for text, r in said.items()) + f"; engines: {cfg.model.dtype}"


def summary(cfg, *, model: str, params: int, architecture: str, data: dict[str, str], machine: str,
            precision: str, placement: str, run_dir: str, resumed_from: str | None, step: int) -> str:
    """The start-up block, one fact per line."""
    t, a = cfg.trainer, cfg.algorithm
    start = (f"continuing from checkpoint {resumed_from} (step {step} of {t.steps})" if resumed_from
             else f"starting a fresh run (trainer.resume={t.resume})")
    schedule = (f"{t.steps} steps of {cfg.data.prompts_per_step} prompts x {cfg.rollout.n} samples; validation "
                + (f"every {t.val_every} steps" if t.val_every > 0 else "at the start and the end")
                + (f", a checkpoint every {t.save_every}" if t.save_every > 0 else ", a checkpoint at the end"))
    lines = [
        ("model", f"{model} ({architecture}, {params / 1e6:.1f}M parameters)"),
        ("algorithm", f"{a.name}: {a.advantage} advantages, {a.ratio_level}-level ratio, {a.policy_loss} loss"
                      + (f", segmenter {a.segmenter}" if algorithm_spec(cfg).needs_segments else "")),
        *((f"data/{role}", text) for role, text in data.items()),
        ("machine", machine),
        ("precision", precision),
        ("placement", placement),
        ("run dir", run_dir),
        ("start", start),
        ("schedule", schedule),
    ]
    width = max(len(k) for k, _ in lines)
    return "\n".join(["sapo-ray run:"] + [f"  {k:<{width}}  {v}" for k, v in lines])


def placement_line(cfg, plan, needs_critic: bool) -> str:
    """Where the actors go: the placement group's bundles, or each role's Ray request without one."""
    from sapo_ray import placement

    if plan is not None:
        return f"cluster.placement={cfg.cluster.placement}: " + placement.describe(plan).replace("\n", "; ")
    roles = [("rollout", cfg.rollout.num_workers, cfg.rollout), ("actor", cfg.actor.world_size, cfg.actor)]
    if needs_critic:
        roles.append(("critic", cfg.critic.world_size, cfg.critic))
    return "Ray places each actor by its request: " + ", ".join(
        f"{name} {n} x ({g.num_cpus:g} CPU, {g.num_gpus:g} GPU)" for name, n, g in roles)


def block(cfg, path: str, plan, decisions: dict[str, Decision] | None, data_reports: dict, needs_critic: bool,
          run_dir, resumed_from, step: int) -> str:
    """The start-up block of a run whose model directory is `path` (`summary`, its facts gathered)."""
    from transformers import AutoConfig

    from sapo_ray.plan import model_shape

    return summary(
        cfg, model=cfg.model.path, params=model_shape(path).params,
        architecture=(AutoConfig.from_pretrained(path).architectures or ["?"])[0],
        data={role: f"{getattr(cfg.data, role)}: {report.summary()}" for role, report in data_reports.items()},
        machine=machine_line(), precision=precision_line(cfg, decisions, needs_critic),
        placement=placement_line(cfg, plan, needs_critic), run_dir=str(Path(run_dir).resolve()),
        resumed_from=str(resumed_from) if resumed_from else None, step=step)
