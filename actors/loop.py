"""The one event loop every actor runs.

How this works: an actor registers sockets with a batch handler and timers
with a period. Each pass polls (explicit POLLIN), then drains up to
`max_messages_per_poll` messages from every readable socket and hands each
socket's batch to its handler in one call (batching: Python pays per call),
then runs the timers that are due. A timer for pending work (a pump, a
retry, a delayed acknowledgement) has an `active` test and is left out while
that is false, so an idle actor sleeps instead of waking every few
milliseconds for nothing; it first fires a period after it became active.
The loop is the one unbounded loop of an actor; it ends when `stop()` is
called, on SIGTERM/SIGINT, or when the supervisor that started the actor is
gone (so a SIGKILLed supervisor leaves no orphan serving stale data).
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from typing import Callable

import zmq

PARENT_CHECK_INTERVAL_MS = 200
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # the periodic parent check in ActorLoop still catches it


class ActorLoop:
    def __init__(self, log, max_messages_per_poll: int, parent_pid: int | None = None):
        assert max_messages_per_poll > 0
        self.log = log
        self.max_messages_per_poll = max_messages_per_poll
        self.parent_pid = parent_pid
        self.poller = zmq.Poller()
        self.handlers: dict[zmq.Socket, Callable[[list], None]] = {}
        self.multipart: dict[zmq.Socket, bool] = {}
        self.timers: list[list] = []  # [next_due_s, period_s, fn, active or None]
        self.running = False
        self.stop_reason = ""
        if parent_pid is not None:
            self.add_timer(PARENT_CHECK_INTERVAL_MS, self._check_parent)

    def add_socket(self, socket: zmq.Socket, handler: Callable[[list], None], multipart: bool = True) -> None:
        """`handler(batch)`; batch items are frame lists (multipart) or bytes."""
        self.poller.register(socket, zmq.POLLIN)
        self.handlers[socket] = handler
        self.multipart[socket] = multipart

    def add_timer(self, period_ms: float, fn: Callable[[], None],
                  active: Callable[[], bool] | None = None) -> None:
        """`fn()` every `period_ms`; with `active`, only while `active()` is true
        (a cheap test: it runs every pass)."""
        assert period_ms > 0
        self.timers.append([time.monotonic() + period_ms / 1000, period_ms / 1000, fn, active])

    def stop(self, reason: str = "requested") -> None:
        self.running = False
        self.stop_reason = reason

    def _check_parent(self) -> None:
        if os.getppid() != self.parent_pid:
            self.log.warning("supervisor gone, exiting", parent_pid=self.parent_pid)
            self.stop("supervisor gone")

    def _next_timeout_ms(self) -> int:
        if not self.timers:
            return 1000
        now = time.monotonic()
        due = min((timer[0] for timer in self.timers if timer[3] is None or timer[3]()), default=now + 1.0)
        return max(0, int((due - now) * 1000) + 1)

    def _drain(self, socket: zmq.Socket) -> list:
        batch = []
        receive = socket.recv_multipart if self.multipart[socket] else socket.recv
        for _ in range(self.max_messages_per_poll):
            try:
                batch.append(receive(zmq.NOBLOCK))
            except zmq.Again:
                break
        return batch

    def _run_timers(self) -> None:
        now = time.monotonic()
        for timer in self.timers:
            if timer[3] is not None and not timer[3]():
                # Inactive: once active it first fires a whole period later.
                timer[0] = now + timer[1]
            elif timer[0] <= now:
                # Skip missed periods rather than firing a burst to catch up.
                timer[0] = now + timer[1]
                timer[2]()

    def run(self) -> str:
        self.running = True
        signal.signal(signal.SIGTERM, lambda *_: self.stop("SIGTERM"))
        signal.signal(signal.SIGINT, lambda *_: self.stop("SIGINT"))
        while self.running:  # the actor's one unbounded loop
            # pyzmq retries a poll interrupted by a signal (EINTR) itself.
            ready = dict(self.poller.poll(self._next_timeout_ms()))
            # A copy: a handler may register a socket (a peer transport brought up by a membership change).
            for socket, handler in list(self.handlers.items()):
                if socket in ready:
                    batch = self._drain(socket)
                    if batch:
                        handler(batch)
            self._run_timers()
        return self.stop_reason
