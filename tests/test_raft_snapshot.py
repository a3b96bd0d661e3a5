"""Snapshot transfer in the Raft core (§7, etcd's MsgSnap / restore / ReportSnapshot).

Goal: a leader that compacted the entries a follower needs sends MsgSnap
and holds appends; a follower given a snapshot newer than its log resets
the log to it, reports it in Ready.snapshot (persisted first) and answers
at the snapshot's index; an older snapshot changes nothing; the leader
replicates again once the follower acknowledges, or probes again when the
transfer is reported failed, and a retried MsgSnap follows.

Method: paper style (one core driven with hand-built messages) and network
style (tools/raft_sim.Network with a compacted leader log).
"""

from __future__ import annotations

from actors.raft import ConfState, Entry, MsgApp, MsgAppResp, MsgHeartbeatResp, MsgSnap, SnapshotMeta
from actors.raft.tracker import STATE_PROBE, STATE_REPLICATE, STATE_SNAPSHOT
from tests.test_raft_paper import VOTERS, drain, make_leader, make_node
from tools.raft_sim import Invariants, Network


def compacted_leader(last_index: int = 20, snapshot_index: int = 15):
    """Leader 1 (term 2) whose log 1..last_index is compacted up to snapshot_index."""
    node = make_node(1, log_terms=[1] * last_index, term=1)
    make_leader(node)
    storage = node.storage
    storage.set_snapshot(SnapshotMeta(snapshot_index, 1, ConfState(VOTERS)))
    storage.compact(snapshot_index)
    return node


def test_7_leader_sends_msgsnap_when_the_follower_needs_compacted_entries():
    node = compacted_leader()
    # Follower 2 rejects the probe at the leader's last index: its log ends at 3.
    probed = node.raft.progress[2].next - 1
    node.step(MsgAppResp(to=1, sender=2, term=2, index=probed, reject=True, reject_hint=3, log_term=1))
    messages = drain(node)
    snaps = [m for m in messages if isinstance(m, MsgSnap) and m.to == 2]
    assert len(snaps) == 1 and snaps[0].snapshot.index == 15
    progress = node.raft.progress[2]
    assert progress.state == STATE_SNAPSHOT and progress.pending_snapshot == 15
    # Held: no appends to it while the snapshot is on its way.
    node.step(MsgHeartbeatResp(to=1, sender=2, term=2))
    assert not [m for m in drain(node) if m.to == 2 and isinstance(m, (MsgApp, MsgSnap))]


def test_7_leader_replicates_after_the_follower_acknowledges_the_snapshot():
    node = compacted_leader()
    node.step(MsgAppResp(to=1, sender=2, term=2, index=node.raft.progress[2].next - 1, reject=True,
                         reject_hint=3, log_term=1))
    drain(node)
    # The follower installed a newer store copy (index 17, not the marker's 15).
    node.step(MsgAppResp(to=1, sender=2, term=2, index=17))
    progress = node.raft.progress[2]
    assert progress.state == STATE_REPLICATE and progress.match == 17
    appends = [m for m in drain(node) if isinstance(m, MsgApp) and m.to == 2]
    assert appends and appends[0].index == 17 and appends[0].entries[0].index == 18


def test_7_failed_transfer_goes_back_to_probe_and_is_retried():
    node = compacted_leader()
    node.step(MsgAppResp(to=1, sender=2, term=2, index=node.raft.progress[2].next - 1, reject=True,
                         reject_hint=3, log_term=1))
    drain(node)
    node.report_snapshot(2, failed=True)
    progress = node.raft.progress[2]
    assert progress.state == STATE_PROBE and progress.probe_sent  # paused until it answers
    assert not drain(node)
    node.step(MsgHeartbeatResp(to=1, sender=2, term=2))
    retried = [m for m in drain(node) if isinstance(m, MsgSnap) and m.to == 2]
    assert len(retried) == 1 and node.raft.progress[2].state == STATE_SNAPSHOT


def test_7_no_msgsnap_to_a_follower_not_recently_active():
    node = compacted_leader()
    node.raft.progress[2].recent_active = False
    node.raft.progress[2].next = 3
    node.raft.broadcast_append()
    assert not [m for m in node.raft.messages if m.to == 2]
    assert node.raft.progress[2].state == STATE_PROBE


