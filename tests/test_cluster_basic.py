"""A 3-member cluster on loopback: election, replication, failover, catch-up, partition.

Goal: the foundation of issue 4 works with real processes: three nodes started
with etcd's cluster flags elect a leader; a write through any member (a
follower forwards it) is readable linearizably through every member; after
kill -9 of the leader's whole node, writes succeed again through the others
within a bound of a few election timeouts (the time is printed); a lease
survives the leader change; the killed member, restarted with the same
command line, catches up (HashKV equal on all members at one revision); and a
leader cut off by the peer fault hook (`<data-dir>/peer-faults`) steps down
(check-quorum), refuses linearizable reads, while the others elect a new leader.

Method: conftest's Node with the cluster flags and free ports; raw requests
over ZeroMQ (`request_once`) with short timeouts so each wait is a bounded poll.
"""

from __future__ import annotations

import os
import time

import pytest

from actors.peer import peer_faults_path
from protocol import codec
from tests.conftest import Node, free_port, request_once

HEARTBEAT_MS = 50
ELECTION_MS = 500
TOKEN = "test-cluster-basic"


def start_cluster(tmp_path, names=("n1", "n2", "n3")) -> dict[str, Node]:
    peer_ports = {name: free_port() for name in names}
    initial_cluster = ",".join(f"{name}=http://127.0.0.1:{port}" for name, port in peer_ports.items())
    nodes = {}
    for name in names:
        peer_url = f"http://127.0.0.1:{peer_ports[name]}"
        args = ("--name", name, "--initial-cluster", initial_cluster, "--initial-cluster-state", "new",
                "--initial-cluster-token", TOKEN, "--initial-advertise-peer-urls", peer_url,
                "--listen-peer-urls", peer_url, "--heartbeat-interval", str(HEARTBEAT_MS),
                "--election-timeout", str(ELECTION_MS))
        nodes[name] = Node(str(tmp_path / f"{name}.qkv"), str(tmp_path / f"{name}.log"), gateways=1,
                           extra_args=args)
    for node in nodes.values():
        node.start(wait=False)
    return nodes


def call(node: Node, op: str, body: dict, timeout_s: float = 1.0):
    answer = request_once(node.zmq_endpoint, op, body, timeout_s)
    if answer is None:
        return None, "timeout"
    status, response = answer
    return (response, None) if status == codec.STATUS_OK else (None, response.get("code", "error"))


def status_of(node: Node) -> dict | None:
    response, _error = call(node, "status", {}, 0.5)
    return response


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)  # polling a real cluster, not synchronising threads
    raise AssertionError(f"timed out waiting for {what}")


def leader_of(nodes: dict[str, Node], among=None) -> str | None:
    """The name of the member that every member in `among` agrees is leader."""
    among = among or list(nodes)
    by_id = {}
    leaders = set()
    for name in among:
        status = status_of(nodes[name])
        if status is None:
            return None
        by_id[status["header"]["member_id"]] = name
        leaders.add(status["leader"])
    if len(leaders) != 1 or 0 in leaders:
        return None
    return by_id.get(leaders.pop())


def get_value(node: Node, key: bytes, serializable: bool = False):
    response, error = call(node, "range", {"key": key, "serializable": serializable}, 2.0)
    if error:
        return error
    return response["kvs"][0]["value"] if response["kvs"] else None


def put(node: Node, key: bytes, value: bytes, timeout_s: float = 2.0, **extra) -> tuple[dict | None, str | None]:
    return call(node, "put", {"key": key, "value": value, **extra}, timeout_s)


def hashes_at(nodes: dict[str, Node], names, revision: int) -> dict[str, int]:
    out = {}
    for name in names:
        response, error = call(nodes[name], "hash_kv", {"revision": revision}, 2.0)
        assert error is None, (name, error)
        out[name] = response["hash"]
    return out


@pytest.fixture
def cluster(tmp_path):
    nodes = start_cluster(tmp_path)
    try:
        yield nodes
    finally:
        for node in nodes.values():
            node.kill()


