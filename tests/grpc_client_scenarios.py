"""Scenarios run through a gRPC etcd client from PyPI (etcd-sdk-python, module `pyetcd`).

Run as `python -m tests.grpc_client_scenarios SCENARIO HOST PORT`; exits 0
when every check passed, else an AssertionError on stderr. A process of its
own because pyetcd registers etcd's .proto files (mvccpb.KeyValue, ...) in
protobuf's default pool, as protocol.etcd does: one process cannot hold both.
So this module imports nothing of quorumkv's.
"""

from __future__ import annotations

import sys
import threading

import grpc
import pyetcd
import pyetcd.events

CLIENT_TIMEOUT_S = 10
WATCH_WAIT_S = 10.0


def kv(client) -> None:
    client.put("py/a", "1")
    client.put("py/b", "2")
    value, meta = client.get("py/a")
    assert value == b"1" and meta.key == b"py/a" and meta.version == 1 and meta.mod_revision == meta.create_revision
    assert [(value, meta.key) for value, meta in client.get_prefix("py/")] == [(b"1", b"py/a"), (b"2", b"py/b")]
    assert [meta.key for _, meta in client.get_range("py/a", "py/c")] == [b"py/a", b"py/b"]
    assert client.get("py/none") == (None, None)
    previous = client.put("py/a", "1b", prev_kv=True).prev_kv
    assert (previous.key, previous.value) == (b"py/a", b"1")
    assert client.put_if_not_exists("py/c", "3") is True
    assert client.put_if_not_exists("py/c", "4") is False
    assert client.replace("py/c", "3", "5") is True and client.replace("py/c", "3", "6") is False
    succeeded, responses = client.transaction(
        compare=[client.transactions.value("py/b") == "2", client.transactions.version("py/b") > 0],
        success=[client.transactions.put("py/b", "3"), client.transactions.get("py/a")],
        failure=[client.transactions.delete("py/b")])
    assert succeeded is True and responses[1][0][0] == b"1b"
    assert client.get("py/b")[0] == b"3"
    succeeded, _ = client.transaction(compare=[client.transactions.mod("py/b") < 1],
                                      success=[], failure=[client.transactions.delete("py/b")])
    assert succeeded is False and client.get("py/b") == (None, None)
    assert client.delete("py/a") is True and client.delete("py/a") is False
    assert client.delete_prefix("py/").deleted == 1  # py/c
    revision = client.put("py/z", "1").header.revision
    client.put("py/z", "2")
    client.compact(revision)
    try:
        client.get("py/z", revision=revision - 1)
    except grpc.RpcError as error:  # pyetcd passes OUT_OF_RANGE through as it is
        assert error.code() == grpc.StatusCode.OUT_OF_RANGE and "compacted" in error.details()
    else:
        raise AssertionError("a read below the compaction point must fail")


def leases(client) -> None:
    lease = client.lease(30)
    assert lease.granted_ttl == 30 and 0 < lease.remaining_ttl <= 30
    client.put("py/l1", "v", lease=lease)
    client.put("py/l2", "v", lease=lease.id)
    assert sorted(lease.keys) == [b"py/l1", b"py/l2"]
    refreshed = list(client.refresh_lease(lease.id))
    assert refreshed[0].ID == lease.id and refreshed[0].TTL == 30
    assert lease.refresh()[0].TTL == 30
    info = client.get_lease_info(lease.id)
    assert info.grantedTTL == 30 and 0 < info.TTL <= 30
    lease.revoke()
    assert client.get("py/l1") == (None, None) and client.get("py/l2") == (None, None)
    assert client.get_lease_info(lease.id).TTL == -1
    # A lock nobody else holds: a lease and a txn (no watch needed).
    lock = client.lock("py-lock", ttl=10)
    assert lock.acquire(timeout=5) is True and lock.is_acquired()
    assert lock.release() is True and not lock.is_acquired()


def watch(client) -> None:
    events, cancel = client.watch("py/w")
    seen: list = []
    done = threading.Event()

    def read() -> None:
        for event in events:  # ends when canceled
            seen.append(event)
            if len(seen) == 2:
                done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    # The watch is created before watch() returns (it waits for the created response).
    client.put("py/w", "x")
    client.delete("py/w")
    assert done.wait(WATCH_WAIT_S), f"events seen: {seen}"
    cancel()
    assert isinstance(seen[0], pyetcd.events.PutEvent) and seen[0].value == b"x"
    assert isinstance(seen[1], pyetcd.events.DeleteEvent) and seen[1].key == b"py/w"

    revision = client.put("py/p/1", "a").header.revision
    client.put("py/p/2", "b")
    history, cancel = client.watch_prefix("py/p/", start_revision=revision)
    keys = [next(history).key, next(history).key]
    cancel()
    assert keys == [b"py/p/1", b"py/p/2"]

    def put_later() -> None:
        client.put("py/once", "1")

    timer = threading.Timer(0.5, put_later)
    timer.start()
    try:
        event = client.watch_once("py/once", timeout=WATCH_WAIT_S)
    finally:
        timer.join()
    assert event.value == b"1"

    # A lock held by another waits (a watch) for its release.
    holder = client.lock("py-contested", ttl=10)
    assert holder.acquire(timeout=5)
    released = threading.Timer(0.5, holder.release)
    released.start()
    try:
        waiter = client.lock("py-contested", ttl=10)
        assert waiter.acquire(timeout=WATCH_WAIT_S) is True
        waiter.release()
    finally:
        released.join()


def status(client) -> None:
    response = client.status()  # pyetcd's status asks the Cluster service for the leader
    assert response.version.startswith("3.4.") and response.leader is not None
    assert len(list(client.members)) == 1


SCENARIOS = {"kv": kv, "leases": leases, "watch": watch, "status": status}


def main(argv: list[str]) -> None:
    name, host, port = argv
    client = pyetcd.client(host=host, port=int(port), timeout=CLIENT_TIMEOUT_S)
    try:
        SCENARIOS[name](client)
    finally:
        client.close()
    print(f"{name}: ok")


if __name__ == "__main__":
    main(sys.argv[1:])
