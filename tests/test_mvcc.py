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
    for value in (b"1", b"2", b"3", b"4"):
        h.ok("put", key=b"k", value=value)
    with pytest.raises(QuorumError) as error:
        h.range(key=b"k", revision=5)
    assert error.value.code == "FutureRev"
    h.ok("compaction", revision=3)
    with pytest.raises(QuorumError) as error:
        h.range(key=b"k", revision=2)
    assert error.value.code == "Compacted"
    # Reading AT the compact revision is allowed, before and after physical compaction.
    assert h.range(key=b"k", revision=3)["kvs"][0]["value"] == b"3"
    while not h.store.compact_step():
        pass
    assert h.range(key=b"k", revision=3)["kvs"][0]["value"] == b"3"
    assert h.range(key=b"k")["header"]["revision"] == 4


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
    h.ok("put", key=b"a", value=b"4")  # a: create 1, mod 4
    assert h.keys(key=b"a", range_end=b"z", sort_target=SORT_BY_VALUE) == [b"b", b"c", b"a"]
    assert h.keys(key=b"a", range_end=b"z", sort_target=SORT_BY_CREATE, sort_order=SORT_DESCEND) == [b"c", b"b", b"a"]
    assert h.keys(key=b"a", range_end=b"z", min_mod_revision=3) == [b"a", b"c"]
    assert h.keys(key=b"a", range_end=b"z", max_create_revision=2) == [b"a", b"b"]
    result = h.range(key=b"a", range_end=b"z", min_mod_revision=3, limit=1)
    assert result["count"] == 3 and result["more"] and [kv["key"] for kv in result["kvs"]] == [b"a"]


# -- put ---------------------------------------------------------------------

def test_put_versions_and_create_revision(h):
    assert h.ok("put", key=b"k", value=b"1")["header"]["revision"] == 1
    h.ok("put", key=b"k", value=b"2")
    kv = h.range(key=b"k")["kvs"][0]
    assert (kv["create_revision"], kv["mod_revision"], kv["version"]) == (1, 2, 2)
    h.ok("delete_range", key=b"k")
    h.ok("put", key=b"k", value=b"3")
    kv = h.range(key=b"k")["kvs"][0]
    assert (kv["create_revision"], kv["mod_revision"], kv["version"]) == (4, 4, 1)
    assert h.range(key=b"k", revision=3)["kvs"] == []
    assert h.range(key=b"k", revision=1)["kvs"][0]["value"] == b"1"


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
    assert response["deleted"] == 2 and response["header"]["revision"] == 4
    assert [kv["key"] for kv in response["prev_kvs"]] == [b"a", b"b"]
    (revision, events), = h.store.events(4, 4, 10, prev_kv=True)
    assert revision == 4 and [(e["type"], e["kv"]["key"]) for e in events] == [("DELETE", b"a"), ("DELETE", b"b")]
    assert events[0]["prev_kv"]["value"] == b"a"
    assert h.keys(key=b"\x00", range_end=b"\x00") == [b"c"]


def test_noop_writes_do_not_bump_revision(h):
    h.ok("put", key=b"a")
    response = h.ok("delete_range", key=b"x", range_end=b"z")
    assert response == {"header": {"revision": 1}, "deleted": 0, "prev_kvs": []}
    response = h.ok("txn", compare=[], success=[{"request_delete_range": {"key": b"zz"}}], failure=[])
    assert response["header"]["revision"] == 1
    assert h.store.revision() == 1


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
    compare["create_revision"] = 1
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
    assert response["succeeded"] and response["header"]["revision"] == 2
    responses = response["responses"]
    assert responses[0]["response_range"]["header"]["revision"] == 1
    assert responses[0]["response_range"]["kvs"] == []
    assert responses[1]["response_put"]["header"]["revision"] == 2
    assert [kv["key"] for kv in responses[3]["response_range"]["kvs"]] == [b"a", b"b", b"base"]
    # Nested compares see the state before the txn: a did not exist, so version == 0 held.
    assert responses[4]["response_txn"]["succeeded"]
    assert responses[4]["response_txn"]["header"]["revision"] == 0  # etcd never sets nested txn headers
    (revision, events), = h.store.events(2, 2, 10)
    assert [(e["kv"]["key"], e["kv"]["mod_revision"]) for e in events] == [(b"a", 2), (b"b", 2), (b"c", 2)]


def test_failed_txn_leaves_nothing(h):
    # The second put names a missing lease: the whole txn fails before writing anything.
    assert h.error("txn", compare=[], success=[put_op(b"a", b"1"), put_op(b"b", b"2", lease=42)],
                   failure=[]) == "LeaseNotFound"
    assert h.store.revision() == 0 and h.keys(key=b"\x00", range_end=b"\x00") == []
    h.ok("put", key=b"a")
    assert h.error("txn", compare=[], success=[put_op(b"b"), {"request_range": {"key": b"a", "revision": 9}}],
                   failure=[]) == "FutureRev"
    assert h.store.revision() == 1


def test_one_apply_is_atomic_per_request(h):
    results = h.apply_many([("put", {"key": b"a"}), ("put", {"key": b"b", "lease": 3}), ("put", {"key": b"c"})])
    assert [status for _, status, _ in results] == [STATUS_OK, STATUS_ERROR, STATUS_OK]
    assert [body["header"]["revision"] for _, status, body in results if status == STATUS_OK] == [1, 2]
    assert h.keys(key=b"\x00", range_end=b"\x00") == [b"a", b"c"]


# -- compaction --------------------------------------------------------------

