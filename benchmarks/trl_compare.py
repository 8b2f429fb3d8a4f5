"""One GRPO training run in sapo_ray and in TRL's `GRPOTrainer`, same model, prompts and settings, side by side.

    make trl-compare                                   # creates .venv-trl, then runs the line below
    .venv/bin/python benchmarks/trl_compare.py [--steps 6] [--side both|sapo|trl] [hydra overrides ...]

Both sides run in this one invocation, one after the other (sapo_ray first), because this machine's speed
varies by about 20% between sessions: only a ratio measured in one run means something. The workload
is sapo_ray's GRPO preset on the bundled text model (`algorithm=grpo model=tiny_lm data.hint=true`,
16 prompts x 4 samples per step, responses of at most 96 tokens, one optimizer step per batch); extra
hydra overrides go to sapo_ray and, where TRL has the knob, to TRL too (the TRL side reads every
setting from the same composed config). `--steps N` runs N steps on each side and drops the first
(warm-up); s/step is the mean of the rest.

- sapo_ray: `python -m sapo_ray.main ...` in `.venv`, timed by its own `timing_s/step` (rollout,
  reward, reference log-probs, advantages, update, weight sync; not validation or checkpointing).
- TRL: `GRPOTrainer` in `.venv-trl` (requirements/trl-bench.txt: trl 1.16.0 on the same torch and
  transformers), this script re-run there with `--trl-worker`; a step is timed from `on_step_begin` to
  `on_step_end` of a TrainerCallback, which encloses TRL's generation, reward, reference forward and the
  optimizer step (the Trainer fetches the step's raw prompts just before `on_step_begin`).

Same on both sides: model directory (`sapo_ray/assets/tiny-lm`, float32 weights, sdpa), the synthvista
training rows in the order sapo_ray's PromptLoader hands them out, the chat-templated prompt (the
first four checked token for token), the reward (`sapo_ray.reward.compute_score`: 0.9 accuracy + 0.1 format, called
in-process by TRL), sampling (T, top-p, no top-k, special tokens suppressed), group size, batch and
micro-batch sizes, AdamW settings and lr schedule, clip range and dual clip, k3 KL loss coefficient,
token-mean loss over the batch, bf16 autocast over float32 weights, torch threads per process.
Differences that remain are printed with the table (`caveats` in the JSON line).

Columns: s/step (and its standard deviation over the measured steps), steps/s, generate s/step
(sapo_ray's `timing_s/gen`: prompt encoding and the engine's `generate` through Ray; TRL's
`model.generate` calls), response tokens per step (sampled tokens up to and including the first EOS)
and per second, mean reward (sanity check that both sides score alike: 0.9 accuracy + 0.1 format).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The workload: sapo_ray's GRPO preset on the bundled text model with MathVista's hint sentence.
BASE = ["algorithm=grpo", "model=tiny_lm", "data.hint=true", "data.prompts_per_step=16", "rollout.n=4",
        "rollout.max_new_tokens=96"]
# The Makefile's environment: one thread in the driver, no spinning OpenMP waits (DESIGN.md: they made
# steps 8-30x slower), no hub access. Each sapo_ray actor sets its own thread count from the config.
ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false",
       "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
       "HF_HUB_OFFLINE": "1"}


def env(**extra: str) -> dict:
    return {**os.environ, **{k: v for k, v in ENV.items() if k not in os.environ}, **extra}


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def sd(xs: list[float]) -> float:
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def summary(side: str, step_s: list[float], tokens: list[float], gen_s: list[float], **extra) -> dict:
    """Per-step series (warm-up already dropped) -> the numbers of one table row."""
    s = mean(step_s)
    return {"side": side, "steps_measured": len(step_s), "s_per_step": s, "s_per_step_sd": sd(step_s),
            "steps_per_s": 1 / s, "response_tokens_per_step": mean(tokens), "response_tokens_per_s": mean(tokens) / s,
            "gen_s_per_step": mean(gen_s), "step_s": step_s, **extra}


# ------------------------------------------------------------------------------------------------
# sapo_ray
# ------------------------------------------------------------------------------------------------


def run_sapo(python: str, steps: int, overrides: list[str]) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="trl_compare_sapo_"))
    cmd = [python, "-m", "sapo_ray.main", *BASE, f"trainer.steps={steps}", "trainer.val_every=0", "data.val_size=1",
           "trainer.export_hf=false", "trainer.loggers=[jsonl]", f"trainer.run_dir={run_dir}", *overrides]
    print("sapo_ray:", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env(), check=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Row 0 is the validation before the first step; step 1 warms up (allocator, first-call kernels).
    rows = sorted((r for r in rows if "timing_s/step" in r and r["step"] >= 2), key=lambda r: r["step"])
    if not rows:
        raise SystemExit(f"sapo_ray: no measured steps in {run_dir}/metrics.jsonl (need --steps >= 2)")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the final checkpoint: ~50 MB nobody reads
    return summary("sapo_ray", [r["timing_s/step"] for r in rows], [r["perf/response_tokens"] for r in rows],
                   [r.get("timing_s/gen", float("nan")) for r in rows], run_dir=str(run_dir), wall_s=wall,
                   reward_mean=mean([r["critic/score/mean"] for r in rows]),
                   phases={k[len("timing_s/"):]: mean([r[k] for r in rows]) for k in rows[0] if k.startswith("timing_s/")})


# ------------------------------------------------------------------------------------------------
# TRL (runs in .venv-trl: `--trl-worker`)
# ------------------------------------------------------------------------------------------------


def trl_settings(cfg) -> tuple[dict, list[str]]:
    """GRPOConfig arguments equal to sapo_ray's composed config, and what cannot be matched exactly.

    Raises for a config TRL's GRPO cannot express (another advantage, ratio level or loss aggregation)."""
    from sapo_ray.config import algorithm_spec
    from sapo_ray.precision import use_bf16

    spec, actor, r, d = algorithm_spec(cfg), cfg.actor, cfg.rollout, cfg.data
    unsupported = {"advantage": (spec.advantage, "group"), "group_kind": (spec.group_kind, "grpo"),
                   "ratio_level": (spec.ratio_level, "token"), "loss_agg": (spec.loss_agg, "token_mean"),
                   "policy_loss": (spec.policy_loss, "clipped"), "kl_loss_kind": (spec.kl_loss_kind, "k3"),
                   "kl_in_reward": (spec.kl_in_reward, False), "dynamic_sampling": (spec.dynamic_sampling, False),
                   "overlong_penalty": (spec.overlong_penalty, False), "actor.world_size": (actor.world_size, 1),
                   "rollout.tis_cap": (r.tis_cap, 0.0)}
    bad = [f"{k}={v!r} (needs {want!r})" for k, (v, want) in unsupported.items() if v != want]
    if bad:
        raise SystemExit(f"the TRL side matches sapo_ray's GRPO only; this config has {', '.join(bad)}")
    rows = d.prompts_per_step * r.n
    if rows % actor.mini_batch_size or actor.mini_batch_size % actor.micro_batch_size:
        raise SystemExit(f"rows per step ({rows}) / actor.mini_batch_size ({actor.mini_batch_size}) / "
                         f"actor.micro_batch_size ({actor.micro_batch_size}) must divide evenly for TRL's batches")
    opt = actor.optim
    schedule = {"constant": "constant_with_warmup" if opt.warmup_steps else "constant",
                "cosine": "cosine"}.get(opt.schedule)
    if schedule is None:
        raise SystemExit(f"actor.optim.schedule={opt.schedule!r} has no TRL equivalent here")
    args = dict(
        # TRL's per_device_train_batch_size counts completions (rows), like sapo_ray's micro-batch; one
        # optimizer step = gradient_accumulation_steps micro-batches = one sapo_ray mini-batch.
        per_device_train_batch_size=actor.micro_batch_size,
        gradient_accumulation_steps=actor.mini_batch_size // actor.micro_batch_size,
        # One generation per sapo_ray step: all prompts_per_step x n rows (TRL docs: "there is one generation
        # batch processed per optimization step" by default; here there are rows / mini_batch_size of them).
        generation_batch_size=rows,
        num_generations=r.n, num_iterations=actor.ppo_epochs, max_completion_length=r.max_new_tokens,
        temperature=r.temperature, top_p=r.top_p, top_k=0,
        learning_rate=opt.lr, adam_beta1=opt.betas[0], adam_beta2=opt.betas[1], weight_decay=opt.weight_decay,
        max_grad_norm=opt.max_grad_norm, warmup_steps=opt.warmup_steps, lr_scheduler_type=schedule,
        # torch.optim.AdamW with its defaults, as sapo_ray's learner builds it (transformers 5 defaults to the fused one).
        optim="adamw_torch",
        epsilon=spec.clip_low, epsilon_high=spec.clip_high,
        # TRL's `delta` caps the ratio at delta before the min (two-sided GRPO, INTELLECT-2): for A < 0 that is
        # PPO's dual clip min(., -A * c) with c = delta; for A > 0 the clipped branch already wins above 1 + eps.
        delta=spec.dual_clip,
        # TRL's KL term is k3, exp(ref - logp) - (ref - logp) - 1, added per token before the aggregation,
        # as sapo_ray's kl_loss with kl_loss_kind=k3 (sapo_ray also clamps it to [-10, 10]).
        beta=spec.kl_loss_coef if spec.kl_loss else 0.0,
        # "dapo": token losses summed over the accumulated batch / its active tokens (TRL docs) =
        # sapo_ray's token_mean with the mini-batch's token count as denominator.
        loss_type="dapo", scale_rewards="group", importance_sampling_level="token",
        entropy_coef=spec.entropy_coef, mask_truncated_completions=False,
        bf16=use_bf16(actor.autocast_bf16), gradient_checkpointing=bool(cfg.model.gradient_checkpointing),
        model_init_kwargs={"dtype": cfg.model.dtype, "attn_implementation": cfg.model.attn_implementation},
        # The prompts are given in sapo_ray's loader order; TRL must not reshuffle them.
        shuffle_dataset=False, seed=cfg.seed, use_cpu=True,
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
    )
    caveats = [
        f"group std: TRL divides by std + 1e-4, sapo_ray by std + {spec.group_eps:g}",
        "sapo_ray renormalises the learner's log-probs without the suppressed special tokens; TRL's learner does not",
        "KL: sapo_ray clamps k3 to [-10, 10]; TRL does not",
        "the sampled responses differ (different RNG streams), so response lengths per step differ: compare tokens/s too",
    ]
    if spec.ratio_level == "token" and not actor.recompute_old_logp:
        caveats.append("old log-probs: neither side runs an extra forward (sapo_ray reuses the rollout's, TRL "
                       "detaches the current ones when each batch is used once)")
    if actor.shuffle:
        caveats.append("sapo_ray shuffles the step's rows before cutting (micro-)batches, TRL cuts them in generation "
                       "order: the same rows, grouped (and padded) differently")
    if r.num_threads != actor.num_threads:
        caveats.append(f"threads: sapo_ray generates on rollout.num_threads={r.num_threads} and learns on "
                       f"actor.num_threads={actor.num_threads}; TRL's one process uses {actor.num_threads} for both")
    return args, caveats


