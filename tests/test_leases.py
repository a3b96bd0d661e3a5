"""Goal: leases on a real node behave as etcd's: expiry deletes exactly the
lease's keys in one revision and never before the TTL; keep-alive keeps them;
revoke deletes them at once; time-to-live counts down and lists the keys; a
restart of the whole node (kill -9) extends remaining TTLs rather than
expiring a lease early; a keep-alive of an unknown lease says not found.
Method: nodes started with --election-timeout 500 --heartbeat-interval 50
(minimum TTL 1 s), short TTLs, and polling with bounded deadlines."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from protocol.client import LeaseNotFoundError
from protocol.errors import QuorumError
from protocol.lease import KeepAlive, grant, keep_alive_once
from tests.conftest import Node

FAST_ELECTIONS = ("--election-timeout", "500", "--heartbeat-interval", "50")
MIN_TTL_S = 1  # ceil((3 * 10 ticks // 2) * 50 ms) = ceil(0.75 s)
POLL_S = 0.02


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory):
    directory = tmp_path_factory.mktemp("leases")
    node = Node(str(directory / "node.qkv"), str(directory / "node.log"), 2, FAST_ELECTIONS).start()
    try:
        yield node
    finally:
        node.kill()


@pytest.fixture
def client(shared_node):
    with shared_node.client(timeout_s=5.0) as client:
        yield client


def live_keys(client, prefix: bytes) -> list[bytes]:
    return [kv["key"] for kv in client.get(prefix, prefix=True)["kvs"]]


def wait_until(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(POLL_S)
    raise AssertionError(f"not within {timeout_s}s: {what}")


def test_expiry_deletes_exactly_the_lease_keys_in_one_revision_not_before_ttl(client):
    ttl_s = 2
    lease_id = grant(client, ttl_s)
    acknowledged = time.monotonic()
    for key in (b"exp/a", b"exp/b", b"exp/c"):
        client.put(key, b"v", lease=lease_id)
    for key in (b"exp/other1", b"exp/other2"):
        client.put(key, b"w")
    before = client.get(b"exp/", prefix=True)
    revision_before = before["header"]["revision"]
    others_before = {kv["key"]: kv["mod_revision"] for kv in before["kvs"] if kv["lease"] == 0}

    # Poll until the lease's keys are gone, noting when they were last seen.
    deadline = acknowledged + ttl_s + 3.0
    last_seen = acknowledged
    while time.monotonic() < deadline:
        checked = time.monotonic()
        if not set(live_keys(client, b"exp/")) & {b"exp/a", b"exp/b", b"exp/c"}:
            break
        last_seen = checked
        time.sleep(POLL_S)
    gone = time.monotonic()
    assert gone < deadline, "the lease's keys were never deleted"
    # Not before the TTL (a few ms of slack: the server starts the TTL when it
    # applies the grant, just before the acknowledgement leaves).
    assert last_seen >= acknowledged + ttl_s - 0.05, (last_seen - acknowledged)

    after = client.get(b"exp/", prefix=True)
    assert sorted(kv["key"] for kv in after["kvs"]) == [b"exp/other1", b"exp/other2"]
    assert {kv["key"]: kv["mod_revision"] for kv in after["kvs"]} == others_before
    # One revision for all three deletes.
    assert after["header"]["revision"] == revision_before + 1
    assert len(client.get(b"exp/", prefix=True, revision=revision_before)["kvs"]) == 5
    assert client.lease_time_to_live(lease_id)["TTL"] == -1
    assert lease_id not in [lease["ID"] for lease in client.lease_leases()["leases"]]


def test_keep_alive_keeps_keys_past_several_ttls_and_reports_loss(client):
    lease_id = grant(client, MIN_TTL_S)
    client.put(b"ka/k", b"v", lease=lease_id)
    lost = []
    renewed = threading.Event()
    keep_alive = KeepAlive(client, lease_id, on_lost=lost.append, on_renewed=lambda _: renewed.set())
    try:
        assert renewed.wait(5.0)
        # Four TTLs: the key must be there at every check.
        until = time.monotonic() + 4 * MIN_TTL_S
        while time.monotonic() < until:
            assert live_keys(client, b"ka/") == [b"ka/k"]
            time.sleep(0.1)
        assert keep_alive.alive() and keep_alive.ttl_s == MIN_TTL_S and keep_alive.renewals >= 8
        # A revoke by someone else: the helper reports the loss.
        client.lease_revoke(lease_id)
        assert keep_alive.wait_lost(3 * MIN_TTL_S + 2)
        assert len(lost) == 1 and lost[0].reason == "not found" and lost[0].lease_id == lease_id
        with pytest.raises(Exception, match="not found"):
            keep_alive.check()
    finally:
        keep_alive.stop()


def test_stopped_keep_alive_lets_the_lease_expire(client):
    lease_id = grant(client, MIN_TTL_S)
    client.put(b"stop/k", b"v", lease=lease_id)
    keep_alive = KeepAlive(client, lease_id)
    wait_until(lambda: keep_alive.renewals >= 2, 5.0, "two renewals")
    keep_alive.stop()
    wait_until(lambda: not live_keys(client, b"stop/"), MIN_TTL_S + 3.0, "expiry after the keep-alive stopped")


def test_revoke_deletes_the_keys_at_once_in_one_revision(client):
    lease_id = grant(client, 60)
    for key in (b"rev/a", b"rev/b"):
        client.put(key, b"v", lease=lease_id)
    client.put(b"rev/z", b"v")
    revision = client.lease_revoke(lease_id)["header"]["revision"]
    response = client.get(b"rev/", prefix=True)
    assert [kv["key"] for kv in response["kvs"]] == [b"rev/z"]
    assert response["header"]["revision"] == revision
    assert len(client.get(b"rev/", prefix=True, revision=revision - 1)["kvs"]) == 3
    with pytest.raises(LeaseNotFoundError):
        client.lease_revoke(lease_id)


def test_time_to_live_counts_down_lists_keys_and_keep_alive_restores_it(client):
    lease_id = grant(client, 3)
    client.put(b"ttl/b", b"v", lease=lease_id)
    client.put(b"ttl/a", b"v", lease=lease_id)
    first = client.lease_time_to_live(lease_id, keys=True)
    # etcd truncates the remaining time: just after a grant of 3 s it says 2.
    assert first["TTL"] == 2 and first["grantedTTL"] == 3 and first["keys"] == [b"ttl/a", b"ttl/b"]
    assert client.lease_time_to_live(lease_id)["keys"] == []
    wait_until(lambda: client.lease_time_to_live(lease_id)["TTL"] == 1, 3.0, "TTL counting down to 1")
    assert keep_alive_once(client, lease_id) == 3
    assert client.lease_time_to_live(lease_id)["TTL"] == 2
    client.lease_revoke(lease_id)


def test_grant_below_the_minimum_gets_the_minimum(client):
    for asked in (0, 1):
        response = client.lease_grant(asked)
        assert response["TTL"] == MIN_TTL_S
        assert client.lease_time_to_live(response["ID"])["grantedTTL"] == MIN_TTL_S
        client.lease_revoke(response["ID"])


def test_keep_alive_of_an_unknown_lease_says_not_found(client, shared_node):
    assert client.lease_keep_alive_once(0x1234)["TTL"] == 0
    with pytest.raises(LeaseNotFoundError):
        keep_alive_once(client, 0x1234)
    keep_alive = KeepAlive(client, 0x1234)
    try:
        assert keep_alive.wait_lost(5.0) and keep_alive.error.reason == "not found"
    finally:
        keep_alive.stop()
    once = shared_node.ctl("lease", "keep-alive", "--once", "1234")
    assert (once.returncode, once.stdout, once.stderr) == (2, "", "Error: etcdserver: requested lease not found\n")
    stream = shared_node.ctl("lease", "keep-alive", "1234")
    assert (stream.returncode, stream.stdout) == (0, "lease 0000000000001234 expired or revoked.\n")
    lease_id = grant(client, 5)
    once = shared_node.ctl("lease", "keep-alive", "--once", f"{lease_id:x}")
    assert (once.returncode, once.stdout) == (0, f"lease {lease_id:016x} keepalived with TTL(5)\n")
    client.lease_revoke(lease_id)


def test_restart_of_the_whole_node_extends_rather_than_expires(node_factory):
    node = node_factory(extra_args=FAST_ELECTIONS)
    ttl_s = 3
    with node.client(timeout_s=5.0) as client:
        lease_id = grant(client, ttl_s)
        client.put(b"restart/k", b"v", lease=lease_id)
        # Let most of the TTL run out before the crash.
        wait_until(lambda: client.lease_time_to_live(lease_id)["TTL"] <= 1, ttl_s + 1.0, "TTL down to 1")
    node.kill()
    node.start()
    with node.client(timeout_s=5.0) as client:
        response = client.lease_time_to_live(lease_id, keys=True)
        # Extended to at least the full TTL again (less a second of truncation and start-up).
        assert response["TTL"] >= ttl_s - 1 and response["keys"] == [b"restart/k"], response
        assert live_keys(client, b"restart/") == [b"restart/k"]
        # ... and it still expires once nobody renews it.
        wait_until(lambda: not live_keys(client, b"restart/"), ttl_s + 3.0, "expiry after the restart")
        assert client.lease_time_to_live(lease_id)["TTL"] == -1


def test_leases_survive_a_restart_of_the_raft_log_or_the_applier_alone(node_factory):
    node = node_factory(extra_args=FAST_ELECTIONS)
    with node.client(timeout_s=2.0) as client:
        lease_id = grant(client, 2)
        client.put(b"actor/k", b"v", lease=lease_id)
        for role in ("raft_log", "applier"):
            old_pid = node.actor_pids()[role]
            os.kill(old_pid, signal.SIGKILL)
            wait_until(lambda: node.actor_pids().get(role, old_pid) != old_pid, 10.0, f"{role} restarted")

            def renewed() -> bool:
                try:
                    return keep_alive_once(client, lease_id) == 2
                except QuorumError as error:
                    assert not isinstance(error, LeaseNotFoundError), f"lease lost across the {role} restart"
                    return False

            wait_until(renewed, 10.0, f"a keep-alive answered after the {role} restart")
            assert live_keys(client, b"actor/") == [b"actor/k"]
        # Nobody renews any more: it still expires, through the restarted actors.
        wait_until(lambda: not live_keys(client, b"actor/"), 2 + 3.0, "expiry after the restarts")


def test_keep_alive_reports_loss_when_the_node_is_unreachable_until_the_lease_could_expire(node_factory):
    node = node_factory(extra_args=FAST_ELECTIONS)
    ttl_s = 2
    with node.client(timeout_s=2.0) as client:
        lease_id = grant(client, ttl_s)
        keep_alive = KeepAlive(client, lease_id)
        try:
            wait_until(lambda: keep_alive.renewals >= 1, 5.0, "a first renewal")
            node.kill()
            killed = time.monotonic()
            assert keep_alive.wait_lost(ttl_s + 3.0)
            # Not before the last renewal's TTL ran out, and not much after.
            assert keep_alive.expires_by <= time.monotonic() < killed + ttl_s + 1.0
            assert keep_alive.error.reason == "unreachable"
        finally:
            keep_alive.stop()
