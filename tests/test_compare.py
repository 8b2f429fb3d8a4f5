"""`python -m sapo_ray.compare`: run discovery, identity, the table's numbers (worked by hand), the PNG."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from sapo_ray import compare


def write_run(path: Path, rows: list[dict | str], config: dict | None = None) -> Path:
    """A run directory: metrics.jsonl from `rows` (a str is written verbatim) and optional .hydra/config.yaml."""
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    if config is not None:
        import yaml

        (path / ".hydra").mkdir()
        (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def sweep(tmp_path) -> Path:
    """sapo x 2 seeds named only by their Hydra config, grpo x 1 seed named only by its directory.

    sapo seed 0: val/accuracy 0.1 (step 0), 0.5 (10), 0.4 (20)
    sapo seed 1: 0.2, 0.3, 0.6 -- step 10 logged twice (a resume), the last value (0.3) counts;
                 a truncated last line (a run killed mid-write)
    grpo seed 0: 0.0, 0.25 at steps 0 and 5 (steps in between log training metrics only)
    """
    root = tmp_path / "sweep"
    write_run(root / "a", [
        {"step": 0, "val/accuracy": 0.1},
        {"step": 1, "critic/score/mean": 0.3, "actor/pg_loss": 0.9},
        {"step": 10, "val/accuracy": 0.5, "actor/pg_loss": 0.5},
        {"step": 20, "val/accuracy": 0.4, "actor/pg_loss": 0.7},
    ], config={"algorithm": {"name": "sapo"}, "seed": 0, "trainer": {"run_dir": "${hydra:runtime.output_dir}"}})
    write_run(root / "b", [
        {"step": 0, "val/accuracy": 0.2},
        {"step": 10, "val/accuracy": 0.9, "actor/pg_loss": 0.8},
        {"step": 10, "val/accuracy": 0.3, "actor/pg_loss": 0.4},
        {"step": 20, "val/accuracy": 0.6, "actor/pg_loss": None},
        '{"step": 21, "val/acc',
    ], config={"algorithm": {"name": "sapo"}, "seed": 1})
    write_run(root / "2-grpo-seed0", [
        {"step": 0, "val/accuracy": 0.0},
        {"step": 1, "critic/score/mean": 0.1},
        {"step": 5, "val/accuracy": 0.25},
    ])
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_finds_runs_and_identity(sweep):
    runs = compare.load_runs([sweep])
    assert [(r.path.name, r.algorithm, r.seed) for r in runs] == [
        ("2-grpo-seed0", "grpo", 0), ("a", "sapo", 0), ("b", "sapo", 1)]
    # The resumed step keeps its last value; the truncated line and nulls are dropped.
    assert runs[2].series["val/accuracy"] == [(0, 0.2), (10, 0.3), (20, 0.6)]
    assert runs[2].series["actor/pg_loss"] == [(10, 0.4)]
    # A run dir passed directly, twice, is one run.
    assert len(compare.load_runs([sweep / "a", sweep / "a"])) == 1


def test_identity_from_directory_names(tmp_path):
    for name, expected in [("0-dr_grpo-seed2", ("dr_grpo", 2)), ("09-23-14-sapo-seed11", ("sapo", 11)),
                           ("grpo-seed0", ("grpo", 0)), ("my-run", ("my-run", None))]:
        assert compare.run_identity(write_run(tmp_path / name, [{"step": 0, "x": 1.0}])) == expected


def test_table_numbers(sweep, capsys):
    assert compare.main([str(sweep), "--out", ""]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("val/accuracy: first/last/best (max over steps)")
    rows = {line.split()[0]: line.split() for line in lines[3:]}
    assert set(rows) == {"grpo", "sapo"}
    # grpo: one seed, no std: first 0.0, last 0.25, best 0.25, last step 5.
    assert rows["grpo"] == ["grpo", "1", "0", "5", "0.0000", "0.2500", "0.2500"]
    # sapo: first (0.1, 0.2) -> 0.15 ± sqrt(2 * 0.05^2 / 1) = 0.0707; last (0.4, 0.6) -> 0.5 ± 0.1414;
    # best (0.5, 0.6) -> 0.55 ± 0.0707.
    assert rows["sapo"] == ["sapo", "2", "0,1", "20", "0.1500", "±", "0.0707", "0.5000", "±", "0.1414",
                            "0.5500", "±", "0.0707"]


def test_summary_values_and_lower_is_better(sweep):
    runs = compare.load_runs([sweep])
    (grpo, sapo) = compare.summarize(runs, "val/accuracy")
    assert (sapo.first, sapo.last, sapo.best) == ([0.1, 0.2], [0.4, 0.6], [0.5, 0.6])
    mean, std = compare.mean_std(sapo.last)
    assert mean == pytest.approx(0.5) and std == pytest.approx(math.sqrt(0.02))
    assert compare.mean_std([0.25]) == (0.25, None)
    # pg_loss: grpo never logged it (left out); sapo seed 0: 0.9, 0.5, 0.7 -> best (min) 0.5; seed 1: 0.4.
    (only,) = compare.summarize(runs, "actor/pg_loss", lower_is_better=True)
    assert only.algorithm == "sapo" and only.best == [0.5, 0.4] and only.first == [0.9, 0.4]


def test_png_is_a_valid_image_of_the_curves(sweep, tmp_path, capsys):
    out = tmp_path / "plots" / "curves.png"
    assert compare.main([str(sweep), "--out", str(out)]) == 0
    assert f"curves: {out}" in capsys.readouterr().out
    assert out.stat().st_size > 0
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (960, 600)
        colours = {c for _, c in image.convert("RGB").getcolors(maxcolors=1 << 20)}
    # One colour per algorithm, in sorted order: grpo first, sapo second.
    rgb = lambda h: tuple(int(h[i:i + 2], 16) for i in (1, 3, 5))
    assert rgb(compare.PALETTE[0]) in colours and rgb(compare.PALETTE[1]) in colours
    assert rgb(compare.PALETTE[2]) not in colours


def test_clear_errors(sweep, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    assert compare.main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert str(empty) in err and "no metrics.jsonl here or in any directory below it" in err
    assert compare.main([str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert compare.main([str(sweep), "--metric", "val/acc", "--out", ""]) == 2
    assert "no run logged metric 'val/acc'; pass --metric with one of: val/accuracy" in capsys.readouterr().err
    bad = write_run(tmp_path / "bad", ["not json", '{"step": 1, "x": 2}'])
    with pytest.raises(compare.CompareError, match=rf"{bad}/metrics.jsonl:1: not a JSON object"):
        compare.load_runs([bad])


def test_module_entry_point(sweep, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sapo_ray.compare", str(sweep), "--metric", "critic/score/mean",
                           "--out", str(tmp_path / "c.png")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "warning" in proc.stderr and "sapo" in proc.stdout and "grpo" in proc.stdout
    assert (tmp_path / "c.png").stat().st_size > 0
