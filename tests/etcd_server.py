"""A real etcd 3.4 server for tests that compare quorumkv with etcd.

`EtcdServer(tmp_dir).start()` runs Debian's `etcd` (package etcd-server,
installed by tools/test.sh) as a one-member cluster on free loopback ports with
its data dir under `tmp_dir`, and waits until a linearizable Range answers over
gRPC. `stop()` kills its whole process group; the `etcd_server` fixture does
that in a finally, also when the test fails. Ports come from conftest's
`free_port`, so two test runs on one machine do not collide.

Extra etcd flags (`--max-txn-ops 8`, ...) go in `extra_args`.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from tests.conftest import ProcessGroup, free_port

ETCD = shutil.which("etcd")
READY_TIMEOUT_S = 60  # a loaded 2-core machine can take long
PROBE_TIMEOUT_S = 1.0


def require_etcd() -> str:
    """etcd's path; skips the test when it is missing, except on CI (which must have it)."""
    if ETCD is None:
        assert not os.environ.get("CI"), "CI must have etcd (tools/test.sh installs etcd-server)"
        pytest.skip("etcd not installed (tools/test.sh installs etcd-server)")
    return ETCD


class EtcdServer(ProcessGroup):
    """One real etcd member, started as a test would start a quorumkv node."""

    def __init__(self, tmp_dir: str, name: str = "etcd", extra_args: tuple = ()):
        super().__init__()
        self.name = name
        self.data_dir = os.path.join(tmp_dir, f"{name}.etcd")
        self.log_path = os.path.join(tmp_dir, f"{name}.log")
        self.client_port = free_port()
        self.peer_port = free_port()
        self.client_url = f"http://127.0.0.1:{self.client_port}"
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        self.args = [
            "--name", name,
            "--data-dir", self.data_dir,
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"{name}={peer_url}",
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"{name}-{self.peer_port}",
            "--logger", "zap",
            *extra_args,
        ]
        # ETCD_* variables from the caller's environment would override nothing
        # given as a flag but could add flags of their own: leave them out.
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("ETCD_")}

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def argv(self) -> list[str]:
        return [require_etcd(), *self.args]

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until a linearizable Range answers (a leader is elected and serving)."""
        import grpc

        from protocol.etcd.etcdserverpb import rpc_pb2 as pb, rpc_pb2_grpc as pb_grpc

        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.endpoint) as channel:
            kv = pb_grpc.KVStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"etcd exited with {self.process.returncode}; log: {self.log_tail()}")
                try:
                    # wait_for_ready: until the port accepts, not a fail-fast error.
                    kv.Range(pb.RangeRequest(key=b"ready-probe"), timeout=PROBE_TIMEOUT_S, wait_for_ready=True)
                    return
                except grpc.RpcError:
                    continue  # not listening or no leader yet; bounded by the deadline
        raise TimeoutError(f"etcd not ready in {timeout_s}s; log: {self.log_tail()}")


@pytest.fixture
def etcd_factory(tmp_path):
    """make(name, extra_args) -> a started EtcdServer; all are stopped at teardown."""
    servers: list[EtcdServer] = []

    def make(name: str = "etcd", extra_args: tuple = ()) -> EtcdServer:
        server = EtcdServer(str(tmp_path), name, extra_args)
        servers.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def etcd_server(etcd_factory) -> EtcdServer:
    return etcd_factory()
