"""Raft under simulation: a scripted in-memory network, and a seeded
deterministic simulation of whole clusters.

How this works: `Network` holds RawNodes with MemoryStorages (what advance()
stored survives `crash()`, unstable entries do not). `process()` runs every
node's Ready cycle — persist, then collect messages, then apply (membership
changes through `apply_conf_change`, unless a test holds them back with
`hold_conf_changes`) — and delivers messages through filters (`drop`, `cut`,
`isolate`), so a test can script exact scenarios; `simulate(seed)` is a small
random walk over it.

`Simulation` (below, "The deterministic simulation") is the full one: 3 or 5
nodes running the real Raft core and the real MVCC apply logic, a seeded event
heap, a network that drops, duplicates, delays, reorders and partitions, disks
with a durable and a volatile part, crashes (also inside a Ready) and restarts,
pauses, clients, periodic snapshots with log compaction and snapshot
transfers; invariants after every event, then a liveness phase. A failing
seed replays exactly:

    python -m tools.raft_sim --seed S --nodes N [--ticks T] [--trace]
    python -m tools.raft_sim SEED [STEPS]        # the small random walk
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import hashlib
import heapq
import random
import sys
import time

import ormsgpack

from actors.mvcc.core import KeyEncoding, MvccWriter
from actors.mvcc.memory_backend import MemoryBackend
from actors.raft import (
    ENTRY_CONF_CHANGE, ENTRY_NORMAL, ROLE_LEADER, BadTransferee, Compacted, ConfChange, ConfChangeInvalid, Config,
    ConfState, Entry, HardState, MemoryStorage, MsgAppResp, MsgPreVote, MsgPreVoteResp, MsgSnap, MsgTimeoutNow,
    MsgVoteResp, ProposalDropped, RawNode, ReadIndexDropped, SnapshotMeta, Unavailable,
)
from actors.raft.raft import changed_conf_state
from protocol.messages import COMPARE_GREATER, TARGET_VERSION


class Network:
    def __init__(self, ids: list[int], seed: int = 1, **config_overrides):
        self.ids = sorted(ids)
        self.rng = random.Random(seed)
        self.config_overrides = dict(election_ticks=10, heartbeat_ticks=1)
        self.config_overrides.update(config_overrides)
        self.initial_conf_state = ConfState(tuple(self.ids))
        self.storages = {node_id: MemoryStorage(self.initial_conf_state) for node_id in self.ids}
        self.nodes: dict[int, RawNode] = {}
        for node_id in self.ids:
            self.start(node_id)
        self.hold_conf_changes: set[int] = set()  # nodes whose changes wait for apply_held_conf_changes()
        self.held_conf_changes: dict[int, list[ConfChange]] = {node_id: [] for node_id in self.ids}
        self.in_flight: list = []
        self.dropped: set[tuple[int, int]] = set()
        self.drop_probability = 0.0
        self.duplicate_probability = 0.0
        self.reorder = False
        self.delayed: list = []  # held back until the next tick (late, stale messages)
        self.delay_probability = 0.0
        self.applied: dict[int, list] = {node_id: [] for node_id in self.ids}
        self.read_states: dict[int, list] = {node_id: [] for node_id in self.ids}
        self.delivered_count = 0

    def start(self, node_id: int) -> None:
        config = Config(id=node_id, **self.config_overrides)
        self.nodes[node_id] = RawNode(config, self.storages[node_id], random.Random(self.rng.random()))

    def crash(self, node_id: int) -> None:
        """Lose everything not durable (unstable entries, volatile state), restart
        (from the initial configuration: the committed changes are applied again)."""
        self.in_flight = [message for message in self.in_flight if message.to != node_id]
        self.delayed = [message for message in self.delayed if message.to != node_id]
        self.applied[node_id] = []
        self.held_conf_changes[node_id] = []
        self.start(node_id)

    def add_node(self, node_id: int) -> None:
        """Start a new, empty member (it knows the initial configuration and
        learns the rest from the log, as a joining etcd member does)."""
        assert node_id not in self.nodes
        self.ids = sorted(self.ids + [node_id])
        self.storages[node_id] = MemoryStorage(self.initial_conf_state)
        self.applied[node_id] = []
        self.read_states[node_id] = []
        self.held_conf_changes[node_id] = []
        self.start(node_id)

    def apply_held_conf_changes(self, node_id: int) -> None:
        held, self.held_conf_changes[node_id] = self.held_conf_changes[node_id], []
        for change in held:
            self.nodes[node_id].apply_conf_change(change)
        self.process()

    # ---- filters ----------------------------------------------------------------

    def cut(self, a: int, b: int) -> None:
        self.dropped |= {(a, b), (b, a)}

    def isolate(self, node_id: int) -> None:
        for other in self.ids:
            if other != node_id:
                self.cut(node_id, other)

    def recover(self) -> None:
        self.dropped = set()
        self.drop_probability = 0.0
        self.duplicate_probability = 0.0
        self.delay_probability = 0.0
        self.reorder = False

    # ---- driving ----------------------------------------------------------------

    def tick(self, node_id: int | None = None, times: int = 1) -> None:
        for _ in range(times):
            self.in_flight.extend(self.delayed)
            self.delayed = []
            for target in ([node_id] if node_id else self.ids):
                self.nodes[target].tick()
            self.process()

    def process(self, max_rounds: int = 1000) -> None:
        """Run Ready cycles and deliver messages until quiet (bounded)."""
        for _ in range(max_rounds):
            progressed = False
            for node_id in self.ids:
                node = self.nodes[node_id]
                if node.has_ready():
                    progressed = True
                    self._handle_ready(node_id, node)
            if self.in_flight:
                progressed = True
                messages, self.in_flight = self.in_flight, []
                if self.reorder:
                    self.rng.shuffle(messages)
                for message in messages:
                    if message.to in self.nodes:  # (a member added to the config but not started yet: lost)
                        self.nodes[message.to].step(message)
                        self.delivered_count += 1
            if not progressed:
                return
        raise AssertionError("network did not quiesce")

    def _handle_ready(self, node_id: int, node: RawNode) -> None:
        ready = node.ready()
        # Persist (advance() moves entries into the MemoryStorage), then send, then apply.
        for message in ready.messages:
            if (message.sender, message.to) in self.dropped:
                continue
            if self.drop_probability and self.rng.random() < self.drop_probability:
                continue
            if self.delay_probability and self.rng.random() < self.delay_probability:
                self.delayed.append(message)
                continue
            self.in_flight.append(message)
            if self.duplicate_probability and self.rng.random() < self.duplicate_probability:
                self.in_flight.append(message)
        self.applied[node_id].extend(ready.committed_entries)
        for entry in ready.committed_entries:
            if entry.type == ENTRY_CONF_CHANGE:
                change = ConfChange.from_wire(ormsgpack.unpackb(entry.data))
                if node_id in self.hold_conf_changes:
                    self.held_conf_changes[node_id].append(change)
                else:
                    node.apply_conf_change(change)
        self.read_states[node_id].extend(ready.read_states)
        node.advance(ready)

    def leader(self) -> int | None:
        leaders = [node_id for node_id in self.ids if self.nodes[node_id].raft.role == ROLE_LEADER]
        return max(leaders, key=lambda node_id: self.nodes[node_id].raft.term) if leaders else None

    def elect(self, node_id: int) -> None:
        self.nodes[node_id].campaign()
        self.process()

    def propose(self, node_id: int, data: bytes) -> int:
        index = self.nodes[node_id].propose(data)
        self.process()
        return index

    def change(self, node_id: int, kind: str, member: int) -> int:
        """Propose a membership change at `node_id` and run the network."""
        index = self.nodes[node_id].propose_conf_change(ConfChange(kind, member))
        self.process()
        return index

    def raft(self, node_id: int):
        return self.nodes[node_id].raft


# ---- invariants ---------------------------------------------------------------------

class Invariants:
    """Raft's safety properties (§5.2 Figure 3), checked across the run."""

    def __init__(self, network: Network):
        self.network = network
        self.leader_of_term: dict[int, int] = {}
        self.committed: dict[int, tuple[int, bytes]] = {}  # index -> (term, data)

    def check(self) -> None:
        network = self.network
        for node_id in network.ids:
            raft = network.raft(node_id)
            if raft.role == ROLE_LEADER:
                # Election safety: at most one leader per term.
                previous = self.leader_of_term.setdefault(raft.term, node_id)
                assert previous == node_id, f"two leaders in term {raft.term}: {previous}, {node_id}"
            # State machine safety: whatever a node applied is what everyone applies.
            for entry in network.applied[node_id]:
                known = self.committed.setdefault(entry.index, (entry.term, entry.data))
                assert known == (entry.term, entry.data), f"node {node_id} applied a different entry {entry.index}"
            applied = [entry.index for entry in network.applied[node_id]]
            assert applied == list(range(applied[0], applied[0] + len(applied))) if applied else True
        # Log matching (§5.3): same index and term => same prefix (checked on the last common entry).
        for a in network.ids:
            for b in network.ids:
                if a < b:
                    self._check_log_matching(network.raft(a).log, network.raft(b).log)

    @staticmethod
    def _check_log_matching(log_a, log_b) -> None:
        high = min(log_a.last_index(), log_b.last_index())
        low = max(log_a.first_index(), log_b.first_index())
        for index in range(high, low - 1, -1):
            if log_a.term(index) == log_b.term(index):
                for earlier in range(low, index + 1):
                    assert log_a.term(earlier) == log_b.term(earlier), f"log matching broken at {earlier}"
                return


