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
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist

BucketSpec = list[tuple[str, str, list[int]]]  # (name, dtype name, shape) of each tensor of one bucket
# The values of `rollout.weight_sync` (see `WeightSync`).
SYNC_METHODS = ("object_store", "broadcast")


def bucket_specs(buckets: list[list[tuple[str, torch.Tensor]]]) -> list[BucketSpec]:
    """What a receiver needs to allocate each bucket: `(name, dtype, shape)` per tensor."""
    return [[(name, str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in bucket] for bucket in buckets]


class WeightGroup:
    """One process's membership in the weight-broadcast group (rank 0 sends, the others receive).

    Every member must construct it at the same time (it is a rendezvous on `host:port`, whose store
    rank 0 serves) and then take part in every `send` / `receive` in the same order.
    """

    def __init__(self, host: str, port: int, rank: int, world_size: int, device: torch.device,
                 timeout_s: float = 1800.0):
        timeout = timedelta(seconds=timeout_s)
        store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
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

    def __init__(self, actor, rollout: list, method: str, bucket_bytes: int, ranks_per_engine: int = 1):
        import ray

        if method not in SYNC_METHODS:
            raise ValueError(f"weight sync method {method!r}: choose one of {SYNC_METHODS}")
        self.actor, self.rollout, self.method, self.bucket_bytes = actor, rollout, method, bucket_bytes
        if method == "broadcast":
            host, port = ray.get(actor.workers[0].address.remote())
            world_size = 1 + ranks_per_engine * len(rollout)
            refs = [w.init_weight_group.remote(host, port, 1 + i * ranks_per_engine, world_size)
                    for i, w in enumerate(rollout)]
            ray.get(refs + [actor.workers[0].init_weight_group.remote(host, port, world_size)])
            self.specs = actor.call("weight_bucket_specs", bucket_bytes)[0]

    def __call__(self) -> dict:
        """One sync; returns `sync/bytes`, `sync/gb_per_s` and `sync/buckets`."""
        import ray

        start = time.perf_counter()
        if self.method == "broadcast":
            refs = [w.receive_weights.remote(self.specs) for w in self.rollout]  # in flight before the send
            self.actor.call("broadcast_weights", self.bucket_bytes)
            n_buckets = len(self.specs)
        else:
            buckets = [b for part in self.actor.call("weight_buckets", self.bucket_bytes) for b in part]
            refs = [w.update_weights.remote(buckets) for w in self.rollout]
            n_buckets = len(buckets)
        nbytes = ray.get(refs)[0][0]
        seconds = time.perf_counter() - start
        return {"sync/bytes": float(nbytes), "sync/gb_per_s": nbytes / 1e9 / max(seconds, 1e-9),
                "sync/buckets": float(n_buckets)}
