"""Where each actor runs: one Ray placement group with a bundle per GPU (`cluster.placement`).

`plan(cfg)` is pure: it turns the config into bundles and one `Slot` per actor (role, rank, bundle,
its GPU and CPU shares) and fails before Ray starts when a bundle would hold more than one GPU or a
placement cannot work, naming the keys. `PlacementGroup.create` then reserves the bundles, waiting a
bounded time (`cluster.placement_timeout_s`) and failing with the numbers when they do not fit:

- `none`: no placement group; Ray places each actor by its own resource request (fine on a CPU or
  whole GPUs; fractional GPU shares may then land several engines on one GPU and leave a learner
  rank unscheduled, which is why the GPU experiment uses `colocate`).
- `colocate`: bundle i is GPU i; rollout engine i, actor rank i and critic rank i share it, each with
  its configured share (`rollout.num_gpus`, `actor.num_gpus`, `critic.num_gpus`), which must sum to <= 1.
- `split`: engines on bundles of their own (`ceil(rollout.num_gpus)` GPUs each: tensor-parallel
  engines hold several), then the learner bundles, actor rank i and critic rank i on learner bundle i.
  This is the layout `rollout.weight_sync=broadcast` over NCCL needs (no two group members on one GPU).

Bundles are reserved with Ray's PACK strategy, so a node's bundles sit together and ranks follow nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PLACEMENTS = ("none", "colocate", "split")


class PlacementError(ValueError):
    """A placement that cannot work; the message names the keys and the numbers."""


@dataclass(frozen=True)
class Slot:
    """One actor's place: which bundle, and the GPU and CPU shares it asks of it."""

    role: str  # rollout, actor or critic
    rank: int
    bundle: int
    num_gpus: float
    num_cpus: float


@dataclass
class Plan:
    """The bundles to reserve (`{"GPU": g, "CPU": c}` each) and every actor's slot in them."""

    mode: str
    bundles: list[dict[str, float]]
    slots: list[Slot]

    def slot(self, role: str, rank: int) -> Slot:
        return next(s for s in self.slots if s.role == role and s.rank == rank)

    def on_bundle(self, bundle: int) -> list[Slot]:
        return [s for s in self.slots if s.bundle == bundle]


def _roles(cfg, needs_critic: bool) -> list[tuple[str, int, float, float]]:
    """`(role, actors, GPU share, CPU share)` of every role the run creates."""
    r = cfg.rollout
    roles = [("rollout", r.num_workers, r.num_gpus, r.num_cpus),
             ("actor", cfg.actor.world_size, cfg.actor.num_gpus, cfg.actor.num_cpus)]
    if needs_critic:
        roles.append(("critic", cfg.critic.world_size, cfg.critic.num_gpus, cfg.critic.num_cpus))
    return roles


def _bundles(slots: list[Slot], count: int, gpus: list[float]) -> list[dict[str, float]]:
    """Bundle i asks for `gpus[i]` GPUs (none on a CPU run) and the CPU shares of its slots."""
    out = []
    for i in range(count):
        cpus = sum(s.num_cpus for s in slots if s.bundle == i)
        out.append({"CPU": cpus, **({"GPU": gpus[i]} if gpus[i] > 0 else {})})
    return out


def plan(cfg, needs_critic: bool) -> Plan | None:
    """The placement `cfg.cluster.placement` describes (None for `none`); raises PlacementError."""
    mode = cfg.cluster.placement
    if mode not in PLACEMENTS:
        raise PlacementError(f"cluster.placement={mode!r} is not one of {list(PLACEMENTS)}")
    if mode == "none":
        return None
    roles = _roles(cfg, needs_critic)
    if mode == "colocate":
        return _colocate(roles)
    return _split(roles)


def _colocate(roles) -> Plan:
    for role, _, gpus, _ in roles:
        if gpus > 1:
            raise PlacementError(f"cluster.placement=colocate puts one actor of each role on each GPU: "
                                 f"{role}.num_gpus={gpus:g} must be <= 1 (use cluster.placement=split for "
                                 f"engines on several GPUs)")
    count = max(n for _, n, _, _ in roles)
    slots = [Slot(role, rank, rank, gpus, cpus) for role, n, gpus, cpus in roles for rank in range(n)]
    on_gpu = any(g > 0 for _, _, g, _ in roles)
    plan_ = Plan("colocate", _bundles(slots, count, [1.0 if on_gpu else 0.0] * count), slots)
    _check_shares(plan_, {r: g for r, _, g, _ in roles})
    return plan_


