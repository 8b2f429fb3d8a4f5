"""Remote calls with bounds: every wait on an actor ends, and a dead or silent actor is named.

`wait_all` gets the results of calls on several actors, failing as soon as one of them died (the
others may be blocked in a collective with it until torch's timeout) or when they have not all answered
within `timeout_s`; either way it raises `ActorFailure` naming the actor, which the caller treats as
dead (it restarts it, or recovers the group from a checkpoint). An exception raised inside a method
is a bug, not a fault, and propagates as Ray raises it.
"""

from __future__ import annotations

import logging
import time

import ray

from sapo_ray.errors import StopRun

log = logging.getLogger(__name__)


class ActorFailure(RuntimeError):
    """`actor` died, or did not answer within the timeout (then it is treated as dead)."""

    def __init__(self, actor: str, cause: str):
        super().__init__(f"{actor}: {cause}")
        self.actor, self.cause = actor, cause


def wait_all(refs: list, names: list[str], timeout_s: float) -> list:
    """`ray.get(refs)`, bounded by `timeout_s` in all, failing fast on the first dead actor;
    `names[i]` names the actor behind `refs[i]` in the error."""
    results = [None] * len(refs)
    pending = {ref: i for i, ref in enumerate(refs)}
    deadline = time.monotonic() + timeout_s
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            silent = sorted(names[i] for i in pending.values())
            raise ActorFailure(silent[0], f"no answer within {timeout_s:g} s (trainer.rpc_timeout_s); also "
                                          f"waiting on: {silent[1:] or 'none'}")
        for ref in ready:
            i = pending.pop(ref)
            try:
                results[i] = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                raise ActorFailure(names[i], f"the actor died ({type(err).__name__}: {str(err)[:300]})") from err
    return results


class Restarts:
    """The run's budget of actor replacements (`trainer.max_actor_restarts`), shared by every group that
    replaces its dead actors."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def spend(self, failure: ActorFailure) -> None:
        """Count one replacement for `failure`; raises `StopRun` once the budget is used up."""
        self.used += 1
        if self.used > self.limit:
            raise StopRun(f"{failure}; trainer.max_actor_restarts={self.limit} restarts are used up") from failure
        log.warning("%s; restarting it (restart %d of trainer.max_actor_restarts=%d)", failure, self.used, self.limit)
