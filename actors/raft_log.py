"""The raft log actor: a thin shell around the pure Raft core and the WAL.

How this works: one ROUTER socket (actors.ipc.raft_endpoint) receives
gateway and applier messages. Each loop pass the actor feeds every received
message to the core (through a {kind: handler} table), then carries out the
core's Ready in the contract's order:

    1. append the Ready's entries and hard state to the WAL, ONE fdatasync
       (group commit for everything proposed in the pass),
    2. send peer messages (actors.peer: one frame per peer per pass, only
       after the fsync above),
    3. hand durable committed entries to the applier, in order, in ENTRIES
       batches bounded by max_apply_batch_entries/bytes with at most
       max_apply_inflight_batches unacknowledged,
    4. answer read states, then advance().

Delivery to the applier reads from the core's durable log, never from the
unstable part, so no entry reaches the applier (and no client hears success)
before its fsync. A SUBSCRIBE (re)starts delivery after the applier's applied
index; APPLIED acks free the window and report the durable index, from which
snapshot markers are written and whole WAL segments released.

One PROPOSE = one entry whose data is msgpack [member_id, gateway_identity,
items]: every member applies every entry, and only the proposing member's
applier answers its gateways. A PROPOSE that reaches a follower is forwarded
to the leader over the peer transport (actor-level, not a Raft MsgProp); the
leader proposes the same data, and the result comes back through the
proposing member's applier when the entry is applied there. No leader known:
PROPOSE_FAILED NoLeader at once. Whenever the term or the leader changes,
every gateway hears LEADER_CHANGED with the commit index known then: a
write it sent before and still unanswered once that index is applied was
forwarded to (or proposed by) a leader that is gone, and is answered
LeaderChanged (its outcome unknown: a new leader may still commit it).

Linearizable reads: READ_INDEX goes to the core's ReadIndex (on a follower
the core forwards it to the leader as MsgReadIndex). The actor wraps each
read's context with a sequence number of its own and keeps the pending
reads: an answer for an unknown sequence (a replayed stale message) is
dropped, and a read not answered within READ_INDEX_TIMEOUT election timeouts
(its leader died) is answered READ_INDEX_FAILED Timeout.

Snapshots (actors/snapshot_stream.py): a MsgSnap from the core is not sent
as is; the store is copied and streamed to the follower in chunks, and the
end of the transfer is reported back to the core. On a follower a received,
verified copy is installed by the applier first; then the MsgSnap is
stepped into the core, and a Ready.snapshot is persisted before anything
else of its Ready (WAL reset to the snapshot). At start, a store ahead of
the WAL (a crash between the two) finishes the reset
(`finish_interrupted_install`).

Leases: the actor owns the node's lessor (actors.lessor), because it is the
one actor that knows leadership. On becoming leader it promotes the lessor
once the applier has applied the new term's first entry (so the store holds
every lease of earlier terms), loading the leases from the store (read-only)
with their TTLs extended; on losing leadership it demotes it. The applier's
APPLIED reports carry the lease grants and revokes it applied. Every
LEASE_CHECK_MS the actor proposes revokes for expired leases (an entry from
identity b"lessor", a bounded number per pass). LEASE_REQUESTs (keep-alive,
time-to-live) are answered from the lessor.

Membership (actors.members): the actor holds the member table. At start it
is the store's (or the initial cluster's); the raft core starts with its
voters and learners. MEMBER_REQUESTs: member_list is answered from the
table; a change is checked by the leader against the table (etcd's errors)
and proposed as an ENTRY_CONF_CHANGE whose context carries the record and
the request's origin (a follower forwards the request to the leader). Every
member applies a committed conf change in log order: the core's
apply_conf_change, the table, the peer transport; the origin member answers
its gateway. Each member publishes its own name and client URLs the same
way (etcd's publish) until the table has them. A member that finds itself
removed (it applied its removal, or a member tells it so) logs it, writes
`<data-dir>/removed` and exits with EXIT_MEMBER_REMOVED; its supervisor
then stops the node. move_leader (leader only) starts the core's transfer
and is answered once this member sees the target lead. A learner refuses
proposals, read indexes and lease requests (LearnerNotSupported).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import random
import time

import ormsgpack
import zmq

from actors import ipc, members as member_rules
from actors.config import NodeConfig
from actors.members import MemberTable, initial_table, pack_context, unpack_context
from actors.peer import FAULTS_CHECK_MS, PeerTransport, table_peers
from actors.lessor import Lessor, seconds_truncated
from actors.supervisor import EXIT_MEMBER_REMOVED
from actors.loop import ActorLoop
from actors.raft import (
    ENTRY_CONF_CHANGE, NONE, ROLE_LEADER, ConfChange, ConfState, Config, Entry, HardState, MemoryStorage,
    MsgSnap, ProposalDropped, RawNode, ReadIndexDropped, SnapshotMeta,
)
from actors.raft import errors as raft_errors
from actors.snapshot_stream import SnapshotStreams, open_store_read_only
from actors.wal import HardState as WalHardState, Wal
from protocol import codec
from protocol.errors import QuorumError
from protocol.messages import MEMBER_OPS, validate_request

# Ready cycles per pass: one that persists, one that commits what it persisted.
_READY_CYCLES_PER_PASS = 3
# How often the lessor looks for expired leases (etcd: every 500 ms).
LEASE_CHECK_MS = 100
_LEASE_OPS = ("lease_keep_alive", "lease_time_to_live")
# The store (read for leases now and then) is closed after this long unused.
STORE_IDLE_CLOSE_MS = 1000
# A read waiting for its read index longer than this many election timeouts
# is failed (its leader is gone or cut off).
READ_INDEX_TIMEOUT_ELECTIONS = 2
# How often snapshot transfers are looked after (copies done, stalls, resends).
SNAPSHOT_POLL_MS = 20
REMOVED_FILE = "removed"
# A move_leader not done within this many election timeouts fails (etcd:
# "leader transfer took too long").
MOVE_LEADER_TIMEOUT_ELECTIONS = 3
# Membership changes held while an earlier one is not applied yet.
MAX_WAITING_MEMBER_CHANGES = 64
# How often a member checks that the table has its name and client URLs.
PUBLISH_CHECK_MS = 1000
# The core's errors for a change that does not fit -> etcd's codes.
_CONF_CHANGE_ERRORS = {
    "MemberExists": "MemberExist", "MemberNotFound": "MemberNotFound", "MemberNotLearner": "MemberNotLearner",
    "RemovingLastVoter": "MemberNotEnoughStarted",
}
_CHANGE_OPS = ("member_add", "member_remove", "member_update", "member_promote")


class MalformedMessage(ValueError):
    pass


def removed_path(data_dir: str) -> str:
    return os.path.join(data_dir, REMOVED_FILE)


def load_member_table(config: NodeConfig) -> MemberTable:
    """The store's member table, or the initial cluster's before the first conf change."""
    from actors.gateway import open_store  # the gateway module is heavy; imported when needed

    try:
        store = open_store(config)
    except FileNotFoundError:
        return initial_table(config)
    try:
        stored = store.member_table()
    finally:
        store.close()
    return MemberTable.from_wire(stored) if stored else initial_table(config)


def build_node(config: NodeConfig, wal_recovery, rng: random.Random,
               table: MemberTable | None = None) -> tuple[RawNode, MemoryStorage]:
    limits = config.limits()
    table = table or initial_table(config)
    conf_state = ConfState(table.voters(), table.learners())
    hard = wal_recovery.hard_state
    marker = wal_recovery.snapshot
    storage = MemoryStorage.from_entries(
        conf_state, HardState(hard.term, hard.vote, hard.commit), SnapshotMeta(marker.index, marker.term, conf_state),
        [Entry(*entry) for entry in wal_recovery.entries])
    election_ticks = max(2, config.election_timeout_ms // config.heartbeat_interval_ms)
    raft_config = Config(
        id=config.member_id(), election_ticks=election_ticks, heartbeat_ticks=1,
        max_inflight_appends=limits.max_inflight_appends, max_append_entries_bytes=limits.max_append_entries_bytes,
        max_request_bytes=limits.max_request_bytes, applied=storage.first_index() - 1)
    return RawNode(raft_config, storage, rng), storage


class RaftLogActor:
    def __init__(self, config: NodeConfig, log, socket: zmq.Socket, wal: Wal, node: RawNode, storage: MemoryStorage,
                 clock_ms=lambda: time.monotonic() * 1000, transport: PeerTransport | None = None,
                 members: MemberTable | None = None):
        self.config = config
        self.limits = config.limits()
        self.log = log
        self.socket = socket
        self.wal = wal
        self.node = node
        self.storage = storage
        self.member_id = config.member_id()
        self.cluster_id = config.cluster_id()
        self.forward_handlers = {
            "propose": self.take_forwarded_proposal,
            "propose_failed": self.take_proposal_failure,
            "lease_request": self.take_forwarded_lease_requests,
            "lease_reply": self.take_lease_replies,
            "snap_chunk": self.take_snapshot_message,
            "snap_ack": self.take_snapshot_message,
            "snap_result": self.take_snapshot_message,
            "member_request": self.take_forwarded_member_requests,
            "member_reply": self.take_member_replies,
            "publish": self.take_publish,
            "removed": self.take_removed_notice,
        }
        self.handlers = {
            ipc.PROPOSE: self.on_propose,
            ipc.READ_INDEX: self.on_read_index,
            ipc.RAFT_STATUS: self.on_raft_status,
            ipc.SUBSCRIBE: self.on_subscribe,
            ipc.APPLIED: self.on_applied,
            ipc.LEASE_REQUEST: self.on_lease_request,
            ipc.SNAPSHOT_INSTALLED: self.on_snapshot_installed,
            ipc.MEMBER_REQUEST: self.on_member_request,
        }
        # Applier delivery state.
        self.subscribed = False
        self.next_delivery_index = 0
        self.unacknowledged_batches: collections.deque[int] = collections.deque()
        self.durable_index = 0
        self.fsync_count = 0
        self.bytes_since_snapshot = 0
        self.peer_messages_dropped = 0
        self.transport = transport
        self.proposals_forwarded = 0
        # (term, leader) last announced to the gateways (LEADER_CHANGED).
        self.announced_leadership: tuple[int, int] | None = None
        self.gateway_identities = [ipc.gateway_identity(index) for index in range(config.gateway_count())]
        # Linearizable reads in the core: sequence -> (identity, read_id, asked_ms).
        # Starts from the wall clock in microseconds so that a stale answer
        # replayed from before a restart of this member matches no new read.
        self.next_read_sequence = time.time_ns() // 1000
        self.pending_reads: dict[int, tuple[bytes, object, float]] = {}
        # Leases. The lessor is promoted once the applier reaches
        # promote_at_index (set when this node becomes leader); lease requests
        # that arrive before are held. The store is opened read-only on demand.
        self.clock_ms = clock_ms
        self.lessor = Lessor(extend_ms=config.election_timeout_ms,
                             revoke_retry_ms=max(1000, 2 * config.election_timeout_ms))
        self.is_leader = False
        self.promote_at_index: int | None = None
        self.held_lease_requests: list[tuple[bytes, list]] = []
        self.deferred_lease_requests: list[tuple[bytes, list]] = []
        self.lease_reconciled_index = -1
        self.next_lessor_request_id = 1
        self.store = None
        self.store_used_ms = 0.0
        self.snapshots: SnapshotStreams | None = None
        if transport is not None:
            self.start_snapshot_streams(transport)
        # Membership.
        self.members = members or initial_table(config)
        # (origin or None for a publish, op, body) of changes proposed while another was pending.
        self.waiting_member_changes: list[tuple[list | None, str, dict]] = []
        self.pending_moves: list[tuple[list, int, float]] = []  # (origin, target, deadline_ms)
        self.removed = False
        self.stop_loop = lambda reason: None  # set by run(): ends the actor's loop
        self.on_transport_created = lambda transport: None  # set by run(): polls its router

    def start_snapshot_streams(self, transport: PeerTransport) -> None:
        self.snapshots = SnapshotStreams(self.config, self.log, transport, lambda message: self.reply(
            ipc.APPLIER_IDENTITY, message), self.clock_ms)

    # ---- inputs ---------------------------------------------------------------

    def on_batch(self, batch: list) -> None:
        for frames in batch:
            try:
                if len(frames) != 2:
                    raise MalformedMessage(f"expected [identity, payload], got {len(frames)} frames")
                identity, payload = frames
                message = ormsgpack.unpackb(payload)
                if not isinstance(message, list) or not message or not isinstance(message[0], str):
                    raise MalformedMessage("not a [kind, ...] array")
                handler = self.handlers.get(message[0])
                if handler is None:
                    raise MalformedMessage(f"unknown kind {message[0][:40]!r}")
                handler(identity, message, payload)
            except (MalformedMessage, ormsgpack.MsgpackDecodeError, ValueError, TypeError, IndexError) as exc:
                self.log.warning("malformed message dropped", error=str(exc)[:200])
        # Lease requests last: an APPLIED reporting a grant that arrived in the
        # same batch (the socket fair-queues between peers) is taken in first.
        deferred, self.deferred_lease_requests = self.deferred_lease_requests, []
        for identity, items in deferred:
            self.take_lease_requests(identity, items)
        self.process_ready()

    def on_tick(self) -> None:
        self.node.tick()
        self.process_ready()

    def on_propose(self, identity: bytes, message: list, payload: bytes) -> None:
        if len(message) != 2 or not isinstance(message[1], list) or not message[1]:
            raise MalformedMessage("PROPOSE wants [propose, [[id, op, body], ...]]")
        items = message[1]
        if len(items) > self.limits.max_proposal_batch_requests:
            raise MalformedMessage(f"PROPOSE with {len(items)} requests exceeds max_proposal_batch_requests")
        if len(payload) > self.limits.max_proposal_batch_bytes + 64:
            raise MalformedMessage(f"PROPOSE of {len(payload)} bytes exceeds max_proposal_batch_bytes")
        for item in items:
            if type(item) is not list or len(item) != 3:
                raise MalformedMessage("PROPOSE item must be [gw_request_id, op, body]")
        if self.is_learner():
            self.reply(identity, [ipc.PROPOSE_FAILED, [item[0] for item in items], "LearnerNotSupported"])
            return
        # Re-encoded rather than spliced from the frame: msgpack decoding ignores
        # trailing bytes, so a splice could smuggle garbage into the log; and
        # encoding costs ~0.07 us per request.
        data = ormsgpack.packb([self.member_id, identity, items])
        try:
            self.node.propose(data)
        except ProposalDropped:
            leader = self.node.raft.lead
            if self.transport is not None and leader != NONE and leader != self.member_id:
                self.transport.queue_forward(leader, ["propose", data])
                self.proposals_forwarded += 1
            else:
                self.reply(identity, [ipc.PROPOSE_FAILED, [item[0] for item in items], "NoLeader"])

    def on_read_index(self, identity: bytes, message: list, _payload: bytes) -> None:
        if len(message) != 2:
            raise MalformedMessage("READ_INDEX wants [read_index, read_id]")
        if len(self.pending_reads) >= self.limits.max_pending_requests_per_gateway:
            self.reply(identity, [ipc.READ_INDEX_FAILED, message[1], "TooManyRequests"])
            return
        if self.is_learner():
            self.reply(identity, [ipc.READ_INDEX_FAILED, message[1], "LearnerNotSupported"])
            return
        sequence = self.next_read_sequence
        try:
            self.node.read_index((identity, message[1], sequence))
        except ReadIndexDropped:
            self.reply(identity, [ipc.READ_INDEX_FAILED, message[1], "NoLeader"])
            return
        self.next_read_sequence += 1
        self.pending_reads[sequence] = (identity, message[1], self.clock_ms())

    def take_pending_read(self, context) -> tuple[bytes, object] | None:
        """The (identity, read_id) a read state's context stands for, or None when
        it is not ours or already answered (a stale or replayed answer)."""
        if not isinstance(context, tuple) or len(context) != 3:
            return None
        pending = self.pending_reads.pop(context[2], None)
        if pending is None or pending[0] != context[0] or pending[1] != context[1]:
            return None
        return pending[0], pending[1]

    def expire_pending_reads(self) -> None:
        deadline_ms = self.clock_ms() - READ_INDEX_TIMEOUT_ELECTIONS * self.config.election_timeout_ms
        expired = []
        for sequence, (_identity, _read_id, asked_ms) in self.pending_reads.items():  # oldest first
            if asked_ms > deadline_ms:
                break
            expired.append(sequence)
        for sequence in expired:
            identity, read_id, _asked_ms = self.pending_reads.pop(sequence)
            self.reply(identity, [ipc.READ_INDEX_FAILED, read_id, "Timeout"])

    def on_raft_status(self, identity: bytes, message: list, _payload: bytes) -> None:
        if len(message) != 2:
            raise MalformedMessage("RAFT_STATUS wants [raft_status, status_id]")
        status = self.node.status()
        self.reply(identity, [ipc.RAFT_STATUS, message[1], {
            "term": status["term"], "leader": status["lead"], "commit_index": status["commit"],
            "last_index": status["last_index"], "member_id": self.member_id, "cluster_id": self.cluster_id,
            "snapshot_index": self.wal.snapshot.index, "is_learner": self.is_learner(),
            "lead_transferee": status.get("lead_transferee", NONE),
        }])

    def on_subscribe(self, identity: bytes, message: list, _payload: bytes) -> None:
        if len(message) != 2 or type(message[1]) is not int or message[1] < 0:
            raise MalformedMessage("SUBSCRIBE wants [subscribe, applied_index]")
        if identity != ipc.APPLIER_IDENTITY:
            raise MalformedMessage(f"SUBSCRIBE from {identity[:40]!r}, not the applier")
        applied = message[1]
        if applied + 1 < self.storage.first_index():
            # The applier is behind our compaction point (its store was lost or
            # replaced by an older one): delivering from here would leave a gap;
            # only a store copy (snapshot transfer from the leader) can help.
            self.log.error("applier behind the log's first index; not delivering",
                           applied_index=applied, first_index=self.storage.first_index())
            self.subscribed = False
            return
        # An idle applier says SUBSCRIBE again every second (in case we restarted):
        # logged only when something changed.
        log = self.log.info if not self.subscribed or applied != self.next_delivery_index - 1 else self.log.debug
        self.subscribed = True
        self.next_delivery_index = applied + 1
        self.unacknowledged_batches.clear()
        self.durable_index = max(self.durable_index, min(applied, self.wal.last_index))
        log("applier subscribed", applied_index=applied, commit_index=self.node.durable_commit_index())
        self.maybe_promote_lessor(applied)
        self.reconcile_lessor(applied)

    def on_applied(self, identity: bytes, message: list, _payload: bytes) -> None:
        if len(message) not in (3, 4) or type(message[1]) is not int or type(message[2]) is not int:
            raise MalformedMessage("APPLIED wants [applied, applied_index, durable_index(, lease_changes)]")
        applied, durable = message[1], message[2]
        if len(message) == 4:
            self.apply_lease_changes(message[3])
        self.maybe_promote_lessor(applied)
        while self.unacknowledged_batches and self.unacknowledged_batches[0] <= applied:  # bounded by the window
            self.unacknowledged_batches.popleft()
        if durable > self.durable_index:
            self.durable_index = min(durable, self.node.durable_commit_index())
            self.maybe_snapshot()

    # ---- outputs --------------------------------------------------------------

    def reply(self, identity: bytes, message: list) -> None:
        try:
            self.socket.send_multipart([identity, ormsgpack.packb(message)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self.log.debug("reply dropped", identity=identity[:40], error=str(exc))

    def process_ready(self) -> None:
        node = self.node
        if self.snapshots is not None:
            for peer, failed in self.snapshots.take_reports():
                node.report_snapshot(peer, failed)
            for message in self.snapshots.take_steps():
                conf_state = ConfState(self.members.voters(), self.members.learners())
                node.step(dataclasses.replace(message, snapshot=dataclasses.replace(message.snapshot,
                                                                                    conf_state=conf_state)))
        if self.waiting_member_changes:
            self.retry_waiting_member_changes()
        for _ in range(_READY_CYCLES_PER_PASS):
            if not node.has_ready():
                break
            ready = node.ready()
            if ready.snapshot is not None:
                self.persist_snapshot(ready)  # before anything else of the Ready
            if ready.soft_state is not None:
                self.log.info("raft role changed", role=ready.soft_state.role, leader=ready.soft_state.lead,
                              term=node.raft.term)
                self.on_role_changed(ready.soft_state.role == ROLE_LEADER)
            if ready.entries:
                self.wal.append_entries(ready.entries)
                self.bytes_since_snapshot += sum(len(entry.data) for entry in ready.entries)
            if ready.hard_state is not None:
                hard = ready.hard_state
                self.wal.set_hard_state(hard.term, hard.vote, hard.commit)
            if ready.must_sync():
                self.wal.sync()  # ONE fdatasync for the whole pass: group commit
                self.fsync_count += 1
            self.send_peer_messages(ready.messages)  # only after the fsync above
            for read_state in ready.read_states:
                read = self.take_pending_read(read_state.context)
                if read is not None:
                    self.reply(read[0], [ipc.READ_INDEX, read[1], read_state.index])
            for context in ready.dropped_reads:
                read = self.take_pending_read(context)
                if read is not None:
                    self.reply(read[0], [ipc.READ_INDEX_FAILED, read[1], "LeaderChanged"])
            for entry in ready.committed_entries:
                if entry.type == ENTRY_CONF_CHANGE:
                    self.apply_member_change(entry)
            node.advance(ready)
        if self.pending_moves:
            self.check_pending_moves()
        self.announce_leadership()
        if self.transport is not None:
            self.transport.flush()  # one frame per peer for the whole pass
        self.deliver()

    def announce_leadership(self) -> None:
        """LEADER_CHANGED to every gateway when the term or the leader changed
        (also the first time: a restarted raft log forgot what it forwarded)."""
        raft = self.node.raft
        leadership = (raft.term, raft.lead)
        if leadership == self.announced_leadership:
            return
        self.announced_leadership = leadership
        for identity in self.gateway_identities:
            self.reply(identity, [ipc.LEADER_CHANGED, raft.term, raft.lead, raft.log.committed])

    def persist_snapshot(self, ready) -> None:
        """The core reset its log to a snapshot whose store the applier has
        installed: the WAL restarts at it (synced before anything else)."""
        snapshot = ready.snapshot
        hard = ready.hard_state or self.node.raft.hard_state()
        self.wal.reset_to_snapshot(snapshot.index, snapshot.term, conf_state_wire(snapshot.conf_state),
                                   WalHardState(hard.term, hard.vote, hard.commit))
        self.fsync_count += 1
        self.bytes_since_snapshot = 0
        self.next_delivery_index = max(self.next_delivery_index, snapshot.index + 1)
        self.log.info("raft log reset to an installed snapshot", index=snapshot.index, term=snapshot.term)

    def send_peer_messages(self, messages: list) -> None:
        """Queue the Ready's messages for the peers (sent by flush() at the end
        of the pass, after every fsync of the pass). A MsgSnap starts a
        snapshot transfer instead (actors/snapshot_stream.py)."""
        if self.transport is None:
            self.peer_messages_dropped += len(messages)
            return
        for message in messages:
            if isinstance(message, MsgSnap):
                self.snapshots.start(message)
            else:
                self.transport.queue_message(message)

    def take_snapshot_message(self, sender: int, forward: list) -> None:
        self.snapshots.on_forward(sender, forward)

    def on_snapshot_installed(self, identity: bytes, message: list, _payload: bytes) -> None:
        if identity != ipc.APPLIER_IDENTITY or len(message) != 4 or type(message[1]) is not int:
            raise MalformedMessage("SNAPSHOT_INSTALLED wants [snapshot_installed, index, ok, detail] from the applier")
        _kind, index, ok, detail = message
        if ok is True:
            # The store jumped to `index`: nothing at or below it is delivered again.
            self.next_delivery_index = max(self.next_delivery_index, index + 1)
            # The store's member table is the configuration at `index` (the
            # leader's marker may be older): adopt it, peers included.
            previous, self.members = self.members, load_member_table(self.config)
            self.update_transport(previous)
        if self.snapshots is not None:
            self.snapshots.on_installed(index, ok is True, detail)

    def on_snapshot_tick(self) -> None:
        if self.snapshots.busy():
            self.snapshots.poll(self.is_leader)
            self.process_ready()

    # ---- peers ------------------------------------------------------------------

    def on_peer_batch(self, batch: list) -> None:
        for frames in batch:
            decoded = self.transport.decode(frames)
            if decoded is None:
                continue
            sender, messages, forwards = decoded
            for message in messages:
                if isinstance(message, MsgSnap):
                    # Only a snapshot whose store is installed may reach the core
                    # (snapshot_stream steps it); a bare one would reset the log alone.
                    self.log.warning("bare MsgSnap from a peer dropped", sender=f"{sender:x}")
                    continue
                self.node.step(message)
            for forward in forwards:
                handler = self.forward_handlers.get(forward[0]) if isinstance(forward, list) and forward else None
                if handler is None:
                    self.log.warning("unknown forward from a peer dropped", sender=f"{sender:x}")
                    continue
                handler(sender, forward)
        deferred, self.deferred_lease_requests = self.deferred_lease_requests, []
        for identity, items in deferred:
            self.take_lease_requests(identity, items)
        self.process_ready()

    def take_forwarded_proposal(self, sender: int, forward: list) -> None:
        """A follower's PROPOSE batch: propose it as is, or tell it we cannot."""
        try:
            if len(forward) != 2:
                raise MalformedMessage("propose wants [propose, data]")
            data = forward[1]
            if not isinstance(data, bytes) or len(data) > self.limits.max_proposal_batch_bytes + 1024:
                raise MalformedMessage("a forwarded proposal is entry data within max_proposal_batch_bytes")
            member_id, gateway, items = ormsgpack.unpackb(data)
            if member_id != sender or not isinstance(gateway, bytes) or not isinstance(items, list) or not items:
                raise MalformedMessage("a forwarded proposal is [sender member id, gateway, items]")
            request_ids = [item[0] for item in items]
        except (MalformedMessage, ormsgpack.MsgpackDecodeError, ValueError, TypeError, IndexError, KeyError) as exc:
            self.log.warning("malformed forwarded proposal dropped", sender=f"{sender:x}", error=str(exc)[:200])
            return
        try:
            self.node.propose(data)
        except ProposalDropped:
            code = "NotLeader" if self.node.raft.lead != NONE else "NoLeader"
            self.transport.queue_forward(sender, ["propose_failed", gateway, request_ids, code])

    def take_proposal_failure(self, sender: int, forward: list) -> None:
        if (len(forward) != 4 or not isinstance(forward[1], bytes)
                or not isinstance(forward[2], list) or forward[3] not in ("NotLeader", "NoLeader")):
            self.log.warning("malformed proposal failure dropped", sender=f"{sender:x}")
            return
        _kind, gateway, request_ids, code = forward
        # NotLeader from a member that just lost leadership: to the client it is NoLeader (retry later).
        self.reply(gateway, [ipc.PROPOSE_FAILED, request_ids, "NoLeader" if code == "NotLeader" else code])

    def take_forwarded_lease_requests(self, sender: int, forward: list) -> None:
        if len(forward) != 3 or not isinstance(forward[1], bytes):
            self.log.warning("malformed forwarded lease request dropped", sender=f"{sender:x}")
            return
        try:
            self.on_lease_request((sender, forward[1]), [ipc.LEASE_REQUEST, forward[2]], b"")
        except MalformedMessage as exc:
            self.log.warning("malformed forwarded lease request dropped", sender=f"{sender:x}", error=str(exc)[:200])

    def take_lease_replies(self, sender: int, forward: list) -> None:
        if len(forward) != 3 or not isinstance(forward[1], bytes) or not isinstance(forward[2], list):
            self.log.warning("malformed lease reply dropped", sender=f"{sender:x}")
            return
        self.reply(forward[1], [ipc.LEASE_REPLY, forward[2]])

    def reply_lease(self, identity, replies: list) -> None:
        """To a local gateway (identity bytes) or, for a forwarded request, to
        the member it came from (identity (member id, gateway identity))."""
        if isinstance(identity, tuple):
            self.transport.queue_forward(identity[0], ["lease_reply", identity[1], replies])
        else:
            self.reply(identity, [ipc.LEASE_REPLY, replies])

    def on_peer_tick(self) -> None:
        self.transport.reload_faults()
        self.expire_pending_reads()

    def deliver(self) -> None:
        """Send durable committed entries to the applier, within the window."""
        if not self.subscribed:
            return
        limits = self.limits
        commit = self.node.durable_commit_index()
        while (len(self.unacknowledged_batches) < limits.max_apply_inflight_batches
               and self.next_delivery_index <= commit):  # bounded by the window
            low = self.next_delivery_index
            assert low >= self.storage.first_index(), (low, self.storage.first_index())
            high = min(commit, low + limits.max_apply_batch_entries - 1) + 1
            entries = self.node.entries(low, high, limits.max_apply_batch_bytes)
            payload = ormsgpack.packb([ipc.ENTRIES, [tuple(entry) for entry in entries]])
            try:
                self.socket.send_multipart([ipc.APPLIER_IDENTITY, payload], zmq.NOBLOCK)
            except zmq.Again:
                return  # the applier's queue is full: retry next pass
            except zmq.ZMQError as exc:
                self.log.warning("applier unreachable; waiting for SUBSCRIBE", error=str(exc))
                self.subscribed = False
                return
            self.unacknowledged_batches.append(entries[-1].index)
            self.next_delivery_index = entries[-1].index + 1

    # ---- leases -----------------------------------------------------------------

    def on_role_changed(self, is_leader: bool) -> None:
        if is_leader == self.is_leader:
            return
        self.is_leader = is_leader
        if is_leader:
            # The new term's first entry (the no-op) is the last one by now:
            # once it is applied, so is every lease change of earlier terms.
            self.promote_at_index = self.node.raft.log.last_index()
            return
        self.promote_at_index = None
        if self.lessor.primary:
            self.lessor.demote()
            self.log.info("lessor demoted")
        held, self.held_lease_requests = self.held_lease_requests, []
        for identity, items in held:
            self.answer_lease_requests(identity, items)

    def maybe_promote_lessor(self, applied_index: int) -> None:
        if self.promote_at_index is None or applied_index < self.promote_at_index:
            return
        leases = self.stored_leases()
        if leases is None:
            return  # tried again at the next APPLIED or SUBSCRIBE
        self.promote_at_index = None
        self.lessor.promote(self.clock_ms(), leases)
        self.lease_reconciled_index = applied_index
        self.log.info("lessor promoted", leases=len(leases), extend_ms=self.lessor.extend_ms)
        held, self.held_lease_requests = self.held_lease_requests, []
        for identity, items in held:
            self.answer_lease_requests(identity, items)

    def reconcile_lessor(self, applied_index: int) -> None:
        """After a SUBSCRIBE (the applier may have restarted and lost a report),
        match the lessor with the store. Skipped when nothing was applied since
        the last match (an idle applier resubscribes every second)."""
        if not self.lessor.primary or applied_index == self.lease_reconciled_index:
            return
        leases = self.stored_leases()
        if leases is None:
            return
        self.lease_reconciled_index = applied_index
        added, dropped = self.lessor.reconcile(self.clock_ms(), leases)
        if added or dropped:
            self.log.warning("lessor matched to the store", added=added, dropped=dropped)

    def stored_leases(self) -> list[tuple[int, int]] | None:
        """The store's leases [(id, TTL)], [] if there is no store yet, None if
        it cannot be read now (logged; tried again at the next chance)."""
        return self.read_store(lambda store: store.lease_ttls(), [])

    def read_store(self, read, if_no_store):
        """read(store) on the node's store, opened read-only on first use and
        reopened after a defragment; if_no_store when the applier has not
        created it yet; None (logged) when it cannot be read."""
        from actors.gateway import open_store  # the gateway module is heavy; only the leader needs it

        try:
            if self.store is None:
                self.store = open_store(self.config)
            else:
                self.store.reopen_if_stale()
            self.store_used_ms = self.clock_ms()
            return read(self.store)
        except FileNotFoundError:
            return if_no_store
        except Exception as exc:  # an LMDB error must not kill the log; say it loudly
            self.log.error("lessor cannot read the store", error=str(exc)[:200])
            if self.store is not None:
                self.store.close()
                self.store = None
            return None

    def adopt_stored_lease(self, lease_id: int, now_ms: float) -> None:
        """A lease the lessor does not know but the store has was granted and
        its report is still on the way: take it in now (the store is the truth
        on which leases exist), so a keep-alive right after a grant finds it."""
        if lease_id <= 0:
            return
        stored = self.read_store(lambda store: store.lease_time_to_live({"ID": lease_id, "keys": False}), None)
        if stored is not None and stored["TTL"] > 0:
            self.lessor.grant(lease_id, stored["TTL"], now_ms)

    def apply_lease_changes(self, changes: object) -> None:
        if not isinstance(changes, list):
            raise MalformedMessage("APPLIED lease_changes must be a list")
        now_ms = self.clock_ms()
        for change in changes:
            if type(change) is not list or len(change) != 2 or type(change[0]) is not int or type(change[1]) is not int:
                raise MalformedMessage("a lease change is [lease_id, ttl_s]")
            lease_id, ttl_s = change
            if ttl_s > 0:
                self.lessor.grant(lease_id, ttl_s, now_ms)
            else:
                self.lessor.revoke(lease_id)

    def on_lease_request(self, identity: bytes, message: list, _payload: bytes) -> None:
        if len(message) != 2 or type(message[1]) is not list:
            raise MalformedMessage("LEASE_REQUEST wants [lease_request, [[id, op, body], ...]]")
        items = message[1]
        for item in items:
            if (type(item) is not list or len(item) != 3 or item[1] not in _LEASE_OPS
                    or type(item[2]) is not dict or type(item[2].get("ID")) is not int):
                raise MalformedMessage("a lease request is [id, op, {\"ID\": int, ...}]")
        self.deferred_lease_requests.append((identity, items))

    def take_lease_requests(self, identity: bytes, items: list) -> None:
        if self.is_learner() and isinstance(identity, bytes):
            error = QuorumError("LearnerNotSupported").to_wire()
            self.reply_lease(identity, [[item[0], codec.STATUS_ERROR, error] for item in items])
            return
        if self.is_leader and not self.lessor.primary:
            held = sum(len(batch) for _, batch in self.held_lease_requests)
            if held + len(items) <= self.limits.max_held_lease_requests:
                self.held_lease_requests.append((identity, items))
                return
            self.reply_lease(identity, [[item[0], codec.STATUS_ERROR, QuorumError("TooManyRequests").to_wire()]
                                        for item in items])
            return
        leader = self.node.raft.lead
        if (not self.is_leader and isinstance(identity, bytes) and self.transport is not None
                and leader not in (NONE, self.member_id)):
            # A follower forwards keep-alives and time-to-live to the leader's lessor.
            self.transport.queue_forward(leader, ["lease_request", identity, items])
            return
        self.answer_lease_requests(identity, items)

    def answer_lease_requests(self, identity: bytes, items: list) -> None:
        if not self.lessor.primary:
            code = "NotLeader" if self.node.raft.lead else "NoLeader"
            error = QuorumError(code).to_wire()
            self.reply_lease(identity, [[item[0], codec.STATUS_ERROR, error] for item in items])
            return
        now_ms = self.clock_ms()
        replies = []
        for request_id, op, body in items:
            lease_id = body["ID"]
            if lease_id not in self.lessor:
                self.adopt_stored_lease(lease_id, now_ms)
            if op == "lease_keep_alive":
                ttl_s = self.lessor.renew(lease_id, now_ms)
                replies.append([request_id, codec.STATUS_OK, {"ID": lease_id, "TTL": ttl_s or 0}])
            else:
                remaining_ms = self.lessor.remaining_ms(lease_id, now_ms)
                if remaining_ms is None:
                    response = {"ID": lease_id, "TTL": -1, "grantedTTL": 0}
                else:
                    response = {"ID": lease_id, "TTL": seconds_truncated(remaining_ms),
                                "grantedTTL": self.lessor.granted_ttl_s(lease_id)}
                replies.append([request_id, codec.STATUS_OK, response])
        self.reply_lease(identity, replies)

    def on_lease_tick(self) -> None:
        """Propose the revokes of expired leases: one entry, a bounded count."""
        if self.store is not None and self.clock_ms() - self.store_used_ms > STORE_IDLE_CLOSE_MS:
            # Do not hold a generation a defragment has since removed (its disk space).
            self.store.close()
            self.store = None
        if not self.lessor.primary:
            return
        expired = self.lessor.expired(self.clock_ms(), self.limits.max_lease_revokes_per_pass)
        if not expired:
            return
        items = []
        for lease_id in expired:
            items.append([self.next_lessor_request_id, "lease_revoke", {"ID": lease_id}])
            self.next_lessor_request_id += 1
        try:
            self.node.propose(ormsgpack.packb([self.member_id, ipc.LESSOR_IDENTITY, items]))
        except ProposalDropped:
            # Leadership is going; the new leader's lessor takes over (and the
            # retry time brings these back if we stay leader).
            self.log.info("revokes of expired leases dropped", leases=len(expired))
            return
        self.log.info("revoking expired leases", leases=len(expired))
        self.process_ready()

    # ---- membership ---------------------------------------------------------------

    def is_learner(self) -> bool:
        own = self.members.members.get(self.member_id)
        return own is not None and own["isLearner"]

    def on_member_request(self, identity: bytes, message: list, _payload: bytes) -> None:
        if len(message) != 2 or type(message[1]) is not list:
            raise MalformedMessage("MEMBER_REQUEST wants [member_request, [[id, op, body], ...]]")
        items = message[1]
        if len(items) > self.limits.max_proposal_batch_requests:
            raise MalformedMessage(f"MEMBER_REQUEST with {len(items)} requests exceeds max_proposal_batch_requests")
        for item in items:
            if type(item) is not list or len(item) != 3 or item[1] not in MEMBER_OPS or type(item[2]) is not dict:
                raise MalformedMessage("a member request is [id, op, body] with op one of MEMBER_OPS")
        to_leader = []
        for request_id, op, body in items:
            if op in _CHANGE_OPS and self.node.raft.role != ROLE_LEADER:
                to_leader.append([request_id, op, body])
            else:
                self.take_member_request([self.member_id, identity, request_id], op, body)
        if not to_leader:
            return
        leader = self.node.raft.lead
        if self.transport is not None and leader not in (NONE, self.member_id):
            self.transport.queue_forward(leader, ["member_request", identity, to_leader])
        else:
            error = QuorumError("NoLeader").to_wire()
            self.reply(identity, [ipc.MEMBER_REPLY, [[item[0], codec.STATUS_ERROR, error] for item in to_leader]])

    def take_member_request(self, origin: list, op: str, body: dict) -> None:
        if op == "member_list":
            self.answer_member(origin, codec.STATUS_OK, {"members": self.members.listed()})
        elif op == "move_leader":
            self.start_move(origin, body["targetID"])
        else:
            self.propose_member_change(origin, op, body)

    def answer_member(self, origin: list | None, status: int, body: dict) -> None:
        """To the gateway that asked: ours directly, another member's through it."""
        if origin is None:
            return  # a publish: nobody waits
        member_id, gateway, request_id = origin
        replies = [[request_id, status, body]]
        if member_id == self.member_id:
            self.reply(gateway, [ipc.MEMBER_REPLY, replies])
        elif self.transport is not None:
            self.transport.queue_forward(member_id, ["member_reply", gateway, replies])

    def member_change_for(self, origin: list | None, op: str, body: dict) -> ConfChange:
        """The conf change a request asks for, after etcd's checks (QuorumError)."""
        table = self.members
        if op == "member_add":
            urls = member_rules.check_peer_urls(body["peerURLs"])
            record = member_rules.check_add(table, urls, body["isLearner"], self.config.initial_cluster_token)
            kind = "add_learner" if body["isLearner"] else "add_voter"
            return ConfChange(kind, record["ID"], pack_context(record, origin))
        member_id = body["ID"]
        if not 0 < member_id < 1 << 64:
            raise QuorumError("MemberNotFound")
        if op == "publish":
            if member_id not in table.members:
                raise QuorumError("MemberNotFound")
            return ConfChange("update", member_id, pack_context(body, origin))
        if op == "member_remove":
            member_rules.check_remove(table, member_id)
            return ConfChange("remove", member_id, pack_context({"ID": member_id}, origin))
        if op == "member_update":
            urls = member_rules.check_peer_urls(body["peerURLs"])
            record = member_rules.check_update(table, member_id, urls)
            return ConfChange("update", member_id, pack_context(record, origin))
        assert op == "member_promote", op
        progress = self.node.raft.progress
        learner_match = progress[member_id].match if member_id in progress else 0
        leader_match = progress[self.member_id].match if self.member_id in progress else 0
        member_rules.check_promote(table, member_id, learner_match, leader_match)
        return ConfChange("promote_learner", member_id, pack_context({"ID": member_id}, origin))

    def propose_member_change(self, origin: list | None, op: str, body: dict) -> None:
        """Leader: check and propose; a change while another is pending waits."""
        try:
            self.node.propose_conf_change(self.member_change_for(origin, op, body))
        except QuorumError as error:
            self.answer_member(origin, codec.STATUS_ERROR, error.to_wire())
        except raft_errors.ConfChangePending:
            if len(self.waiting_member_changes) >= MAX_WAITING_MEMBER_CHANGES:
                self.answer_member(origin, codec.STATUS_ERROR, QuorumError("TooManyRequests").to_wire())
            else:
                self.waiting_member_changes.append((origin, op, body))
        except raft_errors.ConfChangeInvalid as error:
            code = _CONF_CHANGE_ERRORS.get(type(error).__name__, "InvalidArgument")
            self.answer_member(origin, codec.STATUS_ERROR, QuorumError(code).to_wire())
        except ProposalDropped:
            self.answer_member(origin, codec.STATUS_ERROR, QuorumError("NoLeader").to_wire())

    def retry_waiting_member_changes(self) -> None:
        waiting, self.waiting_member_changes = self.waiting_member_changes, []
        for origin, op, body in waiting:
            if self.node.raft.role == ROLE_LEADER:
                self.propose_member_change(origin, op, body)
            else:
                self.answer_member(origin, codec.STATUS_ERROR, QuorumError("NoLeader").to_wire())

    def take_forwarded_member_requests(self, sender: int, forward: list) -> None:
        if (len(forward) != 3 or not isinstance(forward[1], bytes) or type(forward[2]) is not list
                or len(forward[2]) > self.limits.max_proposal_batch_requests
                or not all(type(item) is list and len(item) == 3 and item[1] in _CHANGE_OPS
                           and type(item[2]) is dict for item in forward[2])):
            self.log.warning("malformed forwarded member request dropped", sender=f"{sender:x}")
            return
        _kind, gateway, items = forward
        for request_id, op, body in items:
            origin = [sender, gateway, request_id]
            if self.node.raft.role != ROLE_LEADER:
                self.answer_member(origin, codec.STATUS_ERROR, QuorumError("NoLeader").to_wire())
                continue
            try:
                body = validate_request(op, body, self.limits)  # a peer's body is checked as a client's
            except QuorumError as error:
                self.answer_member(origin, codec.STATUS_ERROR, error.to_wire())
                continue
            self.propose_member_change(origin, op, body)

    def take_member_replies(self, sender: int, forward: list) -> None:
        if len(forward) != 3 or not isinstance(forward[1], bytes) or not isinstance(forward[2], list):
            self.log.warning("malformed member reply dropped", sender=f"{sender:x}")
            return
        self.reply(forward[1], [ipc.MEMBER_REPLY, forward[2]])

    def take_publish(self, sender: int, forward: list) -> None:
        if (len(forward) != 2 or type(forward[1]) is not dict or forward[1].get("ID") != sender
                or not isinstance(forward[1].get("name"), str) or type(forward[1].get("clientURLs")) is not list
                or len(forward[1]["name"]) > member_rules.MAX_NAME_BYTES
                or len(forward[1]["clientURLs"]) > member_rules.MAX_PEER_URLS
                or not all(isinstance(url, str) and len(url) <= member_rules.MAX_URL_BYTES
                           for url in forward[1]["clientURLs"])):
            self.log.warning("malformed publish dropped", sender=f"{sender:x}")
            return
        if self.node.raft.role == ROLE_LEADER:
            self.queue_publish(forward[1])

    def queue_publish(self, publication: dict) -> None:
        if any(op == "publish" and body["ID"] == publication["ID"] for _o, op, body in self.waiting_member_changes):
            return
        self.propose_member_change(None, "publish", publication)

    def maybe_publish(self) -> None:
        """etcd's publish: put this member's name and client URLs in the table."""
        own = self.members.members.get(self.member_id)
        if own is None or self.removed:
            return
        publication = {"ID": self.member_id, "name": self.config.name,
                       "clientURLs": list(self.config.advertise_client_urls)}
        if own["name"] == publication["name"] and own["clientURLs"] == publication["clientURLs"]:
            return
        leader = self.node.raft.lead
        if leader == self.member_id:
            self.queue_publish(publication)
            self.process_ready()
        elif leader != NONE and self.transport is not None:
            self.transport.queue_forward(leader, ["publish", publication])
            self.transport.flush()

    def take_removed_notice(self, sender: int, _forward: list) -> None:
        if sender in self.members.members:
            self.on_removed(f"member {sender:x} says this member was removed")

    def start_move(self, origin: list, target: int) -> None:
        raft = self.node.raft
        if raft.role != ROLE_LEADER:
            self.answer_member(origin, codec.STATUS_ERROR, QuorumError("NotLeader").to_wire())
            return
        record = self.members.members.get(target)
        if record is None or record["isLearner"]:
            self.answer_member(origin, codec.STATUS_ERROR, QuorumError("BadLeaderTransferee").to_wire())
            return
        if target == self.member_id:
            self.answer_member(origin, codec.STATUS_OK, {})
            return
        try:
            self.node.transfer_leader(target)
        except raft_errors.BadTransferee:
            self.answer_member(origin, codec.STATUS_ERROR, QuorumError("BadLeaderTransferee").to_wire())
            return
        except ProposalDropped:
            self.answer_member(origin, codec.STATUS_ERROR, QuorumError("NotLeader").to_wire())
            return
        self.log.info("leadership transfer started", target=f"{target:x}")
        deadline_ms = self.clock_ms() + MOVE_LEADER_TIMEOUT_ELECTIONS * self.config.election_timeout_ms
        self.pending_moves.append((origin, target, deadline_ms))

    def check_pending_moves(self) -> None:
        now_ms, lead = self.clock_ms(), self.node.raft.lead
        waiting = []
        for origin, target, deadline_ms in self.pending_moves:
            if lead == target:
                self.log.info("leadership moved", leader=f"{target:x}")
                self.answer_member(origin, codec.STATUS_OK, {})
            elif now_ms > deadline_ms:
                self.answer_member(origin, codec.STATUS_ERROR, QuorumError("LeaderTransferTimeout").to_wire())
            else:
                waiting.append((origin, target, deadline_ms))
        self.pending_moves = waiting

    def apply_member_change(self, entry: Entry) -> None:
        """A committed conf-change entry, in log order: core, table, transport, answer."""
        change = ConfChange.from_wire(ormsgpack.unpackb(entry.data))
        if entry.index <= self.members.conf_index:
            # Already in the table (replayed after a restart): the core only
            # needs to hear the entry was applied; its configuration came from the table.
            self.node.apply_conf_change(ConfChange("update", change.node_id))
            return
        member, origin = unpack_context(change.context)
        conf_state = self.node.apply_conf_change(change)
        previous = self.members.copy()
        self.members.apply_change(change.kind, change.node_id, member, entry.index)
        if (conf_state.voters, conf_state.learners) != (self.members.voters(), self.members.learners()):
            self.log.error("member table and raft configuration differ", voters=conf_state.voters,
                           learners=conf_state.learners, table_voters=self.members.voters(),
                           table_learners=self.members.learners())
        if change.kind != "update" or origin is not None:
            self.log.info("membership changed", change=change.kind, member_id=f"{change.node_id:x}",
                          index=entry.index, voters=len(conf_state.voters), learners=len(conf_state.learners))
        self.update_transport(previous)
        if origin is not None and origin[0] == self.member_id:
            body = {"members": self.members.listed()}
            if change.kind in ("add_voter", "add_learner"):
                body["member"] = self.members.members.get(change.node_id)
            self.answer_member(origin, codec.STATUS_OK, body)
        if self.member_id not in self.members.members:
            self.on_removed("this member's removal was applied")

    def update_transport(self, previous: MemberTable) -> None:
        current = self.members.members
        if self.transport is None:
            if len(current) > 1 and self.member_id in current:
                self.transport = PeerTransport(self.socket.context, self.config, self.log,
                                               table_peers(self.members.listed()))
                self.start_snapshot_streams(self.transport)
                self.on_transport_created(self.transport)
            return
        for member_id, (name, url) in table_peers([rec for i, rec in current.items() if i != self.member_id]).items():
            if member_id in previous.members:
                self.transport.update_peer(member_id, name, url)
            else:
                self.transport.add_peer(member_id, name, url)
        for member_id in previous.members:
            if member_id not in current and member_id != self.member_id:
                self.transport.remove_peer(member_id)

    def on_removed(self, reason: str) -> None:
        if self.removed:
            return
        self.removed = True
        self.log.error("the member has been permanently removed from the cluster; stopping",
                       member_id=f"{self.member_id:x}", reason=reason)
        path = removed_path(self.config.data_dir)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(f"member {self.member_id:x} was removed from the cluster: {reason}\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.stop_loop("removed from the cluster")

    def maybe_snapshot(self) -> None:
        """Write a snapshot marker at the durable index every snapshot_count
        entries and release WAL segments well below it."""
        durable = self.durable_index
        # Entries are batches of requests, so a count alone does not bound the
        # memory the log holds: a byte budget triggers a snapshot too.
        if (durable - self.wal.snapshot.index < self.config.snapshot_count
                and self.bytes_since_snapshot < self.limits.max_log_bytes_between_snapshots):
            return
        if durable <= self.wal.snapshot.index:
            return
        self.bytes_since_snapshot = 0
        term = self.node.raft.log.term(durable)
        assert term is not None, durable
        try:
            conf_state = self.node.conf_state_at(durable)
        except (raft_errors.Compacted, raft_errors.Unavailable):
            conf_state = self.node.conf_state()
        self.wal.save_snapshot(durable, term, conf_state.to_marker())
        self.wal.sync()
        self.fsync_count += 1
        self.storage.set_snapshot(SnapshotMeta(durable, term, conf_state))
        release_index = durable - self.limits.snapshot_catchup_entries
        removed = 0
        if release_index > self.storage.first_index():
            removed = self.wal.release(release_index)
            self.storage.compact(min(release_index - 1, self.node.raft.log.applied))
        self.log.info("snapshot marker written", index=durable, term=term, segments_released=removed,
                      first_index=self.storage.first_index())


def conf_state_wire(conf_state) -> dict:
    """A ConfState as the WAL marker stores it: every field, passed through."""
    return {field.name: list(getattr(conf_state, field.name)) for field in dataclasses.fields(conf_state)}


def finish_interrupted_install(config: NodeConfig, wal: Wal, recovery, log):
    """A store ahead of the WAL (a snapshot installed, then a crash before the
    WAL reset was synced) gets the WAL reset it missed; (wal, recovery)."""
    try:
        store = open_store_read_only(config)
    except FileNotFoundError:
        return wal, recovery
    try:
        status = store.status()
    finally:
        store.close()
    applied, applied_term = status["raft_applied_index"], status["raft_term"]
    entries = recovery.entries
    wal_term = None
    if entries and entries[0][0] <= applied <= entries[-1][0]:
        wal_term = entries[applied - entries[0][0]][1]
    elif applied == recovery.snapshot.index:
        wal_term = recovery.snapshot.term
    if applied == 0 or wal_term == applied_term or (entries and applied < entries[0][0]) \
            or applied < recovery.snapshot.index:
        return wal, recovery  # the WAL holds (or has compacted) the store's last entry
    hard = recovery.hard_state
    term = max(hard.term, applied_term)
    log.warning("store ahead of the raft log (a snapshot install was interrupted): resetting the log to it",
                applied_index=applied, applied_term=applied_term, wal_last_index=recovery.last_index)
    wal.reset_to_snapshot(applied, applied_term, recovery.snapshot.conf_state,
                          WalHardState(term, hard.vote if term == hard.term else 0, applied))
    wal.close()
    return Wal.open(wal.directory, config.limits().wal_segment_bytes, log=log)


def bind_socket(context: zmq.Context, config: NodeConfig) -> zmq.Socket:
    limits = config.limits()
    directory = ipc.run_dir(config.data_dir)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "raft.sock")
    if os.path.exists(path):
        os.remove(path)  # stale socket of a previous (killed) run
    socket = context.socket(zmq.ROUTER)
    socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
    socket.setsockopt(zmq.SNDHWM, limits.socket_high_water_mark)
    socket.setsockopt(zmq.RCVHWM, limits.socket_high_water_mark)
    socket.setsockopt(zmq.LINGER, 0)
    socket.bind(ipc.raft_endpoint(config.data_dir))
    return socket


