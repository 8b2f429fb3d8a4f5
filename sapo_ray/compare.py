"""Compare training runs: a table of one metric per algorithm over seeds, and a PNG of the curves.

    python -m sapo_ray.compare RUN_DIR [RUN_DIR ...] [--metric val/accuracy] [--out PATH]

A RUN_DIR is a directory with `metrics.jsonl` (a run's `trainer.run_dir`) or any directory above
such runs (a Hydra multirun sweep dir); every run found under it is included. A run's algorithm and
seed come from its `.hydra/config.yaml` (`algorithm.name`, `seed`) when present, else from a
directory name ending in `<algorithm>-seed<N>` (the default `trainer.experiment`), else the whole
directory name is the algorithm. `--by-dir` labels a run by its directory name before `-seed<N>`
instead (`sapo-seg_newline-seed0` is `sapo-seg_newline`): the study's variants of one algorithm. Any metric in `metrics.jsonl` can be compared (`--metric`).

For each run the metric's series gives five numbers: `first` (value at the first logged step),
`last` (at the last), `gain` (last - first), `best` (max over steps; min with --lower-is-better) and
`mean` (over the logged steps: for per-step numbers such as the critic's explained variance). The table reports
each as mean ± std over the algorithm's runs, std being the sample standard deviation (n - 1; shown
only for n >= 2).

The PNG (960 x 600) draws, per algorithm in one colour, the mean of the metric over its runs at each
step with a band of ± one sample std; the legend gives each algorithm's number of runs (seeds). At a
step that only some of an algorithm's runs logged (a run that stopped early, validation at other
steps) mean and std are over the runs that did; where one run did, there is no band. It is written
to `--out`, by default to `<metric with / replaced by _>.png` (`val_accuracy.png`) in the deepest
directory that holds all the compared runs: the sweep dir, the common parent of the RUN_DIRs, or the
run itself when there is one; `--out ''` draws nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
# `<anything>-<algorithm>-seed<N>`: Hydra's sweep subdir `0-sapo-seed1`, run dir `12-00-00-grpo-seed0`.
DIR_NAME = re.compile(r"(?:^|-)(?P<algorithm>[^-]+)-seed(?P<seed>\d+)$")
# `--by-dir`: everything before `-seed<N>` is the label.
DIR_NAME_LABEL = re.compile(r"^(?P<label>.+)-seed(?P<seed>\d+)$")


class CompareError(ValueError):
    """A run directory or metric the user named cannot be compared; the message says why."""


@dataclass
class Run:
    path: Path
    algorithm: str
    seed: int | None
    # Metric name -> [(step, value)] sorted by step, one value per step.
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.algorithm} seed {self.seed}" if self.seed is not None else f"{self.algorithm} ({self.path.name})"


@dataclass
class Summary:
    """One algorithm's numbers for one metric: per-run values and their mean/std over runs."""

    algorithm: str
    runs: list[Run]
    first: list[float]
    last: list[float]
    best: list[float]
    mean: list[float]  # each run's mean over its logged steps
    last_step: int

    @property
    def seeds(self) -> list[int | None]:
        return [r.seed for r in self.runs]

    @property
    def gain(self) -> list[float]:
        """Each run's last value less its first: a seed's gain, whose spread over seeds is not the spread of
        `last` when the runs start apart."""
        return [last - first for first, last in zip(self.first, self.last)]


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); std is None for a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


