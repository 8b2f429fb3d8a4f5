"""Segmentation of responses into contiguous segments (SAPO_SPEC.md section 1).

A segmentation is described by its segment **ends**: segment ``m`` of a row covers the valid tokens
in ``(e_{m-1}, e_m]`` with ``e_{-1} = -1``; the last valid token of a row is always an end, so the
segments partition the valid tokens exactly. Everything is vectorised over the batch (no Python
loop over samples); only the text-based strategies (``newline``, ``step_marker``) touch strings.

Conventions (shared by the whole ``sapo_ray.algo`` package):
  * ``mask`` is ``[B, T]`` (bool or 0/1 float), 1 on valid response tokens, normally left-aligned.
    Rows with no valid token are allowed and give zero segments.
  * ``Segments.seg_id[b, t]`` is the 0-based index of the segment that token ``t`` belongs to,
    ``-1`` on padding.

Usage::

    seg = segment("entropy_topk", mask=mask, entropy=entropy, frac=0.3)
    ratio_log = seg.segment_mean(token_log_ratio)  # per-token broadcast of the segment mean
"""

from __future__ import annotations

import bisect
import inspect
import math
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "Segments",
    "SEGMENTERS",
    "register_segmenter",
    "SEGMENTER_INPUTS",
    "segment",
    "last_valid_mask",
    "turn_ends",
]

# A segmenter maps (mask: BoolTensor[B, T], **options) to a BoolTensor[B, T] of candidate ends.
# `segment()` intersects the candidates with the mask and adds the last valid token of each row.
Segmenter = Callable[..., torch.Tensor]
SEGMENTERS: dict[str, Segmenter] = {}


# What a segmenter may read of a rollout batch besides its mask (the trainer has all of them).
INPUTS = ("entropy", "logprobs", "token_texts", "token_ids", "tokenizer", "observation_mask")


@dataclass(frozen=True)
class SegmenterInputs:
    """What a registered segmenter reads: `reads` of `INPUTS` (None: all of them, for a segmenter that does
    not say), the one it cannot do without (`needs`, None: none), whether it takes the algorithm's `frac`,
    and whether its segments also end at each turn of a multi-turn episode (`turns`; off for the whole
    sequence, GSPO's unit)."""

    reads: tuple[str, ...] | None = None
    needs: str | None = None
    frac: bool = False
    turns: bool = True


SEGMENTER_INPUTS: dict[str, SegmenterInputs] = {}


def register_segmenter(name: str, reads: tuple[str, ...] | None = None, needs: str | None = None,
                       frac: bool = False, turns: bool = True) -> Callable[[Segmenter], Segmenter]:
    """Register ``fn(mask, **options) -> end candidates [B, T]`` under ``name``, with what it reads
    (`SegmenterInputs`)."""
    unknown = sorted(set(reads or ()) - set(INPUTS))
    if unknown:
        raise ValueError(f"segmenter {name!r} reads {unknown}, which no batch holds; choose among {INPUTS}")

    def decorator(fn: Segmenter) -> Segmenter:
        if name in SEGMENTERS and SEGMENTERS[name] is not fn:
            raise ValueError(f"segmenter {name!r} is already registered ({SEGMENTERS[name]})")
        SEGMENTERS[name] = fn
        SEGMENTER_INPUTS[name] = SegmenterInputs(reads, needs, frac, turns)
        return fn

    return decorator


