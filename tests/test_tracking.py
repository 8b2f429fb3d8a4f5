"""Every tracker in `trainer.loggers` gets the metrics: read back from what each one wrote."""

from __future__ import annotations

import json
import struct
import time

import pytest

from sapo_ray.config import ConfigError, compose_config
from sapo_ray.config_checks import validate
from sapo_ray.tracking import SINKS, Tracker, missing_logger_packages

ROWS = {1: {"actor/pg_loss": 0.5, "val/accuracy": 0.25}, 2: {"actor/pg_loss": -0.125, "critic/vf_loss": 3.0}}
CONFIG = {"actor": {"optim": {"lr": 2e-5}}, "seed": 0}


def log_rows(tmp_path, logger: str) -> None:
    tracker = Tracker(str(tmp_path), [logger], "sapo-ray-test", "sapo-seed0", CONFIG)
    tracker.start(total_steps=2, done=0)
    for step, row in ROWS.items():
        tracker.log(row, step)
    tracker.close()


def wandb_records(path):
    """The records of a `.wandb` file: W&B's log format (a 7-byte ':W&B' header, then 32 KiB blocks of
    chunks, each with a 7-byte header: crc32, little-endian length, type 1 full / 2 first / 3 middle / 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, pos, block, partial = [], 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        partial += chunk
        if kind in (1, 4):
            records.append(partial)
            partial = b""
    return records


def test_wandb_offline_logs_every_step(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from wandb.proto import wandb_internal_pb2 as pb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log_rows(tmp_path, "wandb")
    [run_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    # W&B's own process writes the file; on a loaded machine its last records can land after `finish()`
    # returned: read once the run's `exit` record is there.
    deadline = time.monotonic() + 60
    while True:
        records = [pb.Record.FromString(raw) for raw in wandb_records(run_file)]
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    history, config = {}, {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history[items.pop("_step")] = {k: v for k, v in items.items() if not k.startswith("_")}
        elif kind in ("run", "config"):  # the config comes with the run's record, updates after it
            update = record.run.config.update if kind == "run" else record.config.update
            config.update({i.key: json.loads(i.value_json) for i in update})
    assert history == ROWS
    assert config["actor"] == {"optim": {"lr": 2e-5}}
    assert (tmp_path / "wandb_run_id").read_text() in run_file.name  # a continued run logs into the same run


def test_mlflow_logs_every_step_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    log_rows(tmp_path, "mlflow")
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = (tmp_path / "mlflow_run_id").read_text()
    for key in ("actor/pg_loss", "val/accuracy", "critic/vf_loss"):
        logged = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert logged == {step: row[key] for step, row in ROWS.items() if key in row}, key
    run = client.get_run(run_id)
    assert run.data.params["actor.optim.lr"] == "2e-05" and run.info.run_name == "sapo-seed0"
    assert run.info.status == "FINISHED"


def test_a_missing_package_is_named_before_the_run(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert missing_logger_packages(["console", "wandb"]) == [
        "trainer.loggers has wandb, which needs wandb: pip install wandb"]
    with pytest.raises(ConfigError, match="pip install wandb"):
        validate(compose_config("trainer.loggers=[console,wandb]"))
    with pytest.raises(ConfigError, match=r"unknown entries \['neptune'\]"):
        validate(compose_config("trainer.loggers=[neptune]"))
    assert set(SINKS) == {"jsonl", "tensorboard", "wandb", "mlflow"}
