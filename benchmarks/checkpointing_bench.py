"""Gradient checkpointing on and off: peak memory and time of one learner forward + backward.

    .venv/bin/python benchmarks/checkpointing_bench.py [--config bundled:configs/qwen2_5_vl_3b] [--layers 4]
        [--rows 2] [--prompt 256] [--response 256]

Builds the architecture of `--config` (random weights, full width, the decoder cut to `--layers` blocks
and the vision tower to one), then runs the learner's own path (`sapo_ray.learner.forward.policy_forward`,
the token-mean policy-gradient surrogate, backward) on `--rows` text rows of `--prompt` + `--response`
tokens, once per setting, each in a fresh process: peak resident memory above the built model, and
the seconds of the step (the second one: the first allocates the gradients; the resident set is sampled
every 2 ms with large tensors unmapped when freed). Next to it, the memory plan's activation estimate for the same tokens
(`sapo_ray.plan.activation_bytes`, bf16; this runs float32, so twice that is the comparable number).
Prints a Markdown table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

MiB = 2**20


def one(args) -> dict:
    """One setting in this process: build, measure the baseline, run the step, measure again."""
    import torch
    from transformers import AutoConfig

    from sapo_ray.batch import Batch, Sample
    from sapo_ray.learner.forward import policy_forward
    from sapo_ray.models.loading import build_from_config
    from sapo_ray.models.processor import _check_dir

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(_check_dir(args.config))
    config.text_config.num_hidden_layers = args.layers
    config.vision_config.depth = 1
    config.vision_config.fullatt_block_indexes = [0]
    model = build_from_config(config, torch.float32, "sdpa").train()
    # The (tied) 151,936 x 2048 embedding's gradient temporaries (~2.4 GiB in float32) would hide the
    # activations: freeze it, as the difference checkpointing makes is in the blocks.
    model.get_input_embeddings().requires_grad_(False)
    model.get_output_embeddings().requires_grad_(False)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vocab = config.text_config.vocab_size
    gen = torch.Generator().manual_seed(1)
    samples = [Sample(torch.randint(0, 1000, (args.prompt,), generator=gen).tolist(),
                      torch.randint(0, 1000, (args.response,), generator=gen).tolist(),
                      [0.0] * args.response, [0.0] * args.response, "", True, i) for i in range(args.rows)]
    batch = Batch.from_samples(samples, pad_id=0)

    def step() -> float:
        start = time.perf_counter()
        logp, _ = policy_forward(model, batch, 1.0, None, None, with_entropy=False)
        loss = -(logp * batch.response_mask).sum() / batch.response_mask.sum()
        loss.backward()
        return time.perf_counter() - start

    step()  # allocates the gradients, which the measured step reuses
    model.zero_grad(set_to_none=False)
    peak, seconds = peak_above_now(step)
    return {"checkpointing": args.checkpointing, "peak_above_model_mib": round(peak, 1),
            "seconds": round(seconds, 2), "vocab": vocab}


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def peak_above_now(fn):
    """`(peak resident MiB above the current resident set while fn runs, fn())`: the resident set is
    sampled every 2 ms (run with MALLOC_MMAP_THRESHOLD_ set so that freed large tensors leave it)."""
    base = rss_mib()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    return peak[0] - base, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="bundled:configs/qwen2_5_vl_3b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--response", type=int, default=256)
    ap.add_argument("--checkpointing", type=int, default=-1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.checkpointing >= 0:  # a child: one setting
        args.checkpointing = bool(args.checkpointing)
        print(json.dumps(one(args)))
        return
    from sapo_ray.plan import activation_bytes, model_shape
    from sapo_ray.utils import cpu_model

    shape = model_shape(args.config)
    tokens = args.rows * (args.prompt + args.response)
    rows = []
    for ckpt in (0, 1):
        # Large tensors mmapped and unmapped when freed: the resident set then follows the live tensors.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--checkpointing", str(ckpt)],
                             capture_output=True, text=True, check=True, env=env)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        cut = shape.__class__(**{**shape.__dict__, "layers": args.layers})
        result["plan_activations_fp32_mib"] = round(2 * activation_bytes(cut, tokens, bool(ckpt)) / MiB, 1)
        rows.append(result)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
          f"{args.config} cut to {args.layers} decoder blocks, float32, {args.rows} x ({args.prompt} + "
          f"{args.response}) tokens\n")
    print("| gradient checkpointing | peak RSS above the model (MiB) | plan's activations, fp32 (MiB) | seconds |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {'on' if r['checkpointing'] else 'off'} | {r['peak_above_model_mib']} | "
              f"{r['plan_activations_fp32_mib']} | {r['seconds']} |")
    print(json.dumps({"config": args.config, "layers": args.layers, "tokens": tokens, "results": rows}))


if __name__ == "__main__":
    main()
