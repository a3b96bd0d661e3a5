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
import signal
import subprocess
import time

import pytest

from tests.conftest import free_port

ETCD = shutil.which("etcd")
READY_TIMEOUT_S = 60  # a loaded 2-core machine can take long
STOP_TIMEOUT_S = 15
PROBE_TIMEOUT_S = 1.0


def require_etcd() -> str:
    """etcd's path; skips the test when it is missing, except on CI (which must have it)."""
    if ETCD is None:
        assert not os.environ.get("CI"), "CI must have etcd (tools/test.sh installs etcd-server)"
        pytest.skip("etcd not installed (tools/test.sh installs etcd-server)")
    return ETCD


class EtcdServer:
    """One real etcd member, started as a test would start a quorumkv node."""

    def __init__(self, tmp_dir: str, name: str = "etcd", extra_args: tuple = ()):
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
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> "EtcdServer":
        log = open(self.log_path, "ab")
        # ETCD_* variables from the caller's environment would override nothing
        # given as a flag but could add flags of their own: leave them out.
        env = {key: value for key, value in os.environ.items() if not key.startswith("ETCD_")}
        self.process = subprocess.Popen([require_etcd(), *self.args], stdout=log, stderr=log,
                                        env=env, start_new_session=True)
        log.close()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()  # never leave a half-started server behind
            raise
        return self

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

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL of the group if it does not stop."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
        self.process = None


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
