"""The Raft log: persisted entries (in storage) followed by unstable ones.

How this works: `storage` holds entries known to be durable. `unstable`
holds entries the core has accepted (a leader's proposals, a follower's
appends) that the caller has not yet persisted; they are handed out in the
next Ready and move to storage in `RawNode.advance()` (`stable_to`). A
conflicting append may truncate unstable entries and even shadow persisted
ones (the unstable offset drops below storage's last index); the persisted
copies are overwritten when the new entries are persisted.

A follower that is sent a snapshot newer than its log resets the log to it
(`restore`): the snapshot is the new compaction point, held in
`unstable.snapshot` until the caller has installed it (Ready.snapshot) and
called advance(); meanwhile nothing below it can be read or applied.

`committed` is the highest index known committed; `applied` is the highest
index handed to the caller for applying. Committed entries are handed out
only once they are persisted locally (`persisted_last_index`).
"""

from __future__ import annotations

from actors.raft.errors import Compacted, Unavailable
from actors.raft.messages import Entry, SnapshotMeta
from actors.raft.storage import Storage, limit_size

NO_LIMIT = 1 << 62


class Unstable:
    def __init__(self, offset: int):
        self.offset = offset  # index of entries[0]
        self.entries: list[Entry] = []
        self.snapshot: SnapshotMeta | None = None  # restored, not yet installed by the caller

    def last_index(self) -> int | None:
        return self.offset + len(self.entries) - 1 if self.entries else None

    def term(self, index: int) -> int | None:
        if self.snapshot is not None and index == self.snapshot.index:
            return self.snapshot.term
        position = index - self.offset
        if 0 <= position < len(self.entries):
            return self.entries[position].term
        return None

    def truncate_and_append(self, entries: list[Entry]) -> None:
        after = entries[0].index
        if after == self.offset + len(self.entries):
            self.entries.extend(entries)
        elif after <= self.offset:
            self.offset = after
            self.entries = list(entries)
        else:
            del self.entries[after - self.offset:]
            self.entries.extend(entries)

    def stable_to(self, index: int, term: int) -> None:
        if self.term(index) != term:
            return  # superseded by a later append: keep them unstable
        del self.entries[:index + 1 - self.offset]
        self.offset = index + 1


