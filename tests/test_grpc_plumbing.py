"""Goal: the gRPC front's hand-off between handler threads and the gateway
loop loses no answer and holds nothing for a client that has gone: every
request pushed is seen by the loop (one wake-up may stand for many), a
handler whose client went away frees its slot and the loop drops its
request or answer, serializable reads served in the handler threads never
overlap a reopen of the store, and many concurrent RPCs from many threads
are all answered correctly on a real node.
Method: a GrpcFront on a stand-in gateway (no server started), the loop's
side driven by hand from the test thread; then etcd's stubs against a node."""

from __future__ import annotations

import threading
import time
import types

import grpc
import pytest
import zmq

from actors.grpc_front import GrpcFront, GrpcOrigin, StoreGate
from protocol.codec import STATUS_OK
from protocol.etcd.etcdserverpb import rpc_pb2 as pb, rpc_pb2_grpc as pb_grpc
from protocol.limits import Limits

WAIT_S = 30


class FakeCore:
    """Answers every request at once, as the core answers a local read."""

    def __init__(self, gateway):
        self.gateway = gateway
        self.cluster_id, self.member_id = 1, 2
        self.submitted: list[tuple] = []

    def submit(self, origin, op, body, size_bytes=0):
        self.submitted.append((op, body))
        if body.get("hold"):
            return  # never answered: the client has to give up
        self.gateway.front.deliver(origin, STATUS_OK, {"echo": body})


class FakeGateway:
    def __init__(self):
        self.context = zmq.Context()
        self.limits = Limits()
        self.config = types.SimpleNamespace(listen_client_urls=[], data_dir="/nonexistent")
        self.core = FakeCore(self)
        self.store_gate = StoreGate()
        self.flushes = 0
        self.front: GrpcFront | None = None

    def flush(self):
        self.flushes += 1


class FakeContext:
    def __init__(self):
        self.active = True

    def is_active(self):
        return self.active


@pytest.fixture
def front():
    gateway = FakeGateway()
    gateway.front = GrpcFront(gateway, log=types.SimpleNamespace(info=lambda *a, **k: None))
    yield gateway.front
    gateway.front.stopping = True
    gateway.context.destroy(linger=0)  # the handler threads' sockets too; they have ended


