"""The data that moves between the driver, the rollout workers and the learners.

A `Prompt` is an encoded prompt and `SamplingParams` how to sample it (driver -> rollout worker).
A `Sample` is one sampled response (what a rollout engine returns). A `Batch` is the padded tensor
form the learners consume: prompts left-padded to a common length P, responses right-padded to R, so
`response_mask[b, t] = 1` for the `t < T_b` valid tokens (left-aligned, the convention of
`sapo_ray.algo`). Images and videos stay per sample (`vision[b]`, a `Vision`) because a vision tower
consumes them flattened and micro-batches must be able to pick any subset of rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence

import torch


@dataclass
class Vision:
    """One prompt's images and videos as the model's processor encodes them: patches flattened over all
    images (videos), and each one's grid `(t, h, w)` in patches."""

    pixel_values: torch.Tensor | None = None  # [patches, C * temporal_patch * patch**2]
    image_grid_thw: torch.Tensor | None = None  # [images, 3]
    pixel_values_videos: torch.Tensor | None = None  # [patches, C * temporal_patch * patch**2]
    video_grid_thw: torch.Tensor | None = None  # [videos, 3]
    # Qwen2.5-VL: seconds between two temporal patches of each video (its RoPE spaces frames by time);
    # Qwen3-VL writes each frame's time into the prompt's text instead.
    second_per_grid_ts: torch.Tensor | None = None  # [videos]

    @classmethod
    def from_processed(cls, encoded) -> "Vision | None":
        """The vision inputs of a processor's output (None when it has neither images nor videos)."""
        vision = cls(**{f.name: torch.as_tensor(encoded[f.name]) for f in fields(cls) if encoded.get(f.name) is not None})
        return vision if vision.pixel_values is not None or vision.pixel_values_videos is not None else None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def to(self, device) -> "Vision":
        return Vision(**{k: v.to(device) for k, v in self.tensors().items()})

    def equals(self, other: "Vision | None") -> bool:
        if other is None or self.tensors().keys() != other.tensors().keys():
            return False
        return all(x is y or (x.shape == y.shape and torch.equal(x, y))
                   for x, y in zip(self.tensors().values(), other.tensors().values()))

    @staticmethod
    def model_inputs(visions: Sequence["Vision | None"]) -> dict[str, torch.Tensor]:
        """The model's keyword arguments for rows with `visions`, in row order (images and videos each
        concatenated, as the vision tower and the RoPE index consume them)."""
        out: dict[str, list[torch.Tensor]] = {}
        for vision in visions:
            for name, tensor in ({} if vision is None else vision.tensors()).items():
                out.setdefault(name, []).append(tensor)
        return {name: torch.cat(parts) for name, parts in out.items()}


