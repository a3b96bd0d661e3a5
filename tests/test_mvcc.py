"""Unit tests of the MVCC store's etcd semantics, one claim per test, on the real LMDB store.

Method: each test opens a fresh store in tmp_path, applies validated requests
through `MvccStore.apply` (as the applier does) and checks responses and
reads. tests/test_mvcc_model.py covers the same ground with random histories.
"""

from __future__ import annotations

import ast
import multiprocessing
import os
import pathlib

import pytest

from actors.mvcc import MvccStore, MvccWriter, KeyEncoding
from actors.mvcc.memory_backend import MemoryBackend
from protocol.codec import STATUS_ERROR, STATUS_OK
from protocol.errors import QuorumError
from protocol.limits import Limits
from protocol.messages import (
    ALARM_ACTIVATE, ALARM_DEACTIVATE, ALARM_GET, ALARM_NOSPACE, COMPARE_EQUAL, COMPARE_GREATER,
    SORT_BY_CREATE, SORT_BY_VALUE, SORT_DESCEND, TARGET_CREATE, TARGET_VALUE, TARGET_VERSION,
    validate_request,
)

LIMITS = Limits(compaction_batch_revisions=2)


class Harness:
    """A store plus helpers that validate bodies and number raft entries."""

    def __init__(self, directory, **options):
        options.setdefault("map_size_bytes", 64 << 20)
        options.setdefault("quota_backend_bytes", 32 << 20)
        self.directory = str(directory)
        self.store = MvccStore.open(self.directory, writer=True, limits=LIMITS, member_id=7, sync=False, **options)
        self.index = 0

    def apply_many(self, requests):
        self.index += 1
        entry = [(tag, op, validate_request(op, body, LIMITS)) for tag, (op, body) in enumerate(requests)]
        return self.store.apply([(self.index, 2, entry)])

    def ok(self, op, **body):
        (_, status, response), = self.apply_many([(op, body)])
        assert status == STATUS_OK, response
        return response

    def error(self, op, **body):
        (_, status, response), = self.apply_many([(op, body)])
        assert status == STATUS_ERROR, response
        return response["code"]

    def range(self, **body):
        return self.store.range(validate_request("range", body, LIMITS))

    def keys(self, **body):
        return [kv["key"] for kv in self.range(**body)["kvs"]]


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path / "store")
    yield harness
    harness.store.close()


def put_op(key, value=b"", **extra):
    return {"request_put": {"key": key, "value": value, **extra}}


# -- range -------------------------------------------------------------------

def test_range_key_forms(h):
    for key in (b"a", b"b", b"c", b"d"):
        h.ok("put", key=key, value=key)
    assert h.keys(key=b"b") == [b"b"]
    assert h.keys(key=b"b", range_end=b"d") == [b"b", b"c"]
    assert h.keys(key=b"b", range_end=b"\x00") == [b"b", b"c", b"d"]
    assert h.keys(key=b"\x00", range_end=b"\x00") == [b"a", b"b", b"c", b"d"]
    assert h.keys(key=b"c", range_end=b"a") == []
    assert h.keys(key=b"zz") == []


def test_range_revision_checks(h):
    for value in (b"1", b"2", b"3", b"4"):  # revisions 2..5 (an empty store is at 1)
        h.ok("put", key=b"k", value=value)
    with pytest.raises(QuorumError) as error:
        h.range(key=b"k", revision=6)
    assert error.value.code == "FutureRev"
    assert h.range(key=b"k", revision=5)["kvs"][0]["value"] == b"4"  # the head itself is readable
    h.ok("compaction", revision=4)
    with pytest.raises(QuorumError) as error:
        h.range(key=b"k", revision=3)
    assert error.value.code == "Compacted"
    # Reading AT the compact revision is allowed, before and after physical compaction.
    assert h.range(key=b"k", revision=4)["kvs"][0]["value"] == b"3"
    while not h.store.compact_step():
        pass
    assert h.range(key=b"k", revision=4)["kvs"][0]["value"] == b"3"
    assert h.range(key=b"k")["header"]["revision"] == 5


