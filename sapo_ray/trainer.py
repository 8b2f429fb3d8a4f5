"""The single-controller training loop. `train_step` is the algorithm box of the paper, stage by stage
(generate and score, old / reference log-probs and values, segments and advantages, critic and policy
updates, weight sync), returning the step's metrics, each stage timed under `timing_s/<stage>`. What it
orchestrates lives in modules of its own: the engines (`rollouts`), the learners (`learner.group`), the
reward (`reward.scorer`), the bookkeeping (`bookkeeping`), checkpoints, validation and pre-flight checks.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from sapo_ray import bookkeeping, placement, preflight, startup, validation
from sapo_ray.algo import registry
from sapo_ray.batch import Batch, LogProbs, SamplingParams
from sapo_ray.checkpoints import Checkpoints
from sapo_ray.config import algorithm_spec, resolve_model_path, response_tokens
from sapo_ray.data.run_data import load_run_data
from sapo_ray.errors import StopRun
from sapo_ray.learner.group import Learners
from sapo_ray.models.tokens import TokenIds
from sapo_ray.remote import ActorFailure, Restarts
from sapo_ray.reward.scorer import Scorer
from sapo_ray.rollouts import Rollout, RolloutGroup
from sapo_ray.signals import StopSignals
from sapo_ray.tracking import Tracker, experience_records, generation_records, save_images, write_jsonl
from sapo_ray.utils import rng_state, seed_everything, set_rng_state, timer

log = logging.getLogger(__name__)


class Trainer:
    """Owns the Ray actors and the loop; `fit()` trains, validates, checkpoints and exports."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.run_dir = Path(cfg.trainer.run_dir)
        self.checkpoints = Checkpoints(self.run_dir / "checkpoints", cfg.trainer.max_ckpt_to_keep)
        self.step = 0
        self.spec = algorithm_spec(cfg)
        self.policy_version = 0  # policy updates so far; a rollout's staleness is how many it missed
        self.restarts = Restarts(cfg.trainer.max_actor_restarts)  # actors replaced after dying or going silent
        self.in_flight: Rollout | None = None  # the next step's first draw, sampling during this step
        self.stability = bookkeeping.Stability()  # grad-norm spikes and collapse over the run
        self.learners_ahead = False  # from a step's update to its end: a stop signal waits (`sapo_ray.signals`)
        self.stop = StopSignals(deferring=lambda: self.learners_ahead)
        self.unlogged: dict | None = None  # a finished step's metrics, logged with its validation
        self.boundary: dict | None = None  # the trainer's state as the current step began (`trainer_state`)
        self.resources = ExitStack()  # what `close` releases, last created first

    # -- setup ---------------------------------------------------------------------------------------
    def setup(self, precision: dict | None = None) -> None:
        """Data, reward, placement, engines, learners, loggers, and the checkpoint to continue;
        `precision`: the learners' `sapo_ray.precision.Decision`s, for the start-up block."""
        cfg = self.cfg
        seed_everything(cfg.seed)
        from sapo_ray.models import load_processor

        path = resolve_model_path(cfg.model.path)
        self.processor = load_processor(path, max_pixels=cfg.data.max_pixels, min_pixels=cfg.data.min_pixels,
                                        video_max_pixels=cfg.data.video_max_pixels)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.pad_id = TokenIds.of(self.tokenizer).pad
        data = load_run_data(cfg, self.processor, self.run_dir)
        self.loader, self.val_examples = data.loader, data.val_examples
        most_videos = max(len(ex.get("videos") or []) for ex in data.loader.examples + data.val_examples)
        preflight.check_videos(cfg, most_videos)
        self.videos = most_videos > 0
        self.scorer = Scorer.from_config(cfg.reward)
        self.resources.callback(self.scorer.close)
        plan = preflight.placement_plan(cfg, self.spec.needs_critic)
        self.placement = placement.PlacementGroup.create(plan, cfg.cluster.placement_timeout_s)
        self.resources.callback(self.placement.remove)
        # Engines first: vLLM sizes its KV cache from the free GPU memory it finds, which colocated learners
        # would otherwise already hold.
        self.rollouts = RolloutGroup(cfg, self.placement, self.processor, self.restarts)
        self.resources.callback(self.rollouts.shutdown)
        if cfg.rollout.enable_sleep_mode:
            self.rollouts.sleep()
        self._start_learners()
        self.resources.callback(lambda: self.learners.shutdown())  # the learners of now (a recovery replaces them)
        self.tracker = Tracker(str(self.run_dir), list(cfg.trainer.loggers), cfg.trainer.project,
                               cfg.trainer.experiment, OmegaConf.to_container(cfg, resolve=True))
        self.resources.callback(self.tracker.close)
        preflight.warn_config_changes(cfg, self.run_dir)
        (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        resumed_from = self.maybe_resume()
        self.learners.offload()  # the first validation generates before any learner phase
        log.info("%s", startup.block(cfg, path, plan, precision, data.reports, self.learners.critic is not None, self.run_dir,
                                     resumed_from, self.step))

    def _start_learners(self) -> None:
        """The actor (and critic) groups, and the weight sync from the actor into the engines."""
        cfg = self.cfg
        self.learners = Learners.start(cfg, self.spec.needs_critic, self.placement, cfg.cluster.simulate_gpus > 0,
                                       cfg.trainer.rpc_timeout_s, self.videos)
        self.rollouts.connect(self.learners)

    # -- faults --------------------------------------------------------------------------------------
    def recover_learners(self, failure: ActorFailure) -> None:
        """A learner rank died or went silent: new learner groups continue from the last checkpoint
        (the steps since are trained again, exactly as before on the CPU)."""
        self.restarts.spend(failure)
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

    # -- one step ------------------------------------------------------------------------------------
    def submit_rollout(self, step: int, draw: int) -> Rollout:
        """Start draw `draw` of training step `step` (0-based): the next prompts of the loader."""
        r = self.cfg.rollout
        params = SamplingParams(n=r.n, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens)
        return self.rollouts.submit(self.loader.next_batch(), params, ("rollout", step, draw), self.policy_version)

    def train_step(self) -> dict:
        """One step of the algorithm box; its metrics."""
        cfg, spec, timing = self.cfg, self.spec, {}
        t0 = time.perf_counter()
        # 1-2. Generate G responses per prompt and score them (DAPO draws again for the groups it drops).
        batch, groups, metrics = self.generate_and_score()
        if cfg.rollout.max_staleness:
            # One step off-policy: the next step's first draw samples on these weights while the learners update
            # them (the engines take the new weights after it). The last step too: its checkpoint keeps the draw.
            self.in_flight = self.submit_rollout(self.step + 1, 0)
        if cfg.rollout.enable_sleep_mode:  # the learners get the GPU memory until the next sync
            self.rollouts.sleep()
        if batch is not None:
            with self.learners.on_device():
                # 3. Old and reference log-probs, values (the critic's forward beside the actor's).
                with timer("forward", timing):
                    batch = self.forward(batch)
                if cfg.rollout.tis_cap > 0:
                    batch, m = bookkeeping.tis_weights(batch, cfg.rollout.tis_cap)
                    metrics.update(m)
                # 4. Segments (segment-level algorithms) and advantages.
                with timer("adv", timing):
                    texts = bookkeeping.token_texts(self.tokenizer, batch) if registry.needs_token_texts(spec) else None
                    batch, m = bookkeeping.advantages(spec, batch, bookkeeping.segments(spec, batch, texts),
                                                      response_tokens(cfg))
                metrics.update(m)
                # 5. Critic and policy updates, at the same time (the policy waits out `critic_warmup`).
                train_actor = not self.learners.critic or self.step >= spec.critic_warmup
                self.learners_ahead = True  # until the step is counted (`run_step`)
                with timer("update", timing):
                    metrics.update(self.update(batch, train_actor))
                if cfg.trainer.dump_rollouts:
                    self.dump_experience(batch, groups, texts, train_actor)
                # 6. The new policy into the engines.
                if train_actor:
                    self.policy_version += 1
                    self.learners.release_cache()  # the update's peak memory freed before an engine wakes
                    with timer("update_weights", timing):
                        metrics.update(self.rollouts.sync())
            bookkeeping.check_skipped_steps(metrics, cfg.trainer.max_skipped_steps)
        timing["step"] = time.perf_counter() - t0
        if batch is not None:
            metrics = self.stability.update({**metrics, **bookkeeping.batch_metrics(batch, cfg.actor.recompute_old_logp)})
            peaks = {"rollout": self.rollouts.peak_memory_mb(), **self.learners.peak_memory_mb()}
            metrics.update(bookkeeping.perf_metrics(batch, timing["step"], peaks))
        return {**metrics, **{f"timing_s/{k}": v for k, v in timing.items()}}

    def generate_and_score(self) -> tuple[Batch | None, list[bookkeeping.Group], dict]:
        """Generate and score prompt groups until a full batch (DAPO's dynamic sampling may draw more
        prompts), then keep whole groups whose rows split over the learner ranks (None: no update); the
        batch, its groups and the metrics."""
        cfg, spec, timing = self.cfg, self.spec, {}
        draws = bookkeeping.Draws(cfg.data.prompts_per_step, spec.dynamic_sampling)
        for draw in range(1 + (spec.max_refill if spec.dynamic_sampling else 0)):
            with timer("gen", timing):
                if draw == 0 and self.in_flight:  # started during the previous step (`rollout.max_staleness`)
                    rollout, self.in_flight = self.in_flight, None
                else:
                    rollout = self.submit_rollout(self.step, draw)
                samples = self.rollouts.samples(rollout)
            with timer("reward", timing):
                scores, counts, means = self.scorer.score(samples, rollout.examples)
            if cfg.trainer.dump_rollouts:
                write_jsonl(self.run_dir / "generations" / f"rollout_step_{self.step + 1:06d}.jsonl",
                            generation_records(samples, rollout.examples, scores, step=self.step + 1, draw=draw))
            if draws.add(samples, scores, rollout.examples, rollout.too_long, counts, means,
                         staleness=self.policy_version - rollout.policy_version):
                break
        error_rate = self.scorer.check(*(draws.metrics[f"reward/{k}"] for k in ("errors", "timeouts", "samples")))
        batch, metrics = draws.batch(self.learners.rows_multiple, self.pad_id)
        if batch is None:
            log.warning("step %d: no usable rollouts (prompts too long, groups dropped by dynamic sampling, or fewer "
                        "rows than learner ranks); skipping the update", self.step + 1)
        return batch, draws.kept, {**metrics, "reward/error_rate": error_rate,
                                   **{f"timing_s/{k}": v for k, v in timing.items()}}

    def dump_experience(self, batch: Batch, groups: list[bookkeeping.Group], texts: list[list[str]] | None,
                        traced: bool) -> None:
        """The trained rows, per token, as `generations/experience_step_XXXXXX.jsonl` (`sapo_ray.inspect`);
        `traced`: the policy was updated, so its loss trace is this step's."""
        out = self.run_dir / "generations"
        samples, examples, images = [], [], []
        for g in groups:  # a group is one prompt: its images written once
            names = [f"images/{n}" for n in save_images(g.example.get("images") or [], out / "images")]
            samples += g.samples
            examples += [g.example] * len(g)
            images += [names] * len(g)
        trace = self.learners.actor.loss_trace(batch.response_ids.shape[1]) if traced else None
        spec = self.spec
        records = experience_records(
            batch, samples, examples, texts or bookkeeping.token_texts(self.tokenizer, batch), trace, images,
            step=self.step + 1, algorithm=spec.name,
            segmenter=spec.segmenter if spec.needs_segments else None, ratio_level=spec.ratio_level)
        write_jsonl(out / f"experience_step_{self.step + 1:06d}.jsonl", records)

    def forward(self, batch: Batch) -> Batch:
        """The batch with the old policy's log-probs and entropies (recomputed, or the engine's), the
        reference's log-probs and the critic's values, as the algorithm needs them."""
        actor, critic = self.learners.actor, self.learners.critic
        old = actor.compute_logprobs(batch, model="policy") if self.cfg.actor.recompute_old_logp else None
        ref = actor.compute_logprobs(batch, model="reference") if self.spec.needs_ref else None
        values = critic.compute_values(batch) if critic else None
        old = old.get() if old else LogProbs(batch.rollout_logp, batch.rollout_entropy)
        return batch.with_fields(old_logp=old.logp, entropy=old.entropy, ref_logp=ref.get().logp if ref else None,
                                 values=values.get() if values else None)

    def update(self, batch: Batch, train_actor: bool) -> dict:
        """The critic's and (unless warming up the critic) the policy's update; their metrics."""
        critic = self.learners.critic.update(batch) if self.learners.critic else None
        actor = self.learners.actor.update(batch) if train_actor else None
        metrics = {}
        for pending in filter(None, (critic, actor)):
            parts = pending.get()
            metrics.update({k: float((np.max if k.endswith("_max") else np.mean)([p[k] for p in parts])) for k in parts[0]})
        if train_actor:
            return metrics
        if not self.cfg.actor.recompute_old_logp:  # what the update's first pass would have measured
            learner = self.learners.actor.compute_logprobs(batch, model="policy").get()
            metrics.update(bookkeeping.logp_gap(learner.logp, batch.rollout_logp, batch.response_mask))
        return {**metrics, "actor/lr": self.learners.actor.lr()}

    def validate(self) -> dict:
        return validation.validate(self.cfg, self.step, self.val_examples, self.rollouts.generate, self.scorer, self.run_dir)

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
                self.learners.actor.export_hf(str(self.run_dir / "hf_policy"))
        return last_val

    def run_step(self) -> dict:
        """One training step, its validation and checkpoint when due; returns the validation metrics, if any."""
        self.boundary = self.trainer_state()
        metrics = self.train_step()
        metrics["faults/restarts"] = float(self.restarts.used)
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
        # Before this step's update the learners hold the last step's weights: the driver's state at its end goes with them.
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
        try:
            with self.learners.timeout(budget):
                path = self.save_checkpoint(state)
        except (ActorFailure, StopRun) as err:
            log.warning("stopped at step %d: its checkpoint could not be saved within %.1f s (%s); the last "
                        "checkpoint (%s) stays", self.step, budget, err, self.checkpoints.latest() or "none")
            return
        log.warning("stopped: saved %s in %.1f s; the same command continues from it", path, time.perf_counter() - t0)

    # -- checkpoints ---------------------------------------------------------------------------------
    def trainer_state(self) -> dict:
        """What a checkpoint keeps of the driver beside the learners: the step, the loader's position, the random
        streams, the policy version, the stability statistics, the draw in flight, a step's unlogged metrics."""
        return {"step": self.step, "loader": self.loader.state_dict(), "rng": rng_state(),
                "policy_version": self.policy_version, "stability": asdict(self.stability),
                "in_flight": self.in_flight, "unlogged": self.unlogged}

    def save_checkpoint(self, state: dict | None = None) -> Path:
        """Save the step's checkpoint (`state`: a `trainer_state()`, by default the current one)."""
        state = dict(state or self.trainer_state())
        in_flight = state.pop("in_flight")
        if in_flight is not None:
            self.rollouts.samples(in_flight)  # its sampling finished (a worker that died meanwhile replaced)
        return self.checkpoints.save(state, self.learners.groups(), OmegaConf.to_yaml(self.cfg, resolve=True),
                                     in_flight.state() if in_flight is not None else None)

    def maybe_resume(self) -> Path | None:
        """Load the checkpoint `trainer.resume` asks for, if any; returns its path."""
        path = self.checkpoints.to_resume(self.cfg.trainer.resume)
        if path is not None:
            self.load_checkpoint(path)
        if path is not None and self.step >= self.cfg.trainer.steps:
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
        self.rollouts.sync()

    def close(self) -> None:
        """Release the actors, the reward processes and the loggers (the cluster may be shared)."""
        self.resources.close()