# --------------------------------------------------------------------------------------------
# The Segments container
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Segments:
    """A batch segmentation. Build it with :func:`segment` or :meth:`Segments.from_end_mask`.

    Attributes:
        end_mask: BoolTensor ``[B, T]``; True at ``e_m`` (the last token of each segment).
        mask: BoolTensor ``[B, T]``; the valid-token mask the segmentation was built on.
        num_segments: LongTensor ``[B]``; ``M_b``, the number of segments of each row (0 if empty).
        max_segments: ``max_b M_b`` (at least 1 so per-segment tensors are never zero-width).
        index: LongTensor ``[B, T]``; segment index of each valid token; on padding some column
            ``>= M_b`` (per-segment tensors are ``[B, M]`` and zeroed past ``M_b``; use ``seg_id``).
        seg_id: LongTensor ``[B, T]``; segment index of each valid token, ``-1`` on padding (lazy).
        start_mask: BoolTensor ``[B, T]``; True at ``b_m``, the first valid token of a segment (lazy).

    Per-segment tensors are ``[B, M]`` with ``M = max_segments``; entries ``m >= M_b`` are 0.
    """

    end_mask: torch.Tensor
    mask: torch.Tensor
    num_segments: torch.Tensor
    max_segments: int
    index: torch.Tensor
    left_aligned: bool

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def from_end_mask(cls, end_mask: torch.Tensor, mask: torch.Tensor, left_aligned: bool | None = None) -> "Segments":
        """Build from candidate ends: keeps ends on valid tokens and adds each row's last valid token.

        This is the canonical constructor; carry ``end_mask`` in a batch and rebuild per micro-batch.
        ``left_aligned`` may be passed if already known (it is checked otherwise).
        """
        if end_mask.shape != mask.shape or mask.dim() != 2:
            raise ValueError(f"end_mask {tuple(end_mask.shape)} and mask {tuple(mask.shape)} must both be [B, T]")
        valid = mask.bool()
        B, T = valid.shape
        left = is_left_aligned(valid) if left_aligned is None else left_aligned
        end = end_mask.bool() & valid
        _set_last_valid(end, valid, left)
        if T == 0:
            zero = torch.zeros(B, dtype=torch.long, device=valid.device)
            return cls(end, valid, zero, 1, torch.zeros(B, T, dtype=torch.long, device=valid.device), left)
        # exclusive count of ends before t = segment index of token t
        index = torch.cumsum(F.pad(end[:, :-1], (1, 0)), dim=1, dtype=torch.long)
        num_segments = index[:, -1] + end[:, -1]
        max_segments = max(1, int(num_segments.max())) if B else 1
        if not left:
            # holes: padding inside a row would land in a real segment; send it to the spare column
            index.masked_fill_(~valid, max_segments)
        # left-aligned: padding already maps to column M_b (one past the row's last segment)
        return cls(end, valid, num_segments, max_segments, index, left)

    # ---- lazily derived views --------------------------------------------------------------

    @cached_property
    def seg_id(self) -> torch.Tensor:
        """LongTensor ``[B, T]``: segment index of each valid token, ``-1`` on padding."""
        return self.index.masked_fill(~self.mask, -1)

    @cached_property
    def start_mask(self) -> torch.Tensor:
        """BoolTensor ``[B, T]``: True at the first valid token of each segment."""
        return _start_mask(self.mask, self.end_mask, self.left_aligned)

    @cached_property
    def segment_valid(self) -> torch.Tensor:
        """BoolTensor ``[B, M]``: True for the ``M_b`` real segments of each row."""
        ar = torch.arange(self.max_segments, device=self.mask.device)
        return ar.unsqueeze(0) < self.num_segments.unsqueeze(1)

    @cached_property
    def end_index(self) -> torch.Tensor:
        """LongTensor ``[B, M]``: position ``e_m`` of each segment's end (0 for missing segments)."""
        if self.left_aligned:  # segments tile [0, T_b): e_m = (sum of the first m+1 lengths) - 1
            out = torch.cumsum(self.lengths, dim=1) - 1
        else:
            B, T = self.mask.shape
            pos = torch.arange(T, device=self.mask.device).expand(B, T).masked_fill(~self.mask, -1)
            out = torch.zeros(B, self.max_segments + 1, dtype=torch.long, device=self.mask.device)
            out = out.scatter_reduce(1, self.index, pos, "amax")[:, : self.max_segments]
        return out.masked_fill(~self.segment_valid, 0)

    @cached_property
    def lengths(self) -> torch.Tensor:
        """LongTensor ``[B, M]``: number of valid tokens in each segment (0 for missing segments)."""
        B, T = self.mask.shape
        out = torch.zeros(B, self.max_segments + 1, dtype=torch.long, device=self.mask.device)
        src = torch.ones((), dtype=torch.long, device=self.mask.device).expand(B, T)
        out = out.scatter_add(1, self.index, src)[:, : self.max_segments]
        return out.masked_fill(~self.segment_valid, 0)

    # ---- per-segment operations ------------------------------------------------------------

    def segment_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, M]`` per-segment sums of ``x`` over valid tokens (0 for missing segments). Differentiable.

        Padding entries of ``x`` are never added to a real segment (they may hold any value).
        """
        out = torch.zeros(x.shape[0], self.max_segments + 1, dtype=x.dtype, device=x.device)
        out = out.scatter_add(1, self.index, x)[:, : self.max_segments]
        return torch.where(self.segment_valid, out, x.new_zeros(()))

    def broadcast(self, per_segment: torch.Tensor) -> torch.Tensor:
        """Broadcast ``[B, M]`` per-segment values to ``[B, T]`` tokens (0 on padding). Differentiable."""
        per_segment = torch.where(self.segment_valid, per_segment, per_segment.new_zeros(()))
        # spare columns of zeros: padding indexes column M_b (zeroed above) or column M (this pad)
        return torch.gather(F.pad(per_segment, (0, 1)), 1, self.index)

    def segment_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token broadcast of the masked mean of ``x`` over each token's segment; 0 on padding.

        ``out[b, t] = mean_{u in z_m} x[b, u]`` for ``t in z_m``. Gradients flow through the mean.
        """
        return self.broadcast(self.segment_sum(x) / self.lengths.clamp(min=1).to(x.dtype))

    def gather_at(self, x: torch.Tensor, position_mask: torch.Tensor) -> torch.Tensor:
        """``[B, M]``: the value of ``x`` at the one position of each segment selected by ``position_mask``

        (e.g. ``end_mask`` or ``start_mask``, which select exactly one valid token per segment).
        """
        if position_mask is self.end_mask:
            out = torch.gather(x, 1, self.end_index)
            return torch.where(self.segment_valid, out, x.new_zeros(()))
        src = torch.where(position_mask & self.mask, x, x.new_zeros(()))
        return self.segment_sum(src)

    # ---- batching helpers ------------------------------------------------------------------

    def select(self, rows: torch.Tensor | slice) -> "Segments":
        """Segments of a subset of rows (e.g. a micro-batch)."""
        return Segments.from_end_mask(self.end_mask[rows], self.mask[rows])


