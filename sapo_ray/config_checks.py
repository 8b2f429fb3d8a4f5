"""Cross-field checks of a run config, before Ray starts: each key that names a registered entry is
looked up in its registry, and combinations that cannot work raise `ConfigError` naming the key; configs
that run but compute something else than they mean are returned as warnings.

Above the schema (`sapo_ray.config`), it reads the registries of every component (algorithms, engines,
layouts, sync methods, loggers, datasets, placement).
"""

from __future__ import annotations

import logging

from sapo_ray import precision
from sapo_ray.algo.registry import AlgorithmSpec, missing_segment_options
from sapo_ray.config import ConfigError, algorithm_spec, response_tokens

log = logging.getLogger(__name__)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _choices(cfg) -> dict:
    """Each key whose value must name a registered entry: (value, the registry's keys)."""
    from sapo_ray.algo import advantages, kl, losses
    from sapo_ray.algo.registry import ADVANTAGES, SEGMENTERS
    from sapo_ray.learner.forward import LAYOUTS
    from sapo_ray.learner.worker import DTYPES, LR_SCHEDULES
    from sapo_ray.rollout.engine import ENGINES
    from sapo_ray.sync import SYNC_METHODS

    a = cfg.algorithm
    choices = {
        "algorithm.advantage": (a.advantage, ADVANTAGES),
        "algorithm.segmenter": (a.segmenter, SEGMENTERS),
        "algorithm.value_anchor": (a.value_anchor, advantages.VALUE_ANCHORS),
        "algorithm.ratio_level": (a.ratio_level, losses.RATIO_LEVELS),
        "algorithm.loss_agg": (a.loss_agg, losses.LOSS_AGGS),
        "algorithm.policy_loss": (a.policy_loss, losses.POLICY_LOSSES),
        "algorithm.kl_kind": (a.kl_kind, kl.KL_KINDS),
        "algorithm.kl_loss_kind": (a.kl_loss_kind, kl.KL_KINDS),
        "model.dtype": (cfg.model.dtype, DTYPES),
        "actor.optim.schedule": (cfg.actor.optim.schedule, LR_SCHEDULES),
        "critic.optim.schedule": (cfg.critic.optim.schedule, LR_SCHEDULES),
        "rollout.engine": (cfg.rollout.engine, ENGINES),
        "rollout.weight_sync": (cfg.rollout.weight_sync, SYNC_METHODS),
        "actor.layout": (cfg.actor.layout, LAYOUTS),
        "critic.layout": (cfg.critic.layout, LAYOUTS),
    }
    if a.advantage == "group":
        choices["algorithm.group_kind"] = (a.group_kind, advantages.GROUP_KINDS)
    return choices


# How far a learner computing in bfloat16 (`autocast_bf16` on CPUs, FSDP2's mixed precision on GPUs) or
# another dtype puts a sequence's mean log-prob from the engine's at the same weights (~1.8e-3 measured,
# benchmarks/RESULTS.md): the importance ratio against the engine's log-probs is that far from 1 before
# any update.
PRECISION_GAP = 2e-3


def precision_warnings(cfg) -> list[str]:
    """What the config computes that its numbers make meaningless: a clip range inside the gap between the
    engine's log-probs, used as the old ones, and the learner's (GSPO's 3e-4 / 4e-4 clips on that noise)."""
    a, actor = cfg.algorithm, cfg.actor
    from sapo_ray.rollout.engine import engine_traits

    differs = (cfg.model.dtype != "float32" or actor.num_gpus > 0 or not engine_traits(cfg.rollout.engine).learner_kernels
               or precision.use_bf16(actor.autocast_bf16))
    if actor.recompute_old_logp or not differs or min(a.clip_low, a.clip_high) > 5 * PRECISION_GAP:
        return []
    return [f"algorithm {a.name!r} clips its ratio at {a.clip_low:g} / {a.clip_high:g}, within 5x the ~{PRECISION_GAP:g} "
            "gap between the engine's log-probs (the old ones under actor.recompute_old_logp=false) and the "
            "learner's lower-precision ones: the clip acts on that noise and drops part of the gradient "
            "(actor/pg_clipfrac > 0 before any update); set actor.recompute_old_logp=true"]


