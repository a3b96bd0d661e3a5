"""The raft log actor's snapshot transfers (actors/snapshot_stream.py), in-process.

Goal: a leader's MsgSnap becomes a store copy streamed to the follower,
which verifies it, hands it to the applier and, once installed, steps the
MsgSnap of what it received (the store's applied index, not the marker's)
and reports success back; a corrupted chunk is refused before install and
reported failed, after which the peer is in backoff; a chunk of a transfer
the follower does not know (it restarted) is answered failed at once; the
number of transfers a leader runs is bounded.

Method: two SnapshotStreams (leader, follower) with real data dirs and a
real LMDB store on the leader, joined by a fake transport that hands the
forwards across (optionally corrupting one chunk) and a fake clock; the
applier's part is played by MvccStore.install.
"""

from __future__ import annotations

import time

import structlog

from actors.config import NodeConfig
from actors.gateway import store_dir
from actors.mvcc import MvccStore
from actors.raft import ConfState, MsgSnap, SnapshotMeta
from actors.snapshot_stream import SnapshotStreams
from protocol.limits import DEFAULT_LIMITS
from protocol.messages import validate_request

COPY_TIMEOUT_S = 30.0
MAP_BYTES = 1 << 30


class FakeTransport:
    def __init__(self):
        self.outbox: list[tuple[int, list]] = []

    def queue_forward(self, peer: int, item: list) -> None:
        self.outbox.append((peer, item))


class Member:
    def __init__(self, tmp_path, name: str, port: int, clock):
        self.config = NodeConfig(name=name, data_dir=str(tmp_path / name),
                                 initial_advertise_peer_urls=(f"http://127.0.0.1:{port}",))
        self.id = self.config.member_id()
        self.transport = FakeTransport()
        self.to_applier: list = []
        self.streams = SnapshotStreams(self.config, structlog.get_logger(), self.transport, self.to_applier.append,
                                       clock)


