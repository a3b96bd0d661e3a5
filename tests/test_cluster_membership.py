"""Cluster membership with real processes: learners, promotion, removal, update, move-leader.

Goal: etcd 3.4's membership procedure works end to end on quorumkv: `member
add --learner`, start the new member with --initial-cluster-state existing
(it starts empty and receives the log), it refuses linearizable requests
while a learner, `member promote` once it caught up, `member remove` of a
voter stops that member's process, and the cluster keeps serving
linearizably throughout (a recorded workload is checked); move-leader hands
leadership to the member asked; member update re-points peers; etcd's
errors come back for bad requests; quorumctl prints what etcdctl prints; a
node started alone grows to two voters (its peer transport comes up with the
first member added), survives a restart of the new voter, and shrinks back.

Method: 3-member clusters from tests.cluster_harness on loopback ports,
each member's ZeroMQ port being its client port + 3 (the server's default),
so `endpoint status --cluster` finds them from the member list; quorumctl
runs as a subprocess (Node.ctl); every wait is on a condition with a deadline.
"""

from __future__ import annotations

import os
import re
import socket
import time

import pytest

from actors.config import member_id_for
from protocol.codec import STATUS_OK
from tests import cluster_harness
from tests.cluster_harness import Cluster, Workload, WorkloadConfig, final_reads, hashes_agree, pick_ports
from tests.conftest import Node, request_once
from tools import linearizability as lin

POLL_S = 0.1  # polling a real cluster for a state, not synchronising threads
CATCH_UP_S = 60.0


