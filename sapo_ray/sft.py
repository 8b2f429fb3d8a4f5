"""Warm-start the tiny models on SynthVista reference solutions, then score them on the held-out split.

    python -m sapo_ray.sft model=tiny_vlm steps=150      # writes sapo_ray/assets/tiny-vlm
    python -m sapo_ray.sft model=tiny_lm steps=100       # writes sapo_ray/assets/tiny-lm

`model` is the same config group as in `python -m sapo_ray.main` (`conf/model/`): the output is
`model.path` unless `out_dir` is set, and the bundled names `tiny-vlm` / `tiny-lm` are built fresh
(`sapo_ray.models.tiny`) unless `init` names an HF directory to fine-tune. A VLM trains on
SynthVista images, a text-only LM on `text_only=True` rows.

Supervised fine-tuning with the loss on assistant tokens only (the reference solution and the
end-of-turn token), AdamW with warmup and cosine decay. Evaluation on `split="test"` (held-out
template/colour combinations): greedy accuracy and sampled accuracy (T=0.6, top-p 0.95, mean over
`eval_samples` samples). The model is meant to be useful but far from perfect, so RL has room to
improve it.

Every step goes through the RL path's own code, so the warm start and RL cannot drift apart:
prompts are the rollout engine's `encode_prompt`, each row becomes a `Sample` whose response is the
solution, the loss is the token mean of `-log pi` from the learner's `policy_forward` on
`Batch.from_samples`, evaluation generates with `HFEngine` and scores with `compute_score` (the
trainer's reward, default `RewardConfig` weights). Random streams come from `derive_seed`:
`sft/data` and `sft/teacher` per step, `sft/eval` for the sampled evaluation.
"""

from __future__ import annotations

import json
import math
import os
import random

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: no spin-waiting on a shared CPU
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from sapo_ray.algo.losses import masked_mean
from sapo_ray.batch import Batch, Sample, SamplingParams
from sapo_ray.config import CONF_MODULE, ModelConfig, RewardConfig, resolve_model_path
from sapo_ray.envs.env import ToolEnv
from sapo_ray.envs.pool import InlineTools
from sapo_ray.learner.forward import policy_forward
from sapo_ray.models.loading import is_vision_config, load_policy
from sapo_ray.models.processor import load_processor
from sapo_ray.models.tokens import TokenIds
from sapo_ray.precision import decide_here
from sapo_ray.rollout.episodes import replay_episode
from sapo_ray.rollout.engine import HFEngine, encode_prompt
from sapo_ray.utils import derive_seed

_NON_WEIGHT_FILES = ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
                     "chat_template.jinja", "chat_template.json", "generation_config.json")


