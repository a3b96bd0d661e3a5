"""The raft log actor's snapshot/release path, in-process.

Method: build RaftLogActor around a real WAL with tiny segments and a stub
socket that records what would be sent (limits shrunk with
dataclasses.replace, which the real process cannot do), drive it with
messages, then recover from the WAL as a restart would.
"""

from __future__ import annotations

import dataclasses
import os
import random

import ormsgpack
import structlog

from actors import ipc
from actors.config import NodeConfig
from actors.raft_log import RaftLogActor, build_node
from actors.wal import Wal

SEGMENT_BYTES = 2000


class StubSocket:
    def __init__(self):
        self.sent: list = []

    def send_multipart(self, frames, flags=0):
        self.sent.append((frames[0], ormsgpack.unpackb(frames[1])))

    def take(self, identity: bytes) -> list:
        taken = [message for who, message in self.sent if who == identity]
        self.sent = [(who, message) for who, message in self.sent if who != identity]
        return taken


def make_actor(config: NodeConfig):
    wal, recovery = Wal.open(os.path.join(config.data_dir, "wal"), SEGMENT_BYTES)
    node, storage = build_node(config, recovery, random.Random(1))
    socket = StubSocket()
    actor = RaftLogActor(config, structlog.get_logger(), socket, wal, node, storage)
    actor.limits = dataclasses.replace(actor.limits, snapshot_catchup_entries=20, max_apply_batch_entries=16)
    actor.process_ready()
    return actor, socket, recovery


def propose(actor: RaftLogActor, count: int, start: int = 0) -> None:
    batch = [[b"gateway-0", ormsgpack.packb([ipc.PROPOSE, [[start + n, "put", {"v": b"x" * 40}]]])]
             for n in range(count)]
    actor.on_batch(batch)


def apply_everything(actor: RaftLogActor, socket: StubSocket) -> list:
    """Play the applier: acknowledge every ENTRIES batch until none arrive."""
    entries = []
    for _ in range(1000):  # bounded
        batches = socket.take(ipc.APPLIER_IDENTITY)
        if not batches:
            return entries
        for message in batches:
            assert message[0] == ipc.ENTRIES
            entries.extend(message[1])
            last = message[1][-1][0]
            actor.on_batch([[ipc.APPLIER_IDENTITY, ormsgpack.packb([ipc.APPLIED, last, last])]])
    raise AssertionError("applier never caught up")


def test_snapshot_releases_segments_and_restart_recovers(tmp_path):
    """Goal: past snapshot_count a marker is written, whole WAL segments below
    durable - catchup are deleted, memory is compacted, and a restart recovers
    the marker and every entry the applier may still ask for."""
    config = NodeConfig(name="n1", data_dir=str(tmp_path), snapshot_count=100)
    actor, socket, _ = make_actor(config)
    actor.on_batch([[ipc.APPLIER_IDENTITY, ormsgpack.packb([ipc.SUBSCRIBE, 0])]])
    delivered = []
    for round_number in range(6):
        propose(actor, 50, start=round_number * 50)
        delivered.extend(apply_everything(actor, socket))
    assert [entry[0] for entry in delivered] == list(range(1, 302))
    assert actor.wal.snapshot.index >= 300
    assert actor.storage.first_index() > 200  # memory compacted behind the catch-up window
    wal_dir = os.path.join(config.data_dir, "wal")
    segments = sorted(os.listdir(wal_dir))
    assert not segments[0].startswith("0000000000000000-")  # the first segment was released
    applied = delivered[-1][0]
    actor.wal.close()

    restarted, socket, recovery = make_actor(config)
    assert recovery.snapshot.index == actor.wal.snapshot.index
    assert recovery.entries[0][0] <= applied - 20 + 1  # catch-up entries kept
    restarted.on_batch([[ipc.APPLIER_IDENTITY, ormsgpack.packb([ipc.SUBSCRIBE, applied - 10])]])
    again = apply_everything(restarted, socket)
    assert [entry[0] for entry in again][:11] == list(range(applied - 9, applied + 2))
    assert [tuple(entry) for entry in again[:10]] == [tuple(entry) for entry in delivered[-10:]]
    restarted.wal.close()


def test_subscribe_below_the_first_index_is_refused_not_gapped(tmp_path):
    """Goal: an applier behind the compaction point gets nothing (it needs a
    store snapshot) rather than entries with a gap."""
    config = NodeConfig(name="n1", data_dir=str(tmp_path), snapshot_count=100)
    actor, socket, _ = make_actor(config)
    actor.on_batch([[ipc.APPLIER_IDENTITY, ormsgpack.packb([ipc.SUBSCRIBE, 0])]])
    for round_number in range(5):
        propose(actor, 50, start=round_number * 50)
        apply_everything(actor, socket)
    assert actor.storage.first_index() > 1
    actor.on_batch([[ipc.APPLIER_IDENTITY, ormsgpack.packb([ipc.SUBSCRIBE, 0])]])
    assert socket.take(ipc.APPLIER_IDENTITY) == []
    assert not actor.subscribed
    actor.wal.close()