def simulate(seed: int, steps: int = 400, size: int = 3) -> Network:
    """Random ticks, proposals, drops, partitions and crashes; invariants after every step."""
    rng = random.Random(seed)
    network = Network(list(range(1, size + 1)), seed=seed)
    invariants = Invariants(network)
    proposals = 0
    for _ in range(steps):
        action = rng.random()
        if action < 0.55:
            network.tick(rng.choice(network.ids))
        elif action < 0.80:
            leader = network.leader()
            if leader is not None:
                proposals += 1
                try:
                    network.nodes[leader].propose(b"p%d" % proposals)
                except ProposalDropped:
                    pass
                network.process()
        elif action < 0.85:
            node_id = rng.choice(network.ids)
            try:
                network.nodes[node_id].read_index(("read", proposals))
            except ReadIndexDropped:
                pass
            network.process()
        elif action < 0.90:
            network.isolate(rng.choice(network.ids))
        elif action < 0.93:
            network.drop_probability = rng.choice([0.0, 0.1, 0.3])
            network.duplicate_probability = rng.choice([0.0, 0.1])
            network.delay_probability = rng.choice([0.0, 0.2])
            network.reorder = rng.random() < 0.5
        elif action < 0.97:
            network.recover()
        else:
            network.crash(rng.choice(network.ids))
        invariants.check()
    # Heal and let it settle: a leader emerges and everything committed is applied everywhere.
    network.recover()
    for _ in range(200):
        network.tick()
        invariants.check()
    return network


# =====================================================================================
# The deterministic simulation (issue 4, "Deterministic simulation")
# =====================================================================================
#
# Theory of operation. One `random.Random(seed)` drives everything: the fault
# knobs of the run, the nodes' election jitter, network delays, the nemesis and
# the clients. Time is an integer (`TICK_UNITS` per Raft tick); an event heap
# ordered by (time, sequence number) is the only scheduler, so the same seed
# gives the same trace whatever PYTHONHASHSEED is (no set or dict of strings is
# iterated; node ids are ints and always walked in sorted order).
#
# Each simulated node runs the REAL core (RawNode) the way actors/raft_log.py
# does, one "pass" at a time: step every queued input, then carry out each
# Ready in the contract's order — write entries and hard state to the disk,
# fsync when `must_sync()`, send, apply committed entries to the REAL MVCC
# writer (actors.mvcc.core over memory_backend), advance. The disk keeps a
# durable part and a volatile part: a crash keeps the durable part plus a
# random prefix of the volatile writes (a torn WAL tail), and a node restarts
# from its durable part only. A crash can also strike inside a pass, between
# the write and the fsync (nothing was sent) or between send and apply. The
# MVCC store stands for LMDB: each apply batch is atomic and durable, and on
# restart entries at or below its applied index are skipped, as the applier
# does.
#
# Membership and leadership: the nemesis also asks the leader (only when
# there is one) to change the configuration — add a learner (a new node id,
# an empty disk, as a new etcd member) and later promote it, add a new voter
# directly, remove a voter (the leader too) or a learner, never the last voter
# and never more than one node beyond the initial size — or to transfer
# leadership to a random voter. The core refuses a change while another is
# unapplied; the checker verifies that every node applies the same
# configuration at each index, that successive configurations differ by one
# member, and that a leader only appends a change when no earlier one is
# unapplied in its log. A member is started when the cluster first applies
# its addition (an empty disk and store), and stopped for good a little after
# the cluster first applies its removal (etcd's removed member shuts down; its
# peers refuse it).
#
# Snapshots, as actors/raft_log.py and actors/snapshot_stream.py do them.
# Every `snapshot_entries` applied entries (a knob) a node writes a snapshot
# marker (index, term, configuration: `conf_state_at`) at its applied index,
# synced, and compacts its disk and its MemoryStorage to `catchup_entries`
# entries before the marker, so lagging, restarted and new members often need
# a snapshot. A node restarts from its marker (the core's configuration is
# the marker's, `Config.applied` its index) and the durable entries; the
# committed changes after the marker are applied to the core again. The
# applier's store keeps its applied index, term, configuration (the member
# table) and a digest chained over every entry it applied. When the core
# sends MsgSnap, the leader's store as it is now (its own index, term and
# configuration, as the real copy reports them) travels with it — the same
# network faults apply (a lost transfer, a cut link, a crashed receiver: the
# leader reports it failed after a stall; duplicates; late, stale copies).
# The receiver installs a copy only if it is ahead of its store, then steps
# the MsgSnap, rewritten to the copy's index, term and configuration (also
# when the store already holds it: STEP_SNAPSHOTS_THE_STORE_HOLDS); the core
# may reset its log (Ready.snapshot, persisted first) or only move its commit. The
# result goes back to the leader, which calls `report_snapshot`. A crash
# between the install and the persisted reset leaves a store ahead of the
# log: the restart finishes the reset as `finish_interrupted_install` does.
#
# Invariants are checked after every event (see `SimulationChecker`). After the
# chaos phase everything is healed and the cluster must elect a leader, commit
# a new entry and converge (equal applied index, revision, KV hash and
# configuration on every member of the current configuration) within a bound
# of simulated ticks.
#

TICK_UNITS = 100  # simulated time units per Raft tick (one heartbeat interval)
ELECTION_TICKS = 10
MAX_READY_CYCLES = 3  # Ready cycles per pass, as actors/raft_log.py bounds them
LIVENESS_COMMIT_TICKS = 100  # after healing: a leader and a new committed entry within this
LIVENESS_CONVERGE_TICKS = 100  # ... then every node applied it, equal hashes, within this
HASH_EVERY = 32  # the stores' KV hashes are compared at every 32nd applied index
EXTRA_MEMBERS_MAX = 1  # members beyond the initial size the nemesis may add
REMOVED_STOP_TICKS_MAX = 3  # a removed member is stopped within this many ticks of the removal
KEYS = tuple(b"k%d" % number for number in range(8))
SNAPSHOT_DELAY_UNITS_MAX = 2 * TICK_UNITS  # a store copy takes longer to stream than a message
SNAPSHOT_STALL_TICKS_MAX = 5  # a transfer not answered within delay + this is reported failed
# A copy not ahead of the receiver's store is not installed; its MsgSnap is
# still stepped (the store holds that state), so the core answers at its
# commit index, as etcd's does. False = the actor's current behaviour (the
# MsgSnap is dropped with the copy): a follower that installed a snapshot
# whose acknowledgement was lost is then sent the same snapshot for good
# (seed 101533, 3 nodes, 80 ticks; see test_raft_sim.py).
STEP_SNAPSHOTS_THE_STORE_HOLDS = True


class SimulationFailure(AssertionError):
    pass


@dataclasses.dataclass(slots=True)
class Knobs:
    """The fault intensities and Raft limits of one run, drawn from the seed."""

    drop: float
    duplicate: float
    long_delay: float
    nemesis_ticks_max: int
    crash_weight: int
    crash_in_pass: float
    partition_weight: int
    pause_weight: int
    client_interval_units: int
    membership_weight: int
    transfer_weight: int
    pre_vote: bool
    check_quorum: bool
    max_inflight_appends: int
    max_append_entries_bytes: int
    snapshot_entries: int  # a snapshot marker every this many applied entries
    catchup_entries: int  # entries kept before the marker when compacting

    @classmethod
    def draw(cls, rng: random.Random) -> "Knobs":
        return cls(
            drop=rng.choice((0.0, 0.01, 0.05, 0.2)),
            duplicate=rng.choice((0.0, 0.02, 0.1)),
            long_delay=rng.choice((0.0, 0.02, 0.1)),
            nemesis_ticks_max=rng.choice((4, 10, 25)),
            crash_weight=rng.choice((0, 1, 3)),
            crash_in_pass=rng.choice((0.0, 0.3, 0.7)),
            partition_weight=rng.choice((0, 1, 3)),
            pause_weight=rng.choice((0, 1)),
            client_interval_units=rng.choice((60, 150, 400)),
            membership_weight=rng.choice((0, 1, 3)),
            transfer_weight=rng.choice((0, 1, 2)),
            pre_vote=rng.random() < 0.8,
            check_quorum=rng.random() < 0.8,
            max_inflight_appends=rng.choice((1, 2, 8, 256)),
            max_append_entries_bytes=rng.choice((1024, 4096, 1 << 20)),
            snapshot_entries=rng.choice((3, 8, 20, 60)),
            catchup_entries=rng.choice((0, 1, 4, 10)),
        )


