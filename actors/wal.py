"""The write-ahead log: Raft entries, hard state and snapshot markers on disk.

How this works: the log is a directory of segment files named
`<sequence:016x>-<first_index:016x>.wal` (first_index = the entry index the
segment expected next when it was opened). A segment is a sequence of records:

    length (u32 LE) | crc32 (u32 LE) | type (u8) | payload (length bytes, msgpack)

The CRC covers the length, the type and the payload. Record types:

    RECORD_ENTRIES     [[index, term, entry_type, data], ...]  (consecutive)
    RECORD_HARD_STATE  [term, vote, commit]
    RECORD_SNAPSHOT    [index, term, conf_state] or [index, term, conf_state, True]

A snapshot record with a fourth element True is a *reset*: the log was
reset to a snapshot installed from the leader (`reset_to_snapshot`); replay
drops every entry before it, the entries after it follow the snapshot.

Writers append records to a buffered file; `sync()` flushes and calls ONE
fdatasync for everything appended since the last sync (group commit). Nothing
that depends on an appended record may be sent or acknowledged before `sync()`
returned. A new segment is started once the active one passes
`segment_bytes`; it opens with the current hard state and snapshot marker so
that every retained suffix of segments is self-describing. Creating and
removing segments fsyncs the directory.

Recovery replays all segments in order. An entries record at an index already
present replaces it and everything after it (Raft's truncation on conflict):
later records win. A bad record at the very end of the last segment is a torn
write from a crash and is truncated with a warning; a bad record with data after
it, or in any segment but the last, is corruption: `WalCorruptError` names the
file and byte offset, and the node refuses to start.

Known limit: a flipped bit in the *length* field of the last record of the last
segment is indistinguishable from a torn tail and is truncated.
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
import zlib
from typing import Callable

import ormsgpack

RECORD_ENTRIES = 1
RECORD_HARD_STATE = 2
RECORD_SNAPSHOT = 3
_RECORD_TYPES = (RECORD_ENTRIES, RECORD_HARD_STATE, RECORD_SNAPSHOT)

_HEADER = struct.Struct("<IIB")
_LENGTH = struct.Struct("<I")
HEADER_BYTES = _HEADER.size
_SEGMENT_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})\.wal$")


class WalError(Exception):
    """A WAL operating error."""


class WalCorruptError(WalError):
    """A record in the middle of the log is damaged: refuse to start."""

    def __init__(self, path: str, offset: int, reason: str):
        super().__init__(f"WAL corrupt: {path} at byte offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


@dataclasses.dataclass(frozen=True, slots=True)
class HardState:
    term: int = 0
    vote: int = 0
    commit: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class SnapshotMarker:
    """The state machine holds everything up to `index` (an entry of `term`)."""

    index: int = 0
    term: int = 0
    conf_state: object = None


@dataclasses.dataclass(slots=True)
class WalRecovery:
    """What replay found: the entries are consecutive, starting at `first_index`."""

    hard_state: HardState
    snapshot: SnapshotMarker
    entries: list  # of (index, term, entry_type, data) tuples
    truncated_tail_bytes: int = 0

    @property
    def last_index(self) -> int:
        return self.entries[-1][0] if self.entries else self.snapshot.index


def segment_name(sequence: int, first_index: int) -> str:
    return f"{sequence:016x}-{first_index:016x}.wal"


def encode_record(record_type: int, payload_obj) -> bytes:
    payload = ormsgpack.packb(payload_obj)
    length = _LENGTH.pack(len(payload))
    type_byte = bytes((record_type,))
    crc = zlib.crc32(payload, zlib.crc32(type_byte, zlib.crc32(length)))
    return _HEADER.pack(len(payload), crc, record_type) + payload


def _fsync_directory(path: str, fsync: Callable[[int], None]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


@dataclasses.dataclass(slots=True)
class _Segment:
    path: str
    sequence: int
    min_index: int = 0  # smallest entry index written to it; 0 = none
    max_index: int = 0


def _read_records(path: str, is_last: bool, log) -> tuple[list, int]:
    """(records, valid_bytes) of one segment; a torn tail of the last one is cut."""
    with open(path, "rb") as handle:
        data = handle.read()
    records = []
    offset = 0
    size = len(data)
    while offset < size:  # bounded by the file size
        problem = ""
        end = offset + HEADER_BYTES
        if end > size:
            problem = "incomplete record header"
        else:
            length, crc, record_type = _HEADER.unpack_from(data, offset)
            end = offset + HEADER_BYTES + length
            if end > size:
                problem = "record extends past the end of the file"
            else:
                payload = data[offset + HEADER_BYTES:end]
                expected = zlib.crc32(payload, zlib.crc32(bytes((record_type,)), zlib.crc32(data[offset:offset + 4])))
                if expected != crc:
                    problem = "checksum mismatch"
                elif record_type not in _RECORD_TYPES:
                    problem = f"unknown record type {record_type}"
        if problem:
            if is_last and end >= size:
                return records, offset
            raise WalCorruptError(path, offset, problem)
        try:
            records.append((record_type, ormsgpack.unpackb(payload), offset))
        except ormsgpack.MsgpackDecodeError as exc:
            raise WalCorruptError(path, offset, f"undecodable payload: {exc}") from None
        offset = end
    return records, offset


class Wal:
    """An open write-ahead log. Use `Wal.open()`; one writer per directory."""

    def __init__(self, directory: str, segment_bytes: int, fsync: Callable[[int], None], log):
        assert segment_bytes > 0
        self.directory = directory
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.log = log
        self.segments: list[_Segment] = []
        self.hard_state = HardState()
        self.snapshot = SnapshotMarker()
        self.last_index = 0
        self._file = None
        self._file_bytes = 0
        self._dirty = False

    # ---- opening and recovery -------------------------------------------------

    @classmethod
    def open(cls, directory: str, segment_bytes: int, fsync: Callable[[int], None] = os.fdatasync,
             log=None) -> tuple["Wal", WalRecovery]:
        """Open (creating if needed) and replay the log in `directory`."""
        os.makedirs(directory, exist_ok=True)
        wal = cls(directory, segment_bytes, fsync, log)
        recovery = wal._replay()
        wal._open_segment(recovery.last_index + 1)
        return wal, recovery

    def _list_segments(self) -> list[tuple[int, str]]:
        found = []
        for name in os.listdir(self.directory):
            match = _SEGMENT_NAME.match(name)
            if match:
                found.append((int(match.group(1), 16), os.path.join(self.directory, name)))
            elif name.endswith(".wal"):
                raise WalError(f"unexpected file in WAL directory: {name}")
        found.sort()
        return found

    def _replay(self) -> WalRecovery:
        recovery = WalRecovery(HardState(), SnapshotMarker(), [])
        found = self._list_segments()
        for position, (sequence, path) in enumerate(found):
            is_last = position == len(found) - 1
            records, valid_bytes = _read_records(path, is_last, self.log)
            segment = _Segment(path, sequence)
            for record_type, payload, offset in records:
                self._replay_record(recovery, segment, record_type, payload, path, offset)
            size = os.path.getsize(path)
            if valid_bytes < size:
                recovery.truncated_tail_bytes = size - valid_bytes
                if self.log is not None:
                    self.log.warning("wal torn tail truncated", segment=path, offset=valid_bytes,
                                     dropped_bytes=size - valid_bytes)
                with open(path, "r+b") as handle:
                    handle.truncate(valid_bytes)
                    handle.flush()
                    self.fsync(handle.fileno())
            self.segments.append(segment)
        self.hard_state = recovery.hard_state
        self.snapshot = recovery.snapshot
        self.last_index = recovery.last_index
        return recovery

    def _replay_record(self, recovery: WalRecovery, segment: _Segment, record_type: int, payload,
                       path: str, offset: int) -> None:
        if record_type == RECORD_HARD_STATE:
            recovery.hard_state = HardState(*payload)
            return
        if record_type == RECORD_SNAPSHOT:
            marker = SnapshotMarker(*payload[:3])
            if len(payload) == 4 and payload[3] is True:
                recovery.snapshot = marker
                recovery.entries.clear()
            elif marker.index >= recovery.snapshot.index:
                recovery.snapshot = marker
            return
        if not payload:
            return
        entries = recovery.entries
        first = payload[0][0]
        if entries and entries[0][0] <= first <= entries[-1][0] + 1:
            del entries[first - entries[0][0]:]
        elif entries and first > entries[-1][0] + 1 and first > recovery.snapshot.index + 1:
            raise WalCorruptError(path, offset, f"gap: entry {first} after {entries[-1][0]}")
        else:
            entries.clear()
        for position, item in enumerate(payload):
            if item[0] != first + position:
                raise WalCorruptError(path, offset, "entries record is not consecutive")
            entries.append(tuple(item))
        segment.min_index = first if not segment.min_index else min(segment.min_index, first)
        segment.max_index = max(segment.max_index, payload[-1][0])

    # ---- writing --------------------------------------------------------------

    def _open_segment(self, first_index: int) -> None:
        sequence = self.segments[-1].sequence + 1 if self.segments else 0
        if self.segments and self._file is None and os.path.getsize(self.segments[-1].path) < self.segment_bytes:
            # Reopen the last segment for appending after recovery.
            segment = self.segments[-1]
            self._file = open(segment.path, "ab")
            self._file_bytes = os.path.getsize(segment.path)
            return
        path = os.path.join(self.directory, segment_name(sequence, first_index))
        if self._file is not None:
            self._file.flush()
            self.fsync(self._file.fileno())
            self._file.close()
        self._file = open(path, "xb")
        self._file_bytes = 0
        self.segments.append(_Segment(path, sequence))
        _fsync_directory(self.directory, self.fsync)
        # Every segment repeats the state so a retained suffix is self-describing.
        self._write(RECORD_HARD_STATE, [self.hard_state.term, self.hard_state.vote, self.hard_state.commit])
        self._write(RECORD_SNAPSHOT, [self.snapshot.index, self.snapshot.term, self.snapshot.conf_state])

    def _write(self, record_type: int, payload_obj) -> None:
        record = encode_record(record_type, payload_obj)
        self._file.write(record)
        self._file_bytes += len(record)
        self._dirty = True

    def _maybe_rotate(self) -> None:
        if self._file_bytes >= self.segment_bytes:
            self._open_segment(self.last_index + 1)

    def append_entries(self, entries: list) -> None:
        """Append consecutive entries (index, term, type, data); an index at or
        below the current last index replaces that entry and all after it."""
        if not entries:
            return
        first = entries[0][0]
        assert first >= 1, first
        assert first <= self.last_index + 1 or first == self.snapshot.index + 1, (first, self.last_index)
        self._write(RECORD_ENTRIES, [tuple(entry) for entry in entries])
        segment = self.segments[-1]
        segment.min_index = first if not segment.min_index else min(segment.min_index, first)
        segment.max_index = max(segment.max_index, entries[-1][0])
        self.last_index = entries[-1][0]
        self._maybe_rotate()

    def set_hard_state(self, term: int, vote: int, commit: int) -> None:
        state = HardState(term, vote, commit)
        if state == self.hard_state:
            return
        assert term >= self.hard_state.term, (term, self.hard_state)
        self.hard_state = state
        self._write(RECORD_HARD_STATE, [term, vote, commit])
        self._maybe_rotate()

    def save_snapshot(self, index: int, term: int, conf_state=None) -> None:
        """Record that the state machine holds everything up to `index`."""
        assert index >= self.snapshot.index, (index, self.snapshot)
        self.snapshot = SnapshotMarker(index, term, conf_state)
        self._write(RECORD_SNAPSHOT, [index, term, conf_state])
        self._maybe_rotate()

    def reset_to_snapshot(self, index: int, term: int, conf_state, hard_state: HardState) -> None:
        """The log restarts at an installed snapshot: a new segment opens with
        the hard state and a reset record, is synced, and then every older
        segment is removed (a crash in between replays the reset: the older
        entries are dropped either way). Entries appended next follow `index`."""
        assert index >= self.snapshot.index and hard_state.term >= self.hard_state.term, (index, hard_state)
        self.hard_state = hard_state
        self.snapshot = SnapshotMarker(index, term, conf_state)
        self.last_index = index
        self._open_segment(index + 1)
        self._write(RECORD_SNAPSHOT, [index, term, conf_state, True])
        self.sync()
        old, self.segments = self.segments[:-1], self.segments[-1:]
        for segment in old:
            os.remove(segment.path)
        if old:
            _fsync_directory(self.directory, self.fsync)

    def sync(self) -> bool:
        """Make everything appended so far durable with one fdatasync. Returns
        whether there was anything to sync."""
        if not self._dirty:
            return False
        self._file.flush()
        self.fsync(self._file.fileno())
        self._dirty = False
        return True

    def release(self, index: int) -> int:
        """Delete the oldest whole segments whose entries are all below `index`
        (never the active one, never past a segment still needed). Call only
        after a snapshot marker at or above `index` is synced. Returns the
        number of segments removed."""
        assert index <= self.snapshot.index + 1, (index, self.snapshot)
        removed = 0
        while len(self.segments) > 1:  # bounded by the number of segments
            segment = self.segments[0]
            if segment.max_index >= index:
                break
            os.remove(segment.path)
            self.segments.pop(0)
            removed += 1
        if removed:
            _fsync_directory(self.directory, self.fsync)
        return removed

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None