def is_left_aligned(mask: torch.Tensor) -> bool:
    """True if every row is valid tokens followed only by padding (no holes)."""
    valid = mask.bool()
    return valid.shape[1] < 2 or not bool((valid[:, 1:] & ~valid[:, :-1]).any())


def last_valid_mask(mask: torch.Tensor) -> torch.Tensor:
    """BoolTensor ``[B, T]`` that is True at the last valid token of each non-empty row."""
    valid = mask.bool()
    out = torch.zeros_like(valid)
    _set_last_valid(out, valid, is_left_aligned(valid))
    return out


def _set_last_valid(out: torch.Tensor, valid: torch.Tensor, left_aligned: bool) -> None:
    """Set ``out`` True (in place) at the last valid token of each non-empty row."""
    B, T = valid.shape
    if T == 0:
        return
    if left_aligned:
        last = valid.sum(dim=1, dtype=torch.int32).long() - 1
    else:
        pos = torch.arange(T, device=valid.device).expand(B, T)
        last = pos.masked_fill(~valid, -1).amax(dim=1)
    idx = last.clamp(min=0).unsqueeze(1)
    out.scatter_(1, idx, out.gather(1, idx) | (last >= 0).unsqueeze(1))


def _start_mask(valid: torch.Tensor, end: torch.Tensor, left_aligned: bool) -> torch.Tensor:
    """First valid token of each segment: a valid token with no valid token since the previous end."""
    if valid.shape[1] == 0:
        return valid.clone()
    if left_aligned:
        return valid & F.pad(end[:, :-1], (1, 0), value=True)
    cv = torch.cumsum(valid, dim=1)  # valid tokens at positions <= t
    cv_at_end = torch.cummax(cv.masked_fill(~end, 0), dim=1).values  # cv at the latest end <= t
    cv_at_prev_end = F.pad(cv_at_end[:, :-1], (1, 0))  # ... at the latest end < t
    return valid & (cv - valid.long() == cv_at_prev_end)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def segment(
    strategy: str,
    *,
    mask: torch.Tensor,
    min_len: int | None = None,
    max_len: int | None = None,
    **options,
) -> Segments:
    """Segment every row of a batch with a registered strategy.

    Args:
        strategy: one of ``SEGMENTERS`` -- ``entropy_topk`` (``entropy``, ``frac``), ``token``,
            ``sequence``, ``newline`` / ``step_marker`` (``token_texts`` or ``token_ids`` +
            ``tokenizer``; ``step_marker`` also ``pattern``), ``low_prob`` (``logprobs``, ``rho``),
            ``fixed`` (``n``).
        mask: ``[B, T]`` valid-token mask.
        min_len: optional merge knob (off by default): scanning left to right, an end is dropped
            while the current segment has fewer than ``min_len`` tokens, so short segments merge
            into the next one. The last valid token stays an end, so the final segment may be short.
        max_len: optional split knob (off by default): segments longer than ``max_len`` are cut
            every ``max_len`` tokens (applied after ``min_len``; ``max_len`` wins on conflicts).
        **options: passed to the strategy.

    Returns:
        :class:`Segments`; the last valid token of every row is always an end.
    """
    if strategy not in SEGMENTERS:
        raise ValueError(f"unknown segmentation strategy {strategy!r}; choose one of {sorted(SEGMENTERS)}")
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    valid = mask.bool()
    left = is_left_aligned(valid)
    fn = SEGMENTERS[strategy]
    if _takes_left_aligned(fn):
        options = {**options, "left_aligned": left}
    ends = fn(valid, **options).bool() & valid
    if min_len is not None and min_len > 1:
        ends = _merge_short(ends, valid, min_len)
    if max_len is not None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        ends = _split_long(ends, valid, max_len)
    return Segments.from_end_mask(ends, valid, left_aligned=left)