class SimDisk:
    """A node's WAL: written records are volatile until `sync()`. The durable
    part is kept replayed (snapshot marker, hard state, entries), as WAL
    recovery would give it. The durable entries are [first, last_index()];
    a compaction drops a prefix, a reset to an installed snapshot drops them all."""

    def __init__(self, conf_state: ConfState):
        self.hard_state = HardState()
        self.marker = SnapshotMeta(0, 0, conf_state)
        self.first = 1  # index of entries[0]; <= marker.index + 1
        self.entries: list[Entry] = []
        self.volatile: list[tuple] = []
        self.sync_count = 0

    def write(self, record: tuple) -> None:
        self.volatile.append(record)

    def sync(self) -> None:
        for record in self.volatile:
            self._make_durable(record)
        self.volatile = []
        self.sync_count += 1

    def crash(self, rng: random.Random) -> int:
        """Lose the volatile writes, except a random prefix (a torn tail: the
        WAL's per-record checksums stop recovery at the first broken record).
        Returns how many were lost."""
        kept = rng.randint(0, len(self.volatile)) if self.volatile and rng.random() < 0.5 else 0
        for record in self.volatile[:kept]:
            self._make_durable(record)
        lost = len(self.volatile) - kept
        self.volatile = []
        return lost

    def _make_durable(self, record: tuple) -> None:
        kind = record[0]
        if kind == "entries":
            entries = record[1]
            start = entries[0].index
            assert start <= self.last_index() + 1, f"WAL gap: entries from {start} after {self.last_index()}"
            if start < self.first:  # (below the compaction point: committed, already here)
                entries = entries[self.first - start:]
                if not entries:
                    return
                start = self.first
            del self.entries[start - self.first:]
            self.entries.extend(entries)
        elif kind == "hard":
            self.hard_state = record[1]
        elif kind == "marker":  # a snapshot marker (the entries stay until released)
            assert record[1].index >= self.marker.index, (record[1], self.marker)
            self.marker = record[1]
        else:  # "reset": the log restarts at an installed snapshot
            self.reset_to_snapshot(record[1], record[2])

    def reset_to_snapshot(self, marker: SnapshotMeta, hard_state: HardState) -> None:
        self.marker, self.hard_state = marker, hard_state
        self.first, self.entries = marker.index + 1, []

    def release(self, index: int) -> None:
        """Drop the durable entries below `index` (the WAL's released segments)."""
        if index > self.first:
            del self.entries[:index - self.first]
            self.first = index

    def last_index(self) -> int:
        return self.first + len(self.entries) - 1

    def term(self, index: int) -> int | None:
        if self.first <= index <= self.last_index():
            return self.entries[index - self.first].term
        return self.marker.term if index == self.marker.index else None

    def holds(self, index: int, term: int) -> bool:
        """Whether committed entry (index, term) is durable here (a snapshot
        marker at or above a committed index holds it in the store)."""
        return self.term(index) == term or index < self.marker.index

    def storage(self) -> MemoryStorage:
        return MemoryStorage.from_entries(self.marker.conf_state, self.hard_state, self.marker, list(self.entries))


@dataclasses.dataclass(frozen=True, slots=True)
class SnapshotData:
    """What travels with a MsgSnap: a copy of the sender's store and what the
    store says about itself (its applied index and term, its member table,
    the digest of every entry applied to reach it)."""

    index: int
    term: int
    conf_state: ConfState
    digest: bytes
    backend: MemoryBackend


@dataclasses.dataclass(frozen=True, slots=True)
class SnapshotTransfer:
    message: MsgSnap
    data: SnapshotData
    transfer_id: int
    sender_incarnation: int


def copy_backend(backend: MemoryBackend) -> MemoryBackend:
    copy = MemoryBackend()
    copy.tables = {name: dict(table) for name, table in backend.tables.items()}
    copy.sorted_keys = {name: list(keys) for name, keys in backend.sorted_keys.items()}
    return copy


def chain_digest(digest: bytes, entry: Entry) -> bytes:
    """The applied-entry digest after `entry`."""
    header = b"%d:%d:%d:" % (entry.index, entry.term, entry.type)
    return hashlib.blake2b(digest + header + entry.data, digest_size=8).digest()


class SimNode:
    """One member: the core, its disk and its MVCC store (durable: LMDB)."""

    def __init__(self, node_id: int, conf_state: ConfState):
        self.id = node_id
        self.disk = SimDisk(conf_state)
        self.backend = MemoryBackend()
        # The store (durable, as LMDB): applied index and term, member table, entry digest.
        self.store_applied = 0
        self.store_term = 0
        self.store_conf = conf_state
        self.store_digest = b""
        self.applied_seen = 0  # the core's applied index, in this life
        self.snapshots_out: dict[int, int] = {}  # peer -> transfer id, in this life
        self.raw: RawNode | None = None
        self.up = False
        self.incarnation = 0
        self.inbox: list = []
        self.pass_scheduled = False
        self.paused_until = 0
        self.tick_units = TICK_UNITS
        self.crash_in_pass: str | None = None  # "before_sync" | "before_apply": strike in the next pass
        self.term_seen = 0  # in this incarnation
        self.commit_seen = 0
        self.commit_checked = 0  # committed entries compared with the cluster's, in this life
        self.leader_checked = False
        self.removed = False  # stopped for good: the cluster removed it
        self.commit_quorum_checked = 0  # the commit index checked in term commit_quorum_term
        self.commit_quorum_term = 0
        self.conf_index = 0  # index of the last change it applied, in this life

    def writer(self) -> MvccWriter:
        return MvccWriter(self.backend, _ENCODING, member_id=self.id)


_ENCODING = KeyEncoding()