def test_range_limit_count_more_keys_only_count_only(h):
    for index in range(5):
        h.ok("put", key=b"k%d" % index, value=b"v")
    result = h.range(key=b"k", range_end=b"l", limit=2)
    assert [kv["key"] for kv in result["kvs"]] == [b"k0", b"k1"]
    assert result["more"] and result["count"] == 5
    result = h.range(key=b"k", range_end=b"l", limit=5)
    assert not result["more"] and len(result["kvs"]) == 5
    assert all(kv["value"] == b"" for kv in h.range(key=b"k", range_end=b"l", keys_only=True)["kvs"])
    result = h.range(key=b"k", range_end=b"l", count_only=True)
    assert result["kvs"] == [] and result["count"] == 5 and not result["more"]


def test_range_sort_and_filters(h):
    h.ok("put", key=b"a", value=b"3")
    h.ok("put", key=b"b", value=b"1")
    h.ok("put", key=b"c", value=b"2")
    h.ok("put", key=b"a", value=b"4")  # a: create 2, mod 5; b: 3, 3; c: 4, 4
    assert h.keys(key=b"a", range_end=b"z", sort_target=SORT_BY_VALUE) == [b"b", b"c", b"a"]
    assert h.keys(key=b"a", range_end=b"z", sort_target=SORT_BY_CREATE, sort_order=SORT_DESCEND) == [b"c", b"b", b"a"]
    assert h.keys(key=b"a", range_end=b"z", min_mod_revision=4) == [b"a", b"c"]
    assert h.keys(key=b"a", range_end=b"z", max_create_revision=3) == [b"a", b"b"]
    result = h.range(key=b"a", range_end=b"z", min_mod_revision=4, limit=1)
    assert result["count"] == 3 and result["more"] and [kv["key"] for kv in result["kvs"]] == [b"a"]


def test_empty_store_is_at_revision_one(h, tmp_path):
    """As etcd 3.4: a fresh store answers revision 1; the first write makes revision 2."""
    assert h.store.revision() == 1 and h.store.status()["revision"] == 1
    assert h.range(key=b"a")["header"]["revision"] == 1
    assert h.range(key=b"a", revision=1)["kvs"] == []
    with pytest.raises(QuorumError) as error:
        h.range(key=b"a", revision=2)
    assert error.value.code == "FutureRev"
    assert h.store.hash_kv(0) == h.store.hash_kv(1) == {"header": {"revision": 1}, "hash": 0, "compact_revision": -1}
    with pytest.raises(QuorumError):
        h.store.hash_kv(2)
    assert h.store.events(0, 10, 10) == []
    assert h.ok("lease_grant", ID=1, TTL=5)["header"]["revision"] == 1
    assert h.ok("delete_range", key=b"a", range_end=b"\x00")["header"]["revision"] == 1
    snapshot = str(tmp_path / "empty.db")
    h.store.copy_to(snapshot)
    assert MvccStore.snapshot_status(snapshot)["revision"] == 1
    # Compacting an empty store to its revision (1) is allowed, once; 2 is in the future.
    assert h.error("compaction", revision=2) == "FutureRev"
    assert h.ok("compaction", revision=1)["header"]["revision"] == 1
    assert h.error("compaction", revision=1) == "Compacted"
    assert h.store.compaction_pending()
    assert h.store.compact_step() and not h.store.compaction_pending()
    assert h.range(key=b"a", revision=1)["kvs"] == []
    assert h.ok("put", key=b"a", value=b"1")["header"]["revision"] == 2
    assert h.store.events(1, 10, 10)[0][0] == 2
    assert MvccWriter(MemoryBackend(), KeyEncoding()).revision == 1


# -- put ---------------------------------------------------------------------

def test_put_versions_and_create_revision(h):
    # As etcd: an empty store is at revision 1, so the first write makes revision 2.
    assert h.ok("put", key=b"k", value=b"1")["header"]["revision"] == 2
    h.ok("put", key=b"k", value=b"2")
    kv = h.range(key=b"k")["kvs"][0]
    assert (kv["create_revision"], kv["mod_revision"], kv["version"]) == (2, 3, 2)
    h.ok("delete_range", key=b"k")
    h.ok("put", key=b"k", value=b"3")
    kv = h.range(key=b"k")["kvs"][0]
    assert (kv["create_revision"], kv["mod_revision"], kv["version"]) == (5, 5, 1)
    assert h.range(key=b"k", revision=4)["kvs"] == []
    assert h.range(key=b"k", revision=2)["kvs"][0]["value"] == b"1"
    assert h.range(key=b"k", revision=1)["kvs"] == []