def test_compaction_errors_and_physical_deletion(h):
    h.ok("put", key=b"a", value=b"1")   # 1
    h.ok("put", key=b"a", value=b"2")   # 2
    h.ok("put", key=b"b", value=b"1")   # 3
    h.ok("delete_range", key=b"b")      # 4
    h.ok("put", key=b"c", value=b"1")   # 5
    assert h.error("compaction", revision=6) == "FutureRev"
    h.ok("compaction", revision=4)
    assert h.error("compaction", revision=4) == "Compacted"
    assert h.store.compaction_pending()
    hash_before = h.store.hash_kv(0)
    steps = 1
    while not h.store.compact_step():
        steps += 1
    assert steps >= 2  # compaction_batch_revisions = 2
    assert not h.store.compaction_pending()
    assert h.store.hash_kv(0) == hash_before
    events = h.store.events(0, 10, 10)
    # Kept: a@2 (newest <= 4), c@5 (above). Gone: a@1, b@3 and its tombstone b@4.
    assert [(revision, [e["kv"]["key"] for e in evs]) for revision, evs in events] == [(2, [b"a"]), (5, [b"c"])]
    assert h.range(key=b"b", revision=4)["kvs"] == []
    assert h.range(key=b"a", revision=4)["kvs"][0]["value"] == b"2"
    with pytest.raises(QuorumError):
        h.store.events(2, 10, 10)
    # b left the key index: recreating it starts from version 1 and a new history.
    h.ok("put", key=b"b", value=b"x")
    kv = h.range(key=b"b")["kvs"][0]
    assert (kv["version"], kv["create_revision"]) == (1, 6)


def test_hash_kv_revision_checks(h):
    h.ok("put", key=b"a")
    h.ok("put", key=b"a")
    assert h.store.hash_kv(1)["hash"] != h.store.hash_kv(2)["hash"]
    assert h.store.hash_kv(0) == h.store.hash_kv(2)
    with pytest.raises(QuorumError):
        h.store.hash_kv(3)


# -- alarms and quota --------------------------------------------------------

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
    assert h.ok("lease_grant", ID=1, TTL=5) == {"header": {"revision": 0}, "ID": 1, "TTL": 5, "error": ""}
    assert h.error("lease_grant", ID=1, TTL=5) == "LeaseExist"
    assert h.store.lease_leases()["leases"] == [{"ID": 1}]
    assert h.store.lease_time_to_live({"ID": 1, "keys": False})["grantedTTL"] == 5
    assert h.store.lease_time_to_live({"ID": 9, "keys": True}) == {
        "header": {"revision": 0}, "ID": 9, "TTL": -1, "grantedTTL": 0, "keys": []}


def test_lease_revoke_deletes_keys_in_one_revision(h):
    h.ok("lease_grant", ID=1, TTL=5)
    h.ok("put", key=b"b", lease=1)
    h.ok("put", key=b"a", lease=1)
    h.ok("put", key=b"c")
    assert h.ok("lease_revoke", ID=1)["header"]["revision"] == 4
    (revision, events), = h.store.events(4, 4, 10)
    assert [(e["type"], e["kv"]["key"]) for e in events] == [("DELETE", b"a"), ("DELETE", b"b")]
    assert h.keys(key=b"\x00", range_end=b"\x00") == [b"c"]
    assert h.error("lease_revoke", ID=1) == "LeaseNotFound"
    h.ok("lease_grant", ID=2, TTL=5)
    assert h.ok("lease_revoke", ID=2)["header"]["revision"] == 4  # no keys: no new revision


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
    assert status["raft_applied_index"] == 3 and status["raft_term"] == 3 and status["revision"] == 1
    assert 0 < status["db_size_in_use"] <= status["db_size"]


def _reader_process(directory, connection):
    """A gateway-like reader in its own process (LMDB allows one env handle per process)."""
    reader = MvccStore.open(directory, writer=False, map_size_bytes=64 << 20, quota_backend_bytes=32 << 20,
                            limits=LIMITS)
    while True:
        command, argument = connection.recv()
        if command == "get":
            kvs = reader.range(validate_request("range", {"key": argument}, LIMITS))["kvs"]
            connection.send(kvs[0]["value"] if kvs else None)
        elif command == "reopen":
            connection.send(reader.reopen_if_stale(argument))
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
        h.ok("put", key=b"a", value=b"3")
        assert ask("get", b"a") == b"2"  # still on the old generation
        assert ask("reopen", generation) is True
        assert ask("reopen", generation) is False
        assert ask("get", b"a") == b"3"
        assert sorted(os.listdir(h.directory)) == ["CURRENT", "gen-2"]
        ask("quit")
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()


def test_writer_removes_stale_generations(tmp_path):
    directory = tmp_path / "s"
    harness = Harness(directory)
    harness.ok("put", key=b"a")
    harness.store.close()
    os.makedirs(directory / "gen-7")
    harness = Harness(directory)
    assert sorted(os.listdir(directory)) == ["CURRENT", "gen-1"]
    assert harness.store.revision() == 1
    harness.store.close()


def test_snapshot_copy_restore_status(h, tmp_path):
    for index in range(10):
        h.ok("put", key=b"k%d" % index, value=b"v")
    snapshot = str(tmp_path / "snap.db")
    h.store.copy_to(snapshot)
    status = MvccStore.snapshot_status(snapshot)
    assert status["revision"] == 10 and status["hash"] == h.store.hash_kv(0)["hash"]
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
                ("compaction", {"revision": 2}), ("put", {"key": b"a", "value": b"3"})]
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
