"""The MVCC logic: etcd v3 semantics over a small ordered key-value backend.

How this works
--------------
One store-wide revision counts write requests; each change inside one
revision has a sub-revision (etcd's main.sub). Six named tables, all in
one backend transaction:

- ``rev``:   (revision, sub) as two big-endian u64 -> msgpack
             [key, create_revision, version, value, lease, tombstone].
             The only place a value is stored; the watch broadcaster
             reads events from it in revision order.
- ``keys``:  encoded key -> msgpack [key_id, full_key_or_None,
             create_revision, mod_revision, sub, version, lease, deleted]:
             the latest state of each key that still has history, so a
             read at the head is two gets (keys, then rev for the value).
- ``hist``:  key_id u64 + revision u64 + sub u64 -> b"\\0" put / b"\\1"
             tombstone: per-key history for reads at past revisions
             (greatest entry <= the revision wins).
- ``meta``:  scalars (revision, compact revision and physical progress,
             applied raft index/term, next key id) and the alarm list.
- ``leases``: lease id u64 -> msgpack [granted TTL].
- ``lease_keys``: lease id u64 + encoded key -> full key (attached keys).

Keys longer than ``inline_key_bytes`` (L) are encoded as key[:L] + a
16-byte blake2b digest, so every encoded key fits LMDB's 511-byte limit;
short keys are stored as-is. This keeps byte order between short keys and
between a short key and a long one; long keys that share their first L
bytes form a contiguous group which a scan sorts by full key.

Writes never fail half-way: every request is checked first (lease exists,
key exists for ignore_*, txn range revisions, NoSpace), then written.
A QuorumError raised after a write started is a bug and becomes an
AssertionError (the caller aborts the whole backend transaction).

Compaction records the compact revision at once (reads below it fail);
``compact_step`` deletes physically in bounded batches: for each revision
record <= the compact revision, it goes unless it is the newest version
of its key at or below the compact revision and not a tombstone.

Pure: no lmdb, no sockets, no clock, no randomness, no files.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from typing import Iterator, Protocol

import ormsgpack

from protocol.errors import QuorumError
from protocol.codec import STATUS_ERROR, STATUS_OK
from protocol.messages import (
    ALARM_ACTIVATE, ALARM_DEACTIVATE, ALARM_GET, ALARM_NONE, ALARM_NOSPACE,
    COMPARE_EQUAL, COMPARE_GREATER, COMPARE_LESS, COMPARE_NOT_EQUAL,
    SORT_ASCEND, SORT_BY_CREATE, SORT_BY_KEY, SORT_BY_MOD, SORT_BY_VALUE, SORT_BY_VERSION,
    SORT_DESCEND, SORT_NONE,
    TARGET_CREATE, TARGET_LEASE, TARGET_MOD, TARGET_VALUE, TARGET_VERSION,
)

TABLES = ("meta", "rev", "keys", "hist", "leases", "lease_keys")
MAX_LEASE_TTL = 9_000_000_000
DEFAULT_INLINE_KEY_BYTES = 480  # 8 (lease id) + 480 + 16 (digest) <= 511
HASH_DIGEST_BYTES = 16
HEAD = 1 << 62  # "read at the head": larger than any revision

META_REVISION = b"revision"
META_COMPACT_REVISION = b"compact_revision"
META_COMPACT_DONE = b"compact_physical_revision"
META_COMPACT_CURSOR = b"compact_cursor"
META_APPLIED_INDEX = b"applied_index"
META_APPLIED_TERM = b"applied_term"
META_CONSISTENT_INDEX = b"consistent_index"
META_NEXT_KEY_ID = b"next_key_id"
META_ALARMS = b"alarms"
# The cluster's member table (actors.members), written by conf-change entries.
META_MEMBERS = b"members"
# What Maintenance Hash covers of the meta table: the rest (applied index,
# compaction progress, the member table) may differ between members.
_HASHED_META = (META_REVISION, META_COMPACT_REVISION, META_ALARMS)

_REV_KEY = struct.Struct(">QQ")
_HIST_KEY = struct.Struct(">QQQ")
_U64 = struct.Struct(">Q")
_packb = ormsgpack.packb
_unpackb = ormsgpack.unpackb
_HIST_PUT = b"\x00"
_HIST_TOMBSTONE = b"\x01"

# keys record fields
K_ID, K_FULL, K_CREATE, K_MOD, K_SUB, K_VERSION, K_LEASE, K_DELETED = range(8)
# rev record fields
R_KEY, R_CREATE, R_VERSION, R_VALUE, R_LEASE, R_TOMBSTONE = range(6)


class BackendTxn(Protocol):
    """One transaction over named ordered tables (bytes -> bytes)."""

    def get(self, table: str, key: bytes) -> bytes | None: ...
    def put(self, table: str, key: bytes, value: bytes) -> None: ...
    def delete(self, table: str, key: bytes) -> bool: ...
    def iterate(self, table: str, start: bytes) -> Iterator[tuple[bytes, bytes]]:
        """Ascending (key, value) pairs from the first key >= start."""
    def last_below(self, table: str, key: bytes) -> tuple[bytes, bytes] | None:
        """The greatest pair whose key is < key, or None."""
    def size_in_use(self) -> int: ...
    def size_over(self, limit_bytes: int) -> bool:
        """Whether size_in_use() > limit_bytes (a backend may know it cheaper)."""


def rev_key(revision: int, sub: int) -> bytes:
    return _REV_KEY.pack(revision, sub)


def u64(value: int) -> bytes:
    return _U64.pack(value)


class KeyEncoding:
    """Order-preserving table keys for user keys of any length (see module doc)."""

    __slots__ = ("inline_key_bytes",)

    def __init__(self, inline_key_bytes: int = DEFAULT_INLINE_KEY_BYTES):
        assert 1 <= inline_key_bytes <= 511 - 8 - HASH_DIGEST_BYTES
        self.inline_key_bytes = inline_key_bytes

    def encode(self, key: bytes) -> bytes:
        if len(key) <= self.inline_key_bytes:
            return key
        return key[: self.inline_key_bytes] + hashlib.blake2b(key, digest_size=HASH_DIGEST_BYTES).digest()


def _empty_kv(key: bytes) -> dict:
    return {"key": key, "create_revision": 0, "mod_revision": 0, "version": 0, "value": b"", "lease": 0}


def _header(revision: int) -> dict:
    return {"header": {"revision": revision}}


class _WriteState:
    """The revision being written by one request (a txn shares one)."""

    __slots__ = ("revision", "sub", "changed")

    def __init__(self, revision: int):
        self.revision = revision
        self.sub = 0
        self.changed = False


class MvccReader:
    """Reads over one backend transaction (any process)."""

    def __init__(self, backend: BackendTxn, encoding: KeyEncoding):
        self.backend = backend
        self.encoding = encoding
        # As etcd, an empty store is at revision 1, so the first write makes 2.
        self.revision = self._meta_int(META_REVISION) or 1
        self.compact_revision = self._meta_int(META_COMPACT_REVISION)

    # -- meta -------------------------------------------------------------

    def _meta_int(self, name: bytes) -> int:
        raw = self.backend.get("meta", name)
        return _U64.unpack(raw)[0] if raw is not None else 0

    def meta_int(self, name: bytes) -> int:
        return self._meta_int(name)

    def alarm_list(self) -> list[list[int]]:
        raw = self.backend.get("meta", META_ALARMS)
        return _unpackb(raw) if raw is not None else []

    # -- key state --------------------------------------------------------

    def _key_record(self, key: bytes) -> list | None:
        raw = self.backend.get("keys", self.encoding.encode(key))
        if raw is None:
            return None
        record = _unpackb(raw)
        full = record[K_FULL]
        # A digest collision would be a silent wrong answer; crash instead.
        assert full is None or full == key, "key digest collision"
        return record

    def _state_at(self, record: list, at_revision: int) -> tuple | None:
        """(create, mod, sub, version, lease) of a key at a revision, None if absent."""
        if record[K_MOD] <= at_revision:
            if record[K_DELETED]:
                return None
            return record[K_CREATE], record[K_MOD], record[K_SUB], record[K_VERSION], record[K_LEASE]
        found = self.backend.last_below("hist", _HIST_KEY.pack(record[K_ID], at_revision + 1, 0))
        if found is None:
            return None
        key_id, revision, sub = _HIST_KEY.unpack(found[0])
        if key_id != record[K_ID] or found[1] == _HIST_TOMBSTONE:
            return None
        stored = _unpackb(self.backend.get("rev", rev_key(revision, sub)))
        return stored[R_CREATE], revision, sub, stored[R_VERSION], stored[R_LEASE]

    def _value(self, revision: int, sub: int) -> bytes:
        return _unpackb(self.backend.get("rev", rev_key(revision, sub)))[R_VALUE]

    def _kv(self, key: bytes, state: tuple, with_value: bool = True) -> dict:
        create, mod, sub, version, lease = state
        return {"key": key, "create_revision": create, "mod_revision": mod, "version": version,
                "value": self._value(mod, sub) if with_value else b"", "lease": lease}

    def _scan(self, start: bytes, end: bytes) -> Iterator[tuple[bytes, list]]:
        """(full key, keys record) for every key record in etcd's range, in key order."""
        if not end:
            record = self._key_record(start)
            if record is not None:
                yield start, record
            return
        upper = None if end == b"\x00" else end
        if upper is not None and upper <= start:
            return
        inline = self.encoding.inline_key_bytes
        seek = start if len(start) <= inline else start[:inline]
        group: list[list] = []
        group_prefix = b""
        for encoded, raw in self.backend.iterate("keys", seek):
            if len(encoded) <= inline or encoded[:inline] != group_prefix:
                if group:
                    stop = yield from self._flush_group(group, start, upper)
                    if stop:
                        return
                    group = []
                if len(encoded) <= inline:
                    if upper is not None and encoded >= upper:
                        return
                    if encoded >= start:
                        yield encoded, _unpackb(raw)
                    continue
                group_prefix = encoded[:inline]
                if upper is not None and group_prefix >= upper:
                    return
            group.append(_unpackb(raw))
        if group:
            yield from self._flush_group(group, start, upper)

    @staticmethod
    def _flush_group(group: list[list], start: bytes, upper: bytes | None):
        group.sort(key=lambda record: record[K_FULL])
        for record in group:
            key = record[K_FULL]
            if key < start:
                continue
            if upper is not None and key >= upper:
                return True
            yield key, record
        return False

    def _live(self, start: bytes, end: bytes, at_revision: int) -> Iterator[tuple[bytes, tuple]]:
        for key, record in self._scan(start, end):
            state = self._state_at(record, at_revision)
            if state is not None:
                yield key, state

    # -- range ------------------------------------------------------------

    def check_read_revision(self, revision: int) -> None:
        if revision > self.revision:
            raise QuorumError("FutureRev")
        if 0 < revision < self.compact_revision:
            raise QuorumError("Compacted")

    def range(self, body: dict, header_revision: int | None = None) -> dict:
        self.check_read_revision(body["revision"])
        return self._range(body, self.revision if header_revision is None else header_revision)

    def _range(self, body: dict, header_revision: int) -> dict:
        at_revision = body["revision"] or HEAD
        limit = body["limit"]
        sort_order, sort_target = body["sort_order"], body["sort_target"]
        min_mod, max_mod = body["min_mod_revision"], body["max_mod_revision"]
        min_create, max_create = body["min_create_revision"], body["max_create_revision"]
        fetch_all = sort_order != SORT_NONE or min_mod or max_mod or min_create or max_create
        fetch_limit = 0 if fetch_all or not limit else limit + 1
        count_only = body["count_only"]
        count = 0
        kvs = []
        for key, state in self._live(body["key"], body["range_end"], at_revision):
            count += 1
            if count_only or (fetch_limit and len(kvs) >= fetch_limit):
                continue
            kvs.append(self._kv(key, state))
        if max_mod:
            kvs = [kv for kv in kvs if kv["mod_revision"] <= max_mod]
        if min_mod:
            kvs = [kv for kv in kvs if kv["mod_revision"] >= min_mod]
        if max_create:
            kvs = [kv for kv in kvs if kv["create_revision"] <= max_create]
        if min_create:
            kvs = [kv for kv in kvs if kv["create_revision"] >= min_create]
        if sort_target != SORT_BY_KEY and sort_order == SORT_NONE:
            sort_order = SORT_ASCEND
        if sort_order != SORT_NONE and not (sort_target == SORT_BY_KEY and sort_order == SORT_ASCEND):
            field = _SORT_FIELDS[sort_target]
            kvs.sort(key=lambda kv: kv[field], reverse=sort_order == SORT_DESCEND)
        more = False
        if limit and len(kvs) > limit:
            del kvs[limit:]
            more = True
        if body["keys_only"]:
            for kv in kvs:
                kv["value"] = b""
        return {"header": {"revision": header_revision}, "kvs": kvs, "more": more, "count": count}

    def get_one(self, key: bytes, revision: int = 0) -> dict | None:
        """The KV of one key at a revision (0 = head), None if absent. No checks."""
        record = self._key_record(key)
        if record is None:
            return None
        state = self._state_at(record, revision or HEAD)
        return None if state is None else self._kv(key, state)

    # -- hash, events -----------------------------------------------------

    def _kept_by_compaction(self, revision: int, sub: int, key: bytes, tombstone: bool, compact: int) -> bool:
        """Whether a record <= compact survives compaction (newest of its key <= compact, not a tombstone)."""
        if tombstone:
            return False
        record = self._key_record(key)
        assert record is not None, "revision record without key record"
        following = next(self.backend.iterate("hist", _HIST_KEY.pack(record[K_ID], revision, sub + 1)), None)
        if following is None:
            return True
        key_id, next_revision, _ = _HIST_KEY.unpack(following[0])
        return key_id != record[K_ID] or next_revision > compact

    def hash_kv(self, revision: int) -> dict:
        # As etcd's HashByRev: unlike a range, hashing AT the compact revision is Compacted.
        if revision > self.revision:
            raise QuorumError("FutureRev")
        if 0 < revision <= self.compact_revision:
            raise QuorumError("Compacted")
        upto = revision or self.revision
        compact = self.compact_revision
        crc = 0
        for raw_key, raw in self.backend.iterate("rev", b""):
            rev, sub = _REV_KEY.unpack(raw_key)
            if rev > upto:
                break
            if rev <= compact:
                stored = _unpackb(raw)
                if not self._kept_by_compaction(rev, sub, stored[R_KEY], stored[R_TOMBSTONE], compact):
                    continue
            crc = zlib.crc32(raw, zlib.crc32(raw_key, crc))
        # etcd reports compact revision -1 until the first compaction.
        never_compacted = self.backend.get("meta", META_COMPACT_REVISION) is None
        return {"header": {"revision": self.revision}, "hash": crc,
                "compact_revision": -1 if never_compacted else compact}

    def hash_all(self) -> dict:
        """etcd's Maintenance Hash: a CRC32 over every key and value of the
        key, history and lease tables (and the revision scalars), at the
        current revision. Equal on members with equal state once a physical
        compaction has finished on each."""
        crc = 0
        for table in ("rev", "keys", "hist", "leases", "lease_keys"):
            crc = zlib.crc32(table.encode(), crc)
            for raw_key, raw in self.backend.iterate(table, b""):
                crc = zlib.crc32(raw, zlib.crc32(raw_key, crc))
        for name in _HASHED_META:
            crc = zlib.crc32(self.backend.get("meta", name) or b"", zlib.crc32(name, crc))
        return {"header": {"revision": self.revision}, "hash": crc}

    def member_table(self) -> dict | None:
        """The stored member table {"members", "conf_index"}, None before the first conf change."""
        raw = self.backend.get("meta", META_MEMBERS)
        return None if raw is None else _unpackb(raw)

    def _prev_kv(self, key: bytes, revision: int, sub: int) -> dict | None:
        record = self._key_record(key)
        if record is None:
            return None
        found = self.backend.last_below("hist", _HIST_KEY.pack(record[K_ID], revision, sub))
        if found is None:
            return None
        key_id, prev_revision, prev_sub = _HIST_KEY.unpack(found[0])
        if key_id != record[K_ID] or found[1] == _HIST_TOMBSTONE:
            return None
        stored = _unpackb(self.backend.get("rev", rev_key(prev_revision, prev_sub)))
        return {"key": key, "create_revision": stored[R_CREATE], "mod_revision": prev_revision,
                "version": stored[R_VERSION], "value": stored[R_VALUE], "lease": stored[R_LEASE]}

    def events(self, start_revision: int, end_revision: int, limit: int, prev_kv: bool = False) -> list:
        """[[revision, [event...]]...] for revisions in [start, end], at most `limit` revisions."""
        if 0 < start_revision < self.compact_revision:
            raise QuorumError("Compacted")
        out: list = []
        end_revision = min(end_revision, self.revision)
        for raw_key, raw in self.backend.iterate("rev", rev_key(max(start_revision, 1), 0)):
            rev, sub = _REV_KEY.unpack(raw_key)
            if rev > end_revision:
                break
            if not out or out[-1][0] != rev:
                if len(out) >= limit:
                    break
                out.append([rev, []])
            stored = _unpackb(raw)
            key = stored[R_KEY]
            if stored[R_TOMBSTONE]:
                event = {"type": "DELETE", "kv": {"key": key, "create_revision": 0, "mod_revision": rev,
                                                   "version": 0, "value": b"", "lease": 0}}
            else:
                event = {"type": "PUT", "kv": {"key": key, "create_revision": stored[R_CREATE],
                                               "mod_revision": rev, "version": stored[R_VERSION],
                                               "value": stored[R_VALUE], "lease": stored[R_LEASE]}}
            if prev_kv:
                event["prev_kv"] = self._prev_kv(key, rev, sub)
            out[-1][1].append(event)
        return out

    # -- leases, alarms ---------------------------------------------------

    def lease_time_to_live(self, body: dict) -> dict:
        lease_id = body["ID"]
        raw = self.backend.get("leases", u64(lease_id)) if lease_id > 0 else None
        if raw is None:
            return {"header": {"revision": self.revision}, "ID": lease_id, "TTL": -1, "grantedTTL": 0, "keys": []}
        ttl = _unpackb(raw)[0]
        keys = [key for _, key in self._lease_keys(lease_id)] if body["keys"] else []
        return {"header": {"revision": self.revision}, "ID": lease_id, "TTL": ttl, "grantedTTL": ttl, "keys": keys}

    def _lease_keys(self, lease_id: int) -> list[tuple[bytes, bytes]]:
        prefix = u64(lease_id)
        out = []
        for table_key, key in self.backend.iterate("lease_keys", prefix):
            if not table_key.startswith(prefix):
                break
            out.append((table_key, key))
        out.sort(key=lambda pair: pair[1])
        return out

    def lease_leases(self) -> dict:
        leases = [{"ID": _U64.unpack(raw_id)[0]} for raw_id, _ in self.backend.iterate("leases", b"")]
        return {"header": {"revision": self.revision}, "leases": leases}

    def lease_ttls(self) -> list[tuple[int, int]]:
        """Every lease as (id, granted TTL), in id order: what the lessor loads."""
        return [(_U64.unpack(raw_id)[0], _unpackb(raw)[0]) for raw_id, raw in self.backend.iterate("leases", b"")]

    def alarms(self) -> list[dict]:
        return [{"member_id": member, "alarm": alarm} for member, alarm in self.alarm_list()]