class RaftLog:
    def __init__(self, storage: Storage, committed: int = 0, applied: int = 0):
        self.storage = storage
        first = storage.first_index()
        self.unstable = Unstable(storage.last_index() + 1)
        self.committed = max(committed, first - 1)
        self.applied = max(applied, first - 1)
        assert self.committed <= storage.last_index(), (self.committed, storage.last_index())

    def first_index(self) -> int:
        if self.unstable.snapshot is not None:
            return self.unstable.snapshot.index + 1
        return self.storage.first_index()

    def last_index(self) -> int:
        last = self.unstable.last_index()
        if last is not None:
            return last
        if self.unstable.snapshot is not None:
            return self.unstable.snapshot.index
        return self.storage.last_index()

    def last_term(self) -> int:
        return self.term(self.last_index())

    def persisted_last_index(self) -> int:
        return min(self.storage.last_index(), self.unstable.offset - 1)

    def term(self, index: int) -> int | None:
        """The term of the entry at `index`, or None if compacted/unknown."""
        term = self.unstable.term(index)
        if term is not None:
            return term
        if index >= self.unstable.offset or self.unstable.snapshot is not None:
            return None  # unknown, or below a restored snapshot
        try:
            return self.storage.term(index)
        except (Compacted, Unavailable):
            return None

    def match_term(self, index: int, term: int) -> bool:
        return self.term(index) == term

    def is_up_to_date(self, last_index: int, term: int) -> bool:
        """§5.4.1: a candidate's log (last_index, term) is at least as up to date as ours."""
        our_term = self.last_term()
        return term > our_term or (term == our_term and last_index >= self.last_index())

    def append(self, entries: list[Entry]) -> int:
        if entries:
            assert entries[0].index - 1 >= self.committed, (entries[0].index, self.committed)
            self.unstable.truncate_and_append(entries)
        return self.last_index()

    def find_conflict(self, entries) -> int:
        """The index of the first entry that is new or conflicts, or 0."""
        for entry in entries:
            if not self.match_term(entry.index, entry.term):
                return entry.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The largest index <= `index` whose term is <= `term` (fast backtracking)."""
        while index > 0:  # bounded by index
            our_term = self.term(index)
            if our_term is None:
                return index, 0
            if our_term <= term:
                return index, our_term
            index -= 1
        return 0, 0

    def maybe_append(self, index: int, log_term: int, committed: int, entries) -> tuple[int, bool]:
        """A follower's §5.3 append: (last new index, accepted)."""
        if not self.match_term(index, log_term):
            return 0, False
        last_new = index + len(entries)
        conflict = self.find_conflict(entries)
        if conflict:
            assert conflict > self.committed, f"conflict at {conflict} <= committed {self.committed}"
            self.append(list(entries[conflict - (index + 1):]))
        self.commit_to(min(committed, last_new))
        return last_new, True

    def commit_to(self, index: int) -> None:
        if index > self.committed:
            assert index <= self.last_index(), f"commit {index} beyond last index {self.last_index()}"
            self.committed = index

    def maybe_commit(self, index: int, term: int) -> bool:
        """§5.4.2: only an entry of the current term is committed by counting replicas."""
        if index > self.committed and self.term(index) == term:
            self.commit_to(index)
            return True
        return False

    def slice(self, low: int, high: int, max_bytes: int = NO_LIMIT) -> list[Entry]:
        """Entries [low, high) limited to max_bytes (at least one); raises Compacted."""
        if low >= high:
            return []
        if low < self.first_index():
            raise Compacted(f"index {low} is compacted")
        result: list[Entry] = []
        offset = self.unstable.offset
        if low < offset:
            result = self.storage.entries(low, min(high, offset), max_bytes)
            if len(result) < min(high, offset) - low:
                return result
        if high > offset:
            start = max(low, offset)
            result = result + self.unstable.entries[start - offset:high - offset]
        return limit_size(result, max_bytes)

    def entries_from(self, low: int, max_bytes: int) -> list[Entry]:
        if low > self.last_index():
            return []
        return self.slice(low, self.last_index() + 1, max_bytes)

    def restore(self, snapshot: SnapshotMeta) -> None:
        """Reset the log to `snapshot` (newer than anything committed here):
        every entry is dropped, the snapshot is the new compaction point."""
        assert snapshot.index > self.committed, (snapshot.index, self.committed)
        self.committed = snapshot.index
        self.unstable.entries = []
        self.unstable.offset = snapshot.index + 1
        self.unstable.snapshot = snapshot

    def snapshot_installed(self, snapshot: SnapshotMeta) -> None:
        """The caller installed the restored snapshot (RawNode.advance)."""
        if self.unstable.snapshot == snapshot:
            self.unstable.snapshot = None
        self.applied = max(self.applied, snapshot.index)

    def next_committed_entries(self, max_bytes: int = NO_LIMIT) -> list[Entry]:
        if self.unstable.snapshot is not None:
            return []  # the restored snapshot is installed first
        high = min(self.committed, self.persisted_last_index())
        if self.applied >= high:
            return []
        return self.slice(self.applied + 1, high + 1, max_bytes)

    def has_next_committed_entries(self) -> bool:
        if self.unstable.snapshot is not None:
            return False
        return min(self.committed, self.persisted_last_index()) > self.applied

    def applied_to(self, index: int) -> None:
        assert self.applied <= index <= self.committed, (self.applied, index, self.committed)
        self.applied = index

    def stable_to(self, index: int, term: int) -> None:
        self.unstable.stable_to(index, term)
