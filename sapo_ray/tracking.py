"""Metrics sinks (`trainer.loggers`): console (rich), `metrics.jsonl` in the run directory, TensorBoard,
W&B and MLflow; and the generation dumps (`generations/*.jsonl`)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
import uuid
from dataclasses import asdict
from pathlib import Path

SHORT = {"critic/score/mean": "score", "val/accuracy": "val_acc", "val/accuracy_greedy": "val_acc_greedy",
         "actor/pg_clipfrac": "clipfrac", "actor/ppo_kl": "ppo_kl", "actor/entropy": "entropy",
         "critic/vf_explained_var": "vf_ev", "response_length/mean": "resp_len", "timing_s/step": "step_s",
         "perf/throughput": "tok/s"}
CONSOLE_KEYS = tuple(SHORT)


def generation_records(samples, examples: list[dict], scores: list[dict], **fields) -> list[dict]:
    """One JSON-able record per sample: `fields`, the example's id, prompt (its query) and gold answer, the
    response (a multi-turn episode's last turn, and its whole transcript with its turns, tool calls and
    failed calls), its scores (with a reward function's extra numbers), and the row's own columns (a custom
    dataset's, such as its id, for joining; the record's keys win a clash)."""
    records = []
    for sample, scored in zip(samples, scores):
        example = examples[sample.prompt_index]
        episode = {} if sample.episode is None else asdict(sample.episode)
        records.append({**{k: example[k] for k in example.get("columns", ())}, **fields, "pid": example["pid"],
                        "prompt": example["query"], "response": sample.text, "answer": example["answer"],
                        "finished": sample.finished, "response_length": len(sample.response_ids), **episode,
                        **scored})
    return records


def experience_records(batch, samples: list, examples: list[dict], texts: list[list[str]], trace=None, images: list[list[str]] | None = None,
                       **fields) -> list[dict]:
    """One JSON-able record per row of a trained `batch` (`sapo_ray.inspect` reads them): `fields`, the row's
    example (`examples[i]`), reward, and per response token (observations included, no padding) its text
    (`texts`, `bookkeeping.token_texts`), whether an environment wrote it, the old policy's entropy, the
    advantage and, where the algorithm has them, the critic's value, return and value anchors, the segment
    ends, and what the policy loss saw (`trace`: a `LossTrace` of the update); a multi-turn episode's counts
    (`samples[i].episode`, its transcript left to the tokens). `images`: each row's image files, relative
    to the dump."""
    filled = batch.filled()

    def per_token(name: str, i: int, n: int, kind=float):
        return None if name not in filled else [kind(x) for x in filled[name][i, :n].tolist()]

    records = []
    for i, (sample, example, tokens) in enumerate(zip(samples, examples, texts)):
        n = len(tokens)
        episode = None if sample.episode is None else {k: v for k, v in asdict(sample.episode).items() if k != "transcript"}
        records.append({
            **fields, "row": i, "group": int(batch.group_index[i]), "pid": example["pid"], "prompt": example["query"],
            "answer": example["answer"], "score": round(float(batch.scores[i]), 6), "acc": float(batch.acc[i]),
            "format": float(batch.format[i]), "images": [] if images is None else images[i], "tokens": tokens,
            "observation": [int(x) for x in batch.observation_mask[i, :n].tolist()],
            "entropy": per_token("entropy", i, n), "advantages": per_token("advantages", i, n),
            "values": per_token("values", i, n), "anchors": per_token("value_mask", i, n, int),
            "returns": per_token("returns", i, n), "seg_end": per_token("seg_end", i, n, int),
            "log_ratio": None if trace is None else trace.log_ratio[i, :n].tolist(),
            "clipped": None if trace is None else [int(x) for x in trace.held[i, :n].tolist()],
            "episode": episode})
    return records


def save_images(images: list, directory: Path) -> list[str]:
    """`images` (PIL) as PNG files in `directory`, each named by its content's hash (a prompt's image is
    written once however often it is sampled); their names."""
    import hashlib
    import io

    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for image in images:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
        name = hashlib.sha1(data).hexdigest()[:16] + ".png"
        if not (directory / name).exists():
            (directory / name).write_bytes(data)
        names.append(name)
    return names


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


class JsonlSink:
    """`metrics.jsonl`: one object per logged step (non-finite values as null)."""

    def __init__(self, run_dir: Path, project: str, experiment: str, config: dict):
        self.path = run_dir / "metrics.jsonl"
        self.file = open(self.path, "a")

    def rewind(self, done: int) -> None:
        """Drop the rows past step `done` (they will be logged again)."""
        self.file.close()
        lines = self.path.read_text().splitlines() if done else []
        kept = [line for line in lines if (step := _step_of(line)) is not None and step <= done]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.file.write(json.dumps({"step": step, **{k: (v if math.isfinite(v) else None) for k, v in metrics.items()}}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    def __init__(self, run_dir: Path, project: str, experiment: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _run_id(run_dir: Path, name: str, new) -> str:
    """The tracker run id kept in `run_dir/name`, so a continued run logs into the same tracker run."""
    path = run_dir / name
    if path.exists():
        return path.read_text().strip()
    run_id = new()
    path.write_text(run_id)
    return run_id


class WandbSink:
    """Weights & Biases under `run_dir/wandb`; WANDB_MODE=offline logs without a network (`wandb sync`
    uploads it later). A continued run logs into the same W&B run; steps it trains again after a
    checkpoint are re-sent, and W&B keeps the first values it received for them."""

    def __init__(self, run_dir: Path, project: str, experiment: str, config: dict):
        import wandb

        run_id = _run_id(run_dir, "wandb_run_id", lambda: uuid.uuid4().hex[:12])
        self.run = wandb.init(project=project, name=experiment, id=run_id, resume="allow", config=config,
                              dir=str(run_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    """MLflow: the server or store MLFLOW_TRACKING_URI names, else a local one in the run directory
    (`sqlite:///<run_dir>/mlflow.db`: MLflow's file store refuses new runs since 3.x unless
    MLFLOW_ALLOW_FILE_STORE is set). The config goes in as parameters (`actor.optim.lr`, ...)."""

    def __init__(self, run_dir: Path, project: str, experiment: str, config: dict):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)

        def new_run() -> str:
            found = self.client.get_experiment_by_name(project)
            experiment_id = found.experiment_id if found else self.client.create_experiment(project)
            run = self.client.create_run(experiment_id, run_name=experiment)
            params = [Param(k, str(v)[:6000]) for k, v in flatten(config).items()]
            for start in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
                self.client.log_batch(run.info.run_id, params=params[start:start + 100])
            return run.info.run_id

        self.run_id = _run_id(run_dir, "mlflow_run_id", new_run)

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, v, now, step) for k, v in metrics.items() if math.isfinite(v)]
        for start in range(0, len(rows), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=rows[start:start + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


# `trainer.loggers` entries besides `console`: the sink, and the modules it needs beyond sapo-ray's own
# with what installs them (MLflow's local store is SQLite through SQLAlchemy and alembic).
SINKS = {"jsonl": (JsonlSink, (), ""), "tensorboard": (TensorBoardSink, (), ""),
         "wandb": (WandbSink, ("wandb",), "wandb"),
         "mlflow": (MlflowSink, ("mlflow", "sqlalchemy", "alembic"), "mlflow-skinny sqlalchemy alembic")}
LOGGERS = ("console", *SINKS)


def missing_logger_packages(loggers) -> list[str]:
    """One line per requested logger whose packages are not installed, naming what to install."""
    missing = []
    for name in loggers:
        _, modules, install = SINKS.get(name, (None, (), ""))
        absent = [m for m in modules if importlib.util.find_spec(m) is None]
        if absent:
            missing.append(f"trainer.loggers has {name}, which needs {', '.join(absent)}: pip install {install}")
    return missing


def flatten(tree: dict, prefix: str = "") -> dict:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Tracker:
    def __init__(self, run_dir: str, loggers: list[str], project: str, experiment: str, config: dict):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        unknown = set(loggers) - set(LOGGERS)
        if unknown:  # `config_checks.validate` names them, and missing packages, before Ray starts
            raise ValueError(f"trainer.loggers has unknown entries {sorted(unknown)}; use {', '.join(LOGGERS)}")
        self.loggers = list(loggers)
        self.sinks = [SINKS[name][0](self.run_dir, project, experiment, config) for name in loggers if name in SINKS]
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
        for sink in self.sinks:
            if hasattr(sink, "rewind"):
                sink.rewind(done)

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        for sink in self.sinks:
            sink.log(clean, step)
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
        for sink in self.sinks:
            sink.close()
