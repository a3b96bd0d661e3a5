"""The ops tools against real nodes: tools.load, tools.compact, tools.snapshot.

Each test starts a real node (tests.conftest), runs a tool as a user would
(`python -m tools.X` in a subprocess) and checks what the tool printed and
what the node serves afterwards. Runs are short and bounded (seconds).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tools import compact as compact_tool
from tools import load

TOOL_TIMEOUT_S = 120
# The member tests.conftest.Node starts (its name; default peer URL and token).
MEMBER_FLAGS = ("--name", "test-node")


def run_tool(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=TOOL_TIMEOUT_S)


def run_load(node, workload: str, *extra: str) -> dict:
    result = run_tool("tools.load", "--endpoints", node.zmq_endpoint, "--server-pid", str(node.process.pid),
                      "--workload", workload, "--duration", "2", "--clients", "1", "--pipeline", "64",
                      "--batch", "16", "--keys", "200", "--json", "--quiet", *extra)
    assert result.returncode == 0, result.stderr + node.log_tail()
    return json.loads(result.stdout)


def assert_sane(report: dict, workload: str) -> None:
    assert report["workload"] == workload
    assert report["error_count"] == 0, report["errors"]
    assert report["requests_ok"] >= 100
    assert 1.0 <= report["elapsed_s"] < 30
    assert report["ops_per_s"] > 50
    latency = report["latency_us"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["max"] < 10_000_000
    cpu = report["server_cpu"]
    # The raft log, the applier and a gateway all did work, and not absurdly much.
    assert {"raft_log", "applier", "gateway-0"} <= set(cpu["by_process_s"])
    assert 0 < cpu["per_op_us"] < 100_000


# ---- tools.load ----------------------------------------------------------------


def test_load_put_then_serializable_get(node):
    """Goal: the load tool drives puts and gets with zero errors and sane numbers. Method: 2 s of each."""
    assert_sane(run_load(node, "put"), "put")
    report = run_load(node, "get-serializable")
    assert_sane(report, "get-serializable")
    assert report["misses"] == 0  # the tool preloads every key it reads


def test_load_linearizable_get_and_txn(node):
    """Goal: the read-index path and the CAS txn run cleanly. Method: 2 s of each; one client owns its keys."""
    assert_sane(run_load(node, "get-linearizable"), "get-linearizable")
    report = run_load(node, "txn")
    assert_sane(report, "txn")
    assert report["conflicts"] == 0  # a single client racing nobody always wins its compare


def test_load_refuses_non_loopback_target():
    """Goal: the load tool cannot be pointed away from this machine."""
    result = run_tool("tools.load", "--endpoints", "192.0.2.1:2382", "--duration", "1", "--quiet")
    assert result.returncode == 2
    assert "loopback" in result.stderr
    with pytest.raises(ValueError):
        load.loopback_endpoint("tcp://example.com:2382")
    assert load.loopback_endpoint("localhost:1") == "tcp://localhost:1"


def test_load_histogram_percentiles():
    """Goal: latency percentiles are right to the histogram's 0.2% resolution."""
    counts = [0] * load.HISTOGRAM_SIZE
    for latency_us in range(1, 100_001):
        counts[load.histogram_index(latency_us)] += 1
    p50, p99, top = load.histogram_percentiles(counts, (0.5, 0.99, 1.0))
    assert abs(p50 - 50_000) <= 50_000 * 0.002 + 1
    assert abs(p99 - 99_000) <= 99_000 * 0.002 + 1
    assert abs(top - 100_000) <= 100_000 * 0.002 + 1
    assert load.histogram_percentiles([0] * 4, (0.5,)) == [None]


def test_server_cpu_sees_descendants():
    """Goal: the CPU meter sums a process tree. Method: a child that burns CPU under this process."""
    child = subprocess.Popen([sys.executable, "-c", "import time\nend=time.time()+0.5\nwhile time.time()<end: pass"])
    try:
        time.sleep(0.3)
        usage = load.server_cpu_seconds(os.getpid())
        assert "supervisor" in usage and len(usage) >= 2
    finally:
        child.wait(timeout=10)


# ---- tools.compact -------------------------------------------------------------------


def put_revisions(client, key: bytes, count: int) -> list[int]:
    return [client.put(key, b"v%d" % i)["header"]["revision"] for i in range(count)]


def test_compact_to_revision_then_old_read_fails(node, tmp_path):
    """Goal: compact.py compacts, and a read below the compaction point says "compacted"."""
    from protocol.client import CompactedError

    with node.client() as client:
        revisions = put_revisions(client, b"compact-me", 3)
        result = run_tool("tools.compact", str(revisions[1]), "--physical", "--endpoints", node.zmq_endpoint,
                          "--state-file", str(tmp_path / "samples.json"))
        assert result.returncode == 0, result.stderr
        assert f"physically compacted to revision {revisions[1]}" in result.stdout
        with pytest.raises(CompactedError):
            client.get(b"compact-me", revision=revisions[0])
        assert client.get(b"compact-me", revision=revisions[1])["kvs"][0]["value"] == b"v1"
        # Again: nothing left to do, and the tool says so rather than failing.
        again = run_tool("tools.compact", str(revisions[1]), "--endpoints", node.zmq_endpoint,
                         "--state-file", str(tmp_path / "samples.json"))
        assert again.returncode == 0 and "already compacted" in again.stdout


