"""`python -m sapo_ray.compare`: run discovery, identity, the table's and the curves' numbers (worked by hand),
the PNG and where it goes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
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


def test_identity_by_directory_name_separates_variants_of_one_algorithm(tmp_path):
    """`--by-dir`: the study's `sapo-seg_newline-seed0` is its own label although its config says sapo."""
    run = write_run(tmp_path / "sapo-seg_newline-seed0", [{"step": 0, "x": 1.0}])
    (run / "config.yaml").write_text("algorithm: {name: sapo}\nseed: 0\n")
    assert compare.run_identity(run) == ("sapo", 0)
    assert compare.run_identity(run, by_dir=True) == ("sapo-seg_newline", 0)
    plain = write_run(tmp_path / "my-run", [{"step": 0, "x": 1.0}])
    assert compare.run_identity(plain, by_dir=True) == ("my-run", None)


def test_table_numbers(sweep, capsys):
    assert compare.main([str(sweep), "--out", ""]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("val/accuracy: first/last/gain (last - first)/best (max over steps)/mean (over steps)")
    rows = {line.split()[0]: line.split() for line in lines[3:]}
    assert set(rows) == {"grpo", "sapo"}
    # grpo: one seed, no std: first 0.0, last 0.25, gain 0.25, best 0.25, mean 0.125, last step 5.
    assert rows["grpo"] == ["grpo", "1", "0", "5", "0.0000", "0.2500", "0.2500", "0.2500", "0.1250"]
    # sapo: first (0.1, 0.2) -> 0.15 ± sqrt(2 * 0.05^2 / 1) = 0.0707; last (0.4, 0.6) -> 0.5 ± 0.1414;
    # gain (0.3, 0.4) -> 0.35 ± 0.0707; best (0.5, 0.6) -> 0.55 ± 0.0707;
    # mean over steps (1.0 / 3, 1.1 / 3) -> 0.35 ± sqrt(2 * (0.1 / 6)^2) = 0.0236.
    assert rows["sapo"] == ["sapo", "2", "0,1", "20", "0.1500", "±", "0.0707", "0.5000", "±", "0.1414",
                            "0.3500", "±", "0.0707", "0.5500", "±", "0.0707", "0.3500", "±", "0.0236"]


def test_summary_values_and_lower_is_better(sweep):
    runs = compare.load_runs([sweep])
    (grpo, sapo) = compare.summarize(runs, "val/accuracy")
    assert (sapo.first, sapo.last, sapo.best) == ([0.1, 0.2], [0.4, 0.6], [0.5, 0.6])
    assert sapo.gain == pytest.approx([0.3, 0.4]) and sapo.mean == pytest.approx([1.0 / 3, 1.1 / 3])
    mean, std = compare.mean_std(sapo.last)
    assert mean == pytest.approx(0.5) and std == pytest.approx(math.sqrt(0.02))
    assert compare.mean_std([0.25]) == (0.25, None)
    # pg_loss: grpo never logged it (left out); sapo seed 0: 0.9, 0.5, 0.7 -> best (min) 0.5; seed 1: 0.4.
    (only,) = compare.summarize(runs, "actor/pg_loss", lower_is_better=True)
    assert only.algorithm == "sapo" and only.best == [0.5, 0.4] and only.first == [0.9, 0.4]


def test_curve_is_the_mean_and_std_over_the_runs_that_logged_each_step():
    """Three runs, partly on different steps: each step averages the runs that logged it there.

    step 0: 1, 3, 2 -> mean 2, std sqrt((1 + 1 + 0) / 2) = 1
    step 10: 2, 4, 6 -> mean 4, std sqrt((4 + 0 + 4) / 2) = 2
    step 20: 4 (run 1 only), step 30: 5 (run 3 only) -> no std
    """
    run = lambda *points: compare.Run(Path("r"), "sapo", 0, {"m": list(points), "other": [(99, 7.0)]})
    runs = [run((0, 1.0), (10, 2.0), (20, 4.0)), run((0, 3.0), (10, 4.0)), run((0, 2.0), (10, 6.0), (30, 5.0))]
    steps, mean, std = compare.curve(runs, "m")
    assert steps == [0, 10, 20, 30]
    assert mean == pytest.approx([2.0, 4.0, 4.0, 5.0])
    assert std[:2] == pytest.approx([1.0, 2.0]) and std[2:] == [None, None]
    # One run: its own values, no std anywhere.
    assert compare.curve(runs[1:2], "m") == ([0, 10], [3.0, 4.0], [None, None])


def test_figure_draws_mean_curves_and_std_bands(sweep):
    """What the PNG shows: sapo's mean over its two seeds with a +-std band, grpo's single run without one."""
    summaries = compare.summarize(compare.load_runs([sweep]), "val/accuracy")
    fig = compare.draw_curves(summaries, "val/accuracy", size=(800, 500))
    assert tuple(fig.get_size_inches() * fig.dpi) == (800, 500)
    (ax,) = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("step", "val/accuracy")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["grpo (1 seed)", "sapo (2 seeds)"]
    grpo, sapo = ax.lines
    assert grpo.get_xydata().tolist() == [[0, 0.0], [5, 0.25]]
    # sapo seeds: (0.1, 0.2), (0.5, 0.3), (0.4, 0.6) at steps 0, 10, 20; std of two values = |a - b| / sqrt(2).
    mean, std = [0.15, 0.4, 0.5], [0.1 / math.sqrt(2), 0.2 / math.sqrt(2), 0.2 / math.sqrt(2)]
    np.testing.assert_allclose(sapo.get_xydata(), [[0, 0.15], [10, 0.4], [20, 0.5]])
    assert grpo.get_color() != sapo.get_color()
    (band,) = ax.collections  # grpo has one run: no band
    np.testing.assert_allclose(band.get_facecolor()[0][:3], to_rgb(sapo.get_color()))
    vertices = band.get_paths()[0].vertices
    for step, m, sd in zip([0, 10, 20], mean, std):
        ys = vertices[vertices[:, 0] == step][:, 1]
        assert (ys.min(), ys.max()) == pytest.approx((m - sd, m + sd))


def _has_colour(image, colour: str, tolerance: int = 40) -> bool:
    target = np.array(to_rgb(colour)) * 255
    pixels = np.asarray(image.convert("RGB"), dtype=float).reshape(-1, 3)
    return bool((np.abs(pixels - target).max(axis=1) < tolerance).any())


def test_png_is_a_valid_image_of_the_curves(sweep, tmp_path, capsys):
    out = tmp_path / "plots" / "curves.png"
    assert compare.main([str(sweep), "--out", str(out)]) == 0
    assert f"curves: {out}" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (960, 600)
        image.load()
        # One colour per algorithm in sorted order (grpo C0, sapo C1), and no third.
        assert _has_colour(image, "C0") and _has_colour(image, "C1") and not _has_colour(image, "C2")


def test_png_goes_next_to_the_runs_by_default(sweep, tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert compare.main([str(sweep)]) == 0
    assert (sweep / "val_accuracy.png").is_file()
    # Two runs named directly: their common parent; one run: the run itself.
    assert compare.main([str(sweep / "a"), str(sweep / "b"), "--metric", "actor/pg_loss"]) == 0
    assert (sweep / "actor_pg_loss.png").is_file()
    assert compare.main([str(sweep / "a"), "--metric", "critic/score/mean"]) == 0
    assert (sweep / "a" / "critic_score_mean.png").is_file()
    assert not list(elsewhere.iterdir())
    # --out '' draws nothing.
    assert compare.main([str(sweep), "--metric", "val/accuracy", "--out", ""]) == 0
    assert sorted(p.name for p in sweep.rglob("*.png")) == ["actor_pg_loss.png", "critic_score_mean.png",
                                                           "val_accuracy.png"]
    capsys.readouterr()
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert compare.main([str(sweep), "--out", str(blocked / "x.png")]) == 2
    assert f"cannot write the curves to {blocked / 'x.png'}" in capsys.readouterr().err


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
