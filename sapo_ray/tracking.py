"""Metrics sinks: console (rich), `metrics.jsonl` in the run directory, TensorBoard, W&B."""

from __future__ import annotations

import json
import math
from pathlib import Path

CONSOLE_KEYS = ("critic/score/mean", "val/accuracy", "actor/pg_clipfrac", "actor/ppo_kl", "actor/entropy",
                "critic/vf_explained_var", "response_length/mean", "timing_s/step", "perf/throughput")


class Tracker:
    def __init__(self, run_dir: str, loggers: list[str], project: str, experiment: str, config: dict):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        unknown = set(loggers) - {"console", "jsonl", "tensorboard", "wandb"}
        if unknown:
            raise ValueError(f"trainer.loggers has unknown entries {sorted(unknown)}; use console, jsonl, tensorboard, wandb")
        self.loggers = list(loggers)
        self.jsonl = open(self.run_dir / "metrics.jsonl", "a") if "jsonl" in loggers else None
        self.tb = None
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self.wandb = None
        if "wandb" in loggers:
            import wandb  # optional: `pip install wandb`; WANDB_MODE=offline works without a network

            self.wandb = wandb.init(project=project, name=experiment, config=config, dir=str(self.run_dir))
        self.console = None
        if "console" in loggers:
            from rich.console import Console

            self.console = Console()

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
        if self.console:
            shown = "  ".join(f"{k.split('/', 1)[-1] if k != 'val/accuracy' else 'val_acc'}={clean[k]:.4g}"
                              for k in CONSOLE_KEYS if k in clean)
            self.console.print(f"[bold]step {step}[/bold]  {shown}")

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
