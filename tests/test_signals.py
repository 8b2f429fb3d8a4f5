"""Stop signals in the driver: at once, deferred while the learners update, bounded by the grace time;
the step line's pace and time left."""

from __future__ import annotations

import os
import signal
import time

import pytest

from sapo_ray.signals import SHUTDOWN_S, Interrupted, StopSignals
from sapo_ray.tracking import Pace, format_duration


def send(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.05)  # the handler runs in the main thread between bytecodes


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_interrupts_at_once(signum, status):
    before = signal.getsignal(signum)
    with pytest.raises(Interrupted) as caught:
        with StopSignals():
            send(signum)
            pytest.fail("the signal did not interrupt")
    assert caught.value.signum == signum and caught.value.exit_status == status
    assert signal.getsignal(signum) is before  # the handlers found are restored


def test_a_signal_waits_for_the_update_then_acts():
    deferring = [True]
    with StopSignals(deferring=lambda: deferring[0], grace_s=5) as stop:
        send(signal.SIGTERM)
        assert stop.requested  # noted, not raised: the update goes on
        deferring[0] = False
        with pytest.raises(Interrupted) as caught:
            stop.check()
    assert caught.value.signum == signal.SIGTERM


def test_an_update_past_the_grace_time_is_cut():
    with StopSignals(deferring=lambda: True, grace_s=0.2) as stop:
        t0 = time.monotonic()
        send(signal.SIGINT)
        with pytest.raises(Interrupted):
            while time.monotonic() - t0 < 5:
                time.sleep(0.01)
        assert 0.15 < time.monotonic() - t0 < 2
        assert stop.remaining() < stop.budget_s - SHUTDOWN_S - 0.15  # the budget counts from the signal


def test_a_second_signal_acts_at_once():
    with StopSignals(deferring=lambda: True, grace_s=30):
        send(signal.SIGINT)
        with pytest.raises(Interrupted) as caught:
            send(signal.SIGINT)
    assert caught.value.exit_status == 130


def test_a_plain_keyboard_interrupt_is_named_by_the_signal_that_came():
    """Ray's waits turn the handler's exception into a plain KeyboardInterrupt."""
    stop = StopSignals()
    stop.signum = signal.SIGTERM
    assert stop.reason(KeyboardInterrupt()).exit_status == 143
    assert StopSignals().reason(KeyboardInterrupt()).exit_status == 130


def test_pace_and_time_left():
    now = [100.0]
    pace = Pace(total_steps=10, done=2, clock=lambda: now[0])
    now[0] = 130.0
    assert pace.tick(2) == ""  # the resumed run's first validation: no step finished yet
    now[0] = 134.0
    assert pace.tick(3) == "  4.0 s/step  eta 28s"
    now[0] = 140.0
    assert pace.tick(4) == "  5.0 s/step  eta 30s"  # (4 + 6) / 2 s for each of 6 steps left


@pytest.mark.parametrize("seconds, text", [(9, "9s"), (75, "1m15s"), (3725, "1h02m"), (0.4, "0s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
