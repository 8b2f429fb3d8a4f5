"""The single-controller training loop.

`train_step` is the algorithm box of the paper, stage by stage: generate and score, old / reference
log-probs and values, segments and advantages, critic and policy updates, weight sync; it returns the
step's metrics, each stage timed under `timing_s/<stage>`. The pieces it orchestrates live in modules
of their own: the engines (`rollouts`), the learners (`learner.group`), the reward (`reward.scorer`),
the bookkeeping as pure functions (`step`), checkpoints, validation and the pre-flight checks. They
return values or raise; the trainer decides (a dead actor is replaced, a failing run stops).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from sapo_ray import placement, preflight, startup, validation
from sapo_ray import step as bookkeeping
from sapo_ray.algo import registry
from sapo_ray.batch import Batch, LogProbs, Sample, SamplingParams
from sapo_ray.checkpoints import Checkpoints
from sapo_ray.config import algorithm_spec, resolve_model_path
from sapo_ray.data.run_data import load_run_data
from sapo_ray.errors import StopRun
from sapo_ray.learner.group import Learners
from sapo_ray.models.tokens import TokenIds
from sapo_ray.remote import ActorFailure
from sapo_ray.reward.pool import RewardPool
from sapo_ray.reward.scorer import Scorer
from sapo_ray.rollout.engine import encode_prompt, engine_traits
from sapo_ray.rollouts import Rollout, RolloutGroup
from sapo_ray.signals import StopSignals
from sapo_ray.sync import WeightSync
from sapo_ray.tracking import Tracker, generation_records, write_jsonl
from sapo_ray.utils import rng_state, seed_everything, set_rng_state, timer

log = logging.getLogger(__name__)
__all__ = ["Trainer", "StopRun", "model_path"]


def model_path(cfg) -> str:
    return resolve_model_path(cfg.model.path)


class Trainer:
    """Owns the Ray actors and the loop; `fit()` trains, validates, checkpoints and exports."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.run_dir = Path(cfg.trainer.run_dir)
        self.checkpoints = Checkpoints(self.run_dir / "checkpoints", cfg.trainer.max_ckpt_to_keep)
        self.step = 0
        self.spec = algorithm_spec(cfg)
        self.engine = engine_traits(cfg.rollout.engine)
        self.policy_version = 0  # policy updates so far; a rollout's staleness is how many it missed
        self.restarts = 0  # actors replaced after dying or going silent (trainer.max_actor_restarts)
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
        """Data, reward, placement, engines, learners, loggers, and the checkpoint to continue;
        `precision`: the learners' `sapo_ray.precision.Decision`s, for the start-up block."""
        cfg = self.cfg
        seed_everything(cfg.seed)
        from sapo_ray.models import load_processor

        self.processor = load_processor(model_path(cfg), max_pixels=cfg.data.max_pixels, min_pixels=cfg.data.min_pixels)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.pad_id = TokenIds.of(self.tokenizer).pad
        data = load_run_data(cfg, self.processor, self.run_dir)
        self.loader, self.val_examples = data.loader, data.val_examples
        self.scorer = Scorer(RewardPool(cfg.reward.num_workers, cfg.reward.timeout_s, cfg.reward.custom,
                                        cfg.reward.acc_weight, cfg.reward.format_weight, cfg.reward.batch),
                             cfg.reward.max_error_rate)
        plan = placement.plan(cfg, self.spec.needs_critic)
        if plan is None:
            preflight.check_resources(cfg, self.spec.needs_critic)
        elif any(b.get("GPU") for b in plan.bundles):
            preflight.check_memory(cfg)
        self.placement = placement.PlacementGroup.create(plan, cfg.cluster.placement_timeout_s)
        # Engines first: vLLM sizes its KV cache from the free GPU memory it finds, which colocated learners
        # would otherwise already hold.
        self.rollouts = RolloutGroup(cfg, self.placement)
        if cfg.rollout.enable_sleep_mode:
            self.rollouts.sleep()
        self._start_learners()
        self.tracker = Tracker(str(self.run_dir), list(cfg.trainer.loggers), cfg.trainer.project,
                               cfg.trainer.experiment, OmegaConf.to_container(cfg, resolve=True))
        preflight.warn_config_changes(cfg, self.run_dir)
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        resumed_from = self.maybe_resume()
        self.learners.offload()  # the first validation generates before any learner phase
        log.info("%s", startup.block(cfg, model_path(cfg), plan, precision, data.reports, self.critic is not None,
                                     self.run_dir, resumed_from, self.step))

    def _start_learners(self) -> None:
        """The actor (and critic) groups and the weight sync from the actor into the engines."""
        cfg, r = self.cfg, self.cfg.rollout
        self.learners = Learners.start(cfg, self.spec.needs_critic, self.placement, cfg.cluster.simulate_gpus > 0,
                                       cfg.trainer.rpc_timeout_s)
        self.actor, self.critic = self.learners.actor, self.learners.critic
        ranks_per_engine = r.tensor_parallel_size if self.engine.tensor_parallel else 1
        self.weight_sync = WeightSync(self.actor, self.rollouts.workers, r.weight_sync, r.sync_bucket_mb * 2**20,
                                      ranks_per_engine, wait=self.rollouts.wait)

    # -- faults --------------------------------------------------------------------------------------
    def _count_restart(self, failure: ActorFailure) -> None:
        self.restarts += 1
        limit = self.cfg.trainer.max_actor_restarts
        if self.restarts > limit:
            raise StopRun(f"{failure}; trainer.max_actor_restarts={limit} restarts are used up") from failure
        log.warning("%s; restarting it (restart %d of trainer.max_actor_restarts=%d)", failure, self.restarts, limit)

    def replace_rollout_worker(self, failure: ActorFailure) -> int:
        """Replace the dead or silent rollout worker `failure` names by a new one holding the current policy;
        its index. A failure of another actor is raised again."""
        i = self.rollouts.index_of(failure)
        if i is None:
            raise failure
        self._count_restart(failure)
        if self.cfg.rollout.weight_sync == "broadcast":
            raise StopRun(f"{failure}: an engine of a weight-broadcast group cannot be replaced alone "
                          "(rollout.weight_sync=object_store can); resume the run from its last checkpoint") from failure
        self.rollouts.replace(i)
        with self.learners.on_device():  # the new engine loaded model.path: give it the policy of now
            self.weight_sync(only=[i])
        return i

    def recover_learners(self, failure: ActorFailure) -> None:
        """A learner rank died or went silent: new learner groups continue from the last checkpoint
        (the steps since are trained again, exactly as before on the CPU)."""
        self._count_restart(failure)
        path = self.checkpoints.latest()
        if path is None:
            raise StopRun(f"{failure}: no checkpoint to recover from yet (trainer.save_every="
                          f"{self.cfg.trainer.save_every})") from failure
        self.learners.shutdown()
        self.in_flight = None  # the checkpoint holds the draw in flight at its step
        self._start_learners()
        self.load_checkpoint(path)
        self.learners.offload()
        self.tracker.rewind(self.step)
        if self.unlogged is not None:  # a checkpoint saved on a stop signal, before its step's validation
            self.finish_step()

    # -- the engines ---------------------------------------------------------------------------------
    def submit(self, examples: list[dict], params: SamplingParams, stream: tuple) -> Rollout:
        """Start sampling `examples` on the engines (prompts over `data.max_prompt_length` are left out and counted)."""
        d = self.cfg.data
        encoded = [(encode_prompt(self.processor, ex, d.instruction, keep_images=self.engine.raw_images), ex)
                   for ex in examples]
        kept = [(p, ex) for p, ex in encoded if len(p.ids) <= d.max_prompt_length]
        return self.rollouts.generate([p for p, _ in kept], params, stream, [ex for _, ex in kept],
                                      len(examples) - len(kept), self.policy_version)

    def samples(self, rollout: Rollout) -> list[Sample]:
        """The rollout's samples; a worker that dies or goes silent meanwhile is replaced and its part generated again."""
        while True:
            try:
                return rollout.samples()
            except ActorFailure as failure:
                i = self.replace_rollout_worker(failure)
                rollout.resubmit(i, self.rollouts.workers[i])

    def generate(self, examples: list[dict], params: SamplingParams, stream: tuple) -> tuple[list[Sample], list[dict], int]:
        """Samples (`prompt_index` into the kept examples), the kept examples, and how many were too long."""
        rollout = self.submit(examples, params, stream)
        return self.samples(rollout), rollout.examples, rollout.too_long

    def submit_rollout(self, step: int, draw: int) -> Rollout:
        """Start draw `draw` of training step `step` (0-based): the next prompts of the loader."""
        r = self.cfg.rollout
        params = SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens)
        return self.submit(self.loader.next_batch(), params, ("rollout", step, draw))

    def sync_weights(self) -> dict:
        """The policy's weights into every engine (`sapo_ray.sync`); an engine that dies meanwhile is replaced."""
        try:
            return self.weight_sync()
        except ActorFailure as failure:
            self.replace_rollout_worker(failure)
            return self.weight_sync()

    # -- one step ------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One step of the algorithm box; its metrics."""
        cfg, spec, timing = self.cfg, self.spec, {}
        t0 = time.perf_counter()
        # 1-2. Generate G responses per prompt and score them (DAPO draws again for the groups it drops).
        batch, metrics = self.generate_and_score()
        if cfg.rollout.max_staleness:
            # One step off-policy: the next step's first draw samples on these weights while the learners
            # update them (the engines take the new weights after it, in call order). The last step too:
            # its checkpoint keeps that draw, so a run continued past `trainer.steps` trains as one that
            # never stopped.
            self.in_flight = self.submit_rollout(self.step + 1, 0)
        if cfg.rollout.enable_sleep_mode:  # the learners get the GPU memory until the next sync
            self.rollouts.sleep()
        if batch is not None:
            with self.learners.on_device():
                # 3. Old and reference log-probs, values: forward passes that need nothing of each other run
                #    at the same time (the critic beside the actor's ranks).
                with timer("forward", timing):
                    batch = self.forward(batch)
                if cfg.rollout.tis_cap > 0:
                    batch, m = bookkeeping.tis_weights(batch, cfg.rollout.tis_cap)
                    metrics.update(m)
                # 4. Segments (segment-level algorithms) and advantages.
                with timer("adv", timing):
                    texts = self.token_texts(batch) if registry.needs_token_texts(spec) else None
                    batch, m = bookkeeping.advantages(spec, batch, bookkeeping.segments(spec, batch, texts),
                                                      cfg.rollout.max_new_tokens)
                metrics.update(m)
                # 5. Critic and policy updates, at the same time (the policy waits out `critic_warmup`).
                train_actor = not self.critic or self.step >= spec.critic_warmup
                self.learners_ahead = True  # until the step is counted (`run_step`)
                with timer("update", timing):
                    metrics.update(self.update(batch, train_actor))
                # 6. The new policy into the engines.
                if train_actor:
                    self.policy_version += 1
                    self.learners.release_cache()  # the update's peak memory freed before an engine wakes
                    with timer("update_weights", timing):
                        metrics.update(self.sync_weights())
            self.check_skipped_steps(metrics)
        timing["step"] = time.perf_counter() - t0
        if batch is not None:
            metrics = self.stability.update({**metrics, **bookkeeping.batch_metrics(batch, cfg.actor.recompute_old_logp)})
            metrics.update(self.perf_metrics(batch, timing["step"]))
        return {**metrics, **{f"timing_s/{k}": v for k, v in timing.items()}}

    def generate_and_score(self) -> tuple[Batch | None, dict]:
        """Generate and score prompt groups until a full batch (DAPO's dynamic sampling may draw more
        prompts), then keep whole groups whose rows split over the learner ranks (None: no update)."""
        cfg, spec, timing = self.cfg, self.spec, {}
        groups: list[bookkeeping.Group] = []
        metrics = {"data/prompt_too_long": 0.0, "reward/errors": 0.0, "reward/timeouts": 0.0, "reward/samples": 0.0,
                   "rollout/dropped_groups": 0.0, "rollout/skipped_update": 0.0}
        for draw in range(1 + (spec.max_refill if spec.dynamic_sampling else 0)):
            with timer("gen", timing):
                if draw == 0 and self.in_flight:  # started during the previous step (`rollout.max_staleness`)
                    rollout, self.in_flight = self.in_flight, None
                else:
                    rollout = self.submit_rollout(self.step, draw)
                samples, examples = self.samples(rollout), rollout.examples
            if draw == 0:
                metrics["rollout/staleness"] = float(self.policy_version - rollout.policy_version)
            metrics["data/prompt_too_long"] += rollout.too_long
            with timer("reward", timing):
                scores, counts, means = self.scorer.score(samples, examples)
            metrics.update({k: metrics[k] + n for k, n in counts.items()})
            metrics.update(means)
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
            if len(groups) >= cfg.data.prompts_per_step:
                break
        metrics["reward/error_rate"] = self.scorer.check(metrics["reward/errors"], metrics["reward/timeouts"],
                                                         metrics["reward/samples"])
        trimmed = bookkeeping.trim_groups(groups, cfg.data.prompts_per_step, self.learners.rows_multiple)
        metrics["rollout/trimmed_groups"] = float(min(len(groups), cfg.data.prompts_per_step) - len(trimmed))
        metrics.update({f"timing_s/{k}": v for k, v in timing.items()})
        if not trimmed:
            # Every prompt too long, every group dropped, or too few rows for the ranks: no update, said in the metrics.
            log.warning("step %d: no usable rollouts (prompts too long, groups dropped by dynamic sampling, or fewer "
                        "rows than learner ranks); skipping the update", self.step + 1)
            return None, {**metrics, "rollout/skipped_update": 1.0, "batch/rows": 0.0, "batch/groups": 0.0}
        return bookkeeping.make_batch(trimmed, self.pad_id), metrics

    def forward(self, batch: Batch) -> Batch:
        """The batch with the old policy's log-probs and entropies (recomputed, or the engine's), the
        reference's log-probs and the critic's values, as the algorithm needs them."""
        old = self.actor.compute_logprobs(batch, model="policy") if self.cfg.actor.recompute_old_logp else None
        ref = self.actor.compute_logprobs(batch, model="reference") if self.spec.needs_ref else None
        values = self.critic.compute_values(batch) if self.critic else None
        old = old.get() if old else LogProbs(batch.rollout_logp, batch.rollout_entropy)
        return batch.with_fields(old_logp=old.logp, entropy=old.entropy, ref_logp=ref.get().logp if ref else None,
                                 values=values.get() if values else None)

    def update(self, batch: Batch, train_actor: bool) -> dict:
        """The critic's and (unless warming up the critic) the policy's update; their metrics."""
        critic = self.critic.update(batch) if self.critic else None
        actor = self.actor.update(batch) if train_actor else None
        metrics = {}
        for pending in filter(None, (critic, actor)):
            parts = pending.get()
            metrics.update({k: float(np.mean([p[k] for p in parts])) for k in parts[0]})
        return metrics if train_actor else {**metrics, "actor/lr": self.actor.lr()}

    def perf_metrics(self, batch: Batch, seconds: float) -> dict:
        """Tokens per second over the step's `seconds`, and each role's peak memory."""
        tokens = float(batch.response_mask.sum() + batch.prompt_mask.sum())
        peaks = {"rollout": self.rollouts.peak_memory_mb(), **self.learners.peak_memory_mb()}
        return {"perf/throughput": tokens / seconds, "perf/response_tokens": float(batch.response_mask.sum()),
                **bookkeeping.memory_metrics(peaks)}

    def token_texts(self, batch: Batch) -> list[list[str]]:
        """Each valid response token decoded (the text segmenters' input)."""
        return [[self.tokenizer.decode([t]) for t in row[: int(m.sum())].tolist()]
                for row, m in zip(batch.response_ids, batch.response_mask)]

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

    def validate(self) -> dict:
        return validation.validate(self.cfg, self.step, self.val_examples, self.generate, self.scorer, self.run_dir)

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
            with self.learners.on_device():
                self.actor.export_hf(str(self.run_dir / "hf_policy"))
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
            with self.learners.on_device():
                self.save_checkpoint()
        return val

    def save_on_stop(self) -> None:
        """After a stop signal: a checkpoint of the last finished step, unless the latest one is of it, within
        the signal's budget (`sapo_ray.signals`); a save that cannot finish in time leaves the previous one."""
        latest = self.checkpoints.latest()
        if self.learners_ahead:
            log.warning("stopped during step %d's update: the learners hold weights of no finished step; the last "
                        "checkpoint (%s) stays", self.step + 1, latest or "none")
            return
        # Before this step's update the learners still hold the last step's weights: the driver's state as
        # that step ended goes with them (the loader and the random streams have moved since).
        state = self.boundary if self.boundary and self.boundary["step"] == self.step else self.trainer_state()
        if latest is not None and latest.name == f"step_{self.step:06d}" and state["unlogged"] is None:
            log.warning("stopped after step %d; its checkpoint %s is there", self.step, latest)
            return
        budget = self.stop.remaining()
        if budget <= 0.5 or self.step == 0:
            log.warning("stopped at step %d with no time left to save it; the last checkpoint (%s) stays",
                        self.step, latest or "none")
            return
        t0 = time.perf_counter()
        groups = list(self.learners.groups().values())
        timeouts = [g.timeout_s for g in groups]
        try:
            for g in groups:
                g.timeout_s = budget
            path = self.save_checkpoint(state)
        except (ActorFailure, StopRun) as err:
            log.warning("stopped at step %d: its checkpoint could not be saved within %.1f s (%s); the last "
                        "checkpoint (%s) stays", self.step, budget, err, self.checkpoints.latest() or "none")
            return
        finally:
            for g, t in zip(groups, timeouts):
                g.timeout_s = t
        log.warning("stopped: saved %s in %.1f s; the same command continues from it", path, time.perf_counter() - t0)

    # -- checkpoints ---------------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        """What a checkpoint keeps of the driver, beside the learners' state: the step, the loader's position,
        the random streams, the policy version, the stability statistics, the draw in flight, and the
        metrics of a step whose validation has not run yet."""
        return {"step": self.step, "loader": self.loader.state_dict(), "rng": rng_state(),
                "policy_version": self.policy_version, "stability": asdict(self.stability),
                "in_flight": self.in_flight, "unlogged": self.unlogged}

    def save_checkpoint(self, state: dict | None = None) -> Path:
        """Save the step's checkpoint (`state`: a `trainer_state()`, by default the current one)."""
        state = dict(state or self.trainer_state())
        in_flight = state.pop("in_flight")
        if in_flight is not None:
            self.samples(in_flight)  # its sampling finished (a worker that died meanwhile replaced)
        return self.checkpoints.save(state, self.learners.groups(), OmegaConf.to_yaml(self.cfg, resolve=True),
                                     in_flight.state() if in_flight is not None else None)

    def maybe_resume(self) -> Path | None:
        """Load the checkpoint `trainer.resume` asks for, if any; returns its path."""
        path = self.checkpoints.to_resume(self.cfg.trainer.resume)
        if path is None:
            return None
        self.load_checkpoint(path)
        if self.step >= self.cfg.trainer.steps:
            log.warning("%s already holds a finished run (step %d of trainer.steps=%d): nothing to train; "
                        "trainer.resume=never or another trainer.experiment starts a new run",
                        self.run_dir, self.step, self.cfg.trainer.steps)
        return path

    def load_checkpoint(self, path: Path) -> None:
        """The learners', the loader's, the random streams' and the step's state of checkpoint `path`, and
        its policy in the engines."""
        state, in_flight = Checkpoints.load(path, self.learners.groups())
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.step = state["step"]
        self.policy_version = state.get("policy_version", 0)
        self.stability = bookkeeping.Stability(**state.get("stability", {}))
        self.unlogged = state.get("unlogged")
        self.learners_ahead = False
        if in_flight is not None:
            self.in_flight = Rollout.from_state(in_flight)
        self.sync_weights()

    def close(self) -> None:
        """Release the actors, the reward processes and the loggers (the cluster may be shared)."""
        if hasattr(self, "rollouts"):
            self.rollouts.shutdown()
        if hasattr(self, "learners"):
            self.learners.shutdown()
        if hasattr(self, "placement"):
            self.placement.remove()
        if hasattr(self, "scorer"):
            self.scorer.pool.close()
        if hasattr(self, "tracker"):
            self.tracker.close()