@dataclass
class SFTConfig:
    """Supervised warm start of a tiny model (`conf/sft.yaml` documents every key)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The `model` group of the main config; `model.path` is the default output."""
    out_dir: Optional[str] = None
    """Where the trained HF directory goes; default: `model.path`."""
    init: Optional[str] = None
    """Start from this HF directory; default: a fresh build of `tiny-vlm` / `tiny-lm`."""
    seed: int = 0
    """Model init seed and the base of the `sft/data`, `sft/teacher` and `sft/eval` streams (`derive_seed`)."""
    steps: int = 150
    """Optimizer steps (each on `batch_size` fresh SynthVista train rows)."""
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    """Cosine decay ends at `lr * min_lr_ratio`."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    instructions: list[str] = field(default_factory=lambda: ["none", "default", "short"])
    """Instructions appended to the query, cycled over rows (the first is used for evaluation)."""
    hint: bool = True
    """Queries start with MathVista's hint sentence (the synthvista knob; as `data.hint` of the RL run)."""
    teacher_error_rate: float = 0.0
    """Share of training rows solved by a sloppy teacher: the picture read right, then a wrong procedure
    (count every shape, take the first bar for the tallest, add instead of subtract, ...; see
    `synthvista.question_answer_solution`). An imperfect teacher, as real SFT data is: the warm start
    learns both procedures, and RL with the true reward can learn which one the question asks for."""
    tool_use_rate: float = 0.0
    """Share of bar-chart rows solved with tools, as two-turn episodes (`synthvista.tool_turns`: `colour_at`
    at each bar, the tools' answers, then the solution), their observations masked out of the loss. Of
    those, a share `teacher_error_rate` comes from a sloppy teacher: a missed call asked again, or a
    needless calculator call (half each); a row solved by a sloppy teacher's procedure keeps it after
    the tools' answers."""
    tool_stepwise: bool = False
    """Tool-using rows call one tool a turn, each turn first saying what the last answer named
    (`synthvista.tool_turns(stepwise=True)`), instead of every call in the first turn."""
    tool_target: bool = False
    """Tool-using `bar_argmax` rows ask the colour of the bar the values pick and answer with it
    (`synthvista.tool_turns(target=True)`), the bar the row's teacher picks (the sloppy one's: the first)."""
    templates: Optional[list[str]] = None
    """The synthvista templates of the training rows (`synthvista.TEMPLATES`); default: all."""
    max_train_seconds: float = 420.0
    """Stop training early past this wall time (the CPU is shared)."""
    log_every: int = 20
    eval_n: int = 200
    """Held-out items (`split="test"`) to evaluate on; 0 skips evaluation."""
    eval_seed: int = 777
    eval_samples: int = 4
    """Samples per item for the sampled accuracy (mean@k)."""
    eval_batch_size: int = 64
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 128
    threads: int = 1
    """torch threads: this process's share of the CPU (1 was faster than 2 on the busy 2-core box)."""
    save_dtype: str = "bfloat16"
    """Stored weight dtype (config stays float32, loaders upcast); halves the shipped size."""
    autocast_bf16: str = "auto"
    """bf16 autocast for training matmuls (fp32 master weights): ~1.6x faster on CPUs with AVX512-BF16,
    40-60x slower where bf16 is emulated (AVX2). auto: decided by this machine's probe (sapo_ray.precision)."""


def _instruction(name: str) -> str:
    """`none` | `default` | `short` (sapo_ray.data.prompts) -> the text; anything else is used verbatim."""
    from sapo_ray.data.prompts import DEFAULT_INSTRUCTION, SHORT_INSTRUCTION

    return {"none": "", "default": DEFAULT_INSTRUCTION, "short": SHORT_INSTRUCTION}.get(name, name)


def examples(n: int, seed: int, split: str, text_only: bool, hint: bool = True,
             templates: list[str] | None = None) -> list[dict]:
    """`n` SynthVista Examples (with `solution`) of `split`; `hint` and `templates` as the synthvista knobs."""
    from sapo_ray.data import synthvista

    rows = synthvista.generate(n, seed=seed, split=split, text_only=text_only, hint=hint,
                               **({"templates": list(templates)} if templates else {}))
    return [synthvista.to_example(r) for r in rows]


def _tokenizer(processor):
    """The tokenizer of a VLM processor; a text-only model's processor is its tokenizer."""
    return getattr(processor, "tokenizer", processor)


def sft_samples(processor, rows: list[dict], instructions: list[str]) -> list[Sample]:
    """One `Sample` per row, the reference solution and its `<|im_end|>` as the response; a row with
    `tool_turns`, the episode of those turns with the tools' answers between them (`replay_episode`).

    The prompt is encoded by the rollout engine's `encode_prompt` and the response tokenized as the
    engine would emit it, so `Batch.from_samples` gives the learner exactly what an RL step would.
    """
    tok = _tokenizer(processor)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    samples = []
    for index, (ex, instruction) in enumerate(zip(rows, instructions)):
        prompt = encode_prompt(processor, ex, instruction)
        if ex.get("tool_turns"):
            samples.append(replay_episode(tok, prompt, ex["tool_turns"], ToolEnv(ex, InlineTools()), index))
            continue
        response = tok(ex["solution"], add_special_tokens=False)["input_ids"] + [end]
        samples.append(Sample(prompt.ids, response, [0.0] * len(response), [0.0] * len(response), ex["solution"],
                              True, index, prompt.vision))
    return samples


