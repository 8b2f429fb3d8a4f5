"""The bookkeeping of one training step, as pure functions (no Ray, no I/O).

The trainer (`Trainer.train_step`) calls them in this order::

    draws = Draws(prompts_per_step, dynamic_sampling)
    draws.add(samples, scores, examples, ...)   # each draw: group_samples, DAPO's informative_groups
    batch, metrics = draws.batch(ranks, pad_id) # trim_groups: whole groups, rows divisible by the ranks; make_batch
    ...old/ref log-probs and values from the learners...
    batch, metrics = tis_weights(batch, cap)                        # rollout.tis_cap > 0
    seg            = segments(spec, batch, token_texts)             # segment-level algorithms
    batch, metrics = advantages(spec, batch, seg, response_tokens)  # + the critic's mask
    ...critic and policy updates; check_skipped_steps(metrics, limit)...
    metrics = stability.update({**metrics, **batch_metrics(batch)}) # run-level, kept in checkpoints
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from sapo_ray.algo import kl as kl_mod
from sapo_ray.algo import losses, registry
from sapo_ray.algo.registry import AlgorithmSpec
from sapo_ray.algo.segments import SEGMENTER_INPUTS, Segments, turn_ends
from sapo_ray.batch import Batch, Sample
from sapo_ray.errors import StopRun


@dataclass
class Group:
    """The responses sampled for one prompt, with their rewards (`{"score", "acc", "format"}` each)."""

    example: dict
    samples: list[Sample]
    scores: list[dict]

    def __len__(self) -> int:
        return len(self.samples)


def group_samples(samples: list[Sample], scores: list[dict], examples: list[dict]) -> list[Group]:
    """Samples (`prompt_index` into `examples`) and their scores as one `Group` per prompt, in prompt order;
    prompts without a sample get no group."""
    by_prompt: dict[int, Group] = {}
    for sample, score in zip(samples, scores, strict=True):
        group = by_prompt.setdefault(sample.prompt_index, Group(examples[sample.prompt_index], [], []))
        group.samples.append(sample)
        group.scores.append(score)
    return [by_prompt[i] for i in sorted(by_prompt)]


def informative_groups(groups: list[Group]) -> list[Group]:
    """DAPO's dynamic sampling: the groups whose accuracies are not all equal (all right or all wrong
    gives every response the same group advantage, 0: no gradient). Filtering on accuracy rather than
    on the shaped score follows DAPO (a format bonus alone must not make a group look informative)."""
    if not groups:
        return []
    acc = torch.tensor([s["acc"] for g in groups for s in g.scores], dtype=torch.float64)
    index = torch.tensor([i for i, g in enumerate(groups) for _ in g.samples])
    keep = registry.dynamic_sampling_groups(acc, index)
    return [g for g, k in zip(groups, keep.tolist()) if k]


def trim_groups(groups: list[Group], max_groups: int, world_size: int) -> list[Group]:
    """The first groups, at most `max_groups`, with whole groups dropped from the end until the rows
    split evenly over `world_size` ranks (possibly none: the step then skips its update).

    A group is never cut: a one-sample group would make a group baseline meaningless (GRPO's std of
    one value), and its prompt would weigh less than the others in the update.
    """
    kept = groups[:max_groups]
    while kept and sum(len(g) for g in kept) % world_size:
        kept = kept[:-1]
    return kept


@dataclass
class Draws:
    """A step's draws of scored prompt groups until `target` groups are kept (DAPO's dynamic sampling keeps
    the groups with a signal and draws again), and the draws' metrics."""

    target: int
    dynamic_sampling: bool
    groups: list[Group] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=lambda: dict.fromkeys(
        ("data/prompt_too_long", "reward/errors", "reward/timeouts", "reward/samples", "rollout/dropped_groups",
         "rollout/skipped_update"), 0.0))
    count: int = 0
    kept: list[Group] = field(default_factory=list)  # the groups of the last `batch`, in its row order

    def add(self, samples: list[Sample], scores: list[dict], examples: list[dict], too_long: int,
            counts: dict[str, float], means: dict[str, float], staleness: int = 0) -> bool:
        """One draw: its samples' scores, its `too_long` prompts left out, the reward's failure `counts`
        (summed over draws) and extra `means` (the last draw's), and how many policy updates its sampling
        weights missed (`rollout/staleness`, the first draw's); True once `target` groups are kept."""
        if self.count == 0:
            self.metrics["rollout/staleness"] = float(staleness)
        self.metrics["data/prompt_too_long"] += too_long
        self.metrics.update({k: self.metrics[k] + n for k, n in counts.items()})
        self.metrics.update(means)
        self.metrics.update(episode_metrics(samples, scores))  # the last draw's, as the extra means
        drawn = group_samples(samples, scores, examples)
        if self.dynamic_sampling:
            if self.count == 0:
                self.metrics["rollout/first_draw_score_mean"] = float(np.mean([x["score"] for x in scores])) if scores else 0.0
            kept = informative_groups(drawn)
            self.metrics["rollout/dropped_groups"] += len(drawn) - len(kept)
            drawn = kept
        self.count += 1
        self.groups += drawn
        return len(self.groups) >= self.target

    def batch(self, rows_multiple: int, pad_id: int) -> tuple[Batch | None, dict[str, float]]:
        """The first `target` whole groups whose rows split over `rows_multiple` ranks (`trim_groups`) as a
        batch, and the draws' metrics; None when no group is left (the step skips its update)."""
        trimmed = self.kept = trim_groups(self.groups, self.target, rows_multiple)
        metrics = {**self.metrics, "rollout/trimmed_groups": float(min(len(self.groups), self.target) - len(trimmed))}
        if not trimmed:
            return None, {**metrics, "rollout/skipped_update": 1.0, "batch/rows": 0.0, "batch/groups": 0.0}
        return make_batch(trimmed, pad_id), metrics