@lru_cache(maxsize=None)
def _takes_left_aligned(fn: Segmenter) -> bool:
    """Whether a segmenter accepts the precomputed ``left_aligned`` flag (saves a pass over the mask)."""
    return "left_aligned" in inspect.signature(fn).parameters


def _merge_short(ends: torch.Tensor, valid: torch.Tensor, min_len: int) -> torch.Tensor:
    """Drop ends until the running segment has >= min_len tokens (loop over T, vectorised over B)."""
    last = last_valid_mask(valid)
    run = torch.zeros(valid.shape[0], dtype=torch.long, device=valid.device)
    keep = torch.zeros_like(ends)
    for t in range(valid.shape[1]):
        run = run + valid[:, t]
        k = (ends[:, t] & (run >= min_len)) | last[:, t]
        keep[:, t] = k
        run = torch.where(k, 0, run)
    return keep


def _split_long(ends: torch.Tensor, valid: torch.Tensor, max_len: int) -> torch.Tensor:
    """Add an end every ``max_len`` valid tokens inside each segment."""
    rank = torch.cumsum(valid, dim=1) - 1  # rank of each valid token in its row
    start = _start_mask(valid, ends, is_left_aligned(valid))
    start_rank = torch.cummax(torch.where(start, rank, -1), dim=1).values
    pos_in_seg = rank - start_rank
    return ends | (valid & ((pos_in_seg + 1) % max_len == 0))


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------


def topk_count(lengths: torch.Tensor, frac: float) -> torch.Tensor:
    """``k = max(1, ceil(frac * T))`` per row, as a LongTensor.

    A tolerance of 1e-6 is subtracted before the ceil so that float error does not add a segment
    (``0.07 * 100`` is ``7.000000000000001`` in floating point and must give 7, not 8).
    """
    k = torch.ceil(lengths.double() * float(frac) - 1e-6).long()
    return k.clamp(min=1)