def make_pair(tmp_path, entries: int = 300):
    now = [0.0]
    leader = Member(tmp_path, "leader", 1, lambda: now[0])
    follower = Member(tmp_path, "follower", 2, lambda: now[0])
    store = MvccStore.open(store_dir(leader.config), writer=True, map_size_bytes=MAP_BYTES,
                           quota_backend_bytes=MAP_BYTES // 2)
    value = b"v" * 4096
    store.apply([(index, 1, [((None, index), "put",
                              validate_request("put", {"key": b"k%d" % index, "value": value}, DEFAULT_LIMITS))])
                 for index in range(1, entries + 1)])
    store.close()
    return leader, follower, now


def msg_snap(leader: Member, follower: Member, marker: int = 100) -> MsgSnap:
    return MsgSnap(to=follower.id, sender=leader.id, term=2,
                   snapshot=SnapshotMeta(marker, 1, ConfState(tuple(sorted((leader.id, follower.id))))))


def wait_for_copy(leader: Member, peer: int) -> None:
    deadline = time.monotonic() + COPY_TIMEOUT_S
    while peer not in leader.streams.outgoing:
        assert time.monotonic() < deadline, "the store copy did not finish"
        leader.streams.poll(is_leader=True)
        time.sleep(0.01)  # waiting on a child process, polled with a deadline


def pump(leader: Member, follower: Member, corrupt_offset: int | None = None) -> None:
    """Hand forwards across until both outboxes are empty (bounded)."""
    for _ in range(10_000):
        if not leader.transport.outbox and not follower.transport.outbox:
            return
        for peer, item in leader.transport.outbox:
            assert peer == follower.id
            if corrupt_offset is not None and item[0] == "snap_chunk" and item[2] == corrupt_offset:
                item = item[:3] + [b"!" + item[3][1:]]
            follower.streams.on_forward(leader.id, item)
        leader.transport.outbox = []
        for peer, item in follower.transport.outbox:
            assert peer == leader.id
            leader.streams.on_forward(follower.id, item)
        follower.transport.outbox = []
    raise AssertionError("transfer did not quiesce")


def test_a_snapshot_is_streamed_verified_installed_and_reported(tmp_path):
    leader, follower, _now = make_pair(tmp_path)
    leader.streams.start(msg_snap(leader, follower))
    leader.streams.start(msg_snap(leader, follower))  # one at a time per follower: ignored
    assert len(leader.streams.copies) == 1
    wait_for_copy(leader, follower.id)
    transfer = leader.streams.outgoing[follower.id][0]
    assert transfer.header.index == 300  # the store's applied index, not the marker's 100
    assert transfer.header.size > DEFAULT_LIMITS.snapshot_chunk_bytes  # several chunks
    pump(leader, follower)
    assert len(follower.to_applier) == 1
    kind, path, index = follower.to_applier[0]
    assert (kind, index) == ("install_snapshot", 300)
    installed = MvccStore.open(store_dir(follower.config), writer=True, map_size_bytes=MAP_BYTES,
                               quota_backend_bytes=MAP_BYTES // 2)
    installed.install(path, index)
    assert installed.get(b"k300")["value"] == b"v" * 4096
    installed.close()
    follower.streams.on_installed(300, True, 2)
    [step] = follower.streams.take_steps()
    assert step.snapshot.index == 300 and step.snapshot.term == 1 and step.to == follower.id
    assert step.snapshot.conf_state == ConfState(tuple(sorted((leader.id, follower.id))))
    pump(leader, follower)
    assert leader.streams.take_reports() == [(follower.id, False)]
    assert not leader.streams.busy() and not follower.streams.busy()


def test_a_corrupted_chunk_is_refused_and_the_peer_backs_off(tmp_path):
    leader, follower, now = make_pair(tmp_path)
    leader.streams.start(msg_snap(leader, follower))
    wait_for_copy(leader, follower.id)
    pump(leader, follower, corrupt_offset=DEFAULT_LIMITS.snapshot_chunk_bytes)
    assert follower.to_applier == []  # never installed
    assert leader.streams.take_reports() == [(follower.id, True)]
    leader.streams.start(msg_snap(leader, follower))  # within the backoff: failed at once
    assert leader.streams.take_reports() == [(follower.id, True)] and not leader.streams.copies
    now[0] += DEFAULT_LIMITS.snapshot_retry_backoff_ms
    leader.streams.start(msg_snap(leader, follower))
    assert follower.id in leader.streams.copies
    leader.streams.close()


def test_a_chunk_of_an_unknown_transfer_is_answered_failed_at_once(tmp_path):
    leader, follower, _now = make_pair(tmp_path, entries=50)
    leader.streams.start(msg_snap(leader, follower))
    wait_for_copy(leader, follower.id)
    first_chunks = leader.streams.transport.outbox
    later = [item for _peer, item in first_chunks if item[2] > 0]
    leader.transport.outbox = []
    if not later:  # a store smaller than one chunk: make the point with a fake offset
        later = [first_chunks[0][1][:2] + [1] + first_chunks[0][1][3:]]
    follower.streams.on_forward(leader.id, later[0])  # as if the first chunk went to a previous incarnation
    [(peer, result)] = follower.transport.outbox
    assert peer == leader.id and result[0] == "snap_result" and result[2] is False
    follower.transport.outbox = []
    leader.streams.on_forward(follower.id, result)
    assert leader.streams.take_reports() == [(follower.id, True)] and not leader.streams.outgoing


def test_stalled_transfers_are_aborted_and_the_total_is_bounded(tmp_path):
    leader, follower, now = make_pair(tmp_path, entries=20)
    others = [Member(tmp_path, f"other{n}", 10 + n, lambda: now[0]) for n in range(3)]
    for other in others:
        leader.streams.start(msg_snap(leader, other))
    assert len(leader.streams.copies) == DEFAULT_LIMITS.max_outgoing_snapshots
    assert leader.streams.take_reports() == [(others[-1].id, True)]
    for other in others[:2]:
        wait_for_copy(leader, other.id)
    now[0] += DEFAULT_LIMITS.snapshot_stall_timeout_ms
    leader.streams.poll(is_leader=True)
    assert sorted(leader.streams.take_reports()) == sorted((other.id, True) for other in others[:2])
    assert not leader.streams.busy()