def trl_worker(steps: int, overrides: list[str], out: str) -> None:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from sapo_ray.config import compose_config, resolve_model_path
    from sapo_ray.data.datasets import load_dataset_split
    from sapo_ray.data.prompt_loader import PromptLoader
    from sapo_ray.data.prompts import build_messages
    from sapo_ray.models.tokens import TokenIds
    from sapo_ray.reward import compute_score
    from sapo_ray.rollout.engine import encode_prompt
    from sapo_ray.utils import derive_seed

    cfg = compose_config(*BASE, f"trainer.steps={steps}", *overrides)
    d, r = cfg.data, cfg.rollout
    # sapo_ray's phases run one after another, each actor on its own num_threads (2 = all cores in the
    # committed config): one TRL process doing all the phases gets the same.
    torch.set_num_threads(cfg.actor.num_threads)
    args, caveats = trl_settings(cfg)
    model_dir = resolve_model_path(cfg.model.path)

    # The rows and their order exactly as sapo_ray's trainer builds them (sapo_ray.trainer.Trainer.setup).
    examples = load_dataset_split(d.train, d.train_path, d.train_split, for_training=True, n=d.train_size,
                                  seed=derive_seed(cfg.seed, "data/train"), image_size=d.image_size, hint=d.hint,
                                  text_only=True)
    loader = PromptLoader(examples, d.prompts_per_step, seed=derive_seed(cfg.seed, "loader"))
    opt_steps_per_batch = d.prompts_per_step * r.n // cfg.actor.mini_batch_size * cfg.actor.ppo_epochs
    ordered = [ex for _ in range(steps) for ex in loader.next_batch()]
    dataset = Dataset.from_dict({"prompt": [build_messages(ex, d.instruction) for ex in ordered],
                                 "idx": list(range(len(ordered)))})

    if hasattr(transformers.AutoConfig.from_pretrained(model_dir), "vision_config"):
        raise SystemExit(f"{cfg.model.path} is a vision-language model; the TRL side runs text models (model=tiny_lm)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = TokenIds.of(tokenizer)
    for ex in ordered[:4]:  # TRL templates conversational prompts itself: it must see sapo_ray's tokens
        mine = encode_prompt(tokenizer, ex, d.instruction).ids
        theirs = tokenizer.apply_chat_template(build_messages(ex, d.instruction), tokenize=True,
                                               add_generation_prompt=True, return_dict=True)["input_ids"]
        if list(theirs) != list(mine):
            raise SystemExit(f"prompt tokens differ for {ex['pid']}: sapo_ray {len(mine)}, TRL {len(theirs)}")
    too_long = [ex["pid"] for ex in ordered if len(encode_prompt(tokenizer, ex, d.instruction).ids) > d.max_prompt_length]
    if too_long:  # sapo_ray would skip them; TRL would train on them
        raise SystemExit(f"{len(too_long)} prompts exceed data.max_prompt_length={d.max_prompt_length}")

    tokens_per_batch: dict[int, int] = {}

    def reward(prompts, completions, completion_ids, idx, trainer_state, **_):
        # Counted here because completion_ids are the sampled tokens up to and including the first EOS,
        # the same count as sapo_ray's perf/response_tokens.
        batch = trainer_state.global_step // opt_steps_per_batch
        tokens_per_batch[batch] = tokens_per_batch.get(batch, 0) + sum(len(c) for c in completion_ids)
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [compute_score(t, ordered[i], cfg.reward.acc_weight, cfg.reward.format_weight)["score"]
                for t, i in zip(texts, idx)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.step_s, self.logs = 0.0, [], []

        def on_step_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_s.append(time.perf_counter() - self.begin)

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append(dict(logs or {}))

    timer = StepTimer()
    config = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="trl_compare_trl_"), max_steps=steps * opt_steps_per_batch,
                        generation_kwargs={"suppress_tokens": list(ids.banned)} if ids.banned else None, **args)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    if trainer.eos_token_ids != list(ids.eos):
        caveats.append(f"stop tokens: TRL {trainer.eos_token_ids}, sapo_ray {list(ids.eos)}")
    gen_s: list[float] = []
    gen_autocast: set[bool] = set()
    model = trainer.accelerator.unwrap_model(trainer.model)
    generate = model.generate

    def timed_generate(*a, **kw):  # TRL's transformers path calls the unwrapped model's generate
        t0 = time.perf_counter()
        hook = model.get_output_embeddings().register_forward_pre_hook(
            lambda *_: gen_autocast.add(torch.is_autocast_enabled("cpu")))
        try:
            return generate(*a, **kw)
        finally:
            gen_s.append(time.perf_counter() - t0)
            hook.remove()

    model.generate = timed_generate
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0

    if True in gen_autocast:  # accelerate wraps the prepared model's forward in autocast when bf16 is on
        caveats.append("TRL generates under bf16 autocast (its model's forward is wrapped by accelerate); "
                       "sapo_ray's hf engine generates in float32")
    k = opt_steps_per_batch
    step_s = [sum(timer.step_s[i:i + k]) for i in range(0, len(timer.step_s), k)]
    if len(step_s) < 2 or len(gen_s) != len(step_s):
        raise SystemExit(f"TRL: {len(timer.step_s)} optimizer steps and {len(gen_s)} generate calls for {steps} steps")
    result = summary("trl", step_s[1:], [tokens_per_batch[b] for b in range(1, len(step_s))], gen_s[1:], wall_s=wall,
                     versions={"trl": trl.__version__, "transformers": transformers.__version__,
                               "torch": torch.__version__},
                     threads=torch.get_num_threads(), settings=args,
                     reward_mean=mean([float(row["reward"]) for row in timer.logs if "reward" in row][k:]),
                     # TRL's own `step_time` metric (its training_step calls: generation, forward and backward,
                     # without clipping and the optimizer step): a cross-check of the callback's timing.
                     trl_step_time=[float(row["step_time"]) for row in timer.logs if "step_time" in row][k:],
                     caveats=caveats)
    Path(out).write_text(json.dumps(result))


