"""The weight-bucket payload (`sapo_ray.sync.encode_bucket` / `decode_bucket`): what a bucket becomes to cross
vLLM's msgpack RPC path; the fingerprints that check a sync arrived (`fingerprint`, `check_fingerprints`; the
broken syncs they catch, end to end, are in tests/learner/test_workers.py). Its round trip through vLLM's own encoder and decoder, and a weight update through
the multiprocessing engine, are in tests/rollout/test_vllm_engine.py (they need vllm)."""

from __future__ import annotations

import pytest
import torch

from sapo_ray.errors import StopRun
from sapo_ray.sync import check_fingerprints, decode_bucket, encode_bucket, fingerprint, fingerprints

MSGPACK_NATIVE = (str, int, float, bool, bytes, type(None))


def bucket() -> list[tuple[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, generator=gen)
    return [
        ("w", w),
        ("w_t", w.t()),  # not contiguous
        ("w_bf16", w.to(torch.bfloat16)),  # no numpy dtype
        ("ids", torch.arange(-3, 9, dtype=torch.int64).reshape(3, 4)),
        ("mask", torch.tensor([True, False, True])),
        ("scale", torch.tensor(2.5)),  # 0-d
        ("empty", torch.empty(0, 7)),
        ("param", torch.nn.Parameter(torch.ones(2, 2))),  # requires grad
    ]


def native(obj) -> bool:
    """Whether `obj` is built of msgpack's own types only (what vLLM's untyped decoder gives back as is)."""
    if isinstance(obj, list):
        return all(native(x) for x in obj)
    return isinstance(obj, MSGPACK_NATIVE)


def test_cpu_bucket_round_trips_bit_exactly_as_native_values():
    original = bucket()
    payload = encode_bucket(original)
    assert native(payload)
    assert [e[1] for e in payload] == ["bytes"] * len(original)
    decoded = decode_bucket(payload)
    assert [n for n, _ in decoded] == [n for n, _ in original]
    for (_, a), (_, b) in zip(original, decoded):
        assert (b.dtype, b.shape, b.requires_grad) == (a.dtype, a.shape, False)
        assert torch.equal(raw(a), raw(b))
    # row-major bytes: the transposed tensor travels as its contiguous copy; 4 bytes per float32, 2 per bfloat16
    assert payload[1][4] == raw(original[0][1].t().contiguous()).numpy().tobytes()
    assert (len(payload[0][4]), len(payload[2][4]), len(payload[6][4])) == (6 * 4 * 4, 6 * 4 * 2, 0)


def raw(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits in row-major order."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def test_decode_places_tensors_and_rejects_unknown_kinds():
    (name, t), = decode_bucket(encode_bucket([("x", torch.ones(3))]), device="meta")
    assert name == "x" and t.device.type == "meta"
    with pytest.raises(ValueError, match="'x' has unknown kind 'pickle'"):
        decode_bucket([["x", "pickle", "float32", [3], b""]])


def _open_in_child(payload, queue):
    """In another process (CUDA IPC handles open only there): the tensors' sums and a copy of the first."""
    pairs = decode_bucket(payload, device="cuda")
    queue.put([(name, t.dtype, list(t.shape), float(t.float().sum())) for name, t in pairs] + [pairs[0][1].cpu()])


@pytest.mark.gpu
def test_cuda_bucket_travels_as_ipc_handles_to_another_process():
    """CUDA tensors become IPC handles (msgpack-native: no pickled classes) that another process opens in place."""
    import torch.multiprocessing as mp

    gen = torch.Generator().manual_seed(0)
    cpu = [("a", torch.randn(5, 3, generator=gen)), ("b", torch.randn(8, generator=gen).to(torch.bfloat16)),
           ("c", torch.randn(4, 4, generator=gen).t())]
    cuda = [(n, t.cuda()) for n, t in cpu]
    payload = encode_bucket(cuda)
    assert native(payload) and [e[1] for e in payload] == ["cuda_ipc"] * 3
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_open_in_child, args=(payload, queue))
    child.start()
    *seen, first = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0
    assert [(n, d, s) for n, d, s, _ in seen] == [(n, t.dtype, list(t.shape)) for n, t in cpu]
    assert [s for *_, s in seen] == pytest.approx([float(t.float().sum()) for _, t in cpu], rel=1e-6)
    assert torch.equal(first, cpu[0][1])
    del cuda
    torch.cuda.ipc_collect()


def test_fingerprint_by_hand():
    """`sum_k (k + 1) x[i_k]`: every element of a small tensor; 64 evenly spaced ones of a larger (here the even
    positions of 128, values 2k: 2 * sum_k (k + 1) k = 2 * (85344 + 2016))."""
    assert fingerprint(torch.arange(10.0)) == sum((k + 1) * k for k in range(10)) == 330.0
    assert fingerprint(torch.arange(128.0).reshape(8, 16)) == 174720.0
    assert fingerprint(torch.empty(0, 3)) == 0.0
    assert fingerprint(torch.tensor(2.5)) == 2.5


def test_fingerprint_sees_values_not_dtypes_and_tells_permutations_apart():
    w = torch.randn(300, 7, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert fingerprint(w) == fingerprint(w.float()) == fingerprint(w.double())  # a bf16 weight in a float32 engine
    assert fingerprint(w) != fingerprint(w.flip(0))
    changed = w.clone().reshape(-1)
    changed[3 * 2100 // 64] += 1  # the fourth of the positions sampled of 2,100 elements (k * 2100 // 64)
    assert fingerprint(changed.reshape(300, 7)) != fingerprint(w)


def test_check_fingerprints_names_the_tensor_an_engine_got_wrong():
    sent = fingerprints([("a", torch.ones(3)), ("b", torch.arange(4.0)), ("nan", torch.tensor([float("nan")]))])
    check_fingerprints(sent, {**sent, "buffer": 1.0}, "rollout worker 0")  # more held than sent is fine
    with pytest.raises(StopRun, match="rollout worker 1 does not hold 'b'"):
        check_fingerprints(sent, {"a": sent["a"], "nan": sent["nan"]}, "rollout worker 1")
    with pytest.raises(StopRun, match="rollout worker 0 holds another 'a'"):
        check_fingerprints(sent, {**sent, "a": fingerprint(torch.zeros(3))}, "rollout worker 0")
    with pytest.raises(StopRun, match="holds another 'nan'"):
        check_fingerprints(sent, {**sent, "nan": 0.0}, "rollout worker 0")
