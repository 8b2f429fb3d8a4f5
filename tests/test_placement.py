"""Placement (`cluster.placement`): bundles per GPU, each role's rank i on bundle i, checked before Ray
starts; then the same placement on simulated GPUs (Ray logical GPUs, actors on the CPU), with light
actors and with two training steps of the tiny VLM."""

from __future__ import annotations

import json
import math

import pytest
import ray
from helpers import tiny_cfg
from sapo_ray.config import ConfigError
from sapo_ray.config_checks import validate
from sapo_ray.config import compose_config as compose_cfg
from sapo_ray.placement import PlacementGroup, plan


def test_experiment_colocates_one_of_each_role_per_gpu():
    """The paper's experiment: 8 bundles of one GPU, engine i + actor rank i + critic rank i on bundle i,
    0.3 + 0.35 + 0.35 of it, and the CPU shares of the three."""
    cfg = compose_cfg("+experiment=mathvista")
    p = plan(cfg, needs_critic=True)
    assert p.mode == "colocate" and p.bundles == [{"CPU": 3.0, "GPU": 1.0}] * 8
    for i in range(8):
        held = sorted((s.role, s.rank, s.num_gpus) for s in p.on_bundle(i))
        assert held == [("actor", i, 0.35), ("critic", i, 0.35), ("rollout", i, 0.3)]


def test_oversubscribed_gpu_fails_naming_the_shares():
    with pytest.raises(ConfigError, match=r"GPU 0 would hold rollout\.num_gpus=0\.5 \+ actor\.num_gpus=0\.35 \+ "
                                          r"critic\.num_gpus=0\.35 = 1\.2"):
        validate(compose_cfg("+experiment=mathvista", "rollout.num_gpus=0.5"))
    with pytest.raises(ConfigError, match="cluster.placement=split"):
        validate(compose_cfg("+experiment=mathvista", "rollout.num_gpus=2", "rollout.num_workers=4"))


def test_split_gives_engines_their_own_gpus():
    """Two tensor-parallel engines of 2 GPUs each, then 4 learner bundles with actor and critic rank i."""
    cfg = compose_cfg("+experiment=mathvista", "cluster.placement=split", "rollout.num_workers=2",
                      "rollout.num_gpus=2", "actor.world_size=4", "critic.world_size=4", "actor.num_gpus=0.5",
                      "critic.num_gpus=0.5", "data.prompts_per_step=8")
    validate(cfg)
    p = plan(cfg, needs_critic=True)
    assert [b.get("GPU") for b in p.bundles] == [2.0, 2.0, 1.0, 1.0, 1.0, 1.0]
    assert [s.bundle for s in p.slots if s.role == "rollout"] == [0, 1]
    assert [s.bundle for s in p.slots if s.role == "actor"] == [2, 3, 4, 5]
    assert [s.bundle for s in p.slots if s.role == "critic"] == [2, 3, 4, 5]


@ray.remote
class Probe:
    """A light actor that says where Ray put it."""

    def __init__(self, role: str, rank: int):
        self.role, self.rank = role, rank

    def where(self) -> tuple[str, int, list]:
        return self.role, self.rank, [str(g) for g in ray.get_gpu_ids()]


def test_experiment_placement_on_8_simulated_gpus(ray_cluster):
    """On 8 logical GPUs, light actors placed by the experiment's plan (CPU shares shrunk to fit 2 cores):
    every GPU holds exactly one engine, one actor rank and one critic rank."""
    assert ray.cluster_resources().get("GPU", 0) >= 8
    cfg = compose_cfg("+experiment=mathvista", "rollout.num_cpus=0.05", "actor.num_cpus=0.05", "critic.num_cpus=0.05")
    group = PlacementGroup.create(plan(cfg, needs_critic=True), timeout_s=60)
    try:
        probes = [Probe.options(num_cpus=s.num_cpus, num_gpus=s.num_gpus, **group.options(s.role, s.rank))
                  .remote(s.role, s.rank) for s in group.plan.slots]
        where = ray.get([p.where.remote() for p in probes])
        by_gpu: dict[str, list] = {}
        for role, rank, gpus in where:
            assert len(gpus) == 1, (role, rank, gpus)
            by_gpu.setdefault(gpus[0], []).append(role)
        assert len(by_gpu) == 8
        assert all(sorted(roles) == ["actor", "critic", "rollout"] for roles in by_gpu.values()), by_gpu
        # rank i of every role shares its GPU with rank i of the others
        gpu_of = {(role, rank): gpus[0] for role, rank, gpus in where}
        assert all(gpu_of[("rollout", i)] == gpu_of[("actor", i)] == gpu_of[("critic", i)] for i in range(8))
        for p in probes:
            ray.kill(p)
    finally:
        group.remove()


def test_infeasible_placement_fails_within_seconds(ray_cluster):
    """A bundle no node can hold fails at once; bundles that fit one by one but not together fail after
    `placement_timeout_s`, with the numbers, instead of waiting forever."""
    cfg = compose_cfg("+experiment=mathvista")  # 8 bundles of 3 CPUs: the 2-CPU node holds none
    with pytest.raises(RuntimeError, match=r"bundle 0 asks for \{'CPU': 3\.0, 'GPU': 1\.0\}"):
        PlacementGroup.create(plan(cfg, needs_critic=True), timeout_s=60)
    cfg = compose_cfg("+experiment=mathvista", "rollout.num_cpus=0.2", "actor.num_cpus=0.2", "critic.num_cpus=0.2")
    with pytest.raises(RuntimeError, match=r"not ready after cluster\.placement_timeout_s=3 s"):
        PlacementGroup.create(plan(cfg, needs_critic=True), timeout_s=3)  # 8 x 0.6 CPUs > 2


def _run_two_steps(tmp_path, *overrides):
    from sapo_ray.main import run

    run(tiny_cfg(tmp_path, "bundled:tiny-vlm", "trainer.export_hf=false", "cluster.simulate_gpus=2", *overrides))
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_colocated_training_on_2_simulated_gpus(ray_cluster, tmp_path):
    """The experiment's topology scaled to 2 GPUs: 2 engines, 2 actor and 2 critic ranks, shares 0.3 /
    0.35 / 0.35 of each GPU, two SAPO steps on the CPU over gloo."""
    rows = _run_two_steps(tmp_path, "cluster.placement=colocate", "rollout.num_workers=2", "rollout.num_gpus=0.3",
                          "actor.world_size=2", "actor.num_gpus=0.35", "critic.world_size=2", "critic.num_gpus=0.35",
                          "rollout.num_cpus=0.3", "actor.num_cpus=0.3", "critic.num_cpus=0.3")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(rows[-1][k]) for k in ("actor/pg_loss", "critic/vf_loss", "sync/bytes"))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_split_training_on_2_simulated_gpus(ray_cluster, tmp_path):
    """Split on 2 GPUs: the engine on one, actor and critic rank on the other; the weights go over the
    broadcast group (gloo here, NCCL on real GPUs)."""
    rows = _run_two_steps(tmp_path, "cluster.placement=split", "rollout.num_gpus=1", "actor.num_gpus=0.5",
                          "critic.num_gpus=0.5", "rollout.weight_sync=broadcast", "rollout.num_cpus=0.5",
                          "actor.num_cpus=0.5", "critic.num_cpus=0.5")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(math.isfinite(rows[-1][k]) for k in ("actor/pg_loss", "critic/vf_loss", "sync/bytes"))
