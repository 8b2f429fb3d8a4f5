"""Segmentation: hand-worked examples for every strategy, tie-breaking, knobs, masks with holes."""

import math

import pytest
import torch

from sapo_ray.algo import segments
from sapo_ray.algo.segments import Segments, segment


def lmask(lengths, T):
    """Left-aligned bool mask with the given row lengths."""
    return torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def test_entropy_topk_hand_example_with_padding_and_empty_row():
    mask = lmask([5, 2, 0], 6)
    entropy = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.9, 0.2, 9.0],  # padding entropy 9.0 must be ignored
            [1.0, 1.0, 7.0, 7.0, 7.0, 7.0],
            [3.0, 3.0, 3.0, 3.0, 3.0, 3.0],
        ]
    )
    seg = segment("entropy_topk", mask=mask, entropy=entropy, frac=0.3)
    # row 0: T=5, k = ceil(1.5) = 2 -> the two 0.9's at t=1, 3; plus the last token t=4
    # row 1: T=2, k = ceil(0.6) = 1 -> tie 1.0/1.0 broken toward t=0; plus last t=1
    # row 2: no valid token -> no segment
    assert seg.end_mask.tolist() == [
        [False, True, False, True, True, False],
        [True, True, False, False, False, False],
        [False] * 6,
    ]
    assert seg.seg_id.tolist() == [[0, 0, 1, 1, 2, -1], [0, 1, -1, -1, -1, -1], [-1] * 6]
    assert seg.start_mask.tolist() == [
        [True, False, True, False, True, False],
        [True, True, False, False, False, False],
        [False] * 6,
    ]
    assert seg.num_segments.tolist() == [3, 2, 0]
    assert seg.lengths.tolist() == [[2, 2, 1], [1, 1, 0], [0, 0, 0]]
    assert seg.end_index.tolist() == [[1, 3, 4], [0, 1, 0], [0, 0, 0]]


def test_entropy_ties_break_toward_earlier_position():
    # all equal: T=4, frac=0.5 -> k=2 -> positions 0 and 1, plus the last token 3
    seg = segment("entropy_topk", mask=lmask([4], 4), entropy=torch.full((1, 4), 0.5), frac=0.5)
    assert seg.end_mask.tolist() == [[True, True, False, True]]
    # k-th value tied: entropies [0.2, 0.9, 0.5, 0.5, 0.5, 0.1], k=ceil(0.5*6)=3 -> 0.9 (t=1) and
    # two of the three 0.5's: the earliest, t=2 and t=3; plus the last token t=5
    ent = torch.tensor([[0.2, 0.9, 0.5, 0.5, 0.5, 0.1]])
    seg = segment("entropy_topk", mask=lmask([6], 6), entropy=ent, frac=0.5)
    assert seg.end_mask.tolist() == [[False, True, True, True, False, True]]


def test_entropy_topk_k_is_not_inflated_by_float_error():
    # 0.07 * 100 == 7.000000000000001 in floating point; k must be 7 (not 8)
    T = 100
    ent = torch.arange(T, 0, -1, dtype=torch.float32).unsqueeze(0)  # strictly decreasing
    seg = segment("entropy_topk", mask=lmask([T], T), entropy=ent, frac=0.07)
    ends = seg.end_mask[0].nonzero().flatten().tolist()
    assert ends == [0, 1, 2, 3, 4, 5, 6, 99]


def test_entropy_topk_frac_one_and_above_makes_every_token_a_segment():
    mask = lmask([3, 1], 4)
    ent = torch.rand(2, 4)
    for frac in (1.0, 1.7):
        seg = segment("entropy_topk", mask=mask, entropy=ent, frac=frac)
        assert torch.equal(seg.end_mask, mask)
        assert seg.seg_id.tolist() == [[0, 1, 2, -1], [0, -1, -1, -1]]


def test_entropy_topk_single_token_rows():
    seg = segment("entropy_topk", mask=lmask([1, 0], 1), entropy=torch.tensor([[0.3], [0.7]]), frac=0.3)
    assert seg.seg_id.tolist() == [[0], [-1]]
    assert seg.num_segments.tolist() == [1, 0]


def test_entropy_topk_rejects_bad_inputs():
    with pytest.raises(ValueError, match="frac"):
        segment("entropy_topk", mask=lmask([2], 2), entropy=torch.zeros(1, 2), frac=0.0)
    with pytest.raises(ValueError, match="shape"):
        segment("entropy_topk", mask=lmask([2], 2), entropy=torch.zeros(1, 3), frac=0.3)
    with pytest.raises(ValueError, match="unknown segmentation strategy 'nope'"):
        segment("nope", mask=lmask([2], 2))