def test_put_prev_kv_ignore_value_ignore_lease(h):
    h.ok("lease_grant", ID=5, TTL=60)
    assert h.ok("put", key=b"k", value=b"1", lease=5, prev_kv=True)["prev_kv"] is None
    response = h.ok("put", key=b"k", ignore_value=True, ignore_lease=True, prev_kv=True)
    assert response["prev_kv"]["value"] == b"1"
    kv = h.range(key=b"k")["kvs"][0]
    assert (kv["value"], kv["lease"], kv["version"]) == (b"1", 5, 2)
    assert h.error("put", key=b"missing", ignore_value=True) == "KeyNotFound"
    assert h.error("put", key=b"missing", ignore_lease=True) == "KeyNotFound"
    assert h.error("put", key=b"k", value=b"x", lease=99) == "LeaseNotFound"
    assert h.error("put", key=b"missing", ignore_value=True, lease=99) == "LeaseNotFound"


def test_put_attaches_and_detaches_lease(h):
    h.ok("lease_grant", ID=1, TTL=10)
    h.ok("lease_grant", ID=2, TTL=10)
    h.ok("put", key=b"k", lease=1)
    h.ok("put", key=b"j", lease=1)
    h.ok("put", key=b"k", lease=2)
    assert h.store.lease_time_to_live({"ID": 1, "keys": True})["keys"] == [b"j"]
    assert h.store.lease_time_to_live({"ID": 2, "keys": True})["keys"] == [b"k"]
    h.ok("delete_range", key=b"j")
    assert h.store.lease_time_to_live({"ID": 1, "keys": True})["keys"] == []


# -- delete ------------------------------------------------------------------

def test_delete_range_tombstones_one_sub_per_key(h):
    for key in (b"a", b"b", b"c"):
        h.ok("put", key=key, value=key)
    response = h.ok("delete_range", key=b"a", range_end=b"c", prev_kv=True)
    assert response["deleted"] == 2 and response["header"]["revision"] == 5
    assert [kv["key"] for kv in response["prev_kvs"]] == [b"a", b"b"]
    (revision, events), = h.store.events(5, 5, 10, prev_kv=True)
    assert revision == 5 and [(e["type"], e["kv"]["key"]) for e in events] == [("DELETE", b"a"), ("DELETE", b"b")]
    assert events[0]["prev_kv"]["value"] == b"a"
    assert h.keys(key=b"\x00", range_end=b"\x00") == [b"c"]


def test_noop_writes_do_not_bump_revision(h):
    h.ok("put", key=b"a")
    response = h.ok("delete_range", key=b"x", range_end=b"z")
    assert response == {"header": {"revision": 2}, "deleted": 0, "prev_kvs": []}
    response = h.ok("txn", compare=[], success=[{"request_delete_range": {"key": b"zz"}}], failure=[])
    assert response["header"]["revision"] == 2
    assert h.store.revision() == 2


# -- txn ---------------------------------------------------------------------

def test_txn_compare_missing_key(h):
    # A missing key compares as a zero KV (version 0 == 0 holds) except on VALUE (always false).
    assert h.ok("txn", compare=[{"key": b"k", "target": TARGET_VERSION, "version": 0}],
                success=[], failure=[])["succeeded"]
    assert not h.ok("txn", compare=[{"key": b"k", "target": TARGET_VALUE, "value": b""}],
                    success=[], failure=[])["succeeded"]


def test_txn_compare_over_range_needs_all(h):
    h.ok("put", key=b"a", value=b"1")
    h.ok("put", key=b"b", value=b"2")
    compare = {"key": b"a", "range_end": b"c", "target": TARGET_CREATE, "result": COMPARE_GREATER,
               "create_revision": 0}
    assert h.ok("txn", compare=[compare], success=[], failure=[])["succeeded"]
    compare["create_revision"] = 2  # a was created at 2: 2 > 2 fails for a
    assert not h.ok("txn", compare=[compare], success=[], failure=[])["succeeded"]