def sft_loss(model, batch: Batch, ids: TokenIds) -> torch.Tensor:
    """Token-mean negative log-likelihood of the responses, from the learner's `policy_forward`
    (temperature 1, the engine's banned ids masked)."""
    banned = torch.tensor(ids.banned, dtype=torch.long)
    logp, _ = policy_forward(model, batch, temperature=1.0, banned=banned, vision_tokens=ids.vision,
                             with_entropy=False)
    return -masked_mean(logp, batch.response_mask)


def _scores(samples: list[Sample], items: list[dict]) -> list[dict]:
    """`compute_score` of each sample against its item, with the RL run's default reward weights."""
    from sapo_ray.reward import compute_score

    weights = RewardConfig()
    return [compute_score(s.text, items[s.prompt_index], weights.acc_weight, weights.format_weight) for s in samples]


def _summary(mode: str, samples: list[Sample], items: list[dict]) -> dict:
    """Accuracy, format rate, accuracy per template and the first text of one evaluation mode."""
    scores = _scores(samples, items)
    by_template: dict[str, list[float]] = {}
    for s, score in zip(samples, scores):
        by_template.setdefault(items[s.prompt_index]["metadata"].get("template", "all"), []).append(score["acc"])
    return {f"{mode}_acc": sum(s["acc"] for s in scores) / len(scores),
            f"{mode}_format": sum(s["format"] for s in scores) / len(scores),
            f"{mode}_acc_by_template": {k: round(sum(v) / len(v), 3) for k, v in sorted(by_template.items())},
            f"{mode}_example": samples[0].text}


def evaluate(model, processor, items: list[dict], instruction: str, samples: int = 4, batch_size: int = 64,
             temperature: float = 0.6, top_p: float = 0.95, max_new_tokens: int = 128, seed: int = 0) -> dict:
    """Greedy and sampled (mean over `samples`) accuracy and format rate of `model` on `items`.

    Responses come from the RL rollout engine (`HFEngine`), scored by the reward the trainer uses;
    the sampled mode draws from the `sft/eval` stream of `seed`.
    """
    engine = HFEngine(model, _tokenizer(processor), batch_size)
    prompts = [encode_prompt(processor, ex, instruction) for ex in items]
    modes = {"greedy": SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens),
             "sampled": SamplingParams(n=samples, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                       seed=derive_seed(seed, "sft/eval"))}
    result = {"n": len(items), "instruction": instruction}
    for mode, params in modes.items():
        if params.n:
            result.update(_summary(mode, engine.generate(prompts, params), items))
    return result


def with_teacher_errors(batch: list[dict], rate: float, rng: random.Random) -> list[dict]:
    """`batch` with a share `rate` of solutions replaced by a sloppy teacher's: the same reading of the
    picture, then a wrong procedure (`synthvista.question_answer_solution(..., shortcut=True)`)."""
    from sapo_ray.data.synthvista import question_answer_solution

    out = []
    for ex in batch:
        if rate > 0 and rng.random() < rate:
            params = json.loads(ex["metadata"]["params"])
            ex = {**ex, "solution": question_answer_solution(params, shortcut=True)[2], "shortcut": True}
        out.append(ex)
    return out


