"""Weight broadcast from learner rank 0 to the rollout engines (`rollout.weight_sync=broadcast`).

The default sync (`object_store`) puts each bucket of the gathered weights into Ray's object store
and every rollout worker fetches it. `broadcast` instead joins learner rank 0 (rank 0) and every
engine process (ranks 1..) in a process group of their own, NCCL on GPUs and gloo on CPUs, and
broadcasts each bucket tensor by tensor, as OpenRLHF's and verl's update groups do: on GPUs rank 0
copies each gathered tensor to its GPU once and NCCL carries it to every engine's GPU, with no
serialisation into the object store and no fetch per worker. The group is
built from a `TCPStore` rather than `init_process_group`, so it lives beside the learners' FSDP
group and vLLM's own groups in the same processes.

Both ends agree on the buckets beforehand: `bucket_specs` (names, dtypes, shapes) is computed once
from the gathered state dict and handed to the receivers, who allocate and receive in that order.

Every sync, by either method, is then checked (`check_fingerprints`): the sender fingerprints each tensor
it sends, each engine fingerprints the same names in what it holds once loaded, and a difference stops
the run naming the tensor, so that no step samples from an engine that missed, kept or misplaced a weight.
"""

from __future__ import annotations

import socket
import time
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

from sapo_ray.errors import StopRun
from sapo_ray.net import tcp_store

BucketSpec = list[tuple[str, str, list[int]]]  # (name, dtype name, shape) of each tensor of one bucket
# The values of `rollout.weight_sync` (see `WeightSync`).
SYNC_METHODS = ("object_store", "broadcast")


