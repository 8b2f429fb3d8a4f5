"""How much learning signal a warm start gives RL on SynthVista, per template.

    .venv/bin/python benchmarks/warm_start_bench.py bundled:tiny-vlm [other model dirs ...]

For each model: `--prompts` train-split items (as RL samples them: no hint, no instruction), `--k`
samples each at the rollout's temperature 1 from the hf engine, scored by the trainer's reward. Per
template it prints

- `values`, `colours`: share of responses whose first step (reading the picture) has the reference's
  numbers (shapes for `count`) / colour words, in order;
- `shortcut`: share that take the sloppy teacher's procedure (`synthvista.question_answer_solution(...,
  shortcut=True)`), told by the one word where the two procedures branch;
- `pass@1`, `pass@k` (the unbiased estimator of Chen et al. 2021, arXiv:2107.03374);
- `no signal`: the probability that a group of `--group` samples of an item is all right or all wrong
  (drawn without replacement from its k samples), averaged over items: the groups a group baseline
  gives nothing to learn from.

A JSON summary (per model, per template) ends the output; `--out` writes it to a file too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from math import comb

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

from sapo_ray.batch import SamplingParams  # noqa: E402
from sapo_ray.config import resolve_model_path  # noqa: E402
from sapo_ray.data.synthvista import COLOURS, SHAPES, question_answer_solution  # noqa: E402
from sapo_ray.models.loading import load_policy  # noqa: E402
from sapo_ray.models.processor import load_processor  # noqa: E402
from sapo_ray.reward import compute_score  # noqa: E402
from sapo_ray.rollout.engine import HFEngine, encode_prompt  # noqa: E402
from sapo_ray.sft import examples  # noqa: E402
from sapo_ray.utils import derive_seed  # noqa: E402

_FIRST_STEP = re.compile(r"Step 1: (.*?)(?: Step 2:|</think>)")
_VALUE = re.compile(r"\d+|" + "|".join(SHAPES))
_COLOUR = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")


def took_shortcut(text: str, params: dict) -> bool:
    """Whether `text` follows the shortcut procedure of its template (the word where the two branch)."""
    t = params["template"]
    if t == "count":
        return "ones are" not in text
    if t in ("bar_max", "bar_argmax"):
        return "The first value" in text
    if t in ("bar_sum", "bar_diff"):
        sign = re.search(r"\d+ ([+-]) \d+ =", text)
        return bool(sign) and (sign.group(1) == "-") == (t == "bar_sum")
    if t == "bar_mean":
        return " / " not in text
    return "In reverse" in text


def reading(text: str) -> tuple[list[str], list[str]] | None:
    """The numbers (shapes for `count`) and the colour words of the first step (the picture as read), in order."""
    found = _FIRST_STEP.search(text)
    return (_VALUE.findall(found.group(1)), _COLOUR.findall(found.group(1))) if found else None


def pass_at(k: int, n: int, c: int) -> float:
    """Unbiased pass@k from n samples with c correct."""
    return 1.0 if n - c < k else 1.0 - comb(n - c, k) / comb(n, k)


def no_signal(n: int, c: int, group: int) -> float:
    """Probability that `group` of the n samples (without replacement) are all right or all wrong."""
    return (comb(c, group) + comb(n - c, group)) / comb(n, group)


def measure(path: str, prompts: int, k: int, group: int, temperature: float, max_new_tokens: int,
            seed: int) -> dict:
    processor = load_processor(resolve_model_path(path))
    model = load_policy(resolve_model_path(path), attn_implementation="sdpa_gqa").eval()
    items = examples(prompts, seed=derive_seed(seed, "bench/warm_start"), split="train", text_only=False, hint=False)
    engine = HFEngine(model, getattr(processor, "tokenizer", processor), 64)
    encoded = [encode_prompt(processor, ex, "") for ex in items]
    params = SamplingParams(n=k, temperature=temperature, max_new_tokens=max_new_tokens,
                            seed=derive_seed(seed, "bench/warm_start/sample"))
    start = time.perf_counter()
    with torch.no_grad():
        samples = engine.generate(encoded, params)
    seconds = time.perf_counter() - start
    # Per item, once: its generator parameters and the picture as the reference solution reads it.
    params_of = [json.loads(ex["metadata"]["params"]) for ex in items]
    truth = [reading(question_answer_solution(p)[2]) for p in params_of]
    counts = [dict.fromkeys(("n", "right", "values", "colours", "shortcut"), 0) for _ in items]
    for s in samples:
        i, read = s.prompt_index, reading(s.text) or ([], [])
        c = counts[i]
        c["n"] += 1
        c["right"] += compute_score(s.text, items[i])["acc"] == 1.0
        c["values"] += read[0] == truth[i][0]
        c["colours"] += read[1] == truth[i][1]
        c["shortcut"] += took_shortcut(s.text, params_of[i])
    by_template: dict[str, dict[str, list[float]]] = {}
    for p, c in zip(params_of, counts):
        n, right = c["n"], c["right"]
        for name, value in (("values", c["values"] / n), ("colours", c["colours"] / n), ("shortcut", c["shortcut"] / n),
                            ("pass@1", pass_at(1, n, right)), (f"pass@{k}", pass_at(k, n, right)),
                            ("no signal", no_signal(n, right, group))):
            for key in (p["template"], "all"):
                by_template.setdefault(key, {}).setdefault(name, []).append(value)
    table = {t: {name: round(sum(v) / len(v), 3) for name, v in cols.items()} | {"items": len(cols["values"])}
             for t, cols in sorted(by_template.items(), key=lambda kv: (kv[0] == "all", kv[0]))}
    return {"model": path, "prompts": prompts, "k": k, "group": group, "temperature": temperature,
            "generate_s": round(seconds, 1), "templates": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model paths (bundled:tiny-vlm or HF directories)")
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--group", type=int, default=4, help="samples per prompt of the RL run (rollout.n)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results = []
    for path in args.models:
        result = measure(path, args.prompts, args.k, args.group, args.temperature, args.max_new_tokens, args.seed)
        results.append(result)
        print(f"\n{path}: {args.prompts} train prompts x {args.k} samples at T {args.temperature} "
              f"({result['generate_s']} s)")
        columns = list(next(iter(result["templates"].values())))
        print(f"{'template':<12}" + "".join(f"{c:>11}" for c in columns))
        for template, row in result["templates"].items():
            print(f"{template:<12}" + "".join(f"{row[c]:>11}" for c in columns))
    print(json.dumps(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
