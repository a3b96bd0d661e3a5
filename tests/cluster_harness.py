"""Real-process clusters under a nemesis, with every client call recorded and checked.

How this works:

- `Cluster`: N members (3 or 5) on free loopback ports, each a
  `tests.conftest.Node` started with etcd's cluster flags. A member can be
  stopped (SIGTERM), killed (SIGKILL of its whole process group), restarted
  with the same command line (it reuses its data dir and rejoins), paused and
  resumed (SIGSTOP/SIGCONT of its process group), and cut off from peers
  through the peer transport's fault hook (`<data-dir>/peer-faults`, see
  actors/peer.py). Membership changes are mirrored here: a member added
  (`add_member_node`: a new name, data dir and peer URL, started with
  --initial-cluster-state existing), promoted, or removed (`forget_member`:
  kept in `removed` to check it stopped by itself). `close()` kills
  everything, also after a failure.
- `Workload`: client threads doing linearizable gets, puts and
  compare-and-swap txns with unique values on a few keys, each call through
  a voter picked at random (`set_endpoints` re-points them when the
  membership changes), recording start, end and outcome of every call
  (a timeout, or any error of a write, is "unknown": the write may still
  land) as `tools.linearizability.Op`s.
- `Nemesis`: a seeded, bounded schedule of faults (kill -9 + restart,
  pause/resume, isolate/partition + heal, membership changes from
  MEMBER_PLAN), one step at a time, each touching at most a minority of the
  voters, the leader often.
- `WatchRecorder`: a watch on the workload's keys through each member, from
  revision 1, kept across kills and pauses by protocol.watch's reconnects.
- `run_fault_test`: cluster + workload + watches + nemesis for a duration,
  then heal everything, wait for a leader, read every key through every
  member, and check: the history is linearizable (and its revisions
  consistent), every acknowledged write is in every member's MVCC history at
  its revision, HashKV agrees on all members at one revision, removed
  members stopped by themselves, and every watch delivered every write of
  the keys in revision order with no gap and no repeat (as many events per
  key as its version), the same on every member (a removed member's watch:
  a prefix of the same).

`tools/nemesis.py` runs the same for as long as asked.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import socket
import threading
import time

import zmq

from actors.config import member_id_for
from actors.peer import peer_faults_path
from actors.raft_log import removed_path
from protocol import codec
from protocol.client import Client, Compare, DeadlineExceededError, ops
from protocol.errors import QuorumError
from protocol.watch import watch
from tests.conftest import Node, request_once
from tools import linearizability as lin

TEST_HEARTBEAT_MS = 50
TEST_ELECTION_MS = 500
LEADER_TIMEOUT_S = 30.0
CATCH_UP_TIMEOUT_S = 30.0
POLL_S = 0.05  # polling a real cluster for a state, not synchronising threads
STATUS_TIMEOUT_S = 0.5


_ports_handed_out: set[int] = set()
_port_rng = random.Random()  # seeded from the OS: concurrent test runs pick apart


def pick_ports(count: int) -> list[int]:
    """Free loopback ports OUTSIDE the kernel's ephemeral range. A port from
    bind(0) (conftest's free_port) can be taken by any outgoing connection's
    local port before the member binds it, or while a killed member is down
    (clients reconnect every 100 ms, each time from a new ephemeral port)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as handle:
            low, high = (int(part) for part in handle.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    candidates = range(10000, low) if low - 10000 >= 2000 else range(high + 1, 65536)
    ports: list[int] = []
    for _attempt in range(100 * count):
        port = _port_rng.choice(candidates)
        if port in _ports_handed_out or port in ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            _ports_handed_out.update(ports)
            return ports
    raise RuntimeError(f"could not find {count} free ports in {candidates}")


def set_client_ports(node: Node, client_port: int, zmq_port: int) -> None:
    """Give a (not yet started) Node other client and ZeroMQ ports than it picked."""
    node.client_port, node.zmq_port = client_port, zmq_port
    node.zmq_endpoint = f"127.0.0.1:{zmq_port}"
    replace_flag(node, "--listen-client-urls", f"http://127.0.0.1:{client_port}")
    replace_flag(node, "--listen-zmq-urls", f"tcp://127.0.0.1:{zmq_port}")


def replace_flag(node: Node, flag: str, value: str) -> None:
    """Every occurrence of `flag` in the node's command line gets `value`."""
    assert flag in node.args, flag
    for index, arg in enumerate(node.args):
        if arg == flag:
            node.args[index + 1] = value


class Cluster:
    """N quorumkv members on loopback, started with etcd's cluster flags."""

    def __init__(self, base_dir: str, size: int = 3, *, names: tuple[str, ...] | None = None, gateways: int = 1,
                 token: str = "quorumkv-test-cluster", heartbeat_ms: int = TEST_HEARTBEAT_MS,
                 election_ms: int = TEST_ELECTION_MS, extra_args: tuple = ()):
        names = tuple(names or (f"n{index + 1}" for index in range(size)))
        assert len(names) >= 1 and len(set(names)) == len(names)
        os.makedirs(base_dir, exist_ok=True)
        self.base_dir = base_dir
        self.token = token
        self.gateways = gateways
        self.member_args = ("--heartbeat-interval", str(heartbeat_ms), "--election-timeout", str(election_ms),
                            *extra_args)
        ports = iter(pick_ports(3 * len(names)))
        self.peer_urls = {name: f"http://127.0.0.1:{next(ports)}" for name in names}
        self.initial_cluster = ",".join(f"{name}={url}" for name, url in self.peer_urls.items())
        self.members: dict[str, Node] = {}
        for name, peer_url in self.peer_urls.items():
            args = ("--name", name, "--initial-cluster", self.initial_cluster, "--initial-cluster-state", "new",
                    "--initial-cluster-token", token, "--initial-advertise-peer-urls", peer_url,
                    "--listen-peer-urls", peer_url, "--heartbeat-interval", str(heartbeat_ms),
                    "--election-timeout", str(election_ms), *extra_args)
            node = Node(os.path.join(base_dir, f"{name}.qkv"), os.path.join(base_dir, f"{name}.log"), gateways, args)
            set_client_ports(node, next(ports), next(ports))
            self.members[name] = node
        self.member_ids = {name: member_id_for((url,), token) for name, url in self.peer_urls.items()}
        self.names_by_id = {member_id: name for name, member_id in self.member_ids.items()}
        self.paused: set[str] = set()
        # Membership changes (add_member_node, forget_member): members added as
        # learners and not promoted yet; members removed (their nodes kept to
        # check that they stopped by themselves, and to clean up).
        self.learners: set[str] = set()
        self.removed: dict[str, Node] = {}
        self.removed_ids: dict[str, int] = {}
        self._next_member_number = len(names) + 1

    # ---- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def names(self) -> list[str]:
        return list(self.members)

    @property
    def endpoints(self) -> dict[str, str]:
        """name -> host:port of its ZeroMQ client port."""
        return {name: node.zmq_endpoint for name, node in self.members.items()}

    @property
    def voters(self) -> list[str]:
        return [name for name in self.members if name not in self.learners]

    @property
    def voter_endpoints(self) -> dict[str, str]:
        """The endpoints clients may use: a learner refuses linearizable requests."""
        return {name: self.members[name].zmq_endpoint for name in self.voters}

    def start(self, wait: bool = True, timeout_s: float = LEADER_TIMEOUT_S) -> "Cluster":
        for node in self.members.values():
            node.start(wait=False)
        if wait:
            try:
                for node in self.members.values():
                    node.wait_ready(timeout_s)
                self.wait_for_leader(timeout_s)
            except BaseException:
                self.close()
                raise
        return self

    def close(self) -> None:
        """Kill every member (paused ones too, and removed ones still running) and remove the fault files."""
        for name, node in [*self.members.items(), *self.removed.items()]:
            if node.process is not None:
                node.kill()
            self.paused.discard(name)
        self.heal()

    # ---- membership (the requests themselves go through `request`) ------------------

    def new_member_name(self) -> str:
        """A name never used in this cluster (a re-added member is a new member)."""
        while True:
            name = f"n{self._next_member_number}"
            self._next_member_number += 1
            if name not in self.members and name not in self.removed:
                return name

    @staticmethod
    def new_peer_url() -> str:
        """A peer URL on a fresh port. Member IDs derive from the peer URLs and the
        token, so re-adding a removed member's URL would give back its (removed) ID."""
        (port,) = pick_ports(1)
        return f"http://127.0.0.1:{port}"

    def add_member_node(self, name: str, peer_url: str, *, learner: bool) -> Node:
        """The Node for a member just added with `member_add` (not started): an empty
        data dir, --initial-cluster-state existing, the current members plus itself
        as its initial cluster (as etcdctl's member add prints)."""
        assert name not in self.members and name not in self.removed, name
        self.peer_urls[name] = peer_url
        initial_cluster = ",".join(f"{member}={self.peer_urls[member]}" for member in [*self.members, name])
        args = ("--name", name, "--initial-cluster", initial_cluster, "--initial-cluster-state", "existing",
                "--initial-cluster-token", self.token, "--initial-advertise-peer-urls", peer_url,
                "--listen-peer-urls", peer_url, *self.member_args)
        node = Node(os.path.join(self.base_dir, f"{name}.qkv"), os.path.join(self.base_dir, f"{name}.log"),
                    self.gateways, args)
        client_port, zmq_port = pick_ports(2)
        set_client_ports(node, client_port, zmq_port)
        member_id = member_id_for((peer_url,), self.token)
        self.members[name] = node
        self.member_ids[name] = member_id
        self.names_by_id[member_id] = name
        if learner:
            self.learners.add(name)
        return node

    def promoted(self, name: str) -> None:
        self.learners.discard(name)

    def forget_member(self, name: str) -> Node:
        """`name` was removed from the cluster: it is no longer one of `names`."""
        node = self.members.pop(name)
        self.removed[name] = node
        self.removed_ids[name] = self.member_ids.pop(name)
        self.names_by_id.pop(self.removed_ids[name], None)
        self.peer_urls.pop(name, None)
        self.learners.discard(name)
        self.paused.discard(name)
        return node

    def is_running(self, name: str) -> bool:
        process = self.members[name].process
        return process is not None and process.poll() is None

    def start_member(self, name: str, wait: bool = False) -> None:
        node = self.members[name]
        assert node.process is None, f"{name} is already running"
        node.start(wait=wait)

    def stop_member(self, name: str) -> int | None:
        self.resume_member(name)
        return self.members[name].stop()

    def kill_member(self, name: str) -> None:
        """SIGKILL of the member's whole process group (supervisor and actors)."""
        self.members[name].kill()
        self.paused.discard(name)

    def restart_member(self, name: str, wait: bool = False) -> None:
        if self.members[name].process is not None:
            self.kill_member(name)
        self.start_member(name, wait=wait)

    def pause_member(self, name: str) -> None:
        """SIGSTOP of the whole process group: alive, holding its sockets, silent."""
        process = self.members[name].process
        assert process is not None, f"{name} is not running"
        os.killpg(process.pid, signal.SIGSTOP)
        self.paused.add(name)

    def resume_member(self, name: str) -> None:
        process = self.members[name].process
        if name in self.paused and process is not None:
            try:
                os.killpg(process.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.paused.discard(name)

    # ---- network faults (the peer transport's hook) ------------------------------

    def partition(self, *groups) -> None:
        """Members talk only within their group; a member in no group is alone."""
        group_of = {}
        for index, group in enumerate(groups):
            for name in group:
                assert name in self.members and name not in group_of, name
                group_of[name] = index
        for name in self.members:
            cut = [other for other in self.members
                   if other != name and (name not in group_of or group_of.get(other) != group_of[name])]
            self._write_faults(name, cut)

    def isolate(self, *names: str) -> None:
        """Cut each of `names` off from every other member."""
        others = [name for name in self.members if name not in names]
        self.partition(others)

    def heal(self) -> None:
        for node in self.members.values():
            try:
                os.remove(peer_faults_path(node.data_dir))
            except FileNotFoundError:
                pass

    def _write_faults(self, name: str, cut: list[str]) -> None:
        path = peer_faults_path(self.members[name].data_dir)
        if not cut:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as handle:
            # Member ids, not names: a member added later may not know every name yet.
            handle.write(" ".join(f"{self.member_ids[other]:x}" for other in cut) + "\n")
        os.replace(path + ".tmp", path)  # a new mtime: the member re-reads it

    # ---- state -------------------------------------------------------------------

    def request(self, name: str, op: str, body: dict, timeout_s: float = 2.0) -> tuple[dict | None, str | None]:
        """One raw request to a member: (response, None) or (None, error code or "timeout")."""
        answer = request_once(self.members[name].zmq_endpoint, op, body, timeout_s)
        if answer is None:
            return None, "timeout"
        status, response = answer
        return (response, None) if status == codec.STATUS_OK else (None, response.get("code", "error"))

    def status(self, name: str) -> dict | None:
        if not self.is_running(name) or name in self.paused:
            return None
        response, _error = self.request(name, "status", {}, STATUS_TIMEOUT_S)
        return response

    def leader(self, among=None) -> str | None:
        """The member every member in `among` (default: all) names as leader, or None."""
        leaders = set()
        for name in among or self.names:
            status = self.status(name)
            if status is None:
                return None
            leaders.add(status["leader"])
        if len(leaders) != 1:
            return None
        return self.names_by_id.get(leaders.pop())

    def claimed_leader(self) -> str | None:
        """A member that says it is the leader (during a partition: maybe a stale one)."""
        for name in self.names:
            status = self.status(name)
            if status is not None and status["leader"] == self.member_ids[name]:
                return name
        return None

    def wait_for_leader(self, timeout_s: float = LEADER_TIMEOUT_S, among=None) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            leader = self.leader(among)
            if leader is not None:
                return leader
            time.sleep(POLL_S)
        raise AssertionError(f"no leader agreed by {among or self.names} within {timeout_s}s; "
                             f"statuses: {self._statuses()}")

    def revision(self, name: str) -> int | None:
        status = self.status(name)
        return None if status is None else status["header"]["revision"]

    def wait_for_revision(self, revision: int, timeout_s: float = CATCH_UP_TIMEOUT_S) -> None:
        """Until every member has applied at least `revision`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all((self.revision(name) or 0) >= revision for name in self.names):
                return
            time.sleep(POLL_S)
        raise AssertionError(f"members not at revision {revision} within {timeout_s}s: {self._statuses()}")

    def _statuses(self) -> dict:
        out = {}
        for name in self.names:
            status = self.status(name)
            out[name] = None if status is None else {
                "leader": self.names_by_id.get(status["leader"], status["leader"]),
                "term": status["raft_term"], "revision": status["header"]["revision"]}
        return out

    def log_tails(self, lines: int = 15) -> str:
        return "\n".join(f"--- {name}{' (removed)' if name in self.removed else ''} ---\n{node.log_tail(lines)}"
                         for name, node in [*self.members.items(), *self.removed.items()])


# ---- the client workload -------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkloadConfig:
    clients: int = 6
    keys: int = 3
    timeout_s: float = 1.0
    connect_timeout_s: float = 0.3
    read_share: float = 0.4
    put_share: float = 0.3  # the rest: CAS
    key_prefix: str = "lin/"
    # A negative control: serializable reads are member-local and may be stale,
    # so under partitions the checker should find the history not linearizable.
    serializable_reads: bool = False


class Workload:
    """Client threads recording every call for the checker."""

    def __init__(self, endpoints: dict[str, str], config: WorkloadConfig, seed: int):
        assert config.clients >= 1 and config.keys >= 1
        self.endpoints = dict(endpoints)
        self.endpoints_version = 0
        self.config = config
        self.seed = seed
        self.keys = [f"{config.key_prefix}{index}".encode() for index in range(config.keys)]
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.history: list[lin.Op] = []
        self.errors: list[str] = []
        self.latest: dict[bytes, bytes | None] = {key: None for key in self.keys}  # a guess for CAS
        self.threads = [threading.Thread(target=self._run, args=(index,), name=f"client-{index}", daemon=True)
                        for index in range(config.clients)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=timeout_s)
        alive = [thread.name for thread in self.threads if thread.is_alive()]
        assert not alive, f"client threads did not stop: {alive}"

    def set_endpoints(self, endpoints: dict[str, str]) -> None:
        """Re-point the clients (the membership changed): each thread's next call goes
        through one of these members (a call in flight finishes where it is)."""
        with self.lock:
            self.endpoints = dict(endpoints)
            self.endpoints_version += 1

    def counts(self) -> dict[str, int]:
        with self.lock:
            out: dict[str, int] = {}
            for operation in self.history:
                name = f"{operation.op} {operation.outcome}"
                out[name] = out.get(name, 0) + 1
            return dict(sorted(out.items()))

    def _run(self, index: int) -> None:
        rng = random.Random(self.seed * 1009 + index)
        context = zmq.Context.instance()
        clients: dict[str, Client] = {}
        version = None
        sequence = 0
        try:
            while not self.stopping.is_set():
                with self.lock:
                    endpoints = dict(self.endpoints) if version != self.endpoints_version else None
                    version = self.endpoints_version
                if endpoints is not None:
                    for name in [name for name in clients if name not in endpoints]:
                        clients.pop(name).close()
                    for name, endpoint in endpoints.items():
                        if name not in clients:
                            clients[name] = Client([endpoint], timeout_s=self.config.timeout_s,
                                                   discover_gateways=False,
                                                   connect_timeout_s=self.config.connect_timeout_s,
                                                   read_retries=0, context=context)
                sequence += 1
                name = rng.choice(sorted(clients))
                operation = self._call(clients[name], rng, f"c{index}", f"c{index}-{sequence}".encode())
                with self.lock:
                    self.history.append(operation)
        except Exception as error:  # a harness or client bug: report it, never hang
            with self.lock:
                self.errors.append(f"client {index}: {type(error).__name__}: {error}")
        finally:
            for client in clients.values():
                client.close()

    def _call(self, client: Client, rng: random.Random, client_name: str, unique: bytes) -> lin.Op:
        key = rng.choice(self.keys)
        roll = rng.random()
        if roll < self.config.read_share:
            kind, request = lin.GET, ops.get(key, serializable=self.config.serializable_reads)
            fields = {}
        elif roll < self.config.read_share + self.config.put_share:
            kind, request = lin.PUT, ops.put(key, unique)
            fields = {"value": unique}
        else:
            expected = self.latest[key]
            compare = Compare.version(key) == 0 if expected is None else Compare.value(key) == expected
            kind, request = lin.CAS, ops.txn([compare], [ops.put(key, unique)], [ops.get(key)])
            fields = {"expected": expected, "new": unique}
        start_ns = time.monotonic_ns()
        try:
            response = client.request(*request)
        except QuorumError as error:
            end_ns = time.monotonic_ns()
            return lin.Op(client=client_name, op=kind, key=key, start_ns=start_ns, end_ns=end_ns,
                          outcome=_outcome_of_error(kind, error), **fields)
        end_ns = time.monotonic_ns()
        revision = response["header"]["revision"]
        if kind == lin.GET:
            kvs = response.get("kvs") or []
            value = kvs[0]["value"] if kvs else None
            self.latest[key] = value
            fields.update(result=value, mod_revision=kvs[0]["mod_revision"] if kvs else None)
        elif kind == lin.PUT:
            self.latest[key] = unique
        elif response["succeeded"]:
            self.latest[key] = unique
            fields["result"] = True
        else:
            kvs = response["responses"][0]["response_range"].get("kvs") or []
            current = kvs[0]["value"] if kvs else None
            self.latest[key] = current
            fields.update(result=False, current=current)
        return lin.Op(client=client_name, op=kind, key=key, start_ns=start_ns, end_ns=end_ns, outcome=lin.OK,
                      revision=revision, **fields)


def _outcome_of_error(kind: str, error: QuorumError) -> str:
    """A read that failed had no effect. A write that failed may still land (the
    proposal may be in a log that commits later), unless it was never sent."""
    if isinstance(error, DeadlineExceededError) and "no gateway reachable" in error.message:
        return lin.FAIL
    if kind == lin.GET:
        return lin.UNKNOWN if isinstance(error, DeadlineExceededError) else lin.FAIL
    return lin.UNKNOWN


class WatchRecorder(threading.Thread):
    """A watch on the workload's keys through one member, from revision 1, kept
    across the member's kills and pauses by protocol.watch's reconnects."""

    FINAL_PROGRESS_INTERVAL_S = 1.0

    def __init__(self, name: str, endpoint: str, prefix: bytes, progress_s: float | None = None):
        """progress_s: ask for progress notifications this often during the run (as a
        client waiting for "synced" does); None: only at the end, to learn "all up to R"."""
        super().__init__(name=f"watch-{name}", daemon=True)
        self.progress_s = progress_s
        self.member = name
        self.endpoint = endpoint
        self.prefix = prefix
        self.events: list[tuple[int, bytes, bytes]] = []  # (mod_revision, key, value), as delivered
        self.delivered = 0  # every event up to this revision was delivered
        self.errors: list[str] = []
        self.stopping = threading.Event()
        self.finishing = threading.Event()

    def run(self) -> None:
        try:
            watcher = watch([self.endpoint], self.prefix, prefix=True, start_revision=1, timeout_s=2.0)
        except Exception as error:
            self.errors.append(f"watch through {self.member}: {type(error).__name__}: {error}")
            return
        try:
            last_progress = time.monotonic()
            while not self.stopping.is_set():
                response = watcher.get(timeout_s=0.2)
                for event in (response or {}).get("events") or []:
                    kv = event["kv"]
                    self.events.append((kv["mod_revision"], kv["key"], kv.get("value", b"")))
                self.delivered = watcher.revision
                interval_s = self.FINAL_PROGRESS_INTERVAL_S if self.finishing.is_set() else self.progress_s
                if interval_s is not None and time.monotonic() - last_progress >= interval_s:
                    watcher.request_progress()
                    last_progress = time.monotonic()
        except Exception as error:
            self.errors.append(f"watch through {self.member}: {type(error).__name__}: {error}")
        finally:
            watcher.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)


def watch_problems(cluster: Cluster, recorders: list[WatchRecorder], history: list[lin.Op],
                   keys: list[bytes], timeout_s: float = CATCH_UP_TIMEOUT_S,
                   departed: list[WatchRecorder] = ()) -> list[str]:
    """Every watch delivered, in revision order without a repeat, exactly the writes of
    the watched keys (as many per key as its version says), the acknowledged ones
    included, and every watch the same. A watch through a member since removed
    (`departed`, stopped before its removal) delivered a prefix of the same."""
    leader = cluster.wait_for_leader()
    revision = cluster.revision(leader)
    for recorder in recorders:
        recorder.finishing.set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(r.delivered < revision and r.is_alive() for r in recorders):
        time.sleep(POLL_S)
    for recorder in recorders:
        recorder.stop()
    problems = [error for recorder in recorders for error in recorder.errors]
    versions = {}
    for key in keys:
        response, error = cluster.request(leader, "range", {"key": key, "revision": revision}, 5.0)
        if error:
            return problems + [f"reading {key!r} at revision {revision}: {error}"]
        versions[key] = response["kvs"][0]["version"] if response["kvs"] else 0
    acked = {(o.revision, o.key, o.written) for o in history if o.outcome == lin.OK and o.revision is not None
             and (o.op == lin.PUT or (o.op == lin.CAS and o.result))}
    reference = None
    for recorder in recorders:
        if recorder.delivered < revision:
            problems.append(f"watch through {recorder.member} delivered only up to {recorder.delivered} of {revision}")
            continue
        events = [event for event in recorder.events if event[0] <= revision]
        revisions = [event[0] for event in events]
        if any(later <= earlier for earlier, later in zip(revisions, revisions[1:])):
            problems.append(f"watch through {recorder.member}: events out of order or repeated")
        counts = {key: sum(1 for event in events if event[1] == key) for key in keys}
        if counts != versions:
            problems.append(f"watch through {recorder.member}: events per key {counts}, versions {versions} (a gap)")
        missing = acked - set(events)
        if missing:
            problems.append(f"watch through {recorder.member}: {len(missing)} acknowledged writes never seen, "
                            f"e.g. {sorted(missing)[:3]}")
        if reference is None:
            reference = events
        elif events != reference:
            problems.append(f"watch through {recorder.member} differs from through {recorders[0].member}")
    for recorder in departed:
        problems += [error for error in recorder.errors]
        events = [event for event in recorder.events if event[0] <= recorder.delivered]
        if reference is not None and events != reference[:len(events)]:
            problems.append(f"watch through {recorder.member} (since removed) is not a prefix of the others'")
    return problems


# ---- the nemesis ---------------------------------------------------------------------

# Each phase of a membership step (a request answered, perhaps after retries;
# the new member started and caught up; it says it is a voter) must be done
# within this. A step runs alone, on a healed cluster; a new member's start
# takes 5-25 s on a loaded 2-core machine.
MEMBER_PHASE_TIMEOUT_S = 60.0
MEMBER_STEP_PHASES = 5
MEMBER_REQUEST_TIMEOUT_S = 5.0
MEMBER_RETRY_S = 0.2  # between asking again (for a leader, a learner catching up)
REMOVED_EXIT_TIMEOUT_S = 30.0
# Answers after which a membership request is asked again: no leader (yet), a
# change the cluster is not ready for yet, or no answer (the change may still
# apply: asking again is safe, the "already done" answer says so).
MEMBER_RETRY_CODES = frozenset({"timeout", "Timeout", "NoLeader", "NotLeader", "LeaderChanged", "Stopped",
                                "TooManyRequests", "MemberNotEnoughStarted", "LearnerNotReady",
                                "LeaderTransferTimeout"})
# The membership steps, in turn: grow and shrink between size and size + 2
# voters, by a learner then its promotion or by a voter at once, remove a voter
# (the leader half the time), and move the leadership to another voter. A step
# that would leave the bounds does the opposite change instead.
MEMBER_PLAN = ("add_learner", "move_leader", "remove", "add_voter", "add_learner", "remove", "remove")
MEMBER_EXTRA_VOTERS = 2
MAX_RUN_EXTENSION = 3


class MembershipStepFailed(Exception):
    pass


@dataclasses.dataclass(frozen=True, kw_only=True)
class NemesisConfig:
    kinds: tuple[str, ...] = ("kill", "pause", "isolate", "partition")
    fault_s: tuple[float, float] = (0.5, 2.5)  # how long a fault lasts
    calm_s: tuple[float, float] = (0.5, 2.0)  # between faults
    leader_bias: float = 0.5  # chance a fault targets the leader
    max_steps: int = 1000
    # With "member" among the kinds: the chance a step is a membership change
    # (None: as likely as any other kind).
    member_share: float | None = None
    # The run goes on past its duration (up to MAX_RUN_EXTENSION times it) until
    # this many membership steps are done: a loaded machine makes them slow.
    min_member_steps: int = 0


class Nemesis(threading.Thread):
    """One fault at a time, on at most a minority of the voters, from a seeded
    schedule: the kind, duration and calm before each step are drawn from the
    seed alone; the targets from the seed and the step number (who leads at
    the time decides whether "the leader" is one of them); membership steps
    follow MEMBER_PLAN. on_join(name) is called when a new member serves as a
    voter, on_leave(name) just before a member is removed."""

    KINDS = ("kill", "pause", "isolate", "partition", "member")

    def __init__(self, cluster: Cluster, config: NemesisConfig, seed: int, log=print, *,
                 on_join=None, on_leave=None):
        super().__init__(name="nemesis", daemon=True)
        assert set(config.kinds) <= set(self.KINDS) and config.kinds, config.kinds
        self.cluster = cluster
        self.config = config
        self.seed = seed
        self.rng = random.Random(seed)
        self.log = log
        self.on_join = on_join or (lambda name: None)
        self.on_leave = on_leave or (lambda name: None)
        self.voter_bounds = (len(cluster.voters), len(cluster.voters) + MEMBER_EXTRA_VOTERS)
        self.member_steps = 0  # started
        self.member_steps_done = 0
        self.stopping = threading.Event()
        self.events: list[str] = []
        self.errors: list[str] = []
        self.started_ns = time.monotonic_ns()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=MEMBER_STEP_PHASES * MEMBER_PHASE_TIMEOUT_S)  # a membership step is finished, not abandoned
        assert not self.is_alive(), "the nemesis did not stop"

    def _note(self, text: str) -> None:
        line = f"{(time.monotonic_ns() - self.started_ns) / 1e9:7.2f}s {text}"
        self.events.append(line)
        self.log(f"nemesis: {line}")

    def run(self) -> None:
        try:
            for step in range(self.config.max_steps):
                calm_s = self.rng.uniform(*self.config.calm_s)
                kind = self._kind()
                duration_s = self.rng.uniform(*self.config.fault_s)
                if self.stopping.wait(calm_s):
                    return
                self._step(kind, duration_s, random.Random(self.seed * 1_000_003 + step))
        except Exception as error:  # never leave a fault behind silently
            self.errors.append(f"{type(error).__name__}: {error}")
            self._note(f"nemesis error: {type(error).__name__}: {error}")
        finally:
            self.heal_all()

    def _kind(self) -> str:
        """The same number of draws whatever the outcome: the schedule is the seed's."""
        roll = self.rng.random()
        faults = [kind for kind in self.config.kinds if kind != "member"]
        kind = self.rng.choice(faults) if faults else "member"
        if "member" in self.config.kinds:
            share = self.config.member_share
            if share is None:
                share = 1 / len(self.config.kinds)
            if not faults or roll < share:
                kind = "member"
        return kind

    def _targets(self, rng: random.Random) -> list[str]:
        names = self.cluster.names
        minority = max(1, (len(self.cluster.voters) - 1) // 2)
        count = rng.randint(1, minority)
        targets = []
        leader = self.cluster.claimed_leader() if rng.random() < self.config.leader_bias else None
        if leader is not None:
            targets.append(leader)
        others = [name for name in names if name not in targets]
        rng.shuffle(others)
        return targets + others[: count - len(targets)]

    def _step(self, kind: str, duration_s: float, rng: random.Random) -> None:
        if kind == "member":
            self._member_step(rng)
            return
        targets = self._targets(rng)
        if kind == "kill":
            self._note(f"kill -9 {targets}")
            for name in targets:
                self.cluster.kill_member(name)
            self.stopping.wait(duration_s)
            self._note(f"restart {targets}")
            for name in targets:
                self.cluster.start_member(name)
        elif kind == "pause":
            self._note(f"SIGSTOP {targets}")
            for name in targets:
                self.cluster.pause_member(name)
            self.stopping.wait(duration_s)
            self._note(f"SIGCONT {targets}")
            for name in targets:
                self.cluster.resume_member(name)
        elif kind == "isolate":
            self._note(f"isolate {targets}")
            self.cluster.isolate(*targets)
            self.stopping.wait(duration_s)
            self._note("heal")
            self.cluster.heal()
        else:
            majority = [name for name in self.cluster.names if name not in targets]
            self._note(f"partition {targets} | {majority}")
            self.cluster.partition(targets, majority)
            self.stopping.wait(duration_s)
            self._note("heal")
            self.cluster.heal()

    # ---- membership changes ------------------------------------------------------------

    def _member_step(self, rng: random.Random) -> None:
        action = MEMBER_PLAN[self.member_steps % len(MEMBER_PLAN)]
        self.member_steps += 1
        low, high = self.voter_bounds
        voters = len(self.cluster.voters)
        if action.startswith("add") and voters >= high:
            action = "remove"
        elif action == "remove" and voters <= low:
            action = "add_learner"
        try:
            self.cluster.wait_for_leader(MEMBER_PHASE_TIMEOUT_S)
            if action == "move_leader":
                self._move_leader(rng)
            elif action == "remove":
                self._remove_voter(rng)
            else:
                self._add_member(action == "add_learner")
        except (AssertionError, MembershipStepFailed) as error:
            raise MembershipStepFailed(f"{action}: {error}") from None
        self.member_steps_done += 1

    def _ask(self, op: str, body: dict, *, done=(), avoid=()) -> tuple[dict | None, str]:
        """A membership request through the voters in turn (never `avoid`) until it is
        answered, or answered "already done" (an earlier try applied): (response or
        None, what was answered, with the retries before)."""
        retried: dict[str, int] = {}
        deadline = time.monotonic() + MEMBER_PHASE_TIMEOUT_S
        while True:
            via = [name for name in self.cluster.voters if name not in avoid and self.cluster.is_running(name)]
            if not via:
                raise MembershipStepFailed(f"{op}: no member to ask")
            name = via[sum(retried.values()) % len(via)]
            started = time.monotonic()
            response, error = self.cluster.request(name, op, body, MEMBER_REQUEST_TIMEOUT_S)
            answer = error or "ok"
            if retried:
                answer += f" after {', '.join(f'{code} x{count}' for code, count in retried.items())}"
            if error is None:
                return response, f"{answer}, {time.monotonic() - started:.2f}s"
            if error in done:
                return None, answer
            if error not in MEMBER_RETRY_CODES or time.monotonic() > deadline:
                raise MembershipStepFailed(f"{op} {body} through {name}: {answer}")
            retried[error] = retried.get(error, 0) + 1
            time.sleep(MEMBER_RETRY_S)  # a leader to be elected, a learner to catch up: polled, with a deadline

    def _wait(self, predicate, what: str) -> None:
        deadline = time.monotonic() + MEMBER_PHASE_TIMEOUT_S
        while not predicate():
            if time.monotonic() > deadline:
                raise MembershipStepFailed(f"not within {MEMBER_PHASE_TIMEOUT_S}s: {what}; "
                                           f"{self.cluster._statuses()}")
            time.sleep(POLL_S)

    def _leader_revision(self, among: list[str]) -> int:
        revision = None

        def answered() -> bool:
            nonlocal revision
            revision = self.cluster.revision(self.cluster.wait_for_leader(among=among))
            return revision is not None

        self._wait(answered, "the leader's revision")
        return revision

    def _add_member(self, learner: bool) -> None:
        name = self.cluster.new_member_name()
        peer_url = self.cluster.new_peer_url()
        member_id = member_id_for((peer_url,), self.cluster.token)
        self._note(f"member add {name} ({member_id:x}, {peer_url}) as {'learner' if learner else 'voter'}")
        _response, answer = self._ask("member_add", {"peerURLs": [peer_url], "isLearner": learner},
                                      done=("MemberExist",))
        node = self.cluster.add_member_node(name, peer_url, learner=learner)
        node.start(wait=False)
        self._note(f"member {name} added ({answer}), started with an empty data dir")
        revision = self._leader_revision(among=[other for other in self.cluster.names if other != name])
        self._wait(lambda: (self.cluster.revision(name) or 0) >= revision,
                   f"{name} caught up to revision {revision}")
        self._note(f"{name} caught up to revision {revision}")
        if learner:
            _response, answer = self._ask("member_promote", {"ID": member_id}, done=("MemberNotLearner",))
            self.cluster.promoted(name)
            self._note(f"member promote {name} ({answer})")
            self._wait(lambda: (self.cluster.status(name) or {}).get("is_learner") is False,
                       f"{name} says it is a voter")
        self.on_join(name)
        self._note(f"voters now {self.cluster.voters}")

    def _remove_voter(self, rng: random.Random) -> None:
        leader = self.cluster.wait_for_leader()
        if rng.random() < self.config.leader_bias:
            victim = leader
        else:
            victim = rng.choice(sorted(name for name in self.cluster.voters if name != leader))
        member_id = self.cluster.member_ids[victim]
        self.on_leave(victim)
        self._note(f"member remove {victim} ({member_id:x}){' (the leader)' if victim == leader else ''}")
        _response, answer = self._ask("member_remove", {"ID": member_id}, done=("MemberNotFound",),
                                      avoid=(victim,))
        node = self.cluster.forget_member(victim)
        self._note(f"member {victim} removed ({answer}); voters now {self.cluster.voters}")
        exit_deadline = time.monotonic() + REMOVED_EXIT_TIMEOUT_S
        while node.process.poll() is None and time.monotonic() < exit_deadline:
            time.sleep(POLL_S)
        status = node.process.poll()
        removed_file = os.path.exists(removed_path(node.data_dir))
        if status != 0 or not removed_file:
            node.kill()
            raise MembershipStepFailed(f"removed member {victim} did not stop by itself within "
                                       f"{REMOVED_EXIT_TIMEOUT_S}s (exit status {status}, removed file "
                                       f"{removed_file}): {node.log_tail(10)}")
        self._note(f"{victim} stopped by itself (exit status 0)")

    def _move_leader(self, rng: random.Random) -> None:
        leader = self.cluster.wait_for_leader()
        target = rng.choice(sorted(name for name in self.cluster.voters if name != leader))
        self._note(f"move-leader {leader} -> {target}")
        deadline = time.monotonic() + MEMBER_PHASE_TIMEOUT_S
        tries = 0
        while True:
            tries += 1
            response, error = self.cluster.request(leader, "move_leader", {"targetID": self.cluster.member_ids[target]},
                                                   MEMBER_REQUEST_TIMEOUT_S)
            if error is None or error not in MEMBER_RETRY_CODES:
                break
            if time.monotonic() > deadline:
                raise MembershipStepFailed(f"move_leader to {target}: {error} (try {tries})")
            time.sleep(MEMBER_RETRY_S)
            leader = self.cluster.wait_for_leader()
            if leader == target:
                error = None
                break
        if error is not None:
            raise MembershipStepFailed(f"move_leader to {target}: {error}")
        self._note(f"move-leader done ({tries} tries); leader now {self.cluster.wait_for_leader()}")

    def heal_all(self) -> None:
        """Resume the paused, restart the killed, reconnect everyone. A member that exited
        by itself is restarted too, after saying so (and it must not think it was removed)."""
        self.cluster.heal()
        for name in self.cluster.names:
            self.cluster.resume_member(name)
            if not self.cluster.is_running(name):
                node = self.cluster.members[name]
                if node.process is not None:
                    self._note(f"{name} had exited by itself (status {node.process.returncode})")
                    if os.path.exists(removed_path(node.data_dir)):
                        self.errors.append(f"{name}, a member, stopped as removed: {node.log_tail(10)}")
                    node.kill()  # reap it, then restart
                self.cluster.start_member(name)


# ---- the run and its checks ----------------------------------------------------------


@dataclasses.dataclass
class RunReport:
    seed: int
    size: int
    duration_s: float
    counts: dict
    verdict: str
    checker_summary: str
    acked_writes: int
    hash_revision: int
    hashes: dict
    nemesis_events: list[str]
    problems: list[str]
    history_path: str
    check_s: float
    watched_events: int = 0
    members: list[str] = dataclasses.field(default_factory=list)  # at the end (learners marked)
    removed: dict = dataclasses.field(default_factory=dict)  # name -> exit status

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        lines = [f"nemesis run: {self.size} members, seed {self.seed}, {self.duration_s:.1f}s, "
                 f"{len(self.nemesis_events)} nemesis events",
                 f"calls: {self.counts}",
                 f"checker ({self.check_s:.2f}s): {self.checker_summary}",
                 f"acknowledged writes found on every member at their revision: {self.acked_writes}",
                 f"HashKV at revision {self.hash_revision}: {self.hashes}",
                 f"watch events delivered per member (in order, no gap, all acknowledged writes): {self.watched_events}",
                 f"members at the end: {self.members}; removed (exit status): {self.removed}",
                 f"history: {self.history_path}"]
        lines += [f"PROBLEM: {problem}" for problem in self.problems]
        return "\n".join(lines)


def final_reads(cluster: Cluster, keys: list[bytes]) -> list[lin.Op]:
    """A linearizable read of every key through every voter, recorded as history."""
    history = []
    for name in cluster.voters:
        with Client([cluster.endpoints[name]], timeout_s=5.0, discover_gateways=False) as client:
            for key in keys:
                start_ns = time.monotonic_ns()
                response = client.get(key)
                end_ns = time.monotonic_ns()
                kvs = response.get("kvs") or []
                history.append(lin.Op(client=f"final-{name}", op=lin.GET, key=key, start_ns=start_ns, end_ns=end_ns,
                                      outcome=lin.OK, result=kvs[0]["value"] if kvs else None,
                                      mod_revision=kvs[0]["mod_revision"] if kvs else None,
                                      revision=response["header"]["revision"]))
    return history


def missing_acknowledged_writes(cluster: Cluster, history: list[lin.Op]) -> tuple[int, list[str]]:
    """Every ok write must be in every member's MVCC history: a read of its key at its
    revision returns its value with that mod revision."""
    writes = [o for o in history if o.outcome == lin.OK and o.revision is not None
              and (o.op == lin.PUT or (o.op == lin.CAS and o.result))]
    problems = []
    for name in cluster.names:
        with Client([cluster.endpoints[name]], timeout_s=10.0, discover_gateways=False) as client:
            responses = client.request_many([ops.get(o.key, revision=o.revision, serializable=True) for o in writes],
                                            raise_errors=False)
        for write, response in zip(writes, responses):
            if isinstance(response, QuorumError):
                problems.append(f"{name}: reading {write.describe()} at its revision: {response}")
                continue
            kvs = response.get("kvs") or []
            if not kvs or kvs[0]["value"] != write.written or kvs[0]["mod_revision"] != write.revision:
                problems.append(f"{name}: acknowledged write missing: {write.describe()}; found {kvs[:1]}")
    return len(writes), problems


def hashes_agree(cluster: Cluster) -> tuple[int, dict, list[str]]:
    leader = cluster.wait_for_leader()
    revision = cluster.revision(leader)
    cluster.wait_for_revision(revision)
    hashes = {}
    for name in cluster.voters:  # (a learner refuses HashKV)
        response, error = cluster.request(name, "hash_kv", {"revision": revision}, 5.0)
        hashes[name] = error or response["hash"]
    problems = [] if len(set(hashes.values())) == 1 else [f"HashKV differs at revision {revision}: {hashes}"]
    return revision, hashes, problems


def wait_for_write(cluster: Cluster, timeout_s: float) -> float:
    """Seconds until a put succeeds again (through any member)."""
    started = time.monotonic()
    attempt = 0
    while time.monotonic() - started < timeout_s:
        name = cluster.voters[attempt % len(cluster.voters)]
        attempt += 1
        _response, error = cluster.request(name, "put", {"key": b"nemesis/liveness", "value": b"%d" % attempt}, 1.0)
        if error is None:
            return time.monotonic() - started
    raise AssertionError(f"no write succeeded within {timeout_s}s after healing; {cluster._statuses()}")


def run_fault_test(base_dir: str, *, size: int = 3, duration_s: float = 20.0, seed: int = 0,
                   workload: WorkloadConfig = WorkloadConfig(), nemesis: NemesisConfig = NemesisConfig(),
                   max_check_steps: int | None = None, watches: bool = True,
                   watch_progress_s: float | None = None, log=print) -> RunReport:
    """Cluster + clients + nemesis for duration_s, then heal and check everything
    (with `watches`, a watch through every member too; see WatchRecorder)."""
    cluster = Cluster(base_dir, size)
    watchers: list[WatchRecorder] = []
    departed: list[WatchRecorder] = []  # watches through members since removed
    try:
        cluster.start()
        log(f"cluster up: leader {cluster.wait_for_leader()}, members {cluster.endpoints}")
        clients = Workload(cluster.voter_endpoints, workload, seed)

        def joined(name: str) -> None:
            clients.set_endpoints(cluster.voter_endpoints)
            if watches:
                watchers.append(WatchRecorder(name, cluster.endpoints[name], workload.key_prefix.encode(),
                                              watch_progress_s))
                watchers[-1].start()

        def leaving(name: str) -> None:
            clients.set_endpoints({other: endpoint for other, endpoint in cluster.voter_endpoints.items()
                                   if other != name})
            for recorder in [r for r in watchers if r.member == name]:
                recorder.stop()  # while its member still answers
                watchers.remove(recorder)
                departed.append(recorder)

        faults = Nemesis(cluster, nemesis, seed, log, on_join=joined, on_leave=leaving)
        if watches:
            watchers += [WatchRecorder(name, endpoint, workload.key_prefix.encode(), watch_progress_s)
                         for name, endpoint in cluster.endpoints.items()]
        for recorder in watchers:
            recorder.start()
        started = time.monotonic()
        clients.start()
        faults.start()
        try:
            def more() -> bool:
                elapsed = time.monotonic() - started
                return elapsed < duration_s or (faults.member_steps_done < nemesis.min_member_steps
                                                and elapsed < MAX_RUN_EXTENSION * duration_s)

            while more() and not clients.errors and faults.is_alive():
                remaining_s = duration_s - (time.monotonic() - started)
                time.sleep(min(1.0, remaining_s) if remaining_s > 0 else 1.0)
        finally:
            faults.stop()  # heals everything on its way out
            clients.stop()
        elapsed_s = time.monotonic() - started
        problems = list(clients.errors) + [f"nemesis: {error}" for error in faults.errors]
        with open(os.path.join(base_dir, "nemesis.log"), "w", encoding="utf-8") as handle:
            handle.write("\n".join(faults.events) + "\n")
        try:
            leader = cluster.wait_for_leader()
            recovery_s = wait_for_write(cluster, LEADER_TIMEOUT_S)
        except AssertionError:
            log("\n".join(problems) + "\n" + cluster.log_tails())
            raise
        log(f"healed: leader {leader}, a write succeeded {recovery_s:.2f}s after healing")
        history = clients.history + final_reads(cluster, clients.keys)
        history_path = os.path.join(base_dir, "history.jsonl")
        lin.save_history(history_path, history)
        check_started = time.monotonic()
        result = lin.check(history, max_steps=max_check_steps)
        check_s = time.monotonic() - check_started
        if not result.ok:
            problems.append(f"history {result.verdict}:\n{result.summary()}")
        acked, missing = missing_acknowledged_writes(cluster, history)
        problems += missing[:20]
        hash_revision, hashes, hash_problems = hashes_agree(cluster)
        problems += hash_problems
        for name, node in cluster.removed.items():
            if node.process is not None and node.process.poll() != 0:
                problems.append(f"removed member {name} did not stop by itself with status 0: {node.process.poll()}")
        if watchers:
            problems += watch_problems(cluster, watchers, history, clients.keys, departed=departed)
            for recorder in watchers + departed:
                with open(os.path.join(base_dir, f"watch-{recorder.member}.jsonl"), "w", encoding="utf-8") as handle:
                    for revision, key, value in recorder.events:
                        handle.write(json.dumps([revision, key.decode(errors="replace"),
                                                 value.decode(errors="replace")]) + "\n")
        counts = clients.counts()
        if counts.get("put ok", 0) + counts.get("cas ok", 0) == 0:
            problems.append(f"no write succeeded during the run: {counts}")
        report = RunReport(seed=seed, size=size, duration_s=elapsed_s, counts=counts, verdict=result.verdict,
                           checker_summary=result.summary().splitlines()[0], acked_writes=acked,
                           hash_revision=hash_revision, hashes=hashes, nemesis_events=faults.events,
                           problems=problems, history_path=history_path, check_s=check_s,
                           watched_events=min((len(r.events) for r in watchers), default=0),
                           members=[f"{name} (learner)" if name in cluster.learners else name
                                    for name in cluster.names],
                           removed={name: node.process.poll() if node.process else None
                                    for name, node in cluster.removed.items()})
        with open(os.path.join(base_dir, "report.json"), "w", encoding="utf-8") as handle:
            json.dump(dataclasses.asdict(report), handle, indent=1, default=str)
        if problems:
            log(cluster.log_tails())
        return report
    finally:
        for recorder in watchers + departed:
            recorder.stopping.set()  # (after a failure one may still be reconnecting to a member now gone)
        cluster.close()