_SORT_FIELDS = {SORT_BY_KEY: "key", SORT_BY_VERSION: "version", SORT_BY_CREATE: "create_revision",
                SORT_BY_MOD: "mod_revision", SORT_BY_VALUE: "value"}


def _compare_value(compare: dict, kv: dict) -> bool:
    target = compare["target"]
    if target == TARGET_VALUE:
        left, right = kv["value"], compare["value"]
    elif target == TARGET_VERSION:
        left, right = kv["version"], compare["version"]
    elif target == TARGET_CREATE:
        left, right = kv["create_revision"], compare["create_revision"]
    elif target == TARGET_MOD:
        left, right = kv["mod_revision"], compare["mod_revision"]
    else:
        assert target == TARGET_LEASE
        left, right = kv["lease"], compare["lease"]
    result = compare["result"]
    if result == COMPARE_EQUAL:
        return left == right
    if result == COMPARE_NOT_EQUAL:
        return left != right
    if result == COMPARE_GREATER:
        return left > right
    assert result == COMPARE_LESS
    return left < right


class MvccWriter(MvccReader):
    """The single writer: applies raft entries inside one backend transaction."""

    def __init__(self, backend: BackendTxn, encoding: KeyEncoding, *, member_id: int = 0,
                 quota_backend_bytes: int = 0):
        super().__init__(backend, encoding)
        self.member_id = member_id
        self.quota_backend_bytes = quota_backend_bytes
        self.next_key_id = self._meta_int(META_NEXT_KEY_ID) or 1
        self._alarms = self.alarm_list()
        self._dirty = False
        # Only a batch that may have grown the store is checked against the quota
        # (as etcd checks on put), so disarming NOSPACE is not undone by the same batch.
        self._grew = False

    # -- table writes (mark the request dirty) ----------------------------

    def _put(self, table: str, key: bytes, value: bytes) -> None:
        self._dirty = True
        self.backend.put(table, key, value)

    def _delete(self, table: str, key: bytes) -> bool:
        self._dirty = True
        return self.backend.delete(table, key)

    # -- apply ------------------------------------------------------------

    def apply(self, entries: list) -> list:
        """Apply raft entries [(index, term, [(tag, op, body)...])...] -> [(tag, status, body)...]."""
        results = []
        last_index = last_term = None
        for index, term, requests in entries:
            for tag, op, body in requests:
                results.append(self.apply_request(tag, op, body))
            last_index, last_term = index, term
        if last_index is not None:
            self.backend.put("meta", META_APPLIED_INDEX, u64(last_index))
            self.backend.put("meta", META_APPLIED_TERM, u64(last_term))
            self.backend.put("meta", META_CONSISTENT_INDEX, u64(last_index))
        self.finish()
        return results

    def apply_request(self, tag, op: str, body: dict) -> tuple:
        handler = _HANDLERS.get(op)
        if handler is None:
            return tag, STATUS_ERROR, QuorumError("UnknownOp", repr(op)).to_wire()
        self._dirty = False
        try:
            response = handler(self, body)
            self._grew = self._grew or op in _GROWING_OPS
            return tag, STATUS_OK, response
        except QuorumError as error:
            assert not self._dirty, f"{op} failed after it started writing: {error}"
            return tag, STATUS_ERROR, error.to_wire()

    def finish(self) -> None:
        """Write the scalars back and raise NOSPACE when over quota."""
        self.backend.put("meta", META_REVISION, u64(self.revision))
        self.backend.put("meta", META_NEXT_KEY_ID, u64(self.next_key_id))
        if self._grew and self.quota_backend_bytes and not self._nospace():
            if self.backend.size_over(self.quota_backend_bytes):
                self._alarms.append([self.member_id, ALARM_NOSPACE])
                self._alarms.sort()
                self.backend.put("meta", META_ALARMS, _packb(self._alarms))

    def _nospace(self) -> bool:
        return any(alarm == ALARM_NOSPACE for _, alarm in self._alarms)

    # -- put / delete -----------------------------------------------------

    def _check_put(self, body: dict, *, lease_first: bool) -> None:
        lease = body["lease"]
        lease_missing = lease != 0 and (lease < 0 or self.backend.get("leases", u64(lease)) is None)
        if lease_first and lease_missing:
            raise QuorumError("LeaseNotFound")
        if (body["ignore_value"] or body["ignore_lease"]) and self.get_one(body["key"]) is None:
            raise QuorumError("KeyNotFound")
        if lease_missing:
            raise QuorumError("LeaseNotFound")

    def _write_put(self, body: dict, state: _WriteState) -> dict:
        key = body["key"]
        encoded = self.encoding.encode(key)
        raw = self.backend.get("keys", encoded)
        record = _unpackb(raw) if raw is not None else None
        live = record is not None and not record[K_DELETED]
        prev_kv = self._kv(key, (record[K_CREATE], record[K_MOD], record[K_SUB], record[K_VERSION],
                                 record[K_LEASE])) if live and (body["prev_kv"] or body["ignore_value"]) else None
        value = prev_kv["value"] if body["ignore_value"] else body["value"]
        lease = record[K_LEASE] if body["ignore_lease"] else body["lease"]
        revision, sub = state.revision, state.sub
        state.sub += 1
        state.changed = True
        if live:
            create, version, key_id, old_lease = record[K_CREATE], record[K_VERSION] + 1, record[K_ID], record[K_LEASE]
        else:
            create, version, old_lease = revision, 1, 0
            key_id = record[K_ID] if record is not None else self._new_key_id()
        self._put("rev", rev_key(revision, sub), _packb([key, create, version, value, lease, False]))
        self._put("hist", _HIST_KEY.pack(key_id, revision, sub), _HIST_PUT)
        full = None if len(key) <= self.encoding.inline_key_bytes else key
        self._put("keys", encoded, _packb([key_id, full, create, revision, sub,
                                           version, lease, False]))
        if old_lease != lease:
            if old_lease:
                self._delete("lease_keys", u64(old_lease) + encoded)
            if lease:
                self._put("lease_keys", u64(lease) + encoded, key)
        response = {"header": {"revision": revision}, "prev_kv": prev_kv if body["prev_kv"] else None}
        return response

    def _new_key_id(self) -> int:
        key_id = self.next_key_id
        self.next_key_id += 1
        return key_id

    def _write_delete(self, body: dict, state: _WriteState) -> dict:
        victims = list(self._scan(body["key"], body["range_end"]))
        prev_kvs = []
        deleted = 0
        for key, record in victims:
            if record[K_DELETED]:
                continue
            if body["prev_kv"]:
                prev_kvs.append(self._kv(key, (record[K_CREATE], record[K_MOD], record[K_SUB],
                                               record[K_VERSION], record[K_LEASE])))
            self._tombstone(key, record, state)
            deleted += 1
        revision = state.revision if state.changed else state.revision - 1
        return {"header": {"revision": revision}, "deleted": deleted, "prev_kvs": prev_kvs}

    def _tombstone(self, key: bytes, record: list, state: _WriteState) -> None:
        revision, sub = state.revision, state.sub
        state.sub += 1
        state.changed = True
        encoded = self.encoding.encode(key)
        self._put("rev", rev_key(revision, sub), _packb([key, 0, 0, b"", 0, True]))
        self._put("hist", _HIST_KEY.pack(record[K_ID], revision, sub), _HIST_TOMBSTONE)
        self._put("keys", encoded, _packb([record[K_ID], record[K_FULL], 0, revision, sub, 0, 0, True]))
        if record[K_LEASE]:
            self._delete("lease_keys", u64(record[K_LEASE]) + encoded)

    def _commit_state(self, state: _WriteState) -> None:
        if state.changed:
            self.revision = state.revision

    def apply_put(self, body: dict) -> dict:
        if self._nospace():
            raise QuorumError("NoSpace")
        self._check_put(body, lease_first=True)
        state = _WriteState(self.revision + 1)
        response = self._write_put(body, state)
        self._commit_state(state)
        return response

    def apply_delete_range(self, body: dict) -> dict:
        state = _WriteState(self.revision + 1)
        response = self._write_delete(body, state)
        self._commit_state(state)
        return response

    # -- txn --------------------------------------------------------------

    def _compare(self, compare: dict) -> bool:
        kvs = [self._kv(key, state) for key, state in self._live(compare["key"], compare["range_end"], HEAD)]
        if not kvs:
            if compare["target"] == TARGET_VALUE:
                return False
            return _compare_value(compare, _empty_kv(compare["key"]))
        return all(_compare_value(compare, kv) for kv in kvs)

    def _compare_path(self, body: dict, path: list) -> None:
        """etcd's compareToPath: every branch choice, nested ones included, from the pre-txn state."""
        succeeded = all(self._compare(compare) for compare in body["compare"])
        path.append(succeeded)
        for item in body["success" if succeeded else "failure"]:
            nested = item.get("request_txn")
            if nested is not None:
                self._compare_path(nested, path)

    def _check_txn(self, body: dict, path: Iterator[bool], check) -> None:
        for item in body["success" if next(path) else "failure"]:
            (field, sub_body), = item.items()
            if field == "request_txn":
                self._check_txn(sub_body, path, check)
            else:
                check(field, sub_body)

    def _check_put_item(self, field, body) -> None:
        if field == "request_put":
            self._check_put(body, lease_first=False)

    def _check_range_item(self, field, body) -> None:
        if field == "request_range" and body["revision"]:
            self.check_read_revision(body["revision"])

    def apply_txn(self, body: dict) -> dict:
        if self._nospace() and any("request_put" in item for branch in ("success", "failure")
                                   for item in body[branch]):
            raise QuorumError("NoSpace")
        path: list[bool] = []
        self._compare_path(body, path)
        self._check_txn(body, iter(path), lambda field, sub_body: self._check_put_item(field, sub_body))
        self._check_txn(body, iter(path), lambda field, sub_body: self._check_range_item(field, sub_body))
        state = _WriteState(self.revision + 1)
        response = self._execute_txn(body, iter(path), state)
        self._commit_state(state)
        # As etcd: only the top header is set; nested txn headers keep revision 0.
        response["header"]["revision"] = self.revision
        return response

    def _execute_txn(self, body: dict, path: Iterator[bool], state: _WriteState) -> dict:
        succeeded = next(path)
        responses = []
        for item in body["success" if succeeded else "failure"]:
            (field, sub_body), = item.items()
            if field == "request_range":
                header_revision = state.revision if state.changed else state.revision - 1
                responses.append({"response_range": self._range(sub_body, header_revision)})
            elif field == "request_put":
                responses.append({"response_put": self._write_put(sub_body, state)})
            elif field == "request_delete_range":
                responses.append({"response_delete_range": self._write_delete(sub_body, state)})
            else:
                assert field == "request_txn"
                responses.append({"response_txn": self._execute_txn(sub_body, path, state)})
        return {"header": {"revision": 0}, "succeeded": succeeded, "responses": responses}

    # -- compaction -------------------------------------------------------

    def apply_compaction(self, body: dict) -> dict:
        revision = body["revision"]
        # As etcd (compactMainRev starts at -1): a never-compacted store takes
        # compaction 0 once; after any compaction, a revision at or below it is Compacted.
        never_compacted = self.backend.get("meta", META_COMPACT_REVISION) is None
        if revision <= self.compact_revision and not never_compacted:
            raise QuorumError("Compacted")
        if revision > self.revision:
            raise QuorumError("FutureRev")
        self.compact_revision = revision
        self.backend.put("meta", META_COMPACT_REVISION, u64(revision))
        # Rescan from the start: records kept by an earlier compaction may go now.
        self.backend.put("meta", META_COMPACT_CURSOR, b"")
        return _header(self.revision)

    def compaction_pending(self) -> bool:
        return self._meta_int(META_COMPACT_DONE) < self.compact_revision

    def compact_step(self, batch_records: int) -> bool:
        """Delete up to batch_records revision records physically; True when no work is left."""
        target = self.compact_revision
        if self._meta_int(META_COMPACT_DONE) >= target:
            return True
        cursor = self.backend.get("meta", META_COMPACT_CURSOR) or b""
        batch = []
        finished = True
        for raw_key, raw in self.backend.iterate("rev", cursor):
            if raw_key == cursor:
                continue
            if _REV_KEY.unpack(raw_key)[0] > target:
                break
            if len(batch) >= batch_records:
                finished = False
                break
            stored = _unpackb(raw)
            batch.append((raw_key, stored[R_KEY], stored[R_TOMBSTONE]))
        for raw_key, key, tombstone in batch:
            self._compact_record(raw_key, key, tombstone, target)
        if finished:
            self.backend.put("meta", META_COMPACT_DONE, u64(target))
            self.backend.put("meta", META_COMPACT_CURSOR, b"")
        else:
            self.backend.put("meta", META_COMPACT_CURSOR, batch[-1][0])
        return finished

    def _compact_record(self, raw_key: bytes, key: bytes, tombstone: bool, target: int) -> None:
        revision, sub = _REV_KEY.unpack(raw_key)
        encoded = self.encoding.encode(key)
        record = _unpackb(self.backend.get("keys", encoded))
        following = next(self.backend.iterate("hist", _HIST_KEY.pack(record[K_ID], revision, sub + 1)), None)
        has_following = following is not None and _HIST_KEY.unpack(following[0])[0] == record[K_ID]
        superseded = has_following and _HIST_KEY.unpack(following[0])[1] <= target
        if not superseded and not tombstone:
            return
        self.backend.delete("rev", raw_key)
        self.backend.delete("hist", _HIST_KEY.pack(record[K_ID], revision, sub))
        if tombstone and not has_following:
            self.backend.delete("keys", encoded)

    # -- alarms, leases ---------------------------------------------------

    def apply_alarm(self, body: dict) -> dict:
        action, member, alarm = body["action"], body["member_id"], body["alarm"]
        changed = []
        if action == ALARM_GET:
            changed = [pair for pair in self._alarms if alarm == ALARM_NONE or pair[1] == alarm]
        elif action == ALARM_ACTIVATE:
            if alarm != ALARM_NONE and [member, alarm] not in self._alarms:
                self._alarms.append([member, alarm])
                changed = [[member, alarm]]
        else:
            assert action == ALARM_DEACTIVATE
            if [member, alarm] in self._alarms:
                self._alarms.remove([member, alarm])
                changed = [[member, alarm]]
        if action != ALARM_GET:
            self._alarms.sort()
            self.backend.put("meta", META_ALARMS, _packb(self._alarms))
        return {"header": {"revision": self.revision},
                "alarms": [{"member_id": m, "alarm": a} for m, a in changed]}

    def apply_lease_grant(self, body: dict) -> dict:
        if self._nospace():
            raise QuorumError("NoSpace")
        lease_id, ttl = body["ID"], body["TTL"]
        if lease_id == 0:
            raise QuorumError("LeaseNotFound")
        if ttl > MAX_LEASE_TTL:
            raise QuorumError("LeaseTTLTooLarge")
        if self.backend.get("leases", u64(lease_id)) is not None:
            raise QuorumError("LeaseExist")
        self._put("leases", u64(lease_id), _packb([ttl]))
        return {"header": {"revision": self.revision}, "ID": lease_id, "TTL": ttl, "error": ""}

    def apply_lease_revoke(self, body: dict) -> dict:
        lease_id = body["ID"]
        if lease_id <= 0 or self.backend.get("leases", u64(lease_id)) is None:
            raise QuorumError("LeaseNotFound")
        state = _WriteState(self.revision + 1)
        for table_key, key in self._lease_keys(lease_id):
            record = self._key_record(key)
            assert record is not None and not record[K_DELETED], "lease attached to a missing key"
            self._tombstone(key, record, state)
        self._delete("leases", u64(lease_id))
        self._commit_state(state)
        return _header(self.revision)


_GROWING_OPS = frozenset({"put", "txn", "lease_grant"})

def _apply_member_table(writer: MvccWriter, body: dict) -> dict:
    # Not a key-space write: the revision does not move (as etcd's membership store).
    writer._put("meta", META_MEMBERS, _packb({"members": body["members"], "conf_index": body["conf_index"]}))
    return {"header": _header(writer.revision)}


_HANDLERS = {
    "member_table": _apply_member_table,
    "put": MvccWriter.apply_put,
    "delete_range": MvccWriter.apply_delete_range,
    "txn": MvccWriter.apply_txn,
    "compaction": MvccWriter.apply_compaction,
    "alarm": MvccWriter.apply_alarm,
    "lease_grant": MvccWriter.apply_lease_grant,
    "lease_revoke": MvccWriter.apply_lease_revoke,
}