def episode_metrics(samples: list[Sample], scores: list[dict]) -> dict[str, float]:
    """Per multi-turn episode (none for one-turn samples): turns, tool calls, failed calls (and by kind, in
    all), observation tokens, the share cut by the limits, the environment's turn rewards, and the accuracy of the episodes that called a
    tool and of those that did not."""
    pairs = [(s, x) for s, x in zip(samples, scores) if s.episode is not None]
    if not pairs:
        return {}
    n = len(pairs)
    out = {
        "episode/turns": sum(s.episode.turns for s, _ in pairs) / n,
        "episode/tool_calls": sum(s.episode.tool_calls for s, _ in pairs) / n,
        "episode/tool_errors": sum(sum(s.episode.tool_errors.values()) for s, _ in pairs) / n,
        "episode/observation_tokens": sum(sum(s.observation_mask or []) for s, _ in pairs) / n,
        "episode/cut": sum(s.episode.cut for s, _ in pairs) / n,
        "episode/turn_reward": sum(s.episode.turn_reward for s, _ in pairs) / n,
    }
    for kind in sorted({k for s, _ in pairs for k in s.episode.tool_errors}):
        out[f"episode/tool_errors/{kind}"] = float(sum(s.episode.tool_errors.get(kind, 0) for s, _ in pairs))
    for name, used in (("acc_with_tools", True), ("acc_without_tools", False)):
        accs = [x["acc"] for s, x in pairs if (s.episode.tool_calls > 0) == used]
        if accs:
            out[f"episode/{name}"] = sum(accs) / len(accs)
    return out


def make_batch(groups: list[Group], pad_id: int) -> Batch:
    """The learners' `Batch` of `groups`: rows in group order, `group_index` = the group's position,
    per-row `scores`, `acc`, `format` and `finished`."""
    samples, scores, index = [], [], []
    for i, g in enumerate(groups):
        for sample, score in zip(g.samples, g.scores):
            samples.append(sample)
            scores.append(score)
            index.append(i)
    batch = Batch.from_samples(samples, pad_id)
    return batch.with_fields(
        scores=torch.tensor([x["score"] for x in scores], dtype=torch.float32),
        acc=torch.tensor([x["acc"] for x in scores], dtype=torch.float32),
        format=torch.tensor([x["format"] for x in scores], dtype=torch.float32),
        group_index=torch.tensor(index, dtype=torch.long),
        finished=torch.tensor([s.finished for s in samples], dtype=torch.bool),
    )


def _stats(prefix: str, x: torch.Tensor) -> dict[str, float]:
    x = x.float()
    if x.numel() == 0:
        return {}
    return {f"{prefix}/mean": float(x.mean()), f"{prefix}/max": float(x.max()), f"{prefix}/min": float(x.min())}


def segments(spec: AlgorithmSpec, batch: Batch, token_texts: list[list[str]] | None = None) -> Segments | None:
    """The responses cut into segments by the spec's segmenter, from the old policy's entropies (or
    log-probs, or `token_texts`: each valid response token decoded, for the text segmenters); None for
    an algorithm without segments. In a multi-turn episode each turn's last token also ends a segment (but
    for segmenters of the whole sequence, `SegmenterInputs.turns`): no segment spans an observation."""
    mask = batch.response_mask
    seg = registry.make_segments(spec, mask, entropy=batch.entropy, logprobs=batch.old_logp,
                                 token_texts=token_texts, observation_mask=batch.observation_mask)
    if seg is None or not bool(batch.observation_mask.any()) or not SEGMENTER_INPUTS[spec.segmenter].turns:
        return seg
    return Segments.from_end_mask(seg.end_mask | turn_ends(mask, batch.observation_mask), mask)