def _split(roles) -> Plan:
    (_, engines, engine_gpus, engine_cpus), learners = roles[0], roles[1:]
    slots = [Slot("rollout", i, i, engine_gpus, engine_cpus) for i in range(engines)]
    gpus = [float(math.ceil(engine_gpus))] * engines
    count = max(n for _, n, _, _ in learners)
    for role, n, g, cpus in learners:
        if g > 1:
            raise PlacementError(f"{role}.num_gpus={g:g}: a learner rank holds at most one GPU")
        slots += [Slot(role, rank, engines + rank, g, cpus) for rank in range(n)]
    on_gpu = any(g > 0 for _, _, g, _ in learners)
    gpus += [1.0 if on_gpu else 0.0] * count
    plan_ = Plan("split", _bundles(slots, engines + count, gpus), slots)
    _check_shares(plan_, {r: g for r, _, g, _ in roles})
    return plan_


def _check_shares(plan_: Plan, shares: dict[str, float]) -> None:
    """The GPU shares on each bundle must fit its GPUs."""
    for i, bundle in enumerate(plan_.bundles):
        held = plan_.on_bundle(i)
        used = sum(s.num_gpus for s in held)
        if used > bundle.get("GPU", 0.0) + 1e-9:
            parts = " + ".join(f"{s.role}.num_gpus={s.num_gpus:g}" for s in held)
            raise PlacementError(f"cluster.placement={plan_.mode}: GPU {i} would hold {parts} = {used:g} of "
                                 f"{bundle.get('GPU', 0.0):g}; lower the shares so they sum to <= 1")


def describe(plan_: Plan) -> str:
    """One line per bundle: its resources and who holds it."""
    lines = []
    for i, bundle in enumerate(plan_.bundles):
        held = ", ".join(f"{s.role} {s.rank} ({s.num_gpus:g} GPU)" for s in plan_.on_bundle(i))
        lines.append(f"bundle {i} {bundle}: {held}")
    return "\n".join(lines)


class PlacementGroup:
    """The reserved bundles of a `Plan` and the Ray options that put each actor in its slot."""

    def __init__(self, plan_: Plan | None, group=None):
        self.plan, self.group = plan_, group

    @classmethod
    def create(cls, plan_: Plan | None, timeout_s: float) -> "PlacementGroup":
        """Reserve `plan_`'s bundles (PACK), waiting at most `timeout_s`; raises with the numbers when a
        bundle fits no node or the reservation does not complete in time."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        if plan_ is None:
            return cls(None)
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        for i, bundle in enumerate(plan_.bundles):
            if not any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()) for node in nodes):
                raise RuntimeError(f"placement bundle {i} asks for {bundle} but no node of the Ray cluster has that "
                                   f"much: nodes offer {[{k: n.get(k, 0.0) for k in ('CPU', 'GPU')} for n in nodes]}\n"
                                   f"{describe(plan_)}")
        group = placement_group(plan_.bundles, strategy="PACK")
        try:
            ray.get(group.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(group)
            total = {k: sum(b.get(k, 0.0) for b in plan_.bundles) for k in ("CPU", "GPU")}
            raise RuntimeError(f"the placement group ({total}) was not ready after cluster.placement_timeout_s="
                               f"{timeout_s:g} s: the Ray cluster has {ray.available_resources()} free\n"
                               f"{describe(plan_)}") from None
        return cls(plan_, group)

    def options(self, role: str, rank: int) -> dict:
        """Ray `.options(...)` keywords for `role`'s rank `rank` (empty without a placement group)."""
        if self.group is None:
            return {}
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        slot = self.plan.slot(role, rank)
        return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=self.group, placement_group_bundle_index=slot.bundle)}

    def remove(self) -> None:
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)
            self.group = None
