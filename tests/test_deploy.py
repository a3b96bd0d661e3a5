"""The deploy files work: deploy/supervisord under a real supervisord, deploy/systemd verified.

Goal: the shipped supervisord program group starts a node that serves, restarts
an actor killed with SIGKILL, and stops cleanly; the systemd unit passes
`systemd-analyze verify`; the example environment file is a valid node config.

Method: a real supervisord (from PyPI) with a main configuration generated in
tmp_path (its socket, pid and log files there) that includes
deploy/supervisord/quorumkv.conf unchanged; the node's settings come from the
environment, as in production. `quorumkv` on supervisord's PATH is a shim that
runs this checkout's `python -m actors.server`. Readiness and restarts are
observed by polling the ZeroMQ port and supervisord's XML-RPC interface, never by
sleeping. Everything started is stopped in `finally`, also on failure.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import xmlrpc.client

import pytest

from actors import config as node_config
from conftest import REPO, child_pids, free_port, request_once
from protocol import codec

SUPERVISORD_CONF = os.path.join(REPO, "deploy", "supervisord", "quorumkv.conf")
SYSTEMD_UNIT = os.path.join(REPO, "deploy", "systemd", "quorumkv@.service")
ENV_EXAMPLE = os.path.join(REPO, "deploy", "systemd", "node1.env.example")
GATEWAYS = 2
READY_TIMEOUT_S = 60  # a gateway may go through supervisord's 1 s, 2 s, 3 s retries on a new node
STOP_TIMEOUT_S = 30
POLL_INTERVAL_S = 0.05


def write_executable(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def quorumkv_shim(bin_dir: str) -> str:
    """A `quorumkv` executable that runs this checkout (exec keeps the pid)."""
    os.makedirs(bin_dir, exist_ok=True)
    path = os.path.join(bin_dir, "quorumkv")
    write_executable(path, f'#!/bin/sh\ncd "{REPO}" && exec "{sys.executable}" -m actors.server "$@"\n')
    return path


def short_dir() -> str:
    # Unix socket paths are limited to ~107 bytes; pytest's tmp_path may be long.
    return tempfile.mkdtemp(prefix="qkv-sd-")


class Supervisord:
    """A supervisord running deploy/supervisord/quorumkv.conf for one node."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.socket_dir = short_dir()
        self.socket_path = os.path.join(self.socket_dir, "supervisor.sock")
        self.log_dir = str(tmp_path / "logs")
        os.makedirs(self.log_dir)
        self.zmq_port = free_port()
        self.zmq_endpoint = f"127.0.0.1:{self.zmq_port}"
        self.config_path = str(tmp_path / "supervisord.conf")
        self.process: subprocess.Popen | None = None
        self.known_pids: set[int] = set()
        with open(self.config_path, "w", encoding="utf-8") as handle:
            handle.write(f"""\
[unix_http_server]
file = {self.socket_path}

[supervisord]
nodaemon = true
logfile = {tmp_path}/supervisord.log
pidfile = {tmp_path}/supervisord.pid
childlogdir = {tmp_path}
loglevel = info

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl = unix://{self.socket_path}

[include]
files = {SUPERVISORD_CONF}
""")

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("QUORUMKV_", "ETCD_"))}
        bin_dir = os.path.dirname(quorumkv_shim(str(self.tmp_path / "bin")))
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
        env.update({
            "QUORUMKV_NAME": "deploy-node",
            "QUORUMKV_DATA_DIR": str(self.tmp_path / "node.qkv"),
            "QUORUMKV_LISTEN_CLIENT_URLS": f"http://127.0.0.1:{free_port()}",
            "QUORUMKV_LISTEN_PEER_URLS": f"http://127.0.0.1:{free_port()}",
            "QUORUMKV_LISTEN_ZMQ_URLS": f"tcp://{self.zmq_endpoint}",
            "QUORUMKV_GATEWAYS": str(GATEWAYS),
            "QUORUMKV_LOG_DIR": self.log_dir,
        })
        return env

    def start(self) -> None:
        output = open(self.tmp_path / "supervisord.out", "ab")
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", self.config_path],
                env=self.environment(), stdout=output, stderr=output, start_new_session=True)
        finally:
            output.close()

    def rpc(self):
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(None, None, f"unix://{self.socket_path}")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def processes(self) -> dict[str, dict]:
        """'raft_log', 'applier', 'gateway-0', ... -> supervisord's process info."""
        infos = {info["name"]: info for info in self.rpc().getAllProcessInfo()}
        self.known_pids.update(info["pid"] for info in infos.values() if info["pid"])
        return infos

    def diagnostics(self) -> str:
        parts = []
        for name in sorted(os.listdir(self.log_dir)) if os.path.isdir(self.log_dir) else []:
            with open(os.path.join(self.log_dir, name), encoding="utf-8", errors="replace") as handle:
                parts.append(f"--- {name}\n" + "".join(handle.readlines()[-15:]))
        for name in ("supervisord.log", "supervisord.out"):
            path = self.tmp_path / name
            if path.exists():
                parts.append(f"--- {name}\n" + "".join(path.read_text(errors="replace").splitlines(True)[-20:]))
        return "\n".join(parts)

    def wait_until(self, what: str, predicate, timeout_s: float = READY_TIMEOUT_S):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"supervisord exited with {self.process.returncode} while waiting for "
                                     f"{what}\n{self.diagnostics()}")
            try:
                result = predicate()
            except (OSError, xmlrpc.client.Fault):
                result = None  # supervisord's socket not up yet
            if result:
                return result
            time.sleep(POLL_INTERVAL_S)  # polling interval, not a stand-in for synchronisation
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}\n{self.diagnostics()}")

    def serves(self) -> bool:
        """A linearizable read answers through every gateway `hello` names."""
        hello = request_once(self.zmq_endpoint, "hello", {}, 1.0)
        if hello is None or hello[0] != codec.STATUS_OK or len(hello[1]["gateways"]) != GATEWAYS:
            return False
        for endpoint in hello[1]["gateways"]:
            answer = request_once(endpoint.removeprefix("tcp://"), "range", {"key": b"deploy-probe"}, 1.0)
            if answer is None or answer[0] != codec.STATUS_OK:
                return False
        return True

    def shutdown(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=STOP_TIMEOUT_S)

    def cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                self.known_pids.update(child_pids(self.process.pid))
            except OSError:
                pass
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=STOP_TIMEOUT_S)
        # supervisord puts every child in a process group of its own.
        for pid in self.known_pids:
            kill_if_actor(pid)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def kill_if_actor(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read()
    except OSError:
        return
    if b"actors.server" in cmdline:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def put_and_get(endpoint: str, key: bytes, value: bytes) -> None:
    answer = request_once(endpoint, "put", {"key": key, "value": value}, 10.0)
    assert answer is not None and answer[0] == codec.STATUS_OK, answer
    assert_value(endpoint, key, value)


def assert_value(endpoint: str, key: bytes, value: bytes) -> None:
    answer = request_once(endpoint, "range", {"key": key}, 10.0)
    assert answer is not None and answer[0] == codec.STATUS_OK, answer
    assert [kv["value"] for kv in answer[1]["kvs"]] == [value], answer


def restart_after_sigkill(supervisord: Supervisord, name: str) -> None:
    """SIGKILL one actor; supervisord starts a new one and the node serves again."""
    old_pid = supervisord.processes()[name]["pid"]
    assert old_pid and pid_alive(old_pid)
    os.kill(old_pid, signal.SIGKILL)

    def restarted():
        info = supervisord.processes()[name]
        return info if info["statename"] == "RUNNING" and info["pid"] not in (0, old_pid) else None

    info = supervisord.wait_until(f"supervisord to restart {name}", restarted)
    assert not pid_alive(old_pid)
    assert info["pid"] != old_pid
    supervisord.wait_until(f"the node to serve after {name} was killed", supervisord.serves)


def test_supervisord_runs_restarts_and_stops_a_node(tmp_path):
    supervisord = Supervisord(tmp_path)
    try:
        supervisord.start()
        expected = {"raft_log", "applier", "watch_broadcaster", *(f"gateway-{i}" for i in range(GATEWAYS))}
        supervisord.wait_until("every actor RUNNING", lambda: all(
            info["statename"] == "RUNNING" for info in supervisord.processes().values())
            and set(supervisord.processes()) == expected)
        supervisord.wait_until("the node to serve", supervisord.serves)
        assert {info["group"] for info in supervisord.processes().values()} == {"quorumkv"}
        put_and_get(supervisord.zmq_endpoint, b"deploy-key", b"one")

        restart_after_sigkill(supervisord, "gateway-0")
        assert_value(supervisord.zmq_endpoint, b"deploy-key", b"one")
        put_and_get(supervisord.zmq_endpoint, b"deploy-key", b"two")

        restart_after_sigkill(supervisord, "applier")
        assert_value(supervisord.zmq_endpoint, b"deploy-key", b"two")
        put_and_get(supervisord.zmq_endpoint, b"deploy-key", b"three")

        pids = [info["pid"] for info in supervisord.processes().values()]
        assert supervisord.shutdown() == 0, supervisord.diagnostics()
        assert [pid for pid in pids if pid_alive(pid)] == [], "actors outlived supervisord"
        for name in expected:
            assert os.path.exists(os.path.join(supervisord.log_dir, f"{name}.log")), name
    finally:
        supervisord.cleanup()


def test_supervisord_first_start_has_no_crash_loop(tmp_path):
    """A brand new node under supervisord starts without any actor exiting.

    Method: start the shipped group on an empty data dir, wait until it serves,
    then read supervisord's own log for actor exits.
    """
    supervisord = Supervisord(tmp_path)
    try:
        supervisord.start()
        supervisord.wait_until("the node to serve", supervisord.serves)
        log = (tmp_path / "supervisord.log").read_text(errors="replace")
        exits = [line for line in log.splitlines() if " exited: " in line]
        assert exits == [], "\n".join(exits) + "\n" + supervisord.diagnostics()
    finally:
        supervisord.cleanup()


def test_systemd_unit_verifies(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        assert not os.environ.get("CI"), "CI must verify the systemd unit: systemd-analyze is missing"
        pytest.skip("systemd-analyze is not installed: the systemd unit was NOT verified")
    # verify checks that ExecStart= exists; point it at a real executable and
    # change nothing else.
    with open(SYSTEMD_UNIT, encoding="utf-8") as handle:
        unit = handle.read()
    exec_lines = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    assert exec_lines == ["ExecStart=/opt/quorumkv/bin/quorumkv"], exec_lines
    shim = quorumkv_shim(str(tmp_path / "bin"))
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    (unit_dir / "quorumkv@.service").write_text(unit.replace(exec_lines[0], f"ExecStart={shim}"))
    for required in ("EnvironmentFile=/etc/quorumkv/%i.env", "Restart=always", "KillMode=control-group"):
        assert required in unit.splitlines(), required
    result = subprocess.run([analyze, "verify", str(unit_dir / "quorumkv@node1.service")],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    ours = [line for line in (result.stdout + result.stderr).splitlines() if "quorumkv" in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


def read_env_file(path: str) -> dict[str, str]:
    environ = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line and not line.startswith("#"):
                name, sep, value = line.partition("=")
                assert sep and name == name.strip() and value == value.strip(), line
                environ[name] = value
    return environ


def test_example_env_file_is_a_valid_node_config():
    environ = read_env_file(ENV_EXAMPLE)
    known = {"QUORUMKV_" + flag.upper().replace("-", "_") for flag in node_config.FLAGS}
    assert set(environ) - known == {"QUORUMKV_LOG_DIR"}, set(environ) - known
    config = node_config.parse([], environ)
    assert config.name == "node1"
    assert config.gateway_count() == int(environ["QUORUMKV_GATEWAYS"])
    assert config.zmq_url() == ("10.0.0.1", 2382)
    assert len(config.cluster_members()) == 3


def test_supervisord_conf_needs_every_setting(tmp_path):
    # A node without QUORUMKV_GATEWAYS or QUORUMKV_LOG_DIR must not half-start.
    supervisord = Supervisord(tmp_path)
    env = supervisord.environment()
    del env["QUORUMKV_GATEWAYS"]
    result = subprocess.run([sys.executable, "-m", "supervisor.supervisord", "-n", "-c", supervisord.config_path],
                            env=env, capture_output=True, text=True, timeout=60)
    shutil.rmtree(supervisord.socket_dir, ignore_errors=True)
    assert result.returncode != 0
    assert "ENV_QUORUMKV_GATEWAYS" in result.stdout + result.stderr, result.stdout + result.stderr