def test_token_and_sequence_strategies():
    mask = lmask([3, 2], 4)
    assert segment("token", mask=mask).seg_id.tolist() == [[0, 1, 2, -1], [0, 1, -1, -1]]
    seq = segment("sequence", mask=mask)
    assert seq.seg_id.tolist() == [[0, 0, 0, -1], [0, 0, -1, -1]]
    assert seq.end_mask.tolist() == [[False, False, True, False], [False, True, False, False]]
    assert seq.num_segments.tolist() == [1, 1]


def test_fixed_strategy():
    # n=2 over 5 tokens: ends at t=1, 3 and the last token t=4
    seg = segment("fixed", mask=lmask([5], 6), n=2)
    assert seg.seg_id.tolist() == [[0, 0, 1, 1, 2, -1]]
    with pytest.raises(ValueError, match="n >= 1"):
        segment("fixed", mask=lmask([5], 6), n=0)


def test_low_prob_strategy():
    # probabilities 0.9, 0.05, 0.5, 0.01, 0.8 with rho=0.1 -> ends at t=1, t=3 (+ last t=4)
    logp = torch.tensor([[0.9, 0.05, 0.5, 0.01, 0.8]]).log()
    seg = segment("low_prob", mask=lmask([5], 5), logprobs=logp, rho=0.1)
    assert seg.end_mask.tolist() == [[False, True, False, True, True]]


def test_newline_strategy_from_texts_and_from_ids():
    texts = [["Hello", " world\n", "Next", ".\n\n", "x"], ["a", "b"]]
    mask = lmask([5, 2], 5)
    seg = segment("newline", mask=mask, token_texts=texts)
    assert seg.seg_id.tolist() == [[0, 0, 1, 1, 2], [0, 0, -1, -1, -1]]

    class Tok:
        vocab = {0: "Hello", 1: " world\n", 2: "Next", 3: ".\n\n", 4: "x", 5: "a", 6: "b", 7: "<pad>\n"}

        def decode(self, ids):
            return "".join(self.vocab[i] for i in ids)

    ids = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 7, 7]])  # the padding id decodes to a newline
    seg_ids = segment("newline", mask=mask, token_ids=ids, tokenizer=Tok())
    assert torch.equal(seg_ids.seg_id, seg.seg_id)
    with pytest.raises(ValueError, match="token_texts"):
        segment("newline", mask=mask)


def test_step_marker_ends_just_before_the_marker_token():
    texts = [["Step", " 1", ":", " a", "\n", "Step", " 2", ":", " b"]]
    # "Step 1" starts at token 0 (nothing before it); "Step 2" starts at token 5 -> end at token 4
    seg = segment("step_marker", mask=lmask([9], 9), token_texts=texts)
    assert seg.seg_id.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1, 1]]
    # a match starting inside a token: token 1 ("\nStep") contains the 'S' -> end at token 0
    seg = segment("step_marker", mask=lmask([4], 4), token_texts=[["ab", "\nStep", " 4", "."]])
    assert seg.seg_id.tolist() == [[0, 1, 1, 1]]
    # custom pattern
    seg = segment("step_marker", mask=lmask([4], 4), token_texts=[["x", "##", "y", "##"]], pattern="##")
    assert seg.seg_id.tolist() == [[0, 1, 1, 2]]


def test_min_len_merges_and_max_len_splits():
    mask = lmask([5], 5)
    # every token an end candidate; min_len=2 keeps an end only once 2 tokens have accumulated
    assert segment("token", mask=mask, min_len=2).seg_id.tolist() == [[0, 0, 1, 1, 2]]
    # one segment of 5 split every 2 tokens
    assert segment("sequence", mask=mask, max_len=2).seg_id.tolist() == [[0, 0, 1, 1, 2]]
    # both: ends at 1 and 3 from fixed(2); max_len=1 splits everything
    assert segment("fixed", mask=mask, n=2, max_len=1).seg_id.tolist() == [[0, 1, 2, 3, 4]]


