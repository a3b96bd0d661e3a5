"""Fixtures that start real quorumkv nodes on free loopback ports.

Every process a test starts runs in its own session (process group) and is
killed, group and all, at teardown, also when the test fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import zmq

from protocol import codec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READY_TIMEOUT_S = 30
STOP_TIMEOUT_S = 15


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request_once(endpoint: str, op: str, body: dict, timeout_s: float) -> tuple[int, dict] | None:
    """One raw request over ZeroMQ; None if no answer within timeout_s."""
    context = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(f"tcp://{endpoint}")
        dealer.send(codec.encode_request_frame([[1, op, body]]))
        if not dealer.poll(int(timeout_s * 1000)):
            return None
        (_request_id, status, response), = codec.decode_response_frame(dealer.recv())
        return status, response
    finally:
        dealer.close()


def child_pids(pid: int) -> list[int]:
    pids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as handle:
            pids.extend(int(p) for p in handle.read().split())
    return pids


def process_cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        return [part.decode() for part in handle.read().split(b"\0") if part]


class ProcessGroup:
    """A server process in its own session (process group), its output in a log
    file: started, waited for (`wait_ready`, per subclass), stopped or killed
    group and all. Subclasses give `argv()` and `wait_ready()`."""

    log_path: str
    cwd: str | None = None
    env: dict | None = None

    def __init__(self):
        self.process: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def wait_ready(self) -> None:
        raise NotImplementedError

    def start(self, wait: bool = True):
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.argv(), cwd=self.cwd, env=self.env, stdout=log, stderr=log,
                                        start_new_session=True)
        log.close()
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.kill()  # never leave a half-started group behind
                raise
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return "".join(handle.readlines()[-lines:])
        except FileNotFoundError:
            return ""

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL of the whole group if it does not stop."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group()
        returncode = self.process.returncode
        self.process = None
        return returncode

    def kill(self) -> None:
        """SIGKILL the whole group at once."""
        if self.process is not None:
            self._kill_group()
        self.process = None

    def _kill_group(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass


class Node(ProcessGroup):
    """A quorumkv node (supervisor + actors) started as a user would."""

    cwd = REPO

    def __init__(self, data_dir: str, log_path: str, gateways: int = 2, extra_args: tuple = ()):
        super().__init__()
        self.data_dir = data_dir
        self.log_path = log_path
        self.client_port = free_port()
        self.zmq_port = free_port()
        self.zmq_endpoint = f"127.0.0.1:{self.zmq_port}"
        self.args = [
            "--name", "test-node",
            "--data-dir", data_dir,
            "--listen-client-urls", f"http://127.0.0.1:{self.client_port}",
            "--listen-zmq-urls", f"tcp://127.0.0.1:{self.zmq_port}",
            "--gateways", str(gateways),
            *extra_args,
        ]

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "actors.server", *self.args]

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until a linearizable read answers (raft log, applier and a gateway all up)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited with {self.process.returncode}; log: {self.log_tail()}")
            answer = request_once(self.zmq_endpoint, "range", {"key": b"ready-probe"}, 1.0)
            if answer is not None and answer[0] == codec.STATUS_OK:
                return
        raise TimeoutError(f"node not ready in {timeout_s}s; log: {self.log_tail()}")

    def actor_pids(self) -> dict[str, int]:
        """role name (raft_log, applier, gateway-0, ...) -> pid."""
        pids = {}
        for pid in child_pids(self.process.pid):
            try:
                argv = process_cmdline(pid)
            except FileNotFoundError:
                continue
            if "--role" in argv:
                role = argv[argv.index("--role") + 1]
                index = argv[argv.index("--index") + 1]
                pids[f"gateway-{index}" if role == "gateway" else role] = pid
        return pids

    def ctl(self, *args: str, input: str | bytes | None = None, check: bool = False) -> subprocess.CompletedProcess:
        text = not isinstance(input, bytes)
        return subprocess.run([sys.executable, "-m", "tools.quorumctl", "--endpoints", self.zmq_endpoint, *args],
                              cwd=REPO, input=input, capture_output=True, text=text, check=check, timeout=60)

    def client(self, **kwargs):
        from protocol.client import Client

        return Client(endpoints=[self.zmq_endpoint], **kwargs)


@pytest.fixture
def node_factory(tmp_path):
    nodes: list[Node] = []

    def make(name: str = "node", gateways: int = 2, extra_args: tuple = (), start: bool = True) -> Node:
        node = Node(str(tmp_path / f"{name}.qkv"), str(tmp_path / f"{name}.log"), gateways, extra_args)
        nodes.append(node)
        return node.start() if start else node

    try:
        yield make
    finally:
        for node in nodes:
            if node.process is not None:
                node.kill()


@pytest.fixture
def node(node_factory) -> Node:
    return node_factory()
