"""A regular (non-editable) install: the wheel built from this tree carries the Hydra configs and the
bundled models, and `python -m sapo_ray.main` composes the checkout's config from any directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from sapo_ray.config import compose_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
pytest.importorskip("setuptools", reason="the wheel is built without build isolation, by the environment's setuptools")

REPO = Path(__file__).resolve().parents[1]
# What the build reads; sapo_ray/conf is a link to conf/, kept as a link in the copy.
SOURCES = ("pyproject.toml", "README.md", "conf", "sapo_ray")


def _run(cmd: list, cwd: Path) -> str:
    # Without PYTHONPATH: a checkout on it would be imported instead of the installed copy.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env |= {"HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1", "PIP_NO_INDEX": "1", "PIP_NO_CACHE_DIR": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A fresh environment holding only the wheel. The project's dependencies are the directories on this
    interpreter's path that hold no sapo_ray, added by a .pth as plain paths: the .pth files in them (the
    editable install's import hook among them) are not run, so nothing but the wheel supplies sapo_ray."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    # Built from a copy: building in place would leave build/ and sapo_ray.egg-info in the checkout.
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", root / "dist", src],
         cwd=root)
    (wheel,) = (root / "dist").glob("sapo_ray-*.whl")
    _run([sys.executable, "-m", "venv", "--without-pip", root / "env"], cwd=root)
    python = root / "env" / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root).strip())
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", purelib, wheel], cwd=root)
    dependencies = [p for p in map(Path, filter(None, sys.path)) if p.is_dir() and not (p / "sapo_ray").exists()]
    (purelib / "project_dependencies.pth").write_text("".join(f"{p.resolve()}\n" for p in dependencies))
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return {"python": python, "site": purelib, "cwd": elsewhere}


def _files(top: Path, pattern: str) -> set[str]:
    return {str(p.relative_to(top)) for p in top.rglob(pattern) if p.is_file() and "__pycache__" not in p.parts}


def test_the_wheel_holds_every_config_and_bundled_model(installed):
    package = installed["site"] / "sapo_ray"
    assert not (package / "conf").is_symlink()
    assert _files(package / "conf", "*.yaml") == _files(REPO / "conf", "*.yaml")
    assert {"config.yaml", "sft.yaml", "experiment/mathvista.yaml"} <= _files(package / "conf", "*.yaml")
    assert _files(package / "assets", "*") == _files(REPO / "sapo_ray" / "assets", "*")


def test_the_installed_copy_is_imported_and_resolves_its_bundled_model(installed):
    probe = ("import importlib.resources, json, sapo_ray; from sapo_ray.config import resolve_model_path; "
             "print(json.dumps([sapo_ray.__file__, str(importlib.resources.files('sapo_ray.conf')), "
             "resolve_model_path('bundled:tiny-vlm')]))")
    paths = json.loads(_run([installed["python"], "-c", probe], cwd=installed["cwd"]))
    site_dir = installed["site"].resolve()
    for path in paths:
        assert Path(path).resolve().is_relative_to(site_dir), (path, site_dir)
    assert (Path(paths[2]) / "config.json").is_file()


@pytest.mark.parametrize("overrides", [(), ("+experiment=mathvista", "algorithm=grpo", "model=tiny_lm")],
                         ids=["default", "experiment"])
def test_main_composes_the_checkouts_config_from_another_directory(installed, overrides):
    out = _run([installed["python"], "-m", "sapo_ray.main", *overrides, "--cfg", "job"], cwd=installed["cwd"])
    cfg = yaml.safe_load(out)
    assert cfg == OmegaConf.to_container(compose_config(*overrides), resolve=False)
    if overrides:
        assert (cfg["algorithm"]["name"], cfg["model"]["path"], cfg["data"]["val"]) == ("grpo", "bundled:tiny-lm", "mathvista")
        assert cfg["rollout"]["engine"] == "vllm"  # the experiment's rollout preset
    else:
        assert (cfg["algorithm"]["name"], cfg["model"]["path"], cfg["data"]["train"]) == ("sapo", "bundled:tiny-vlm", "synthvista")
    assert not any(installed["cwd"].iterdir())  # --cfg job prints; it writes no run directory


def test_sft_composes_from_the_installed_configs(installed):
    out = _run([installed["python"], "-m", "sapo_ray.sft", "model=tiny_lm", "steps=7", "--cfg", "job"], cwd=installed["cwd"])
    cfg = yaml.safe_load(out)
    assert (cfg["model"]["path"], cfg["steps"]) == ("bundled:tiny-lm", 7)
