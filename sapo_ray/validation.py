"""Validation: the held-out examples sampled (`rollout.val_n` at `rollout.val_temperature`) and greedily,
scored, and their metrics; with `trainer.dump_generations` (or `trainer.val_only`) the generations and, on
MathVista, the result file its official scorer reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from sapo_ray.batch import Sample, SamplingParams
from sapo_ray.bookkeeping import episode_metrics
from sapo_ray.reward.mathvista import result_file
from sapo_ray.reward.scorer import Scorer
from sapo_ray.tracking import generation_records, write_jsonl

# generate(examples, params, stream) -> (samples, the examples kept, how many were too long)
Generate = Callable[[list[dict], SamplingParams, tuple], tuple[list[Sample], list[dict], int]]


def settings(cfg) -> dict[str, SamplingParams]:
    """The two validations, by metric suffix: sampled (`val/accuracy`) and greedy (`val/accuracy_greedy`)."""
    r = cfg.rollout
    return {"": SamplingParams(n=r.val_n, temperature=r.val_temperature, top_p=r.val_top_p, max_new_tokens=r.max_new_tokens),
            "_greedy": SamplingParams(n=1, temperature=0.0, max_new_tokens=r.max_new_tokens)}


def validate(cfg, step: int, examples: list[dict], generate: Generate, scorer: Scorer, run_dir: Path) -> dict[str, float]:
    """The validation metrics of the policy the engines hold at `step`."""
    out: dict[str, float] = {}
    dump = run_dir / "generations" / f"val_step_{step:06d}.jsonl"
    dumping = cfg.trainer.dump_generations or cfg.trainer.val_only
    if dumping:
        dump.unlink(missing_ok=True)  # a resumed run validates this step again
    for suffix, params in settings(cfg).items():
        samples, kept, too_long = generate(examples, params, ("validation",))
        out["val/prompt_too_long"] = float(too_long)  # counted, never silently dropped
        scores, counts, means = scorer.score(samples, kept, prefix="val/")
        if dumping:
            write_jsonl(dump, generation_records(samples, kept, scores, step=step,
                                                 sampling="greedy" if suffix else "sampled"))
            if suffix and cfg.data.val == "mathvista":
                results = result_file([(kept[s.prompt_index], s.text) for s in samples])
                (run_dir / f"mathvista_results_step_{step:06d}.json").write_text(json.dumps(results, indent=1))
        out[f"val/accuracy{suffix}"] = float(np.mean([x["acc"] for x in scores])) if scores else 0.0
        if not suffix:
            out.update({**counts, **means, **sampled_metrics(samples, kept, scores)})
            out.update({f"val/{k}": v for k, v in episode_metrics(samples, scores).items()})
    return out


def sampled_metrics(samples: list[Sample], examples: list[dict], scores: list[dict]) -> dict[str, float]:
    """Score, format, response length, and accuracy per example category of the sampled validation."""
    if not samples:
        return {"val/score": 0.0, "val/format": 0.0, "val/response_length": 0.0}
    by_category: dict[str, list[float]] = {}
    for s, x in zip(samples, scores):
        category = (examples[s.prompt_index].get("metadata") or {}).get("category") or "unknown"
        by_category.setdefault(category, []).append(x["acc"])
    return {"val/score": float(np.mean([x["score"] for x in scores])),
            "val/format": float(np.mean([x["format"] for x in scores])),
            "val/response_length": float(np.mean([len(s.response_ids) for s in samples])),
            **{f"val/accuracy/{c}": float(np.mean(v)) for c, v in by_category.items()}}
