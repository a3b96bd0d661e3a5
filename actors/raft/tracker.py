"""What the leader knows about each peer's log (etcd's tracker/progress).

How this works: each peer has a `Progress` in one of three states.
PROBE: we don't know where its log matches; send one append at a time (then
pause until it answers or a heartbeat response arrives). REPLICATE: it is
caught up; stream appends optimistically, at most `max_inflight` unacknowledged
(the `Inflights` ring). SNAPSHOT: it needs entries we compacted; a MsgSnap
was sent and appends are held until the follower acknowledges a snapshot
(-> replicate) or the caller reports the transfer ended (-> probe).
"""

from __future__ import annotations

from collections import deque

STATE_PROBE = "probe"
STATE_REPLICATE = "replicate"
STATE_SNAPSHOT = "snapshot"


class Inflights:
    """A bounded FIFO of the last index of each unacknowledged append."""

    def __init__(self, size: int):
        assert size >= 1
        self.size = size
        self.buffer: deque[int] = deque()

    def add(self, last_index: int) -> None:
        assert len(self.buffer) < self.size, "inflights full: caller must check full()"
        self.buffer.append(last_index)

    def free_le(self, index: int) -> None:
        while self.buffer and self.buffer[0] <= index:  # bounded by size
            self.buffer.popleft()

    def full(self) -> bool:
        return len(self.buffer) >= self.size

    def reset(self) -> None:
        self.buffer.clear()

    def __len__(self) -> int:
        return len(self.buffer)


class Progress:
    __slots__ = ("match", "next", "state", "probe_sent", "recent_active", "inflights", "pending_snapshot")

    def __init__(self, next_index: int, max_inflight: int, match: int = 0):
        self.match = match
        self.next = next_index
        self.state = STATE_PROBE
        self.probe_sent = False
        self.recent_active = False
        self.inflights = Inflights(max_inflight)
        self.pending_snapshot = 0

    def __repr__(self) -> str:
        return f"Progress(match={self.match}, next={self.next}, state={self.state})"

    def _reset(self, state: str) -> None:
        self.probe_sent = False
        self.pending_snapshot = 0
        self.state = state
        self.inflights.reset()

    def become_probe(self) -> None:
        if self.state == STATE_SNAPSHOT:
            pending = self.pending_snapshot
            self._reset(STATE_PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset(STATE_PROBE)
            self.next = self.match + 1

    def become_replicate(self) -> None:
        self._reset(STATE_REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot_index: int) -> None:
        self._reset(STATE_SNAPSHOT)
        self.pending_snapshot = snapshot_index

    def maybe_update(self, index: int) -> bool:
        """An append up to `index` was accepted; False if it tells us nothing new."""
        updated = False
        if self.match < index:
            self.match = index
            updated = True
            self.probe_sent = False
        self.next = max(self.next, index + 1)
        return updated

    def sent_entries(self, last_index: int) -> None:
        """Optimistically advance after sending entries up to `last_index`."""
        if self.state == STATE_REPLICATE:
            self.next = last_index + 1
            self.inflights.add(last_index)
        elif self.state == STATE_PROBE:
            self.probe_sent = True

    def maybe_decrease_to(self, rejected: int, match_hint: int) -> bool:
        """An append at `rejected` was refused; False if the refusal is stale."""
        if self.state == STATE_REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1, 1)
        self.probe_sent = False
        return True

    def is_paused(self) -> bool:
        if self.state == STATE_PROBE:
            return self.probe_sent
        if self.state == STATE_REPLICATE:
            return self.inflights.full()
        return True
