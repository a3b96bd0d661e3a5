"""The lessor: which leases are alive and when each expires. Pure core.

How this works: the raft log actor (the one actor that knows leadership)
owns a `Lessor`. While its node is leader the lessor is *primary*: it holds
every lease (id -> granted TTL, expiry) and decides expiry; a follower's
lessor holds nothing (as etcd's, a follower never expires a lease).

- `promote(now_ms, leases)` when this node becomes leader and the store has
  applied everything of earlier terms: every lease gets expiry = now + its
  TTL + `extend_ms` (etcd extends by the election timeout), so a leader
  change or a restart extends remaining TTLs and never cuts them.
- `grant` / `revoke` follow the store: the actor feeds them the lease changes
  the applier reports after each applied batch.
- `renew(id, now_ms)` (keep-alive) restarts a lease's TTL; an expired lease
  cannot be renewed (its revoke is on the way), as in etcd.
- `expired(now_ms, max_count)` hands out up to max_count expired leases for
  the actor to revoke through the log. A lease handed out is not handed out
  again until `revoke_retry_ms` later (its revoke is in flight; if the
  proposal was lost it is retried), and never once its revoke is applied.

Time is milliseconds of a monotonic clock the caller reads (a float in the
actor: with whole milliseconds a lease renewed and read within the same
millisecond would report its full TTL, where etcd says TTL - 1); the core
never reads a clock. Iteration is over a heap of (due_ms, id), so the order is
deterministic (ties broken by id).
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Iterable

# Past this many stale heap items per live lease the heap is rebuilt, so
# renewals (one push each) cannot grow it without bound.
_HEAP_SLACK_FACTOR = 2
_HEAP_SLACK_MIN = 64


def min_ttl_s(election_timeout_ms: int, heartbeat_interval_ms: int) -> int:
    """etcd's minimum lease TTL: ceil((3 * election_ticks / 2) * heartbeat) in seconds,
    with integer division of the ticks as etcd (`(3*electionTicks)/2 * heartbeat`)."""
    assert election_timeout_ms > 0 and heartbeat_interval_ms > 0
    election_ticks = max(1, election_timeout_ms // heartbeat_interval_ms)
    min_ttl_ms = (3 * election_ticks // 2) * heartbeat_interval_ms
    return max(1, -(-min_ttl_ms // 1000))


def seconds_truncated(milliseconds: float) -> int:
    """Whole seconds, truncated toward zero (Go's int64(d.Seconds()), what etcd reports)."""
    return int(milliseconds / 1000)


@dataclasses.dataclass(slots=True)
class _Lease:
    ttl_s: int
    expiry_ms: float
    # When the heap should look at this lease next: its expiry while alive,
    # then the time to retry its revoke once handed out by expired().
    due_ms: float


class Lessor:
    def __init__(self, *, extend_ms: int, revoke_retry_ms: int):
        assert extend_ms >= 0 and revoke_retry_ms > 0
        self.extend_ms = extend_ms
        self.revoke_retry_ms = revoke_retry_ms
        self.primary = False
        self._leases: dict[int, _Lease] = {}
        self._heap: list[tuple[float, int]] = []

    def __len__(self) -> int:
        return len(self._leases)

    def __contains__(self, lease_id: int) -> bool:
        return lease_id in self._leases

    # ---- leadership ---------------------------------------------------------

    def promote(self, now_ms: float, leases: Iterable[tuple[int, int]]) -> None:
        """Become primary with the store's leases [(id, granted TTL s), ...]."""
        self.primary = True
        self._leases = {}
        for lease_id, ttl_s in leases:
            expiry_ms = now_ms + self.extend_ms + ttl_s * 1000
            self._leases[lease_id] = _Lease(ttl_s, expiry_ms, expiry_ms)
        self._rebuild_heap()

    def demote(self) -> None:
        self.primary = False
        self._leases = {}
        self._heap = []

    def reconcile(self, now_ms: float, leases: Iterable[tuple[int, int]]) -> tuple[int, int]:
        """Match the store's leases after a lease change may have gone unreported
        (the applier died between its commit and its report): a lease we miss
        is added as on promotion (extended), one the store no longer has is
        dropped. Returns (added, dropped)."""
        if not self.primary:
            return 0, 0
        stored = dict(leases)
        dropped = [lease_id for lease_id in self._leases if lease_id not in stored]
        for lease_id in dropped:
            del self._leases[lease_id]
        added = 0
        for lease_id, ttl_s in sorted(stored.items()):
            if lease_id not in self._leases:
                expiry_ms = now_ms + self.extend_ms + ttl_s * 1000
                self._leases[lease_id] = _Lease(ttl_s, expiry_ms, expiry_ms)
                heapq.heappush(self._heap, (expiry_ms, lease_id))
                added += 1
        return added, len(dropped)

    # ---- changes applied by the store -----------------------------------------

    def grant(self, lease_id: int, ttl_s: int, now_ms: float) -> None:
        """A grant was applied. A lease already known (loaded with the store) is
        left as it is: its expiry is already at least now + TTL."""
        if not self.primary or lease_id in self._leases:
            return
        expiry_ms = now_ms + ttl_s * 1000
        self._leases[lease_id] = _Lease(ttl_s, expiry_ms, expiry_ms)
        self._push(expiry_ms, lease_id)

    def revoke(self, lease_id: int) -> None:
        """A revoke was applied (or found the lease gone): forget the lease."""
        self._leases.pop(lease_id, None)

    # ---- keep-alive and time-to-live ---------------------------------------------

    def renew(self, lease_id: int, now_ms: float) -> int | None:
        """Restart the lease's TTL; its granted TTL, or None if it is unknown or
        already expired (an expired lease is being revoked)."""
        lease = self._leases.get(lease_id)
        if lease is None or lease.expiry_ms <= now_ms:
            return None
        lease.expiry_ms = lease.due_ms = now_ms + lease.ttl_s * 1000
        self._push(lease.due_ms, lease_id)
        return lease.ttl_s

    def remaining_ms(self, lease_id: int, now_ms: float) -> float | None:
        """Time left before the lease expires (negative once expired), None if unknown."""
        lease = self._leases.get(lease_id)
        return None if lease is None else lease.expiry_ms - now_ms

    def granted_ttl_s(self, lease_id: int) -> int | None:
        lease = self._leases.get(lease_id)
        return None if lease is None else lease.ttl_s

    # ---- expiry -------------------------------------------------------------------

    def expired(self, now_ms: float, max_count: int) -> list[int]:
        """Up to max_count expired leases to revoke, earliest expiry first. Each is
        not returned again for revoke_retry_ms (its revoke is in flight)."""
        assert max_count > 0
        out: list[int] = []
        heap = self._heap
        # Bounded: each pass pops an item; the heap holds at most
        # _HEAP_SLACK_FACTOR * leases + _HEAP_SLACK_MIN + 1 items (see _push).
        while heap and heap[0][0] <= now_ms and len(out) < max_count:
            due_ms, lease_id = heapq.heappop(heap)
            lease = self._leases.get(lease_id)
            if lease is None or lease.due_ms != due_ms:
                continue  # stale: renewed, retried or revoked since it was pushed
            assert lease.expiry_ms <= now_ms, (lease_id, lease.expiry_ms, now_ms)
            out.append(lease_id)
            lease.due_ms = now_ms + self.revoke_retry_ms
            heapq.heappush(heap, (lease.due_ms, lease_id))
        return out

    def _push(self, due_ms: int, lease_id: int) -> None:
        heapq.heappush(self._heap, (due_ms, lease_id))
        if len(self._heap) > _HEAP_SLACK_FACTOR * len(self._leases) + _HEAP_SLACK_MIN:
            self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        self._heap = [(lease.due_ms, lease_id) for lease_id, lease in self._leases.items()]
        heapq.heapify(self._heap)