def test_three_member_cluster(cluster, tmp_path):
    nodes = cluster
    leader = wait_for(lambda: leader_of(nodes), 30, "a leader all members agree on")
    followers = [name for name in nodes if name != leader]

    # A write through a follower (forwarded to the leader), read linearizably everywhere.
    response, error = put(nodes[followers[0]], b"k", b"v1")
    assert error is None, error
    assert response["header"]["member_id"] == status_of(nodes[followers[0]])["header"]["member_id"]
    response, error = put(nodes[leader], b"k2", b"v2")
    assert error is None, error
    for name in nodes:
        assert get_value(nodes[name], b"k") == b"v1", name
        assert get_value(nodes[name], b"k2") == b"v2", name

    # A lease granted before the leader dies survives the change of leader.
    granted, error = call(nodes[leader], "lease_grant", {"TTL": 10, "ID": 0}, 2.0)
    assert error is None, error
    lease_id = granted["ID"]
    _response, error = put(nodes[leader], b"leased", b"x", lease=lease_id)
    assert error is None, error

    # kill -9 the leader's whole node: writes succeed again through the others.
    killed_at = time.monotonic()
    nodes[leader].kill()
    attempt = 0
    while True:
        assert time.monotonic() - killed_at < 10, "no write succeeded within 10 s of killing the leader"
        target = nodes[followers[attempt % 2]]
        attempt += 1
        _response, error = put(target, b"after-failover", b"yes", timeout_s=0.3)
        if error is None:
            break
    failover_s = time.monotonic() - killed_at
    print(f"\nfailover: a write succeeded {failover_s * 1000:.0f} ms after kill -9 of the leader "
          f"(election timeout {ELECTION_MS} ms)")
    assert failover_s < 4 * ELECTION_MS / 1000 + 1.0
    new_leader = wait_for(lambda: leader_of(nodes, followers), 10, "a new leader")
    assert new_leader != leader

    # The lease is alive on the new leader (TTLs extended, not cut) and its key is there.
    ttl, error = call(nodes[new_leader], "lease_time_to_live", {"ID": lease_id, "keys": True}, 2.0)
    assert error is None, error
    assert ttl["TTL"] > 0 and ttl["grantedTTL"] == 10
    assert get_value(nodes[new_leader], b"leased") == b"x"
    # A follower forwards keep-alives to the leader's lessor.
    follower = next(name for name in followers if name != new_leader)
    renewed, error = call(nodes[follower], "lease_keep_alive", {"ID": lease_id}, 2.0)
    assert error is None, error
    assert renewed["TTL"] == 10

    # Restart the killed member with the same command line: it catches up.
    for n in range(20):
        _response, error = put(nodes[new_leader], f"bulk-{n}".encode(), b"v" * 100)
        assert error is None, error
    nodes[leader].start(wait=False)
    nodes[leader].wait_ready()
    revision = status_of(nodes[new_leader])["header"]["revision"]
    wait_for(lambda: (status_of(nodes[leader]) or {"header": {"revision": 0}})["header"]["revision"] >= revision,
             15, "the restarted member to catch up")
    hashes = hashes_at(nodes, nodes, revision)
    assert len(set(hashes.values())) == 1, hashes
    assert get_value(nodes[leader], b"after-failover") == b"yes"

    # Partition the current leader from both others with the fault hook.
    old_leader = wait_for(lambda: leader_of(nodes), 10, "a leader after the restart")
    others = [name for name in nodes if name != old_leader]
    faults = peer_faults_path(nodes[old_leader].data_dir)
    with open(faults, "w", encoding="utf-8") as handle:
        handle.write("*\n")
    cut_at = time.monotonic()
    newer = wait_for(lambda: leader_of(nodes, others), 15, "a leader among the majority")
    assert newer != old_leader
    # Check-quorum: the isolated leader steps down and knows no leader.
    wait_for(lambda: (status_of(nodes[old_leader]) or {}).get("leader") == 0, 10, "the old leader to step down")
    print(f"partition: new leader and old one stepped down {1000 * (time.monotonic() - cut_at):.0f} ms after the cut")
    assert get_value(nodes[old_leader], b"k") != b"v1", "an isolated member served a linearizable read"
    assert get_value(nodes[old_leader], b"k", serializable=True) == b"v1"  # serializable stays local
    _response, error = put(nodes[others[0]], b"during-partition", b"p")
    assert error is None, error

    # Heal: the old leader rejoins as a follower and catches up.
    os.remove(faults)
    wait_for(lambda: leader_of(nodes) == newer, 15, "all members to agree on the new leader")
    assert get_value(nodes[old_leader], b"during-partition") == b"p"
    revision = status_of(nodes[newer])["header"]["revision"]
    wait_for(lambda: all((status_of(nodes[n]) or {"header": {"revision": 0}})["header"]["revision"] >= revision
                         for n in nodes), 10, "all members at one revision")
    hashes = hashes_at(nodes, nodes, revision)
    assert len(set(hashes.values())) == 1, hashes


