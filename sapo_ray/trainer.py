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
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import ray
import torch
from omegaconf import OmegaConf

from sapo_ray.algo import registry
from sapo_ray import placement, startup
from sapo_ray import step as bookkeeping
from sapo_ray.batch import Batch, Prompt, Sample, SamplingParams
from sapo_ray.config import (algorithm_spec, learner_worker_config, needs_ref, resolve_model_path,
                             rollout_worker_config)
from sapo_ray.data.datasets import load_dataset_split
from sapo_ray.data.prompt_loader import PromptLoader
from sapo_ray.data.report import DataReport
from sapo_ray.learner.group import WorkerGroup
from sapo_ray.learner.worker import CriticWorker, PolicyWorker
from sapo_ray.models.tokens import TokenIds
from sapo_ray.remote import ActorFailure, wait_all
from sapo_ray.reward.pool import RewardPool
from sapo_ray.rollout.engine import encode_prompt
from sapo_ray.rollout.worker import RolloutWorker
from sapo_ray.signals import StopSignals
from sapo_ray.sync import WeightSync
from sapo_ray.reward.mathvista import result_file
from sapo_ray.tracking import Tracker, flatten, generation_records, write_jsonl
from sapo_ray.utils import (actor_env, derive_seed, fsync_tree, rng_state, seed_everything, set_rng_state, timer,
                            write_atomic)

log = logging.getLogger(__name__)
# A checkpoint's in-flight rollout (`rollout.max_staleness`): the next step's samples, already drawn.
IN_FLIGHT = "in_flight_rollout.pt"


def model_path(cfg) -> str:
    return resolve_model_path(cfg.model.path)


