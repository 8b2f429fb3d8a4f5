"""The bookkeeping of one training step, as pure functions (no Ray, no I/O).

The trainer calls them in this order::

    groups  = group_samples(samples, scores, examples)      # per prompt, in prompt order
    groups  = informative_groups(groups)                    # DAPO's dynamic sampling only
    groups  = trim_groups(groups, prompts_per_step, world)  # whole groups, rows divisible by the ranks
    batch   = make_batch(groups, pad_id)
    ...old/ref log-probs and values from the actors...
    batch, metrics = advantages(spec, batch, max_new_tokens, token_texts)   # + segments, critic mask
    batch, metrics = tis_weights(batch, cap)                              # optional
    metrics = batch_metrics(batch)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sapo_ray.algo import kl as kl_mod
from sapo_ray.algo import losses, registry
from sapo_ray.algo.registry import AlgorithmSpec
from sapo_ray.batch import Batch, Sample


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
    return batch.with_data(
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


def advantages(spec: AlgorithmSpec, batch: Batch, max_new_tokens: int,
               token_texts: list[list[str]] | None = None) -> tuple[Batch, dict]:
    """Shaped scores, segments from the old-policy entropies, the registered estimator's advantages
    and returns, and the critic's loss mask; the batch with them and their metrics.

    Needs `old_logp` and `entropy` (and `values` with a critic, `ref_logp` with KL in the reward) in
    `batch.data`; `token_texts` (each valid response token decoded) for the text segmenters.
    """
    mask = batch.response_mask
    scores = registry.shape_scores(spec, batch.data["scores"], mask.sum(1), max_new_tokens)
    seg = registry.make_segments(spec, mask, entropy=batch.data["entropy"], logprobs=batch.data["old_logp"],
                                 token_texts=token_texts)
    adv, returns = registry.compute_advantages(
        spec, scores=scores, mask=mask, values=batch.data.get("values"), segments=seg,
        group_index=batch.data["group_index"], old_logp=batch.data["old_logp"], ref_logp=batch.data.get("ref_logp"))
    fields = {"advantages": adv, "returns": returns}
    if seg is not None:
        fields["seg_end"] = seg.end_mask
    if spec.needs_critic:
        fields["value_mask"] = registry.critic_mask(spec, mask, seg).float()
    valid = mask.bool()
    metrics = {**_stats("critic/advantages", adv[valid]), **_stats("critic/returns", returns[valid])}
    if seg is not None:
        metrics["segments/per_response"] = float(seg.num_segments.float().mean())
        metrics["segments/mean_len"] = float(mask.sum() / seg.num_segments.sum().clamp(min=1))
    if "ref_logp" in batch.data:
        kl_t = kl_mod.estimate(batch.data["old_logp"], batch.data["ref_logp"], kind=spec.kl_kind)
        metrics["actor/reward_kl"] = float(losses.masked_mean(kl_t, mask))
    if spec.needs_critic:
        vm = fields["value_mask"]
        metrics["critic/vf_explained_var"] = float(losses.explained_variance(returns, batch.data["values"], vm))
        metrics.update(_stats("critic/values", batch.data["values"][vm.bool()]))
    return batch.with_data(**fields), metrics


def tis_weights(batch: Batch, cap: float) -> tuple[Batch, dict]:
    """Truncated importance sampling: per-token `min(pi_old / pi_rollout, cap)` for the policy loss,
    correcting for the rollout engine sampling from a slightly different distribution than the learner's."""
    valid = batch.response_mask.bool()
    w = torch.exp(batch.data["old_logp"] - batch.data["rollout_logp"]).clamp(max=cap)
    w = torch.where(valid, w, torch.zeros_like(w))
    return batch.with_data(is_weights=w), {"rollout/tis_weight_mean": float(w[valid].mean()),
                                           "rollout/tis_clipfrac": float((w[valid] >= cap).float().mean())}


def batch_metrics(batch: Batch, compare_rollout_logp: bool) -> dict[str, float]:
    """Size, rewards and lengths of the step's batch; with `compare_rollout_logp` (old log-probs
    recomputed by the learner) how far the engine's log-probs are from the learner's."""
    mask = batch.response_mask
    m = {"batch/rows": float(len(batch)), "batch/groups": float(len(torch.unique(batch.data["group_index"]))),
         **_stats("critic/score", batch.data["scores"]),
         "reward/accuracy": float(batch.data["acc"].mean()), "reward/format": float(batch.data["format"].mean()),
         **_stats("response_length", mask.sum(1)),
         "response_length/clip_ratio": float((~batch.data["finished"]).float().mean()),
         **_stats("prompt_length", batch.prompt_mask.sum(1).float())}
    if compare_rollout_logp:
        diff = (batch.data["rollout_logp"] - batch.data["old_logp"]).abs()[mask.bool()]
        if diff.numel():
            m["rollout/logp_diff_mean"], m["rollout/logp_diff_max"] = float(diff.mean()), float(diff.max())
    return m
