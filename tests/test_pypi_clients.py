"""Goal: etcd's Python clients from PyPI work against quorumkv unchanged, as users run them.

Method: one node with the gRPC port and the JSON gateway
(`--listen-client-http-urls`) for the whole module.
- OpenStack's `etcd3gw` (the JSON gateway, over HTTP): KV, prefix reads,
  txns, watch, leases, locks; in this process.
- `etcd-sdk-python` (module `pyetcd`, a maintained fork of python-etcd3 with
  current protobuf stubs; gRPC): KV, txns, compaction, leases, locks, watch,
  status; in a child process (tests/grpc_client_scenarios.py), because its
  .proto registrations clash with ours in one process. The same scenarios
  pass against a real etcd 3.4.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading

import pytest

from tests.conftest import REPO, Node, free_port
from tests.test_json_gateway import wait_for_http_listeners

SCENARIO_TIMEOUT_S = 120
WATCH_WAIT_S = 10.0


def require(module: str):
    """The module; skips the test when it is missing, except on CI (tools/test.sh installs it)."""
    if os.environ.get("CI"):
        return __import__(module)
    return pytest.importorskip(module, reason="pip install -e '.[test]' installs it")


@pytest.fixture(scope="module")
def both_ports_node(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pypi-clients")
    http_port = free_port()
    node = Node(str(directory / "node.qkv"), str(directory / "node.log"), gateways=2,
                extra_args=("--listen-client-http-urls", f"http://127.0.0.1:{http_port}"))
    try:
        node.start()
        wait_for_http_listeners(node, 2)
        node.http_port = http_port
        yield node
    finally:
        node.kill()


@pytest.fixture
def etcd3gw_client(both_ports_node):
    client_module = require("etcd3gw.client")
    client = client_module.Etcd3Client(host="127.0.0.1", port=both_ports_node.http_port, timeout=10)
    try:
        yield client
    finally:
        client.session.close()


# ---- etcd3gw (JSON gateway) ----------------------------------------------------------

def test_etcd3gw_kv(etcd3gw_client):
    client = etcd3gw_client
    assert client.status()["leader"] == client.status()["header"]["member_id"]
    assert client.put("gw/a", "1") is True and client.put("gw/b", "2") is True
    assert client.get("gw/a") == [b"1"]
    [(value, meta)] = client.get("gw/a", metadata=True)
    assert value == b"1" and meta["key"] == b"gw/a" and meta["version"] == "1"
    assert [value for value, _ in client.get_prefix("gw/")] == [b"1", b"2"]
    assert client.get("gw/none") == []
    assert client.create("gw/c", "3") is True and client.create("gw/c", "4") is False
    assert client.replace("gw/c", "3", "5") is True and client.replace("gw/c", "3", "6") is False
    assert client.get("gw/c") == [b"5"]
    assert client.delete("gw/a") is True and client.delete("gw/a") is False
    assert client.delete_prefix("gw/") is True
    assert client.get_prefix("gw/") == []


def test_etcd3gw_watch(etcd3gw_client):
    client = etcd3gw_client
    events, cancel = client.watch("gw/w")  # returns once the watch exists (its first response)
    seen: list = []
    done = threading.Event()

    def read() -> None:
        for event in events:  # ends when canceled
            seen.append(event)
            if len(seen) == 3:
                done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    client.put("gw/w", "x")
    client.put("gw/w", "y")
    client.delete("gw/w")
    assert done.wait(WATCH_WAIT_S), f"events seen: {seen}"
    cancel()
    assert [event.get("type", "PUT") for event in seen] == ["PUT", "PUT", "DELETE"]
    assert [event["kv"].get("value") for event in seen] == [b"x", b"y", None]

    events, cancel = client.watch_prefix("gw/p/")
    client.put("gw/p/1", "a")
    client.put("gw/other", "b")
    client.put("gw/p/2", "c")
    try:
        assert [next(events)["kv"]["key"], next(events)["kv"]["key"]] == [b"gw/p/1", b"gw/p/2"]
    finally:
        cancel()

    timer = threading.Timer(0.5, client.put, ("gw/once", "1"))
    timer.start()
    try:
        assert client.watch_once("gw/once", timeout=WATCH_WAIT_S)["kv"]["value"] == b"1"
    finally:
        timer.join()


def test_etcd3gw_leases(etcd3gw_client):
    client = etcd3gw_client
    lease = client.lease(ttl=30)
    assert 0 < lease.ttl() <= 30
    assert lease.refresh() == 30
    assert client.put("gw/l1", "v", lease=lease) is True
    assert client.put("gw/l2", "v", lease=lease) is True
    assert sorted(lease.keys()) == [b"gw/l1", b"gw/l2"]
    assert lease.revoke() is True
    assert client.get("gw/l1") == [] and client.get("gw/l2") == []
    assert lease.ttl() == -1


def test_etcd3gw_lock(etcd3gw_client):
    client = etcd3gw_client
    holder = client.lock("gw-lock", ttl=10)
    assert holder.acquire() is True and holder.is_acquired()
    other = client.lock("gw-lock", ttl=10)
    assert other.acquire() is False and not other.is_acquired()
    assert holder.refresh() == 10
    assert holder.release() is True and not holder.is_acquired()
    assert other.acquire() is True
    assert other.release() is True


# ---- pyetcd (gRPC) ---------------------------------------------------------------------------

def run_scenario(name: str, node) -> None:
    # Looked for, not imported: its .proto registrations would clash with ours here.
    if importlib.util.find_spec("pyetcd") is None:
        assert not os.environ.get("CI"), "CI must have etcd-sdk-python (tools/test.sh installs it)"
        pytest.skip("etcd-sdk-python not installed (pip install -e '.[test]' installs it)")
    result = subprocess.run([sys.executable, "-m", "tests.grpc_client_scenarios", name, "127.0.0.1",
                             str(node.client_port)], cwd=REPO, capture_output=True, text=True,
                            timeout=SCENARIO_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip() == f"{name}: ok"


def test_pyetcd_kv(both_ports_node):
    run_scenario("kv", both_ports_node)


def test_pyetcd_leases_and_lock(both_ports_node):
    run_scenario("leases", both_ports_node)


def test_pyetcd_watch_and_contested_lock(both_ports_node):
    run_scenario("watch", both_ports_node)


def test_pyetcd_status(both_ports_node):
    run_scenario("status", both_ports_node)