class Trainer:
    """Owns the Ray actors and the loop; `fit()` trains, validates, checkpoints and exports."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.run_dir = Path(cfg.trainer.run_dir)
        self.step = 0
        self.spec = algorithm_spec(cfg)
        self.policy_version = 0  # policy updates so far; a rollout's staleness is how many it missed
        self.failing_steps = 0  # steps running whose reward error rate exceeded reward.max_error_rate
        self.restarts = 0  # actors replaced after dying or going silent (trainer.max_actor_restarts)
        self.reward_errors_seen: set[str] = set()  # reward error messages already logged
        self.in_flight: Rollout | None = None  # the next step's first draw, sampling during this step
        self.stability = bookkeeping.Stability()  # grad-norm spikes and collapse over the run
        # Between a step's update and its end the learners hold weights of a step not finished yet: a stop
        # signal waits for the step (`sapo_ray.signals`).
        self.learners_ahead = False
        self.stop = StopSignals(deferring=lambda: self.learners_ahead)
        self.unlogged: dict | None = None  # a finished step's metrics, logged with its validation
        self.boundary: dict | None = None  # the trainer's state as the current step began (`trainer_state`)

    # -- setup ---------------------------------------------------------------------------------------
    def setup(self, precision: dict | None = None) -> None:
        """Data, reward pool, placement, engines, learners, loggers, and the checkpoint to continue;
        `precision`: the learners' `sapo_ray.precision.Decision`s, for the start-up block."""
        cfg = self.cfg
        seed_everything(cfg.seed)
        from sapo_ray.models import load_processor

        self.processor = load_processor(model_path(cfg), max_pixels=cfg.data.max_pixels, min_pixels=cfg.data.min_pixels)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.pad_id = TokenIds.of(self.tokenizer).pad
        self.has_vision = hasattr(self.processor, "image_processor")

        self.load_data()
        self.reward = RewardPool(cfg.reward.num_workers, cfg.reward.timeout_s, cfg.reward.custom,
                                 cfg.reward.acc_weight, cfg.reward.format_weight, cfg.reward.batch)

        plan = placement.plan(cfg, self.spec.needs_critic)
        if plan is None:
            self._check_resources()
        elif any(b.get("GPU") for b in plan.bundles):
            self._check_memory()
        self.placement = placement.PlacementGroup.create(plan, cfg.cluster.placement_timeout_s)
        r = cfg.rollout
        self.rollout = [self._start_rollout_worker(i) for i in range(r.num_workers)]
        # Engines first: vLLM sizes its KV cache from the free GPU memory it finds, which colocated learners
        # would otherwise already hold.
        self.wait_rollout([w.ready.remote() for w in self.rollout])
        if r.enable_sleep_mode:
            self.wait_rollout([w.sleep.remote() for w in self.rollout])
        self._start_learners()
        self.tracker = Tracker(str(self.run_dir), list(cfg.trainer.loggers), cfg.trainer.project,
                               cfg.trainer.experiment, OmegaConf.to_container(cfg, resolve=True))
        self._warn_config_changes()
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        resumed_from = self._maybe_resume()
        self._learners("offload")  # the first validation generates before any learner phase
        log.info("%s", startup.block(cfg, model_path(cfg), plan, precision, self.data_reports, self.critic is not None,
                                     self.run_dir, resumed_from, self.step))

    def _start_rollout_worker(self, i: int):
        r = self.cfg.rollout
        return (ray.remote(RolloutWorker)
                .options(num_cpus=r.num_cpus, num_gpus=r.num_gpus, resources=dict(r.resources) or None,
                         runtime_env={"env_vars": actor_env(r.num_threads, self.cfg.cluster.simulate_gpus > 0)},
                         **self.placement.options("rollout", i))
                .remote(rollout_worker_config(self.cfg, i)))

    def _start_learners(self) -> None:
        """The actor (and critic) groups and the weight sync from the actor into the engines."""
        cfg, r = self.cfg, self.cfg.rollout
        hide, timeout = cfg.cluster.simulate_gpus > 0, cfg.trainer.rpc_timeout_s
        self.actor = WorkerGroup(PolicyWorker, learner_worker_config(cfg, "actor"), self.placement, hide, timeout)
        self.critic = (WorkerGroup(CriticWorker, learner_worker_config(cfg, "critic"), self.placement, hide, timeout)
                       if self.spec.needs_critic else None)
        ranks_per_engine = r.tensor_parallel_size if r.engine == "vllm" else 1
        self.weight_sync = WeightSync(self.actor, self.rollout, r.weight_sync, r.sync_bucket_mb * 2**20, ranks_per_engine,
                                      wait=self.wait_rollout)

    def wait_rollout(self, refs: list, workers: list[int] | None = None) -> list:
        """Results of one call per rollout worker (`workers`, default all, in order), bounded by
        `trainer.rpc_timeout_s`; a dead or silent worker raises `ActorFailure` naming it."""
        workers = range(len(self.rollout)) if workers is None else workers
        return wait_all(refs, [rollout_worker_name(i) for i in workers], self.cfg.trainer.rpc_timeout_s)

    # -- faults --------------------------------------------------------------------------------------
    def _count_restart(self, failure: ActorFailure) -> None:
        self.restarts += 1
        limit = self.cfg.trainer.max_actor_restarts
        if self.restarts > limit:
            raise StopRun(f"{failure}; trainer.max_actor_restarts={limit} restarts are used up") from failure
        log.warning("%s; restarting it (restart %d of trainer.max_actor_restarts=%d)", failure, self.restarts, limit)

    def restart_rollout_worker(self, i: int, failure: ActorFailure) -> None:
        """Replace a dead or silent rollout worker by a new one holding the current policy."""
        self._count_restart(failure)
        if self.cfg.rollout.weight_sync == "broadcast":
            raise StopRun(f"{failure}: an engine of a weight-broadcast group cannot be replaced alone "
                          "(rollout.weight_sync=object_store can); resume the run from its last checkpoint") from failure
        ray.kill(self.rollout[i], no_restart=True)
        self.rollout[i] = self._start_rollout_worker(i)
        self.wait_rollout([self.rollout[i].ready.remote()], [i])
        with self.learners_on_device():  # the new engine loaded model.path: give it the policy of now
            self.weight_sync(only=[i])

    def recover_learners(self, failure: ActorFailure) -> None:
        """A learner rank died or went silent: new learner groups continue from the last checkpoint
        (the steps since are trained again, exactly as before on the CPU)."""
        self._count_restart(failure)
        path = self._latest_checkpoint()
        if path is None:
            raise StopRun(f"{failure}: no checkpoint to recover from yet (trainer.save_every="
                          f"{self.cfg.trainer.save_every})") from failure
        for group in (self.actor, self.critic):
            if group is not None:
                group.shutdown()
        self.in_flight = None  # the checkpoint holds the draw in flight at its step
        self._start_learners()
        self.load_checkpoint(path)
        self._learners("offload")
        self.tracker.rewind(self.step)
        if self.unlogged is not None:  # a checkpoint saved on a stop signal, before its step's validation
            self.finish_step()

    def _check_memory(self) -> None:
        """The memory plan (`python -m sapo_ray.plan`) before any actor exists: stop if a GPU is over budget."""
        from sapo_ray.plan import format_plan, memory_plan

        estimate = memory_plan(self.cfg)
        if not estimate["fits"]:
            raise RuntimeError(f"the memory plan exceeds cluster.gpu_memory_gb={self.cfg.cluster.gpu_memory_gb:g} GiB "
                               f"on some GPU (lower micro-batches or lengths, turn on model.gradient_checkpointing or "
                               f"rollout.enable_sleep_mode, or raise the budget if the GPUs are larger):\n"
                               f"{format_plan(estimate)}")

    def _warn_config_changes(self) -> None:
        """A run directory that already holds a run with another config: say which keys differ (the run
        continues its checkpoint with the new values, as `trainer.resume=auto` asks)."""
        old_path = self.run_dir / "config.yaml"
        if self.cfg.trainer.resume != "auto" or not (self.run_dir / "checkpoints" / "latest").exists():
            return
        old = flatten(OmegaConf.to_container(OmegaConf.load(old_path)))
        new = flatten(OmegaConf.to_container(self.cfg, resolve=True))
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if changed:
            log.warning("%s holds a run whose config differs in %s; continuing it with the new values",
                        self.run_dir, ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in changed))

    def load_data(self) -> None:
        """The training prompts' loader and the validation examples; what was kept and skipped of each goes
        to `data_report.json` in the run directory."""
        cfg, d = self.cfg, self.cfg.data
        reports = {"train": DataReport(), "val": DataReport()}
        columns = {"prompt_key": d.prompt_key, "answer_key": d.answer_key, "image_key": d.image_key,
                   "prompt_template": d.prompt_template, "image_check": self._check_image}
        try:
            train = load_dataset_split(d.train, d.train_path, d.train_split, for_training=True, report=reports["train"],
                                       columns=columns, **self._generator_knobs(d.train, d.train_path, n=d.train_size,
                                                                                seed=derive_seed(cfg.seed, "data/train")))
            self.val_examples = load_dataset_split(d.val, d.val_path, d.val_split, max_samples=d.val_size,
                                                   report=reports["val"], columns=columns,
                                                   **self._generator_knobs(d.val, d.val_path, seed=derive_seed(0, "data/val")))
        finally:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "data_report.json").write_text(json.dumps({k: r.as_dict() for k, r in reports.items()}, indent=1))
        self.data_reports = reports
        self.loader = PromptLoader(train, d.prompts_per_step, seed=derive_seed(cfg.seed, "loader"))

    def _check_image(self, image) -> None:
        """Raise what the model's processor raises for `image` (too small, an aspect ratio over 200, ...)."""
        if not self.has_vision:
            raise ValueError("the model takes text only")
        self.processor.image_processor(images=[image], return_tensors="pt")

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
    def learner_ranks(self) -> int:
        """Rows of a batch must be a multiple of this: every learner group splits them evenly."""
        return math.lcm(self.actor.world_size, self.critic.world_size if self.critic else 1)

    # -- one step ----------------------------------------------------------------------------------
    def encode(self, example: dict) -> Prompt | None:
        """The example as an engine prompt; None if it is longer than `data.max_prompt_length`."""
        prompt = encode_prompt(self.processor, example, self.cfg.data.instruction,
                               keep_images=self.cfg.rollout.engine == "vllm")
        return prompt if len(prompt.ids) <= self.cfg.data.max_prompt_length else None

    def submit_generate(self, examples: list[dict], params: SamplingParams, stream: tuple) -> "Rollout":
        """Start sampling `examples` on the rollout workers, worker i with `derive_seed(seed, *stream, i)`
        (prompts over `data.max_prompt_length` are left out and counted)."""
        prompts, kept = [], []
        for ex in examples:
            p = self.encode(ex)
            if p is not None:
                prompts.append(p)
                kept.append(ex)
        per = math.ceil(len(prompts) / len(self.rollout)) if prompts else 0
        parts = [(i, (prompts[i * per:(i + 1) * per], replace(params, seed=derive_seed(self.cfg.seed, *stream, i)), i * per))
                 for i in range(len(self.rollout)) if prompts[i * per:(i + 1) * per]]
        return Rollout([(i, args, self.rollout[i].generate.remote(*args)) for i, args in parts], kept,
                       len(examples) - len(kept), self.policy_version, resubmit=self.resubmit,
                       timeout_s=self.cfg.trainer.rpc_timeout_s)

    def resubmit(self, i: int, args: tuple, failure: ActorFailure):
        """Generate rollout worker `i`'s part again on a new worker (same prompts and seed)."""
        self.restart_rollout_worker(i, failure)
        return self.rollout[i].generate.remote(*args)

    def generate(self, examples: list[dict], params: SamplingParams,
                 stream: tuple) -> tuple[list[Sample], list[dict], int]:
        """Samples (`prompt_index` into the kept examples), the kept examples, and how many were too long."""
        rollout = self.submit_generate(examples, params, stream)
        return rollout.samples(), rollout.examples, rollout.too_long

    def sampling_params(self) -> SamplingParams:
        r = self.cfg.rollout
        return SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens)

    def rollout_step(self, timing: dict) -> tuple[Batch | None, dict]:
        """Generate and score prompt groups until a full batch (DAPO's dynamic sampling may draw more
        prompts), then keep whole groups whose rows split over the learner ranks."""
        cfg, spec = self.cfg, self.spec
        target = cfg.data.prompts_per_step
        groups: list[bookkeeping.Group] = []
        metrics = {"data/prompt_too_long": 0.0, "reward/errors": 0.0, "reward/timeouts": 0.0, "reward/samples": 0.0,
                   "rollout/dropped_groups": 0.0, "rollout/skipped_update": 0.0}
        for draw in range(1 + (spec.max_refill if spec.dynamic_sampling else 0)):
            with timer("gen", timing):
                if draw == 0 and self.in_flight:  # started during the previous step (`rollout.max_staleness`)
                    rollout, self.in_flight = self.in_flight, None
                else:
                    rollout = self.submit_rollout(self.step, draw)
                samples, examples, too_long = rollout.samples(), rollout.examples, rollout.too_long
            if draw == 0:
                metrics["rollout/staleness"] = float(self.policy_version - rollout.policy_version)
            metrics["data/prompt_too_long"] += too_long
            with timer("reward", timing):
                scores = self.score(samples, examples, metrics)
            if cfg.trainer.dump_rollouts:
                write_jsonl(self.run_dir / "generations" / f"rollout_step_{self.step + 1:06d}.jsonl",
                            generation_records(samples, examples, scores, step=self.step + 1, draw=draw))
            drawn = bookkeeping.group_samples(samples, scores, examples)
            if spec.dynamic_sampling:
                if draw == 0:
                    metrics["rollout/first_draw_score_mean"] = float(np.mean([x["score"] for x in scores])) if scores else 0.0
                kept = bookkeeping.informative_groups(drawn)
                metrics["rollout/dropped_groups"] += len(drawn) - len(kept)
                drawn = kept
            groups += drawn
            if len(groups) >= target:
                break
        self.check_reward_errors(metrics)
        trimmed = bookkeeping.trim_groups(groups, target, self.learner_ranks)
        metrics["rollout/trimmed_groups"] = float(min(len(groups), target) - len(trimmed))
        if not trimmed:
            # Every prompt too long, every group dropped, or too few rows for the ranks: no update, said in the metrics.
            log.warning("step %d: no usable rollouts (prompts too long, groups dropped by dynamic sampling, or fewer "
                        "rows than learner ranks); skipping the update", self.step + 1)
            metrics.update({"rollout/skipped_update": 1.0, "batch/rows": 0.0, "batch/groups": 0.0})
            return None, metrics
        return bookkeeping.make_batch(trimmed, self.pad_id), metrics

    def score(self, samples: list[Sample], examples: list[dict], metrics: dict, prefix: str = "") -> list[dict]:
        """Each sample's scores; adds the failures to `{prefix}reward/errors|timeouts|samples` and the mean
        of each of the reward function's extra numbers to `{prefix}reward/<name>` (the last draw's)."""
        scores, errors, timeouts = self.reward.score([s.text for s in samples], [examples[s.prompt_index] for s in samples])
        for key, n in (("errors", errors), ("timeouts", timeouts), ("samples", len(samples))):
            metrics[f"{prefix}reward/{key}"] = metrics.get(f"{prefix}reward/{key}", 0.0) + n
        if self.reward.last_error and self.reward.last_error not in self.reward_errors_seen:
            self.reward_errors_seen.add(self.reward.last_error)
            log.warning("reward: %d of %d samples failed to score; the first error: %s", errors, len(samples),
                        self.reward.last_error)
        extras = {k for x in scores for k in x} - {"score", "acc", "format"}
        for key in sorted(extras):
            values = [x[key] for x in scores if key in x]
            metrics[f"{prefix}reward/{key}"] = float(np.mean(values))
        return scores

    def check_reward_errors(self, metrics: dict) -> None:
        """Stop the run when more than `reward.max_error_rate` of the samples failed to score in each of
        three steps running: training on their zeros would teach nothing, silently."""
        n = metrics["reward/samples"]
        rate = (metrics["reward/errors"] + metrics["reward/timeouts"]) / n if n else 0.0
        metrics["reward/error_rate"] = rate
        self.failing_steps = self.failing_steps + 1 if rate > self.cfg.reward.max_error_rate else 0
        if self.failing_steps >= 3:
            raise StopRun(f"reward: {rate:.0%} of the samples failed to score in each of the last 3 steps "
                              f"(reward.max_error_rate={self.cfg.reward.max_error_rate}); stopping instead of "
                              f"training on zeros. The last error: {self.reward.last_error or 'a timeout'}")

    def check_skipped_steps(self, metrics: dict) -> None:
        """Stop when more than `trainer.max_skipped_steps` optimizer steps in a row were skipped for a
        non-finite gradient: the run would spin without learning."""
        limit = self.cfg.trainer.max_skipped_steps
        for role in ("actor", "critic"):
            in_a_row = metrics.get(f"{role}/skipped_in_a_row", 0.0)
            if limit and in_a_row > limit:
                raise StopRun(f"{role}: the last {in_a_row:.0f} optimizer steps were all skipped for a non-finite "
                              f"gradient norm (trainer.max_skipped_steps={limit}); the losses or advantages are not "
                              f"finite: check the rewards (reward/errors, critic/score/mean) and the learning rate")

    def submit_rollout(self, step: int, draw: int) -> "Rollout":
        """Start draw `draw` of training step `step` (0-based): the next prompts of the loader."""
        return self.submit_generate(self.loader.next_batch(), self.sampling_params(), ("rollout", step, draw))

    def token_texts(self, batch: Batch) -> list[list[str]]:
        """Each valid response token decoded (the text segmenters' input)."""
        return [[self.tokenizer.decode([t]) for t in row[: int(m.sum())].tolist()]
                for row, m in zip(batch.response_ids, batch.response_mask)]

    def sync_weights(self) -> dict:
        """Bucketed full weights from learner rank 0 into every rollout engine, in place (`sapo_ray.sync`);
        a rollout worker that dies meanwhile is replaced (and given the weights)."""
        try:
            return self.weight_sync()
        except ActorFailure as failure:
            names = [rollout_worker_name(i) for i in range(len(self.rollout))]
            if failure.actor not in names:
                raise
            self.restart_rollout_worker(names.index(failure.actor), failure)
            return self.weight_sync()

    def train_step(self) -> dict:
        cfg = self.cfg
        timing: dict[str, float] = {}
        t0 = time.perf_counter()
        batch, metrics = self.rollout_step(timing)
        if cfg.rollout.max_staleness:
            # One step off-policy: the next step's first draw samples on these weights while the learners
            # update them (the engines take the new weights after it, in call order). The last step too:
            # its checkpoint keeps that draw, so a run continued past `trainer.steps` trains as one that
            # never stopped.
            self.in_flight = self.submit_rollout(self.step + 1, 0)
        if cfg.rollout.enable_sleep_mode:  # the learners get the GPU memory until the next sync
            self.wait_rollout([w.sleep.remote() for w in self.rollout])
        if batch is None:
            timing["step"] = time.perf_counter() - t0
            return {**metrics, **{f"timing_s/{k}": v for k, v in timing.items()}}
        with self.learners_on_device():
            batch = self.learn(batch, metrics, timing)
        self.check_skipped_steps(metrics)
        timing["step"] = time.perf_counter() - t0
        metrics.update(bookkeeping.batch_metrics(batch, cfg.actor.recompute_old_logp))
        metrics = self.stability.update(metrics)
        metrics.update({f"timing_s/{k}": v for k, v in timing.items()})
        tokens = float(batch.response_mask.sum() + batch.prompt_mask.sum())
        metrics["perf/throughput"] = tokens / timing["step"]
        metrics["perf/response_tokens"] = float(batch.response_mask.sum())
        metrics.update(self._memory_metrics())
        return metrics

    def learn(self, batch: Batch, metrics: dict, timing: dict) -> Batch:
        """The step's learner phases on a scored batch: old, reference log-probs and values, advantages,
        critic and policy updates, weight sync. Returns the batch with what they computed; fills `metrics`."""
        cfg = self.cfg
        # Forward passes that need nothing of each other run at the same time: the critic's values beside
        # the policy's old and the reference's log-probs (one after the other on the actor ranks).
        with timer("forward", timing):
            old = (self.actor.submit_gather("compute_logprobs", batch, "policy") if cfg.actor.recompute_old_logp
                   else None)
            ref = self.actor.submit_gather("compute_logprobs", batch, "ref") if needs_ref(self.spec) else None
            values = self.critic.submit_gather("compute_values", batch) if self.critic else None
            batch = batch.with_data(**(old.get() if old else {"old_logp": batch.data["rollout_logp"],
                                                               "entropy": batch.data["rollout_entropy"]}),
                                    **(ref.get() if ref else {}), **(values.get() if values else {}))
        if cfg.rollout.tis_cap > 0:
            batch, tis_metrics = bookkeeping.tis_weights(batch, cfg.rollout.tis_cap)
            metrics.update(tis_metrics)
        with timer("adv", timing):
            texts = self.token_texts(batch) if registry.needs_token_texts(self.spec) else None
            batch, adv_metrics = bookkeeping.advantages(self.spec, batch, cfg.rollout.max_new_tokens, texts)
        metrics.update(adv_metrics)
        # The critic's and the policy's updates need nothing of each other either.
        train_actor = not self.critic or self.step >= self.spec.critic_warmup
        self.learners_ahead = True  # until the step is counted (`run_step`)
        with timer("update", timing):
            critic = self.critic.submit_sharded("update", batch) if self.critic else None
            actor = self.actor.submit_sharded("update", batch) if train_actor else None
            for pending in filter(None, (critic, actor)):
                metrics.update(_mean_dicts(pending.get()))
        if train_actor:
            self.policy_version += 1
            self._learners("release_cache")  # the update's peak memory freed before an engine wakes
            with timer("update_weights", timing):
                metrics.update(self.sync_weights())
        else:
            metrics["actor/lr"] = self.actor.wait([self.actor.workers[0].lr.remote()])[0]
        return batch

    @contextmanager
    def learners_on_device(self):
        """The learner groups' state on their GPUs for the block (`learner.offload`), and their free GPU memory
        handed back after it, for the colocated engines to generate in."""
        self._learners("onload")
        try:
            yield
        finally:
            self._learners("offload")

    def _learners(self, method: str) -> None:
        for group in (self.actor, self.critic):
            if group is not None:
                group.call(method)

    def _memory_metrics(self) -> dict:
        """Per role, the largest actor's peak host memory and, on GPUs, its peak GPU memory (MB). (A vLLM
        engine's model runs in processes of its own, which the rollout worker's numbers do not include.)"""
        peaks = {"rollout": self.wait_rollout([w.peak_memory_mb.remote() for w in self.rollout]),
                 "actor": self.actor.call("peak_memory_mb")}
        if self.critic:
            peaks["critic"] = self.critic.call("peak_memory_mb")
        return bookkeeping.memory_metrics(peaks)

    # -- validation ----------------------------------------------------------------------------------
    def validate(self) -> dict:
        cfg = self.cfg
        out: dict[str, float] = {}
        settings = {"": SamplingParams(n=cfg.rollout.val_n, temperature=cfg.rollout.val_temperature,
                                       top_p=cfg.rollout.val_top_p, max_new_tokens=cfg.rollout.max_new_tokens),
                    "_greedy": SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.rollout.max_new_tokens)}
        dump = self.run_dir / "generations" / f"val_step_{self.step:06d}.jsonl"
        dumping = cfg.trainer.dump_generations or cfg.trainer.val_only
        if dumping:
            dump.unlink(missing_ok=True)  # a resumed run validates this step again
        for suffix, params in settings.items():
            samples, examples, too_long = self.generate(self.val_examples, params, ("validation",))
            out["val/prompt_too_long"] = float(too_long)  # counted, never silently dropped
            scores = self.score(samples, examples, out if not suffix else {}, prefix="val/")
            if dumping:
                write_jsonl(dump, generation_records(samples, examples, scores, step=self.step,
                                                     sampling="greedy" if suffix else "sampled"))
            if suffix and cfg.data.val == "mathvista" and dumping:
                results = result_file([(examples[s.prompt_index], s.text) for s in samples])
                (self.run_dir / f"mathvista_results_step_{self.step:06d}.json").write_text(json.dumps(results, indent=1))
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
    def trainer_state(self) -> dict:
        """What a checkpoint keeps of the driver, beside the learners' state: the step, the loader's position,
        the random streams, the policy version, the stability statistics, the draw in flight, and the
        metrics of a step whose validation has not run yet."""
        return {"step": self.step, "loader": self.loader.state_dict(), "rng": rng_state(),
                "policy_version": self.policy_version, "stability": asdict(self.stability),
                "in_flight": self.in_flight, "unlogged": self.unlogged}

    def save_checkpoint(self, state: dict | None = None) -> Path:
        """Save the step's checkpoint (`state`: a `trainer_state()`, by default the current one); a save
        that fails (a full disk) removes what it wrote and stops the run, the last complete checkpoint untouched."""
        state = state or self.trainer_state()
        path = self.run_dir / "checkpoints" / f"step_{state['step']:06d}"
        tmp = path.with_name(path.name + ".tmp")
        try:
            return self._save(path, tmp, state)
        except (OSError, ray.exceptions.RayTaskError) as err:
            shutil.rmtree(tmp, ignore_errors=True)
            last = self._latest_checkpoint()
            raise StopRun(f"saving {path} failed ({type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}); "
                          f"the last complete checkpoint is {last or 'none'}: free space and run the same command "
                          "again to continue from it") from err

    def _save(self, path: Path, tmp: Path, state: dict) -> Path:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.actor.call("save_checkpoint", str(tmp / "actor"))
        if self.critic:
            self.critic.call("save_checkpoint", str(tmp / "critic"))
        in_flight = state["in_flight"]
        (tmp / "trainer_state.json").write_text(json.dumps({k: v for k, v in state.items() if k != "in_flight"}))
        # The config these weights were trained with (the run dir's is rewritten at every start), where
        # `python -m sapo_ray.export` finds the model's architecture and dtype.
        (tmp / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        if in_flight is not None:
            # The next step's first draw, sampled on weights this checkpoint no longer holds: saved as it
            # came out, so a resumed run trains on exactly what the uninterrupted one does.
            torch.save(in_flight.state(), tmp / IN_FLIGHT)
        self._check_shards(tmp)
        fsync_tree(tmp)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)  # a checkpoint directory exists only once it is complete
        write_atomic(self.run_dir / "checkpoints" / "latest", path.name)
        for old in stale_checkpoints(path.parent, self.cfg.trainer.max_ckpt_to_keep):
            shutil.rmtree(old)
        return path

    def _check_shards(self, checkpoint: Path) -> None:
        """Every learner rank's shards must be where the driver sees them: ranks on other nodes write to
        their own disks unless the run directory is shared storage."""
        for role, group in (("actor", self.actor), ("critic", self.critic)):
            if group is None:
                continue
            missing = [r for r in range(len(group.workers)) if not any((checkpoint / role).glob(f"__{r}_*.distcp"))]
            if missing:
                raise StopRun(f"checkpoint {checkpoint}: the {role} shards of ranks {missing} are not in {checkpoint / role} "
                              "as the driver sees it; ranks on other nodes need trainer.run_dir on storage every node "
                              "shares (NFS, a parallel file system)")

    def _latest_checkpoint(self) -> Path | None:
        """The checkpoint `checkpoints/latest` names, else (a save cut short) the newest complete one.
        Temporaries of an interrupted save are removed."""
        directory = self.run_dir / "checkpoints"
        for tmp in list(directory.glob("*.tmp")):
            log.warning("removing %s, left by an interrupted save", tmp)
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        latest = directory / "latest"
        name = latest.read_text().strip() if latest.exists() else ""
        if name and (directory / name / "trainer_state.json").exists():
            return directory / name
        complete = [p for p in sorted(directory.glob("step_*")) if (p / "trainer_state.json").exists()]
        if complete:
            log.warning("%s does not name a complete checkpoint: continuing from the newest one, %s", latest, complete[-1])
        return complete[-1] if complete else None

    def _maybe_resume(self) -> Path | None:
        """Load the checkpoint `trainer.resume` asks for, if any; returns its path."""
        resume = self.cfg.trainer.resume
        if resume == "never":
            return None
        if resume == "auto":
            path = self._latest_checkpoint()
            if path is None:
                return None
        else:
            path = Path(resume)
            if not (path / "trainer_state.json").exists():
                raise FileNotFoundError(f"trainer.resume={resume!r}: no checkpoint there (trainer_state.json missing)")
        self.load_checkpoint(path)
        if self.step >= self.cfg.trainer.steps:
            log.warning("%s already holds a finished run (step %d of trainer.steps=%d): nothing to train; "
                        "trainer.resume=never or another trainer.experiment starts a new run",
                        self.run_dir, self.step, self.cfg.trainer.steps)
        return path

    def load_checkpoint(self, path: Path) -> None:
        """The learners', the loader's, the random streams' and the step's state of checkpoint `path`, and
        its policy in the engines."""
        state = json.loads((path / "trainer_state.json").read_text())
        self.actor.call("load_checkpoint", str(path / "actor"))
        if self.critic:
            self.critic.call("load_checkpoint", str(path / "critic"))
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        self.policy_version = state.get("policy_version", 0)
        self.stability = bookkeeping.Stability(**state.get("stability", {}))
        self.unlogged = state.get("unlogged")
        self.learners_ahead = False
        if (path / IN_FLIGHT).exists():
            self.in_flight = Rollout.from_state(torch.load(path / IN_FLIGHT, weights_only=False))
        self.sync_weights()

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg.trainer
        last_val: dict = {}
        self.tracker.start(cfg.steps, self.step)
        if cfg.val_only:  # the model as loaded (model.path, or the checkpoint resumed), evaluated once
            last_val = self.validate()
            self.tracker.log(last_val, step=self.step)
            return last_val
        try:
            if self.step == 0:
                last_val = self.validate()
                self.tracker.log(last_val, step=0)
            if self.unlogged is not None:  # a run stopped before its last step's validation
                last_val = self.finish_step() or last_val
            while self.step < cfg.steps:
                try:
                    last_val = self.run_step() or last_val
                except ActorFailure as failure:  # a learner rank (rollout workers are replaced where they fail)
                    self.recover_learners(failure)
        except KeyboardInterrupt as err:  # a stop signal (`sapo_ray.signals`)
            self.save_on_stop()
            raise self.stop.reason(err) from None
        if cfg.export_hf:
            with self.learners_on_device():
                self.actor.call("export_hf", str(self.run_dir / "hf_policy"))
        return last_val

    def run_step(self) -> dict:
        """One training step, its validation and checkpoint when due; returns the validation metrics, if any."""
        self.boundary = self.trainer_state()
        metrics = self.train_step()
        metrics["faults/restarts"] = float(self.restarts)
        self.step += 1
        self.unlogged = metrics
        self.learners_ahead = False
        self.stop.check()  # a stop signal that came during the update acts now, the step counted
        return self.finish_step()

    def finish_step(self) -> dict:
        """The counted step's validation when due, its metrics logged, its checkpoint when due."""
        cfg = self.cfg.trainer
        metrics, val = self.unlogged, {}
        if (cfg.val_every > 0 and self.step % cfg.val_every == 0) or self.step == cfg.steps:
            with timer("val", t := {}):
                val = self.validate()
            metrics.update(val)
            metrics["timing_s/val"] = t["val"]
        self.tracker.log(metrics, step=self.step)
        self.unlogged = None
        if (cfg.save_every > 0 and self.step % cfg.save_every == 0) or self.step == cfg.steps:
            with self.learners_on_device():
                self.save_checkpoint()
        return val

    def save_on_stop(self) -> None:
        """After a stop signal: a checkpoint of the last finished step, unless the latest one is of it, within
        the signal's budget (`sapo_ray.signals`); a save that cannot finish in time leaves the previous one."""
        if self.learners_ahead:
            log.warning("stopped during step %d's update: the learners hold weights of no finished step; the last "
                        "checkpoint (%s) stays", self.step + 1, self._latest_checkpoint() or "none")
            return
        # Before this step's update the learners still hold the last step's weights: the driver's state as
        # that step ended goes with them (the loader and the random streams have moved since).
        state = self.boundary if self.boundary and self.boundary["step"] == self.step else self.trainer_state()
        latest = self._latest_checkpoint()
        if latest is not None and latest.name == f"step_{self.step:06d}" and state["unlogged"] is None:
            log.warning("stopped after step %d; its checkpoint %s is there", self.step, latest)
            return
        budget = self.stop.remaining()
        if budget <= 0.5 or self.step == 0:
            log.warning("stopped at step %d with no time left to save it; the last checkpoint (%s) stays",
                        self.step, latest or "none")
            return
        t0 = time.perf_counter()
        groups = [g for g in (self.actor, self.critic) if g is not None]
        timeouts = [g.timeout_s for g in groups]
        try:
            for g in groups:
                g.timeout_s = budget
            path = self.save_checkpoint(state)
        except (ActorFailure, StopRun) as err:
            log.warning("stopped at step %d: its checkpoint could not be saved within %.1f s (%s); the last "
                        "checkpoint (%s) stays", self.step, budget, err, self._latest_checkpoint() or "none")
            return
        finally:
            for g, t in zip(groups, timeouts):
                g.timeout_s = t
        log.warning("stopped: saved %s in %.1f s; the same command continues from it", path, time.perf_counter() - t0)

    def close(self) -> None:
        """Release the actors, the reward processes and the loggers (the cluster may be shared)."""
        for w in getattr(self, "rollout", []):
            ray.kill(w, no_restart=True)
        for group in (getattr(self, "actor", None), getattr(self, "critic", None)):
            if group is not None:
                group.shutdown()
        if hasattr(self, "placement"):
            self.placement.remove()
        if hasattr(self, "reward"):
            self.reward.close()
        if hasattr(self, "tracker"):
            self.tracker.close()


