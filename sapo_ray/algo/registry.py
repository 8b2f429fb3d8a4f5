"""Algorithm table and registries (SAPO_SPEC.md section 6).

Nothing outside the registries branches on an algorithm's, estimator's, aggregation's or segmenter's
name: the trainer looks the :class:`AlgorithmSpec` up in ``ALGORITHMS`` (or :func:`get_algorithm`,
with config overrides) and the step calls (`sapo_ray.bookkeeping`, `sapo_ray.learner.worker`)::

    keep   = dynamic_sampling_groups(acc, group_index)    # per group; only if spec.dynamic_sampling
    scores = shape_scores(spec, scores, response_lengths, max_response_len)   # DAPO overlong penalty
    seg    = make_segments(spec, mask, entropy=..., logprobs=..., token_texts=...)   # None when not needed
    adv, returns = compute_advantages(spec, scores=..., mask=..., values=..., segments=seg, ...)
    vf_mask = critic_mask(spec, mask, seg)                         # anchors for segment GAE
    loss, metrics = policy_loss(spec, logp, old_logp, adv, mask, segments=seg, agg_denom=...)
    kl = kl_loss(spec, logp, ref_logp, mask, agg_denom=...)        # aggregated as the loss aggregation says

A new algorithm is an ``AlgorithmSpec`` passed to :func:`register_algorithm`; a new advantage
estimator is a function decorated with ``@register_advantage(name)``; a new segmentation is a
function decorated with ``@register_segmenter(name, reads=...)`` (``segments``); losses, ratio levels
and aggregations register in ``losses``.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Hashable, Sequence

import torch

from sapo_ray.algo import advantages as adv_mod
from sapo_ray.algo import kl as kl_mod
from sapo_ray.algo import losses
from sapo_ray.algo import segments as seg_mod
from sapo_ray.algo.segments import SEGMENTERS, Segments, register_segmenter, segment

__all__ = [
    "AlgorithmSpec",
    "ALGORITHMS",
    "ADVANTAGES",
    "SEGMENTERS",
    "register_algorithm",
    "register_advantage",
    "register_segmenter",
    "get_algorithm",
    "make_segments",
    "needs_token_texts",
    "compute_advantages",
    "policy_loss",
    "critic_mask",
    "kl_loss",
    "shape_scores",
    "overlong_penalty",
    "dynamic_sampling_groups",
]


@dataclass
class AlgorithmSpec:
    """Everything that distinguishes one RL algorithm from another in this trainer.

    It is also the config group `algorithm` (`sapo_ray.config`): each registered preset is the option
    `algorithm=NAME`, and any field can be overridden (`algorithm.frac=0.2`). The presets are the only
    place an algorithm's values are written down; `get_algorithm` hands out copies.
    """

    name: str
    """Registry key, e.g. ``sapo``."""
    advantage: str
    """Advantage estimator in ``ADVANTAGES``: ``segment_gae``, ``token_gae`` or ``group``."""
    ratio_level: str
    """Importance-ratio level: ``token`` (PPO), ``segment`` (SAPO) or ``sequence`` (GSPO)."""
    loss_agg: str
    """Policy-loss aggregation in ``losses.LOSS_AGGS``."""
    needs_critic: bool
    """Train a value model (GAE estimators)."""
    needs_group: bool
    """Needs ``n >= 2`` samples per prompt (group baselines)."""
    policy_loss: str = "clipped"
    """Per-token policy loss in ``losses.POLICY_LOSSES`` (``clipped``: PPO's surrogate with a dual clip;
    ``soft_gate``: Soft Adaptive Policy Optimization's sigmoid gate)."""
    clip_low: float = 0.2
    """``eps_low``: the ratio is clipped below at ``1 - clip_low``."""
    clip_high: float = 0.2
    """``eps_high``: the ratio is clipped above at ``1 + clip_high`` (clip-higher when > clip_low)."""
    dual_clip: float | None = 3.0
    """Dual-clip constant ``c`` for ``A < 0`` (``None`` disables)."""
    tau_pos: float = 1.0
    """``policy_loss=soft_gate``: the gate's temperature for positive advantages (verl's default)."""
    tau_neg: float = 1.05
    """``policy_loss=soft_gate``: its temperature for negative advantages (larger: their gradient fades sooner)."""
    group_kind: str | None = None
    """For ``advantage='group'``: one of ``advantages.GROUP_KINDS`` (``grpo``, ``dr_grpo``, ``rloo``)."""
    group_eps: float = 1e-6
    """``eps`` in GRPO's ``(R - mean) / (std + eps)``."""
    gamma: float = 1.0
    """Discount factor of the GAE estimators."""
    lam: float = 0.95
    """GAE lambda for the actor's advantages."""
    lam_critic: float | None = None
    """GAE lambda for the critic's returns (VC-PPO's decoupled GAE); ``None`` = ``lam``."""
    whiten: bool = True
    """Whiten GAE advantages over the batch's valid tokens."""
    adv_clip: float | None = 5.0
    """Clamp whitened GAE advantages to ``[-adv_clip, adv_clip]`` (``None`` disables)."""
    segmenter: str = "entropy_topk"
    """Segmentation strategy in ``SEGMENTERS`` (for segment-level advantages/ratios)."""
    frac: float = 0.3
    """``entropy_topk``: fraction of valid tokens that end a segment."""
    segment_options: Dict[str, Any] = field(default_factory=dict)
    """Extra options for other segmenters (``n``, ``rho``, ``pattern``, ``min_len``, ``max_len``)."""
    value_anchor: str = "seg_end_prev"
    """Segment value position in ``advantages.VALUE_ANCHORS``: ``seg_end_prev`` (reference code) or
    ``seg_start`` (paper text)."""
    kl_in_reward: bool = False
    """Subtract ``kl_coef * kl_t`` from the token rewards."""
    kl_coef: float = 0.0
    """``beta`` of the KL-in-reward penalty."""
    kl_kind: str = "k1"
    """Estimator of the KL in the reward, in ``kl.KL_KINDS``."""
    kl_loss: bool = False
    """Add ``kl_loss_coef * KL(pi || pi_ref)`` to the actor loss (GRPO's optional KL loss)."""
    kl_loss_coef: float = 0.0
    """Weight of the KL loss."""
    kl_loss_kind: str = "k3"
    """Estimator of the KL loss."""
    dynamic_sampling: bool = False
    """DAPO: drop prompt groups whose accuracies are all equal (all right or all wrong: no signal),
    draw more prompts until the batch is full."""
    max_refill: int = 3
    """Dynamic sampling: extra prompt batches drawn at most per step to refill dropped groups."""
    overlong_penalty: bool = False
    """DAPO soft overlong punishment on the score."""
    overlong_buffer_len: int | None = None
    """Length of the linear penalty ramp ending at the max response length; ``None`` = a fifth of
    the max response length (DAPO: a 4,096-token buffer under a 20,480-token limit)."""
    overlong_penalty_factor: float = 1.0
    """Penalty at the max response length."""
    entropy_coef: float = 0.0
    """Entropy bonus in the actor loss (0 = off)."""
    value_clip: float = 0.5
    """Critic's clipped value loss: range around the rollout-time values."""
    critic_warmup: int = 0
    """Steps at the start that update only the critic (value pre-training; verl's ``critic_warmup``):
    a fresh value head gives noise advantages until it has seen some returns. Ignored without a critic."""

    def replace(self, **overrides: Any) -> "AlgorithmSpec":
        """A copy with fields overridden (config values); unknown keys raise."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown algorithm field(s) {unknown} for {self.name!r}; valid fields: {sorted(names)}")
        copy = dataclasses.replace(self, **overrides)
        copy.segment_options = dict(copy.segment_options)
        return copy

    def overlong_buffer(self, max_response_len: int) -> int:
        """The overlong penalty's ramp length for responses of at most ``max_response_len`` tokens."""
        return self.overlong_buffer_len if self.overlong_buffer_len is not None else max(1, max_response_len // 5)

    @property
    def needs_segments(self) -> bool:
        agg = losses.LOSS_AGGS.get(self.loss_agg)
        return self.advantage == "segment_gae" or self.ratio_level == "segment" or (agg is not None and agg.needs_segments)

    @property
    def needs_ref(self) -> bool:
        """Whether a KL term (in the reward or the loss) reads the frozen reference's log-probs."""
        return (self.kl_in_reward and self.kl_coef > 0) or (self.kl_loss and self.kl_loss_coef > 0)


# --------------------------------------------------------------------------------------------
# Registries
# --------------------------------------------------------------------------------------------

ALGORITHMS: dict[str, AlgorithmSpec] = {}

# An advantage estimator: fn(spec, *, rewards, scores, mask, values, segments, group_index) -> (adv, returns)
AdvantageFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
ADVANTAGES: dict[str, AdvantageFn] = {}


def register_algorithm(spec: AlgorithmSpec) -> AlgorithmSpec:
    if spec.name in ALGORITHMS and ALGORITHMS[spec.name] != spec:
        raise ValueError(f"algorithm {spec.name!r} is already registered")
    ALGORITHMS[spec.name] = spec
    return spec


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    def decorator(fn: AdvantageFn) -> AdvantageFn:
        if name in ADVANTAGES and ADVANTAGES[name] is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered ({ADVANTAGES[name]})")
        ADVANTAGES[name] = fn
        return fn

    return decorator


def get_algorithm(name: str, **overrides: Any) -> AlgorithmSpec:
    """A copy of the registered spec ``name`` with config overrides applied."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name].replace(**overrides)


def _require(value, what: str, spec: AlgorithmSpec):
    if value is None:
        raise ValueError(f"algorithm {spec.name!r} ({spec.advantage} advantages) needs {what}=")
    return value


@register_advantage("segment_gae")
def _segment_gae(spec: AlgorithmSpec, *, rewards, mask, values, segments, **_) -> tuple[torch.Tensor, torch.Tensor]:
    values = _require(values, "values", spec)
    segments = _require(segments, "segments", spec)
    kw = dict(gamma=spec.gamma, value_anchor=spec.value_anchor, whiten=spec.whiten, clip=spec.adv_clip)
    adv, ret = adv_mod.segment_gae(rewards, values, mask, segments, lam=spec.lam, **kw)
    if spec.lam_critic is not None and spec.lam_critic != spec.lam:
        _, ret = adv_mod.segment_gae(rewards, values, mask, segments, lam=spec.lam_critic, **kw)
    return adv, ret


@register_advantage("token_gae")
def _token_gae(spec: AlgorithmSpec, *, rewards, mask, values, **_) -> tuple[torch.Tensor, torch.Tensor]:
    values = _require(values, "values", spec)
    kw = dict(gamma=spec.gamma, whiten=spec.whiten, clip=spec.adv_clip)
    adv, ret = adv_mod.token_gae(rewards, values, mask, lam=spec.lam, **kw)
    if spec.lam_critic is not None and spec.lam_critic != spec.lam:
        _, ret = adv_mod.token_gae(rewards, values, mask, lam=spec.lam_critic, **kw)
    return adv, ret


@register_advantage("group")
def _group(spec: AlgorithmSpec, *, rewards, mask, group_index, **_) -> tuple[torch.Tensor, torch.Tensor]:
    group_index = _require(group_index, "group_index", spec)
    # The outcome is the row's total reward (the score, minus the KL penalty if it is in the reward).
    outcome = losses.masked_sum(rewards, mask, dim=1)
    adv = adv_mod.group_advantage(outcome, group_index, mask, kind=spec.group_kind or "grpo", eps=spec.group_eps)
    returns = torch.where(mask.bool(), outcome.unsqueeze(1), outcome.new_zeros(()))
    return adv, returns


# --------------------------------------------------------------------------------------------
# Entry points used by the trainer
# --------------------------------------------------------------------------------------------


def missing_segment_options(spec: AlgorithmSpec) -> list[str]:
    """The options without a default that the spec's segmenter takes and ``segment_options`` does not
    give (``fixed`` needs ``n``, ``low_prob`` needs ``rho``), read from its signature. Inputs that the
    trainer passes (the batch's entropies, log-probs, token texts) and ``frac`` are not options."""
    if not spec.needs_segments or spec.segmenter not in SEGMENTERS:
        return []
    passed = {"mask", "left_aligned", "frac", *seg_mod.INPUTS}
    params = inspect.signature(SEGMENTERS[spec.segmenter]).parameters.values()
    return [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty
            and p.name not in passed and p.name not in spec.segment_options]


def needs_token_texts(spec: AlgorithmSpec) -> bool:
    """Whether the spec's segmenter reads the decoded response tokens (``token_texts``)."""
    inputs = seg_mod.SEGMENTER_INPUTS.get(spec.segmenter, seg_mod.SegmenterInputs())
    return spec.needs_segments and "token_texts" in (seg_mod.INPUTS if inputs.reads is None else inputs.reads)


def make_segments(spec: AlgorithmSpec, mask: torch.Tensor, **inputs: Any) -> Segments | None:
    """Segment a rollout batch if ``spec`` needs it (else ``None``).

    ``inputs`` are the strategy's inputs (``entropy`` for ``entropy_topk``, ``logprobs`` for
    ``low_prob``, ``token_texts`` / ``token_ids`` + ``tokenizer`` for the text strategies); extra
    inputs that the strategy does not take are ignored.
    """
    if not spec.needs_segments:
        return None
    options = dict(spec.segment_options)
    declared = seg_mod.SEGMENTER_INPUTS.get(spec.segmenter, seg_mod.SegmenterInputs())
    if declared.frac:
        options.setdefault("frac", spec.frac)
    # A segmenter gets the inputs it declares (all of them if it declares none).
    wanted = declared.reads
    passed = {k: v for k, v in inputs.items() if (wanted is None or k in wanted) and v is not None}
    if declared.needs is not None and declared.needs not in passed:
        raise ValueError(f"segmentation {spec.segmenter!r} of algorithm {spec.name!r} needs {declared.needs}= (old policy)")
    return segment(spec.segmenter, mask=mask, **options, **passed)


@torch.no_grad()
def compute_advantages(
    spec: AlgorithmSpec,
    *,
    scores: torch.Tensor,
    mask: torch.Tensor,
    values: torch.Tensor | None = None,
    segments: Segments | None = None,
    group_index: torch.Tensor | Sequence[Hashable] | None = None,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    turn_rewards: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages, returns)`` ``[B, T]`` for any registered algorithm.

    ``scores [B]`` are the (shaped) outcome scores; the token rewards are
    ``advantages.token_rewards`` with an episode's ``turn_rewards`` and the spec's KL-in-reward penalty
    (a group estimator's outcome is their sum: the score plus the turns' rewards). ``returns`` are the
    critic targets for GAE estimators (before whitening); for group estimators they are the
    outcome broadcast to the valid tokens (unused without a critic).
    """
    if spec.advantage not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {spec.advantage!r}; choose one of {sorted(ADVANTAGES)}")
    kl_coef = spec.kl_coef if spec.kl_in_reward else 0.0
    rewards = adv_mod.token_rewards(scores, mask, old_logp, ref_logp, kl_coef=kl_coef, kl_kind=spec.kl_kind,
                                    turn_rewards=turn_rewards)
    fn = ADVANTAGES[spec.advantage]
    return fn(
        spec, rewards=rewards, scores=scores, mask=mask, values=values, segments=segments, group_index=group_index
    )


def policy_loss(
    spec: AlgorithmSpec,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    segments: Segments | None = None,
    is_weights: torch.Tensor | None = None,
    norm_len: float | None = None,
    agg_denom: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``losses.policy_loss`` with the spec's loss, ratio level, clip ranges and aggregation."""
    return losses.policy_loss(logp, old_logp, adv, mask, segments=segments, agg=spec.loss_agg, is_weights=is_weights,
                              norm_len=norm_len, agg_denom=agg_denom, **_loss_knobs(spec))


def loss_trace(spec: AlgorithmSpec, logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
               segments: Segments | None = None) -> losses.LossTrace:
    """``losses.loss_trace`` of the spec's policy loss: what `policy_loss` saw, per token."""
    return losses.loss_trace(logp, old_logp, adv, mask, segments=segments, **_loss_knobs(spec))


def _loss_knobs(spec: AlgorithmSpec) -> dict[str, Any]:
    return dict(level=spec.ratio_level, clip_low=spec.clip_low, clip_high=spec.clip_high, dual_clip=spec.dual_clip,
                kind=spec.policy_loss, tau_pos=spec.tau_pos, tau_neg=spec.tau_neg)


def critic_mask(spec: AlgorithmSpec, mask: torch.Tensor, segments: Segments | None = None) -> torch.Tensor:
    """Where the value loss is taken: segment anchors for segment GAE, every valid token otherwise."""
    if spec.advantage == "segment_gae":
        return adv_mod.anchor_mask(_require(segments, "segments", spec), spec.value_anchor)
    return mask.bool()


def kl_loss(
    spec: AlgorithmSpec,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    agg_denom: float | torch.Tensor | None = None,
    norm_len: float | None = None,
) -> torch.Tensor:
    """``kl_loss_coef * KL`` aggregated like the policy loss, with its ``norm_len`` (token mean beside
    segment_mean: `losses.LossAgg.kl_agg`), 0 if off."""
    if not spec.kl_loss:
        return logp.new_zeros(())
    agg = losses.LOSS_AGGS[spec.loss_agg].kl_agg or spec.loss_agg
    return spec.kl_loss_coef * kl_mod.kl_loss(logp, ref_logp, mask, spec.kl_loss_kind, agg=agg, agg_denom=agg_denom,
                                              norm_len=norm_len)


# --------------------------------------------------------------------------------------------
# DAPO helpers
# --------------------------------------------------------------------------------------------


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer_len: int, penalty: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment, ``[B]`` values in ``[-penalty, 0]`` to add to the scores::

        0                                               if L <= max_len - buffer_len
        -penalty * (L - (max_len - buffer_len)) / buffer_len   in the buffer
        -penalty                                        if L >= max_len
    """
    if not 0 < buffer_len <= max_len:
        raise ValueError(f"overlong buffer_len must be in (0, max_len={max_len}], got {buffer_len}")
    excess = lengths.to(torch.float32) - float(max_len - buffer_len)
    return -penalty * torch.clamp(excess / buffer_len, 0.0, 1.0)


def shape_scores(
    spec: AlgorithmSpec,
    scores: torch.Tensor,
    response_lengths: torch.Tensor | None = None,
    max_response_len: int | None = None,
) -> torch.Tensor:
    """Scores after the spec's reward shaping (the DAPO overlong penalty when enabled)."""
    if not spec.overlong_penalty:
        return scores
    if response_lengths is None or max_response_len is None:
        raise ValueError(
            f"algorithm {spec.name!r} has overlong_penalty on: pass response_lengths= and max_response_len="
        )
    pen = overlong_penalty(response_lengths, max_response_len, spec.overlong_buffer(max_response_len),
                           spec.overlong_penalty_factor)
    return scores + pen.to(scores.device, scores.dtype if scores.is_floating_point() else torch.float32)


def dynamic_sampling_groups(scores: torch.Tensor, group_index: torch.Tensor | Sequence[Hashable]) -> torch.Tensor:
    """BoolTensor ``[G]``: True for a group whose scores are not all equal. Groups are ordered as

    ``advantages.group_ids`` numbers them: sorted ids for a tensor, first appearance for labels.
    """
    dense, G = adv_mod.group_ids(group_index, device=scores.device)
    return ~adv_mod.equal_groups(scores, dense, G)


# --------------------------------------------------------------------------------------------
# The algorithms (SAPO_SPEC.md section 6)
# --------------------------------------------------------------------------------------------

# SAPO: segment GAE (lam 0.99, gamma 1) with KL in the reward (beta 0.001), segment ratio,
# clip-higher 0.2 / 0.28, dual clip 3, critic loss at the segment anchors.
register_algorithm(AlgorithmSpec(
    name="sapo", advantage="segment_gae", ratio_level="segment", loss_agg="token_mean",
    needs_critic=True, needs_group=False, clip_low=0.2, clip_high=0.28, dual_clip=3.0,
    lam=0.99, kl_in_reward=True, kl_coef=0.001, kl_kind="k1",
))
# PPO: token GAE (lam 0.95), token ratio; same reward (KL in reward) as SAPO for a fair comparison.
# Whitened advantages are not clamped: the reference code clamps to +-5 only in SAPO.
register_algorithm(AlgorithmSpec(
    name="ppo", advantage="token_gae", ratio_level="token", loss_agg="token_mean",
    needs_critic=True, needs_group=False, clip_low=0.2, clip_high=0.2, dual_clip=3.0,
    lam=0.95, adv_clip=None, kl_in_reward=True, kl_coef=0.001, kl_kind="k1",
))
# VC-PPO (arXiv:2503.01491): value pre-training before any policy update, then decoupled GAE, lam 0.99
# for the actor and 1.0 (Monte-Carlo returns) for the critic. The paper pre-trains the value model on
# the initial policy's rollouts; the number of steps (10) is this preset's choice.
register_algorithm(AlgorithmSpec(
    name="vc_ppo", advantage="token_gae", ratio_level="token", loss_agg="token_mean",
    needs_critic=True, needs_group=False, clip_low=0.2, clip_high=0.2, dual_clip=3.0,
    lam=0.99, lam_critic=1.0, adv_clip=None, kl_in_reward=True, kl_coef=0.001, kl_kind="k1", critic_warmup=10,
))
# GRPO: group-normalised outcome advantage, token ratio, optional k3 KL loss (on by default).
register_algorithm(AlgorithmSpec(
    name="grpo", advantage="group", group_kind="grpo", ratio_level="token", loss_agg="token_mean",
    needs_critic=False, needs_group=True, clip_low=0.2, clip_high=0.2, dual_clip=3.0,
    kl_loss=True, kl_loss_coef=0.001, kl_loss_kind="k3",
))
# Soft Adaptive Policy Optimization (Gao et al., arXiv 2511.20347; "sapo" in verl, EasyR1, AReaL and TRL,
# named soft_sapo here beside our segment-aligned sapo): GRPO's advantages and KL loss with a sigmoid gate
# in place of the clip, aggregated as verl does (seq-mean-token-mean).
register_algorithm(AlgorithmSpec(
    name="soft_sapo", advantage="group", group_kind="grpo", ratio_level="token", loss_agg="seq_mean_token_mean",
    needs_critic=False, needs_group=True, policy_loss="soft_gate", tau_pos=1.0, tau_neg=1.05,
    kl_loss=True, kl_loss_coef=0.001, kl_loss_kind="k3",
))
# Dr.GRPO: no std normalisation, token sums over a constant length (pass norm_len).
register_algorithm(AlgorithmSpec(
    name="dr_grpo", advantage="group", group_kind="dr_grpo", ratio_level="token",
    loss_agg="seq_mean_token_sum_norm", needs_critic=False, needs_group=True,
    clip_low=0.2, clip_high=0.2, dual_clip=3.0,
))
# RLOO: leave-one-out baseline.
register_algorithm(AlgorithmSpec(
    name="rloo", advantage="group", group_kind="rloo", ratio_level="token", loss_agg="token_mean",
    needs_critic=False, needs_group=True, clip_low=0.2, clip_high=0.2, dual_clip=3.0,
))
# GSPO: group-normalised advantage, sequence-level (length-normalised) ratio, tiny clip range,
# sequence-mean aggregation, no dual clip (as in the GSPO paper and verl's gspo loss).
register_algorithm(AlgorithmSpec(
    name="gspo", advantage="group", group_kind="grpo", ratio_level="sequence", loss_agg="seq_mean_token_mean",
    needs_critic=False, needs_group=True, clip_low=3e-4, clip_high=4e-4, dual_clip=None,
))
# DAPO: clip-higher, token-sum / total tokens (token_mean with agg_denom = mini-batch tokens),
# dynamic sampling on accuracy, soft overlong punishment over the last fifth of the length limit, no KL.
register_algorithm(AlgorithmSpec(
    name="dapo", advantage="group", group_kind="grpo", ratio_level="token", loss_agg="token_mean",
    needs_critic=False, needs_group=True, clip_low=0.2, clip_high=0.28, dual_clip=3.0,
    dynamic_sampling=True, overlong_penalty=True, overlong_penalty_factor=1.0,
))
