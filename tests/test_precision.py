"""The learners' CPU precision is decided by the machine: the rule against stubbed probes, the cache, and
the config's `auto` replaced by the decision."""

from __future__ import annotations

import json

import pytest

from sapo_ray import precision
from sapo_ray.config import ConfigError, compose_config
from sapo_ray.config_checks import validate
from sapo_ray.precision import Probe, decide


def never():
    raise AssertionError("an explicit setting must not probe the machine")


@pytest.mark.parametrize("float32_ms, bfloat16_ms, use", [
    (4.06, 1.41, True),      # AVX512-BF16: bf16 2.9x faster
    (3.34, 118.7, False),    # AVX2 only: bf16 emulated, 35x slower
    (4.0, 3.5, False),       # faster, but by less than MIN_SPEEDUP: autocast's casts would eat it
    (4.0, 4.0 / 1.25, True), # exactly MIN_SPEEDUP
])
def test_auto_follows_the_probe(float32_ms, bfloat16_ms, use):
    decision = decide("auto", lambda: Probe(float32_ms, bfloat16_ms))
    assert decision.use_bf16 is use
    assert f"{bfloat16_ms:.2f} vs {float32_ms:.2f} ms" in decision.reason
    assert ("faster" if bfloat16_ms < float32_ms else "slower") in decision.reason


@pytest.mark.parametrize("setting, use", [("true", True), ("false", False), (True, True), (False, False),
                                          ("True", True), (" FALSE ", False)])
def test_an_explicit_setting_is_kept_without_probing(setting, use):
    assert decide(setting, never).use_bf16 is use


def test_anything_else_is_refused():
    with pytest.raises(ValueError, match="autocast_bf16='sometimes'"):
        decide("sometimes", never)
    with pytest.raises(ConfigError, match=r"actor.autocast_bf16='maybe' is not one of \['auto', 'true', 'false'\]"):
        validate(compose_config("actor.autocast_bf16=maybe"))


def test_the_probe_is_measured_once_per_machine(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(precision, "measure", lambda: calls.append(1) or Probe(4.0, 2.0))
    cache = tmp_path / "cpu_precision.json"
    assert precision.cached_probe(cache) == Probe(4.0, 2.0)
    assert precision.cached_probe(cache) == Probe(4.0, 2.0)
    assert len(calls) == 1
    stored = json.loads(cache.read_text())
    assert list(stored) == [precision.machine_key()] and stored[precision.machine_key()]["float32_ms"] == 4.0
    # Limiting the kernels torch may use makes another machine: measured again, kept beside the first.
    import os

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41" if os.environ.get("ONEDNN_MAX_CPU_ISA") == "AVX2" else "AVX2")
    assert precision.cached_probe(cache) == Probe(4.0, 2.0)
    assert len(calls) == 2 and len(json.loads(cache.read_text())) == 2


def test_a_damaged_cache_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "measure", lambda: Probe(3.0, 90.0))
    cache = tmp_path / "cpu_precision.json"
    cache.write_text("{not json")
    assert precision.cached_probe(cache) == Probe(3.0, 90.0)
    cache.write_text(json.dumps({precision.machine_key(): {"float32_ms": "fast"}}))
    assert precision.cached_probe(cache) == Probe(3.0, 90.0)


def test_measure_times_both_dtypes():
    probe = precision.measure(sizes=(64,), repeats=1)
    assert probe.float32_ms > 0 and probe.bfloat16_ms > 0


@pytest.mark.parametrize("speedup, expected", [(2.9, "true"), (0.03, "false")])
def test_the_driver_replaces_auto_by_the_decision(monkeypatch, speedup, expected):
    monkeypatch.setattr(precision, "cached_probe", lambda: Probe(speedup, 1.0))
    cfg = compose_config("critic.autocast_bf16=false")
    assert cfg.actor.autocast_bf16 == "auto"
    decisions = precision.resolve_learners(cfg)
    assert cfg.actor.autocast_bf16 == expected and decisions["actor"].use_bf16 is (expected == "true")
    assert cfg.critic.autocast_bf16 == "false" and "in the config" in decisions["critic"].reason


def test_gpu_ranks_are_not_probed(monkeypatch):
    monkeypatch.setattr(precision, "cached_probe", never)
    cfg = compose_config("actor.num_gpus=1", "critic.num_gpus=1")
    decisions = precision.resolve_learners(cfg)
    assert cfg.actor.autocast_bf16 == "false" and "FSDP2" in decisions["actor"].reason
