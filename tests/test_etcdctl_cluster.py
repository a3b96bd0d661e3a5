"""Goal: real etcdctl 3.4's cluster commands work against a quorumkv cluster
and print what quorumctl prints for the same command on the same state.

Method: one 3-member cluster (tests.cluster_harness; each member's ZeroMQ
port is its client port + 3, so quorumctl's `--cluster` finds the members
from the member list as etcdctl does). The membership is changed through
both tools in turns so each sees the same state: quorumctl adds and removes
a learner, etcdctl adds and removes the same one (its ID is a hash of its
peer URL, so both print the same), then etcdctl adds one at another URL for
real, the member is started, catches up and etcdctl promotes it; endpoint
status, health and hashkv with --cluster -w table, member list in every
format, move-leader (etcdctl finds the leader among --endpoints) and remove
follow. Every wait is on a condition with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from tests.cluster_harness import pick_ports
from tests.conftest import Node
from tests.test_cluster_membership import cluster, members_published, new_member, wait_until  # noqa: F401 (cluster: a fixture)
from tests.test_etcdctl import ETCDCTL, ctl_in_process

pytestmark = pytest.mark.skipif(ETCDCTL is None, reason="etcdctl not installed (tools/test.sh installs etcd-client)")


def run_etcdctl(nodes: list[Node], *args: str) -> subprocess.CompletedProcess:
    endpoints = ",".join(f"127.0.0.1:{node.client_port}" for node in nodes)
    return subprocess.run([ETCDCTL, "--endpoints", endpoints, "--command-timeout=10s", *args],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "ETCDCTL_API": "3"})


def quorumctl_ok(node: Node, *args: str) -> str:
    result = ctl_in_process(node, *args)
    assert result.returncode == 0, (args, result.stderr)
    return result.stdout


def last_line(text: str) -> str:
    """etcdctl's "Error: ..." line (its gRPC retry warnings come before it)."""
    return text.strip().splitlines()[-1]


def same(node: Node, *args: str) -> str:
    """Both tools through `node`: equal exit codes, stdout and error line."""
    theirs, ours = run_etcdctl([node], *args), ctl_in_process(node, *args)
    assert (theirs.returncode, theirs.stdout) == (ours.returncode, ours.stdout), (args, theirs.stderr, ours.stderr)
    if theirs.returncode:
        assert last_line(theirs.stderr) == last_line(ours.stderr), args
    return theirs.stdout


def same_once_settled(node: Node, *args: str) -> str:
    """As `same`, for output carrying raft indexes: until two runs in a row agree."""
    outputs = []

    def agree() -> bool:
        theirs, ours = run_etcdctl([node], *args), ctl_in_process(node, *args)
        assert theirs.returncode == ours.returncode == 0, (args, theirs.stderr, ours.stderr)
        outputs[:] = [theirs.stdout, ours.stdout]
        return theirs.stdout == ours.stdout

    try:
        wait_until(agree, f"{args} prints the same through both tools", 20)
    except AssertionError:
        raise AssertionError(f"{args}: etcdctl printed\n{outputs[0]}quorumctl printed\n{outputs[1]}") from None
    return outputs[0]


def table_rows(table: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines() if line.startswith("|")]


