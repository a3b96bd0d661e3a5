"""tools.grpc_bench and tools.grpc_null_server: they run and report what happened.

Smoke tests with tiny totals: the bench against the null server and against
a real node, run as a user would (`python -m tools.grpc_bench ... --json`);
no timing is asserted, only counts, the shape of the report and that the
server's CPU was found and measured.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from tests.conftest import REPO, free_port
from tools import grpc_bench

TOOL_TIMEOUT_S = 120
SERVER_READY_TIMEOUT_S = 30


def run_bench(endpoint: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "tools.grpc_bench", "--endpoints", endpoint, "--json", "--quiet",
                             *args], cwd=REPO, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def assert_sane(report: dict, op: str, total: int, server_pid: int) -> None:
    assert report["op"] == op
    assert report["ok"] == total, report
    assert report["error_count"] == 0, report["errors"]
    assert report["misses"] == 0 and report["conflicts"] == 0
    latency = report["latency_us"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    # Found from the listening port alone (a node: climbing from a gateway to its supervisor).
    assert report["server_pids"] == [server_pid]
    assert report["server_cpu_s"] > 0
    assert report["server_cpu_s_per_1000_ops"] == pytest.approx(1000 * report["server_cpu_s"] / total, rel=0.01)


def wait_serving(endpoint: str, process: subprocess.Popen) -> None:
    from protocol.etcd.etcdserverpb import rpc_pb2, rpc_pb2_grpc

    deadline = time.monotonic() + SERVER_READY_TIMEOUT_S
    with grpc.insecure_channel(endpoint) as channel:
        stub = rpc_pb2_grpc.MaintenanceStub(channel)
        while time.monotonic() < deadline:
            assert process.poll() is None, "null server exited"
            try:
                stub.Status(rpc_pb2.StatusRequest(), timeout=1.0)
                return
            except grpc.RpcError:
                continue  # not listening yet: the call itself waited up to 1 s
    raise TimeoutError(f"null server not serving on {endpoint}")


def start_null_server(*flags: str):
    endpoint = f"127.0.0.1:{free_port()}"
    process = subprocess.Popen([sys.executable, "-m", "tools.grpc_null_server", "--listen", endpoint, *flags],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        wait_serving(endpoint, process)
    except BaseException:
        stop_null_server(process)
        raise
    return endpoint, process


def stop_null_server(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=10)


@pytest.fixture
def null_server():
    endpoint, process = start_null_server("--processes", "2")
    try:
        yield endpoint, process
    finally:
        stop_null_server(process)


def test_null_server_puts_gets_and_txns(null_server):
    """Goal: the bench counts every answer and finds the server by its port. Method: 150 of each op."""
    endpoint, process = null_server
    for op in ("put", "get", "txn"):
        report = run_bench(endpoint, "--op", op, "--total", "150", "--clients", "6", "--key-space", "20")
        assert_sane(report, op, 150, process.pid)
        # Both server processes (one port, SO_REUSEPORT; plus multiprocessing's resource
        # tracker) are in the tree the CPU is read from.
        assert len(report["server_cpu_by_process_s"]) >= 2


def test_one_client_one_request_at_a_time(null_server):
    endpoint, process = null_server
    report = run_bench(endpoint, "--op", "put", "--total", "50", "--clients", "1")
    assert report["processes"] == 1 and report["clients"] == 1
    assert_sane(report, "put", 50, process.pid)


def test_null_server_aio():
    """The asyncio variant of the null server answers the same client."""
    endpoint, process = start_null_server("--processes", "1", "--aio")
    try:
        report = run_bench(endpoint, "--op", "put", "--total", "60", "--clients", "4", "--processes", "1")
        assert_sane(report, "put", 60, process.pid)
    finally:
        stop_null_server(process)


def test_node_every_op(node):
    """Goal: the same client drives a quorumkv node. Method: 100 of each op; txn compares must all succeed."""
    endpoint = f"127.0.0.1:{node.client_port}"
    for op in ("put", "get", "get-serializable", "txn"):
        report = run_bench(endpoint, "--op", op, "--total", "100", "--clients", "4", "--key-space", "30",
                           "--processes", "1")
        assert_sane(report, op, 100, node.process.pid)
        assert {"gateway-0", "applier", "raft_log"} <= {name.split(":", 1)[1]
                                                       for name in report["server_cpu_by_process_s"]}


def test_node_watch_fan_out(node):
    """Goal: every event due reaches its watcher. Method: 12 watchers on 3 keys over 4 streams, 1 s of puts."""
    report = run_bench(f"127.0.0.1:{node.client_port}", "--op", "watch", "--watchers", "12", "--streams", "4",
                       "--key-space", "3", "--write-rate", "40", "--duration", "1", "--watch-drain-s", "30")
    assert report["puts"] > 0 and report["put_errors"] == 0
    assert report["events_due"] == 4 * report["puts"]
    assert report["events"] == report["events_due"], report
    assert report["error_count"] == 0, report["errors"]


def test_watch_without_a_watch_service_fails_fast(null_server):
    """A server without Watch (the null one) stops the run with the gRPC status, not a 60 s wait."""
    endpoint, _process = null_server
    result = subprocess.run([sys.executable, "-m", "tools.grpc_bench", "--endpoints", endpoint, "--op", "watch",
                             "--watchers", "4", "--streams", "2", "--duration", "1", "--quiet"], cwd=REPO,
                            capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    assert result.returncode == 1
    assert "a Watch stream failed before its watches were created" in result.stderr
    # UNIMPLEMENTED as a rule; grpc.aio reports INTERNAL when the refusal races the first send.
    assert ("UNIMPLEMENTED" in result.stderr or "INTERNAL" in result.stderr) and "Traceback" not in result.stderr


def test_expected_events_add_up():
    """The per-process share of due events sums to puts x watchers per key, whatever the split."""
    spec = {"streams": 7, "watchers": 23, "key_space": 5, "processes": 3}
    by_key = {0: 4, 1: 2, 2: 9, 3: 1, 4: 3}
    due = sum(grpc_bench.expected_events(spec, process, by_key) for process in range(3))
    assert due == sum(count * grpc_bench._watchers_of_key(spec, key) for key, count in by_key.items())
    assert sum(grpc_bench._watchers_of_key(spec, key) for key in range(5)) == 23


def test_txn_needs_a_key_per_client():
    result = subprocess.run([sys.executable, "-m", "tools.grpc_bench", "--op", "txn", "--clients", "10",
                             "--key-space", "5", "--total", "1"], cwd=REPO, capture_output=True, text=True,
                            timeout=TOOL_TIMEOUT_S)
    assert result.returncode != 0 and "--key-space must be at least --clients" in result.stderr