def test_7_follower_restores_a_newer_snapshot_and_reports_it_first():
    follower = make_node(2, log_terms=[1, 1, 1], term=1)
    snapshot = SnapshotMeta(40, 2, ConfState(VOTERS))
    follower.step(MsgSnap(to=2, sender=1, term=2, snapshot=snapshot))
    ready = follower.ready()
    assert ready.snapshot == snapshot and ready.must_sync()
    assert ready.committed_entries == []
    assert [m.index for m in ready.messages if isinstance(m, MsgAppResp) and not m.reject] == [40]
    assert follower.raft.log.last_index() == 40 and follower.raft.log.term(40) == 2
    assert follower.raft.log.term(3) is None  # the old log is gone
    follower.advance(ready)
    assert follower.storage.first_index() == 41 and follower.storage.last_index() == 40
    assert follower.raft.log.applied == 40 and follower.raft.log.committed == 40
    # Appends after the snapshot are accepted and applied.
    follower.step(MsgApp(to=2, sender=1, term=2, log_term=2, index=40, entries=(Entry(41, 2, 0, b"x"),),
                         commit=41))
    ready = follower.ready()
    assert ready.snapshot is None and [e.index for e in ready.entries] == [41]
    follower.advance(ready)
    ready = follower.ready()
    assert [e.index for e in ready.committed_entries] == [41]


def test_7_follower_ignores_a_snapshot_not_newer_than_its_commit():
    follower = make_node(2, log_terms=[1] * 10, term=1)
    follower.step(MsgApp(to=2, sender=1, term=1, log_term=1, index=10, commit=10))
    drain(follower)
    follower.step(MsgSnap(to=2, sender=1, term=1, snapshot=SnapshotMeta(8, 1, ConfState(VOTERS))))
    ready = follower.ready()
    assert ready.snapshot is None
    assert [m.index for m in ready.messages if isinstance(m, MsgAppResp)] == [10]
    assert follower.raft.log.first_index() == 1


def test_7_follower_whose_log_holds_the_snapshot_entry_only_commits():
    follower = make_node(2, log_terms=[1] * 10, term=1)
    follower.step(MsgSnap(to=2, sender=1, term=1, snapshot=SnapshotMeta(8, 1, ConfState(VOTERS))))
    ready = follower.ready()
    assert ready.snapshot is None
    assert follower.raft.log.committed == 8 and follower.raft.log.last_index() == 10
    assert [m.index for m in ready.messages if isinstance(m, MsgAppResp)] == [8]


class SnapshotNetwork(Network):
    """Installing a snapshot replaces the state machine: the entries a node
    applied before it are superseded (the invariants see the log after it)."""

    def _handle_ready(self, node_id, node):
        if node.raft.log.unstable.snapshot is not None:
            self.applied[node_id] = []
        super()._handle_ready(node_id, node)


def test_network_a_follower_behind_the_compaction_point_catches_up_through_a_snapshot():
    """Network style: 3 is cut off while the leader commits and compacts; after
    the heal it gets a MsgSnap, restores, and then receives the log after it."""
    network = SnapshotNetwork([1, 2, 3], seed=7)
    network.elect(1)
    network.isolate(3)
    for n in range(30):
        network.propose(1, b"v%d" % n)
    leader_storage = network.storages[1]
    applied = network.raft(1).log.applied
    leader_storage.set_snapshot(SnapshotMeta(applied, network.raft(1).term, ConfState((1, 2, 3))))
    leader_storage.compact(applied - 2)
    network.recover()
    invariants = Invariants(network)
    snapshot_seen = []
    for _ in range(30):
        snapshot_seen += [m for m in network.in_flight if isinstance(m, MsgSnap)]
        network.tick()
        invariants.check()
    assert network.raft(1).progress[3].state == STATE_REPLICATE
    assert network.storages[3].snapshot().index == applied
    network.propose(1, b"after")
    for _ in range(5):
        network.tick()
    invariants.check()
    assert network.raft(3).log.committed == network.raft(1).log.committed
    assert network.applied[3][-1].data == b"after"
    assert network.applied[3][0].index == applied + 1  # the rest came in the snapshot