def test_txn_one_revision_own_writes_nested(h):
    h.ok("put", key=b"base", value=b"0")
    response = h.ok("txn", compare=[{"key": b"base", "target": TARGET_VALUE, "value": b"0",
                                     "result": COMPARE_EQUAL}],
                    success=[{"request_range": {"key": b"a"}}, put_op(b"a", b"1"), put_op(b"b", b"2"),
                             {"request_range": {"key": b"a", "range_end": b"c"}},
                             {"request_txn": {"compare": [{"key": b"a", "target": TARGET_VERSION, "version": 0}],
                                              "success": [put_op(b"c", b"3")], "failure": []}}],
                    failure=[])
    assert response["succeeded"] and response["header"]["revision"] == 3
    responses = response["responses"]
    assert responses[0]["response_range"]["header"]["revision"] == 2
    assert responses[0]["response_range"]["kvs"] == []
    assert responses[1]["response_put"]["header"]["revision"] == 3
    assert [kv["key"] for kv in responses[3]["response_range"]["kvs"]] == [b"a", b"b", b"base"]
    # Nested compares see the state before the txn: a did not exist, so version == 0 held.
    assert responses[4]["response_txn"]["succeeded"]
    assert responses[4]["response_txn"]["header"]["revision"] == 0  # etcd never sets nested txn headers
    (revision, events), = h.store.events(3, 3, 10)
    assert [(e["kv"]["key"], e["kv"]["mod_revision"]) for e in events] == [(b"a", 3), (b"b", 3), (b"c", 3)]


def test_failed_txn_leaves_nothing(h):
    # The second put names a missing lease: the whole txn fails before writing anything.
    assert h.error("txn", compare=[], success=[put_op(b"a", b"1"), put_op(b"b", b"2", lease=42)],
                   failure=[]) == "LeaseNotFound"
    assert h.store.revision() == 1 and h.keys(key=b"\x00", range_end=b"\x00") == []
    h.ok("put", key=b"a")
    # Revision 3 is the one this txn would write: still a future revision for its range.
    assert h.error("txn", compare=[], success=[put_op(b"b"), {"request_range": {"key": b"a", "revision": 3}}],
                   failure=[]) == "FutureRev"
    assert h.store.revision() == 2


def test_one_apply_is_atomic_per_request(h):
    results = h.apply_many([("put", {"key": b"a"}), ("put", {"key": b"b", "lease": 3}), ("put", {"key": b"c"})])
    assert [status for _, status, _ in results] == [STATUS_OK, STATUS_ERROR, STATUS_OK]
    assert [body["header"]["revision"] for _, status, body in results if status == STATUS_OK] == [2, 3]
    assert h.keys(key=b"\x00", range_end=b"\x00") == [b"a", b"c"]


# -- compaction --------------------------------------------------------------

def test_compaction_errors_and_physical_deletion(h):
    h.ok("put", key=b"a", value=b"1")   # 2
    h.ok("put", key=b"a", value=b"2")   # 3
    h.ok("put", key=b"b", value=b"1")   # 4
    h.ok("delete_range", key=b"b")      # 5
    h.ok("put", key=b"c", value=b"1")   # 6
    assert h.error("compaction", revision=7) == "FutureRev"
    h.ok("compaction", revision=5)
    assert h.error("compaction", revision=5) == "Compacted"
    assert h.error("compaction", revision=4) == "Compacted"
    assert h.store.compaction_pending()
    hash_before = h.store.hash_kv(0)
    steps = 1
    while not h.store.compact_step():
        assert h.store.compaction_pending()  # the applier answers `physical` only once this is False
        steps += 1
    assert steps >= 2  # compaction_batch_revisions = 2
    assert not h.store.compaction_pending()
    assert h.store.hash_kv(0) == hash_before
    events = h.store.events(0, 10, 10)
    # Kept: a@3 (newest <= 5), c@6 (above). Gone: a@2, b@4 and its tombstone b@5.
    assert [(revision, [e["kv"]["key"] for e in evs]) for revision, evs in events] == [(3, [b"a"]), (6, [b"c"])]
    assert h.range(key=b"b", revision=5)["kvs"] == []
    assert h.range(key=b"a", revision=5)["kvs"][0]["value"] == b"2"
    with pytest.raises(QuorumError):
        h.store.events(3, 10, 10)
    # b left the key index: recreating it starts from version 1 and a new history.
    h.ok("put", key=b"b", value=b"x")
    kv = h.range(key=b"b")["kvs"][0]
    assert (kv["version"], kv["create_revision"]) == (1, 7)