def layout_warnings(cfg) -> list[str]:
    """What a layout will compute slowly: `packed` without variable-length attention kernels."""
    return [f"{role}.layout=packed with model.attn_implementation={cfg.model.attn_implementation}: the rows are kept "
            "apart by a block-diagonal mask, quadratic in the packed length (flash_attention_2 on GPUs has "
            "variable-length kernels; layout=shared_prompt is the fast choice otherwise)"
            for role in ("actor", "critic")
            if cfg[role].layout == "packed" and cfg.model.attn_implementation != "flash_attention_2"]


def validate(cfg) -> None:
    """Cross-field checks that types alone cannot express; raises ConfigError naming the key. Configs that
    run but compute something else than they mean are logged as warnings (`precision_warnings`)."""
    for key, (value, allowed) in _choices(cfg).items():
        _check(value in allowed, f"{key}={value!r} is not one of {sorted(allowed)}")
    for role in ("actor", "critic"):
        value = precision.normalize(cfg[role].autocast_bf16)
        _check(value in precision.SETTINGS, f"{role}.autocast_bf16={value!r} is not one of {list(precision.SETTINGS)}")
    a, r, d = cfg.algorithm, cfg.rollout, cfg.data
    _check(0 < a.frac <= 1, f"algorithm.frac={a.frac} must be in (0, 1]")
    spec = algorithm_spec(cfg)
    missing = missing_segment_options(spec)
    _check(not missing, f"algorithm.segmenter={a.segmenter} needs "
           + ", ".join(f"+algorithm.segment_options.{name}=..." for name in missing))
    if spec.needs_group:
        _check(r.n >= 2, f"algorithm {a.name!r} compares responses to one prompt: set rollout.n >= 2 (got {r.n})")
    if a.overlong_penalty and a.overlong_buffer_len is not None:
        _check(0 < a.overlong_buffer_len <= r.max_new_tokens,
               f"algorithm.overlong_buffer_len={a.overlong_buffer_len} must be in (0, rollout.max_new_tokens="
               f"{r.max_new_tokens}], or null for a fifth of rollout.max_new_tokens")
    _check(a.critic_warmup >= 0, f"algorithm.critic_warmup={a.critic_warmup} must be >= 0")
    _check_lora(cfg)
    _check_env(cfg.env)
    _check(a.max_refill >= 0, f"algorithm.max_refill={a.max_refill} must be >= 0")
    _validate_batch(cfg, spec)
    _check(r.tis_cap == 0 or r.tis_cap >= 1, f"rollout.tis_cap={r.tis_cap} must be 0 (off) or >= 1")
    _check(r.weight_sync != "broadcast" or (r.num_gpus > 0) == (cfg.actor.num_gpus > 0),
           f"rollout.weight_sync=broadcast needs learners and rollout both on GPUs (NCCL) or both on CPUs (gloo); "
           f"got actor.num_gpus={cfg.actor.num_gpus}, rollout.num_gpus={r.num_gpus}")
    _check(r.weight_sync != "broadcast" or r.num_gpus == 0 or cfg.cluster.placement == "split"
           or (r.num_gpus >= 1 and cfg.actor.num_gpus >= 1),
           "rollout.weight_sync=broadcast on GPUs needs the engines and learner rank 0 on different GPUs (NCCL cannot "
           f"join two processes on one GPU); got rollout.num_gpus={r.num_gpus}, actor.num_gpus={cfg.actor.num_gpus}: "
           "use cluster.placement=split, whole GPUs for both, or rollout.weight_sync=object_store")
    for warning in precision_warnings(cfg) + layout_warnings(cfg):
        log.warning("%s", warning)
    _check(r.max_staleness in (0, 1), f"rollout.max_staleness={r.max_staleness}: 0 (synchronous) or 1 (one step "
                                      "off-policy); more steps in flight are not implemented")
    _check(not (r.max_staleness and r.enable_sleep_mode),
           "rollout.max_staleness=1 samples while the learners train, so the engines cannot sleep meanwhile: "
           "set rollout.enable_sleep_mode=false (and give the engines memory of their own)")
    _check_engine(cfg)
    for key in ("max_pixels", "min_pixels"):
        _check(d[key] is None or d[key] > 0, f"data.{key}={d[key]} must be > 0, or null for the processor's own")
    _check(d.max_pixels is None or d.min_pixels is None or d.min_pixels <= d.max_pixels,
           f"data.min_pixels={d.min_pixels} must be <= data.max_pixels={d.max_pixels}")
    _check(d.video_fps > 0, f"data.video_fps={d.video_fps} must be > 0")
    _check(d.max_frames >= 1, f"data.max_frames={d.max_frames} must be >= 1")
    _check(d.video_max_pixels is None or d.video_max_pixels > 0,
           f"data.video_max_pixels={d.video_max_pixels} must be > 0 (or null: the images' budget)")
    _check(1 <= r.num_workers <= d.prompts_per_step,
           f"rollout.num_workers={r.num_workers} must be between 1 and data.prompts_per_step={d.prompts_per_step}")
    from sapo_ray.tracking import LOGGERS, missing_logger_packages

    unknown = [name for name in cfg.trainer.loggers if name not in LOGGERS]
    _check(not unknown, f"trainer.loggers has unknown entries {unknown}; use {', '.join(LOGGERS)}")
    missing = missing_logger_packages(cfg.trainer.loggers)
    _check(not missing, "; ".join(missing))
    _check(cfg.trainer.steps >= 1, "trainer.steps must be >= 1")
    _check(cfg.trainer.rpc_timeout_s > 0, f"trainer.rpc_timeout_s={cfg.trainer.rpc_timeout_s} must be > 0")
    _check(cfg.trainer.max_ckpt_to_keep >= 0, f"trainer.max_ckpt_to_keep={cfg.trainer.max_ckpt_to_keep} must be >= 0 (0 = all)")
    _check(0 <= cfg.reward.max_error_rate <= 1, f"reward.max_error_rate={cfg.reward.max_error_rate} must be in [0, 1]")
    _check(not cfg.reward.batch or cfg.reward.custom, "reward.batch=true needs reward.custom=path/to/file.py:function")
    _check(cfg.reward.tool_error_penalty >= 0,
           f"reward.tool_error_penalty={cfg.reward.tool_error_penalty} must be >= 0 (it is taken off the score)")
    _check(not cfg.reward.tool_error_penalty or cfg.env.name,
           "reward.tool_error_penalty needs episodes with tools (env.name): a single response calls no tool")
    from sapo_ray.data.datasets import DATASETS

    for role in ("train", "val"):
        _check(d[role] in DATASETS, f"data.{role}={d[role]!r} is not a known dataset; choose one of {list(DATASETS)}")
        _check(d[role] != "custom" or d[f"{role}_path"],
               f"data.{role}=custom needs data.{role}_path: a .jsonl, .json or .parquet file, a directory of them, or "
               "a hub dataset name@split")
    _check(d.train != "mathvista", "data.train=mathvista: MathVista is a test set and its terms say 'using it for "
                                   "training is prohibited'; train on geometry3k or synthvista, validate on mathvista")
    _check(cfg.cluster.simulate_gpus >= 0, f"cluster.simulate_gpus={cfg.cluster.simulate_gpus} must be >= 0")
    from sapo_ray.placement import PlacementError, plan

    try:
        plan(cfg, spec.needs_critic)
    except PlacementError as err:
        raise ConfigError(str(err)) from None


