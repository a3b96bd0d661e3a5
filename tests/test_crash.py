"""Goal: nothing acknowledged is lost when an actor, or the whole node, is
killed with SIGKILL in the middle of a write load; revisions have no gaps or
repeats; HashKV is stable across a restart.

Method: a writer thread keeps up to WRITER_INFLIGHT unique-key puts in
flight over one ZeroMQ connection and records every acknowledged
(key, value, revision). After a kill it waits for more acknowledgements
(the supervisor restarted the actor and the node serves again), then
checks every acknowledged put against the store, and that the store's
mod revisions are exactly 2..current (one revision per put, none twice).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import zmq

from actors import ipc
from protocol import codec
from tests.conftest import request_once

WRITER_INFLIGHT = 32
REQUEST_TIMEOUT_S = 10.0
PROGRESS_TIMEOUT_S = 60.0
WRITES_BEFORE_KILL = 300
WRITES_AFTER_KILL = 300


class Writer(threading.Thread):
    def __init__(self, endpoint: str, prefix: str):
        super().__init__(daemon=True)
        self.endpoint = endpoint
        self.prefix = prefix
        self.acked: dict[bytes, tuple[bytes, int]] = {}
        self.errors: list[dict] = []
        self.condition = threading.Condition()
        self.stopping = threading.Event()

    def wait_for_acks(self, count: int, timeout_s: float = PROGRESS_TIMEOUT_S) -> None:
        with self.condition:
            if not self.condition.wait_for(lambda: len(self.acked) >= count, timeout_s):
                raise AssertionError(f"only {len(self.acked)} of {count} writes acknowledged; errors: {self.errors[-3:]}")

    def run(self) -> None:
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(f"tcp://{self.endpoint}")
        inflight: dict[int, tuple[bytes, bytes, float]] = {}
        sequence = 0
        try:
            while not self.stopping.is_set():
                while len(inflight) < WRITER_INFLIGHT:
                    sequence += 1
                    key = f"{self.prefix}/{sequence:08d}".encode()
                    value = os.urandom(8).hex().encode()
                    inflight[sequence] = (key, value, time.monotonic())
                    dealer.send(codec.encode_request_frame([[sequence, "put", {"key": key, "value": value}]]))
                if dealer.poll(100):
                    for request_id, status, body in codec.decode_response_frame(dealer.recv()):
                        sent = inflight.pop(request_id, None)
                        if sent is None:
                            continue
                        with self.condition:
                            if status == codec.STATUS_OK:
                                self.acked[sent[0]] = (sent[1], body["header"]["revision"])
                            else:
                                self.errors.append(body)
                            self.condition.notify_all()
                now = time.monotonic()
                # An unanswered request's outcome is unknown; stop waiting for it.
                for request_id in [r for r, (_k, _v, at) in inflight.items() if now - at > REQUEST_TIMEOUT_S]:
                    del inflight[request_id]
        finally:
            dealer.close()


def read_all(endpoint: str, prefix: str) -> tuple[list[dict], int]:
    """The writer's keys and the revision they were read at, from one response:
    puts the stopped writer left in flight may still be landing."""
    answer = request_once(endpoint, "range", {"key": prefix.encode() + b"/", "range_end": prefix.encode() + b"0"}, 30)
    assert answer is not None and answer[0] == codec.STATUS_OK, answer
    return answer[1]["kvs"], answer[1]["header"]["revision"]


def current_revision(endpoint: str) -> int:
    answer = request_once(endpoint, "range", {"key": b"\0", "range_end": b"\0", "count_only": True}, 30)
    assert answer is not None and answer[0] == codec.STATUS_OK, answer
    return answer[1]["header"]["revision"]


def check_history(endpoint: str, writer: Writer) -> None:
    kv_list, read_revision = read_all(endpoint, writer.prefix)
    kvs = {kv["key"]: kv for kv in kv_list}
    missing = [key for key in writer.acked if key not in kvs]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:3]}"
    for key, (value, revision) in writer.acked.items():
        assert kvs[key]["value"] == value, key
        assert kvs[key]["mod_revision"] == revision, key
    revisions = sorted(kv["mod_revision"] for kv in kvs.values())
    assert revisions == list(range(2, read_revision + 1)), "revisions have gaps or repeats"
    acked_revisions = [revision for _value, revision in writer.acked.values()]
    assert len(set(acked_revisions)) == len(acked_revisions)


def gateway_endpoint(node, name: str) -> str:
    """host:port a gateway listens on (gateway 0: the node's port; others: their own)."""
    with open(os.path.join(ipc.run_dir(node.data_dir), f"{name}.endpoint"), encoding="utf-8") as handle:
        return handle.read().strip().removeprefix("tcp://")


def run_kill_test(node, victim: str | None) -> None:
    # Writes go through the victim itself when it is a gateway, so the writes
    # acknowledged after the kill prove the restarted gateway serves again.
    endpoint = gateway_endpoint(node, victim) if victim and victim.startswith("gateway") else node.zmq_endpoint
    writer = Writer(endpoint, "crash")
    writer.start()
    try:
        writer.wait_for_acks(WRITES_BEFORE_KILL)
        if victim is None:
            node.kill()
            node.start()
        else:
            pid = node.actor_pids()[victim]
            os.kill(pid, signal.SIGKILL)
        acked_at_kill = len(writer.acked)
        writer.wait_for_acks(acked_at_kill + WRITES_AFTER_KILL)
        if victim is not None:
            assert node.actor_pids().get(victim) not in (None, pid), "the supervisor did not restart the killed actor"
    finally:
        writer.stopping.set()
        writer.join(timeout=30)
    check_history(node.zmq_endpoint, writer)


@pytest.mark.parametrize("victim", ["applier", "raft_log", "gateway-0", "gateway-1"])
def test_kill_actor_mid_load_loses_nothing(node, victim):
    run_kill_test(node, victim)


def test_kill_whole_node_mid_load_loses_nothing(node):
    run_kill_test(node, None)


def test_hash_kv_is_stable_across_restart(node):
    for i in range(50):
        assert request_once(node.zmq_endpoint, "put", {"key": b"h%d" % i, "value": b"v"}, 10)[0] == codec.STATUS_OK
    revision = current_revision(node.zmq_endpoint)
    before = request_once(node.zmq_endpoint, "hash_kv", {"revision": revision}, 10)
    node.kill()
    node.start()
    after = request_once(node.zmq_endpoint, "hash_kv", {"revision": revision}, 10)
    assert before[0] == after[0] == codec.STATUS_OK
    assert before[1]["hash"] == after[1]["hash"]


def test_supervisor_sigkill_leaves_no_orphans(node):
    children = list(node.actor_pids().values())
    assert len(children) >= 3
    os.kill(node.process.pid, signal.SIGKILL)
    node.process.wait(timeout=10)
    deadline = time.monotonic() + 10
    alive = children
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _is_running(pid)]
        if alive:
            time.sleep(0.05)  # polling the process table, the only way to see an exit of a non-child
    assert alive == [], f"actors still running after the supervisor died: {alive}"
    node.process = None


def test_sigterm_stops_the_group_cleanly(node):
    children = list(node.actor_pids().values())
    assert node.stop() == 0
    assert [pid for pid in children if _is_running(pid)] == []


def _is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False