def test_hash_kv_revision_checks(h):
    h.ok("put", key=b"a")
    h.ok("put", key=b"a")
    assert h.store.hash_kv(1)["hash"] == 0  # nothing at or below the empty store's revision
    assert h.store.hash_kv(2)["hash"] != h.store.hash_kv(3)["hash"]
    assert h.store.hash_kv(0) == h.store.hash_kv(3)
    with pytest.raises(QuorumError) as error:
        h.store.hash_kv(4)
    assert error.value.code == "FutureRev"
    assert h.store.hash_kv(0)["compact_revision"] == -1  # as etcd before the first compaction
    h.ok("compaction", revision=2)
    # As etcd's HashByRev (unlike a range): AT the compact revision is Compacted too.
    for revision in (1, 2):
        with pytest.raises(QuorumError) as error:
            h.store.hash_kv(revision)
        assert error.value.code == "Compacted"
    assert h.store.hash_kv(3) == h.store.hash_kv(0)
    assert h.store.hash_kv(0)["compact_revision"] == 2


# -- alarms and quota --------------------------------------------------------

def test_lmdb_size_over_uses_the_bound_only_below_the_limit(tmp_path):
    """Goal: the quota check's shortcut never hides an overflow. Method: an
    LmdbTxn with a bound at or under the limit answers False without counting;
    one with a bound above it (or none) counts the pages in use."""
    from actors.mvcc.lmdb_store import LmdbTxn
    harness = Harness(tmp_path / "s")
    try:
        harness.apply_many([("put", {"key": b"k%d" % index, "value": b"x" * 2000}) for index in range(20)])
        store = harness.store
        with store.env.begin() as txn:
            in_use = LmdbTxn(txn, store.dbs).size_in_use()
            assert in_use > 40_000
            assert LmdbTxn(txn, store.dbs, size_bound_bytes=in_use * 2).size_over(in_use - 1)
            assert not LmdbTxn(txn, store.dbs, size_bound_bytes=in_use * 2).size_over(in_use)
            assert LmdbTxn(txn, store.dbs).size_over(in_use - 1)
            # Trusted as given: a bound at or under the limit answers without counting.
            assert not LmdbTxn(txn, store.dbs, size_bound_bytes=1).size_over(in_use - 1)
    finally:
        harness.store.close()


def test_nospace_alarm_from_quota(tmp_path):
    harness = Harness(tmp_path / "s", quota_backend_bytes=64 * 1024)
    try:
        statuses = [harness.apply_many([("put", {"key": b"k%d" % index, "value": b"x" * 2000})])[0][1]
                    for index in range(60)]
        # Raised after the apply that crossed the quota; later puts fail.
        assert STATUS_OK in statuses and statuses[-1] == STATUS_ERROR
        assert statuses.index(STATUS_ERROR) > 5 and STATUS_OK not in statuses[statuses.index(STATUS_ERROR):]
        assert harness.store.alarms() == [{"member_id": 7, "alarm": ALARM_NOSPACE}]
        assert harness.error("put", key=b"k", value=b"x") == "NoSpace"
        assert harness.error("txn", compare=[], success=[], failure=[put_op(b"x")]) == "NoSpace"
        assert harness.error("lease_grant", ID=1, TTL=5) == "NoSpace"
        harness.ok("txn", compare=[], success=[{"request_range": {"key": b"k1"}}], failure=[])
        harness.ok("delete_range", key=b"k", range_end=b"l")
        harness.ok("compaction", revision=harness.store.revision())
        assert harness.ok("alarm", action=ALARM_GET)["alarms"] == [{"member_id": 7, "alarm": ALARM_NOSPACE}]
        response = harness.ok("alarm", action=ALARM_DEACTIVATE, member_id=7, alarm=ALARM_NOSPACE)
        assert response["alarms"] == [{"member_id": 7, "alarm": ALARM_NOSPACE}]
        assert harness.store.alarms() == []
        while not harness.store.compact_step():
            pass
        harness.ok("put", key=b"small", value=b"x")
        assert harness.store.alarms() == []
    finally:
        harness.store.close()


