"""Persisted log state, seen by the core through a read-only interface.

How this works: the core reads persisted entries, the hard state and the
snapshot marker through `Storage`. The caller (the actor, or a test) owns the
storage and writes to it only after the corresponding data is durable:
`RawNode.advance()` appends the Ready's entries to a `MemoryStorage`, which is
correct because advance() is only called once they are on disk. Like
etcd-io/raft, `MemoryStorage` keeps a dummy entry at position 0 holding the
index and term of the compaction point, so `term(first_index - 1)` is known.
"""

from __future__ import annotations

from typing import Protocol

from actors.raft.errors import Compacted, Unavailable
from actors.raft.messages import ConfState, Entry, HardState, SnapshotMeta, entry_bytes


class Storage(Protocol):
    def initial_state(self) -> tuple[HardState, ConfState]: ...
    def entries(self, low: int, high: int, max_bytes: int) -> list[Entry]: ...
    def term(self, index: int) -> int: ...
    def first_index(self) -> int: ...
    def last_index(self) -> int: ...
    def snapshot(self) -> SnapshotMeta: ...


class MemoryStorage:
    def __init__(self, conf_state: ConfState, hard_state: HardState = HardState(),
                 snapshot: SnapshotMeta | None = None):
        self.hard_state = hard_state
        self.conf_state = conf_state
        self._snapshot = snapshot or SnapshotMeta(0, 0, conf_state)
        self._entries: list[Entry] = [Entry(self._snapshot.index, self._snapshot.term, 0, b"")]

    @classmethod
    def from_entries(cls, conf_state: ConfState, hard_state: HardState, snapshot: SnapshotMeta,
                     entries: list[Entry]) -> "MemoryStorage":
        """Rebuild from a recovered WAL: consecutive `entries`. The snapshot marker
        is the dummy compaction point when entries follow it directly; when the
        WAL kept entries below it (catch-up entries), the first of them is."""
        storage = cls(conf_state, hard_state, snapshot)
        if entries and entries[0].index == snapshot.index + 1:
            storage._entries.extend(entries)
        elif entries and entries[0].index <= snapshot.index:
            first = entries[0]
            storage._entries = [Entry(first.index, first.term, 0, b"")] + list(entries[1:])
        elif entries:
            raise AssertionError(f"WAL entries start at {entries[0].index}, after snapshot {snapshot.index}")
        return storage

    # ---- the read-only interface ---------------------------------------------

    def initial_state(self) -> tuple[HardState, ConfState]:
        return self.hard_state, self.conf_state

    def first_index(self) -> int:
        return self._entries[0].index + 1

    def last_index(self) -> int:
        return self._entries[0].index + len(self._entries) - 1

    def term(self, index: int) -> int:
        offset = self._entries[0].index
        if index < offset:
            raise Compacted(f"index {index} is compacted (first is {offset + 1})")
        if index - offset >= len(self._entries):
            raise Unavailable(f"index {index} is past the last index {self.last_index()}")
        return self._entries[index - offset].term

    def entries(self, low: int, high: int, max_bytes: int) -> list[Entry]:
        """Entries [low, high), at least one, at most `max_bytes` beyond the first."""
        offset = self._entries[0].index
        if low <= offset:
            raise Compacted(f"index {low} is compacted (first is {offset + 1})")
        if high > self.last_index() + 1:
            raise Unavailable(f"index {high - 1} is past the last index {self.last_index()}")
        return limit_size(self._entries[low - offset:high - offset], max_bytes)

    def snapshot(self) -> SnapshotMeta:
        return self._snapshot

    # ---- writes by the owner, after the data is durable -----------------------

    def set_hard_state(self, hard_state: HardState) -> None:
        self.hard_state = hard_state

    def append(self, entries: list[Entry]) -> None:
        """Append durable entries; an index already present replaces it and all after."""
        if not entries:
            return
        first = self.first_index()
        if entries[-1].index < first:
            return  # all below the compaction point
        if entries[0].index < first:
            entries = entries[first - entries[0].index:]
        offset = entries[0].index - self._entries[0].index
        assert offset <= len(self._entries), (entries[0].index, self.last_index())
        del self._entries[offset:]
        self._entries.extend(entries)

    def compact(self, index: int) -> None:
        """Drop entries up to and including `index` (keeps it as the dummy)."""
        offset = self._entries[0].index
        if index <= offset:
            return
        assert index <= self.last_index(), (index, self.last_index())
        position = index - offset
        kept = self._entries[position]
        self._entries = [Entry(kept.index, kept.term, 0, b"")] + self._entries[position + 1:]

    def apply_snapshot(self, snapshot: SnapshotMeta) -> None:
        """The log was reset to an installed snapshot: every entry goes, the
        snapshot is the new compaction point (etcd's ApplySnapshot)."""
        assert snapshot.index >= self._snapshot.index, (snapshot, self._snapshot)
        self._snapshot = snapshot
        self.conf_state = snapshot.conf_state
        self._entries = [Entry(snapshot.index, snapshot.term, 0, b"")]

    def set_snapshot(self, snapshot: SnapshotMeta) -> None:
        """Record a snapshot marker (does not compact by itself)."""
        assert snapshot.index >= self._snapshot.index
        self._snapshot = snapshot


def limit_size(entries: list[Entry], max_bytes: int) -> list[Entry]:
    if len(entries) <= 1:
        return list(entries)
    total = entry_bytes(entries[0])
    for position in range(1, len(entries)):
        total += entry_bytes(entries[position])
        if total > max_bytes:
            return entries[:position]
    return list(entries)