def _validate_batch(cfg, spec: AlgorithmSpec) -> None:
    """A full step's rows must split evenly over every learner group's ranks. Steps that lose groups
    (too-long prompts, dynamic sampling) are then trimmed by whole groups (`sapo_ray.bookkeeping.trim_groups`),
    which always leaves a multiple of the ranks (possibly none)."""
    r, d = cfg.rollout, cfg.data
    rows = d.prompts_per_step * r.n
    for role in ("actor", "critic") if spec.needs_critic else ("actor",):
        g = cfg[role]
        _check(g.world_size >= 1, f"{role}.world_size={g.world_size} must be >= 1")
        _check(g.mini_batch_size % g.world_size == 0,
               f"{role}.mini_batch_size={g.mini_batch_size} must be divisible by {role}.world_size={g.world_size}")
        _check(rows % g.world_size == 0,
               f"data.prompts_per_step * rollout.n = {d.prompts_per_step} x {r.n} = {rows} rows must be divisible "
               f"by {role}.world_size={g.world_size}, so that a step's groups split evenly over the ranks")
        longest = d.max_prompt_length + response_tokens(cfg)
        response = "env.max_tokens" if cfg.env.name else "rollout.max_new_tokens"
        _check(g.max_tokens_per_micro_batch == 0 or g.max_tokens_per_micro_batch >= longest,
               f"{role}.max_tokens_per_micro_batch={g.max_tokens_per_micro_batch} must hold one whole row: >= "
               f"data.max_prompt_length + {response} = {longest} (or 0 for micro_batch_size rows)")


