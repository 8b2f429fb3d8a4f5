"""The rollout worker: a Ray actor that owns one engine and receives weights after every update."""

from __future__ import annotations

import time

import ray

from sapo_ray.batch import Sample
from sapo_ray.rollout.engine import Prompt, SamplingParams, build_engine
from sapo_ray.utils import peak_memory_mb, set_threads


class RolloutWorker:
    def __init__(self, cfg: dict, num_threads: int):
        import torch

        from sapo_ray.models import load_policy, load_processor
        from sapo_ray.models.processor import banned_token_ids

        set_threads(num_threads)
        processor = load_processor(cfg["path"])
        tokenizer = getattr(processor, "tokenizer", processor)
        vocab = tokenizer.get_vocab()
        device = "cuda" if cfg.get("use_gpu") and torch.cuda.is_available() else "cpu"
        model = load_policy(cfg["path"], dtype=getattr(torch, cfg["dtype"]),
                            attn_implementation=cfg["attn_implementation"]).to(device)
        eos = [vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab] or [tokenizer.eos_token_id]
        self.engine = build_engine(
            cfg["engine"], model=model, tokenizer=tokenizer, banned_ids=banned_token_ids(tokenizer),
            eos_ids=eos, pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0],
            image_token_id=vocab.get("<|image_pad|>"), max_batch_size=cfg["max_batch_size"],
        )

    def generate(self, prompts: list[Prompt], params: SamplingParams, index_offset: int = 0) -> list[Sample]:
        samples = self.engine.generate(prompts, params)
        for s in samples:
            s.prompt_index += index_offset
        return samples

    def update_weights(self, bucket_refs: list) -> tuple[int, float]:
        """Load bucketed weights (each a Ray object of `(name, tensor)` pairs); returns (bytes, seconds)."""
        start = time.perf_counter()
        total = 0
        for ref in bucket_refs:
            total += self.engine.update_weights(ray.get(ref))
        return total, time.perf_counter() - start

    def ready(self) -> bool:
        return True

    def peak_memory_mb(self) -> float:
        return peak_memory_mb()
