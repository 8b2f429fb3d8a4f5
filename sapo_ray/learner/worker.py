"""FSDP2 learner workers: the policy (with its frozen reference) and the critic.

Each worker is one rank of a torch.distributed group (gloo on CPU, NCCL on GPU) and wraps its model
with `fully_shard` (every decoder/vision block, then the root). The driver hands each rank an equal
shard of the batch; a mini-batch is `mini_batch_size / world_size` rows per rank, split into
micro-batches whose gradients accumulate before one optimizer step, as in verl.
These classes are plain Python; `sapo_ray.learner.group` turns them into Ray actors.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_model_state_dict, set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from sapo_ray import bookkeeping
from sapo_ray.algo import losses, registry
from sapo_ray.algo.segments import Segments
from sapo_ray.batch import Batch, LogProbs, pack_by_tokens
from sapo_ray.config import LearnerWorkerConfig
from sapo_ray.models import lora
from sapo_ray.learner.forward import policy_forward, value_forward
from sapo_ray.learner.vision import run_vision_in_every_forward
from sapo_ray.net import listen, tcp_store
from sapo_ray.precision import use_bf16
from sapo_ray.utils import bucket_tensors, compute_device, derive_seed, peak_memory_mb, set_threads

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The trained weights, their gradients and AdamW's moments stay float32 whatever `model.dtype` says: a
# bf16 weight cannot take an update below ~1/256 of its size (at lr 1e-6 every step would round to
# nothing). `model.dtype` is the compute dtype (FSDP2's mixed precision on GPUs, autocast on CPUs), the
# frozen reference's and the engines' dtype; weights are cast to it when they are synced or exported.
MASTER_DTYPE = torch.float32
# A checkpoint holds a model's trained parameters (`_checkpoint_state`; frozen ones are `model.path`'s), so
# loading one is not strict: `dcp.load` has already failed on any trained tensor it lacks.
LOAD_TRAINED = StateDictOptions(strict=False)


def _constant(progress: float) -> float:
    return 1.0


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# After warm-up, the multiplier of the base lr as a function of progress in [0, 1] (`optim.schedule`).
LR_SCHEDULES = {"constant": _constant, "cosine": _cosine}


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str):
    """Multiplier of the base learning rate at optimizer step `s`: linear warm-up over `warmup_steps`,
    then `LR_SCHEDULES[schedule]` of the progress to `total_steps` (the role's optimizer steps in the run)."""
    after = LR_SCHEDULES[schedule]

    def f(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        return after(min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps)))
    return f


