"""Who hears what after an applied batch.

Goal: the applier sends each APPLIED report only where it is wanted, yet
nobody misses one they need: a gateway or the watch broadcaster that says
(HELLO) it wants reports gets one after every batch and one at once in
answer to the HELLO; one that does not gets its RESULTS only; a new store
generation reaches everyone. The raft log is acknowledged every second
ENTRIES message, at once when lease grants or revokes were applied, and
by the delayed-acknowledgement timer otherwise; the durable index it
reports is the previous commit's. Method: a real `Applier` in
this process on a fresh store, a ROUTER bound where the raft log listens,
and pretend gateways (DEALERs with the gateways' identities); ENTRIES are
fed to the applier as the raft log would.
"""

from __future__ import annotations

import logging
import os
import time

import pytest
import structlog
import zmq

from actors import ipc
from actors.applier import Applier
from actors.config import NodeConfig
from protocol import codec, messages
from protocol.limits import DEFAULT_LIMITS

WAIT_S = 10.0


class Rig:
    def __init__(self, tmp_path):
        self.config = NodeConfig(name="reports", data_dir=str(tmp_path / "node.qkv"), gateways=2)
        self.context = zmq.Context()
        os.makedirs(ipc.run_dir(self.config.data_dir), exist_ok=True)
        self.raft = self.context.socket(zmq.ROUTER)
        self.raft.setsockopt(zmq.LINGER, 0)
        self.raft.bind(ipc.raft_endpoint(self.config.data_dir))
        log = structlog.wrap_logger(structlog.PrintLogger(open(tmp_path / "applier.log", "w")),
                                    wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
        self.applier = Applier(self.config, log)
        self.peers = {}
        self.next_index = self.applier.applied_index + 1
        self.next_request_id = 1

    def connect(self, identity: bytes, wants_applied: bool) -> zmq.Socket:
        socket = self.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.ROUTING_ID, identity)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(ipc.applier_endpoint(self.config.data_dir))
        self.peers[identity] = socket
        self.hello(identity, wants_applied)
        return socket

    def hello(self, identity: bytes, wants_applied: bool) -> None:
        self.peers[identity].send(codec.pack([ipc.HELLO, wants_applied]))
        deadline = time.monotonic() + WAIT_S
        while not self.applier.gateways.poll(100):
            assert time.monotonic() < deadline, "the applier never got the HELLO"
        self.applier.on_gateways([self.applier.gateways.recv_multipart()])

    def apply(self, op: str, body: dict, gateway: bytes = ipc.gateway_identity(0)) -> None:
        request = [self.next_request_id, op, messages.validate_request(op, body, DEFAULT_LIMITS)]
        self.next_request_id += 1
        data = codec.pack([self.applier.member_id, gateway, [request]])
        self.applier.on_raft([codec.pack([ipc.ENTRIES, [[self.next_index, 1, ipc.ENTRY_NORMAL, data]]])])
        self.next_index += 1

    def received(self, socket: zmq.Socket) -> list:
        """The kinds of every message queued for `socket` (sent before this is called)."""
        return [message[0] for message in self.messages(socket)]

    def messages(self, socket: zmq.Socket) -> list:
        messages = []
        while socket.poll(200):
            messages.append(codec.unpack(socket.recv_multipart()[-1]))
        return messages

    def close(self):
        self.applier.close()
        self.context.destroy(linger=0)


@pytest.fixture
def rig(tmp_path):
    rig = Rig(tmp_path)
    try:
        yield rig
    finally:
        rig.close()


def test_applied_reports_go_only_where_wanted(rig):
    wanting = rig.connect(ipc.gateway_identity(1), wants_applied=True)
    quiet = rig.connect(ipc.gateway_identity(0), wants_applied=False)
    broadcaster = rig.connect(ipc.WATCH_BROADCASTER_IDENTITY, wants_applied=False)
    for socket in (wanting, quiet, broadcaster):
        assert rig.received(socket) == [ipc.APPLIED]  # every HELLO is answered
    rig.apply("put", {"key": b"a", "value": b"1"})
    rig.apply("put", {"key": b"b", "value": b"2"})
    assert rig.received(quiet) == [ipc.RESULTS, ipc.RESULTS]
    assert rig.received(wanting) == [ipc.APPLIED, ipc.APPLIED]
    assert rig.received(broadcaster) == []
    # The broadcaster gets a stream: at once the latest report, then one a batch.
    rig.hello(ipc.WATCH_BROADCASTER_IDENTITY, True)
    rig.apply("put", {"key": b"c", "value": b"3"})
    assert rig.received(broadcaster) == [ipc.APPLIED, ipc.APPLIED]
    # A new store generation goes to everyone, asked for or not.
    rig.hello(ipc.gateway_identity(1), False)
    rig.received(wanting)
    rig.applier._defragment([(ipc.gateway_identity(0), 1)])
    assert rig.received(quiet)[-1] == ipc.APPLIED
    assert rig.received(wanting) == [ipc.APPLIED]


def test_raft_log_acknowledged_every_second_batch_and_for_leases(rig):
    rig.connect(ipc.gateway_identity(0), wants_applied=False)
    assert ipc.APPLIED not in rig.received(rig.raft)  # nothing applied yet
    rig.apply("put", {"key": b"a", "value": b"1"})
    assert ipc.APPLIED not in rig.received(rig.raft)
    rig.apply("put", {"key": b"b", "value": b"2"})
    # [APPLIED, applied index, durable index]: with MDB_NOMETASYNC a commit's
    # fsync makes the one before it durable, not itself.
    assert rig.messages(rig.raft) == [[ipc.APPLIED, rig.next_index - 1, rig.next_index - 2]]
    rig.apply("put", {"key": b"c", "value": b"3"})
    assert rig.received(rig.raft) == []
    rig.applier.acknowledge()  # what the actor's ACKNOWLEDGE_DELAY_MS timer calls
    assert rig.received(rig.raft) == [ipc.APPLIED]
    rig.apply("lease_grant", {"ID": 5, "TTL": 60})
    assert rig.received(rig.raft) == [ipc.APPLIED]  # lease changes are reported at once

