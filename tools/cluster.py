"""`python -m tools.cluster start`: a local quorumkv cluster with one command.

    python -m tools.cluster start                 # 3 members, a new directory under /tmp
    python -m tools.cluster start --size 5 --dir ./dev-cluster

Ports (peer, client, ZeroMQ) are free loopback ports chosen for you; each
member gets its data dir `D/<name>.qkv` and its log `D/<name>.log`. The
ports are kept in `D/cluster.json`, so `start` on the same directory again
brings the same cluster back (a member that has a data dir rejoins with it;
as in etcd, its --initial-cluster flags are then ignored). The tool prints
each member's endpoints and quorumctl commands ready to paste, then waits:
Ctrl-C (SIGINT) or SIGTERM stops every member (SIGTERM, then SIGKILL of a
member that does not stop). A member whose process group exits on its own
is reported.

Run it from a checkout of the repository: it starts members with the tests'
launcher (`tests/conftest.py: Node`, one copy of that logic, as tools/load.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time

CLUSTER_FILE = "cluster.json"
DEFAULT_SIZE = 3
MAX_SIZE = 7
READY_TIMEOUT_S = 60.0
WATCH_INTERVAL_S = 0.5


def make_cluster(directory: str, size: int, *, gateways: int, heartbeat_ms: int, election_ms: int, token: str):
    """The Cluster for `directory`: the ports in its cluster.json when there is one."""
    from tests.cluster_harness import Cluster  # the tests' launcher, one copy of that logic

    path = os.path.join(directory, CLUSTER_FILE)
    saved = None
    if os.path.exists(path):
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
        size, token = len(saved["members"]), saved["token"]
    cluster = Cluster(directory, size, names=tuple(saved["members"]) if saved else None, gateways=gateways,
                      token=token, heartbeat_ms=heartbeat_ms, election_ms=election_ms)
    if saved:
        _pin_ports(cluster, saved)
    else:
        _save(cluster, path)
    return cluster


def _pin_ports(cluster, saved: dict) -> None:
    """Give every member the ports it had the first time (its data dir remembers them)."""
    from actors.config import member_id_for
    from tests.cluster_harness import replace_flag, set_client_ports

    cluster.peer_urls = {name: member["peer_url"] for name, member in saved["members"].items()}
    cluster.initial_cluster = ",".join(f"{name}={url}" for name, url in cluster.peer_urls.items())
    cluster.member_ids = {name: member_id_for((url,), cluster.token) for name, url in cluster.peer_urls.items()}
    cluster.names_by_id = {member_id: name for name, member_id in cluster.member_ids.items()}
    for name, node in cluster.members.items():
        member = saved["members"][name]
        set_client_ports(node, member["client_port"], member["zmq_port"])
        replace_flag(node, "--initial-cluster", cluster.initial_cluster)
        replace_flag(node, "--initial-advertise-peer-urls", member["peer_url"])
        replace_flag(node, "--listen-peer-urls", member["peer_url"])


def _save(cluster, path: str) -> None:
    members = {name: {"peer_url": cluster.peer_urls[name], "client_port": node.client_port,
                      "zmq_port": node.zmq_port} for name, node in cluster.members.items()}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"token": cluster.token, "members": members}, handle, indent=1)


def describe(cluster, directory: str, leader: str | None) -> str:
    endpoints = ",".join(cluster.endpoints.values())
    ctl = f"quorumctl --endpoints {endpoints}"
    lines = [f"quorumkv local cluster: {len(cluster.members)} members, data and logs in {directory}", ""]
    for name, node in cluster.members.items():
        role = "  (leader)" if name == leader else ""
        lines.append(f"  {name}: zmq {node.zmq_endpoint}  peer {cluster.peer_urls[name]}  "
                     f"client http://127.0.0.1:{node.client_port}  log {node.log_path}{role}")
    first = next(iter(cluster.members.values())).zmq_endpoint
    lines += ["", "Try:",
              f"  {ctl} endpoint status -w table",
              f"  quorumctl --endpoints {first} put greeting hello",
              f"  {ctl} get greeting",
              f"  {ctl} endpoint hashkv -w table",
              f"  export QUORUMCTL_ENDPOINTS={endpoints}",
              "", "Ctrl-C stops every member."]
    return "\n".join(lines)


def cmd_start(args: argparse.Namespace) -> int:
    directory = os.path.abspath(args.dir) if args.dir else tempfile.mkdtemp(prefix="quorumkv-cluster-")
    os.makedirs(directory, exist_ok=True)
    cluster = make_cluster(directory, args.size, gateways=args.gateways, heartbeat_ms=args.heartbeat_interval,
                           election_ms=args.election_timeout, token=args.initial_cluster_token)
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame) -> None:
        received.append(signum)
        stop.set()

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"starting {len(cluster.members)} members in {directory} ...", flush=True)
        cluster.start(wait=False)
        leader = _wait_ready(cluster, stop)
        if leader is None:
            return 1 if not received else 0
        print(describe(cluster, directory, leader), flush=True)
        print("ready", flush=True)
        _watch(cluster, stop)
        return 0
    finally:
        print("stopping every member ...", flush=True)
        for name in cluster.names:
            code = cluster.stop_member(name)
            print(f"  {name}: stopped" + ("" if code in (0, None) else f" (exit {code})"), flush=True)
        cluster.heal()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _wait_ready(cluster, stop: threading.Event) -> str | None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not stop.is_set() and time.monotonic() < deadline:
        for name, node in cluster.members.items():
            if not cluster.is_running(name):
                print(f"member {name} exited during start-up; its log ({node.log_path}):\n{node.log_tail(20)}",
                      file=sys.stderr, flush=True)
                return None
        leader = cluster.leader()
        if leader is not None:
            return leader
        stop.wait(WATCH_INTERVAL_S)
    if not stop.is_set():
        print(f"no leader within {READY_TIMEOUT_S:.0f}s; logs in {cluster.base_dir}", file=sys.stderr, flush=True)
    return None


def _watch(cluster, stop: threading.Event) -> None:
    """Until a signal: report a member whose process group exits on its own."""
    reported: set[str] = set()
    while not stop.wait(WATCH_INTERVAL_S):  # the one unbounded loop: until Ctrl-C / SIGTERM
        for name, node in cluster.members.items():
            if name not in reported and not cluster.is_running(name):
                reported.add(name)
                print(f"member {name} exited (code {node.process.returncode}); log: {node.log_path}",
                      file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.cluster", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start a local cluster; Ctrl-C stops it")
    start.add_argument("--size", type=int, default=DEFAULT_SIZE, help="members (default 3; odd, at most 7)")
    start.add_argument("--dir", help="data dirs, logs and cluster.json (default: a new directory under /tmp)")
    start.add_argument("--gateways", type=int, default=1, help="gateway processes per member (default 1)")
    start.add_argument("--heartbeat-interval", type=int, default=100, help="ms (etcd's default 100)")
    start.add_argument("--election-timeout", type=int, default=1000, help="ms (etcd's default 1000)")
    start.add_argument("--initial-cluster-token", default="quorumkv-local-cluster")
    args = parser.parse_args(argv)
    if not 1 <= args.size <= MAX_SIZE:
        parser.error(f"--size must be 1..{MAX_SIZE}")
    if args.gateways < 1:
        parser.error("--gateways must be at least 1")
    if args.election_timeout < 5 * args.heartbeat_interval:
        parser.error("--election-timeout should be at least 5 x --heartbeat-interval")
    return cmd_start(args)


if __name__ == "__main__":
    sys.exit(main())