def test_alarm_activate_deactivate(h):
    assert h.ok("alarm", action=ALARM_ACTIVATE, member_id=3, alarm=ALARM_NOSPACE)["alarms"] == [
        {"member_id": 3, "alarm": ALARM_NOSPACE}]
    assert h.ok("alarm", action=ALARM_ACTIVATE, member_id=3, alarm=ALARM_NOSPACE)["alarms"] == []
    assert h.error("put", key=b"a") == "NoSpace"
    assert h.ok("alarm", action=ALARM_DEACTIVATE, member_id=4, alarm=ALARM_NOSPACE)["alarms"] == []
    h.ok("alarm", action=ALARM_DEACTIVATE, member_id=3, alarm=ALARM_NOSPACE)
    h.ok("put", key=b"a")


# -- leases ------------------------------------------------------------------

def test_lease_grant_checks(h):
    assert h.error("lease_grant", ID=0, TTL=5) == "LeaseNotFound"
    assert h.error("lease_grant", ID=1, TTL=9_000_000_001) == "LeaseTTLTooLarge"
    assert h.ok("lease_grant", ID=1, TTL=5) == {"header": {"revision": 1}, "ID": 1, "TTL": 5, "error": ""}
    assert h.error("lease_grant", ID=1, TTL=5) == "LeaseExist"
    assert h.store.lease_leases()["leases"] == [{"ID": 1}]
    assert h.store.lease_time_to_live({"ID": 1, "keys": False})["grantedTTL"] == 5
    assert h.store.lease_time_to_live({"ID": 9, "keys": True}) == {
        "header": {"revision": 1}, "ID": 9, "TTL": -1, "grantedTTL": 0, "keys": []}


def test_lease_revoke_deletes_keys_in_one_revision(h):
    h.ok("lease_grant", ID=1, TTL=5)
    h.ok("put", key=b"b", lease=1)
    h.ok("put", key=b"a", lease=1)
    h.ok("put", key=b"c")
    assert h.ok("lease_revoke", ID=1)["header"]["revision"] == 5
    (revision, events), = h.store.events(5, 5, 10)
    assert [(e["type"], e["kv"]["key"]) for e in events] == [("DELETE", b"a"), ("DELETE", b"b")]
    assert h.keys(key=b"\x00", range_end=b"\x00") == [b"c"]
    assert h.error("lease_revoke", ID=1) == "LeaseNotFound"
    h.ok("lease_grant", ID=2, TTL=5)
    assert h.ok("lease_revoke", ID=2)["header"]["revision"] == 5  # no keys: no new revision


# -- long keys ---------------------------------------------------------------

def test_long_keys_round_trip_and_order(tmp_path):
    harness = Harness(tmp_path / "s")  # default inline length
    try:
        big = b"p" * 600
        keys = [big + b"\x00", big, big + b"b" * 1_000_000, big + b"a", b"p" * 599, b"q"]
        for key in keys:
            harness.ok("put", key=key, value=key[-3:])
        assert harness.keys(key=b"\x00", range_end=b"\x00") == sorted(keys)
        assert harness.keys(key=big + b"\x00", range_end=big + b"b") == [big + b"\x00", big + b"a"]
        assert harness.range(key=big + b"b" * 1_000_000)["kvs"][0]["value"] == b"bbb"
        harness.ok("delete_range", key=big, range_end=big + b"a")
        assert harness.keys(key=b"p", range_end=b"q") == [b"p" * 599, big + b"a", big + b"b" * 1_000_000]
    finally:
        harness.store.close()


def test_key_encoding_is_short_and_distinct():
    encoding = KeyEncoding(4)
    assert encoding.encode(b"abcd") == b"abcd"
    assert len(encoding.encode(b"abcde")) == 4 + 16
    assert encoding.encode(b"abcde") != encoding.encode(b"abcdf")


# -- applied index, layout, snapshots ----------------------------------------