class FSDPWorker:
    """What the policy and critic ranks share: process group, sharding, optimizer, checkpoints."""

    def __init__(self, rank: int, world_size: int, cfg: LearnerWorkerConfig):
        set_threads(cfg.learner.num_threads)
        self.rank, self.world_size, self.cfg = rank, world_size, cfg
        self.device = compute_device(cfg.learner.num_gpus, f"{cfg.role} rank {rank}")
        # The driver replaces `auto` by its decision (the same cached probe answers here); a worker
        # configured by hand probes this machine.
        self.autocast_bf16 = self.device.type == "cpu" and use_bf16(cfg.learner.autocast_bf16)
        self.model = None
        self.optimizer = None
        self.scheduler = None
        self.skipped_in_a_row = 0  # optimizer steps skipped one after another (non-finite gradients)
        self._listeners = {}  # group name -> the socket its store will serve (`address`)

    # -- process groups ---------------------------------------------------------------------------
    def address(self, group: str) -> tuple[str, int]:
        """This node's address and a port listening on it, which the store of `group` ("learners":
        `init_group`, "weights": `init_weight_group`) will serve on this rank (asked of rank 0)."""
        import ray

        host = ray.util.get_node_ip_address()  # 127.0.0.1 in a local run (sapo_ray.net.loopback_only)
        self._listeners[group] = listen(host)
        return host, self._listeners[group].getsockname()[1]

    def init_group(self, host: str, port: int, timeout_s: float = 3600.0) -> None:
        """Join the group; a collective that waits longer than `timeout_s` (a rank died) raises."""
        from datetime import timedelta

        listener = self._listeners.pop("learners", None)
        assert (listener is not None) == (self.rank == 0), "rank 0 serves the group's store: ask it for `address`"
        timeout = timedelta(seconds=timeout_s)
        store = tcp_store(host, port, self.world_size, listener, timeout)
        # CUDA tensors over NCCL; any CPU tensor a collective meets (counts, DCP metadata) over gloo.
        backend = "cpu:gloo,cuda:nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size, timeout=timeout)

    def _build(self, load, build_empty) -> torch.nn.Module:
        """This rank's model before sharding: the checkpoint (`load()`) on rank 0; elsewhere, when the
        group has several ranks, the same architecture on the meta device (`build_empty()`, no memory),
        whose shards `_shard` fills from rank 0. One process per role reads the checkpoint, and no other
        rank ever holds a full copy (24 full learner loads for the paper's run otherwise)."""
        if self.rank == 0 or self.world_size == 1:
            return load()
        with torch.device("meta"):
            return build_empty()

    def _shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """Shard every decoder/vision block, then the root, onto this rank's device; weights and buffers
        broadcast from rank 0 when the other ranks built on the meta device (`_build`)."""
        distributed = self.world_size > 1
        full = model.state_dict() if distributed and self.rank == 0 else {}
        mp = None
        compute = DTYPES[self.cfg.model.dtype]
        if self.device.type == "cuda" and compute != MASTER_DTYPE:
            mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        # The block classes every Hugging Face model inside declares (the critic wraps one in ValueModel).
        blocks = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
        kwargs = {"mp_policy": mp} if mp else {}
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, **kwargs)
        fully_shard(model, **kwargs)
        if distributed:  # every rank runs the vision blocks' collectives, whatever its rows hold
            run_vision_in_every_forward(model, calls=2 if self.cfg.videos else 1)
        if not distributed:
            return model.to(self.device)
        if self.rank == 0:
            model.to(self.device)
        else:
            model.to_empty(device=self.device)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        # Non-persistent buffers (rotary frequencies) are in no state dict: rank 0 has them computed.
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
        return model

    def _shard_trainable(self, model: torch.nn.Module) -> torch.nn.Module:
        """The trained model of this group: vision tower frozen when `freeze_vision_tower`, activations
        recomputed in the backward pass when `model.gradient_checkpointing`, adapters in place of full
        training with `lora.rank` (the frozen base then held in `model.dtype`), then sharded."""
        if self.cfg.learner.freeze_vision_tower:
            from sapo_ray.models import freeze_vision_tower

            freeze_vision_tower(model)
        if self.cfg.model.gradient_checkpointing:
            # Non-reentrant checkpointing: the variant that composes with FSDP2 and frozen inputs.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.cfg.learner.lora.rank:
            model = lora.add_adapters(model, self.cfg.learner.lora, base_dtype=DTYPES[self.cfg.model.dtype])
        return self._shard(model)

    def _autocast(self):
        """On a CPU rank, autocast around a forward pass: to `model.dtype` when that is a 16-bit type (the
        weights stay float32), or to bf16 when `autocast_bf16` says so for this CPU. GPUs compute in bf16
        through FSDP2."""
        if self.device.type != "cpu":
            return contextlib.nullcontext()
        dtype = DTYPES[self.cfg.model.dtype]
        if dtype != torch.float32:
            return torch.autocast("cpu", dtype=dtype)
        if self.autocast_bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _seed_init(self) -> None:
        """Every rank of a role draws the same fresh weights (FSDP shards one model, not several)."""
        torch.manual_seed(derive_seed(self.cfg.seed, "init", self.cfg.role))

    def _make_optimizer(self) -> None:
        opt = self.cfg.learner.optim
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(opt.warmup_steps, self.cfg.optimizer_steps, opt.schedule))

    def lr(self) -> float:
        """The learning rate of the next optimizer step."""
        return self.scheduler.get_last_lr()[0]

    def _minibatches(self, batch: Batch):
        """This rank's mini-batches for one `update`: `ppo_epochs` passes over `batch`, each cut into
        `mini_batch_size / world_size` rows, in a fresh seeded order per pass when `shuffle` is set."""
        for rows in self._minibatch_rows(batch):
            yield batch.select(rows)

    def _minibatch_rows(self, batch: Batch) -> list[list[int]]:
        """The rows of `_minibatches`, pass after pass (the order seeded by the optimizer step count)."""
        g = self.cfg.learner
        mini = max(1, g.mini_batch_size // self.world_size)
        seed = derive_seed(self.cfg.seed, "shuffle", self.cfg.role, int(self.scheduler.last_epoch))
        gen = torch.Generator().manual_seed(seed)
        rows = []
        for _ in range(g.ppo_epochs):
            order = torch.randperm(len(batch), generator=gen) if g.shuffle else torch.arange(len(batch))
            rows += [order[m0 : m0 + mini].tolist() for m0 in range(0, len(batch), mini)]
        return rows

    def _micro_rows(self, batch: Batch) -> list[list[int]]:
        """The rows of each micro-batch: `micro_batch_size` at a time, or packed by length into
        `max_tokens_per_micro_batch` (as many micro-batches on every rank: each is a collective pass).
        With `layout=shared_prompt`, a prompt's samples side by side (the gradient of a mini-batch does
        not depend on how its rows are cut)."""
        g = self.cfg.learner
        together = batch.distinct_prompts()[1] if g.layout == "shared_prompt" else None
        if not g.max_tokens_per_micro_batch:
            order = list(range(len(batch))) if together is None else torch.argsort(together, stable=True).tolist()
            return [order[s : s + g.micro_batch_size] for s in range(0, len(batch), g.micro_batch_size)]
        prompts, responses = batch.prompt_mask.sum(1).tolist(), batch.sequence_mask.sum(1).tolist()
        together = None if together is None else together.tolist()
        rows = pack_by_tokens(prompts, responses, g.max_tokens_per_micro_batch, together=together)
        if self.world_size > 1:
            t = torch.tensor(len(rows), device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if int(t) > len(rows):  # another rank needs more: split to its count
                rows = pack_by_tokens(prompts, responses, g.max_tokens_per_micro_batch, int(t), together)
        return rows

    def _first_pass_rows(self, batch: Batch) -> list[list[int]]:
        """The rows of each micro-batch of `update`'s first pass over `batch` (its first mini-batches, before
        any optimizer step), as indices into `batch`."""
        rows, seen = [], 0
        for index in self._minibatch_rows(batch):
            if seen >= len(batch):  # the second pass (`ppo_epochs`) comes after optimizer steps
                break
            rows += [[index[r] for r in micro] for micro in self._micro_rows(batch.select(index))]
            seen += len(index)
        return rows

    def _layout(self, training: bool) -> str:
        """The forward passes' `learner.layout`; padded rows instead of a shared prompt's cache in a
        backward pass that recomputes activations."""
        layout = self.cfg.learner.layout
        if layout == "shared_prompt" and training and self.cfg.model.gradient_checkpointing:
            return "padded"
        return layout

    def _micro_batches(self, batch: Batch) -> list[Batch]:
        return [batch.select(rows) for rows in self._micro_rows(batch)]

    def _forward_rows(self, batch: Batch, forward, micro_rows: list[list[int]] | None = None) -> list[torch.Tensor | None]:
        """`forward(micro) -> (tensors [rows, R_micro], or None)` over the micro-batches (`micro_rows`, by default
        `_micro_rows(batch)`; no gradient), each output put back together as `[B, R]` in the batch's row order."""
        R = batch.response_ids.shape[1]
        out: list[torch.Tensor | None] = []
        for rows in self._micro_rows(batch) if micro_rows is None else micro_rows:
            with self._autocast():
                parts = forward(self._to_device(batch.select(rows)))
            out = out or [None if part is None else torch.zeros(len(batch), R) for part in parts]
            for full, part in zip(out, parts):
                if part is not None:
                    full[rows, : part.shape[1]] = part.float().cpu()
        return out

    def _optimizer_step(self) -> tuple[float, bool]:
        """Clip, then step unless the gradient is not finite (a bad batch must not destroy the model)."""
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.learner.optim.max_grad_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        norm = float(norm)
        ok = math.isfinite(norm)
        self.skipped_in_a_row = 0 if ok else self.skipped_in_a_row + 1
        if ok:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm, ok

    def _token_ids(self):
        from sapo_ray.models import load_processor
        from sapo_ray.models.tokens import TokenIds

        processor = load_processor(self.cfg.model.path)
        return TokenIds.of(getattr(processor, "tokenizer", processor))

    def _global_count(self, local: torch.Tensor | float) -> float:
        """`sum over ranks / world_size`: the denominator that makes FSDP's gradient average exact.
        The tensor lives on the rank's device: an NCCL group reduces CUDA tensors only."""
        t = torch.tensor(float(local), dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t)
        return max(float(t) / self.world_size, 1e-8)

    def _global_units(self, batch: Batch, agg: str) -> float:
        """Tokens, non-empty rows or segments of `batch` (summed over ranks), as `agg` averages over."""
        mask = batch.response_mask
        seg = Segments.from_end_mask(batch.seg_end.bool(), mask) if losses.LOSS_AGGS[agg].needs_segments else None
        return self._global_count(losses.agg_units(agg, mask, seg))

    def _to_device(self, batch: Batch) -> Batch:
        return batch if self.device.type == "cpu" else batch.to(self.device)

    # -- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self, path: str) -> None:
        """The trained parameters and their optimizer state, sharded (torch.distributed.checkpoint), and the LR
        schedule position. Frozen weights (a LoRA policy's base, a frozen vision tower) are left out: they are
        `model.path`'s, and a resumed run loads them from there."""
        dcp.save(self._checkpoint_state(), checkpoint_id=path)
        if self.rank == 0:
            Path(path, "scheduler.json").write_text(json.dumps(self.scheduler.state_dict()))

    def load_checkpoint(self, path: str) -> None:
        state = self._checkpoint_state()
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=LOAD_TRAINED)
        self.scheduler.load_state_dict(json.loads(Path(path, "scheduler.json").read_text()))

    def _checkpoint_state(self) -> dict:
        """The model's trained tensors and the optimizer's state, as a checkpoint holds them: every name of a
        frozen parameter is left out, a tied alias included (a LoRA policy's `lm_head.weight`)."""
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        frozen = {n for n, p in self.model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        return {"model": {k: v for k, v in model_sd.items() if k not in frozen}, "optim": optim_sd}

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The unsharded weights on rank 0 (CPU); every rank must call it (it is a collective)."""
        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.rank == 0 else None

    # -- memory hand-off between colocated phases -----------------------------------------------------
    def onload(self) -> None:
        """Before the step's learner phases: bring offloaded state back to the GPU (`learner.offload`)."""
        self._move_states(self.device)

    def offload(self) -> None:
        """After them: move the state to CPU memory when `learner.offload` is set, and hand the caching
        allocator's free blocks back to the driver either way, for the engines to wake up into."""
        self._move_states(torch.device("cpu"))
        self.release_cache()

    def release_cache(self) -> None:
        """Hand the caching allocator's free blocks (the update's activations and logits) back to the GPU:
        before a weight sync wakes a colocated engine, whose weights and KV cache must fit beside the
        learners' resident state, not beside their update peak too (`sapo_ray.plan`, phase `sync`)."""
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()

    def _move_states(self, device: torch.device) -> None:
        if not (self.cfg.learner.offload and self.device.type == "cuda"):
            return
        for module in filter(None, (self.model, getattr(self, "ref", None))):
            module.to(device)
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                for key, value in state.items():
                    # AdamW's step counters live on the CPU (its non-capturable kernels expect them there).
                    if torch.is_tensor(value) and key != "step":
                        state[key] = value.to(device, non_blocking=True)
        if device.type == "cpu":
            torch.cuda.synchronize()

    def ready(self) -> bool:
        return True

    def peak_memory_mb(self) -> dict[str, float]:
        return peak_memory_mb()

    def gpu_memory_mb(self) -> float:
        """GPU memory this rank's tensors hold now (MB); 0 on a CPU rank."""
        return torch.cuda.memory_allocated() / 2**20 if self.device.type == "cuda" else 0.0


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


class PolicyWorker(FSDPWorker):
    """A rank of the policy: log-probs/entropies, reference log-probs, PPO updates, weight export."""

    def setup(self) -> None:
        from sapo_ray.models import load_policy
        from sapo_ray.models.loading import empty_policy

        m = self.cfg.model
        self._seed_init()
        ids = self._token_ids()
        # On the device once: the scoring moves it to the logits' device in every 128-position piece.
        self.banned = torch.tensor(ids.banned, dtype=torch.long, device=self.device)
        self.vision_tokens = ids.vision
        model = lambda dtype: self._build(
            lambda: load_policy(m.path, dtype=dtype, attn_implementation=m.attn_implementation),
            lambda: empty_policy(m.path, dtype, m.attn_implementation))
        self.model = self._shard_trainable(model(MASTER_DTYPE))
        self.ref = None
        if self.cfg.needs_ref and not self.cfg.learner.lora.rank:  # with LoRA: the policy, adapters off
            ref = model(DTYPES[m.dtype])  # frozen: no master copy needed
            ref.requires_grad_(False)
            self.ref = self._shard(ref).eval()
        self._make_optimizer()
        self.trace: losses.LossTrace | None = None

    def loss_trace(self) -> losses.LossTrace:
        """What the loss saw of this rank's rows in the last `update` (`trace_loss`)."""
        if self.trace is None:
            raise RuntimeError("no loss trace: the policy traces its updates with trace_loss (trainer.dump_rollouts)")
        return self.trace

    @torch.no_grad()
    def compute_logprobs(self, batch: Batch, model: Literal["policy", "reference"] = "policy") -> LogProbs:
        """Log-probs and entropies under the policy, or log-probs under the frozen reference ([B, R] each)."""
        if model not in ("policy", "reference"):
            raise ValueError(f"compute_logprobs(model={model!r}): 'policy' or 'reference'")
        policy = model == "policy"
        module = self.model if policy or self.ref is None else self.ref
        module.eval()
        # The policy's old log-probs are computed as `update`'s first pass will compute the new ones (the same
        # micro-batches, layout and precision): the first ratio is exactly 1, not 1 up to the rounding of
        # matmuls of other shapes.
        layout = self._layout(training=policy)

        def forward(micro: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
            return policy_forward(module, micro, self.cfg.rollout.temperature, self.banned, self.vision_tokens,
                                  with_entropy=policy, layout=layout)

        base = contextlib.nullcontext() if policy or self.ref is not None else lora.adapters_off(self.model)
        with base:
            return LogProbs(*self._forward_rows(batch, forward, self._first_pass_rows(batch) if policy else None))

    def update(self, batch: Batch) -> dict[str, float]:
        """PPO epochs x mini-batches x micro-batches of the algorithm's policy loss at its ratio level.

        Micro-batch losses are normalised by the whole mini-batch's unit count (tokens, rows or
        segments, summed over ranks), so accumulation and data parallelism give the gradient of
        one big batch.
        """
        self.model.train()
        stats: dict[str, list[float]] = {}
        if self.cfg.trace_loss:
            R = batch.response_ids.shape[1]
            self.trace = losses.LossTrace(torch.zeros(len(batch), R), torch.zeros(len(batch), R, dtype=torch.bool))
        # Without recomputed old log-probs, the first mini-batch's pass (before any optimizer step) is where the
        # learner scores the engine's tokens with the weights the engine was sent: the engine-learner gap.
        gap: list[tuple[torch.Tensor, torch.Tensor]] = []  # (learner, engine) log-probs of those tokens
        for i, index in enumerate(self._minibatch_rows(batch)):
            measured = gap if i == 0 and not self.cfg.learner.recompute_old_logp else None
            for k, v in self._update_minibatch(batch.select(index), index, measured).items():
                stats.setdefault(k, []).append(v)
        out = {k: _mean(v) for k, v in stats.items()}
        if gap:
            learner, engine = (torch.cat(x) for x in zip(*gap))
            out.update(bookkeeping.logp_gap(learner, engine, torch.ones_like(learner, dtype=torch.bool)))
        out["actor/pg_loss"] = out.pop("actor/pg_loss_sum")
        out["actor/skipped_steps"] = float(sum(stats["actor/skipped_steps"]))
        out["actor/skipped_in_a_row"] = float(self.skipped_in_a_row)
        out["actor/grad_norm_max"] = max(stats["actor/grad_norm"])
        out["actor/lr"] = self.lr()
        return out

    def _update_minibatch(self, minibatch: Batch, index: list[int], gap: list | None = None) -> dict[str, float]:
        """Accumulate the micro-batches' gradients, then one optimizer step; the mini-batch's metrics. With
        `trace_loss`, what the loss saw of rows `index` (of the update's batch) goes into `self.trace`; with
        `gap`, the learner's and the engine's log-probs of its tokens are appended to it."""
        spec = self.cfg.algorithm
        units: dict[str, float] = {}  # each aggregation's count once: one all-reduce each, however often it is used
        count = lambda agg: units[agg] if agg in units else units.setdefault(agg, self._global_units(minibatch, agg))
        denom, tokens = count(spec.loss_agg), count("token_mean")
        kl_active = spec.kl_loss and spec.kl_loss_coef > 0
        kl_denom = count(losses.LOSS_AGGS[spec.loss_agg].kl_agg or spec.loss_agg) if kl_active else None
        stats: dict[str, list[float]] = {}
        for rows in self._micro_rows(minibatch):
            micro = self._to_device(minibatch.select(rows))
            with self._autocast():
                # The entropy is always reported; it joins the graph only when it is in the loss.
                logp, entropy = policy_forward(self.model, micro, self.cfg.rollout.temperature, self.banned,
                                               self.vision_tokens, with_entropy=True,
                                               entropy_grad=spec.entropy_coef > 0,
                                               layout=self._layout(True))
            mask = micro.response_mask
            if gap is not None:
                gap.append((logp.detach()[mask.bool()].float().cpu(), micro.rollout_logp[mask.bool()].float().cpu()))
            seg = Segments.from_end_mask(micro.seg_end.bool(), mask) if spec.needs_segments else None
            loss, m = registry.policy_loss(spec, logp, micro.old_logp, micro.advantages, mask, segments=seg,
                                           is_weights=micro.is_weights if self.cfg.rollout.tis_cap > 0 else None,
                                           norm_len=self.cfg.response_tokens, agg_denom=denom)
            if self.cfg.trace_loss:  # the row's last pass wins (`ppo_epochs`)
                t = registry.loss_trace(spec, logp, micro.old_logp, micro.advantages, mask, seg)
                at, width = [index[r] for r in rows], t.log_ratio.shape[1]
                self.trace.log_ratio[at, :width] = t.log_ratio.float().cpu()
                self.trace.held[at, :width] = t.held.cpu()
            m = {f"actor/{k}": float(v) for k, v in m.items()}
            m["actor/pg_loss_sum"] = float(loss.detach())  # a share of the mini-batch's loss
            if kl_active:
                kl_term = registry.kl_loss(spec, logp, micro.ref_logp, mask, agg_denom=kl_denom,
                                           norm_len=self.cfg.response_tokens)
                loss = loss + kl_term
                m["actor/kl_loss"] = float(kl_term.detach())
            entropy_sum = losses.masked_sum(entropy, mask)
            if spec.entropy_coef > 0:
                loss = loss - spec.entropy_coef * entropy_sum / tokens
            m["actor/entropy"] = float(entropy_sum.detach()) / float(mask.sum().clamp(min=1))
            m["actor/padding_ratio"] = micro.padding_ratio()
            loss.backward()
            for k, v in m.items():
                stats.setdefault(k, []).append(v)
        norm, ok = self._optimizer_step()
        out = {k: (sum(v) if k == "actor/pg_loss_sum" else _mean(v)) for k, v in stats.items()}
        return {**out, "actor/grad_norm": norm, "actor/skipped_steps": 0.0 if ok else 1.0}

    def engine_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full weights in the engines' dtype (`model.dtype`) on rank 0; a collective like `full_state_dict`."""
        sd = self.full_state_dict()
        if sd is not None and self.cfg.learner.lora.rank:  # the engines serve the base architecture
            sd = lora.merged_state_dict(sd, lora.adapter_scale(self.cfg.learner.lora))
        dtype = DTYPES[self.cfg.model.dtype]
        return None if sd is None else {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}

    def sync_state_dict(self) -> dict[str, torch.Tensor] | None:
        """What a weight sync sends (rank 0; a collective): the LoRA adapters alone when the engines hold the base
        (`sync_adapters`), gathered in `model.dtype` without the frozen weights; else `engine_state_dict`."""
        if not self.cfg.sync_adapters:
            return self.engine_state_dict()
        from torch.distributed.tensor import DTensor

        dtype, out = DTYPES[self.cfg.model.dtype], {}
        for name, param in self.model.named_parameters():
            if lora.is_adapter(name):
                full = param.full_tensor() if isinstance(param, DTensor) else param  # an all-gather per adapter
                out[name] = full.detach().to("cpu", dtype)
        return out if self.rank == 0 else None

    def weight_buckets(self, bucket_bytes: int) -> tuple[list, dict[str, float]] | None:
        """Gather the full weights and `ray.put` them in buckets of at most `bucket_bytes`, with their
        fingerprints (`sapo_ray.sync.fingerprints`; rank 0 only)."""
        import ray

        from sapo_ray.sync import fingerprints

        sd = self.sync_state_dict()
        if sd is None:
            return None
        return [ray.put(bucket) for bucket in bucket_tensors(sd, bucket_bytes)], fingerprints(sd.items())

    # `rollout.weight_sync=broadcast` (sapo_ray.sync): rank 0 is rank 0 of the weight-broadcast group.
    def init_weight_group(self, host: str, port: int, world_size: int) -> None:
        from sapo_ray.sync import WeightGroup

        self.weight_group = WeightGroup(host, port, 0, world_size, self.device, self._listeners.pop("weights"))

    def weight_bucket_specs(self, bucket_bytes: int) -> list | None:
        """The buckets `broadcast_weights` sends, as `(name, dtype, shape)` lists (rank 0; a collective)."""
        from sapo_ray.sync import bucket_specs

        sd = self.sync_state_dict()
        return None if sd is None else bucket_specs(bucket_tensors(sd, bucket_bytes))

    def broadcast_weights(self, bucket_bytes: int) -> dict[str, float] | None:
        """Gather the full weights (every rank) and broadcast them bucket by bucket from rank 0; their
        fingerprints (rank 0)."""
        from sapo_ray.sync import fingerprints

        sd = self.sync_state_dict()
        if sd is None:
            return None
        for bucket in bucket_tensors(sd, bucket_bytes):
            self.weight_group.send(bucket)
        return fingerprints(sd.items())

    def export_hf(self, out_dir: str) -> None:
        """Save the policy as a Hugging Face directory (safetensors in `model.dtype` + processor files) on rank 0."""
        from sapo_ray.models import load_processor

        sd = self.engine_state_dict()
        if self.rank == 0:
            self.model.save_pretrained(out_dir, state_dict=sd, safe_serialization=True)
            load_processor(self.cfg.model.path).save_pretrained(out_dir)


class CriticWorker(FSDPWorker):
    """A rank of the critic: values at every response position and the clipped value loss at anchors."""

    def setup(self) -> None:
        from sapo_ray.models.value import ValueModel

        m = self.cfg.model
        self._seed_init()
        self.vision_tokens = self._token_ids().vision
        path = m.critic_path or m.path
        self.model = self._shard_trainable(self._build(
            lambda: ValueModel.from_pretrained(path, dtype=MASTER_DTYPE, attn_implementation=m.attn_implementation),
            lambda: ValueModel.empty(path, dtype=MASTER_DTYPE, attn_implementation=m.attn_implementation)))
        self._make_optimizer()

    @torch.no_grad()
    def compute_values(self, batch: Batch) -> torch.Tensor:
        """The value at every response position `[B, R]` (0 on padding)."""
        self.model.eval()
        layout = self._layout(False)
        values, = self._forward_rows(batch, lambda micro: (value_forward(self.model, micro, self.vision_tokens, layout),))
        return values * batch.response_mask

    def update(self, batch: Batch) -> dict[str, float]:
        """Clipped value loss on `value_mask` positions (segment anchors for SAPO, every token for PPO)."""
        self.model.train()
        stats: dict[str, list[float]] = {}
        for minibatch in self._minibatches(batch):
            denom = self._global_count(minibatch.value_mask.sum())
            loss_sum = 0.0
            for micro in self._micro_batches(minibatch):
                micro = self._to_device(micro)
                with self._autocast():
                    values = value_forward(self.model, micro, self.vision_tokens, self._layout(True))
                loss, m = losses.value_loss(values, micro.values, micro.returns, micro.value_mask, clip=self.cfg.algorithm.value_clip,
                                            agg_denom=denom)
                loss.backward()
                loss_sum += float(loss.detach())
                for k, v in m.items():
                    stats.setdefault(f"critic/{k}", []).append(float(v))
                stats.setdefault("critic/padding_ratio", []).append(micro.padding_ratio())
            norm, ok = self._optimizer_step()
            stats.setdefault("critic/vf_loss", []).append(loss_sum)
            stats.setdefault("critic/grad_norm", []).append(norm)
            stats.setdefault("critic/skipped_steps", []).append(0.0 if ok else 1.0)
        out = {k: _mean(v) for k, v in stats.items()}
        out["critic/skipped_steps"] = float(sum(stats["critic/skipped_steps"]))
        out["critic/skipped_in_a_row"] = float(self.skipped_in_a_row)
        out["critic/lr"] = self.lr()
        return out