def advantages(spec: AlgorithmSpec, batch: Batch, seg: Segments | None, response_tokens: int) -> tuple[Batch, dict]:
    """Shaped scores, the registered estimator's advantages and returns over segments `seg`, and the
    critic's loss mask; the batch with them and their metrics. `response_tokens`: the longest response
    (`config.response_tokens`; DAPO's overlong penalty measures a response, observations included, to it).

    Needs the batch's scores and `old_logp` (and `values` with a critic, `ref_logp` with a KL term).
    """
    mask = batch.response_mask
    scores = registry.shape_scores(spec, batch.scores, batch.sequence_mask.sum(1), response_tokens)
    adv, returns = registry.compute_advantages(spec, scores=scores, mask=mask, segments=seg, **_estimator_inputs(spec, batch))
    value_mask = registry.critic_mask(spec, mask, seg).float() if spec.needs_critic else None
    valid = mask.bool()
    metrics = {**_stats("critic/advantages", adv[valid]), **_stats("critic/returns", returns[valid])}
    if seg is not None:
        metrics["segments/per_response"] = float(seg.num_segments.float().mean())
        metrics["segments/mean_len"] = float(mask.sum() / seg.num_segments.sum().clamp(min=1))
    if spec.needs_ref:
        kl_t = kl_mod.estimate(batch.old_logp, batch.ref_logp, kind=spec.kl_kind)
        metrics["actor/reward_kl"] = float(losses.masked_mean(kl_t, mask))
    if spec.needs_critic:
        vm = value_mask.bool()
        metrics["critic/vf_explained_var"] = float(losses.explained_variance(returns, batch.values, value_mask))
        metrics.update(_stats("critic/values", batch.values[vm]))
        td = td_errors(spec, batch, scores, seg)[vm]
        if td.numel() > 1:
            metrics["critic/td_error_std"] = float(td.std())
    return batch.with_fields(advantages=adv, returns=returns, seg_end=None if seg is None else seg.end_mask,
                             value_mask=value_mask), metrics


def _estimator_inputs(spec: AlgorithmSpec, batch: Batch) -> dict:
    """What an advantage estimator reads of the batch beside the scores and segments: the critic's values,
    an episode's turn rewards and, for a KL penalty in the reward, the reference's log-probs, where the
    algorithm has them."""
    return {"values": batch.values if spec.needs_critic else None, "group_index": batch.group_index,
            "old_logp": batch.old_logp, "ref_logp": batch.ref_logp if spec.kl_in_reward and spec.kl_coef > 0 else None,
            "turn_rewards": batch.turn_rewards}


def td_errors(spec: AlgorithmSpec, batch: Batch, scores: torch.Tensor, seg) -> torch.Tensor:
    """The critic's one-step TD errors `delta = r + gamma V(next anchor) - V(anchor)` `[B, T]` (per
    segment, broadcast to its tokens, for segment GAE; per token for token GAE): the estimator's
    advantages at lambda 0, neither whitened nor clipped (SAPO_SPEC.md section 8's value consistency)."""
    one_step = replace(spec, lam=0.0, lam_critic=None, whiten=False, adv_clip=None)
    delta, _ = registry.compute_advantages(one_step, scores=scores, mask=batch.response_mask, segments=seg,
                                           **_estimator_inputs(spec, batch))
    return delta


def tis_weights(batch: Batch, cap: float) -> tuple[Batch, dict]:
    """Truncated importance sampling: per-token `min(pi_old / pi_rollout, cap)` for the policy loss,
    correcting for the rollout engine sampling from a slightly different distribution than the learner's."""
    valid = batch.response_mask.bool()
    w = torch.exp(batch.old_logp - batch.rollout_logp).clamp(max=cap)
    w = torch.where(valid, w, torch.zeros_like(w))
    return batch.with_fields(is_weights=w), {"rollout/tis_weight_mean": float(w[valid].mean()),
                                           "rollout/tis_clipfrac": float((w[valid] >= cap).float().mean())}


def batch_metrics(batch: Batch, compare_rollout_logp: bool) -> dict[str, float]:
    """Size, rewards and lengths of the step's batch; with `compare_rollout_logp` (old log-probs
    recomputed by the learner) how far the engine's log-probs are from the learner's (`logp_gap`)."""
    mask = batch.response_mask
    informative = registry.dynamic_sampling_groups(batch.acc.double(), batch.group_index)
    m = {"batch/rows": float(len(batch)), "batch/groups": float(len(torch.unique(batch.group_index))),
         # Groups whose samples are all right or all wrong: a group baseline gives them no gradient.
         "batch/groups_without_signal": float(1.0 - informative.float().mean()),
         **_stats("critic/score", batch.scores),
         "reward/accuracy": float(batch.acc.mean()), "reward/format": float(batch.format.mean()),
         **_stats("response_length", mask.sum(1)),
         "response_length/clip_ratio": float((~batch.finished).float().mean()),
         **_stats("prompt_length", batch.prompt_mask.sum(1).float())}
    if compare_rollout_logp:
        m.update(logp_gap(batch.old_logp, batch.rollout_logp, mask))
    return m