class SimulationChecker:
    """Safety invariants, checked after every event.

    - election safety: at most one leader per term;
    - log matching (§5.3): equal (index, term) => equal prefixes, over whole logs;
    - leader completeness (§5.4): an entry known committed in term T is in the
      log of every leader of term >= T;
    - state machine safety: no two nodes commit or apply different entries at
      one index, and their MVCC stores agree (revision, KV hash) at equal
      applied index;
    - monotonicity: a node's term and commit never go back within a life, its
      durable term and commit never go back, and after a restart its term is no
      lower than any term it sent (persist before send); it never grants two
      votes in one term, and never acknowledges entries it has not made durable;
    - applied <= committed, in the core and in the store;
    - ReadIndex: a read's index is >= every index known committed when it was asked;
    - commit: what a leader commits is durable on a majority of the voters of
      the configuration it counted with (learners never count);
    - membership: every node applies the same configuration at each index, in
      index order; each differs from the one before by one member; a leader
      appends a change only when no earlier change in its log is unapplied;
      the store's member table is the configuration at its applied index;
    - snapshots: an installed store equals what applying the log up to its
      index gives (the same revision, entry digest and, where known, KV hash
      as the stores that applied the entries); a snapshot marker, a restored
      core and a restarted core carry the configuration at their index; the
      store's applied index never goes back, nor the core's within a life.
    """

    def __init__(self, sim: "Simulation"):
        self.sim = sim
        self.leader_of_term: dict[int, int] = {}
        self.committed_terms: list[int] = [0]  # index -> term of the committed entry (position 0 unused)
        self.commit_term: list[int] = [0]  # index -> lowest term in which it was known committed
        self.applied_entries: dict[int, tuple] = {}
        self.entry_identity: dict[tuple[int, int], tuple[int, bytes]] = {}
        self.store_state: dict[tuple[int, int], tuple] = {}  # applied batch -> (revision, hash, answers)
        self.revision_at: dict[int, int] = {}  # applied index -> store revision
        self.durable: dict[int, tuple[int, int]] = {}  # node -> (term, commit) last seen on disk
        self.exposed_term: dict[int, int] = {}  # node -> highest term it sent
        self.votes_granted: dict[tuple[int, int], int] = {}  # (node, term) -> candidate
        self.conf_at_index: dict[int, ConfState] = {0: sim.initial_conf_state}  # the change applied at an index
        self.conf_indexes: list[int] = [0]  # the keys of conf_at_index, sorted
        self.digest_at: dict[int, bytes] = {}  # applied index -> digest of the entries up to it
        self.kv_hash_at: dict[int, int] = {}  # applied index -> KV hash (where one was computed)

    def fail(self, what: str) -> None:
        raise SimulationFailure(what)

    # ---- per event -------------------------------------------------------------

    def check_node(self, node: SimNode) -> None:
        if not node.up:
            return
        raft = node.raw.raft
        log = raft.log
        if raft.term < node.term_seen:
            self.fail(f"node {node.id}: term went back {node.term_seen} -> {raft.term}")
        if log.committed < node.commit_seen:
            self.fail(f"node {node.id}: commit went back {node.commit_seen} -> {log.committed}")
        node.term_seen, node.commit_seen = raft.term, log.committed
        if log.applied < node.applied_seen:
            self.fail(f"node {node.id}: applied went back {node.applied_seen} -> {log.applied}")
        node.applied_seen = log.applied
        if log.applied > log.committed:
            self.fail(f"node {node.id}: applied {log.applied} > committed {log.committed}")
        durable = node.disk.hard_state
        previous = self.durable.get(node.id, (0, 0))
        if durable.term < previous[0] or durable.commit < previous[1]:
            self.fail(f"node {node.id}: durable hard state went back {previous} -> {durable}")
        self.durable[node.id] = (durable.term, durable.commit)
        if raft.role == ROLE_LEADER:
            holder = self.leader_of_term.setdefault(raft.term, node.id)
            if holder != node.id:
                self.fail(f"two leaders in term {raft.term}: {holder} and {node.id}")
        if log.committed > node.commit_checked:
            self._learn_committed(node)
        if raft.role == ROLE_LEADER and not node.leader_checked:
            node.leader_checked = True  # a leader only appends during its term: check it once
            self._check_leader_complete(node, 1)
        elif raft.role != ROLE_LEADER:
            node.leader_checked = False
        if node.store_applied > len(self.committed_terms) - 1:
            self.fail(f"node {node.id}: store applied {node.store_applied} > committed {len(self.committed_terms) - 1}")

    def _learn_committed(self, node: SimNode) -> None:
        """Compare the node's newly committed entries with what others committed."""
        log, term = node.raw.raft.log, node.raw.raft.term
        old = len(self.committed_terms) - 1
        # (Below the log's first index the entries are in a snapshot: unknown here.)
        for index in range(max(node.commit_checked + 1, log.first_index() - 1), log.committed + 1):
            entry_term = log.term(index)
            if entry_term is None and index <= old:
                continue
            if index <= old:
                if entry_term != self.committed_terms[index]:
                    self.fail(f"node {node.id}: index {index} committed with term {entry_term}, "
                              f"others committed term {self.committed_terms[index]}")
            else:
                self.committed_terms.append(entry_term)
                self.commit_term.append(term)
        node.commit_checked = log.committed
        if len(self.committed_terms) - 1 > old:
            for other in self.sim.live_nodes():
                if other.raw.raft.role == ROLE_LEADER:
                    self._check_leader_complete(other, old + 1)

    def check_commit_quorum(self, node: SimNode) -> None:
        """A leader's commit index is durable on a majority of the voters of
        its configuration (learners do not count). Called wherever the core
        may commit (after stepping messages, after applying a change, after
        advance), so the configuration is the one the core counted with. By
        log matching, checking the highest committed entry covers the rest."""
        raft = node.raw.raft
        if raft.role != ROLE_LEADER:
            return
        if node.commit_quorum_term != raft.term:
            # A new leader's commit index is what it learned as a follower
            # (decided under some earlier configuration): check its own only.
            node.commit_quorum_term, node.commit_quorum_checked = raft.term, raft.log.committed
            return
        if raft.log.committed <= node.commit_quorum_checked:
            return
        node.commit_quorum_checked = index = raft.log.committed
        entry_term = raft.log.term(index)
        holders = [voter for voter in raft.voters if voter in self.sim.nodes
                   and self.sim.nodes[voter].disk.holds(index, entry_term)]
        if len(holders) < len(raft.voters) // 2 + 1:
            self.fail(f"leader {node.id} committed {index} (term {entry_term}) held durably only by {holders} "
                      f"of voters {raft.voters}")

    def _check_leader_complete(self, node: SimNode, low: int) -> None:
        log, term = node.raw.raft.log, node.raw.raft.term
        for index in range(max(low, log.first_index() - 1), len(self.committed_terms)):
            if self.commit_term[index] <= term and log.term(index) != self.committed_terms[index]:
                self.fail(f"leader {node.id} of term {term} lacks committed entry {index} "
                          f"(term {self.committed_terms[index]}, committed in term {self.commit_term[index]})")

    def on_persist(self, node: SimNode, entries: list[Entry]) -> None:
        """Log matching (§5.3), checked entry by entry as logs grow: one leader
        makes one entry per (index, term), so its previous entry's term and its
        data are a function of (index, term) across all logs and all time. By
        induction, equal (index, term) then means equal prefixes."""
        log = node.raw.raft.log
        seen = self.entry_identity
        for entry in entries:
            identity = (log.term(entry.index - 1) if entry.index > 1 else 0, entry.data)
            if identity[0] is None:
                continue  # (the previous entry is compacted: nothing to compare)
            known = seen.setdefault((entry.index, entry.term), identity)
            if known != identity:
                self.fail(f"log matching broken: node {node.id} has entry ({entry.index}, term {entry.term}) "
                          f"after term {identity[0]}, another log after term {known[0]} (or other data)")

    # ---- hooks called by the simulation ---------------------------------------

    def on_send(self, node: SimNode, message) -> None:
        """Persist before send: what the message claims must be on the durable disk."""
        disk = node.disk
        if isinstance(message, (MsgPreVote, MsgPreVoteResp)):
            return  # a pre-vote carries a future term and changes nothing (thesis §9.6)
        if message.term > self.exposed_term.get(node.id, 0):
            self.exposed_term[node.id] = message.term
        if message.term > disk.hard_state.term:
            self.fail(f"node {node.id} sent term {message.term} before making it durable ({disk.hard_state})")
        if isinstance(message, MsgVoteResp) and not message.reject:
            key = (node.id, message.term)
            granted = self.votes_granted.setdefault(key, message.to)
            if granted != message.to:
                self.fail(f"node {node.id} voted twice in term {message.term}: {granted} and {message.to}")
            durable = disk.hard_state  # a later durable term supersedes the vote (it can't be cast again)
            if durable.term < message.term or (durable.term == message.term and durable.vote != message.to):
                self.fail(f"node {node.id} granted a vote not durable: {durable}")
        elif (isinstance(message, MsgAppResp) and not message.reject and message.index > disk.last_index()
              and message.term == disk.hard_state.term):
            # (An ack of an older term may name entries that a higher-term leader's
            # append truncated in the same pass: the same durable outcome as acking
            # them durably first and truncating them after, which Raft allows.)
            self.fail(f"node {node.id} acknowledged index {message.index}, durable only to {disk.last_index()}")

    def on_restart(self, node: SimNode) -> None:
        raft = node.raw.raft
        if raft.term < self.exposed_term.get(node.id, 0):
            self.fail(f"node {node.id} restarted in term {raft.term}, below the term "
                      f"{self.exposed_term[node.id]} it had sent")
        previous = self.durable.get(node.id, (0, 0))
        if raft.term < previous[0] or raft.log.committed < previous[1]:
            self.fail(f"node {node.id} restarted with (term, commit) ({raft.term}, {raft.log.committed}) "
                      f"below its durable {previous}")
        marker = node.disk.marker
        if node.raw.conf_state() != self.conf_at(marker.index):
            self.fail(f"node {node.id} restarted from marker {marker} with configuration {node.raw.conf_state()}, "
                      f"the configuration at {marker.index} is {self.conf_at(marker.index)}")
        if marker.index > node.store_applied:
            self.fail(f"node {node.id}: snapshot marker {marker.index} above its store's applied {node.store_applied}")

    def conf_at(self, index: int) -> ConfState:
        """The configuration after every entry up to `index` (an applied index)."""
        return self.conf_at_index[self.conf_indexes[bisect.bisect_right(self.conf_indexes, index) - 1]]

    def on_marker(self, node: SimNode, marker: SnapshotMeta) -> None:
        if marker.conf_state != self.conf_at(marker.index):
            self.fail(f"node {node.id}: snapshot marker {marker} carries a configuration other than the one "
                      f"at its index, {self.conf_at(marker.index)}")
        if marker.index > 0 and marker.term != self.committed_terms[marker.index]:
            self.fail(f"node {node.id}: snapshot marker {marker}, committed term {self.committed_terms[marker.index]}")

    def on_install(self, node: SimNode, data: SnapshotData, kv_hash: int, revision: int) -> None:
        """An installed store is what applying the log up to its index gives."""
        index = data.index
        if index <= node.store_applied:
            self.fail(f"node {node.id}: store applied would go back {node.store_applied} -> {index}")
        if index > len(self.committed_terms) - 1 or self.committed_terms[index] != data.term:
            self.fail(f"node {node.id}: snapshot ({index}, term {data.term}) is not a committed entry")
        if data.conf_state != self.conf_at(index):
            self.fail(f"node {node.id}: snapshot at {index} has configuration {data.conf_state}, "
                      f"the configuration there is {self.conf_at(index)}")
        known = (self.digest_at.setdefault(index, data.digest), self.revision_at.setdefault(index, revision),
                 self.kv_hash_at.setdefault(index, kv_hash))
        if known != (data.digest, revision, kv_hash):
            self.fail(f"node {node.id}: snapshot at {index} (digest, revision, KV hash) "
                      f"{(data.digest.hex(), revision, kv_hash)} differs from the log's {known}")

    def on_restore(self, node: SimNode, snapshot: SnapshotMeta) -> None:
        """The core reset its log to a snapshot: its configuration is the one there."""
        if node.raw.conf_state() != self.conf_at(snapshot.index):
            self.fail(f"node {node.id} restored {snapshot} into configuration {node.raw.conf_state()}, "
                      f"the configuration there is {self.conf_at(snapshot.index)}")
        node.conf_index = snapshot.index

    def on_apply(self, node: SimNode, entries: list[Entry], revision: int, kv_hash: int | None,
                 results: list) -> None:
        for entry in entries:
            known = self.applied_entries.setdefault(entry.index, (entry.term, entry.data))
            if known != (entry.term, entry.data):
                self.fail(f"node {node.id} applied a different entry at index {entry.index}")
        index = entries[-1].index
        # The store's revision (and, every HASH_EVERY indexes, its KV hash) at an
        # applied index, and the answers of each batch, agree on every node.
        state = (revision, kv_hash, hashlib.blake2b(ormsgpack.packb(results), digest_size=8).digest())
        known = self.store_state.setdefault((entries[0].index, index), state)
        if known[0] != revision or (kv_hash is not None and known[1] not in (None, kv_hash)) or known[2] != state[2]:
            self.fail(f"node {node.id}: store state at applied index {index} (revision, hash, answers) "
                      f"{state} differs from another node's {known}")
        previous = self.revision_at.setdefault(index, revision)
        if previous != revision:
            self.fail(f"node {node.id}: revision {revision} at applied index {index}, another node had {previous}")
        known_digest = self.digest_at.setdefault(index, node.store_digest)
        if known_digest != node.store_digest:
            self.fail(f"node {node.id}: applied-entry digest at {index} differs from another node's")
        if kv_hash is not None:
            known_hash = self.kv_hash_at.setdefault(index, kv_hash)
            if known_hash != kv_hash:
                self.fail(f"node {node.id}: KV hash {kv_hash} at applied index {index}, elsewhere {known_hash}")
        if node.store_conf != self.conf_at(index):
            self.fail(f"node {node.id}: store member table {node.store_conf} at {index}, "
                      f"the configuration there is {self.conf_at(index)}")

    def on_conf_change(self, node: SimNode, index: int, previous: ConfState, conf_state: ConfState) -> None:
        if index not in self.conf_at_index:
            self.conf_at_index[index] = conf_state
            bisect.insort(self.conf_indexes, index)
        known = self.conf_at_index[index]
        if known != conf_state:
            self.fail(f"node {node.id} applied configuration {conf_state} at index {index}, another node {known}")
        if index <= node.conf_index:
            self.fail(f"node {node.id} applied a change at {index} after one at {node.conf_index}")
        node.conf_index = index
        changed = set(previous.voters) ^ set(conf_state.voters)
        changed |= set(previous.learners) ^ set(conf_state.learners)
        if len(changed) > 1:
            self.fail(f"node {node.id}: configuration {previous} -> {conf_state} changes more than one member")

    def on_propose_conf_change(self, node: SimNode, index: int) -> None:
        """One at a time: no unapplied change precedes a leader's new one."""
        raft = node.raw.raft
        earlier = [position for position in range(raft.log.applied + 1, index)
                   if raft.log.slice(position, position + 1)[0].type == ENTRY_CONF_CHANGE]
        if earlier or raft.unapplied_conf_indexes:
            self.fail(f"leader {node.id} appended a change at {index} with unapplied changes at "
                      f"{earlier or raft.unapplied_conf_indexes}")

    def on_read_state(self, node: SimNode, read_state, committed_when_asked: int) -> None:
        if read_state.index < committed_when_asked:
            self.fail(f"node {node.id}: read index {read_state.index} below the commit index "
                      f"{committed_when_asked} known when the read was asked (stale read)")