def test_a_member_of_another_cluster_is_refused(tmp_path):
    """Goal: a frame with another --initial-cluster-token is refused. Method: a
    lone pretend peer sends a frame with a wrong token to a member's peer port;
    the member logs the refusal."""
    import ormsgpack
    import zmq

    from actors.peer import PEER_WIRE_VERSION, identity_of, token_hash

    nodes = start_cluster(tmp_path, names=("a", "b"))
    try:
        wait_for(lambda: leader_of(nodes), 30, "a leader")
        peer_port = nodes["a"].args[nodes["a"].args.index("--listen-peer-urls") + 1].rsplit(":", 1)[1]
        context = zmq.Context.instance()
        dealer = context.socket(zmq.DEALER)
        # An identity of its own: a ROUTER ignores a second connection with a member's.
        dealer.setsockopt(zmq.ROUTING_ID, identity_of(12345))
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://127.0.0.1:{peer_port}")
        dealer.send(ormsgpack.packb([PEER_WIRE_VERSION, token_hash("another-token"), 12345, [], []]))
        wait_for(lambda: "another cluster token" in open(nodes["a"].log_path, encoding="utf-8").read(), 10,
                 "the refusal in the log")
        dealer.close()
        assert leader_of(nodes) is not None
    finally:
        for node in nodes.values():
            node.kill()


def test_an_existing_data_dir_ignores_the_initial_cluster_flags(tmp_path):
    """Goal: as etcd, once a data dir exists its membership wins over the flags.
    Method: bootstrap a data dir with one --initial-cluster, then start-up
    config with other flags; the member and cluster ids are the stored ones."""
    from actors.config import NodeConfig, with_stored_cluster

    first = NodeConfig(name="n1", data_dir=str(tmp_path / "d"), initial_cluster_token="t1",
                       initial_cluster="n1=http://127.0.0.1:1,n2=http://127.0.0.1:2,n3=http://127.0.0.1:3",
                       initial_advertise_peer_urls=("http://127.0.0.1:1",))
    assert with_stored_cluster(first) == first
    other = NodeConfig(name="n1", data_dir=str(tmp_path / "d"), initial_cluster_token="t2",
                       initial_cluster="n1=http://127.0.0.1:9", initial_advertise_peer_urls=("http://127.0.0.1:9",))
    restored = with_stored_cluster(other)
    assert (restored.member_id(), restored.cluster_id()) == (first.member_id(), first.cluster_id())
    assert len(restored.cluster_members()) == 3


def test_initial_cluster_must_name_this_member():
    """Goal: a member whose advertised peer URLs are not in --initial-cluster is
    refused at start-up (as etcd), not left to campaign alone."""
    from actors import config as node_config

    with pytest.raises(ValueError, match="initial-cluster"):
        node_config.parse(["--initial-cluster", "a=http://127.0.0.1:1,b=http://127.0.0.1:2",
                           "--initial-advertise-peer-urls", "http://127.0.0.1:3"], environ={})
