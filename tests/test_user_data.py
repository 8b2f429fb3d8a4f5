"""A user's own data and reward end to end: a jsonl with bad rows of every kind, a reward file returning a
dict, two training steps, then the checkpoint evaluated alone (`trainer.val_only`) with its generations."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from helpers import tiny_cfg

sys.path.insert(0, str(Path(__file__).parent / "data"))
from fixtures import CUSTOM_BAD_ROWS, write_custom_jsonl  # noqa: E402  (tests/data/fixtures.py)

HOOKS = Path(__file__).parent / "reward" / "hooks.py"


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_custom_jsonl_and_dict_reward_train_then_evaluate_the_checkpoint(ray_cluster, tmp_path):
    from sapo_ray.main import run

    train = write_custom_jsonl(tmp_path / "data", 8, "train")
    val = write_custom_jsonl(tmp_path / "data", 3, "test")
    run_dir = tmp_path / "run"
    data = ["data=custom", f"data.train_path={train}", f"data.val_path={val}", f"reward.custom={HOOKS}:with_extras",
            "data.prompts_per_step=4", "data.val_size=null"]
    run(tiny_cfg(run_dir, "bundled:tiny-vlm", *data, "trainer.export_hf=false", "trainer.dump_rollouts=true"))

    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["train"]["rows"] == 8 + sum(CUSTOM_BAD_ROWS.values()) and report["train"]["used"] == 8
    assert report["train"]["skipped"] == CUSTOM_BAD_ROWS == report["val"]["skipped"]
    assert {r["file"] for r in report["train"]["skipped_rows"]} == {str(train)}
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["reward/errors"] == 0 and r["reward/samples"] == 8 and math.isfinite(r["reward/chars"])
    assert "val/reward/chars" in rows[0] and "val/reward/chars" in rows[2]
    dumped = [json.loads(line) for line in (run_dir / "generations" / "rollout_step_000001.jsonl").read_text().splitlines()]
    assert len(dumped) == 8 and all(d["uid"].startswith("utrain") and d["chars"] == len(d["response"]) for d in dumped)

    checkpoint = run_dir / "checkpoints" / "step_000002"
    eval_dir = tmp_path / "eval"
    result = run(tiny_cfg(eval_dir, "bundled:tiny-vlm", *data, "trainer.val_only=true", f"trainer.resume={checkpoint}",
                          "trainer.export_hf=false"))
    assert read_metrics(eval_dir)[-1]["step"] == 2 and result["val/accuracy_greedy"] == rows[2]["val/accuracy_greedy"]
    generations = [json.loads(line) for line in (eval_dir / "generations" / "val_step_000002.jsonl").read_text().splitlines()]
    assert sorted(g["uid"] for g in generations if g["sampling"] == "greedy") == ["utest0", "utest1", "utest2"]
    assert not (eval_dir / "checkpoints").exists()