@dataclass(frozen=True)
class VisionTokens:
    """The placeholder ids a Qwen-VL prompt expands images and videos into (None: the model has none)."""

    image: int | None = None  # `<|image_pad|>`
    video: int | None = None  # `<|video_pad|>`

    def types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Qwen-VL's `mm_token_type_ids`: 0 on text, 1 on image placeholders, 2 on video placeholders (the
        model builds its 3-D RoPE positions from them)."""
        types = torch.zeros_like(input_ids, dtype=torch.int)
        for value, token in ((1, self.image), (2, self.video)):
            if token is not None:
                types[input_ids == token] = value
        return types


@dataclass
class Prompt:
    """An encoded prompt: token ids (image and video placeholders expanded) and its vision inputs."""

    ids: list[int]
    vision: Vision | None = None
    images: list | None = None  # the raw images, for engines that run the model's own processor (vllm)


@dataclass
class SamplingParams:
    n: int = 1  # responses per prompt
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    max_new_tokens: int = 64
    # Base seed of this call; the engine derives its per-chunk or per-sample seeds from it (utils.derive_seed).
    seed: int = 0


@dataclass
class EpisodeStats:
    """What a multi-turn episode did."""

    turns: int  # the model's turns
    tool_calls: int = 0
    tool_errors: dict[str, int] = field(default_factory=dict)  # failed calls by kind
    cut: bool = False  # ended by `max_turns` or the token budget, not by the environment
    transcript: str = ""  # the whole response decoded, observations and special tokens included
    turn_reward: float = 0.0  # the sum of the environment's rewards of its turns (`envs.env.Step.reward`)


@dataclass
class Sample:
    """One response sampled for one prompt."""

    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logp: list[float]  # log-prob of each sampled token under the engine's distribution
    rollout_entropy: list[float]  # entropy of the engine's next-token distribution at each step
    text: str  # decoded response (special tokens skipped)
    finished: bool  # ended with an end-of-turn token rather than at the length limit
    prompt_index: int  # position of its prompt in the step's prompt batch
    vision: Vision | None = None
    # A multi-turn episode's response holds the environment's observations between the model's turns: 1 on
    # those tokens (appended, never sampled: their logp and entropy are 0); None for one turn.
    observation_mask: list[int] | None = None
    episode: EpisodeStats | None = None
    # An episode whose environment rewards turns: each turn's reward at its last token, 0 elsewhere; None: none.
    turn_rewards: list[float] | None = None


@dataclass
class LogProbs:
    """A learner's forward pass (no gradient) over a batch's rows: the log-prob of each response token
    `[B, R]` and, under the policy, the entropy of its distribution `[B, R]`."""

    logp: torch.Tensor
    entropy: torch.Tensor | None = None


def _pad(rows: list[list[int]] | list[list[float]], value, left: bool, dtype) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), value, dtype=dtype)
    for i, r in enumerate(rows):
        if r:
            if left:
                out[i, out.shape[1] - len(r) :] = torch.tensor(r, dtype=dtype)
            else:
                out[i, : len(r)] = torch.tensor(r, dtype=dtype)
    return out


class MissingField(LookupError):
    """A `Batch` field read before the phase that fills it ran (or for an algorithm that never fills it)."""


class Filled:
    """A `Batch` field that a later phase fills: `None` until then, and reading it before raises
    `MissingField` with its name and its filler, where a bare `None` would fail far from the cause."""

    def __init__(self, by: str):
        self.by = by

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, batch, owner=None):
        if batch is None:
            return None  # the dataclass default: not filled yet
        value = batch.__dict__[self.name]
        if value is None:
            raise MissingField(f"Batch.{self.name} is not filled: {self.by} fills it, and did not run for this batch")
        return value

    def __set__(self, batch, value) -> None:
        batch.__dict__[self.name] = value


@dataclass
class Batch:
    """The experience of `B` sampled responses, as the learners consume it: padded tensors, each field
    filled by one phase of the step (shapes: `[B, P]` prompt, `[B, R]` per response token, `[B]` per row).

    Rows and per-token fields stay aligned through `select`, which every split (ranks, mini- and
    micro-batches) goes through. A field not filled yet raises `MissingField` when read (`Filled`).
    """

    # The rollout engine: prompts left-padded to P, responses right-padded to R, each row's images and videos,
    # and the engine's own per-token numbers. A response's `t < T_b` tokens are the model's (`response_mask`)
    # and, in a multi-turn episode, the observations between its turns (`observation_mask`): context the
    # forward passes attend to, that no loss, KL or value target counts.
    prompt_ids: torch.Tensor  # [B, P] long
    prompt_mask: torch.Tensor  # [B, P] long, 1 on real prompt tokens
    response_ids: torch.Tensor  # [B, R] long
    response_mask: torch.Tensor  # [B, R] float, 1 on the tokens the model sampled
    observation_mask: torch.Tensor  # [B, R] float, 1 on the tokens an environment appended
    vision: list[Vision | None]
    rollout_logp: torch.Tensor = Filled("the rollout engine")  # [B, R] log-prob of each token under the engine
    rollout_entropy: torch.Tensor = Filled("the rollout engine")  # [B, R] entropy of the engine's distribution
    # An environment's reward of each turn at the turn's last token (0 elsewhere; all 0 for single turns).
    turn_rewards: torch.Tensor = Filled("the rollout engine")  # [B, R] float
    # The reward, grouped by prompt (`bookkeeping.make_batch`).
    scores: torch.Tensor = Filled("the reward (bookkeeping.make_batch)")  # [B] float, the reward's score
    acc: torch.Tensor = Filled("the reward (bookkeeping.make_batch)")  # [B] float, 1 if the answer is right
    format: torch.Tensor = Filled("the reward (bookkeeping.make_batch)")  # [B] float, 1 if the format is right
    finished: torch.Tensor = Filled("the reward (bookkeeping.make_batch)")  # [B] bool, ended by an end-of-turn token
    group_index: torch.Tensor = Filled("the reward (bookkeeping.make_batch)")  # [B] long, the row's prompt group
    # The old policy: the learner's recomputed forward (`actor.recompute_old_logp`) or the engine's numbers.
    old_logp: torch.Tensor = Filled("the old policy's forward (trainer, forward stage)")  # [B, R]
    entropy: torch.Tensor = Filled("the old policy's forward (trainer, forward stage)")  # [B, R]
    # The frozen reference (algorithms with a KL term).
    ref_logp: torch.Tensor = Filled("the reference forward (algorithms with a KL term)")  # [B, R]
    # The critic (algorithms with one).
    values: torch.Tensor = Filled("the critic's forward (algorithms with a critic)")  # [B, R] V at every position
    # The advantage estimator (`bookkeeping.advantages`).
    advantages: torch.Tensor = Filled("the advantage estimator (bookkeeping.advantages)")  # [B, R]
    returns: torch.Tensor = Filled("the advantage estimator (bookkeeping.advantages)")  # [B, R] the critic's targets
    seg_end: torch.Tensor = Filled("the segmenter (bookkeeping.advantages, segment-level algorithms)")  # [B, R] 1 at segment ends
    value_mask: torch.Tensor = Filled("bookkeeping.advantages (algorithms with a critic)")  # [B, R] the critic's loss positions
    # Truncated importance sampling (`rollout.tis_cap`).
    is_weights: torch.Tensor = Filled("bookkeeping.tis_weights (rollout.tis_cap > 0)")  # [B, R]

    @classmethod
    def from_samples(cls, samples: list[Sample], pad_id: int) -> "Batch":
        prompt_ids = _pad([s.prompt_ids for s in samples], pad_id, left=True, dtype=torch.long)
        prompt_mask = _pad([[1] * len(s.prompt_ids) for s in samples], 0, left=True, dtype=torch.long)
        response_ids = _pad([s.response_ids for s in samples], pad_id, left=False, dtype=torch.long)
        observed = [s.observation_mask or [0] * len(s.response_ids) for s in samples]
        response_mask = _pad([[1.0 - o for o in row] for row in observed], 0.0, left=False, dtype=torch.float32)
        observation_mask = _pad([[float(o) for o in row] for row in observed], 0.0, left=False, dtype=torch.float32)
        return cls(
            prompt_ids, prompt_mask, response_ids, response_mask, observation_mask,
            [s.vision for s in samples],
            rollout_logp=_pad([s.rollout_logp for s in samples], 0.0, left=False, dtype=torch.float32),
            rollout_entropy=_pad([s.rollout_entropy for s in samples], 0.0, left=False, dtype=torch.float32),
            turn_rewards=_pad([s.turn_rewards or [0.0] * len(s.response_ids) for s in samples], 0.0, left=False,
                              dtype=torch.float32),
        )

    def filled(self) -> dict[str, torch.Tensor]:
        """The per-row and per-token fields (`Filled`) filled so far, by name."""
        return {name: self.__dict__[name] for name in FILLED if self.__dict__[name] is not None}

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def __repr__(self) -> str:  # the dataclass's would read, and so require, every field
        return (f"Batch(rows={len(self)}, prompt={self.prompt_ids.shape[1]}, response={self.response_ids.shape[1]}, "
                f"filled={sorted(self.filled())})")

    @property
    def sequence_mask(self) -> torch.Tensor:
        """`[B, R]` float: 1 on every token of the responses, the model's and the observations (left-aligned)."""
        return self.response_mask + self.observation_mask

    def padding_ratio(self) -> float:
        """The share of the `[prompt | response]` positions a forward pass computes that are padding."""
        computed = len(self) * (self.prompt_ids.shape[1] + self.response_ids.shape[1])
        return 1.0 - float(self.prompt_mask.sum() + self.sequence_mask.sum()) / max(computed, 1)

    def select(self, index: torch.Tensor | list[int] | slice) -> "Batch":
        """Rows `index` (all fields), trimming padding columns no selected row uses."""
        if isinstance(index, slice):
            index = list(range(len(self)))[index]
        index = torch.as_tensor(index, dtype=torch.long)
        pm, rm, om = self.prompt_mask[index], self.response_mask[index], self.observation_mask[index]
        p_keep = max(int(pm.sum(1).max()) if len(index) else 1, 1)
        r_keep = max(int((rm + om).sum(1).max()) if len(index) else 1, 1)
        p0 = self.prompt_ids.shape[1] - p_keep
        per_row = {k: (v[index][:, :r_keep] if v.dim() == 2 else v[index]) for k, v in self.filled().items()}
        return Batch(
            self.prompt_ids[index][:, p0:], pm[:, p0:], self.response_ids[index][:, :r_keep], rm[:, :r_keep],
            om[:, :r_keep], [self.vision[i] for i in index.tolist()], **per_row,
        )

    def with_fields(self, **values: torch.Tensor | None) -> "Batch":
        """A copy with `values` filled (`dataclasses.replace` would read, and so require, every field)."""
        return Batch(**{**{f.name: self.__dict__[f.name] for f in fields(self)}, **values})

    def to(self, device: torch.device) -> "Batch":
        """Every tensor of the batch on `device`."""
        move = lambda t: None if t is None else t.to(device)
        return Batch(move(self.prompt_ids), move(self.prompt_mask), move(self.response_ids), move(self.response_mask),
                     move(self.observation_mask), [None if v is None else v.to(device) for v in self.vision],
                     **{k: move(v) for k, v in self.filled().items()})

    def distinct_prompts(self) -> tuple[list[int], torch.Tensor]:
        """The first row of each distinct prompt (same tokens, same images and videos) and, per row, the position of
        its prompt in that list: the rows a prompt's samples share (`sapo_ray.learner.forward`)."""
        first: list[int] = []
        share: list[int] = []
        by_ids: dict[tuple, list[int]] = {}
        # One host copy for the whole batch: row by row on a GPU, each `tolist` would wait for the device.
        prompt_ids, prompt_mask = self.prompt_ids.cpu(), self.prompt_mask.cpu().bool()
        for b in range(len(self)):
            ids = tuple(prompt_ids[b, prompt_mask[b]].tolist())
            candidates = by_ids.setdefault(ids, [])
            vision = self.vision[b]
            k = next((k for k in candidates
                      if self.vision[first[k]] is vision or (vision is not None and vision.equals(self.vision[first[k]]))), None)
            if k is None:
                k = len(first)
                first.append(b)
                candidates.append(k)
            share.append(k)
        return first, torch.tensor(share, dtype=torch.long)

    def model_inputs(self, vision_tokens: VisionTokens) -> dict[str, torch.Tensor]:
        """`input_ids = [prompt | response]` with its attention mask, images, videos and (for Qwen-VL) token types."""
        input_ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)
        attention_mask = torch.cat([self.prompt_mask, self.sequence_mask.long()], dim=1)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **Vision.model_inputs(self.vision)}
        if len(inputs) > 2:
            inputs["mm_token_type_ids"] = vision_tokens.types(input_ids)
        else:
            # Text-only: positions from the mask, so left padding does not shift them.
            inputs["position_ids"] = (attention_mask.cumsum(1) - 1).clamp(min=0)
        return inputs