def test_masks_with_holes_still_partition_the_valid_tokens():
    mask = torch.tensor([[True, True, False, True, True]])
    tok = segment("token", mask=mask)
    assert tok.seg_id.tolist() == [[0, 1, -1, 2, 3]]
    assert tok.start_mask.tolist() == [[True, True, False, True, True]]
    seq = segment("sequence", mask=mask)
    assert seq.seg_id.tolist() == [[0, 0, -1, 0, 0]]
    assert seq.end_mask.tolist() == [[False, False, False, False, True]]
    assert seq.start_mask.tolist() == [[True, False, False, False, False]]
    assert seq.end_index.tolist() == [[4]]
    # an entropy end right before the hole: segments {0,1}, {3,4}; the second starts at t=3
    seg = segment("entropy_topk", mask=mask, entropy=torch.tensor([[0.0, 5.0, 9.0, 0.0, 0.0]]), frac=0.25)
    assert seg.seg_id.tolist() == [[0, 0, -1, 1, 1]]
    assert seg.start_mask.tolist() == [[True, False, False, True, False]]
    assert seg.lengths.tolist() == [[2, 2]]


def test_segment_mean_sum_and_broadcast_by_hand():
    mask = lmask([5, 2], 6)
    seg = Segments.from_end_mask(torch.tensor([[0, 1, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0]]).bool(), mask)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, float("nan")], [10.0, 20.0, float("nan"), 0.0, 0.0, 0.0]])
    # segments row 0: {0,1} {2,3} {4}; row 1: {0,1}. NaN on padding must not leak.
    assert seg.segment_sum(x).tolist() == [[3.0, 7.0, 5.0], [30.0, 0.0, 0.0]]
    assert seg.segment_mean(x).tolist() == [[1.5, 1.5, 3.5, 3.5, 5.0, 0.0], [15.0, 15.0, 0.0, 0.0, 0.0, 0.0]]
    assert seg.broadcast(torch.tensor([[7.0, 8.0, 9.0], [6.0, 5.0, 4.0]])).tolist() == [
        [7.0, 7.0, 8.0, 8.0, 9.0, 0.0],
        [6.0, 6.0, 0.0, 0.0, 0.0, 0.0],
    ]


def test_select_and_from_end_mask_round_trip():
    mask = lmask([4, 3, 2], 4)
    seg = segment("entropy_topk", mask=mask, entropy=torch.rand(3, 4), frac=0.5)
    sub = seg.select(torch.tensor([2, 0]))
    assert torch.equal(sub.seg_id, seg.seg_id[[2, 0]])
    assert sub.num_segments.tolist() == seg.num_segments[[2, 0]].tolist()
    rebuilt = Segments.from_end_mask(seg.end_mask, mask)
    assert torch.equal(rebuilt.seg_id, seg.seg_id)


def test_topk_count_convention():
    got = segments.topk_count(torch.tensor([0, 1, 3, 10, 100]), 0.3).tolist()
    assert got == [1, 1, 1, 3, 30]
    assert segments.topk_count(torch.tensor([100]), 0.07).tolist() == [7]
    assert math.ceil(0.07 * 100) == 8  # the float trap the tolerance avoids


def test_segmenters_declare_what_they_read_and_get_only_that():
    """The registry hands a segmenter the inputs it declared (a custom one that declares nothing gets all),
    fails on a missing required input naming it, and refuses a declared input no batch holds."""
    from sapo_ray.algo import registry

    seen = {}

    @segments.register_segmenter("test_reads_logprobs", reads=("logprobs",), needs="logprobs")
    def _reads(mask, *, logprobs):
        seen["declared"] = logprobs
        return torch.zeros_like(mask, dtype=torch.bool)

    @segments.register_segmenter("test_reads_all")
    def _all(mask, **inputs):
        seen["all"] = sorted(inputs)
        return torch.zeros_like(mask, dtype=torch.bool)

    try:
        mask = torch.ones(1, 3)
        spec = registry.get_algorithm("sapo").replace(segmenter="test_reads_logprobs")
        registry.make_segments(spec, mask, entropy=torch.ones(1, 3), logprobs=torch.zeros(1, 3))
        assert torch.equal(seen["declared"], torch.zeros(1, 3))
        with pytest.raises(ValueError, match="test_reads_logprobs.*needs logprobs="):
            registry.make_segments(spec, mask, entropy=torch.ones(1, 3))
        assert not registry.needs_token_texts(spec)
        spec = spec.replace(segmenter="test_reads_all")
        registry.make_segments(spec, mask, entropy=torch.ones(1, 3), logprobs=torch.zeros(1, 3))
        assert seen["all"] == ["entropy", "logprobs"] and registry.needs_token_texts(spec)
        with pytest.raises(ValueError, match="reads \\['values'\\], which no batch holds"):
            segments.register_segmenter("test_bad", reads=("values",))
    finally:
        for name in ("test_reads_logprobs", "test_reads_all"):
            del segments.SEGMENTERS[name], segments.SEGMENTER_INPUTS[name]
