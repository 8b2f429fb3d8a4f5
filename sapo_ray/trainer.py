"""The single-controller training loop.

One step reads like the algorithm box of the paper:
rollout -> score -> old/ref log-probs and values -> segments -> advantages -> critic update ->
actor update -> weight sync. Each phase is one method, timed under `timing_s/<phase>`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import ray
import torch
from omegaconf import OmegaConf

from sapo_ray.algo import kl as kl_mod
from sapo_ray.algo import losses, registry
from sapo_ray.batch import Batch, Sample
from sapo_ray.config import algorithm_spec, resolve_model_path
from sapo_ray.data.loader import PromptLoader
from sapo_ray.data.loaders import load_dataset_split
from sapo_ray.learner.group import WorkerGroup
from sapo_ray.models.tokens import TokenIds
from sapo_ray.learner.worker import CriticWorker, PolicyWorker
from sapo_ray.reward.pool import RewardPool
from sapo_ray.rollout.engine import Prompt, SamplingParams, encode_prompt
from sapo_ray.rollout.worker import RolloutWorker
from sapo_ray.sync import WeightSync
from sapo_ray.tracking import Tracker
from sapo_ray.utils import actor_env, rng_state, seed_everything, set_rng_state, timer

log = logging.getLogger(__name__)


def model_path(cfg) -> str:
    return resolve_model_path(cfg.model.path)


def _stats(prefix: str, x: torch.Tensor) -> dict[str, float]:
    x = x.float()
    if x.numel() == 0:
        return {}
    return {f"{prefix}/mean": float(x.mean()), f"{prefix}/max": float(x.max()), f"{prefix}/min": float(x.min())}


class Trainer:
    """Owns the Ray actors and the loop; `fit()` trains, validates, checkpoints and exports."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.run_dir = Path(cfg.trainer.run_dir)
        self.step = 0
        self.spec = algorithm_spec(cfg)
        # What the learners need besides the spec: trainer-side algorithm knobs and Dr.GRPO's length.
        self.update_args = {"entropy_coef": cfg.algorithm.entropy_coef, "value_clip": cfg.algorithm.value_clip,
                            "norm_len": cfg.rollout.max_new_tokens}

    # -- setup ---------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed)
        path = model_path(cfg)
        from sapo_ray.models import load_processor

        self.processor = load_processor(path)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.pad_id = TokenIds.of(self.tokenizer).pad
        self.has_vision = hasattr(self.processor, "image_processor")

        d = cfg.data
        train = load_dataset_split(d.train, d.train_path, d.train_split, for_training=True,
                                   **self._generator_knobs(d.train, d.train_path, n=d.train_size, seed=cfg.seed))
        self.val_examples = load_dataset_split(d.val, d.val_path, d.val_split, max_samples=d.val_size,
                                               **self._generator_knobs(d.val, d.val_path, seed=10_000 + cfg.seed))
        self.loader = PromptLoader(train, d.prompts_per_step, seed=cfg.seed)
        self.reward = RewardPool(cfg.reward.num_workers, cfg.reward.timeout_s, cfg.reward.custom,
                                 cfg.reward.acc_weight, cfg.reward.format_weight)

        self._check_resources()
        use_gpu = bool(cfg.rollout.num_gpus or cfg.actor.num_gpus)
        common = {"path": path, "dtype": cfg.model.dtype, "attn_implementation": cfg.model.attn_implementation,
                  "use_gpu": use_gpu}
        rollout_cfg = {**common, "engine": cfg.rollout.engine, "max_batch_size": cfg.rollout.max_batch_size,
                       "use_gpu": bool(cfg.rollout.num_gpus), "seed": cfg.seed,
                       **{k: cfg.rollout[k] for k in ("tensor_parallel_size", "gpu_memory_utilization",
                                                      "max_model_len", "enforce_eager", "enable_sleep_mode")}}
        rollout_actor = ray.remote(RolloutWorker)
        self.rollout = [
            rollout_actor.options(num_cpus=cfg.rollout.num_cpus, num_gpus=cfg.rollout.num_gpus,
                                  resources=dict(cfg.rollout.resources) or None,
                                  runtime_env={"env_vars": actor_env(cfg.rollout.num_threads)})
            .remote(rollout_cfg, cfg.rollout.num_threads)
            for _ in range(cfg.rollout.num_workers)
        ]
        total = cfg.trainer.steps * max(1, math.ceil(d.prompts_per_step * cfg.rollout.n / cfg.actor.mini_batch_size)) * cfg.actor.ppo_epochs
        needs_ref = self.needs_ref
        self.actor = self._group(PolicyWorker, cfg.actor, {**common, "needs_ref": needs_ref,
                                                           "temperature": cfg.rollout.temperature}, total, "actor")
        self.critic = None
        if self.spec.needs_critic:
            critic_common = {**common, "path": resolve_model_path(cfg.model.critic_path) if cfg.model.critic_path else path, "use_gpu": bool(cfg.critic.num_gpus)}
            self.critic = self._group(CriticWorker, cfg.critic, critic_common, total, "critic")
        ray.get([w.ready.remote() for w in self.rollout])
        ranks_per_engine = cfg.rollout.tensor_parallel_size if cfg.rollout.engine == "vllm" else 1
        self.weight_sync = WeightSync(self.actor, self.rollout, cfg.rollout.weight_sync,
                                      cfg.rollout.sync_bucket_mb * 2**20, ranks_per_engine)
        self.tracker = Tracker(str(self.run_dir), list(cfg.trainer.loggers), cfg.trainer.project,
                               cfg.trainer.experiment, OmegaConf.to_container(cfg, resolve=True))
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        self._maybe_resume()

    def _generator_knobs(self, name: str, path: str | None, **knobs) -> dict:
        """Generator arguments when `name` is generated (synthvista without a path), else none.
        A text-only model gets the rows that describe the image in words."""
        if name != "synthvista" or path is not None:
            return {}
        data = self.cfg.data
        return {**knobs, "image_size": data.image_size, "hint": data.hint, **({} if self.has_vision else {"text_only": True})}

    def _check_resources(self) -> None:
        """Fail with the numbers when the actors cannot all fit (Ray would otherwise wait forever)."""
        cfg = self.cfg
        groups = [("rollout", cfg.rollout.num_workers, cfg.rollout), ("actor", cfg.actor.world_size, cfg.actor)]
        if self.spec.needs_critic:
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

    @property
    def needs_ref(self) -> bool:
        s = self.spec
        return (s.kl_in_reward and s.kl_coef > 0) or (s.kl_loss and s.kl_loss_coef > 0)

    def _group(self, cls, g, common: dict, total_steps: int, name: str) -> WorkerGroup:
        wcfg = {**common, "seed": self.cfg.seed, "micro_batch_size": g.micro_batch_size,
                "mini_batch_size": g.mini_batch_size, "ppo_epochs": g.ppo_epochs, "shuffle": g.shuffle,
                "autocast_bf16": g.autocast_bf16, "freeze_vision_tower": g.freeze_vision_tower,
                "optim": OmegaConf.to_container(g.optim, resolve=True)}
        group = WorkerGroup(cls, g.world_size, wcfg, g.num_cpus, g.num_gpus, g.num_threads,
                            dict(g.resources) or None, name)
        group.call("setup", total_steps)
        return group

    # -- one step ----------------------------------------------------------------------------------
    def encode(self, example: dict) -> Prompt | None:
        """The example as an engine prompt; None if it is longer than `data.max_prompt_length`."""
        prompt = encode_prompt(self.processor, example, self.cfg.data.instruction,
                               keep_images=self.cfg.rollout.engine == "vllm")
        return prompt if len(prompt.ids) <= self.cfg.data.max_prompt_length else None

    def generate(self, examples: list[dict], params: SamplingParams) -> tuple[list[Sample], list[dict], int]:
        """Split prompts over the rollout workers; returns samples (grouped by prompt), kept examples, skipped."""
        prompts, kept = [], []
        for ex in examples:
            p = self.encode(ex)
            if p is not None:
                prompts.append(p)
                kept.append(ex)
        k = len(self.rollout)
        per = math.ceil(len(prompts) / k) if prompts else 0
        refs = [w.generate.remote(prompts[i * per:(i + 1) * per], SamplingParams(**{**params.__dict__, "seed": params.seed + i}), i * per)
                for i, w in enumerate(self.rollout) if prompts[i * per:(i + 1) * per]]
        samples = [s for part in ray.get(refs) for s in part]
        return samples, kept, len(examples) - len(kept)

    def rollout_step(self, timing: dict) -> tuple[Batch | None, list[dict], dict]:
        """Generate and score until a full batch (DAPO's dynamic sampling may draw more prompts)."""
        cfg, spec = self.cfg, self.spec
        params = SamplingParams(n=cfg.rollout.n, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.seed * 1_000_003 + self.step * 101)
        target = cfg.data.prompts_per_step
        kept_samples: list[Sample] = []
        kept_examples: list[dict] = []
        kept_scores: list[dict] = []
        metrics = {"data/prompt_too_long": 0.0, "reward/errors": 0.0, "reward/timeouts": 0.0, "rollout/dropped_groups": 0.0,
                   "rollout/skipped_update": 0.0}
        first_scores: list[float] = []
        for attempt in range(1 + (cfg.algorithm.max_refill if spec.dynamic_sampling else 0)):
            with timer("gen", timing):
                samples, examples, skipped = self.generate(self.loader.next_batch(), params)
                params.seed += 7919
            metrics["data/prompt_too_long"] += skipped
            with timer("reward", timing):
                scores, errors, timeouts = self.reward.score([s.text for s in samples],
                                                             [examples[s.prompt_index] for s in samples])
            metrics["reward/errors"] += errors
            metrics["reward/timeouts"] += timeouts
            if attempt == 0:
                first_scores = [x["score"] for x in scores]
            keep = torch.ones(len(samples), dtype=torch.bool)
            if spec.dynamic_sampling and samples:
                keep = registry.dynamic_sampling_keep(torch.tensor([x["score"] for x in scores]),
                                                      torch.tensor([s.prompt_index for s in samples]))
            groups: dict[int, list[int]] = {}
            for i, s in enumerate(samples):
                groups.setdefault(s.prompt_index, []).append(i)
            for p, idx in groups.items():
                if not bool(keep[idx[0]]):
                    metrics["rollout/dropped_groups"] += 1
                    continue
                new_index = len(kept_examples)
                kept_examples.append(examples[p])
                for i in idx:
                    samples[i].prompt_index = new_index
                    kept_samples.append(samples[i])
                    kept_scores.append(scores[i])
            if len(kept_examples) >= target:
                break
        if not kept_samples:
            # Every prompt too long or every group uninformative: no update this step, said in the metrics.
            log.warning("step %d: no usable rollouts (prompts too long or all groups dropped by dynamic "
                        "sampling); skipping the update", self.step + 1)
            metrics["rollout/skipped_update"] = 1.0
            return None, [], metrics
        # Keep whole groups, and a row count the learner ranks can split evenly.
        n_groups = min(len(kept_examples), target)
        keep = [i for i, s in enumerate(kept_samples) if s.prompt_index < n_groups]
        world = math.lcm(self.actor.world_size, self.critic.world_size if self.critic else 1)
        keep = keep[: len(keep) - len(keep) % world] or keep
        samples = [kept_samples[i] for i in keep]
        scores = [kept_scores[i] for i in keep]
        batch = Batch.from_samples(samples, self.pad_id)
        batch = batch.with_data(
            scores=torch.tensor([x["score"] for x in scores], dtype=torch.float32),
            acc=torch.tensor([x["acc"] for x in scores], dtype=torch.float32),
            format=torch.tensor([x["format"] for x in scores], dtype=torch.float32),
            group_index=torch.tensor([s.prompt_index for s in samples], dtype=torch.long),
            finished=torch.tensor([s.finished for s in samples], dtype=torch.bool),
        )
        if spec.dynamic_sampling:
            metrics["rollout/first_draw_score_mean"] = float(np.mean(first_scores)) if first_scores else 0.0
        return batch, kept_examples, metrics

    def compute_advantages(self, batch: Batch) -> tuple[Batch, dict]:
        """Shaped scores, segments from the old-policy entropies, then the registered estimator."""
        spec, mask = self.spec, batch.response_mask
        scores = registry.shape_scores(spec, batch.data["scores"], mask.sum(1), self.cfg.rollout.max_new_tokens)
        inputs = {"entropy": batch.data["entropy"], "logprobs": batch.data["old_logp"]}
        if spec.segmenter in ("newline", "step_marker"):
            inputs["token_texts"] = [[self.tokenizer.decode([t]) for t in row[: int(m.sum())].tolist()]
                                     for row, m in zip(batch.response_ids, mask)]
        seg = registry.make_segments(spec, mask, **inputs)
        advantages, returns = registry.compute_advantages(
            spec, scores=scores, mask=mask, values=batch.data.get("values"), segments=seg,
            group_index=batch.data["group_index"], old_logp=batch.data["old_logp"], ref_logp=batch.data.get("ref_logp"))
        fields = {"advantages": advantages, "returns": returns}
        if seg is not None:
            fields["seg_end"] = seg.end_mask
        if spec.needs_critic:
            fields["value_mask"] = registry.critic_mask(spec, mask, seg).float()
        out = batch.with_data(**fields)
        valid = mask.bool()
        metrics = {**_stats("critic/advantages", advantages[valid]), **_stats("critic/returns", returns[valid])}
        if seg is not None:
            lengths = mask.sum(1)
            metrics["segments/per_response"] = float(seg.num_segments.float().mean())
            metrics["segments/mean_len"] = float(lengths.sum() / seg.num_segments.sum().clamp(min=1))
        if "ref_logp" in batch.data:
            kl_t = kl_mod.estimate(batch.data["old_logp"], batch.data["ref_logp"], kind=spec.kl_kind)
            metrics["actor/reward_kl"] = float(losses.masked_mean(kl_t, mask))
        if "values" in batch.data:
            vm = fields["value_mask"]
            metrics["critic/vf_explained_var"] = float(losses.explained_variance(returns, batch.data["values"], vm))
            metrics.update(_stats("critic/values", batch.data["values"][vm.bool()]))
        return out, metrics

    def tis_weights(self, batch: Batch) -> tuple[Batch, dict]:
        """Truncated importance sampling: per-token `min(pi_old / pi_rollout, tis_cap)` for the policy loss,
        correcting for the rollout engine sampling from a slightly different distribution than the learner's."""
        cap, valid = self.cfg.rollout.tis_cap, batch.response_mask.bool()
        w = torch.exp(batch.data["old_logp"] - batch.data["rollout_logp"]).clamp(max=cap)
        w = torch.where(valid, w, torch.zeros_like(w))
        return batch.with_data(is_weights=w), {"rollout/tis_weight_mean": float(w[valid].mean()),
                                               "rollout/tis_clipfrac": float((w[valid] >= cap).float().mean())}

    def sync_weights(self) -> dict:
        """Bucketed full weights from learner rank 0 into every rollout engine, in place (`sapo_ray.sync`)."""
        return self.weight_sync()

    def train_step(self) -> dict:
        timing: dict[str, float] = {}
        t0 = time.perf_counter()
        batch, examples, metrics = self.rollout_step(timing)
        if self.cfg.rollout.enable_sleep_mode:  # the learners get the GPU memory until the next sync
            ray.get([w.sleep.remote() for w in self.rollout])
        if batch is None:
            timing["step"] = time.perf_counter() - t0
            return {**metrics, **{f"timing_s/{k}": v for k, v in timing.items()}}
        if self.cfg.actor.recompute_old_logp:
            with timer("old_log_prob", timing):
                batch = batch.with_data(**self.actor.gather_tensors("compute_logprobs", batch, "policy"))
        else:
            batch = batch.with_data(old_logp=batch.data["rollout_logp"], entropy=batch.data["rollout_entropy"])
        if self.cfg.rollout.tis_cap > 0:
            batch, tis_metrics = self.tis_weights(batch)
            metrics.update(tis_metrics)
        if self.needs_ref:
            with timer("ref", timing):
                batch = batch.with_data(**self.actor.gather_tensors("compute_logprobs", batch, "ref"))
        if self.critic:
            with timer("values", timing):
                batch = batch.with_data(**self.critic.gather_tensors("compute_values", batch))
        with timer("adv", timing):
            batch, adv_metrics = self.compute_advantages(batch)
        metrics.update(adv_metrics)
        if self.critic:
            with timer("update_critic", timing):
                metrics.update(_mean_dicts(self.critic.call_sharded("update", batch, self.spec, self.update_args)))
        if not self.critic or self.step >= self.cfg.trainer.critic_warmup:
            with timer("update_actor", timing):
                metrics.update(_mean_dicts(self.actor.call_sharded("update", batch, self.spec, self.update_args)))
            with timer("update_weights", timing):
                metrics.update(self.sync_weights())
        timing["step"] = time.perf_counter() - t0
        metrics.update(self._batch_metrics(batch))
        metrics.update({f"timing_s/{k}": v for k, v in timing.items()})
        tokens = float(batch.response_mask.sum() + batch.prompt_mask.sum())
        metrics["perf/throughput"] = tokens / timing["step"]
        metrics["perf/response_tokens"] = float(batch.response_mask.sum())
        metrics.update(self._memory_metrics())
        return metrics

    def _memory_metrics(self) -> dict:
        """Peak resident memory (MB) of the largest actor of each role."""
        refs = {"rollout": [w.peak_memory_mb.remote() for w in self.rollout],
                "actor": [w.peak_memory_mb.remote() for w in self.actor.workers]}
        if self.critic:
            refs["critic"] = [w.peak_memory_mb.remote() for w in self.critic.workers]
        return {f"perf/peak_mem_mb/{role}": max(ray.get(r)) for role, r in refs.items()}

    def _batch_metrics(self, batch: Batch) -> dict:
        mask = batch.response_mask
        lengths = mask.sum(1)
        m = {**_stats("critic/score", batch.data["scores"]),
             "reward/accuracy": float(batch.data["acc"].mean()), "reward/format": float(batch.data["format"].mean()),
             **_stats("response_length", lengths),
             "response_length/clip_ratio": float((~batch.data["finished"]).float().mean()),
             **_stats("prompt_length", batch.prompt_mask.sum(1).float())}
        diff = (batch.data["rollout_logp"] - batch.data["old_logp"]).abs()[mask.bool()]
        if diff.numel() and self.cfg.actor.recompute_old_logp:
            m["rollout/logp_diff_mean"], m["rollout/logp_diff_max"] = float(diff.mean()), float(diff.max())
        return m

    # -- validation ----------------------------------------------------------------------------------
    def validate(self) -> dict:
        cfg = self.cfg
        out: dict[str, float] = {}
        settings = {"": SamplingParams(n=cfg.rollout.val_n, temperature=cfg.rollout.val_temperature,
                                       top_p=cfg.rollout.val_top_p, max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.seed + 17),
                    "_greedy": SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.rollout.max_new_tokens)}
        for suffix, params in settings.items():
            samples, examples, _ = self.generate(self.val_examples, params)
            scores, _, _ = self.reward.score([s.text for s in samples], [examples[s.prompt_index] for s in samples])
            acc = np.array([x["acc"] for x in scores], dtype=float)
            out[f"val/accuracy{suffix}"] = float(acc.mean()) if len(acc) else 0.0
            if not suffix:
                out["val/score"] = float(np.mean([x["score"] for x in scores])) if scores else 0.0
                out["val/format"] = float(np.mean([x["format"] for x in scores])) if scores else 0.0
                out["val/response_length"] = float(np.mean([len(s.response_ids) for s in samples])) if samples else 0.0
                by_cat: dict[str, list[float]] = {}
                for s, x in zip(samples, scores):
                    cat = (examples[s.prompt_index].get("metadata") or {}).get("category") or "unknown"
                    by_cat.setdefault(cat, []).append(x["acc"])
                out.update({f"val/accuracy/{c}": float(np.mean(v)) for c, v in by_cat.items()})
        return out

    # -- checkpoints ---------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        path = self.run_dir / "checkpoints" / f"step_{self.step:06d}"
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.actor.call("save_checkpoint", str(tmp / "actor"))
        if self.critic:
            self.critic.call("save_checkpoint", str(tmp / "critic"))
        state = {"step": self.step, "loader": self.loader.state_dict(), "rng": rng_state()}
        (tmp / "trainer_state.json").write_text(json.dumps(state))
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)  # a checkpoint directory exists only once it is complete
        (self.run_dir / "checkpoints" / "latest").write_text(path.name)
        return path

    def _maybe_resume(self) -> None:
        resume = self.cfg.trainer.resume
        if resume == "never":
            return
        if resume == "auto":
            latest = self.run_dir / "checkpoints" / "latest"
            if not latest.exists():
                return
            path = latest.parent / latest.read_text().strip()
        else:
            path = Path(resume)
            if not (path / "trainer_state.json").exists():
                raise FileNotFoundError(f"trainer.resume={resume!r}: no checkpoint there (trainer_state.json missing)")
        state = json.loads((path / "trainer_state.json").read_text())
        self.actor.call("load_checkpoint", str(path / "actor"))
        if self.critic:
            self.critic.call("load_checkpoint", str(path / "critic"))
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        self.sync_weights()
        log.info("resumed from %s at step %d", path, self.step)

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg.trainer
        last_val: dict = {}
        self.tracker.start(cfg.steps, self.step)
        if self.step == 0:
            last_val = self.validate()
            self.tracker.log(last_val, step=0)
        while self.step < cfg.steps:
            metrics = self.train_step()
            self.step += 1
            if (cfg.val_every > 0 and self.step % cfg.val_every == 0) or self.step == cfg.steps:
                with timer("val", t := {}):
                    last_val = self.validate()
                metrics.update(last_val)
                metrics["timing_s/val"] = t["val"]
            self.tracker.log(metrics, step=self.step)
            if (cfg.save_every > 0 and self.step % cfg.save_every == 0) or self.step == cfg.steps:
                self.save_checkpoint()
        if cfg.export_hf:
            self.actor.call("export_hf", str(self.run_dir / "hf_policy"))
        return last_val

    def close(self) -> None:
        """Release the actors, the reward processes and the loggers (the cluster may be shared)."""
        for w in getattr(self, "rollout", []):
            ray.kill(w)
        for group in (getattr(self, "actor", None), getattr(self, "critic", None)):
            if group is not None:
                group.shutdown()
        if hasattr(self, "reward"):
            self.reward.close()
        if hasattr(self, "tracker"):
            self.tracker.close()


def _mean_dicts(parts: list[dict]) -> dict:
    keys = parts[0].keys()
    return {k: float(np.mean([p[k] for p in parts])) for k in keys}