class Simulation:
    """A seeded run: chaos for `chaos_ticks`, then heal and require liveness."""

    def __init__(self, seed: int, nodes: int = 3, chaos_ticks: int = 200, trace: bool = False):
        self.seed = seed
        self.size = nodes
        self.chaos_ticks = chaos_ticks
        self.rng = random.Random(seed)
        self.knobs = Knobs.draw(self.rng)
        self.ids = list(range(1, nodes + 1))
        self.initial_conf_state = ConfState(tuple(self.ids))
        self.conf_state = self.initial_conf_state  # the latest configuration applied anywhere
        self.conf_index = 0
        self.next_node_id = nodes + 1
        self.nodes = {node_id: SimNode(node_id, self.initial_conf_state) for node_id in self.ids}
        self.now = 0
        self.heap: list = []
        self.sequence = 0
        self.blocked: set[tuple[int, int]] = set()  # directed links cut
        self.parked: list = []  # messages held by a cut link, replayed on heal (ZeroMQ queues)
        self.healed = False
        self.events = 0
        self.delivered = 0
        self.requests = 0
        self.counts = {"crashes": 0, "crashes_in_pass": 0, "restarts": 0, "partitions": 0, "pauses": 0,
                       "reads_served": 0, "writes_lost": 0, "members_added": 0, "members_promoted": 0,
                       "members_removed": 0, "transfers_started": 0, "timeout_now_sent": 0,
                       "conf_changes_pending": 0, "snapshots_taken": 0, "snapshots_sent": 0,
                       "snapshot_transfers_failed": 0, "snapshots_installed": 0, "snapshots_refused": 0,
                       "snapshot_restores": 0, "restarts_from_snapshot": 0, "installs_finished_at_restart": 0}
        self.transfers = 0
        self.reads_pending: dict[int, int] = {}  # read id -> commit known when asked
        self.trace_lines: list[str] | None = [] if trace else None
        self.trace_hash = hashlib.blake2b(digest_size=16)
        self.checker = SimulationChecker(self)
        self.recovery_ticks = -1  # ticks from healing to convergence, once run
        for node_id in self.ids:
            self._boot(self.nodes[node_id])
        self._schedule(self.rng.randrange(self.knobs.client_interval_units), "client", 0)
        self._schedule(TICK_UNITS * self.rng.randint(1, self.knobs.nemesis_ticks_max), "nemesis", 0)

    def _boot(self, node: SimNode) -> None:
        self._start_node(node)
        # Clocks drift: each node's tick interval is off by up to 10%.
        node.tick_units = TICK_UNITS + self.rng.randint(-TICK_UNITS // 10, TICK_UNITS // 10)
        self._schedule(self.rng.randrange(TICK_UNITS), "tick", node.id)

    # ---- scheduling ---------------------------------------------------------------

    def _schedule(self, delay: int, kind: str, node_id: int, payload=None) -> None:
        self.sequence += 1
        heapq.heappush(self.heap, (self.now + delay, self.sequence, kind, node_id, payload))

    def _trace(self, line: str) -> None:
        self.trace_hash.update(line.encode())
        if self.trace_lines is not None:
            self.trace_lines.append(line)

    def live_nodes(self) -> list[SimNode]:
        return [self.nodes[node_id] for node_id in self.ids if self.nodes[node_id].up]

    def members(self) -> list[SimNode]:
        """The nodes of the current configuration (voters and learners)."""
        return [self.nodes[node_id] for node_id in self.conf_state.members()]

    def max_commit(self) -> int:
        return len(self.checker.committed_terms) - 1

    # ---- running ------------------------------------------------------------------

    def run(self) -> "Simulation":
        self.run_until(self.chaos_ticks * TICK_UNITS)
        self.heal()
        start = self.now
        # Without pre-vote, a node whose log is behind disrupts each election it
        # starts (its higher term resets every timer) and can win the timeout
        # race round after round (seed 3361, 5 nodes, 120 ticks, before clock
        # drift was modelled: 13 lost rounds in a row), so liveness is only
        # probable there: allow it more rounds.
        commit_ticks = LIVENESS_COMMIT_TICKS if self.knobs.pre_vote else 3 * LIVENESS_COMMIT_TICKS
        commit_deadline = start + commit_ticks * TICK_UNITS
        target = None  # (term, index) of the entry proposed after healing
        while not self._committed(target):  # bounded by the deadline
            if self.now >= commit_deadline:
                self.fail_liveness(f"no new entry committed (last proposed: {target})", start)
            leader = self.leader()
            if leader is not None and (target is None or leader.raw.raft.term != target[0]):
                index = self._propose(leader, [(0, "put", self._put_body(b"liveness", b"%d" % self.now))])
                if index is not None:
                    target = (leader.raw.raft.term, index)
            self.run_until(self.now + TICK_UNITS)
        converge_deadline = self.now + LIVENESS_CONVERGE_TICKS * TICK_UNITS
        while not self.converged(target[1]):  # bounded by the deadline
            if self.now >= converge_deadline:
                self.fail_liveness(f"nodes did not all apply up to {target[1]}", start)
            self.run_until(self.now + TICK_UNITS)
        self.recovery_ticks = (self.now - start) // TICK_UNITS
        return self

    def _committed(self, target: tuple[int, int] | None) -> bool:
        if target is None or self.max_commit() < target[1]:
            return False
        return self.checker.committed_terms[target[1]] == target[0]

    def fail_liveness(self, what: str, start: int) -> None:
        statuses = [self.nodes[node_id].raw.status() for node_id in self.ids if self.nodes[node_id].up]
        raise SimulationFailure(f"liveness: {what} within {(self.now - start) // TICK_UNITS} ticks of healing; "
                                f"{statuses}")

    def converged(self, index: int) -> bool:
        """Every member of the current configuration is up, applied `index`, and
        their stores and configurations agree."""
        states = set()
        members = self.members()
        for node in members:
            if not node.up or node.store_applied < index:
                return False
            states.add((node.store_applied, node.writer().revision, node.raw.conf_state()))
        if len(states) != 1:
            return False
        if members[0].raw.conf_state() != self.conf_state:
            raise SimulationFailure(f"members converged on configuration {members[0].raw.conf_state()}, "
                                    f"the cluster applied {self.conf_state}")
        hashes = {node.writer().hash_kv(0)["hash"] for node in members}
        if len(hashes) != 1:
            raise SimulationFailure(f"stores at equal applied index {states} have different hashes {hashes}")
        return True

    def run_until(self, end: int) -> None:
        heap = self.heap
        while heap and heap[0][0] <= end:  # the one unbounded loop: the event loop (bounded by time)
            time, _, kind, node_id, payload = heapq.heappop(heap)
            self.now = time
            self.events += 1
            self._dispatch(kind, node_id, payload)
        self.now = end

    def _dispatch(self, kind: str, node_id: int, payload) -> None:
        if kind == "deliver":
            self._deliver(payload)
        elif kind == "pass":
            self._pass(self.nodes[node_id])
        elif kind == "tick":
            self._tick(self.nodes[node_id])
        elif kind == "client":
            self._client_request()
        elif kind == "nemesis":
            self._nemesis()
        elif kind == "restart":
            self._restart_node(self.nodes[node_id])
        elif kind == "stop":
            self._stop_removed(self.nodes[node_id])
        elif kind == "snapshot":
            self._deliver_snapshot(payload)
        elif kind == "snapshot_end":
            self._snapshot_transfer_ended(node_id, *payload)
        else:
            raise AssertionError(kind)

    def leader(self) -> SimNode | None:
        leaders = [node for node in self.live_nodes() if node.raw.raft.role == ROLE_LEADER]
        return max(leaders, key=lambda node: node.raw.raft.term) if leaders else None

    # ---- node lifecycle -------------------------------------------------------------

    def _start_node(self, node: SimNode) -> None:
        knobs = self.knobs
        self._finish_interrupted_install(node)
        # The core starts at the snapshot marker: its configuration, applied there.
        config = Config(id=node.id, election_ticks=ELECTION_TICKS, heartbeat_ticks=1,
                        max_inflight_appends=knobs.max_inflight_appends,
                        max_append_entries_bytes=knobs.max_append_entries_bytes, max_request_bytes=1024,
                        pre_vote=knobs.pre_vote, check_quorum=knobs.check_quorum, applied=node.disk.marker.index)
        node.raw = RawNode(config, node.disk.storage(), random.Random(self.rng.getrandbits(64)))
        node.up = True
        node.incarnation += 1
        node.inbox = []
        node.crash_in_pass = None
        node.term_seen = node.raw.raft.term
        node.commit_seen = node.raw.raft.log.committed
        node.commit_checked = 0
        node.leader_checked = False
        node.conf_index = node.disk.marker.index
        node.commit_quorum_term = 0
        node.applied_seen = node.raw.raft.log.applied
        node.snapshots_out = {}

    def _finish_interrupted_install(self, node: SimNode) -> None:
        """A store ahead of the log (a snapshot installed, then a crash before
        the reset was durable) gets the reset it missed (as the actor's
        finish_interrupted_install: unless the log holds the store's last entry)."""
        disk, applied = node.disk, node.store_applied
        if applied == 0 or applied < disk.marker.index or (disk.entries and applied < disk.first) \
                or disk.term(applied) == node.store_term:
            return
        hard = disk.hard_state
        term = max(hard.term, node.store_term)
        disk.reset_to_snapshot(SnapshotMeta(applied, node.store_term, node.store_conf),
                               HardState(term, hard.vote if term == hard.term else 0, applied))
        self.counts["installs_finished_at_restart"] += 1
        self._trace(f"{self.now} finish install {node.id} {applied}")
    def _crash(self, node: SimNode, where: str) -> None:
        self._trace(f"{self.now} crash {node.id} {where}")
        self.counts["crashes"] += 1
        self.counts["crashes_in_pass"] += where != "between passes"
        self.counts["writes_lost"] += node.disk.crash(self.rng)
        node.up = False
        node.raw = None
        node.inbox = []
        if not self.healed:
            self._schedule(TICK_UNITS * self.rng.randint(1, 30), "restart", node.id)

    def _restart_node(self, node: SimNode) -> None:
        if node.up or node.removed:
            return
        self._start_node(node)
        self.counts["restarts"] += 1
        self.counts["restarts_from_snapshot"] += node.disk.marker.index > 0
        self._trace(f"{self.now} restart {node.id} {node.raw.raft.term} {node.raw.raft.log.committed}")
        self.checker.on_restart(node)
        self.checker.check_node(node)

    # ---- the actor's loop, simulated ---------------------------------------------------

    def _tick(self, node: SimNode) -> None:
        self._schedule(node.tick_units, "tick", node.id)
        if not node.up or node.paused_until > self.now:
            return
        node.raw.tick()
        self._pass(node)

    def _wake(self, node: SimNode) -> None:
        if not node.pass_scheduled:
            node.pass_scheduled = True
            self._schedule(max(1, node.paused_until - self.now) if node.paused_until > self.now
                           else self.rng.randint(1, 5), "pass", node.id)

    def _pass(self, node: SimNode) -> None:
        node.pass_scheduled = False
        if not node.up:
            return
        if node.paused_until > self.now:
            self._wake(node)
            return
        raw = node.raw
        inbox, node.inbox = node.inbox, []
        for item in inbox:
            if isinstance(item, tuple):
                self._local_request(node, item)
            else:
                raw.step(item)
        self.checker.check_commit_quorum(node)
        for _ in range(MAX_READY_CYCLES):
            if not raw.has_ready():
                break
            if not self._handle_ready(node):
                return  # crashed inside the pass
        if raw.has_ready():
            self._wake(node)
        self._trace(f"{self.now} pass {node.id} {len(inbox)} {raw.raft.term} {raw.raft.role} "
                    f"{raw.raft.log.committed} {raw.raft.log.last_index()}")
        self.checker.check_node(node)
        self._maybe_snapshot(node)  # (after the check: the checker knows what it committed)

    def _local_request(self, node: SimNode, item: tuple) -> None:
        kind, value = item
        try:
            if kind == "propose":
                node.raw.propose(value)
            elif kind == "read":
                node.raw.read_index(value)
                self.reads_pending.setdefault(value[1], self.max_commit())
            elif kind == "snapshot":
                self._receive_snapshot(node, value)
            elif kind == "snapshot_report":
                node.raw.report_snapshot(*value)
            elif kind == "conf_change":
                if node.raw.raft.role == ROLE_LEADER and (node.raw.raft.pending_conf_index > node.raw.raft.log.applied
                                                          or node.raw.raft.unapplied_conf_indexes):
                    self.counts["conf_changes_pending"] += 1
                index = node.raw.propose_conf_change(value)
                self._trace(f"{self.now} propose {value.kind} {value.node_id} at {node.id} {index}")
                self.checker.on_propose_conf_change(node, index)
            else:
                node.raw.transfer_leader(value)
                self.counts["transfers_started"] += 1
        except (ProposalDropped, ReadIndexDropped, ConfChangeInvalid, BadTransferee):
            pass

    def _handle_ready(self, node: SimNode) -> bool:
        """One Ready, in the contract's order. Returns False if the node crashed."""
        raw, disk = node.raw, node.disk
        ready = raw.ready()
        if ready.snapshot is not None:  # before anything else of the Ready
            disk.write(("reset", ready.snapshot, ready.hard_state or raw.raft.hard_state()))
        if ready.entries:
            self.checker.on_persist(node, ready.entries)
            disk.write(("entries", tuple(ready.entries)))
        if ready.hard_state is not None:
            disk.write(("hard", ready.hard_state))
        if node.crash_in_pass == "before_sync" and (ready.entries or ready.hard_state is not None
                                                    or ready.snapshot is not None):
            self._crash(node, "between write and fsync")
            return False
        if ready.must_sync():
            disk.sync()
        for message in ready.messages:
            self.checker.on_send(node, message)
            if isinstance(message, MsgSnap):
                self._send_snapshot(node, message)
            else:
                self._send(message)
        if node.crash_in_pass == "before_apply" and ready.committed_entries:
            self._crash(node, "between send and apply")
            return False
        if ready.committed_entries:
            self._apply_conf_changes(node, ready.committed_entries)
            self._apply(node, ready.committed_entries)
        for read_state in ready.read_states:
            asked = self.reads_pending[read_state.context[1]]
            self.counts["reads_served"] += 1
            self.checker.on_read_state(node, read_state, asked)
        raw.advance(ready)
        self.checker.check_commit_quorum(node)
        return True

    def _apply_conf_changes(self, node: SimNode, entries: list[Entry]) -> None:
        """The actor's part: every committed change goes to the core in order,
        also those the store applied before a restart (the core starts from its
        snapshot marker's configuration)."""
        for entry in entries:
            if entry.type != ENTRY_CONF_CHANGE:
                continue
            change = ConfChange.from_wire(ormsgpack.unpackb(entry.data))
            previous = node.raw.conf_state()
            conf_state = node.raw.apply_conf_change(change)
            self.checker.on_conf_change(node, entry.index, previous, conf_state)
            self.checker.check_commit_quorum(node)
            if entry.index > self.conf_index:
                self._cluster_applied(entry.index, change, conf_state)

    def _cluster_applied(self, index: int, change: ConfChange, conf_state: ConfState) -> None:
        """The first node applied this change: start an added member, stop a removed one."""
        self.conf_index, self.conf_state = index, conf_state
        self._trace(f"{self.now} configuration {index} {change.kind} {change.node_id} {conf_state}")
        if change.kind in ("add_voter", "add_learner"):
            self.counts["members_added"] += 1
            node = SimNode(change.node_id, self.initial_conf_state)
            self.nodes[node.id] = node
            self.ids.append(node.id)  # ids only grow: still sorted
            self._boot(node)
        elif change.kind == "promote_learner":
            self.counts["members_promoted"] += 1
        elif change.kind == "remove":
            self.counts["members_removed"] += 1
            self._schedule(self.rng.randint(0, REMOVED_STOP_TICKS_MAX * TICK_UNITS), "stop", change.node_id)

    def _stop_removed(self, node: SimNode) -> None:
        self._trace(f"{self.now} stop {node.id}")
        node.removed = True
        node.up = False
        node.raw = None
        node.inbox = []

    def _apply(self, node: SimNode, entries: list[Entry]) -> None:
        """The applier: one atomic, durable store transaction per batch; entries
        at or below the store's applied index are a redelivery after a restart."""
        fresh = [entry for entry in entries if entry.index > node.store_applied]
        if not fresh:
            return
        assert fresh[0].index == node.store_applied + 1, f"gap in applied entries at {fresh[0].index}"
        batch = []
        for entry in fresh:
            requests = []
            if entry.type == ENTRY_NORMAL:
                gateway, items = ormsgpack.unpackb(entry.data)
                requests = [((gateway, request_id), op, body) for request_id, op, body in items]
            batch.append((entry.index, entry.term, requests))
        # One store transaction per batch, cut at every HASH_EVERY-th index so
        # all nodes' stores are hashed at the same indexes, whatever their batching.
        while batch:  # bounded by the batch
            cut = next((position + 1 for position, item in enumerate(batch) if item[0] % HASH_EVERY == 0),
                       len(batch))
            part, batch = batch[:cut], batch[cut:]
            writer = node.writer()
            results = writer.apply(part)
            last = part[-1][0]
            part_entries = fresh[part[0][0] - fresh[0].index:last - fresh[0].index + 1]
            # The same transaction: the member table (conf changes) and the
            # digest of the applied entries.
            for entry in part_entries:
                if entry.type == ENTRY_CONF_CHANGE:
                    node.store_conf = changed_conf_state(node.store_conf,
                                                         ConfChange.from_wire(ormsgpack.unpackb(entry.data)))
                node.store_digest = chain_digest(node.store_digest, entry)
            node.store_applied, node.store_term = last, part[-1][1]
            kv_hash = writer.hash_kv(0)["hash"] if last % HASH_EVERY == 0 else None
            self.checker.on_apply(node, part_entries, writer.revision, kv_hash, results)

    # ---- snapshots -------------------------------------------------------------------------

    def _maybe_snapshot(self, node: SimNode) -> None:
        """The actor's maybe_snapshot: a marker at the applied index every
        `snapshot_entries` entries (synced), then compaction to
        `catchup_entries` before it, on the disk and in the core's storage."""
        raw, disk, knobs = node.raw, node.disk, self.knobs
        index = min(node.store_applied, raw.raft.log.applied)
        if index - disk.marker.index < knobs.snapshot_entries:
            return
        term = raw.raft.log.term(index)
        assert term is not None, (index, raw.status())
        try:
            conf_state = raw.conf_state_at(index)
        except (Compacted, Unavailable):
            conf_state = raw.conf_state()
        marker = SnapshotMeta(index, term, conf_state)
        self.checker.on_marker(node, marker)
        disk.write(("marker", marker))
        disk.sync()
        raw.storage.set_snapshot(marker)
        release_index = index - knobs.catchup_entries
        if release_index > raw.storage.first_index():
            disk.release(release_index)
            raw.storage.compact(min(release_index - 1, raw.raft.log.applied))
        self.counts["snapshots_taken"] += 1
        self._trace(f"{self.now} snapshot {node.id} {index} {term} first {raw.storage.first_index()}")

    def _send_snapshot(self, node: SimNode, message: MsgSnap) -> None:
        """The leader's store, copied now, streamed to the follower with the
        MsgSnap; the transfer ends (reported to the core) when the follower's
        result comes back, or fails after a stall."""
        knobs, rng = self.knobs, self.rng
        self.counts["snapshots_sent"] += 1
        self.transfers += 1
        data = SnapshotData(node.store_applied, node.store_term, node.store_conf, node.store_digest,
                            copy_backend(node.backend))
        transfer = SnapshotTransfer(message, data, self.transfers, node.incarnation)
        node.snapshots_out[message.to] = transfer.transfer_id
        self._trace(f"{self.now} send snapshot {message.sender}>{message.to} {data.index} #{transfer.transfer_id}")
        delay = rng.randint(1, SNAPSHOT_DELAY_UNITS_MAX)
        self._schedule(delay + TICK_UNITS * rng.randint(1, SNAPSHOT_STALL_TICKS_MAX), "snapshot_end", node.id,
                       (transfer, False))
        if (message.sender, message.to) in self.blocked or (knobs.drop and rng.random() < knobs.drop):
            return  # lost: the stall ends it
        copies = 2 if knobs.duplicate and rng.random() < knobs.duplicate else 1
        for copy in range(copies):
            if copy or (knobs.long_delay and rng.random() < knobs.long_delay):
                delay += rng.randint(TICK_UNITS, 20 * TICK_UNITS)  # late and stale
            self._schedule(delay, "snapshot", message.to, transfer)

    def _deliver_snapshot(self, transfer: SnapshotTransfer) -> None:
        message = transfer.message
        node = self.nodes.get(message.to)
        if node is None or (message.sender, message.to) in self.blocked or not node.up:
            return
        self._trace(f"{self.now} deliver snapshot {message.sender}>{message.to} #{transfer.transfer_id}")
        node.inbox.append(("snapshot", transfer))
        self._wake(node)

    def _receive_snapshot(self, node: SimNode, transfer: SnapshotTransfer) -> None:
        """The follower's side: the applier installs the copy if it is ahead of
        the store, then the MsgSnap, rewritten to describe the copy, is
        stepped into the core (also when the store already holds it:
        STEP_SNAPSHOTS_THE_STORE_HOLDS). The result goes back to the leader."""
        data, raw = transfer.data, node.raw
        installed = data.index > node.store_applied
        if installed:
            backend = copy_backend(data.backend)
            writer = MvccWriter(backend, _ENCODING, member_id=node.id)
            self.checker.on_install(node, data, writer.hash_kv(0)["hash"], writer.revision)
            node.backend = backend
            node.store_applied, node.store_term = data.index, data.term
            node.store_conf, node.store_digest = data.conf_state, data.digest
            self.counts["snapshots_installed"] += 1
            if (self.knobs.crash_weight and not self.healed and node.crash_in_pass is None
                    and self.rng.random() < 0.25):
                node.crash_in_pass = "before_sync"  # between the install and the persisted log reset
        else:
            self.counts["snapshots_refused"] += 1
        stepped = installed or STEP_SNAPSHOTS_THE_STORE_HOLDS
        if stepped:
            snapshot = SnapshotMeta(data.index, data.term, data.conf_state)
            raw.step(dataclasses.replace(transfer.message, snapshot=snapshot))
            if raw.raft.log.unstable.snapshot == snapshot:
                self.counts["snapshot_restores"] += 1
                self.checker.on_restore(node, snapshot)
        self._trace(f"{self.now} install snapshot {node.id} {data.index} {installed} {node.store_applied}")
        link = (node.id, transfer.message.sender)
        if link not in self.blocked and not (self.knobs.drop and self.rng.random() < self.knobs.drop):
            self._schedule(self.rng.randint(1, 20), "snapshot_end", transfer.message.sender,
                           (transfer, stepped))

    def _snapshot_transfer_ended(self, node_id: int, transfer: SnapshotTransfer, installed: bool) -> None:
        """The follower's result, or the stall timeout: whichever comes first
        ends the transfer and is reported to the leader's core."""
        node = self.nodes[node_id]
        peer = transfer.message.to
        if not node.up or node.incarnation != transfer.sender_incarnation \
                or node.snapshots_out.get(peer) != transfer.transfer_id:
            return
        del node.snapshots_out[peer]
        self.counts["snapshot_transfers_failed"] += not installed
        node.inbox.append(("snapshot_report", (peer, not installed)))
        self._wake(node)

    # ---- the network ---------------------------------------------------------------------

    def _send(self, message) -> None:
        knobs, rng = self.knobs, self.rng
        self.counts["timeout_now_sent"] += isinstance(message, MsgTimeoutNow)
        link = (message.sender, message.to)
        if link in self.blocked:
            if rng.random() < 0.3:
                self.parked.append(message)  # queued in the peer socket, replayed on heal
            return
        if knobs.drop and rng.random() < knobs.drop:
            return
        copies = 2 if knobs.duplicate and rng.random() < knobs.duplicate else 1
        for _ in range(copies):
            delay = rng.randint(1, 20)
            if knobs.long_delay and rng.random() < knobs.long_delay:
                delay += rng.randint(TICK_UNITS, 20 * TICK_UNITS)  # late and stale
            self._schedule(delay, "deliver", message.to, message)

    def _deliver(self, message) -> None:
        node = self.nodes.get(message.to)
        if node is None or (message.sender, message.to) in self.blocked or not node.up:
            return
        self.delivered += 1
        self._trace(f"{self.now} deliver {type(message).__name__} {message.sender}>{message.to} t{message.term}")
        node.inbox.append(message)
        self._wake(node)

    # ---- clients ------------------------------------------------------------------------

    def _put_body(self, key: bytes, value: bytes) -> dict:
        return {"key": key, "value": value, "lease": 0, "prev_kv": False, "ignore_value": False,
                "ignore_lease": False}

    def _random_request(self) -> tuple:
        rng = self.rng
        self.requests += 1
        key = rng.choice(KEYS)
        value = b"v%d" % self.requests
        choice = rng.random()
        if choice < 0.7:
            return self.requests, "put", self._put_body(key, value)
        if choice < 0.8:
            return self.requests, "delete_range", {"key": key, "range_end": b"", "prev_kv": True}
        if choice < 0.98:
            compare = {"key": key, "range_end": b"", "target": TARGET_VERSION, "result": COMPARE_GREATER,
                       "version": 0, "create_revision": 0, "mod_revision": 0, "value": b"", "lease": 0}
            return self.requests, "txn", {
                "compare": [compare], "success": [{"request_put": self._put_body(key, value)}],
                "failure": [{"request_put": self._put_body(rng.choice(KEYS), value)}]}
        return self.requests, "compaction", {"revision": rng.randint(1, self.requests), "physical": False}

    def _client_request(self) -> None:
        rng = self.rng
        self._schedule(rng.randint(1, self.knobs.client_interval_units), "client", 0)
        if self.healed:
            return
        live = self.live_nodes()
        if not live:
            return
        leader = self.leader()
        node = leader if leader is not None and rng.random() < 0.8 else rng.choice(live)
        if rng.random() < 0.15:
            context = (node.id, self.requests + 1)
            self.requests += 1
            node.inbox.append(("read", context))
        else:
            items = [self._random_request() for _ in range(rng.randint(1, 3))]
            node.inbox.append(("propose", ormsgpack.packb([b"gw%d" % node.id, items])))
        self._wake(node)

    def _propose(self, node: SimNode, items: list) -> int | None:
        try:
            index = node.raw.propose(ormsgpack.packb([b"liveness", items]))
        except ProposalDropped:
            return None
        self._pass(node)
        return index

    # ---- the nemesis -----------------------------------------------------------------------

    def _nemesis(self) -> None:
        rng, knobs = self.rng, self.knobs
        if self.healed:
            return
        self._schedule(TICK_UNITS * rng.randint(1, knobs.nemesis_ticks_max), "nemesis", 0)
        actions = (("heal", 2), ("partition", knobs.partition_weight), ("isolate", knobs.partition_weight),
                   ("one_way", knobs.partition_weight), ("crash", knobs.crash_weight),
                   ("pause", knobs.pause_weight), ("restart_all", 1), ("membership", knobs.membership_weight),
                   ("transfer", knobs.transfer_weight))
        total = sum(weight for _, weight in actions)
        pick = rng.randrange(total)
        for action, weight in actions:
            if pick < weight:
                break
            pick -= weight
        self._trace(f"{self.now} nemesis {action}")
        self.counts["partitions"] += action in ("partition", "isolate", "one_way")
        self.counts["pauses"] += action == "pause"
        if action == "heal":
            self._heal_links()
        elif action == "partition":
            shuffled = list(self.ids)
            rng.shuffle(shuffled)
            cut = rng.randint(1, len(shuffled) // 2)
            self._partition(shuffled[:cut], shuffled[cut:])
        elif action == "isolate":
            node_id = rng.choice(self.ids)
            self._partition([node_id], [other for other in self.ids if other != node_id])
        elif action == "one_way":
            a, b = rng.sample(self.ids, 2)
            self.blocked.add((a, b))
        elif action == "crash":
            node = self.nodes[rng.choice(self.ids)]
            if node.up:
                if rng.random() < knobs.crash_in_pass:
                    node.crash_in_pass = rng.choice(("before_sync", "before_apply"))
                else:
                    self._crash(node, "between passes")
        elif action == "pause":
            node = self.nodes[rng.choice(self.ids)]
            node.paused_until = self.now + TICK_UNITS * rng.randint(1, 3 * ELECTION_TICKS)
        elif action == "restart_all":
            for node_id in self.ids:
                self._restart_node(self.nodes[node_id])
        else:
            self._leader_request(action)

    def _leader_request(self, action: str) -> None:
        """Ask the leader (if any) for a membership change or a transfer, as
        an operator's etcdctl would; the core may refuse it."""
        leader, rng = self.leader(), self.rng
        if leader is None:
            return
        conf_state = leader.raw.conf_state()
        if action == "transfer":
            others = [voter for voter in conf_state.voters if voter != leader.id]
            if not others:
                return
            leader.inbox.append(("transfer", rng.choice(others)))
        else:
            leader.inbox.append(("conf_change", self._pick_conf_change(conf_state)))
            if rng.random() < 0.3:  # an impatient operator: the core must refuse this one
                leader.inbox.append(("conf_change", self._pick_conf_change(conf_state)))
        self._wake(leader)

    def _pick_conf_change(self, conf_state: ConfState) -> ConfChange:
        rng = self.rng
        if conf_state.learners:
            learner = rng.choice(conf_state.learners)
            return ConfChange("promote_learner" if rng.random() < 0.8 else "remove", learner)
        may_add = len(conf_state.members()) < self.size + EXTRA_MEMBERS_MAX
        if may_add and (len(conf_state.voters) < self.size or rng.random() < 0.5):
            self.next_node_id += 1
            return ConfChange("add_learner" if rng.random() < 0.7 else "add_voter", self.next_node_id - 1)
        if len(conf_state.voters) > 1:
            return ConfChange("remove", rng.choice(conf_state.voters))
        return ConfChange("update", conf_state.voters[0])

    def _partition(self, side: list[int], other_side: list[int]) -> None:
        for a in side:
            for b in other_side:
                self.blocked |= {(a, b), (b, a)}

    def _heal_links(self) -> None:
        self.blocked = set()
        parked, self.parked = self.parked, []
        for message in parked:
            self._schedule(self.rng.randint(1, 50), "deliver", message.to, message)

    def heal(self) -> None:
        """End of the chaos: links, loss, pauses and crashes all stop."""
        self._trace(f"{self.now} heal")
        self.healed = True
        self._heal_links()
        knobs = self.knobs
        knobs.drop = knobs.duplicate = knobs.long_delay = 0.0
        for node_id in self.ids:
            node = self.nodes[node_id]
            node.paused_until = 0
            node.crash_in_pass = None
            self._restart_node(node)  # (not a removed one)

    # ---- reporting -------------------------------------------------------------------------

    def digest(self) -> str:
        final = hashlib.blake2b(self.trace_hash.digest(), digest_size=16)
        for node_id in self.ids:
            node = self.nodes[node_id]
            if node.up:
                final.update(repr(sorted(node.raw.status().items())).encode())
            final.update(b"%d" % node.writer().hash_kv(0)["hash"])
        return final.hexdigest()

    def summary(self) -> dict:
        return {"seed": self.seed, "nodes": self.size, "events": self.events, "delivered": self.delivered,
                "committed": self.max_commit(), "recovery_ticks": self.recovery_ticks,
                "terms": max(self.checker.leader_of_term, default=0), **self.counts,
                "configuration": self.conf_state.to_marker(),
                "fsyncs": sum(self.nodes[node_id].disk.sync_count for node_id in self.ids), "digest": self.digest(),
                "knobs": dataclasses.asdict(self.knobs)}


def replay_command(seed: int, nodes: int, chaos_ticks: int) -> str:
    return f"python -m tools.raft_sim --seed {seed} --nodes {nodes} --ticks {chaos_ticks}"


def run_seed(seed: int, nodes: int = 3, chaos_ticks: int = 200, trace: bool = False) -> Simulation:
    """One seeded run; a failure names the seed and the command that replays it."""
    simulation = Simulation(seed, nodes, chaos_ticks, trace)
    try:
        return simulation.run()
    except Exception as error:  # an unexpected exception is a bug too: name the seed
        raise SimulationFailure(f"seed {seed} ({nodes} nodes) failed at t={simulation.now} "
                                f"(event {simulation.events}): {type(error).__name__}: {error}\n"
                                f"replay: {replay_command(seed, nodes, chaos_ticks)}") from error


def failures_in(seeds: range, nodes: int, chaos_ticks: int) -> list[str]:
    """Run seeds; the failures' messages (each with its replay command)."""
    failures = []
    for seed in seeds:
        try:
            run_seed(seed, nodes, chaos_ticks)
        except SimulationFailure as failure:
            failures.append(str(failure))
    return failures


def run_many(first_seed: int, count: int, nodes: int, chaos_ticks: int, workers: int = 2,
             chunk: int = 25) -> list[str]:
    """Seeds first_seed .. first_seed+count-1 over `workers` processes; the failures."""
    if workers <= 1:
        return failures_in(range(first_seed, first_seed + count), nodes, chaos_ticks)
    import concurrent.futures  # only the runner needs processes
    chunks = [range(low, min(low + chunk, first_seed + count)) for low in range(first_seed, first_seed + count, chunk)]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        results = pool.map(failures_in, chunks, [nodes] * len(chunks), [chaos_ticks] * len(chunks))
        return [failure for failures in results for failure in failures]


def main(argv: list[str]) -> int:
    if len(argv) > 1 and not argv[1].startswith("-"):
        seed = int(argv[1])
        steps = int(argv[2]) if len(argv) > 2 else 400
        network = simulate(seed, steps)
        for node_id in network.ids:
            print(node_id, network.nodes[node_id].status())
        return 0
    parser = argparse.ArgumentParser(prog="python -m tools.raft_sim",
                                     description="Run (or replay) seeded deterministic Raft simulations.")
    parser.add_argument("--seed", type=int, default=0, help="the seed (the first one with --count)")
    parser.add_argument("--nodes", type=int, default=3, choices=(3, 5))
    parser.add_argument("--ticks", type=int, default=200, help="simulated ticks of chaos before healing")
    parser.add_argument("--count", type=int, default=1, help="run this many seeds from --seed on")
    parser.add_argument("--trace", action="store_true", help="print every event of the run")
    parser.add_argument("--workers", type=int, default=1, help="processes for --count runs")
    args = parser.parse_args(argv[1:])
    started = time.perf_counter()
    if args.count > 1:
        failures = run_many(args.seed, args.count, args.nodes, args.ticks, args.workers)
        for failure in failures:
            print(failure)
        elapsed = time.perf_counter() - started
        print(f"{args.count - len(failures)} of {args.count} seed(s) passed in {elapsed:.1f} s "
              f"({args.count / elapsed:.1f} seeds/s)")
        return 1 if failures else 0
    try:
        simulation = run_seed(args.seed, args.nodes, args.ticks, trace=args.trace)
    except SimulationFailure as failure:
        print(failure)
        return 1
    if args.trace:
        print("\n".join(simulation.trace_lines))
    print(simulation.summary())
    return 0

if __name__ == "__main__":
    sys.exit(main(sys.argv))