def rollout_worker_name(i: int) -> str:
    """How errors and warnings name rollout worker `i` (`ActorFailure.actor`)."""
    return f"rollout worker {i}"


def stale_checkpoints(directory: Path, keep: int) -> list[Path]:
    """The complete checkpoints in `directory` beyond the newest `keep` (0 keeps all), oldest first."""
    done = sorted(p for p in directory.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    return done[:-keep] if keep > 0 else []


class StopRun(RuntimeError):
    """The run cannot usefully go on: the reward fails for most samples step after step
    (`reward.max_error_rate`), or every optimizer step is skipped (`trainer.max_skipped_steps`)."""


def _mean_dicts(parts: list[dict]) -> dict:
    keys = parts[0].keys()
    return {k: float(np.mean([p[k] for p in parts])) for k in keys}


class Rollout:
    """Sampling in flight on the rollout workers (or finished, from a checkpoint): the kept examples, how
    many were too long, and the policy version whose weights sampled them. `parts` are `(worker, generate
    arguments, result)`; a part whose worker dies or goes silent is generated again by `resubmit`."""

    def __init__(self, parts: list, examples: list[dict], too_long: int, policy_version: int,
                 samples: list[Sample] | None = None, resubmit=None, timeout_s: float = 3600.0):
        self.parts, self.examples, self.too_long, self.policy_version = parts, examples, too_long, policy_version
        self._samples, self.resubmit, self.timeout_s = samples, resubmit, timeout_s

    def samples(self) -> list[Sample]:
        if self._samples is None:
            self._samples = []
            for i, args, ref in self.parts:
                while True:
                    try:
                        self._samples += wait_all([ref], [rollout_worker_name(i)], self.timeout_s)[0]
                        break
                    except ActorFailure as failure:
                        ref = self.resubmit(i, args, failure)
            self.parts = []
        return self._samples

    def state(self) -> dict:
        """What a checkpoint keeps of it (waits for the sampling to finish)."""
        return {"samples": self.samples(), "examples": self.examples, "too_long": self.too_long,
                "policy_version": self.policy_version}

    @classmethod
    def from_state(cls, state: dict) -> "Rollout":
        return cls([], state["examples"], state["too_long"], state["policy_version"], state["samples"])