def test_membership_and_cluster_endpoints_print_what_quorumctl_prints(cluster):
    n1 = cluster.members["n1"]
    cluster_id = cluster.status("n1")["header"]["cluster_id"]
    for write_out in ("simple", "table", "json", "fields"):
        same(n1, "member", "list", "-w", write_out)
    assert sorted(line.split(", ")[2] for line in same(n1, "member", "list").splitlines()) == ["n1", "n2", "n3"]

    # Add and remove a learner with quorumctl, then the same with etcdctl at another
    # peer URL (a removed member's URLs give back its ID, which is refused): the
    # same text once each tool's ID and URL are named alike.
    def added_and_removed(tool, write_out: tuple = ()) -> tuple[str, str]:
        (peer_port,) = pick_ports(1)
        peer_url = f"http://127.0.0.1:{peer_port}"
        added = tool(n1, "member", "add", "n4", f"--peer-urls={peer_url}", "--learner", *write_out)
        member_id = (json.loads(added)["member"]["ID"] if write_out else int(added.split()[1], 16))
        removed = tool(n1, "member", "remove", f"{member_id:x}", *write_out)
        if write_out:
            assert json.loads(added)["member"] == {"ID": member_id, "peerURLs": [peer_url], "isLearner": True}
        if write_out:
            # The member lists are ordered by ID, and the new ID differs per tool.
            def canonical(text: str) -> str:
                answer = json.loads(text)
                for member in answer.get("members", []) + ([answer["member"]] if "member" in answer else []):
                    if member["ID"] == member_id:
                        member["ID"], member["peerURLs"] = 0, ["PEER"]
                answer["members"] = sorted(answer.get("members", []), key=lambda member: member["ID"])
                return json.dumps(answer, sort_keys=True)
            return canonical(added), canonical(removed)
        named = [text.replace(peer_url, "PEER").replace(f"{member_id:16x}", "ID").replace(f"{member_id:x}", "ID")
                 for text in (added, removed)]
        # ETCD_INITIAL_CLUSTER follows the member list, ordered by ID: the new ID differs per tool.
        named = [re.sub(r'ETCD_INITIAL_CLUSTER="([^"]*)"',
                        lambda m: 'ETCD_INITIAL_CLUSTER="' + ",".join(sorted(m.group(1).split(","))) + '"', text)
                 for text in named]
        return named[0], named[1]

    def etcdctl_ok(member, *args: str) -> str:
        done = run_etcdctl([member], *args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    ours = added_and_removed(quorumctl_ok)
    assert ours == added_and_removed(etcdctl_ok)
    assert ours[1] == f"Member ID removed from cluster {cluster_id:16x}\n"
    assert added_and_removed(quorumctl_ok, ("-w", "json")) == added_and_removed(etcdctl_ok, ("-w", "json"))

    # etcdctl adds one for real (at another peer URL: a member ID once removed
    # cannot serve again, see the report); update through both tools; it starts
    # as etcdctl said.
    (peer_port,) = pick_ports(1)
    peer_url = f"http://127.0.0.1:{peer_port}"
    added = run_etcdctl([n1], "member", "add", "n4", f"--peer-urls={peer_url}", "--learner")
    assert added.returncode == 0, added.stderr
    new_id = int(added.stdout.split()[1], 16)
    lines = added.stdout.splitlines()
    assert lines[:3] == [f"Member {new_id:16x} added to cluster {cluster_id:16x}", "", 'ETCD_NAME="n4"']
    assert lines[4:] == [f'ETCD_INITIAL_ADVERTISE_PEER_URLS="{peer_url}"', 'ETCD_INITIAL_CLUSTER_STATE="existing"']
    initial_cluster = re.fullmatch(r'ETCD_INITIAL_CLUSTER="(.*)"', lines[3]).group(1)
    assert sorted(initial_cluster.split(",")) == sorted(
        [f"{name}={url}" for name, url in cluster.peer_urls.items()] + [f"n4={peer_url}"])
    (other_port,) = pick_ports(1)
    update = ("member", "update", f"{new_id:x}")
    theirs_updated = run_etcdctl([n1], *update, f"--peer-urls=http://127.0.0.1:{other_port}")
    assert theirs_updated.stdout == f"Member {new_id:16x} updated in cluster {cluster_id:16x}\n", theirs_updated.stderr
    assert quorumctl_ok(n1, *update, f"--peer-urls={peer_url}") == theirs_updated.stdout
    assert f"{new_id:x}, unstarted, , {peer_url}, , true\n" in same(n1, "member", "list")
    n4 = new_member(cluster, "n4", initial_cluster, peer_url)
    n4.start(wait=False)
    wait_until(lambda: members_published(cluster, "n1"), "the learner started and published itself")
    for write_out in ("simple", "json"):
        same(n4, "member", "list", "-w", write_out)

    # etcdctl promotes it once it is in sync; a second promote fails alike in both.
    attempts = []

    def promote() -> bool:
        attempts.append(run_etcdctl([n1], "member", "promote", f"{new_id:x}"))
        assert attempts[-1].returncode == 0 or "in sync with leader" in attempts[-1].stderr, attempts[-1].stderr
        return attempts[-1].returncode == 0

    wait_until(promote, "etcdctl promoted the learner")
    assert attempts[-1].stdout == f"Member {new_id:16x} promoted in cluster {cluster_id:16x}\n"
    assert same(n1, "member", "promote", f"{new_id:x}") == ""
    wait_until(lambda: ctl_in_process(n4, "put", "after/promote", "1").returncode == 0, "the promoted member takes writes")
    listed = same(n4, "member", "list")
    assert f"{new_id:x}, started, n4, {peer_url}, http://127.0.0.1:{n4.client_port}, false\n" in listed

    # endpoint status / health / hashkv --cluster -w table: the same four members.
    revision = cluster.revision("n1")
    cluster.wait_for_revision(revision)
    status = table_rows(same_once_settled(n1, "endpoint", "status", "--cluster", "-w", "table"))
    assert sorted(row[0] for row in status[1:]) == sorted(
        f"http://127.0.0.1:{node.client_port}" for node in cluster.members.values())
    assert [row[4] for row in status[1:]].count("true") == 1 and {row[5] for row in status[1:]} == {"false"}
    hashes = table_rows(same(n1, "endpoint", "hashkv", "--cluster", "-w", "table"))
    assert len(hashes) == 5 and len({row[1] for row in hashes[1:]}) == 1
    theirs_health = run_etcdctl([n1], "endpoint", "health", "--cluster", "-w", "table")
    ours_health = ctl_in_process(n1, "endpoint", "health", "--cluster", "-w", "table")
    assert theirs_health.returncode == ours_health.returncode == 0, (theirs_health.stderr, ours_health.stderr)

    def without_took(table: str) -> list[list[str]]:  # how long each check took differs
        rows = table_rows(table)
        return rows[:1] + sorted(row[:2] + row[3:] for row in rows[1:])

    assert without_took(theirs_health.stdout) == without_took(ours_health.stdout)
    assert [row[1] for row in without_took(theirs_health.stdout)[1:]] == ["true"] * 4

    # move-leader: etcdctl asks every endpoint's status and sends to the leader.
    leader = cluster.wait_for_leader()
    target = "n4" if leader != "n4" else "n1"
    moved = run_etcdctl(list(cluster.members.values()), "move-leader", f"{cluster.member_ids[target]:x}")
    assert moved.returncode == 0, moved.stderr
    assert moved.stdout == (f"Leadership transferred from {cluster.member_ids[leader]:x} "
                            f"to {cluster.member_ids[target]:x}\n")
    assert cluster.wait_for_leader() == target
    follower = next(node for name, node in cluster.members.items() if name != target)
    no_leader = run_etcdctl([follower], "move-leader", f"{cluster.member_ids[target]:x}")
    ours_no_leader = ctl_in_process(follower, "move-leader", f"{cluster.member_ids[target]:x}")
    assert no_leader.returncode == ours_no_leader.returncode != 0
    assert last_line(no_leader.stderr) == last_line(ours_no_leader.stderr).replace(
        follower.zmq_endpoint, f"127.0.0.1:{follower.client_port}")

    # etcdctl removes the new voter: its node stops by itself; three members are left.
    removed = run_etcdctl([n1], "member", "remove", f"{new_id:x}")
    assert removed.stdout == f"Member {new_id:16x} removed from cluster {cluster_id:16x}\n", removed.stderr
    wait_until(lambda: n4.process.poll() is not None, "the removed member's node exited", 30)
    assert n4.process.returncode == 0
    assert len(same(n1, "member", "list").splitlines()) == 3