def logp_gap(learner_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """`rollout/logp_gap_mean` and `_max`: |engine - learner| log-prob of the sampled tokens over `mask`, the
    learner scoring them with the weights the engine was sent. Precision and kernels alone keep it small; an
    engine serving other weights than the learner's (a stale or partial sync) shows here whatever the algorithm."""
    gap = (engine_logp.float() - learner_logp.float()).abs()[mask.bool()]
    if not gap.numel():
        return {}
    return {"rollout/logp_gap_mean": float(gap.mean()), "rollout/logp_gap_max": float(gap.max())}


def perf_metrics(batch: Batch, seconds: float, peaks: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    """Tokens (prompt and response) per second over the step's `seconds`, and `memory_metrics(peaks)`."""
    tokens = float(batch.sequence_mask.sum() + batch.prompt_mask.sum())  # observations are computed too
    return {"perf/throughput": tokens / seconds, "perf/response_tokens": float(batch.response_mask.sum()),
            **memory_metrics(peaks)}


def memory_metrics(peaks: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    """`perf/peak_host_mb/<role>` and, where the role's actors report one, `perf/peak_gpu_mb/<role>`: the
    largest over the role's actors (`peaks[role]`: each actor's `sapo_ray.utils.peak_memory_mb()`)."""
    out = {}
    for role, actors in peaks.items():
        out[f"perf/peak_host_mb/{role}"] = max(p["host"] for p in actors)
        gpu = [p["gpu"] for p in actors if "gpu" in p]
        if gpu:
            out[f"perf/peak_gpu_mb/{role}"] = max(gpu)
    return out


@dataclass
class Stability:
    """Run-level stability (SAPO_SPEC.md section 8), updated with each step's metrics and saved in
    checkpoints (a resumed run counts as the uninterrupted one does):

    - `actor/grad_norm_std`: the standard deviation of the policy's gradient norms so far;
    - `actor/grad_norm_spikes`: how many were above `SPIKE` times the median of those before them
      (counted once `MIN_HISTORY` norms exist);
    - `actor/collapsed`: 1 from the first step whose entropy is below `MIN_ENTROPY` or whose mean
      response length is below `MIN_LENGTH_SHARE` of the first step's.
    """

    SPIKE = 3.0
    MIN_HISTORY = 3
    MIN_ENTROPY = 0.05
    MIN_LENGTH_SHARE = 0.5

    grad_norms: list[float] = field(default_factory=list)
    spikes: int = 0
    start_length: float | None = None
    collapsed: bool = False

    def update(self, metrics: dict[str, float]) -> dict[str, float]:
        """`metrics` with the run-level stability metrics added."""
        norm = metrics.get("actor/grad_norm")
        if norm is not None and math.isfinite(norm):
            if len(self.grad_norms) >= self.MIN_HISTORY and norm > self.SPIKE * statistics.median(self.grad_norms):
                self.spikes += 1
            self.grad_norms.append(norm)
        length, entropy = metrics.get("response_length/mean"), metrics.get("actor/entropy")
        if length is not None and self.start_length is None:
            self.start_length = length
        if (entropy is not None and entropy < self.MIN_ENTROPY) or (
                length is not None and length < self.MIN_LENGTH_SHARE * self.start_length):
            self.collapsed = True
        out = dict(metrics)
        if self.grad_norms:
            out["actor/grad_norm_std"] = statistics.pstdev(self.grad_norms)
            out["actor/grad_norm_spikes"] = float(self.spikes)
        out["actor/collapsed"] = float(self.collapsed)
        return out


def token_texts(tokenizer, batch: Batch) -> list[list[str]]:
    """Each response token decoded on its own, observations included, by position (the text segmenters' input)."""
    return [[tokenizer.decode([t]) for t in row[: int(m.sum())].tolist()]
            for row, m in zip(batch.response_ids, batch.sequence_mask)]


def check_skipped_steps(metrics: dict[str, float], limit: int) -> None:
    """Raise `StopRun` when a learner skipped more than `limit` (`trainer.max_skipped_steps`, 0: never)
    optimizer steps in a row for a non-finite gradient: the run would spin without learning."""
    for role in ("actor", "critic"):
        in_a_row = metrics.get(f"{role}/skipped_in_a_row", 0.0)
        if limit and in_a_row > limit:
            raise StopRun(f"{role}: the last {in_a_row:.0f} optimizer steps were all skipped for a non-finite "
                          f"gradient norm (trainer.max_skipped_steps={limit}); the losses or advantages are not "
                          f"finite: check the rewards (reward/errors, critic/score/mean) and the learning rate")
