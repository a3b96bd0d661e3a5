"""Goal: the operator's paths work on a real node: the NOSPACE alarm and its
way out (compact, defragment, disarm), physical compaction, defragment,
auto-compaction, status, and structured logs on every line.

Method: real nodes from the `node_factory` fixture, driven through the
Python client; every wait is a bounded poll of the node's own answers.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from actors.config import ZMQ_PORT_OFFSET
from protocol.client import CompactedError, NoSpaceError
from tests.conftest import Node, free_port

POLL_TIMEOUT_S = 30


def wait_until(predicate, what: str, timeout_s: float = POLL_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)  # polling the node's answers, bounded by timeout_s
    raise AssertionError(f"timed out waiting for {what}")


def test_nospace_alarm_allows_reads_and_deletes_until_compact_defrag_disarm(node_factory):
    node = node_factory(extra_args=("--quota-backend-bytes", str(2 * 1024 * 1024)))
    value = b"x" * 4096
    with node.client(timeout_s=10) as client:
        written = 0
        with pytest.raises(NoSpaceError):
            for written in range(2000):
                client.put(f"fill/{written:05d}", value)
        assert written > 10, "the quota was hit before any real data was written"
        alarms = client.alarm_list()["alarms"]
        assert [alarm["alarm"] for alarm in alarms] == [1]  # NOSPACE
        assert "NOSPACE" in client.status()["errors"][0]
        # Reads and deletes still work; puts do not.
        assert client.get("fill/00000")["kvs"][0]["value"] == value
        deleted = client.delete("fill/", prefix=True)["deleted"]
        assert deleted == written
        with pytest.raises(NoSpaceError):
            client.put("after", "1")
        # The operator's way out.
        revision = client.get("fill/00000")["header"]["revision"]
        client.compact(revision, physical=True)
        client.defragment()
        client.alarm_disarm()
        assert client.alarm_list()["alarms"] == []
        assert client.put("after", "1")["header"]["revision"] == revision + 1


def test_physical_compaction_and_defragment_keep_the_latest_values(node):
    with node.client(timeout_s=10) as client:
        for round_number in range(5):
            for i in range(50):
                client.put(f"k{i:02d}", f"v{round_number}")
        revision = client.get("k00")["header"]["revision"]
        size_before = client.status()["db_size"]
        client.compact(revision - 10, physical=True)
        with pytest.raises(CompactedError):
            client.get("k00", revision=revision - 11)
        client.defragment()
        kvs = client.get("k", prefix=True)["kvs"]
        assert len(kvs) == 50 and {kv["value"] for kv in kvs} == {b"v4"}
        status = client.status()
        assert status["header"]["revision"] == revision
        assert status["db_size"] <= size_before
        # Both gateways moved to the new store generation and serve from it.
        for _ in range(8):
            assert client.get("k49", serializable=True)["kvs"][0]["value"] == b"v4"


def test_periodic_auto_compaction_runs_on_the_leader(node_factory):
    node = node_factory(extra_args=("--auto-compaction-mode", "periodic", "--auto-compaction-retention", "1s"))
    with node.client(timeout_s=10) as client:
        first = client.put("auto", "0")["header"]["revision"]

        def compacted_past_first_write():
            client.put("auto", "tick")
            return client.hash_kv()["compact_revision"] >= first

        wait_until(compacted_past_first_write, "auto-compaction")
        with pytest.raises(CompactedError):
            client.get("auto", revision=first - 1)


def test_status_reports_the_node(node):
    with node.client() as client:
        client.put("s", "1")
        status = client.status()
        assert status["leader"] == status["header"]["member_id"] != 0
        assert status["raft_applied_index"] >= 1 and status["raft_term"] >= 1
        assert status["db_size"] >= status["db_size_in_use"] > 0
        assert status["header"]["revision"] == 2


def test_every_log_line_is_json_with_node_actor_pid(node):
    with node.client() as client:
        client.put("log", "1")
    node.stop()
    lines = [line for line in open(node.log_path, encoding="utf-8") if line.strip()]
    assert len(lines) >= 5
    actors = set()
    for line in lines:
        record = json.loads(line)
        assert record["node"] == "test-node" and isinstance(record["pid"], int), line
        actors.add(record["actor"])
    assert {"supervisor", "raft_log", "applier", "gateway-0", "gateway-1"} <= actors


def _free_port_with_free_offset(offset: int) -> int:
    for _ in range(100):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + offset))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


def test_two_nodes_started_with_etcd_flags_alone_do_not_collide(tmp_path):
    """Goal: etcd's flags alone are enough, also for several nodes on one host.
    Method: two nodes given only --name/--data-dir/--listen-client-urls/
    --listen-peer-urls; each serves on its derived ZeroMQ port (client + 3)."""
    nodes = []
    try:
        for name in ("infra1", "infra2"):
            client_port = _free_port_with_free_offset(ZMQ_PORT_OFFSET)
            node = Node(str(tmp_path / f"{name}.qkv"), str(tmp_path / f"{name}.log"), gateways=1)
            node.args = ["--name", name, "--data-dir", node.data_dir,
                         "--listen-client-urls", f"http://127.0.0.1:{client_port}",
                         "--advertise-client-urls", f"http://127.0.0.1:{client_port}",
                         "--listen-peer-urls", f"http://127.0.0.1:{free_port()}"]
            node.zmq_endpoint = f"127.0.0.1:{client_port + ZMQ_PORT_OFFSET}"
            nodes.append(node.start())
        for node in nodes:
            with node.client() as client:
                client.put("who", node.data_dir)
        for node in nodes:
            with node.client() as client:
                assert client.get("who")["kvs"][0]["value"] == node.data_dir.encode()
    finally:
        for node in nodes:
            node.kill()