def with_tool_turns(batch: list[dict], rate: float, error_rate: float, rng: random.Random,
                    stepwise: bool = False, target: bool = False) -> list[dict]:
    """`batch` with a share `rate` of its bar-chart rows given a tool-using solution (`tool_turns`, one call a
    turn with `stepwise`), a share `error_rate` of those a sloppy teacher's (a missed call or a needless one).
    A row given the shortcut by `with_teacher_errors` keeps its wrong procedure (with `target`, a `bar_argmax`
    row asks the one bar its teacher picks)."""
    from sapo_ray.data.synthvista import Knobs, tool_turns

    out = []
    for ex in batch:
        params = json.loads(ex["metadata"]["params"])
        if rate > 0 and params["template"] != "count" and rng.random() < rate:
            sloppy = error_rate > 0 and rng.random() < error_rate
            miss = sloppy and rng.random() < 0.5
            turns = tool_turns(params, Knobs(**params["knobs"]), miss=miss, needless=sloppy and not miss,
                               stepwise=stepwise, target=target, shortcut=ex.get("shortcut", False))
            ex = {**ex, "tool_turns": turns}
        out.append(ex)
    return out


def _lr_factor(step: int, cfg: SFTConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(model, processor, cfg: SFTConfig, text_only: bool = False, log=print) -> dict:
    """Run `cfg.steps` AdamW steps on fresh SynthVista train rows; returns losses and timing."""
    ids = TokenIds.of(_tokenizer(processor))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    names = [_instruction(n) for n in cfg.instructions]
    precision = decide_here(cfg.autocast_bf16)
    bf16 = precision.use_bf16
    log(f"precision: {precision.reason}")
    losses, start, step = [], time.perf_counter(), 0
    model.train()
    for step in range(cfg.steps):
        rows = examples(cfg.batch_size, seed=derive_seed(cfg.seed, "sft/data", step), split="train",
                        text_only=text_only, hint=cfg.hint, templates=cfg.templates)
        teacher = random.Random(derive_seed(cfg.seed, "sft/teacher", step))
        rows = with_teacher_errors(rows, cfg.teacher_error_rate, teacher)
        rows = with_tool_turns(rows, cfg.tool_use_rate, cfg.teacher_error_rate, teacher, cfg.tool_stepwise,
                               cfg.tool_target)
        instructions = [names[(step * cfg.batch_size + i) % len(names)] for i in range(len(rows))]
        batch = Batch.from_samples(sft_samples(processor, rows, instructions), ids.pad)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = sft_loss(model, batch, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        elapsed = time.perf_counter() - start
        if (step + 1) % cfg.log_every == 0 or step == 0:
            log(f"step {step + 1}/{cfg.steps} loss {sum(losses[-cfg.log_every:]) / len(losses[-cfg.log_every:]):.4f} "
                f"lr {sched.get_last_lr()[0]:.2e} {elapsed:.0f}s")
        if elapsed > cfg.max_train_seconds:
            log(f"stopping at step {step + 1}: past max_train_seconds={cfg.max_train_seconds}")
            break
    return {"steps": len(losses), "train_seconds": round(time.perf_counter() - start, 1), "losses": losses,
            "autocast_bf16": bf16}


def save(model, init_dir: str, out_dir: str, dtype: str = "bfloat16") -> None:
    """Write `model` as an HF directory (weights stored in `dtype`, config float32) with `init_dir`'s
    tokenizer/processor files."""
    os.makedirs(out_dir, exist_ok=True)
    if os.path.abspath(init_dir) != os.path.abspath(out_dir):
        for name in _NON_WEIGHT_FILES:
            if os.path.isfile(os.path.join(init_dir, name)):
                shutil.copy(os.path.join(init_dir, name), os.path.join(out_dir, name))
    tied = model.config.get_text_config().tie_word_embeddings or model.config.tie_word_embeddings
    state = {k: v.detach().to(getattr(torch, dtype)).contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    model.config.dtype = torch.float32
    model.save_pretrained(out_dir, state_dict=state)
    for name in os.listdir(out_dir):  # the shard writer leaves 0600 files; package data should be readable
        os.chmod(os.path.join(out_dir, name), 0o644)


def run(cfg: SFTConfig, log=print) -> dict:
    """Build (or load) the model, train, save to the output directory, reload what was saved and
    evaluate it on the held-out split; writes and returns `sft_report.json`'s content."""
    from sapo_ray.models.tiny import build_tiny_lm, build_tiny_vlm

    builders = {"tiny-vlm": build_tiny_vlm, "tiny-lm": build_tiny_lm}
    out_dir = resolve_model_path(cfg.out_dir or cfg.model.path)
    name = cfg.model.path.rsplit(":", 1)[-1].rstrip("/").rsplit("/", 1)[-1]
    if cfg.init is None and name not in builders:
        raise ValueError(f"model.path={cfg.model.path!r} is not a bundled tiny model ({sorted(builders)}); "
                         "set `init` to the HF directory to fine-tune")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        init = resolve_model_path(cfg.init) if cfg.init else builders[name](tmp, seed=cfg.seed)
        init_report = _read_report(init) if cfg.init else None  # before `out_dir` (maybe `init`) is written
        processor, model = load_processor(init), load_policy(init, attn_implementation=cfg.model.attn_implementation)
        text_only = not is_vision_config(model.config)
        log(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params ({'text-only' if text_only else 'VLM'}) "
            f"from {cfg.init or 'a fresh ' + name} -> {out_dir}")
        stats = train(model, processor, cfg, text_only, log)
        save(model, init, out_dir, cfg.save_dtype)
    losses = stats["losses"]
    report = {"command": "python -m sapo_ray.sft " + " ".join(sys.argv[1:]), "config": asdict(cfg),
              "params": sum(p.numel() for p in model.parameters()), "steps": stats["steps"],
              "train_seconds": stats["train_seconds"], "threads": cfg.threads, "torch": torch.__version__,
              "autocast_bf16": stats["autocast_bf16"],
              "loss_curve": [round(sum(losses[i:i + 10]) / len(losses[i:i + 10]), 4) for i in range(0, len(losses), 10)]}
    if init_report is not None:
        report["init_report"] = init_report  # the stages before this one: a chain of fine-tunes stays traceable
    if cfg.eval_n:
        start = time.perf_counter()
        model = load_policy(out_dir, attn_implementation=cfg.model.attn_implementation)  # score exactly what ships
        items = examples(cfg.eval_n, seed=cfg.eval_seed, split="test", text_only=text_only, hint=cfg.hint)
        e = evaluate(model, processor, items, _instruction(cfg.instructions[0]), cfg.eval_samples, cfg.eval_batch_size,
                     cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.seed)
        report["eval"] = {"split": "test", "seed": cfg.eval_seed, **e, "seconds": round(time.perf_counter() - start, 1)}
        log(f"held-out ({e['n']} items): greedy acc {e['greedy_acc']:.3f} (format {e['greedy_format']:.3f}), "
            f"sampled T={cfg.temperature} top-p {cfg.top_p} acc {e['sampled_acc']:.3f} "
            f"(format {e['sampled_format']:.3f}, mean@{cfg.eval_samples})")
        log(f"example: {e['greedy_example']!r}")
    with open(os.path.join(out_dir, "sft_report.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    return report


def _read_report(model_dir: str) -> dict | None:
    """`sft_report.json` of `model_dir`, or None where it has none (a model not made by this module)."""
    path = os.path.join(model_dir, "sft_report.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def register_configs() -> None:
    """Register `SFTConfig` as `sft_schema`, the typed base of `conf/sft.yaml`."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="sft_schema", node=SFTConfig)


def main() -> None:
    import hydra
    from omegaconf import OmegaConf
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bars in the log
    register_configs()

    @hydra.main(version_base=None, config_path=f"pkg://{CONF_MODULE}", config_name="sft")
    def _main(conf) -> None:
        run(OmegaConf.to_object(conf))

    _main()


if __name__ == "__main__":
    main()