# -- reading runs ----------------------------------------------------------------------------------
def find_runs(paths: list[str | Path]) -> list[Path]:
    """The run directories named by `paths`: each path itself if it holds metrics.jsonl, else every
    directory under it that does (sorted). Raises CompareError for a path with none."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise CompareError(f"{p}: no such directory")
        if not p.is_dir():
            raise CompareError(f"{p}: not a directory; pass a run directory (with {METRICS_FILE}) or a sweep directory")
        if (p / METRICS_FILE).is_file():
            runs = [p]
        else:
            runs = sorted(f.parent for f in p.rglob(METRICS_FILE) if f.is_file())
        if not runs:
            raise CompareError(f"{p}: no {METRICS_FILE} here or in any directory below it; pass a run's "
                               f"trainer.run_dir (or Hydra's job dir) or a multirun sweep dir "
                               f"(was the run started with trainer.loggers including jsonl?)")
        seen = {f.resolve() for f in found}
        found += [r for r in runs if r.resolve() not in seen]
    return found


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """`metrics.jsonl` as metric -> [(step, value)], sorted by step. A step logged twice (a resumed
    run re-logs the steps after its checkpoint) keeps its last value; nulls (non-finite values) are
    skipped; a truncated last line (a run killed mid-write) is ignored."""
    lines = path.read_text().splitlines()
    by_step: dict[int, dict] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                print(f"warning: {path}:{number}: ignoring a truncated last line", file=sys.stderr)
                continue
            raise CompareError(f"{path}:{number}: not a JSON object ({err})") from None
        if not isinstance(row, dict) or "step" not in row:
            raise CompareError(f"{path}:{number}: expected a JSON object with a 'step' key")
        by_step.setdefault(int(row["step"]), {}).update(row)
    series: dict[str, list[tuple[int, float]]] = {}
    for step in sorted(by_step):
        for key, value in by_step[step].items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if key != "step" and numeric and math.isfinite(value):
                series.setdefault(key, []).append((step, float(value)))
    return series


def run_identity(path: Path, by_dir: bool = False) -> tuple[str, int | None]:
    """(algorithm, seed) of a run directory: its Hydra config, else its name; with `by_dir` its name
    first (`sapo-seg_newline-seed0` -> ("sapo-seg_newline", 0)), for variants of one algorithm."""
    if by_dir and (match := DIR_NAME_LABEL.search(path.name)):
        return match["label"], int(match["seed"])
    for config in (path / ".hydra" / "config.yaml", path / "config.yaml"):
        if config.is_file():
            import yaml

            cfg = yaml.safe_load(config.read_text()) or {}
            algorithm = (cfg.get("algorithm") or {}).get("name")
            if algorithm:
                seed = cfg.get("seed")
                return str(algorithm), int(seed) if isinstance(seed, int) else None
    match = DIR_NAME.search(path.name)
    if match:
        return match["algorithm"], int(match["seed"])
    return path.name, None


def load_runs(paths: list[str | Path], by_dir: bool = False) -> list[Run]:
    runs = []
    for path in find_runs(paths):
        algorithm, seed = run_identity(path, by_dir)
        runs.append(Run(path, algorithm, seed, read_metrics(path / METRICS_FILE)))
    return runs


# -- summarising -----------------------------------------------------------------------------------
def summarize(runs: list[Run], metric: str, lower_is_better: bool = False) -> list[Summary]:
    """Per algorithm (sorted by name): first/last/best of `metric` in each run that logged it.
    Runs without the metric are left out with a warning; none at all raises CompareError."""
    missing = [r for r in runs if not r.series.get(metric)]
    if len(missing) == len(runs):
        known = sorted({k for r in runs for k in r.series})
        hint = [k for k in known if k.startswith("val/")] or known
        raise CompareError(f"no run logged metric {metric!r}; pass --metric with one of: {', '.join(hint[:30])}"
                           + (" ..." if len(hint) > 30 else ""))
    for r in missing:
        print(f"warning: {r.path} has no values of {metric!r}; left out", file=sys.stderr)
    groups: dict[str, list[Run]] = {}
    for r in runs:
        if r.series.get(metric):
            groups.setdefault(r.algorithm, []).append(r)
    pick = min if lower_is_better else max
    out = []
    for algorithm in sorted(groups):
        members = sorted(groups[algorithm], key=lambda r: (r.seed is None, r.seed or 0, str(r.path)))
        values = [[v for _, v in r.series[metric]] for r in members]
        out.append(Summary(algorithm, members, [v[0] for v in values], [v[-1] for v in values],
                           [pick(v) for v in values], [sum(v) / len(v) for v in values],
                           max(r.series[metric][-1][0] for r in members)))
    return out


def _fmt(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def format_table(summaries: list[Summary], metric: str, lower_is_better: bool = False) -> str:
    """A plain-text table: algorithm, runs, their seeds, last step, first/last/gain/best/mean as mean ± std."""
    header = ["algorithm", "runs", "seeds", "steps", "first", "last", "gain", "best", "mean"]
    rows = [[s.algorithm, str(len(s.runs)), ",".join("?" if x is None else str(x) for x in s.seeds),
             str(s.last_step), _fmt(s.first), _fmt(s.last), _fmt(s.gain), _fmt(s.best), _fmt(s.mean)]
            for s in summaries]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    best = "min" if lower_is_better else "max"
    title = (f"{metric}: first/last/gain (last - first)/best ({best} over steps)/mean (over steps) per run, "
             "mean ± std (n-1) over runs")
    return "\n".join([title, line(header), line(["-" * w for w in widths]), *map(line, rows)])


# -- plotting --------------------------------------------------------------------------------------
def curve(runs: list[Run], metric: str) -> tuple[list[int], list[float], list[float | None]]:
    """`metric` over the steps any of `runs` logged it: (steps, mean, std), the mean and sample std
    (n - 1) at each step over the runs that logged it there (std None where fewer than two did)."""
    by_step: dict[int, list[float]] = {}
    for r in runs:
        for step, value in r.series.get(metric, []):
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    stats = [mean_std(by_step[s]) for s in steps]
    return steps, [m for m, _ in stats], [sd for _, sd in stats]


def draw_curves(summaries: list[Summary], metric: str, size: tuple[int, int] = (960, 600)):
    """A matplotlib Figure of `size` pixels: per algorithm (one colour each) the mean of `metric` over its
    runs at each step and a band of +-1 sample std where at least two runs logged that step (`curve`)."""
    # A Figure on the Agg canvas directly, not pyplot: no display needed, and the backend of a program
    # that imports this module is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, s in enumerate(summaries):
        steps, mean, std = curve(s.runs, metric)
        colour = f"C{i % 10}"
        n = len(s.runs)
        # Markers on sparse series (validation every N steps): a step logged alone would draw nothing.
        ax.plot(steps, mean, color=colour, marker="o" if len(steps) <= 30 else None, markersize=3,
                label=f"{s.algorithm} ({n} seed{'s' if n != 1 else ''})")
        if any(sd is not None for sd in std):
            lo = [m - sd if sd is not None else math.nan for m, sd in zip(mean, std)]
            hi = [m + sd if sd is not None else math.nan for m, sd in zip(mean, std)]
            ax.fill_between(steps, lo, hi, color=colour, alpha=0.2, linewidth=0)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    return fig


def plot_curves(summaries: list[Summary], metric: str, out: str | Path, size: tuple[int, int] = (960, 600)) -> Path:
    """Save `draw_curves` as a PNG of `size` pixels at `out` (parent directories created)."""
    fig = draw_curves(summaries, metric, size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=fig.dpi)
    return out


def default_out(runs: list[Run], metric: str) -> Path:
    """`<metric, / as _>.png` in the deepest directory holding every run (a sweep dir; for one run, its own)."""
    common = Path(os.path.commonpath([str(r.path.absolute()) for r in runs]))
    return common / f"{metric.replace('/', '_')}.png"


# -- command line ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sapo_ray.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run directories (with metrics.jsonl) or sweep directories")
    parser.add_argument("--metric", default="val/accuracy",
                        help="metric name as logged in metrics.jsonl (default: %(default)s)")
    parser.add_argument("--out", default=None,
                        help="PNG of the curves (default: <metric, / as _>.png in the directory holding the runs); "
                             "'' = no plot")
    parser.add_argument("--lower-is-better", action="store_true", help="best = min over steps (losses, lengths)")
    parser.add_argument("--by-dir", action="store_true",
                        help="group runs by their directory name before -seed<N> (variants of one algorithm)")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.runs, args.by_dir)
        summaries = summarize(runs, args.metric, args.lower_is_better)
    except CompareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(summaries, args.metric, args.lower_is_better))
    if args.out == "":
        return 0
    out = Path(args.out) if args.out is not None else default_out(runs, args.metric)
    try:
        print(f"curves: {plot_curves(summaries, args.metric, out)}")
    except OSError as err:
        print(f"error: cannot write the curves to {out} ({err}); pass --out PATH elsewhere, or --out '' for none",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