def _check_lora(cfg) -> None:
    lora = cfg.actor.lora
    _check(cfg.critic.lora.rank == 0, f"critic.lora.rank={cfg.critic.lora.rank}: the critic trains every weight "
                                      "(LoRA is on the policy: actor.lora.rank)")
    _check(lora.rank >= 0, f"actor.lora.rank={lora.rank} must be >= 0 (0: full fine-tuning)")
    if lora.rank:
        _check(lora.alpha > 0, f"actor.lora.alpha={lora.alpha} must be > 0")
        _check(0 <= lora.dropout < 1, f"actor.lora.dropout={lora.dropout} must be in [0, 1)")
        _check(len(lora.target_modules) > 0, "actor.lora.target_modules is empty: name the layers to adapt")


def _check_env(e) -> None:
    """Multi-turn episodes: a known environment, limits that allow a turn, tools that exist."""
    from sapo_ray.envs.env import ENVS
    from sapo_ray.envs.tools import TOOLS

    if e.name is None:
        return
    _check(e.name in ENVS or ":" in e.name,
           f"env.name={e.name!r} is not one of {sorted(ENVS)} nor a class of yours, 'path/to/file.py:ClassName'")
    _check(e.max_turns >= 1, f"env.max_turns={e.max_turns} must be >= 1")
    _check(e.max_tokens >= 1, f"env.max_tokens={e.max_tokens} must be >= 1")
    _check(e.tool_workers >= 1 and e.tool_timeout_s > 0,
           f"env.tool_workers={e.tool_workers} must be >= 1 and env.tool_timeout_s={e.tool_timeout_s} > 0")
    unknown = [t for t in e.tools if t not in TOOLS]
    _check(not unknown, f"env.tools: unknown {unknown}; built in: {sorted(TOOLS)} (your own: env.tool_files)")


def _check_engine(cfg) -> None:
    """What the engine's traits ask of the config (`sapo_ray.rollout.engine.EngineTraits`)."""
    from sapo_ray.rollout.engine import ENGINES

    r = cfg.rollout
    traits = ENGINES[r.engine].traits
    sleepers = sorted(name for name, e in ENGINES.items() if e.traits.sleep_mode)
    _check(not r.enable_sleep_mode or (traits.sleep_mode and r.num_gpus > 0),
           f"rollout.enable_sleep_mode frees the GPU memory of an engine that can sleep ({', '.join(sleepers)}) and "
           f"needs rollout.num_gpus > 0 (got engine={r.engine}, num_gpus={r.num_gpus})")
    _check(traits.entropies or cfg.actor.recompute_old_logp,
           f"rollout.engine={r.engine} returns no per-token entropies (segments need them): set actor.recompute_old_logp=true")
    _check(r.images_per_prompt >= 1, f"rollout.images_per_prompt={r.images_per_prompt} must be >= 1")
    _check(r.videos_per_prompt >= 0, f"rollout.videos_per_prompt={r.videos_per_prompt} must be >= 0")
    takes_videos = sorted(name for name, e in ENGINES.items() if e.traits.videos)
    _check(r.videos_per_prompt == 0 or traits.videos,
           f"rollout.videos_per_prompt={r.videos_per_prompt}: rollout.engine={r.engine} does not take videos "
           f"({', '.join(takes_videos)} do)")
    if traits.tensor_parallel:
        _check(r.tensor_parallel_size >= 1, f"rollout.tensor_parallel_size={r.tensor_parallel_size} must be >= 1")
        _check(r.tensor_parallel_size == 1 or r.num_gpus >= r.tensor_parallel_size,
               f"rollout.tensor_parallel_size={r.tensor_parallel_size} shards each engine over that many GPUs: "
               f"set rollout.num_gpus >= it (got {r.num_gpus})")
    if traits.memory_pool:
        _check(0 < r.gpu_memory_utilization <= 1,
               f"rollout.gpu_memory_utilization={r.gpu_memory_utilization} must be in (0, 1]")
        _check(not 0 < r.num_gpus < 1 or r.gpu_memory_utilization <= r.num_gpus,
               f"rollout.gpu_memory_utilization={r.gpu_memory_utilization} is the share of the whole GPU the engine "
               f"reserves: keep it within the engine's share rollout.num_gpus={r.num_gpus} (the rest belongs to the "
               "learners)")