def test_compact_keep_revisions_and_keep_hours(node, tmp_path):
    """Goal: the two retention modes pick the right revision. Method: a state file with an old sample."""
    from protocol.client import CompactedError

    state_file = tmp_path / "samples.json"
    with node.client() as client:
        revisions = put_revisions(client, b"retained", 4)
        # A sample "two hours ago" at revisions[1]: keeping one hour compacts to it.
        compact_tool.save_samples(str(state_file), [(time.time() - 7200, revisions[1])])
        hours = run_tool("tools.compact", "--keep-hours", "1", "--endpoints", node.zmq_endpoint,
                         "--state-file", str(state_file))
        assert hours.returncode == 0, hours.stderr
        assert f"compacted to revision {revisions[1]}" in hours.stdout
        with pytest.raises(CompactedError):
            client.get(b"retained", revision=revisions[0])
        # The run recorded a sample of its own.
        assert len(compact_tool.load_samples(str(state_file))) == 2
        keep = run_tool("tools.compact", "--keep-revisions", "1", "--endpoints", node.zmq_endpoint,
                        "--state-file", str(state_file))
        assert keep.returncode == 0, keep.stderr
        assert f"compacted to revision {revisions[3] - 1}" in keep.stdout
        with pytest.raises(CompactedError):
            client.get(b"retained", revision=revisions[2] - 1)


def test_compact_keep_hours_without_old_sample_does_nothing():
    """Goal: with no sample old enough, --keep-hours waits rather than guessing."""
    now = time.time()
    assert compact_tool.revision_at_least_hours_old([(now - 60, 5)], now, 1.0) is None
    assert compact_tool.revision_at_least_hours_old([(now - 7200, 5), (now - 3700, 9), (now - 60, 12)], now, 1.0) == 9


# ---- tools.snapshot --------------------------------------------------------------


def test_snapshot_save_restore_serves_same_keys(node_factory, tmp_path):
    """Goal: save from a live node, restore into a fresh data dir, a new node serves the same keys.

    Method: the restored dir is where node_factory("restored") looks (tmp_path/restored.qkv).
    """
    source = node_factory("source")
    expected = {b"snap/%03d" % i: b"value-%d" % i for i in range(50)}
    with source.client() as client:
        for key, value in expected.items():
            client.put(key, value)
        revision = client.get(b"snap/000")["header"]["revision"]
    snapshot_file = str(tmp_path / "backup.db")
    saved = run_tool("tools.snapshot", "save", snapshot_file, "--endpoints", source.zmq_endpoint)
    assert saved.returncode == 0, saved.stderr
    assert "downloading snapshot" in saved.stderr and f"revision {revision}" in saved.stdout
    source.stop()

    data_dir = str(tmp_path / "restored.qkv")
    restored = run_tool("tools.snapshot", "restore", snapshot_file, "--data-dir", data_dir, *MEMBER_FLAGS)
    assert restored.returncode == 0, restored.stderr
    refused = run_tool("tools.snapshot", "restore", snapshot_file, "--data-dir", data_dir)
    assert refused.returncode == 2 and "not empty" in refused.stderr

    node = node_factory("restored")
    with node.client() as client:
        response = client.get(b"snap/", b"snap0")
        assert {kv["key"]: kv["value"] for kv in response["kvs"]} == expected
        assert response["header"]["revision"] == revision


def test_snapshot_restored_node_accepts_writes(node_factory, tmp_path):
    """Goal: a node restored from a snapshot takes writes, not only reads. Method: save, restore, put, get."""
    source = node_factory("source")
    with source.client() as client:
        for index in range(5):
            client.put(b"before/%d" % index, b"x")
        revision = client.get(b"before/0")["header"]["revision"]
    snapshot_file = str(tmp_path / "backup.db")
    assert run_tool("tools.snapshot", "save", snapshot_file, "--endpoints", source.zmq_endpoint).returncode == 0
    source.stop()
    restored = run_tool("tools.snapshot", "restore", snapshot_file, "--data-dir", str(tmp_path / "restored.qkv"),
                        *MEMBER_FLAGS)
    assert restored.returncode == 0, restored.stderr
    node = node_factory("restored")
    with node.client(timeout_s=5) as client:
        put_revision = client.put(b"after", b"y")["header"]["revision"]
        assert put_revision == revision + 1
        assert client.get(b"after")["kvs"][0]["value"] == b"y"
