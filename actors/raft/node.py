"""RawNode: the Raft core's public face, and the Ready contract.

How this works: the caller feeds the node (`tick`, `step`, `propose`,
`read_index`, `campaign`), then, once per pass of its loop, asks
`has_ready()`/`ready()` for everything the core needs carried out, carries it
out IN THE ORDER OF THE FIELDS of `Ready`, and calls `advance(ready)`. Only
one Ready may be outstanding at a time.

A single-voter node campaigns at construction, so it is leader at once; its
no-op entry commits after the first Ready's entries are persisted and
`advance()` is called.

Membership: for each ENTRY_CONF_CHANGE entry in `Ready.committed_entries`, in
order with the others, the caller decodes its ConfChange and calls
`apply_conf_change` (before `advance()`; after a restart, also for entries the
state machine had already applied: the core starts from the ConfState its
storage gives, the one at `Config.applied`). Until it has, the core refuses
new changes. The ConfState for a snapshot marker at index i is
`conf_state_at(i)`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from actors.raft.messages import ConfChange, ConfState, Entry, HardState, Message, ReadState, SnapshotMeta, SoftState
from actors.raft.raft import ROLE_LEADER, Config, Raft
from actors.raft.storage import MemoryStorage

if TYPE_CHECKING:  # the RNG is passed in; the core never imports the module at run time
    import random


@dataclasses.dataclass(frozen=True, slots=True)
class Ready:
    # A snapshot the log was reset to (a follower sent a newer snapshot than
    # its log). The caller must have installed its data in the state machine
    # and must persist it (snapshot marker, log reset) BEFORE everything else
    # of this Ready; None = no snapshot.
    snapshot: SnapshotMeta | None
    # Changed term/vote/commit (None = unchanged). Must be saved to stable
    # storage BEFORE any of `messages` is sent.
    hard_state: HardState | None
    # Entries to append to stable storage (an index already stored replaces it
    # and everything after it). Must be durable BEFORE any of `messages` is
    # sent and before advance().
    entries: list[Entry]
    # Messages to peers. Send only AFTER `hard_state` and `entries` are durable.
    messages: list[Message]
    # Committed entries to hand to the state machine, in order, after the
    # above are durable (they are already durable locally).
    committed_entries: list[Entry]
    # Reads that may be served once the state machine has applied `index`.
    read_states: list[ReadState]
    # Contexts of read requests that cannot be served (leadership lost); the
    # caller answers them with an error.
    dropped_reads: list
    # Leader/role, when changed since the last Ready (None = unchanged).
    soft_state: SoftState | None

    previous_hard_state: HardState | None = None

    def must_sync(self) -> bool:
        """Whether this Ready needs an fsync before its messages go out: new
        entries, or a changed term or vote. A commit-index-only change need not
        be synced (the commit index is recovered from peers/leadership)."""
        if self.entries or self.snapshot is not None:
            return True
        if self.hard_state is None:
            return False
        previous = self.previous_hard_state or HardState()
        return self.hard_state.term != previous.term or self.hard_state.vote != previous.vote


class RawNode:
    def __init__(self, config: Config, storage: MemoryStorage, rng: random.Random):
        self.storage = storage
        self.raft = Raft(config, storage, rng)
        self.previous_hard_state = storage.hard_state
        self.previous_soft_state = None
        self.outstanding = False
        if self.raft.is_single_voter():
            self.raft.campaign()

    # ---- inputs -----------------------------------------------------------------

    def tick(self) -> None:
        self.raft.tick()

    def step(self, message: Message) -> None:
        self.raft.step(message)

    def campaign(self) -> None:
        self.raft.campaign()

    def propose(self, data: bytes) -> int:
        """Returns the new entry's index; raises ProposalDropped unless leader
        (or while the leader transfers leadership)."""
        return self.raft.propose(data)

    def propose_conf_change(self, change: ConfChange) -> int:
        """Returns the ENTRY_CONF_CHANGE entry's index. Raises ProposalDropped
        (not leader, transferring), ConfChangePending (an earlier change is not
        applied yet) or ConfChangeInvalid (MemberExists, MemberNotFound,
        MemberNotLearner, RemovingLastVoter)."""
        return self.raft.propose_conf_change(change)

    def apply_conf_change(self, change: ConfChange) -> ConfState:
        """A committed change is being applied (see the module docstring);
        returns the configuration now in effect."""
        return self.raft.apply_conf_change(change)

    def transfer_leader(self, target_id: int) -> None:
        """Leader only (ProposalDropped otherwise); `target_id` must be a voter
        (BadTransferee). Proposals are dropped until the transfer completes or
        is given up after an election timeout; `SoftState.lead_transferee`."""
        self.raft.transfer_leader(target_id)

    def read_index(self, context) -> None:
        """Raises ReadIndexDropped when no leader is known."""
        self.raft.read_index(context)

    def report_snapshot(self, to: int, failed: bool) -> None:
        """Leader: the snapshot transfer to `to` ended (etcd's ReportSnapshot);
        a failed one sends the follower back to probing, to be retried."""
        self.raft.report_snapshot(to, failed)

    # ---- the Ready contract -------------------------------------------------------

    def has_ready(self) -> bool:
        raft = self.raft
        raft.flush()
        return bool(
            raft.messages or raft.read_states or raft.dropped_reads or raft.log.unstable.entries
            or raft.log.unstable.snapshot is not None
            or raft.log.has_next_committed_entries() or raft.hard_state() != self.previous_hard_state
            or raft.soft_state() != self.previous_soft_state
        )

    def ready(self) -> Ready:
        assert not self.outstanding, "advance() the previous Ready first"
        raft = self.raft
        raft.flush()
        hard_state = raft.hard_state()
        soft_state = raft.soft_state()
        committed_entries = raft.log.next_committed_entries()
        raft.note_conf_changes_handed_out(committed_entries)
        ready = Ready(
            snapshot=raft.log.unstable.snapshot,
            hard_state=hard_state if hard_state != self.previous_hard_state else None,
            entries=list(raft.log.unstable.entries),
            messages=raft.messages,
            committed_entries=committed_entries,
            read_states=raft.read_states,
            dropped_reads=raft.dropped_reads,
            soft_state=soft_state if soft_state != self.previous_soft_state else None,
            previous_hard_state=self.previous_hard_state,
        )
        raft.messages = []
        raft.read_states = []
        raft.dropped_reads = []
        self.outstanding = True
        return ready

    def advance(self, ready: Ready) -> None:
        """The Ready was carried out: its entries and hard state are durable,
        its messages sent, its committed entries applied."""
        assert self.outstanding, "advance() without ready()"
        self.outstanding = False
        raft = self.raft
        if ready.hard_state is not None:
            self.previous_hard_state = ready.hard_state
            self.storage.set_hard_state(ready.hard_state)
        if ready.soft_state is not None:
            self.previous_soft_state = ready.soft_state
        if ready.snapshot is not None:
            self.storage.apply_snapshot(ready.snapshot)
            raft.log.snapshot_installed(ready.snapshot)
        if ready.entries:
            last = ready.entries[-1]
            self.storage.append(ready.entries)
            raft.log.stable_to(last.index, last.term)
            raft.on_persisted(last.index)
        if ready.committed_entries:
            raft.log.applied_to(ready.committed_entries[-1].index)

    # ---- reading the durable log (for the caller's own delivery) -------------------

    def durable_commit_index(self) -> int:
        """The highest index that is both committed and durable locally."""
        log = self.raft.log
        return min(log.committed, log.persisted_last_index())

    def entries(self, low: int, high: int, max_bytes: int) -> list[Entry]:
        """Durable entries [low, high) (at least one, at most max_bytes beyond it).
        Raises Compacted below the storage's first index."""
        assert high - 1 <= self.raft.log.persisted_last_index(), (high, self.raft.log.persisted_last_index())
        return self.raft.log.slice(low, high, max_bytes)

    # ---- configuration and status -----------------------------------------------------

    def conf_state(self) -> ConfState:
        """The configuration in effect (every change applied so far)."""
        return self.raft.conf_state()

    def conf_state_at(self, index: int) -> ConfState:
        """The configuration after every entry up to `index` (an applied index)."""
        return self.raft.conf_state_at(index)

    def status(self) -> dict:
        """`progress` (the leader's view of each member) is empty on a non-leader."""
        raft = self.raft
        progress = {}
        if raft.role == ROLE_LEADER:
            progress = {member: {"match": tracked.match, "next": tracked.next, "state": tracked.state,
                                 "recent_active": tracked.recent_active}
                        for member, tracked in sorted(raft.progress.items())}
        return {
            "id": raft.id, "term": raft.term, "vote": raft.vote, "lead": raft.lead, "role": raft.role,
            "commit": raft.log.committed, "applied": raft.log.applied, "last_index": raft.log.last_index(),
            "first_index": raft.log.first_index(), "lead_transferee": raft.lead_transferee,
            "voters": raft.voters, "learners": raft.learners, "progress": progress,
        }
