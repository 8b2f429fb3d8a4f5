"""The package's layers, checked: no import cycle, no import from a lower layer to a higher one, every
module in a layer; and the linter (ruff, the rules in pyproject.toml). Imports inside functions count:
a lazy import hides a cycle from Python, not from the design.

The layers, lowest first (sapo_ray/README.md draws them):
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sapo_ray"

LAYERS = {
    # Pure functions, data types and helpers: the algorithm, the batch, the data and the rewards.
    "ground": ["sapo_ray", "sapo_ray.utils", "sapo_ray.workers", "sapo_ray.errors", "sapo_ray.net", "sapo_ray.remote", "sapo_ray.signals",
               "sapo_ray.batch", "sapo_ray.algo", "sapo_ray.bookkeeping", "sapo_ray.placement", "sapo_ray.tracking",
               "sapo_ray.precision", "sapo_ray.data", "sapo_ray.reward", "sapo_ray.envs"],
    # The typed config every process reads.
    "schema": ["sapo_ray.config"],
    "models": ["sapo_ray.models"],
    # What runs inside the actors: learner ranks, engines, the weight sync.
    "actors": ["sapo_ray.learner", "sapo_ray.rollout", "sapo_ray.sync"],
    # Checks before Ray starts: the config's cross-field checks and the memory plan.
    "checks": ["sapo_ray.config_checks", "sapo_ray.plan"],
    # The driver: the loop and the pieces it orchestrates.
    "driver": ["sapo_ray.rollouts", "sapo_ray.checkpoints", "sapo_ray.validation", "sapo_ray.preflight",
               "sapo_ray.startup", "sapo_ray.trainer"],
    # Command-line entry points.
    "entry points": ["sapo_ray.main", "sapo_ray.sft", "sapo_ray.export", "sapo_ray.compare", "sapo_ray.inspect"],
}
__doc__ += "".join(f"\n- {name}: {', '.join(m.removeprefix('sapo_ray.') for m in mods)}" for name, mods in LAYERS.items())


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Each module of `package` (dotted name) and the package's modules it imports, anywhere in its code."""
    files = {".".join(p.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in package.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                             for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        graph[name] = {m for m in imported if m in files and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str, layers: dict[str, list[str]]) -> int | None:
    """The position of the layer holding `module` (the longest matching prefix), None if none does."""
    best = None
    for rank, prefixes in enumerate(layers.values()):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), rank)
    return None if best is None else best[1]


def upward_imports(graph: dict[str, set[str]], layers: dict[str, list[str]]) -> list[str]:
    """`a -> b` for each import of a higher layer's module `b` by `a`."""
    return [f"{a} -> {b}" for a, deps in sorted(graph.items()) for b in sorted(deps)
            if layer_of(b, layers) > layer_of(a, layers)]


def test_the_checks_find_a_cycle_and_an_upward_import():
    graph = {"p": set(), "p.low": {"p.high"}, "p.high": {"p.low"}, "p.top": {"p.low"}}
    assert cycles(graph) == [["p.high", "p.low"]]
    layers = {"ground": ["p", "p.low"], "top": ["p.high", "p.top"]}
    assert upward_imports(graph, layers) == ["p.low -> p.high"]
    assert layer_of("p.low.sub", layers) == 0 and layer_of("q", layers) is None


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_every_module_has_a_layer_and_imports_none_above_it():
    graph = import_graph()
    assert [m for m in sorted(graph) if layer_of(m, LAYERS) is None] == []
    assert upward_imports(graph, LAYERS) == []


def test_ruff():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "sapo_ray", "tests", "benchmarks", "conf"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
