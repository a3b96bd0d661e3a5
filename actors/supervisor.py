"""The supervisor: starts a node's actor processes, restarts the ones that die, stops them all.

Each child is `python -m actors.server --role ROLE --index I` with the
node's config in the QUORUMKV_CONFIG_JSON environment variable. A child
that exits is restarted after a backoff that doubles on every quick crash
(up to RESTART_BACKOFF_MAX_MS) and resets once the child has stayed up for
RESTART_BACKOFF_RESET_MS. SIGTERM or SIGINT stops the group: SIGTERM to
every child, SIGKILL to those still alive after STOP_GRACE_MS. Children
exit by themselves when the supervisor dies (see actors.loop). A raft log
that exits with EXIT_MEMBER_REMOVED found this member removed from the
cluster: the supervisor stops the whole node (as etcd's removed member).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

from actors.config import NodeConfig

RESTART_BACKOFF_MIN_MS = 100
RESTART_BACKOFF_MAX_MS = 5000
RESTART_BACKOFF_RESET_MS = 10_000
STOP_GRACE_MS = 5000
WAIT_INTERVAL_MS = 50

CONFIG_ENV = "QUORUMKV_CONFIG_JSON"
# The raft log's exit status when this member was removed from the cluster.
EXIT_MEMBER_REMOVED = 3


@dataclasses.dataclass
class Child:
    role: str
    index: int
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    backoff_ms: int = RESTART_BACKOFF_MIN_MS
    restart_at: float | None = None

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}" if self.role == "gateway" else self.role


def node_roles(config: NodeConfig) -> list[tuple[str, int]]:
    roles = [("raft_log", 0), ("applier", 0)]
    roles += [("gateway", i) for i in range(config.gateway_count())]
    roles.append(("watch_broadcaster", 0))
    return roles


class Supervisor:
    def __init__(self, config: NodeConfig, log):
        self.config = config
        self.log = log
        self.children = [Child(role, index) for role, index in node_roles(config)]
        self.stopping = False

    def _spawn(self, child: Child) -> None:
        env = dict(os.environ)
        env[CONFIG_ENV] = self.config.to_json()
        command = [sys.executable, "-m", "actors.server", "--role", child.role, "--index", str(child.index)]
        child.process = subprocess.Popen(command, env=env)
        child.started_at = time.monotonic()
        child.restart_at = None
        self.log.info("child started", child=child.name, child_pid=child.process.pid)

    def _on_exit(self, child: Child, returncode: int) -> None:
        now = time.monotonic()
        if child.role == "raft_log" and returncode == EXIT_MEMBER_REMOVED:
            self.log.error("the member has been permanently removed from the cluster; stopping the node",
                           member_id=f"{self.config.member_id():x}")
            child.process = None
            self.stopping = True
            return
        if (now - child.started_at) * 1000 >= RESTART_BACKOFF_RESET_MS:
            child.backoff_ms = RESTART_BACKOFF_MIN_MS
        self.log.warning("child exited, restarting", child=child.name, returncode=returncode,
                         backoff_ms=child.backoff_ms)
        child.process = None
        child.restart_at = now + child.backoff_ms / 1000
        child.backoff_ms = min(child.backoff_ms * 2, RESTART_BACKOFF_MAX_MS)

    def stop(self, *_args) -> None:
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        for child in self.children:
            self._spawn(child)
        while not self.stopping:  # the supervisor's one unbounded loop
            now = time.monotonic()
            for child in self.children:
                if self.stopping:
                    break
                if child.process is not None:
                    returncode = child.process.poll()
                    if returncode is not None:
                        self._on_exit(child, returncode)
                elif child.restart_at is not None and now >= child.restart_at:
                    self._spawn(child)
            time.sleep(WAIT_INTERVAL_MS / 1000)  # polling children, not synchronising a test
        self._stop_children()
        return 0

    def _stop_children(self) -> None:
        running = [child for child in self.children if child.process is not None]
        for child in running:
            child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_MS / 1000
        for child in running:
            try:
                child.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log.warning("child did not stop, killing", child=child.name)
                child.process.kill()
                child.process.wait()
        self.log.info("node stopped")
