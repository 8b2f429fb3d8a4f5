"""Peak memory of generating and of one learner update at Qwen2.5's 151,936-token vocabulary (CPU).

    .venv/bin/python benchmarks/vocab_memory_bench.py [--rows 8] [--steps 128 256 512] [--lengths 512 1024 2048]

A random-init Qwen2 causal LM as narrow as the bundled tiny-lm (hidden 256, 4 blocks) but with the
full vocabulary, so that what grows with `steps x vocab` is the engine's and the learner's handling of
logits, not the model. Each case runs in a fresh process:
- generate: the hf engine (`HFEngine.generate`) samples `--rows` responses of exactly `--steps` tokens
  (no end-of-turn token can stop them: it is banned for this measurement);
- update: `policy_forward` + the token-mean surrogate minus 0 x entropy, backward, on 1 row of
  `--lengths` response tokens (the entropy coefficient 0 of every preset but SAPO's ablations).
Reported: peak resident memory above the built model (MiB), sampled every 2 ms, and for scale the
size of one `[rows, steps, V]` float32 tensor. Run it with `PYTHONPATH` pointing at another checkout
to measure that checkout's code side by side (the entry points used here exist in both).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from checkpointing_bench import MiB, peak_above_now  # noqa: E402

VOCAB = 151_936


def build():
    import torch
    from transformers import AutoConfig

    from sapo_ray.models import load_processor
    from sapo_ray.models.loading import build_from_config
    from sapo_ray.models.processor import _check_dir

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    torch.manual_seed(0)
    path = _check_dir("bundled:tiny-lm")
    config = AutoConfig.from_pretrained(path)
    config.vocab_size = VOCAB
    model = build_from_config(config, torch.float32, "sdpa")
    return model, load_processor(path)


def generate_case(rows: int, steps: int) -> dict:
    import torch

    from sapo_ray.batch import Prompt, SamplingParams
    from sapo_ray.rollout.engine import HFEngine

    model, tokenizer = build()
    engine = HFEngine(model, tokenizer, max_batch_size=rows)
    engine.eos_ids = [VOCAB + 1]  # an id no step can draw: every row runs all `steps`
    prompts = [Prompt(torch.randint(10, 400, (32,), generator=torch.Generator().manual_seed(i)).tolist())
               for i in range(rows)]
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=steps, seed=0)
    engine.generate(prompts[:1], SamplingParams(n=1, temperature=1.0, max_new_tokens=2, seed=0))  # warm-up
    peak, samples = peak_above_now(lambda: engine.generate(prompts, params))
    assert all(len(s.response_ids) == steps for s in samples)
    return {"case": "generate", "rows": rows, "steps": steps, "peak_above_model_mib": round(peak, 1)}


def update_case(length: int) -> dict:
    import torch

    from sapo_ray.batch import Batch, Sample
    from sapo_ray.learner.forward import policy_forward

    model, _ = build()
    model.train()
    gen = torch.Generator().manual_seed(1)
    sample = Sample(torch.randint(0, 1000, (32,), generator=gen).tolist(),
                    torch.randint(0, VOCAB, (length,), generator=gen).tolist(), [0.0] * length, [0.0] * length,
                    "", True, 0)
    batch = Batch.from_samples([sample], pad_id=0)
    # The entropy kept out of the graph when its coefficient is 0, where the code can say so.
    detach = {"entropy_grad": False} if "entropy_grad" in inspect.signature(policy_forward).parameters else {}

    def step() -> None:
        logp, entropy = policy_forward(model, batch, 1.0, None, None, with_entropy=True, **detach)
        mask = batch.response_mask
        loss = -(logp * mask).sum() / mask.sum() - 0.0 * (entropy * mask).sum() / mask.sum()
        loss.backward()

    step()  # allocates the gradients, which the measured step reuses
    model.zero_grad(set_to_none=False)
    peak, _ = peak_above_now(step)
    return {"case": "update", "rows": 1, "steps": length, "peak_above_model_mib": round(peak, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--steps", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--case", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:  # a child: one case
        kind, n = args.case[0], int(args.case[1])
        print(json.dumps(generate_case(args.rows, n) if kind == "generate" else update_case(n)))
        return
    from sapo_ray.utils import cpu_model

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cases = [("generate", n) for n in args.steps] + [("update", n) for n in args.lengths]
    results = []
    for kind, n in cases:
        out = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--case", kind, str(n)],
                             capture_output=True, text=True, env=env)
        if out.returncode:
            results.append({"case": kind, "steps": n, "error": out.stderr.strip().splitlines()[-1]})
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["one_fp32_logits_tensor_mib"] = round(r["rows"] * n * VOCAB * 4 / MiB, 1)
        results.append(r)
        print(json.dumps(r), flush=True)
    import sapo_ray

    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; code: {os.path.dirname(sapo_ray.__file__)}")
    print(json.dumps({"vocab": VOCAB, "results": results}))


if __name__ == "__main__":
    main()