def test_applied_index_and_noop_entry(h):
    h.ok("put", key=b"a")
    assert h.store.applied_index() == 1
    assert h.store.apply([(2, 3, []), (3, 3, [])]) == []
    assert h.store.applied_index() == 3
    status = h.store.status()
    assert status["raft_applied_index"] == 3 and status["raft_term"] == 3 and status["revision"] == 2
    assert 0 < status["db_size_in_use"] <= status["db_size"]


def _open_reader(directory):
    return MvccStore.open(directory, writer=False, map_size_bytes=64 << 20, quota_backend_bytes=32 << 20,
                          limits=LIMITS)


def _reader_process(directory, connection):
    """A gateway-like reader in its own process (LMDB allows one env handle per process)."""
    reader = _open_reader(directory)
    while True:
        command, argument = connection.recv()
        if command == "get":
            kvs = reader.range(validate_request("range", {"key": argument}, LIMITS))["kvs"]
            connection.send(kvs[0]["value"] if kvs else None)
        elif command == "reopen":
            connection.send(reader.reopen_if_stale(argument))
        elif command == "status":
            connection.send(reader.status())
        elif command == "generation":
            connection.send(reader.generation)
        else:
            reader.close()
            connection.send(None)
            return


def test_reader_process_view_and_defragment(h):
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_reader_process, args=(h.directory, child))
    h.ok("put", key=b"a", value=b"1")
    process.start()
    try:
        def ask(command, argument=None):
            parent.send((command, argument))
            assert parent.poll(30)
            return parent.recv()
        assert ask("get", b"a") == b"1"
        h.ok("put", key=b"a", value=b"2")
        assert ask("get", b"a") == b"2"
        generation = h.store.defragment()
        assert generation == 2 and h.store.generation == 2
        assert pathlib.Path(h.directory, "CURRENT").read_text().strip() == "2"
        assert sorted(os.listdir(h.directory)) == ["CURRENT", "gen-2"]  # gen-1 is gone
        h.ok("put", key=b"a", value=b"3")
        assert ask("get", b"a") == b"2"  # still on the old generation
        # status must not stat the removed gen-1/data.mdb (it used to crash here).
        status = ask("status")
        assert status["revision"] == 3 and 0 < status["db_size_in_use"] <= status["db_size"]
        assert ask("reopen", generation) is True
        assert ask("reopen", generation) is False
        assert ask("get", b"a") == b"3"
        assert ask("status")["revision"] == 4
        # Two defragments before the reader hears of either: told of the first
        # (already removed), it opens the latest; older news is ignored.
        assert h.store.defragment() == 3
        h.ok("put", key=b"a", value=b"4")
        assert h.store.defragment() == 4
        assert sorted(os.listdir(h.directory)) == ["CURRENT", "gen-4"]
        assert ask("get", b"a") == b"3"
        assert ask("reopen", 3) is True
        assert ask("generation") == 4 and ask("get", b"a") == b"4"
        assert [ask("reopen", old) for old in (1, 3, 4)] == [False, False, False]
        assert ask("reopen", None) is False
        assert ask("generation") == 4
        ask("quit")
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()


def test_reader_on_missing_store_names_the_dir(tmp_path):
    directory = str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError) as error:
        _open_reader(directory)
    assert directory in str(error.value) and "no MVCC store" in str(error.value)


def test_new_store_has_its_tables_before_current(tmp_path, monkeypatch):
    """CURRENT is written last: a reader that finds it finds gen-1 with every table."""
    from actors.mvcc import lmdb_store
    from actors.mvcc.core import TABLES
    directory = str(tmp_path / "s")
    seen = []
    write_current = lmdb_store._write_current

    def checking_write_current(store_dir, generation):
        reader = MvccStore(store_dir, writer=False, map_size_bytes=64 << 20, quota_backend_bytes=32 << 20,
                           limits=LIMITS, member_id=0, inline_key_bytes=16, sync=False)
        reader._open_env(generation)  # read-only, create=False: fails if a table is missing
        seen.append((generation, sorted(reader.dbs)))
        reader.close()
        write_current(store_dir, generation)

    monkeypatch.setattr(lmdb_store, "_write_current", checking_write_current)
    MvccStore.open(directory, writer=True, map_size_bytes=64 << 20, quota_backend_bytes=32 << 20).close()
    assert seen == [(1, sorted(TABLES))]
    assert sorted(os.listdir(directory)) == ["CURRENT", "gen-1"]  # no temp file left