@register_segmenter("entropy_topk", reads=("entropy",), needs="entropy", frac=True)
def _entropy_topk(
    mask: torch.Tensor, *, entropy: torch.Tensor, frac: float = 0.3, left_aligned: bool | None = None
) -> torch.Tensor:
    """Ends at the ``k = max(1, ceil(frac * T))`` highest-entropy valid tokens of each row.

    Ties: when several tokens share the k-th largest entropy, the **earlier** positions are taken
    first (deterministic, unlike ``torch.topk``). Implementation, vectorised over rows:

    1. Find each row's k-th largest entropy ``v`` with one fixed-size ``topk(K)``, ``K = max_b k_b``:
       padding is set to ``-inf`` except ``K - k_b`` padding slots set to ``+inf``, so the smallest
       of the row's top ``K`` is exactly its ``k_b``-th largest valid entropy. (There are always
       enough padding slots: ``K - k_b <= ceil(frac * (T_max - T_b)) <= T - T_b`` for ``frac <= 1``.)
    2. Take every valid token above ``v``, then the first ``k_b - #(above v)`` valid tokens equal
       to ``v`` by position.
    """
    if entropy.shape != mask.shape:
        raise ValueError(f"entropy shape {tuple(entropy.shape)} must match mask shape {tuple(mask.shape)}")
    if not frac > 0:
        raise ValueError(f"frac must be > 0 (fraction of tokens that end a segment), got {frac}")
    B, T = mask.shape
    if T == 0 or B == 0:
        return mask.clone()
    lengths = mask.sum(dim=1, dtype=torch.int32).long()
    k = torch.minimum(topk_count(lengths, frac), lengths)  # k >= T_b: every token; 0 for empty rows
    k_max = int(k.max())
    if k_max == 0:
        return torch.zeros_like(mask)
    # fill padding: the first (k_max - k_b) padding slots of each row with +inf, the rest with -inf
    scores = entropy.masked_fill(~mask, float("-inf"))
    if left_aligned if left_aligned is not None else is_left_aligned(mask):
        pos = torch.arange(T, device=mask.device)
        plus = (pos >= lengths.unsqueeze(1)) & (pos < (lengths + k_max - k).unsqueeze(1))
    else:
        pad_rank = torch.cumsum(~mask, dim=1)  # 1-based rank among the row's padding slots
        plus = ~mask & (pad_rank <= (k_max - k).unsqueeze(1))
    scores.masked_fill_(plus, float("inf"))
    kth = torch.topk(scores, k_max, dim=1, largest=True, sorted=False).values.amin(dim=1, keepdim=True)
    chosen = mask & (scores >= kth)
    n_chosen = chosen.sum(dim=1, dtype=torch.int32)
    if bool((n_chosen == k).all()):  # no ties at the threshold beyond what is needed
        return chosen
    above = mask & (scores > kth)
    tied = mask & (scores == kth)
    needed = k.unsqueeze(1) - above.sum(dim=1, keepdim=True, dtype=torch.int32)
    return above | (tied & (torch.cumsum(tied, dim=1) <= needed))


def turn_ends(mask: torch.Tensor, observation_mask: torch.Tensor) -> torch.Tensor:
    """BoolTensor ``[B, T]``: the last token of each of the model's turns that an observation follows (the
    row's last valid token ends its last turn, and ``segment`` adds it)."""
    out = torch.zeros_like(mask, dtype=torch.bool)
    out[:, :-1] = mask[:, :-1].bool() & observation_mask[:, 1:].bool()
    return out