def bucket_specs(buckets: list[list[tuple[str, torch.Tensor]]]) -> list[BucketSpec]:
    """What a receiver needs to allocate each bucket: `(name, dtype, shape)` per tensor."""
    return [[(name, str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in bucket] for bucket in buckets]


# -- proof of delivery ---------------------------------------------------------------------------------
FINGERPRINT_POINTS = 64  # elements read per tensor: a sync's check costs microseconds per tensor


def fingerprint(tensor: torch.Tensor) -> float:
    """A checksum of a tensor's values: `sum_k (k + 1) * x[i_k]` in float64 over `FINGERPRINT_POINTS`
    evenly spaced flat positions `i_k` (every element of a smaller tensor), the weights telling a
    permutation apart. Exact for the same values in any floating dtype that holds them (a bfloat16 weight
    loaded into a float32 engine keeps its fingerprint), and the same on any device: only the sampled
    elements leave it, and the sum is taken on the CPU."""
    flat = tensor.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return 0.0
    k = min(n, FINGERPRINT_POINTS)
    at = torch.arange(k, dtype=torch.int64) * n // k
    values = flat[at.to(flat.device)].to("cpu", torch.float64)
    return float((values * torch.arange(1, k + 1, dtype=torch.float64)).sum())


def fingerprints(named_tensors) -> dict[str, float]:
    """`fingerprint` of each `(name, tensor)` pair, by name."""
    return {name: fingerprint(tensor) for name, tensor in named_tensors}


def check_fingerprints(sent: dict[str, float], held: dict[str, float], engine: str) -> None:
    """Stop the run unless `engine` holds every tensor of `sent` with the same fingerprint (`held` may name
    more: buffers the learner does not send)."""
    for name, value in sent.items():
        if name not in held:
            raise StopRun(f"weight sync: {engine} does not hold {name!r} after the sync (it never arrived, or "
                          "arrived under another name); no step samples from an engine with stale weights")
        if held[name] != value and not (value != value and held[name] != held[name]):  # NaN holds NaN
            raise StopRun(f"weight sync: {engine} holds another {name!r} than the learner sent (fingerprint "
                          f"{held[name]!r} instead of {value!r}): the tensor was skipped, stale or overwritten; "
                          "no step samples from an engine with stale weights")


# -- a bucket as an RPC payload ------------------------------------------------------------------------
# vLLM's `LLM.collective_rpc` with its engine in another process (VLLM_ENABLE_V1_MULTIPROCESSING=1, vLLM's
# default) msgpack-encodes the arguments and decodes them untyped (`vllm/v1/serial_utils.py`,
# `MsgpackEncoder._encode_tensor` / the engine core's `generic_decoder` in `vllm/v1/engine/core.py`): a
# tensor arrives as a list `[dtype, shape, buffer index]`, not a tensor. A payload made of str, int, bool,
# list and bytes survives that path and the in-process one alike.
PayloadEntry = list  # [name, kind, dtype name, shape, data]; kind "bytes" or "cuda_ipc"


def encode_bucket(bucket: list[tuple[str, torch.Tensor]]) -> list[PayloadEntry]:
    """`(name, tensor)` pairs as msgpack-native entries: a CPU tensor's raw bytes, a CUDA tensor's IPC handle.

    A CUDA entry refers to the sender's memory: keep the tensors alive until the receiver has loaded them
    (`collective_rpc` returns after that), then `torch.cuda.ipc_collect()`.
    """
    out = []
    for name, tensor in bucket:
        tensor = tensor.detach()
        dtype, shape = str(tensor.dtype).removeprefix("torch."), list(tensor.shape)
        if tensor.is_cuda:
            out.append([name, "cuda_ipc", dtype, shape, _ipc_handle(tensor.contiguous())])
        else:
            # A uint8 view keeps the exact bits of every dtype (bfloat16 has no numpy counterpart).
            raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
            out.append([name, "bytes", dtype, shape, raw.tobytes()])
    return out


def decode_bucket(payload: list[PayloadEntry], device: torch.device | str = "cpu") -> list[tuple[str, torch.Tensor]]:
    """The inverse of `encode_bucket`: `(name, tensor)` pairs, byte entries on `device`; an IPC entry opens
    the sender's memory on the GPU it lives on (the same device index: the rollout actor and its engine's
    workers see the same `CUDA_VISIBLE_DEVICES`)."""
    out = []
    for name, kind, dtype, shape, data in payload:
        torch_dtype = getattr(torch, dtype)
        if kind == "cuda_ipc":
            tensor = _open_ipc_handle(torch_dtype, data)
        elif kind == "bytes":
            if len(data) == 0:
                tensor = torch.empty(shape, dtype=torch_dtype)
            else:
                with warnings.catch_warnings():  # msgpack's bytes are read-only; the tensor is only read (copied)
                    warnings.filterwarnings("ignore", message="The given buffer is not writable")
                    tensor = torch.frombuffer(data, dtype=torch.uint8).view(torch_dtype).reshape(shape)
        else:
            raise ValueError(f"weight payload entry {name!r} has unknown kind {kind!r}")
        out.append((name, tensor.to(device)))
    return out


def _ipc_handle(tensor: torch.Tensor) -> list:
    """`torch.multiprocessing.reductions.reduce_tensor`'s arguments for `rebuild_cuda_tensor`, without the
    Python classes and dtype (not msgpack-native; the dtype travels in the entry)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

    rebuild, args = reduce_tensor(tensor)
    assert rebuild is rebuild_cuda_tensor and args[4] is torch.storage.TypedStorage, (rebuild, args[4])
    (_, size, stride, offset, _, _, device, handle, storage_bytes, storage_offset, _, ref_handle, ref_offset,
     event_handle, event_sync) = args
    return [list(size), list(stride), offset, device, handle, storage_bytes, storage_offset, ref_handle, ref_offset,
            event_handle, event_sync]


def _open_ipc_handle(dtype: torch.dtype, args: list) -> torch.Tensor:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    (size, stride, offset, device, handle, storage_bytes, storage_offset, ref_handle, ref_offset, event_handle,
     event_sync) = args
    return rebuild_cuda_tensor(torch.Tensor, tuple(size), tuple(stride), offset, torch.storage.TypedStorage, dtype,
                               device, handle, storage_bytes, storage_offset, False, ref_handle, ref_offset,
                               event_handle, event_sync)


class WeightGroup:
    """One process's membership in the weight-broadcast group (rank 0 sends, the others receive).

    Every member must construct it at the same time (it is a rendezvous on `host:port`, whose store
    rank 0 serves on `listener`, from `sapo_ray.net.listen(host)`) and then take part in every `send` /
    `receive` in the same order.
    """

    def __init__(self, host: str, port: int, rank: int, world_size: int, device: torch.device,
                 listener: socket.socket | None = None, timeout_s: float = 1800.0):
        assert (listener is not None) == (rank == 0), "rank 0, and only rank 0, serves the group's store"
        timeout = timedelta(seconds=timeout_s)
        store = tcp_store(host, port, world_size, listener, timeout)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.group = dist.ProcessGroupNCCL(store, rank, world_size)
        else:
            self.group = dist.ProcessGroupGloo(store, rank, world_size, timeout)
        self.rank = rank

    def send(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        """Broadcast one bucket's tensors from rank 0 (the receivers count the bytes they load)."""
        assert self.rank == 0, "only rank 0 (learner rank 0) sends weights"
        for _, tensor in bucket:
            self._broadcast(tensor.detach().to(self.device).contiguous())

    def receive(self, spec: BucketSpec) -> list[tuple[str, torch.Tensor]]:
        """Receive one bucket described by `spec` into fresh tensors on this member's device."""
        out = []
        for name, dtype, shape in spec:
            buf = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            self._broadcast(buf)
            out.append((name, buf))
        return out

    def _broadcast(self, tensor: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.group.broadcast([tensor], opts).wait()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()


class WeightSync:
    """Pushes the policy's weights from the learner group into the rollout workers (`Trainer.sync_weights`).

    `object_store`: learner rank 0 puts the buckets into Ray's object store, each worker fetches them.
    `broadcast`: at construction every engine process joins a `WeightGroup` with learner rank 0 (ranks
    1.. in worker order, `ranks_per_engine` each: vLLM's tensor-parallel workers) and the bucket specs
    are agreed; each sync then broadcasts the buckets while the workers receive them.
    """

    def __init__(self, actor, rollout: list, method: str, bucket_bytes: int, ranks_per_engine: int = 1, wait=None):
        """`rollout`: the workers (a list the trainer updates in place when it replaces one); `wait(refs,
        workers)`: how results of the workers' calls are awaited (the trainer's bounded wait)."""
        import ray

        if method not in SYNC_METHODS:
            raise ValueError(f"weight sync method {method!r}: choose one of {SYNC_METHODS}")
        self.actor, self.rollout, self.method, self.bucket_bytes = actor, rollout, method, bucket_bytes
        self.wait = wait or (lambda refs, workers=None: ray.get(refs))
        if method == "broadcast":
            host, port = actor.address("weights")
            world_size = 1 + ranks_per_engine * len(rollout)
            refs = [w.init_weight_group.remote(host, port, 1 + i * ranks_per_engine, world_size)
                    for i, w in enumerate(rollout)]
            rank0 = actor.init_weight_group(host, port, world_size)
            self.wait(refs)
            rank0.get()
            self.specs = actor.weight_bucket_specs(bucket_bytes)

    def __call__(self, only: list[int] | None = None) -> dict:
        """One sync into every worker, or the workers `only` lists (object_store), each checked by
        `check_fingerprints`; returns `sync/bytes`, `sync/gb_per_s`, `sync/buckets` and `sync/verified` (1:
        every engine holds what was sent; a mismatch raises `StopRun` instead)."""
        start = time.perf_counter()
        workers = list(range(len(self.rollout))) if only is None else only
        if self.method == "broadcast":
            refs = [self.rollout[i].receive_weights.remote(self.specs) for i in workers]  # in flight before the send
            sent = self.actor.broadcast_weights(self.bucket_bytes)
            n_buckets = len(self.specs)
        else:
            buckets, sent = self.actor.weight_buckets(self.bucket_bytes)
            refs = [self.rollout[i].update_weights.remote(buckets) for i in workers]
            n_buckets = len(buckets)
        nbytes = self.wait(refs, workers)[0][0]
        seconds = time.perf_counter() - start
        held = self.wait([self.rollout[i].weight_fingerprints.remote() for i in workers], workers)
        for i, engine in zip(workers, held):
            check_fingerprints(sent, engine, f"rollout worker {i}")
        return {"sync/bytes": float(nbytes), "sync/gb_per_s": nbytes / 1e9 / max(seconds, 1e-9),
                "sync/buckets": float(n_buckets), "sync/verified": 1.0}