def wait_until(predicate, what: str, timeout_s: float = CATCH_UP_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(POLL_S)
    raise AssertionError(f"not within {timeout_s}s: {what}")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def client_port_pair() -> tuple[int, int]:
    """A client port whose + 3 (the ZeroMQ port a member derives) is free too."""
    for _attempt in range(200):
        (port,) = pick_ports(1)
        if _port_free(port + 3) and port + 3 not in cluster_harness._ports_handed_out:
            cluster_harness._ports_handed_out.add(port + 3)
            return port, port + 3
    raise RuntimeError("no free client port pair")


def derived_zmq_ports(cluster: Cluster) -> None:
    """Give every member a ZeroMQ port = client port + 3 (as a member started without --listen-zmq-urls)."""
    for node in cluster.members.values():
        client, zmq_port = client_port_pair()
        cluster_harness.set_client_ports(node, client, zmq_port)


def new_member(cluster: Cluster, name: str, initial_cluster: str, peer_url: str) -> Node:
    """A member process for `name`, started with --initial-cluster-state existing (not yet running)."""
    args = ("--name", name, "--initial-cluster", initial_cluster, "--initial-cluster-state", "existing",
            "--initial-cluster-token", cluster.token, "--initial-advertise-peer-urls", peer_url,
            "--listen-peer-urls", peer_url, "--heartbeat-interval", str(cluster_harness.TEST_HEARTBEAT_MS),
            "--election-timeout", str(cluster_harness.TEST_ELECTION_MS))
    node = Node(os.path.join(cluster.base_dir, f"{name}.qkv"), os.path.join(cluster.base_dir, f"{name}.log"), 1, args)
    client, zmq_port = client_port_pair()
    cluster_harness.set_client_ports(node, client, zmq_port)
    member_id = member_id_for((peer_url,), cluster.token)
    cluster.members[name] = node
    cluster.peer_urls[name] = peer_url
    cluster.member_ids[name] = member_id
    cluster.names_by_id[member_id] = name
    return node


def forget_member(cluster: Cluster, name: str) -> None:
    cluster.members.pop(name)
    cluster.names_by_id.pop(cluster.member_ids.pop(name))


def members_published(cluster: Cluster, via: str) -> list[dict] | None:
    response, _error = cluster.request(via, "member_list", {})
    if response and all(m["name"] and m["clientURLs"] for m in response["members"]):
        return response["members"]
    return None


def ctl_ok(node: Node, *args: str) -> str:
    result = node.ctl(*args)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout


@pytest.fixture
def cluster(tmp_path):
    with Cluster(str(tmp_path), 3) as running:
        derived_zmq_ports(running)
        running.start()
        wait_until(lambda: members_published(running, "n1"), "every member published its name and client URLs")
        yield running


def test_learner_joins_catches_up_is_promoted_then_a_voter_is_removed(cluster):
    n1 = cluster.members["n1"]
    for index in range(20):
        ctl_ok(n1, "put", f"before/{index}", "x" * 100)
    (peer_port,) = pick_ports(1)
    peer_url = f"http://127.0.0.1:{peer_port}"

    # member add --learner: etcdctl's text, with the lines to start the new member with.
    added = ctl_ok(cluster.members["n2"], "member", "add", "n4", f"--peer-urls={peer_url}", "--learner")
    new_id = member_id_for((peer_url,), cluster.token)
    cluster_id = cluster.status("n1")["header"]["cluster_id"]
    lines = added.splitlines()
    assert lines[0] == f"Member {new_id:16x} added to cluster {cluster_id:16x}"
    assert lines[2] == 'ETCD_NAME="n4"'
    initial_cluster = re.fullmatch(r'ETCD_INITIAL_CLUSTER="(.*)"', lines[3]).group(1)
    assert sorted(initial_cluster.split(",")) == sorted([f"{n}={u}" for n, u in cluster.peer_urls.items()]
                                                        + [f"n4={peer_url}"])
    assert lines[4:] == [f'ETCD_INITIAL_ADVERTISE_PEER_URLS="{peer_url}"', 'ETCD_INITIAL_CLUSTER_STATE="existing"']
    listed = ctl_ok(n1, "member", "list")
    assert f"{new_id:x}, unstarted, , {peer_url}, , true" in listed.splitlines()

    # Started as etcdctl said: it receives the log from the leader and publishes itself.
    n4 = new_member(cluster, "n4", initial_cluster, peer_url)
    n4.start(wait=False)
    revision = cluster.revision("n1")
    wait_until(lambda: (cluster.revision("n4") or 0) >= revision, "the learner caught up")
    status = cluster.status("n4")
    assert status["is_learner"] is True and status["leader"] in cluster.member_ids.values()
    wait_until(lambda: members_published(cluster, "n1"), "the learner published its name")

    # A learner serves serializable reads only (etcd 3.4: "rpc not supported for learner").
    assert ctl_ok(n4, "get", "before/3", "--consistency=s", "--print-value-only").strip() == "x" * 100
    refused = n4.ctl("put", "k", "v")
    assert refused.returncode == 1 and "etcdserver: rpc not supported for learner" in refused.stderr
    assert "rpc not supported for learner" in n4.ctl("get", "before/3").stderr

    # Promotion once in sync; then it serves everything. A workload runs meanwhile.
    workload = Workload({name: cluster.endpoints[name] for name in ("n2", "n3")},
                        WorkloadConfig(clients=3, keys=2), seed=4)
    workload.start()
    try:
        attempts = []

        def promote():
            attempts.append(n1.ctl("member", "promote", f"{new_id:x}"))
            assert attempts[-1].returncode == 0 or "in sync with leader" in attempts[-1].stderr, attempts[-1].stderr
            return attempts[-1].returncode == 0

        wait_until(promote, "the learner was promoted")
        promoted = attempts[-1]
        assert promoted.stdout == f"Member {new_id:16x} promoted in cluster {cluster_id:16x}\n"
        wait_until(lambda: cluster.status("n4") and not cluster.status("n4")["is_learner"], "n4 says it is a voter")
        wait_until(lambda: n4.ctl("put", "after/promote", "1").returncode == 0, "the promoted member takes writes")

        # Remove a voter (the leader, the hardest case, unless n4 leads): its process stops by itself.
        leader = cluster.wait_for_leader()
        victim = leader if leader != "n4" else "n1"
        removed = ctl_ok(n4, "member", "remove", f"{cluster.member_ids[victim]:x}")
        assert removed == f"Member {cluster.member_ids[victim]:16x} removed from cluster {cluster_id:16x}\n"
        gone = cluster.members[victim]
        wait_until(lambda: gone.process.poll() is not None, "the removed member's node exited", 30)
        assert gone.process.returncode == 0
        assert "the member has been permanently removed from the cluster" in gone.log_tail(60)
        forget_member(cluster, victim)
        assert cluster.wait_for_leader() != victim
        wait_until(lambda: any(o.outcome == lin.OK and o.op != lin.GET and o.start_ns > time.monotonic_ns() - 5e9
                               for o in list(workload.history)), "writes succeed after the removal")
    finally:
        workload.stop()
    assert not workload.errors, workload.errors
    history = workload.history + final_reads(cluster, workload.keys)
    result = lin.check(history)
    assert result.ok, result.summary()
    _revision, hashes, problems = hashes_agree(cluster)
    assert not problems, problems
    assert len(hashes) == 3
    whole_hashes = {name: cluster.request(name, "hash", {})[0]["hash"] for name in cluster.names}
    assert len(set(whole_hashes.values())) == 1, whole_hashes

    # The member list is etcdctl's, in every format; a removed member cannot come back.
    response, _error = cluster.request("n4", "member_list", {})
    assert sorted(m["name"] for m in response["members"]) == sorted(cluster.names)
    table = ctl_ok(n4, "member", "list", "-w", "table").splitlines()
    assert [cell.strip() for cell in table[1].split("|")[1:-1]] == [
        "ID", "STATUS", "NAME", "PEER ADDRS", "CLIENT ADDRS", "IS LEARNER"]
    assert len(table) == 3 + 3 + 1
    gone.process = None
    gone.start(wait=False)
    wait_until(lambda: gone.process.poll() is not None, "a removed member refuses to start", 30)
    assert gone.process.returncode == 1
    assert "not starting" in gone.log_tail(5)

    # endpoint status/health --cluster: every member, found through the member list.
    status_lines = ctl_ok(n4, "endpoint", "status", "--cluster").splitlines()
    assert sorted(line.split(", ")[0] for line in status_lines) == sorted(
        f"http://127.0.0.1:{node.client_port}" for node in cluster.members.values())
    health = n4.ctl("endpoint", "health", "--cluster")
    assert health.returncode == 0, health.stderr
    assert len([line for line in health.stderr.splitlines()
                if "is healthy: successfully committed proposal" in line]) == 3
    assert sorted(ctl_ok(n4, "defrag", "--cluster").splitlines()) == sorted(
        f"Finished defragmenting etcd member[http://127.0.0.1:{node.client_port}]" for node in cluster.members.values())


def test_move_leader_member_update_and_errors(cluster):
    n1 = cluster.members["n1"]
    cluster_id = cluster.status("n1")["header"]["cluster_id"]
    leader = cluster.wait_for_leader()
    target = next(name for name in cluster.names if name != leader)
    target_id, leader_id = cluster.member_ids[target], cluster.member_ids[leader]

    # move-leader: quorumctl finds the leader among the endpoints and asks it.
    endpoints = ",".join(cluster.endpoints.values())
    moved = ctl_ok(n1, "--endpoints", endpoints, "move-leader", f"{target_id:x}")
    assert moved == f"Leadership transferred from {leader_id:x} to {target_id:x}\n"
    assert cluster.wait_for_leader() == target
    # On a follower the request itself says "not leader"; etcdctl needs the leader among its endpoints.
    follower = next(name for name in cluster.names if name != target)
    _response, error = cluster.request(follower, "move_leader", {"targetID": cluster.member_ids[follower]})
    assert error == "NotLeader"
    no_leader = n1.ctl("--endpoints", cluster.endpoints[follower], "move-leader", f"{target_id:x}")
    assert no_leader.returncode == 128 and "no leader endpoint given at" in no_leader.stderr
    bad = n1.ctl("--endpoints", endpoints, "move-leader", "1234")
    assert bad.returncode == 1 and bad.stderr == "Error: etcdserver: bad leader transferee\n"

    # etcd's errors.
    def error_of(*args: str) -> str:
        result = n1.ctl(*args)
        assert result.returncode == 1, (args, result.stdout)
        return result.stderr

    assert error_of("member", "promote", f"{leader_id:x}") == "Error: etcdserver: can only promote a learner member\n"
    assert error_of("member", "remove", "1234") == "Error: etcdserver: member not found\n"
    taken = cluster.peer_urls["n2"]
    assert error_of("member", "add", "again", f"--peer-urls={taken}") == "Error: etcdserver: member ID already exist\n"
    assert error_of("member", "add", "again", f"--peer-urls={taken},http://127.0.0.1:1") == \
        "Error: etcdserver: Peer URLs already exists\n"
    assert error_of("member", "update", "1234", "--peer-urls=http://127.0.0.1:1") == \
        "Error: etcdserver: member not found\n"
    assert n1.ctl("member", "remove", "zz").stderr == \
        'Error: bad member ID arg (strconv.ParseUint: parsing "zz": invalid syntax), expecting ID in Hex\n'
    assert n1.ctl("member", "add", "x").stderr == "Error: member peer urls not provided\n"
    (spare,) = pick_ports(1)
    unsupported = n1.ctl("member", "add", "x", f"--peer-urls=http://127.0.0.1:{spare}", "-w", "table")
    assert unsupported.returncode == 4 and unsupported.stderr == "Error: table not supported as output format\n"

    # member update: the others reach n3 at its new peer URL once it listens there.
    (new_port,) = pick_ports(1)
    new_url = f"http://127.0.0.1:{new_port}"
    n3_id = cluster.member_ids["n3"]
    updated = ctl_ok(n1, "member", "update", f"{n3_id:x}", f"--peer-urls={new_url}")
    assert updated == f"Member {n3_id:16x} updated in cluster {cluster_id:16x}\n"
    listed = ctl_ok(n1, "member", "list", "-w", "json")
    assert f'"ID":{n3_id},"name":"n3","peerURLs":["{new_url}"]' in listed
    cluster.stop_member("n3")
    cluster_harness.replace_flag(cluster.members["n3"], "--listen-peer-urls", new_url)
    cluster.start_member("n3")
    ctl_ok(n1, "put", "after/update", "1")
    revision = cluster.revision("n1")
    wait_until(lambda: (cluster.revision("n3") or 0) >= revision, "n3 caught up at its new peer URL")
    assert ctl_ok(cluster.members["n3"], "get", "after/update", "--print-value-only") == "1\n"
    response, _error = cluster.request("n3", "member_list", {})
    assert response["members"] == cluster.request("n1", "member_list", {})[0]["members"]


def test_a_single_node_grows_to_two_voters_and_back(node_factory):
    """A node started alone has no peer transport: the first member added brings it up."""
    first_port, second_port = pick_ports(2)
    first_url, second_url = f"http://127.0.0.1:{first_port}", f"http://127.0.0.1:{second_port}"
    timing = ("--heartbeat-interval", "50", "--election-timeout", "500")
    first = node_factory("one", gateways=1, extra_args=(
        "--name", "one", "--initial-advertise-peer-urls", first_url, "--listen-peer-urls", first_url, *timing))
    ctl_ok(first, "put", "k", "v")
    wait_until(lambda: "started, one," in first.ctl("member", "list").stdout, "the node published itself")
    added = ctl_ok(first, "member", "add", "two", f"--peer-urls={second_url}", "--learner")
    initial_cluster = re.search(r'ETCD_INITIAL_CLUSTER="(.*)"', added).group(1)
    second = node_factory("two", gateways=1, start=False, extra_args=(
        "--name", "two", "--initial-cluster", initial_cluster, "--initial-cluster-state", "existing",
        "--initial-advertise-peer-urls", second_url, "--listen-peer-urls", second_url, *timing))
    second.start(wait=False)
    second_id = member_id_for((second_url,), "etcd-cluster")

    def second_caught_up():
        answer = request_once(second.zmq_endpoint, "status", {}, 1.0)
        return answer is not None and answer[0] == STATUS_OK and answer[1]["header"]["revision"] >= 2

    wait_until(second_caught_up, "the learner caught up")
    wait_until(lambda: first.ctl("member", "promote", f"{second_id:x}").returncode == 0, "promoted")
    wait_until(lambda: second.ctl("put", "k2", "v2").returncode == 0, "the second voter takes writes")
    assert ctl_ok(first, "get", "k2", "--print-value-only") == "v2\n"
    # Killed and restarted with the same command line (--initial-cluster-state existing):
    # its member table comes from its store, so it is back as a voter, not a learner.
    second.kill()
    second.start(wait=False)
    wait_until(lambda: second.ctl("put", "k2", "v3").returncode == 0, "the restarted voter takes writes")
    assert request_once(second.zmq_endpoint, "status", {}, 5.0)[1]["is_learner"] is False
    ctl_ok(first, "member", "remove", f"{second_id:x}")
    wait_until(lambda: second.process.poll() is not None, "the removed member stopped", 30)
    wait_until(lambda: first.ctl("put", "k3", "v3").returncode == 0, "alone again, the first node takes writes")