# The fields a phase fills, in declaration order.
FILLED = tuple(name for name, value in vars(Batch).items() if isinstance(value, Filled))


def pack_by_tokens(prompt_lengths: Sequence[int], response_lengths: Sequence[int], budget: int,
                   count: int = 0, together: Sequence[int] | None = None) -> list[list[int]]:
    """Row indices in micro-batches whose padded size, rows x (longest prompt + longest response),
    stays within `budget` tokens.

    Rows are taken longest response first (then longest prompt: responses vary far more), so each
    micro-batch holds rows of similar length and little padding (verl's `use_dynamic_bsz`); a row
    longer than `budget` goes alone. With `together` (a key per row: its prompt), rows with one key are
    packed as a unit, ordered by the unit's longest response, so a micro-batch computes their prompt
    once; a unit over the budget is cut into pieces that fit. With `count`, exactly that many
    micro-batches (at least as many as `budget` needs, at most one per row): the ranks of an FSDP group
    must run the same number of forward/backward passes, so every rank splits to the largest count any
    rank needs, halving its largest micro-batches until it has as many.
    """
    n = len(prompt_lengths)
    longest_first = lambda i: (-response_lengths[i], -prompt_lengths[i], i)
    width = lambda rows: (max(prompt_lengths[i] for i in rows), max(response_lengths[i] for i in rows))
    units: dict[int, list[int]] = {}
    for i in range(n):
        units.setdefault(i if together is None else together[i], []).append(i)
    pieces: list[list[int]] = []
    for rows in units.values():
        piece: list[int] = []
        for i in sorted(rows, key=longest_first):
            if piece and (len(piece) + 1) * sum(width(piece + [i])) > budget:
                pieces.append(piece)
                piece = []
            piece.append(i)
        pieces.append(piece)
    pieces.sort(key=lambda rows: longest_first(rows[0]))
    groups: list[list[int]] = []
    widths: list[tuple[int, int]] = []  # each group's longest prompt and response
    for piece in pieces:
        p, r = width(piece)
        if groups:
            wp, wr = max(widths[-1][0], p), max(widths[-1][1], r)
            if (len(groups[-1]) + len(piece)) * (wp + wr) <= budget:
                groups[-1].extend(piece)
                widths[-1] = (wp, wr)
                continue
        groups.append(list(piece))
        widths.append((p, r))
    if count:
        if not len(groups) <= count <= n:
            raise ValueError(f"cannot split {n} rows into {count} micro-batches of at most {budget} tokens")
        while len(groups) < count:
            largest = max(range(len(groups)), key=lambda g: (len(groups[g]), -g))
            rows = groups.pop(largest)
            groups[largest:largest] = [rows[: len(rows) // 2], rows[len(rows) // 2 :]]
    return groups
