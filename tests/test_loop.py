"""The actors' event loop (actors/loop.py): its timers."""

from __future__ import annotations

import time

import structlog

from actors.loop import ActorLoop


def test_an_inactive_timer_never_wakes_the_loop_and_first_fires_a_period_after_activation():
    """Goal: a pending-work timer costs nothing while idle. Method: an
    ActorLoop with one inactive 50 ms timer polls with its idle timeout and
    does not fire it though its due time passes (the sleep is that time
    passing); once active, the timer fires no earlier than a period later."""
    loop = ActorLoop(structlog.get_logger(), 16)
    fired = []
    state = {"active": False}
    loop.add_timer(50, lambda: fired.append(time.monotonic()), active=lambda: state["active"])
    assert loop._next_timeout_ms() > 50  # the idle timeout: no timer is active
    loop._run_timers()
    time.sleep(0.06)
    loop._run_timers()
    assert fired == []
    state["active"] = True
    activated = time.monotonic()
    loop._run_timers()
    assert fired == []  # a period after activation, not at once for the missed ones
    assert loop._next_timeout_ms() <= 51
    while not fired:
        time.sleep(loop._next_timeout_ms() / 1000)
        loop._run_timers()
    assert fired[0] - activated >= 0.045