def run(config: NodeConfig, index: int, log) -> None:
    """The raft log process's entry point (index is unused: one per node)."""
    del index
    limits = config.limits()
    limits.validate()
    if os.path.exists(removed_path(config.data_dir)):
        log.error("the member has been permanently removed from the cluster; not starting",
                  data_dir=os.path.abspath(config.data_dir))
        raise SystemExit(EXIT_MEMBER_REMOVED)
    wal, recovery = Wal.open(os.path.join(config.data_dir, "wal"), limits.wal_segment_bytes, log=log)
    wal, recovery = finish_interrupted_install(config, wal, recovery, log)
    rng = random.Random(config.seed or config.member_id())
    table = load_member_table(config)
    node, storage = build_node(config, recovery, rng, table)
    log.info("raft log recovered", last_index=recovery.last_index, term=recovery.hard_state.term,
             commit_index=recovery.hard_state.commit, snapshot_index=recovery.snapshot.index,
             torn_tail_bytes=recovery.truncated_tail_bytes)
    context = zmq.Context()
    socket = bind_socket(context, config)
    transport = None
    if len(table.members) > 1:
        transport = PeerTransport(context, config, log, table_peers(table.listed()))
    log.info("members", member_id=f"{config.member_id():x}", conf_index=table.conf_index,
             voters=[f"{i:x}" for i in table.voters()], learners=[f"{i:x}" for i in table.learners()])
    actor = RaftLogActor(config, log, socket, wal, node, storage, transport=transport, members=table)
    assert set(actor.handlers) == {ipc.PROPOSE, ipc.READ_INDEX, ipc.RAFT_STATUS, ipc.SUBSCRIBE, ipc.APPLIED,
                                   ipc.LEASE_REQUEST, ipc.SNAPSHOT_INSTALLED, ipc.MEMBER_REQUEST}
    loop = ActorLoop(log, limits.max_messages_per_poll, parent_pid=os.getppid())
    loop.add_socket(socket, actor.on_batch, multipart=True)
    loop.add_timer(config.heartbeat_interval_ms, actor.on_tick)
    loop.add_timer(LEASE_CHECK_MS, actor.on_lease_tick)
    loop.add_timer(PUBLISH_CHECK_MS, actor.maybe_publish)

    def transport_up(peers: PeerTransport) -> None:
        log.info("peer transport up", listen=config.listen_peer_urls[0], member_id=f"{config.member_id():x}",
                 peers={f"{peer:x}": peers.names[peer] for peer in peers.peers})
        loop.add_socket(peers.router, actor.on_peer_batch, multipart=True)
        loop.add_timer(FAULTS_CHECK_MS, actor.on_peer_tick)
        loop.add_timer(SNAPSHOT_POLL_MS, actor.on_snapshot_tick, active=lambda: actor.snapshots.busy())

    actor.on_transport_created = transport_up
    actor.stop_loop = loop.stop
    if transport is not None:
        transport_up(transport)
    else:
        loop.add_timer(FAULTS_CHECK_MS, actor.expire_pending_reads)
    actor.process_ready()
    try:
        reason = loop.run()
        log.info("raft log stopping", reason=reason, wal_fsyncs=actor.fsync_count,
                 last_index=node.raft.log.last_index(), commit_index=node.raft.log.committed)
    finally:
        if actor.store is not None:
            actor.store.close()
        wal.close()
        if actor.snapshots is not None:
            actor.snapshots.close()
        if transport is not None:
            transport.close()
        if actor.transport is not None and actor.transport is not transport:
            actor.transport.close()
        socket.close(0)
        context.term()
    if actor.removed:
        raise SystemExit(EXIT_MEMBER_REMOVED)