def run_trl(python: str, steps: int, overrides: list[str]) -> dict:
    if not Path(python).exists():
        raise SystemExit(f"{python} does not exist: create it with `make trl-compare` (requirements/trl-bench.txt)")
    out = Path(tempfile.mkdtemp(prefix="trl_compare_")) / "trl.json"
    cmd = [python, str(Path(__file__).resolve()), "--trl-worker", str(out), "--steps", str(steps), *overrides]
    print("TRL:", " ".join(cmd[1:]), flush=True)
    from sapo_ray.config import compose_config

    threads = str(compose_config(*BASE, *overrides).actor.num_threads)
    subprocess.run(cmd, cwd=ROOT, env=env(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads), check=True)
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------------


def report(results: list[dict], steps: int, overrides: list[str], load_start: float) -> None:
    from sapo_ray.utils import cpu_model

    import torch

    machine = f"{cpu_model()}, {os.cpu_count()} cores"
    by = {r["side"]: r for r in results}
    print(f"\nmachine: {machine}; python {platform.python_version()}, torch {torch.__version__}")
    load = {"start": load_start, "end": os.getloadavg()[0]}
    print(f"workload: {' '.join(BASE + overrides)}; {steps} steps per side, first dropped")
    print(f"load average {load['start']:.1f} at the start, {load['end']:.1f} at the end ({os.cpu_count()} cores: above "
          f"that, the times include waiting for a core)")
    if "trl" in by:
        v = by["trl"]["versions"]
        print(f"TRL {v['trl']} (transformers {v['transformers']}, torch {v['torch']}), {by['trl']['threads']} torch threads")
        print("TRL GRPOConfig: " + ", ".join(f"{k}={v}" for k, v in by["trl"]["settings"].items()))
    print("\n| side | s/step (sd) | steps/s | generate s/step | response tokens/step | response tokens/s | mean reward |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['side']} | {r['s_per_step']:.2f} ({r['s_per_step_sd']:.2f}) | {r['steps_per_s']:.3f} | "
              f"{r['gen_s_per_step']:.2f} | {r['response_tokens_per_step']:.0f} | {r['response_tokens_per_s']:.0f} | "
              f"{r['reward_mean']:.3f} |")
    ratio = {}
    if len(by) == 2:
        s, t = by["sapo_ray"], by["trl"]
        ratio = {"trl_over_sapo_s_per_step": t["s_per_step"] / s["s_per_step"],
                 "sapo_over_trl_response_tokens_per_s": s["response_tokens_per_s"] / t["response_tokens_per_s"]}
        print(f"\nTRL s/step / sapo_ray s/step = {ratio['trl_over_sapo_s_per_step']:.2f}; sapo_ray response tokens/s / "
              f"TRL's = {ratio['sapo_over_trl_response_tokens_per_s']:.2f}")
    if "trl" in by:
        print("\nNot matched exactly:\n" + "\n".join(f"- {c}" for c in by["trl"]["caveats"]))
    slim = [{k: v for k, v in r.items() if k != "settings"} for r in results]
    print(json.dumps({"bench": "trl_compare", "machine": machine, "steps": steps, "overrides": BASE + overrides,
                      "load_average": load, "results": slim, **ratio}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6, help="training steps per side; the first is dropped")
    ap.add_argument("--side", choices=("both", "sapo", "trl"), default="both")
    ap.add_argument("--sapo-python", default=str(ROOT / ".venv" / "bin" / "python"))
    ap.add_argument("--trl-python", default=str(ROOT / ".venv-trl" / "bin" / "python"))
    ap.add_argument("--trl-worker", metavar="OUT", help=argparse.SUPPRESS)
    args, overrides = ap.parse_known_args()
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the first step is a warm-up and is dropped)")
    if args.trl_worker:
        trl_worker(args.steps, overrides, args.trl_worker)
        return
    load_start, results = os.getloadavg()[0], []
    if args.side in ("both", "sapo"):
        results.append(run_sapo(args.sapo_python, args.steps, overrides))
    if args.side in ("both", "trl"):
        results.append(run_trl(args.trl_python, args.steps, overrides))
    report(results, args.steps, overrides, load_start)


if __name__ == "__main__":
    main()
