"""Metrics sinks: console (rich), `metrics.jsonl` in the run directory, TensorBoard, W&B; and the
generation dumps (`generations/*.jsonl`)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

SHORT = {"critic/score/mean": "score", "val/accuracy": "val_acc", "val/accuracy_greedy": "val_acc_greedy",
         "actor/pg_clipfrac": "clipfrac", "actor/ppo_kl": "ppo_kl", "actor/entropy": "entropy",
         "critic/vf_explained_var": "vf_ev", "response_length/mean": "resp_len", "timing_s/step": "step_s",
         "perf/throughput": "tok/s"}
CONSOLE_KEYS = tuple(SHORT)


def generation_records(samples, examples: list[dict], scores: list[dict], **fields) -> list[dict]:
    """One JSON-able record per sample: `fields`, the example's id, prompt (its query) and gold answer, the
    response, its scores (with a reward function's extra numbers), and the row's own columns (a custom
    dataset's, such as its id, for joining; the record's keys win a clash)."""
    records = []
    for sample, scored in zip(samples, scores):
        example = examples[sample.prompt_index]
        records.append({**{k: example[k] for k in example.get("columns", ())}, **fields, "pid": example["pid"],
                        "prompt": example["query"], "response": sample.text, "answer": example["answer"],
                        "finished": sample.finished, "response_length": len(sample.response_ids), **scored})
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for record in records:
            f.write(json.dumps(record, default=str) + "\n")


class Pace:
    """Wall time per step and the time left, from the intervals between logged steps (validations
    included): the console's line for each step says it, in a terminal and in a log file alike."""

    def __init__(self, total_steps: int = 0, done: int = 0, clock=time.monotonic):
        self.total, self.clock = total_steps, clock
        self.last_step, self.last_time = done, clock()
        self.steps, self.seconds = 0, 0.0

    def tick(self, step: int) -> str:
        """Note that `step` was logged now; returns "  <s>/step  eta <time>" once a step has finished."""
        now = self.clock()
        if step > self.last_step:
            self.steps += step - self.last_step
            self.seconds += now - self.last_time
            self.last_step = step
        self.last_time = now
        if not self.steps:
            return ""
        per_step = self.seconds / self.steps
        return f"  {per_step:.1f} s/step  eta {format_duration(per_step * max(0, self.total - self.last_step))}"


def format_duration(seconds: float) -> str:
    """`75` -> "1m15s", `3725` -> "1h02m", `9` -> "9s"."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class Tracker:
    def __init__(self, run_dir: str, loggers: list[str], project: str, experiment: str, config: dict):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        unknown = set(loggers) - {"console", "jsonl", "tensorboard", "wandb"}
        if unknown:
            raise ValueError(f"trainer.loggers has unknown entries {sorted(unknown)}; use console, jsonl, tensorboard, wandb")
        self.loggers = list(loggers)
        self.jsonl = None
        if "jsonl" in loggers:
            self.jsonl = open(self.run_dir / "metrics.jsonl", "a")
        self.tb = None
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self.wandb = None
        if "wandb" in loggers:
            import wandb  # optional: `pip install wandb`; WANDB_MODE=offline works without a network

            self.wandb = wandb.init(project=project, name=experiment, config=config, dir=str(self.run_dir))
        self.progress = None
        self.task = None
        self.pace = Pace()

    def start(self, total_steps: int, done: int) -> None:
        """Drop logged rows past `done` (a fresh run, or steps after the checkpoint a run resumes
        from, would otherwise appear twice) and show a progress bar (console logger only)."""
        self.rewind(done)
        self.pace = Pace(total_steps, done)
        if "console" not in self.loggers:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.description}"))
        self.task = self.progress.add_task("", total=total_steps, completed=done)
        self.progress.start()

    def rewind(self, done: int) -> None:
        """Drop the rows of `metrics.jsonl` past step `done` (they will be logged again)."""
        if self.jsonl is not None:
            path = self.run_dir / "metrics.jsonl"
            self.jsonl.close()
            lines = path.read_text().splitlines() if done else []
            kept = [line for line in lines if (step := _step_of(line)) is not None and step <= done]
            path.write_text("".join(l + "\n" for l in kept))
            self.jsonl = open(path, "a")

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, **{k: (v if math.isfinite(v) else None) for k, v in clean.items()}}) + "\n")
            self.jsonl.flush()
        if self.tb:
            for k, v in clean.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb:
            self.wandb.log(clean, step=step)
        pace = self.pace.tick(step)
        if "console" in self.loggers:
            shown = "  ".join(f"{SHORT[k]}={clean[k]:.4g}" for k in CONSOLE_KEYS if k in clean) + pace
            if self.progress is not None:
                self.progress.console.print(f"[bold]step {step}[/bold]  {shown}", soft_wrap=True)  # a line per step
                keys = ("critic/score/mean", "val/accuracy")
                self.progress.update(self.task, completed=step,
                                     description="  ".join(f"{SHORT[k]}={clean[k]:.3f}" for k in keys if k in clean))
            else:
                print(f"step {step}  {shown}", flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