def _create_store_process(directory, writer, start, results):
    start.wait(30)
    try:
        if writer:
            MvccStore.open(directory, writer=True, map_size_bytes=64 << 20, quota_backend_bytes=32 << 20).close()
            results.put("created")
            return
        while True:
            try:
                reader = _open_reader(directory)
                break
            except FileNotFoundError as error:
                assert "no MVCC store" in str(error), error
        revision = reader.revision()
        reader.close()
        results.put(f"read {revision}")
    except BaseException as error:  # reported to the test, which fails on it
        results.put(f"{type(error).__name__}: {error}")


def test_concurrent_store_creation(tmp_path):
    """Actors started together (supervisord) all create the store; readers poll for it. None may fail."""
    context = multiprocessing.get_context("spawn")
    directory = str(tmp_path / "s")
    start, results = context.Event(), context.Queue()
    processes = [context.Process(target=_create_store_process, args=(directory, writer, start, results))
                 for writer in (True, True, True, True, False, False)]
    for process in processes:
        process.start()
    try:
        start.set()
        outcomes = sorted(results.get(timeout=60) for _ in processes)
    finally:
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
    assert outcomes == ["created"] * 4 + ["read 1"] * 2
    assert sorted(os.listdir(directory)) == ["CURRENT", "gen-1"]


def test_writer_removes_stale_generations(tmp_path):
    directory = tmp_path / "s"
    harness = Harness(directory)
    harness.ok("put", key=b"a")
    harness.store.close()
    os.makedirs(directory / "gen-7")
    harness = Harness(directory)
    assert sorted(os.listdir(directory)) == ["CURRENT", "gen-1"]
    assert harness.store.revision() == 2
    harness.store.close()


def test_snapshot_copy_restore_status(h, tmp_path):
    for index in range(10):
        h.ok("put", key=b"k%d" % index, value=b"v")
    snapshot = str(tmp_path / "snap.db")
    h.store.copy_to(snapshot)
    status = MvccStore.snapshot_status(snapshot)
    assert status["revision"] == 11 and status["hash"] == h.store.hash_kv(0)["hash"]
    assert status["total_key"] > 10 and status["total_size"] == os.path.getsize(snapshot)
    restored_dir = str(tmp_path / "restored")
    MvccStore.restore(snapshot, restored_dir)
    restored = MvccStore.open(restored_dir, writer=True, map_size_bytes=64 << 20, quota_backend_bytes=32 << 20)
    try:
        assert restored.hash_kv(0) == h.store.hash_kv(0)
        assert restored.applied_index() == h.store.applied_index()
    finally:
        restored.close()


# -- the pure core -----------------------------------------------------------

def test_core_is_pure():
    source = pathlib.Path(__file__).parent.parent / "actors" / "mvcc" / "core.py"
    imported = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert not imported & {"lmdb", "zmq", "socket", "time", "random", "os"}


def test_core_on_memory_backend_matches_lmdb(h):
    """The in-memory backend runs the same core; a mixed history gives the same answers and hash."""
    backend = MemoryBackend()
    requests = [("put", {"key": b"a", "value": b"1"}), ("put", {"key": b"b" * 10, "value": b"2"}),
                ("delete_range", {"key": b"a", "prev_kv": True}), ("put", {"key": b"b" * 9 + b"c"}),
                ("compaction", {"revision": 3}), ("put", {"key": b"a", "value": b"3"})]
    for index, (op, body) in enumerate(requests, start=1):
        body = validate_request(op, body, LIMITS)
        memory_result = MvccWriter(backend, KeyEncoding(4)).apply([(index, 1, [(0, op, body)])])
        assert memory_result == h.store.apply([(index, 1, [(0, op, body)])])
    writer = MvccWriter(backend, KeyEncoding(4))
    while not writer.compact_step(1):
        pass
    while not h.store.compact_step():
        pass
    body = validate_request("range", {"key": b"\x00", "range_end": b"\x00"}, LIMITS)
    assert MvccWriter(backend, KeyEncoding(4)).range(body) == h.store.range(body)
    assert MvccWriter(backend, KeyEncoding(4)).hash_kv(0) == h.store.hash_kv(0)
