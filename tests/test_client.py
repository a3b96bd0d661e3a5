"""The Python client against a real quorumkv node.

Goal: every client call does what etcd's does, errors arrive as the right
QuorumError subclass, pipelining keeps order, reads spread over gateways,
and a missing server is a prompt DeadlineExceededError.
Method: the `node` fixture (tests/conftest.py) starts a real node on free
loopback ports; each test talks to it through protocol.client.Client.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import zmq

from protocol import messages
from protocol.client import (
    Client, Compare, CompactedError, ConcurrentUseError, DeadlineExceededError, EmptyKeyError, FutureRevError,
    LeaseNotFoundError, QuorumError, ValueProvidedError, ops,
)


@pytest.fixture
def client(node):
    with node.client(timeout_s=10.0) as connected:
        yield connected


def keys_of(response: dict) -> list[bytes]:
    return [kv["key"] for kv in response.get("kvs") or []]


def test_put_get_round_trip_with_str_and_bytes(client):
    put = client.put("greeting", "hello")
    assert put["header"]["revision"] > 0
    got = client.get(b"greeting")
    assert got["count"] == 1
    (kv,) = got["kvs"]
    assert (kv["key"], kv["value"], kv["version"]) == (b"greeting", b"hello", 1)
    assert kv["create_revision"] == kv["mod_revision"] == put["header"]["revision"]
    assert client.get("missing")["count"] == 0


def test_prev_kv_and_revisions(client):
    first = client.put("k", "v1")["header"]["revision"]
    second = client.put("k", "v2", prev_kv=True)
    assert second["prev_kv"]["value"] == b"v1"
    assert client.get("k", revision=first)["kvs"][0]["value"] == b"v1"
    with pytest.raises(FutureRevError):
        client.get("k", revision=second["header"]["revision"] + 1000)


def test_ranges_prefix_from_key_limit_sort(client):
    client.request_many([ops.put(f"p/{i}", str(9 - i)) for i in range(10)] + [ops.put("q", "x")])
    assert keys_of(client.get("p/", prefix=True)) == [f"p/{i}".encode() for i in range(10)]
    assert keys_of(client.get("p/8", from_key=True)) == [b"p/8", b"p/9", b"q"]
    assert keys_of(client.get("p/2", "p/5")) == [b"p/2", b"p/3", b"p/4"]
    limited = client.get("p/", prefix=True, limit=3)
    assert (keys_of(limited), limited["more"], limited["count"]) == ([b"p/0", b"p/1", b"p/2"], True, 10)
    by_value = client.get("p/", prefix=True, sort_target=messages.SORT_BY_VALUE, sort_order=messages.SORT_ASCEND)
    assert keys_of(by_value)[0] == b"p/9"
    descending = client.get("p/", prefix=True, sort_order=messages.SORT_DESCEND)
    assert keys_of(descending)[0] == b"p/9"
    only_keys = client.get("p/", prefix=True, keys_only=True)
    assert all(not kv.get("value") for kv in only_keys["kvs"])
    counted = client.get("p/", prefix=True, count_only=True)
    assert (counted["count"], counted.get("kvs") or []) == (10, [])
    assert client.get("p/", prefix=True, serializable=True)["count"] == 10


def test_delete(client):
    client.request_many([ops.put(f"d/{i}", "v") for i in range(5)])
    assert client.delete("d/0")["deleted"] == 1
    deleted = client.delete("d/", prefix=True, prev_kv=True)
    assert deleted["deleted"] == 4
    assert sorted(kv["key"] for kv in deleted["prev_kvs"]) == [b"d/1", b"d/2", b"d/3", b"d/4"]
    assert client.get("d/", prefix=True)["count"] == 0


def test_txn_builder_both_branches(client):
    client.put("lock", "free")
    taken = (client.txn_builder()
             .if_(Compare.value("lock") == "free")
             .then(ops.put("lock", "mine"), ops.get("lock"))
             .else_(ops.get("lock"))
             .commit())
    assert taken["succeeded"] is True
    assert taken["responses"][1]["response_range"]["kvs"][0]["value"] == b"mine"
    again = client.txn([Compare.value("lock") == "free"], [ops.put("lock", "mine")], [ops.get("lock")])
    assert again["succeeded"] is False
    assert again["responses"][0]["response_range"]["kvs"][0]["value"] == b"mine"
    version = client.get("lock")["kvs"][0]["version"]
    assert client.txn([Compare.version("lock") == version, Compare.mod("lock") > 0], [], [])["succeeded"] is True


def test_compaction(client):
    old = client.put("c", "1")["header"]["revision"]
    latest = client.put("c", "2")["header"]["revision"]
    client.compact(latest)
    with pytest.raises(CompactedError) as caught:
        client.get("c", revision=old)
    assert caught.value.code == "Compacted"
    assert str(caught.value) == "etcdserver: mvcc: required revision has been compacted"
    assert client.get("c")["kvs"][0]["value"] == b"2"


def test_errors_carry_server_codes(client):
    with pytest.raises(EmptyKeyError):
        client.put("", "v")
    with pytest.raises(ValueProvidedError):
        client.put("k", "v", ignore_value=True)
    with pytest.raises(QuorumError) as caught:
        client.request("no_such_op", {})
    assert caught.value.code == "UnknownOp"


def test_pipelining_keeps_order_and_spreads_over_gateways(node, client):
    assert len(client.gateways) >= 2, "hello should have connected the client to every gateway"
    puts = client.request_many([ops.put(f"pipe/{i:04d}", str(i)) for i in range(600)])
    revisions = [p["header"]["revision"] for p in puts]
    assert len(set(revisions)) == 600
    gets = client.request_many([ops.get(f"pipe/{i:04d}") for i in range(600)])
    assert [g["kvs"][0]["value"] for g in gets] == [str(i).encode() for i in range(600)]
    pending = [client.submit(*ops.get(f"pipe/{i:04d}")) for i in range(50)]
    assert [p.result()["kvs"][0]["value"] for p in reversed(pending)] == [str(i).encode() for i in reversed(range(50))]
    mixed = client.request_many([ops.get("pipe/0001"), ("put", {"key": b""}), ops.get("pipe/0002")], raise_errors=False)
    assert isinstance(mixed[1], EmptyKeyError) and mixed[2]["kvs"][0]["value"] == b"2"


def test_maintenance_calls(client):
    client.put("m", "v")
    status = client.status()
    assert status["header"]["member_id"] and status["version"] and status["db_size"] > 0
    assert status["leader"] == status["header"]["member_id"]
    first = client.hash_kv()
    assert first["hash"] == client.hash_kv()["hash"]
    assert client.alarm_list().get("alarms") in (None, [])
    client.alarm_disarm()
    client.defragment()


def test_leases(client):
    grant = client.lease_grant(60)
    lease_id = grant["ID"]
    assert lease_id > 0 and grant["TTL"] == 60
    client.put("leased", "v", lease=lease_id)
    ttl = client.lease_time_to_live(lease_id, keys=True)
    assert ttl["grantedTTL"] == 60 and 0 < ttl["TTL"] <= 60 and ttl["keys"] == [b"leased"]
    assert lease_id in [lease["ID"] for lease in client.lease_leases()["leases"]]
    client.lease_revoke(lease_id)
    assert client.get("leased")["count"] == 0
    with pytest.raises(LeaseNotFoundError):
        client.lease_revoke(lease_id)


def test_snapshot_streams_to_file(client, tmp_path):
    client.request_many([ops.put(f"s/{i}", "x" * 100) for i in range(100)])
    path = str(tmp_path / "snap.db")
    progress = []
    size = client.snapshot(path, progress=lambda done, total: progress.append((done, total)))
    assert size == os.path.getsize(path) > 0
    assert progress and progress[-1][0] == size
    assert not os.path.exists(path + ".part")


def test_no_server_is_a_prompt_deadline_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError) as caught:
        Client([f"127.0.0.1:{port}"], timeout_s=0.3, read_retries=0)
    assert isinstance(caught.value, TimeoutError) and caught.value.code == "Timeout"
    assert time.monotonic() - started < 2.0


def test_a_second_thread_inside_a_client_is_refused_not_corrupting_it():
    """Goal: two threads in one Client (one ZeroMQ socket) would lose answers
    silently; the second gets ConcurrentUseError at once instead, and the first
    thread's call is unharmed. Method: a silent ROUTER as the server; thread A's
    get is inside wait() once the ROUTER has its frame; the main thread calls in."""
    context = zmq.Context.instance()
    server = context.socket(zmq.ROUTER)
    server.setsockopt(zmq.LINGER, 0)
    port = server.bind_to_random_port("tcp://127.0.0.1")
    outcome: list = []
    try:
        with Client([f"127.0.0.1:{port}"], timeout_s=1.0, discover_gateways=False, read_retries=0) as client:
            def first_thread():
                try:
                    client.get("k")
                except BaseException as error:  # noqa: BLE001 - handed to the main thread
                    outcome.append(error)
            thread = threading.Thread(target=first_thread)
            thread.start()
            assert server.poll(5000), "the first thread's request never arrived"
            with pytest.raises(ConcurrentUseError):
                client.get("k")
            with pytest.raises(ConcurrentUseError):
                client.submit("range", {"key": b"k"})
            thread.join(10)
            assert len(outcome) == 1 and isinstance(outcome[0], DeadlineExceededError)
            # Free again once the first thread has left: sequential hand-over is fine.
            with pytest.raises(DeadlineExceededError):
                client.get("k")
    finally:
        server.close(linger=0)


# ---------------------------------------------------------------------------
# Request building and error mapping (pure: no server).


def test_request_bodies_use_etcd_field_names_and_omit_defaults():
    from protocol.client import prefix_range_end

    assert ops.get("k") == ("range", {"key": b"k"})
    assert ops.get("k", prefix=True) == ("range", {"key": b"k", "range_end": b"l"})
    assert ops.get("", prefix=True) == ("range", {"key": b"\0", "range_end": b"\0"})
    assert ops.get("k", from_key=True, revision=3, serializable=True) == (
        "range", {"key": b"k", "range_end": b"\0", "revision": 3, "serializable": True})
    assert prefix_range_end(b"a\xff") == b"b" and prefix_range_end(b"\xff\xff") == b"\0"
    assert ops.put("k", b"v", lease=5, prev_kv=True) == ("put", {"key": b"k", "value": b"v", "lease": 5, "prev_kv": True})
    assert ops.delete("k", prefix=True, prev_kv=True) == ("delete_range", {"key": b"k", "range_end": b"l", "prev_kv": True})
    with pytest.raises(ValueError):
        ops.get("k", prefix=True, from_key=True)


def test_compare_operators_build_txn_compares():
    assert (Compare.value("k") == "v").to_body() == {"result": messages.COMPARE_EQUAL, "target": messages.TARGET_VALUE,
                                                      "key": b"k", "value": b"v"}
    assert (Compare.mod("k") > 4).to_body() == {"result": messages.COMPARE_GREATER, "target": messages.TARGET_MOD,
                                                 "key": b"k", "mod_revision": 4}
    assert (Compare.create("k") < 2).to_body()["create_revision"] == 2
    assert (Compare.version("k") != 0).to_body()["result"] == messages.COMPARE_NOT_EQUAL
    assert (Compare.lease("k") == 7).to_body()["lease"] == 7
    with pytest.raises(TypeError):
        Compare.mod("k") > "4"
    op, body = ops.txn([Compare.value("k") == "v"], [ops.put("k", "w")], [ops.get("k"), ops.delete("j")])
    assert op == "txn"
    assert body["success"] == [{"request_put": {"key": b"k", "value": b"w"}}]
    assert body["failure"] == [{"request_range": {"key": b"k"}}, {"request_delete_range": {"key": b"j"}}]


def test_server_error_codes_map_to_exception_classes():
    from protocol.client import MalformedFrameError, error_from_wire
    from protocol.errors import CODES

    compacted = error_from_wire({"code": "Compacted", "message": "etcdserver: mvcc: required revision has been compacted"})
    assert isinstance(compacted, CompactedError) and compacted.code == "Compacted"
    assert str(compacted) == "etcdserver: mvcc: required revision has been compacted"
    for code in CODES:
        assert error_from_wire({"code": code, "message": "m"}).code == code
    assert error_from_wire({"code": "Bogus"}).code == "Internal"
    assert error_from_wire("not a map").code == "Internal"
    assert issubclass(MalformedFrameError, QuorumError)
