"""Every applied write is answered, also when its gateway's queue is full.

Goal: the applier never drops a RESULTS message because a gateway is slow
to read (its ZeroMQ queue at the high-water mark): the write applied, so
dropping the answer would leave the client with a timeout and an unknown
outcome. Method: a real `Applier` in this process on a fresh store, its
gateway socket's high-water mark lowered so the queue fills fast, a pretend
gateway (a DEALER with the gateway's identity and a tiny receive queue) that
says HELLO and then does not read while thousands of writes proposed
through it are applied (ENTRIES fed to the applier as the raft log would);
then the gateway reads, the applier's outbox retry runs, and every request
id must have arrived exactly once, in order, followed by the latest APPLIED.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import structlog
import zmq

from actors import ipc
from actors.applier import Applier
from actors.config import NodeConfig
from protocol import codec, messages
from protocol.limits import DEFAULT_LIMITS

WRITES = 6000
WRITES_PER_ENTRY = 20
SMALL_HIGH_WATER_MARK = 4
DEADLINE_S = 30.0


def fresh_applier(tmp_path, monkeypatch) -> Applier:
    config = NodeConfig(name="outbox", data_dir=str(tmp_path / "node.qkv"))
    # ZeroMQ takes a bound socket's high-water mark at bind: it must be small from the start.
    small = dataclasses.replace(config.limits(), socket_high_water_mark=SMALL_HIGH_WATER_MARK)
    monkeypatch.setattr(NodeConfig, "limits", lambda _config: small)
    log = structlog.wrap_logger(structlog.PrintLogger(open(tmp_path / "applier.log", "w")),
                                wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    return Applier(config, log)


def entries_for(member_id: int, gateway: bytes, first_index: int, first_request_id: int, count: int) -> list:
    entries = []
    request_id = first_request_id
    for offset in range(count):
        items = []
        for _ in range(WRITES_PER_ENTRY):
            body = messages.validate_request("put", {"key": b"k%d" % request_id, "value": b"v"}, DEFAULT_LIMITS)
            items.append([request_id, "put", body])
            request_id += 1
        entries.append([first_index + offset, 1, ipc.ENTRY_NORMAL, codec.pack([member_id, gateway, items])])
    return entries


def test_results_for_a_full_gateway_queue_are_kept_and_all_delivered(tmp_path, monkeypatch):
    applier = fresh_applier(tmp_path, monkeypatch)
    context = zmq.Context()
    gateway_identity = ipc.gateway_identity(0)
    gateway = context.socket(zmq.DEALER)
    gateway.setsockopt(zmq.ROUTING_ID, gateway_identity)
    gateway.setsockopt(zmq.RCVHWM, SMALL_HIGH_WATER_MARK)
    gateway.setsockopt(zmq.LINGER, 0)
    try:
        gateway.connect(ipc.applier_endpoint(applier.config.data_dir))
        gateway.send(codec.pack([ipc.HELLO]))
        deadline = time.monotonic() + DEADLINE_S
        while gateway_identity not in applier.gateways_heard:
            assert time.monotonic() < deadline, "the applier never heard the gateway's HELLO"
            if applier.gateways.poll(100):
                applier.on_gateways([applier.gateways.recv_multipart()])
        assert codec.unpack(gateway.recv())[0] == ipc.APPLIED  # the answer to HELLO

        # Apply every write, one ENTRIES message per entry (as many RESULTS and APPLIED
        # messages), while the gateway reads nothing.
        entry_count = WRITES // WRITES_PER_ENTRY
        first_index = applier.store.applied_index() + 1
        for entry in entries_for(applier.member_id, gateway_identity, first_index, 1, entry_count):
            applier.on_raft([codec.pack([ipc.ENTRIES, [entry]])])
        assert applier.store.applied_index() == first_index + entry_count - 1
        assert applier.outbox.held_count() > 0, "the gateway's queue never filled: the test proves nothing"

        answered: list[int] = []
        last_applied = None
        while len(answered) < WRITES or last_applied != applier.store.applied_index():
            assert time.monotonic() < deadline, f"{len(answered)} of {WRITES} writes answered"
            applier.outbox.flush()  # the actor's OUTBOX_RETRY_MS timer
            while gateway.poll(10):
                message = codec.unpack(gateway.recv())
                if message[0] == ipc.RESULTS:
                    for request_id, status, body in message[1]:
                        assert status == codec.STATUS_OK, body
                        answered.append(request_id)
                elif message[0] == ipc.APPLIED:
                    last_applied = message[1]
        assert answered == list(range(1, WRITES + 1))
        assert applier.outbox.held_count() == 0
        assert applier.outbox.results_dropped == 0
    finally:
        gateway.close()
        context.destroy(linger=0)
        applier.close()


def test_held_results_are_bounded_by_a_checked_limit():
    assert DEFAULT_LIMITS.max_undelivered_results_per_gateway >= DEFAULT_LIMITS.max_pending_requests_per_gateway
    too_small = DEFAULT_LIMITS.__class__(max_undelivered_results_per_gateway=10, max_pending_requests_per_gateway=11)
    try:
        too_small.validate()
    except ValueError as error:
        assert "max_undelivered_results_per_gateway" in str(error)
    else:
        raise AssertionError("a limit below max_pending_requests_per_gateway was accepted")
