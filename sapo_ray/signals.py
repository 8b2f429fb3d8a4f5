"""Stopping a run on SIGINT (Ctrl-C) and SIGTERM (`ray job stop`, Slurm, Kubernetes).

The first signal ends the driver's wait at once, except while the learners are changing their weights
(`deferring()` true: an update or a weight sync under way), which a run must not leave half done: then
the signal acts when that ends, or `grace_s` after it came, whichever is first. The trainer then saves
what it can within the rest of `budget_s` and the entry point exits with 128 + the signal's number
(130, 143). A second signal acts at once, wherever the driver is.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# From the signal to the end of the process: the run must be gone within this many seconds.
BUDGET_S = 10.0
# How long an update or a weight sync may finish after a signal before the driver stops waiting for it.
GRACE_S = 4.0
# Kept back from the budget for shutting the actors and the local Ray instance down.
SHUTDOWN_S = 2.5


class Interrupted(KeyboardInterrupt):
    """A stop signal reached the driver. A KeyboardInterrupt: no `except Exception` on the way up may
    swallow it, and Ray's waits end on it (they turn it into a plain KeyboardInterrupt: `StopSignals.reason`
    recovers which signal it was)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Installs the handlers of SIGINT and SIGTERM for its `with` block (main thread only) and restores
    the previous ones after it. `deferring` says whether the driver is inside a section a signal must
    not cut; the trainer calls `check()` when such a section ends."""

    def __init__(self, deferring=lambda: False, grace_s: float = GRACE_S, budget_s: float = BUDGET_S):
        self.deferring, self.grace_s, self.budget_s = deferring, grace_s, budget_s
        self.signum: int | None = None  # the first signal received
        self.received_at: float | None = None
        self._raised = False
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        self.install()
        return self

    def install(self) -> None:
        """(Re)install the handlers: call again after `ray.init`, which puts its own on SIGTERM (a native
        stack trace and exit status 1). The handlers found the first time are restored on exit."""
        if threading.current_thread() is not threading.main_thread():
            return
        handlers = {**{s: self._on_signal for s in SIGNALS}, signal.SIGALRM: self._on_grace_over}
        for s, handler in handlers.items():
            previous = signal.signal(s, handler)
            self._previous.setdefault(s, previous)

    def __exit__(self, *exc) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def remaining(self) -> float:
        """Seconds left of the budget for saving, shutdown time kept back (the budget itself when no
        signal came)."""
        if self.received_at is None:
            return self.budget_s - SHUTDOWN_S
        return self.budget_s - SHUTDOWN_S - (time.monotonic() - self.received_at)

    def _raise(self) -> None:
        self._raised = True
        signal.setitimer(signal.ITIMER_REAL, 0)
        raise Interrupted(self.signum)

    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None:  # the second one: at once
            log.warning("%s again: stopping now", signal.Signals(signum).name)
            self.signum = signum
            self._raise()
        self.signum, self.received_at = signum, time.monotonic()
        if not self.deferring():
            self._raise()
        log.warning("%s: stopping once the learners' update finishes (at most %.0f s)",
                    signal.Signals(signum).name, self.grace_s)
        signal.setitimer(signal.ITIMER_REAL, self.grace_s)

    def _on_grace_over(self, signum, frame) -> None:
        if self.signum is not None and not self._raised:
            log.warning("the learners' update did not finish within %.0f s of the signal: stopping without it",
                        self.grace_s)
            self._raise()

    def reason(self, err: KeyboardInterrupt) -> Interrupted:
        """`err` as the `Interrupted` of the signal that caused it (SIGINT when none came through here)."""
        if isinstance(err, Interrupted):
            return err
        return Interrupted(self.signum if self.signum is not None else signal.SIGINT)

    def check(self) -> None:
        """Raise `Interrupted` if a signal came while deferred (call where a deferred section ends)."""
        if self.signum is not None and not self._raised:
            self._raise()