def run_loop_until(front: GrpcFront, done, deadline_s: float = WAIT_S) -> int:
    """The gateway loop's part, in this thread: wait for wake-ups, drain; returns the wake-ups seen."""
    poller = zmq.Poller()
    poller.register(front.socket, zmq.POLLIN)
    wake_ups = 0
    deadline = time.monotonic() + deadline_s
    while not done():
        assert time.monotonic() < deadline, "requests pushed but never drained"
        if poller.poll(100):
            batch = []
            while True:
                try:
                    batch.append(front.socket.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
            wake_ups += len(batch)
            front.on_requests(batch)
    return wake_ups


def test_every_request_from_many_threads_reaches_the_loop_and_is_answered(front):
    threads_count, per_thread = 32, 40
    answers: dict[int, list] = {}
    errors = []

    def handler(index: int):
        got = []
        try:
            for n in range(per_thread):
                got.extend(front.answers("put", {"key": b"%d/%d" % (index, n)}, 0, FakeContext()))
        except Exception as error:  # reported below
            errors.append(error)
        answers[index] = got

    threads = [threading.Thread(target=handler, args=(i,)) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    wake_ups = run_loop_until(front, lambda: len(answers) == threads_count)
    for thread in threads:
        thread.join(WAIT_S)
    assert errors == []
    for index, got in answers.items():
        assert got == [(STATUS_OK, {"echo": {"key": b"%d/%d" % (index, n)}}) for n in range(per_thread)]
    assert len(front.intake) == 0 and not front.wake_pending
    assert len(front.gateway.core.submitted) == threads_count * per_thread
    assert wake_ups <= threads_count * per_thread  # at most one wake-up per request, often fewer


def test_a_client_that_goes_away_frees_its_slot_and_its_answer_is_dropped(front):
    context = FakeContext()
    outcome = []
    handler = threading.Thread(target=lambda: outcome.extend(front.answers("put", {"hold": True}, 0, context)))
    handler.start()
    deadline = time.monotonic() + WAIT_S
    while not front.intake:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    origin = front.intake[0][0]
    context.active = False  # the client went away before the loop took the request
    handler.join(WAIT_S)
    assert not handler.is_alive() and outcome == []
    assert origin.gone
    front.on_requests([b""])
    assert front.gateway.core.submitted == []  # not submitted: nobody is waiting for it
    assert front.deliver(origin, STATUS_OK, {}) is False and origin.answers.empty()


def test_a_client_that_goes_away_while_the_core_holds_its_request(front):
    context = FakeContext()
    handler = threading.Thread(target=lambda: list(front.answers("put", {"hold": True}, 0, context)))
    handler.start()
    run_loop_until(front, lambda: front.gateway.core.submitted)
    context.active = False
    handler.join(WAIT_S)
    assert not handler.is_alive()
    # The core answers late: dropped, not queued for a thread that is not there.
    late = GrpcOrigin()
    late.gone = True
    assert front.deliver(late, STATUS_OK, {}) is False and late.answers.empty()


def test_a_stopping_front_answers_stopped_and_waits_no_longer(front):
    front.stopping = True
    got = list(front.answers("range", {"key": b"k", "serializable": True}, 0, FakeContext()))
    assert got and got[0][1]["code"] == "Stopped"
    started = time.monotonic()
    assert list(front.answers("put", {"hold": True}, 0, FakeContext())) == []
    assert time.monotonic() - started < WAIT_S


def test_serializable_reads_are_served_in_the_handler_thread(front):
    got = list(front.answers("range", {"key": b"k", "serializable": True}, 0, FakeContext()))
    assert got == [(STATUS_OK, {"echo": {"key": b"k", "serializable": True}})]
    assert len(front.intake) == 0  # never went through the loop


def test_the_store_gate_lets_readers_overlap_and_a_change_wait_for_them():
    gate = StoreGate()
    gate.enter()
    gate.enter()  # readers do not wait for one another
    events = []
    changed = threading.Event()

    def change():
        with gate.changing():
            events.append("change")
        changed.set()

    changer = threading.Thread(target=change)
    changer.start()
    deadline = time.monotonic() + WAIT_S
    while not gate._changing:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    late_reader_in = threading.Event()

    def late_reader():
        gate.enter()
        events.append("late reader")
        late_reader_in.set()
        gate.leave()

    reader = threading.Thread(target=late_reader)
    reader.start()
    assert not changed.wait(0.2) and not late_reader_in.is_set()  # both wait for the two readers
    events.append("readers done")
    gate.leave()
    gate.leave()
    assert changed.wait(WAIT_S) and late_reader_in.wait(WAIT_S)
    changer.join(WAIT_S)
    reader.join(WAIT_S)
    assert events == ["readers done", "change", "late reader"]


def test_many_concurrent_rpcs_from_many_threads_are_all_answered(node):
    """On a real node: 24 threads, each on its own channel, interleave puts,
    serializable and linearizable reads of their own keys; every RPC is
    answered, each read sees the thread's last put, and revisions seen by a
    thread never go back."""
    threads_count, rounds = 24, 25
    failures = []

    def client(index: int):
        try:
            with grpc.insecure_channel(f"127.0.0.1:{node.client_port}") as channel:
                kv = pb_grpc.KVStub(channel)
                last_revision = 0
                for n in range(rounds):
                    key, value = b"plumbing/%d" % index, b"%d" % n
                    put = kv.Put(pb.PutRequest(key=key, value=value), timeout=WAIT_S)
                    assert put.header.revision > last_revision
                    for serializable in (True, False):
                        got = kv.Range(pb.RangeRequest(key=key, serializable=serializable), timeout=WAIT_S)
                        assert [kv_.value for kv_ in got.kvs] == [value]
                        assert got.header.revision >= put.header.revision
                        last_revision = got.header.revision
        except Exception as error:  # reported below, with the thread
            failures.append((index, repr(error)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S * 4)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
