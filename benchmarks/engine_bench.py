"""Rollout engines side by side: hf vs vllm generation tokens/s and weight-sync time per MB.

Same model (the bundled tiny text LM unless `--model`), same prompts (synthvista text rows), same
batch and sampling settings for both engines; each engine is warmed up once, then timed `--repeats`
times (median). Weight sync loads the model's full state dict (perturbed, float32) through
`engine.update_weights` in buckets of `--bucket-mb`, as the trainer sends it. Prints a markdown table
with the machine and the command.

    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/engine_bench.py            # both engines (CPU)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/engine_bench.py --engines hf    # hf only
    python benchmarks/engine_bench.py --engines hf --device cuda                  # hf on a GPU

vLLM runs here through the community CPU build (`make .venv-vllm`); it cannot be carried to the
lent GPU machine, so GPU numbers exist for the hf engine only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from sapo_ray.utils import bucket_tensors, cpu_model


def _prompts(path: str, n: int):
    from sapo_ray.data.datasets import load_dataset_split
    from sapo_ray.models import load_processor
    from sapo_ray.rollout.engine import encode_prompt

    processor = load_processor(path)
    rows = load_dataset_split("synthvista", None, "train", n=n, seed=0, text_only=True)
    return [encode_prompt(processor, r) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", default="hf,vllm", help="comma-separated: hf, vllm")
    ap.add_argument("--model", default="bundled:tiny-lm")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4, help="responses per prompt (batch = prompts x n)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", type=float, default=4.0)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from sapo_ray.config import ModelConfig, RolloutConfig, RolloutWorkerConfig, resolve_model_path
    from sapo_ray.batch import SamplingParams
    from sapo_ray.rollout.engine import build_engine

    path = resolve_model_path(args.model)
    prompts = _prompts(path, args.prompts)
    rows = []
    for name in [e for e in args.engines.split(",") if e]:
        cfg = RolloutWorkerConfig(ModelConfig(path=path, dtype=args.dtype),
                                  RolloutConfig(engine=name, num_gpus=1.0 if args.device == "cuda" else 0.0,
                                                max_batch_size=args.prompts * args.n, enforce_eager=True),
                                  index=0, seed=0)
        start = time.perf_counter()
        engine = build_engine(cfg)
        init_s = time.perf_counter() - start
        gen_s, tokens = [], []
        for r in range(args.repeats + 1):  # the first call warms up
            params = SamplingParams(n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=r)
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            samples = engine.generate(prompts, params)
            if args.device == "cuda":
                torch.cuda.synchronize()
            if r:
                gen_s.append(time.perf_counter() - start)
                tokens.append(sum(len(s.response_ids) for s in samples))
        from sapo_ray.models import load_policy

        state = {k: v.float() + 0.01 for k, v in load_policy(path).state_dict().items()}
        buckets = bucket_tensors(state, int(args.bucket_mb * 2**20))
        mb = sum(t.numel() * t.element_size() for t in state.values()) / 2**20
        sync_s = []
        for r in range(args.repeats + 1):
            start = time.perf_counter()
            for b in buckets:
                engine.update_weights(b)
            if r:
                sync_s.append(time.perf_counter() - start)
        g, t, s = statistics.median(gen_s), statistics.median(tokens), statistics.median(sync_s)
        rows.append((name, init_s, t, g, t / g, mb, len(buckets), s, s / mb))
        del engine

    try:
        import vllm
        vllm_version = vllm.__version__
    except ImportError:
        vllm_version = "not installed"
    print(f"\nmachine: {cpu_model()}, {os.cpu_count()} cores; device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else "")
          + f"; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; torch {torch.__version__}, vllm {vllm_version}")
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"batch: {args.prompts} prompts x n={args.n}, max_new_tokens={args.max_new_tokens}, "
          f"T={args.temperature}, {args.dtype}; median of {args.repeats} after a warm-up\n")
    print("| engine | init s | response tokens | generate s | tokens/s | weights MB | buckets | sync s | sync s/MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, init_s, t, g, tps, mb, nb, s, spm in rows:
        print(f"| {name} | {init_s:.1f} | {t:.0f} | {g:.3f} | {tps:.0f} | {mb:.1f} | {nb} | {s:.4f} | {spm:.5f} |")


if __name__ == "__main__":
    main()