@register_segmenter("turn", reads=("observation_mask",))
def _turns(mask: torch.Tensor, *, observation_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each of the model's turns in a multi-turn episode is a segment (one per row without observations)."""
    return torch.zeros_like(mask) if observation_mask is None else turn_ends(mask, observation_mask) & mask


@register_segmenter("token", reads=())
def _every_token(mask: torch.Tensor) -> torch.Tensor:
    """Every token is a segment (token-level PPO)."""
    return mask.clone()


@register_segmenter("sequence", reads=(), turns=False)
def _whole_sequence(mask: torch.Tensor) -> torch.Tensor:
    """One segment per row (GSPO-like); the last valid token is added by ``segment``."""
    return torch.zeros_like(mask)


@register_segmenter("fixed", reads=())
def _fixed(mask: torch.Tensor, *, n: int) -> torch.Tensor:
    """An end every ``n`` valid tokens (plus the last valid token)."""
    if n < 1:
        raise ValueError(f"fixed segmentation needs n >= 1, got {n}")
    rank = torch.cumsum(mask, dim=1) - 1
    return mask & ((rank + 1) % n == 0)


@register_segmenter("low_prob", reads=("logprobs",), needs="logprobs")
def _low_prob(mask: torch.Tensor, *, logprobs: torch.Tensor, rho: float) -> torch.Tensor:
    """SPO-style: ends at tokens whose sampled probability ``exp(logprob) < rho``."""
    if logprobs.shape != mask.shape:
        raise ValueError(f"logprobs shape {tuple(logprobs.shape)} must match mask shape {tuple(mask.shape)}")
    if not 0 < rho <= 1:
        raise ValueError(f"rho must be a probability in (0, 1], got {rho}")
    return mask & (logprobs < math.log(rho))


@register_segmenter("newline", reads=("token_texts", "token_ids", "tokenizer"))
def _newline(
    mask: torch.Tensor,
    *,
    token_texts: Sequence[Sequence[str]] | None = None,
    token_ids: torch.Tensor | None = None,
    tokenizer=None,
) -> torch.Tensor:
    """Ends at tokens whose text contains a newline."""
    if token_ids is not None and tokenizer is not None and token_texts is None:
        # decode each distinct id once, then look the flags up with one gather
        uniq, inverse = torch.unique(token_ids, return_inverse=True)
        flags = [("\n" in tokenizer.decode([int(i)])) for i in uniq.tolist()]
        table = torch.tensor(flags, dtype=torch.bool, device=mask.device)
        return mask & table[inverse.to(mask.device)]
    texts = _require_texts(token_texts, token_ids, tokenizer, mask, "newline")
    out = torch.zeros(mask.shape, dtype=torch.bool)
    for b, row in enumerate(texts):
        for t, s in enumerate(row[: mask.shape[1]]):
            if "\n" in s:
                out[b, t] = True
    return mask & out.to(mask.device)


@register_segmenter("step_marker", reads=("token_texts", "token_ids", "tokenizer"))
def _step_marker(
    mask: torch.Tensor,
    *,
    token_texts: Sequence[Sequence[str]] | None = None,
    token_ids: torch.Tensor | None = None,
    tokenizer=None,
    pattern: str = r"Step \d+",
) -> torch.Tensor:
    """End a segment just before each token that starts a marker match (regex ``pattern``).

    The token "starting" a match is the one containing the match's first character; the token
    before it becomes an end (a match starting at token 0 adds nothing).
    """
    texts = _require_texts(token_texts, token_ids, tokenizer, mask, "step_marker")
    regex = re.compile(pattern)
    out = torch.zeros(mask.shape, dtype=torch.bool)
    T = mask.shape[1]
    for b, row in enumerate(texts):
        row = list(row[:T])
        offsets, pos = [], 0
        for s in row:
            offsets.append(pos)
            pos += len(s)
        text = "".join(row)
        for match in regex.finditer(text):
            # the last token whose text starts at or before the match start contains it
            t = bisect.bisect_right(offsets, match.start()) - 1
            if t >= 1:
                out[b, t - 1] = True
    return mask & out.to(mask.device)


def _require_texts(token_texts, token_ids, tokenizer, mask, strategy: str) -> list[list[str]]:
    if token_texts is None:
        if token_ids is None or tokenizer is None:
            raise ValueError(f"segmentation {strategy!r} needs token_texts=, or token_ids= and tokenizer=")
        token_texts = [[tokenizer.decode([int(i)]) for i in row] for row in token_ids.tolist()]
    if len(token_texts) != mask.shape[0]:
        raise ValueError(f"token_texts has {len(token_texts)} rows but the batch has {mask.shape[0]}")
    return [list(r) for r in token_texts]
