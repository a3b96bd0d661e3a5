"""The Raft rules (after etcd-io/raft's raft.go). Pure: no I/O, no clock, no
global randomness.

How this works: a `Raft` is driven by three kinds of input — `tick()` (time),
`step(message)` (a peer's message) and local requests (`propose`,
`read_index`, `campaign`). It never performs I/O: it appends to its log's
unstable part, queues outgoing messages in `self.messages` and read results in
`self.read_states`; `RawNode` packages these into a `Ready` and the caller
persists, sends and applies them (in that order).

A role is a pair of functions: `become_follower` sets `self.step_role =
step_follower` and `self.tick_role = tick_election`; leaders tick heartbeats.
`step()` first applies the rules shared by every role (term comparison §5.1,
voting §5.2/§5.4.1, pre-vote and leader leases thesis §9.6/§6.2), then
dispatches to the role's step function.

Sending is lazy within one pass: proposals and ReadIndex requests are
collected and `flush()` (called by RawNode before building a Ready) sends one
round of appends and one heartbeat round for all reads of the pass (batching).

Membership (etcd-io/raft's single-step changes, not joint consensus): the
configuration is `voters` + `learners`. A change is an ENTRY_CONF_CHANGE entry
and takes effect on a node when the caller applies it (`apply_conf_change`),
not when it is appended. One change at a time: the leader refuses a new one
until every earlier one is applied (`pending_conf_index`; a new leader sets it
to its last index, since its log may hold an unapplied change). Any two
successive configurations differ by one voter, so their majorities overlap.
Learners get the log but never vote, campaign or count for a quorum. A leader
that applies its own removal steps down (after telling its most up-to-date
voter to campaign at once).

Leadership transfer (thesis §3.10): the leader stops taking proposals,
brings the target's log up to its own, then sends MsgTimeoutNow; the target
campaigns at once, without pre-vote, with `MsgVote.transfer` set so voters
ignore their leader lease. The leader gives up after one election timeout.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from actors.raft import quorum
from actors.raft.errors import (
    BadTransferee, Compacted, ConfChangePending, ConfigError, MemberExists, MemberNotFound, MemberNotLearner,
    ProposalDropped, ReadIndexDropped, RemovingLastVoter, Unavailable, UnknownMessageError,
)
from actors.raft.log import RaftLog
from actors.raft.messages import (
    ENTRY_CONF_CHANGE, ENTRY_EMPTY, ENTRY_NORMAL, NONE, ConfChange, ConfState, Entry, HardState, Message, MsgApp,
    MsgAppResp, MsgHeartbeat, MsgHeartbeatResp, MsgPreVote, MsgPreVoteResp, MsgReadIndex, MsgReadIndexResp, MsgSnap,
    MsgTimeoutNow, MsgVote, MsgVoteResp, ReadState, SoftState, MESSAGE_TYPES,
)
from actors.raft.storage import Storage
from actors.raft.tracker import STATE_PROBE, STATE_REPLICATE, STATE_SNAPSHOT, Progress

if TYPE_CHECKING:  # the RNG is passed in; the core never imports the module at run time
    import random

ROLE_FOLLOWER = "follower"
ROLE_PRE_CANDIDATE = "pre_candidate"
ROLE_CANDIDATE = "candidate"
ROLE_LEADER = "leader"

# Configurations remembered for `conf_state_at` (one per applied change; a
# snapshot marker is taken at a recent applied index, so a few suffice).
CONF_HISTORY_MAX = 64


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    id: int
    election_ticks: int = 10
    heartbeat_ticks: int = 1
    max_inflight_appends: int = 256
    max_append_entries_bytes: int = 4 * 1024 * 1024
    max_request_bytes: int = 1536 * 1024
    pre_vote: bool = True
    check_quorum: bool = True
    applied: int = 0

    def validate(self) -> None:
        if self.id <= 0:
            raise ConfigError("id must be positive")
        if self.heartbeat_ticks <= 0:
            raise ConfigError("heartbeat_ticks must be positive")
        if self.election_ticks <= self.heartbeat_ticks:
            raise ConfigError("election_ticks must be greater than heartbeat_ticks")
        if self.max_inflight_appends < 1:
            raise ConfigError("max_inflight_appends must be at least 1")
        if self.max_append_entries_bytes < self.max_request_bytes:
            raise ConfigError("max_append_entries_bytes must be >= max_request_bytes")


@dataclasses.dataclass(slots=True)
class _ReadRound:
    """One batch of ReadIndex requests confirmed by one heartbeat round."""

    round_id: int
    index: int
    requests: list  # of (requester id, context)
    acks: set


class Raft:
    def __init__(self, config: Config, storage: Storage, rng: random.Random):
        config.validate()
        self.config = config
        self.id = config.id
        self.rng = rng
        hard_state, conf_state = storage.initial_state()
        if not conf_state.voters:
            raise ConfigError("the configuration has no voters")
        self.voters: tuple[int, ...] = tuple(conf_state.voters)
        self.learners: tuple[int, ...] = tuple(conf_state.learners)
        self.members: tuple[int, ...] = conf_state.members()
        self.log = RaftLog(storage, hard_state.commit, config.applied)
        # The configuration after applying every entry up to an index (the
        # caller's start-up ConfState is the one at `applied`).
        self.conf_history: list[tuple[int, ConfState]] = [(self.log.applied, conf_state)]
        self.unapplied_conf_indexes: list[int] = []  # handed out in a Ready, not yet apply_conf_change'd
        self.pending_conf_index = 0
        self.lead_transferee = NONE
        self.term = hard_state.term
        self.vote = hard_state.vote
        self.lead = NONE
        self.role = ROLE_FOLLOWER
        self.messages: list[Message] = []
        self.read_states: list[ReadState] = []
        self.dropped_reads: list = []
        self.progress: dict[int, Progress] = {}
        self.votes: dict[int, bool] = {}
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.randomized_election_timeout = config.election_ticks
        self.pending_reads: list = []  # (requester, context) waiting for a round
        self.read_rounds: list[_ReadRound] = []
        self.read_round_counter = 0
        self.append_pending = False
        self.step_role = self.step_follower
        self.tick_role = self.tick_election
        self.become_follower(self.term, NONE)

    # ---- helpers ----------------------------------------------------------------

    def hard_state(self) -> HardState:
        return HardState(self.term, self.vote, self.log.committed)

    def soft_state(self) -> SoftState:
        return SoftState(self.lead, self.role, self.lead_transferee)

    def conf_state(self) -> ConfState:
        return ConfState(self.voters, self.learners)

    def promotable(self) -> bool:
        """Only a voter campaigns (learners and removed nodes never do)."""
        return self.id in self.voters

    def is_single_voter(self) -> bool:
        return self.voters == (self.id,)

    def send(self, message: Message) -> None:
        assert message.to != self.id, message
        self.messages.append(message)

    def reset(self, term: int) -> None:
        if self.term != term:
            self.term = term
            self.vote = NONE
        self.lead = NONE
        self.election_elapsed = 0
        self.heartbeat_elapsed = 0
        self.reset_randomized_election_timeout()
        self.votes = {}
        self.append_pending = False
        self.pending_conf_index = 0
        self.lead_transferee = NONE
        self._drop_reads()
        last = self.log.last_index()
        self.progress = {member: Progress(last + 1, self.config.max_inflight_appends) for member in self.members}
        if self.id in self.progress:
            self.progress[self.id].match = self.log.persisted_last_index()

    def reset_randomized_election_timeout(self) -> None:
        election = self.config.election_ticks
        self.randomized_election_timeout = election + self.rng.randrange(election)

    def past_election_timeout(self) -> bool:
        return self.election_elapsed >= self.randomized_election_timeout

    def _drop_reads(self) -> None:
        for _requester, context in self.pending_reads:
            self.dropped_reads.append(context)
        for read_round in self.read_rounds:
            for _requester, context in read_round.requests:
                self.dropped_reads.append(context)
        self.pending_reads = []
        self.read_rounds = []

    # ---- roles ------------------------------------------------------------------

    def become_follower(self, term: int, lead: int) -> None:
        self.step_role = self.step_follower
        self.tick_role = self.tick_election
        self.reset(term)
        self.lead = lead
        self.role = ROLE_FOLLOWER

    def become_pre_candidate(self) -> None:
        assert self.role != ROLE_LEADER, "invalid transition leader -> pre_candidate"
        # Pre-vote changes neither term nor vote (thesis §9.6).
        self.step_role = self.step_candidate
        self.tick_role = self.tick_election
        self.votes = {}
        self.lead = NONE
        self.role = ROLE_PRE_CANDIDATE

    def become_candidate(self) -> None:
        assert self.role != ROLE_LEADER, "invalid transition leader -> candidate"
        self.step_role = self.step_candidate
        self.tick_role = self.tick_election
        self.reset(self.term + 1)
        self.vote = self.id
        self.role = ROLE_CANDIDATE

    def become_leader(self) -> None:
        assert self.role != ROLE_FOLLOWER, "invalid transition follower -> leader"
        self.step_role = self.step_leader
        self.tick_role = self.tick_heartbeat
        self.reset(self.term)
        self.lead = self.id
        self.role = ROLE_LEADER
        self.progress[self.id].become_replicate()
        self.progress[self.id].recent_active = True
        # Our log may hold a change not yet applied: no new one until all of it
        # is applied (etcd: scanning the tail for one would cost more).
        self.pending_conf_index = self.log.last_index()
        # A no-op of the new term lets the leader commit (§5.4.2, §8).
        self.append_entries([(ENTRY_EMPTY, b"")])

    # ---- ticks ------------------------------------------------------------------

    def tick(self) -> None:
        self.tick_role()

    def tick_election(self) -> None:
        self.election_elapsed += 1
        if self.promotable() and self.past_election_timeout():
            self.election_elapsed = 0
            self.campaign()

    def tick_heartbeat(self) -> None:
        self.heartbeat_elapsed += 1
        self.election_elapsed += 1
        if self.election_elapsed >= self.config.election_ticks:
            self.election_elapsed = 0
            if self.config.check_quorum:
                if not self.maybe_keep_leadership():
                    return
            # A transfer not done within an election timeout is given up.
            self.abort_leader_transfer()
        if self.heartbeat_elapsed >= self.config.heartbeat_ticks:
            self.heartbeat_elapsed = 0
            self.broadcast_heartbeat(0)

    def maybe_keep_leadership(self) -> bool:
        """Check-quorum (thesis §6.2): step down unless a majority was heard from."""
        active = {voter for voter, progress in self.progress.items() if progress.recent_active or voter == self.id}
        for voter, progress in self.progress.items():
            progress.recent_active = voter == self.id
        if quorum.has_quorum(self.voters, active):
            return True
        self.become_follower(self.term, NONE)
        return False

    # ---- elections --------------------------------------------------------------

    def campaign(self) -> None:
        """Start an election (a pre-vote first when configured)."""
        if self.role == ROLE_LEADER or not self.promotable():
            return
        if self.config.pre_vote:
            self._campaign(pre_vote=True)
        else:
            self._campaign(pre_vote=False)

    def _campaign(self, pre_vote: bool, transfer: bool = False) -> None:
        if pre_vote:
            self.become_pre_candidate()
            term = self.term + 1
        else:
            self.become_candidate()
            term = self.term
        if self.poll(self.id, True) == quorum.VOTE_WON:
            # A single voter wins at once.
            if pre_vote:
                self._campaign(pre_vote=False)
            else:
                self.become_leader()
            return
        last_index, last_term = self.log.last_index(), self.log.last_term()
        for voter in self.voters:
            if voter == self.id:
                continue
            if pre_vote:
                self.send(MsgPreVote(to=voter, sender=self.id, term=term, log_term=last_term, index=last_index))
            else:
                self.send(MsgVote(to=voter, sender=self.id, term=term, log_term=last_term, index=last_index,
                                  transfer=transfer))

    def poll(self, voter: int, granted: bool) -> str:
        self.votes.setdefault(voter, granted)
        return quorum.vote_result(self.voters, self.votes)

    # ---- local requests ---------------------------------------------------------

    def append_entries(self, items: list[tuple[int, bytes]]) -> int:
        """Leader: append (type, data) items as entries of this term; returns the last index."""
        assert self.role == ROLE_LEADER
        last = self.log.last_index()
        entries = [Entry(last + 1 + offset, self.term, entry_type, data) for offset, (entry_type, data) in enumerate(items)]
        self.append_pending = True
        return self.log.append(entries)

    def propose(self, data: bytes, entry_type: int = ENTRY_NORMAL) -> int:
        """Append one entry; returns its index. Raises ProposalDropped unless
        leader, or while leadership is being transferred."""
        if entry_type == ENTRY_CONF_CHANGE:
            raise ValueError("membership changes go through propose_conf_change")
        self._check_proposals_taken()
        return self.append_entries([(entry_type, data)])

    def _check_proposals_taken(self) -> None:
        if self.role != ROLE_LEADER:
            raise ProposalDropped(f"not the leader (leader is {self.lead or 'unknown'})")
        if self.lead_transferee != NONE:
            raise ProposalDropped(f"leadership is being transferred to {self.lead_transferee}")

    # ---- membership -------------------------------------------------------------

    def propose_conf_change(self, change: ConfChange) -> int:
        """Append a membership change; returns its index. Raises ProposalDropped
        (ConfChangePending while an earlier change is not applied) or a
        ConfChangeInvalid subclass when it does not fit the configuration."""
        self._check_proposals_taken()
        if self.pending_conf_index > self.log.applied or self.unapplied_conf_indexes:
            raise ConfChangePending(f"a membership change (up to index {self.pending_conf_index}) is not applied yet")
        validate_conf_change(self.conf_state(), change)
        index = self.append_entries([(ENTRY_CONF_CHANGE, change.encode())])
        self.pending_conf_index = index
        return index

    def note_conf_changes_handed_out(self, entries: list[Entry]) -> None:
        """RawNode: these committed entries went out in a Ready; their
        changes count as pending until apply_conf_change is called."""
        for entry in entries:
            if entry.type == ENTRY_CONF_CHANGE:
                self.unapplied_conf_indexes.append(entry.index)

    def apply_conf_change(self, change: ConfChange) -> ConfState:
        """The caller applies a committed change (in log order); returns the new
        configuration. Lenient like etcd's: a change that no longer fits (never
        proposed that way) changes nothing, except that the last voter stays."""
        index = self.unapplied_conf_indexes.pop(0) if self.unapplied_conf_indexes else self.log.applied
        conf_state = changed_conf_state(self.conf_state(), change)
        self.conf_history.append((index, conf_state))
        del self.conf_history[:-CONF_HISTORY_MAX]
        self.switch_to_config(conf_state)
        return conf_state

    def conf_state_at(self, index: int) -> ConfState:
        """The configuration after applying every entry up to `index` (for a
        snapshot marker at `index`). Raises Compacted below the history kept,
        Unavailable where a change up to `index` may not be applied yet."""
        if index < self.conf_history[0][0]:
            raise Compacted(f"configuration at {index} is no longer kept (oldest {self.conf_history[0][0]})")
        if index > self.log.applied or (self.unapplied_conf_indexes and self.unapplied_conf_indexes[0] <= index):
            raise Unavailable(f"index {index} is not applied yet (applied {self.log.applied})")
        for changed_at, conf_state in reversed(self.conf_history):  # bounded by CONF_HISTORY_MAX
            if changed_at <= index:
                return conf_state
        raise AssertionError("unreachable: the oldest history entry is <= index")

    def switch_to_config(self, conf_state: ConfState) -> None:
        self.voters, self.learners, self.members = conf_state.voters, conf_state.learners, conf_state.members()
        last = self.log.last_index()
        for member in list(self.progress):
            if member not in self.members:
                del self.progress[member]
        for member in self.members:
            if member not in self.progress:
                progress = Progress(last + 1, self.config.max_inflight_appends)
                # A new member has not had a chance to answer yet: don't let
                # check-quorum count it as silent (etcd does the same).
                progress.recent_active = True
                self.progress[member] = progress
        if self.role == ROLE_LEADER:
            self._leader_switched_config()
        elif self.role in (ROLE_CANDIDATE, ROLE_PRE_CANDIDATE) and not self.promotable():
            self.become_follower(self.term, NONE)

    def _leader_switched_config(self) -> None:
        if not self.promotable():
            # Removed (etcd: the leader removing itself steps down once it
            # applies the change). Hand over to a caught-up voter first so the
            # cluster need not wait out an election timeout.
            self._hand_over_leadership()
            self.become_follower(self.term, NONE)
            return
        if self.lead_transferee != NONE and self.lead_transferee not in self.voters:
            self.abort_leader_transfer()
        if self.maybe_commit():
            self.append_pending = True  # a smaller quorum may commit more: tell everyone
        for member in self.members:
            if member != self.id and self.progress[member].match == 0:
                self.maybe_send_append(member, send_if_empty=True)  # probe new members now
        self._release_confirmed_reads()

    def _hand_over_leadership(self) -> None:
        last = self.log.last_index()
        caught_up = [voter for voter in self.voters if self.progress[voter].match == last]
        if caught_up:
            self.send(MsgTimeoutNow(to=caught_up[0], sender=self.id, term=self.term))

    # ---- leadership transfer ----------------------------------------------------

    def transfer_leader(self, target: int) -> None:
        """Leader: hand leadership to voter `target` (thesis §3.10). Raises
        ProposalDropped unless leader, BadTransferee unless `target` is a voter.
        Transferring to ourselves cancels a transfer in progress."""
        if self.role != ROLE_LEADER:
            raise ProposalDropped(f"not the leader (leader is {self.lead or 'unknown'})")
        if target == self.id:
            self.abort_leader_transfer()
            return
        if target not in self.voters:
            raise BadTransferee(f"{target} is not a voter")
        if self.lead_transferee == target:
            return  # already under way
        self.abort_leader_transfer()
        self.lead_transferee = target
        self.election_elapsed = 0  # the transfer has one election timeout
        if self.progress[target].match == self.log.last_index():
            self.send(MsgTimeoutNow(to=target, sender=self.id, term=self.term))
        else:
            self.maybe_send_append(target, send_if_empty=True)

    def abort_leader_transfer(self) -> None:
        self.lead_transferee = NONE

    def read_index(self, context, requester: int = NONE) -> None:
        """Ask for a linearizable read index (thesis §6.4); the answer arrives as
        a ReadState (locally) or MsgReadIndexResp (to a follower requester)."""
        requester = requester or self.id
        if self.role == ROLE_LEADER:
            self.pending_reads.append((requester, context))
        elif self.lead != NONE and requester == self.id:
            self.send(MsgReadIndex(to=self.lead, sender=self.id, term=self.term, context=context))
        else:
            raise ReadIndexDropped("no leader")

    def committed_entry_in_current_term(self) -> bool:
        return self.log.term(self.log.committed) == self.term

    def flush(self) -> None:
        """Send what this pass batched: one append round and one read round."""
        if self.role != ROLE_LEADER:
            return
        if self.append_pending:
            self.append_pending = False
            self.broadcast_append()
        if self.pending_reads and self.committed_entry_in_current_term():
            requests, self.pending_reads = self.pending_reads, []
            if self.is_single_voter():
                self._release_reads(self.log.committed, requests)
                return
            self.read_round_counter += 1
            read_round = _ReadRound(self.read_round_counter, self.log.committed, requests, {self.id})
            self.read_rounds.append(read_round)
            self.broadcast_heartbeat(read_round.round_id)

    def _release_reads(self, index: int, requests: list) -> None:
        for requester, context in requests:
            if requester == self.id:
                self.read_states.append(ReadState(index, context))
            else:
                self.send(MsgReadIndexResp(to=requester, sender=self.id, term=self.term, index=index, context=context))

    # ---- persistence feedback ---------------------------------------------------

    def on_persisted(self, index: int) -> None:
        """The caller made the log durable up to `index` (RawNode.advance)."""
        if self.role == ROLE_LEADER and index <= self.log.last_index() and self.id in self.progress:
            if self.progress[self.id].maybe_update(min(index, self.log.persisted_last_index())):
                if self.maybe_commit():
                    self.append_pending = True

    def maybe_commit(self) -> bool:
        match = {voter: progress.match for voter, progress in self.progress.items()}
        return self.log.maybe_commit(quorum.committed_index(self.voters, match), self.term)

    # ---- replication ------------------------------------------------------------

    def broadcast_append(self) -> None:
        """Send every follower what it lacks: one append (or probe) each, and for
        a follower in REPLICATE as many as its inflight window allows (learners too)."""
        for member in self.members:
            if member == self.id:
                continue
            if not self.maybe_send_append(member, send_if_empty=True):
                continue
            for _ in range(self.config.max_inflight_appends):  # bounded by the window
                if self.progress[member].state != STATE_REPLICATE:
                    break
                if not self.maybe_send_append(member, send_if_empty=False):
                    break

    def maybe_send_append(self, to: int, send_if_empty: bool) -> bool:
        progress = self.progress[to]
        if progress.is_paused():
            return False
        previous_index = progress.next - 1
        previous_term = self.log.term(previous_index)
        try:
            entries = self.log.entries_from(progress.next, self.config.max_append_entries_bytes)
        except Compacted:
            entries = None
        if previous_term is None or entries is None:
            return self.maybe_send_snapshot(to, progress)
        if not entries and not send_if_empty:
            return False
        self.send(MsgApp(to=to, sender=self.id, term=self.term, log_term=previous_term, index=previous_index,
                         entries=tuple(entries), commit=self.log.committed))
        if entries:
            progress.sent_entries(entries[-1].index)
        elif progress.state == STATE_PROBE:
            progress.probe_sent = True
        return True

    def maybe_send_snapshot(self, to: int, progress: Progress) -> bool:
        """The follower needs entries we compacted: send our snapshot marker as
        MsgSnap (§7). The caller streams the state machine's data with it and
        reports the outcome (report_snapshot); until then appends are held."""
        if not progress.recent_active:
            return False  # it may be down: wait until it answers (etcd)
        snapshot = self.log.storage.snapshot()
        assert snapshot.index > 0, "entries compacted without a snapshot marker"
        progress.become_snapshot(snapshot.index)
        self.send(MsgSnap(to=to, sender=self.id, term=self.term, snapshot=snapshot))
        return True

    def report_snapshot(self, to: int, failed: bool) -> None:
        """The caller's transfer to `to` ended. Either way the follower goes
        back to probing (paused until it answers): after a success the probe
        starts after the snapshot; after a failure the next probe finds the
        entries compacted again and a new MsgSnap retries the transfer."""
        progress = self.progress.get(to)
        if self.role != ROLE_LEADER or progress is None or progress.state != STATE_SNAPSHOT:
            return
        if failed:
            progress.pending_snapshot = 0
        progress.become_probe()
        progress.probe_sent = True

    def broadcast_heartbeat(self, context: int) -> None:
        for member in self.members:
            if member != self.id:
                commit = min(self.progress[member].match, self.log.committed)
                self.send(MsgHeartbeat(to=member, sender=self.id, term=self.term, commit=commit, context=context))

    # ---- step -------------------------------------------------------------------

    def step(self, message: Message) -> None:
        if type(message) not in MESSAGE_TYPES:
            raise UnknownMessageError(f"not a Raft message: {type(message).__name__}")
        if message.to != self.id or message.sender == self.id or message.sender == NONE:
            return  # misrouted: ignore
        if message.term > self.term:
            if not self._step_higher_term(message):
                return
        elif message.term < self.term:
            self._step_lower_term(message)
            return
        if isinstance(message, (MsgVote, MsgPreVote)):
            self._handle_vote_request(message)
        else:
            self.step_role(message)

    def _in_lease(self) -> bool:
        return self.config.check_quorum and self.lead != NONE and self.election_elapsed < self.config.election_ticks

    def _step_higher_term(self, message: Message) -> bool:
        """§5.1: a higher term makes us a follower, except the cases below. Returns
        whether to go on processing the message."""
        if isinstance(message, (MsgVote, MsgPreVote)) and self._in_lease() and not getattr(message, "transfer", False):
            # Leader lease (thesis §6.2/§9.6): we heard from a leader recently; a
            # disruptive candidate is ignored (unless the leader itself sent it
            # to campaign: a leadership transfer).
            return False
        if isinstance(message, MsgPreVote):
            return True  # a pre-vote never changes our term
        if isinstance(message, MsgPreVoteResp) and not message.reject:
            return True  # a granted pre-vote carries the future term
        if isinstance(message, (MsgApp, MsgHeartbeat, MsgSnap)):
            self.become_follower(message.term, message.sender)
        else:
            self.become_follower(message.term, NONE)
        return True

    def _step_lower_term(self, message: Message) -> None:
        if isinstance(message, (MsgApp, MsgHeartbeat)) and (self.config.check_quorum or self.config.pre_vote):
            # A stale leader (e.g. after a partition healed) learns our term and
            # steps down; without this it could stay stuck (etcd raft.go).
            self.send(MsgAppResp(to=message.sender, sender=self.id, term=self.term, index=0))
        elif isinstance(message, MsgPreVote):
            self.send(MsgPreVoteResp(to=message.sender, sender=self.id, term=self.term, reject=True))
        # Anything else from an older term is stale: ignore (§5.1).

    def _handle_vote_request(self, message) -> None:
        pre_vote = isinstance(message, MsgPreVote)
        can_vote = (self.vote == message.sender
                    or (self.vote == NONE and self.lead == NONE)
                    or (pre_vote and message.term > self.term))
        response_type = MsgPreVoteResp if pre_vote else MsgVoteResp
        if can_vote and self.log.is_up_to_date(message.index, message.log_term):
            # §5.2 one vote per term, §5.4.1 only for an up-to-date log.
            self.send(response_type(to=message.sender, sender=self.id, term=message.term, reject=False))
            if not pre_vote:
                self.election_elapsed = 0
                self.vote = message.sender
        else:
            self.send(response_type(to=message.sender, sender=self.id, term=self.term, reject=True))

    def step_follower(self, message: Message) -> None:
        if isinstance(message, MsgApp):
            self.election_elapsed = 0
            self.lead = message.sender
            self.handle_append(message)
        elif isinstance(message, MsgHeartbeat):
            self.election_elapsed = 0
            self.lead = message.sender
            self.handle_heartbeat(message)
        elif isinstance(message, MsgReadIndexResp):
            if message.reject:
                self.dropped_reads.append(message.context)
            else:
                self.read_states.append(ReadState(message.index, message.context))
        elif isinstance(message, MsgReadIndex):
            if self.lead == NONE:
                self.send(MsgReadIndexResp(to=message.sender, sender=self.id, term=self.term, index=0,
                                           context=message.context, reject=True))
            else:
                self.send(MsgReadIndex(to=self.lead, sender=message.sender, term=self.term, context=message.context))
        elif isinstance(message, MsgSnap):
            self.election_elapsed = 0
            self.lead = message.sender
            self.handle_snapshot(message)
        elif isinstance(message, MsgTimeoutNow):
            # The leader hands over (§3.10): campaign now, no pre-vote (the
            # leader vouches for our log), votes ignore their lease. A learner
            # or removed node ignores it.
            if self.promotable():
                self._campaign(pre_vote=False, transfer=True)

    def step_candidate(self, message: Message) -> None:
        wanted = MsgPreVoteResp if self.role == ROLE_PRE_CANDIDATE else MsgVoteResp
        if isinstance(message, (MsgApp, MsgHeartbeat, MsgSnap)):
            # §5.2: a candidate that hears from a leader of its term steps down.
            self.become_follower(message.term, message.sender)
            self.step_follower(message)
        elif isinstance(message, wanted):
            result = self.poll(message.sender, not message.reject)
            if result == quorum.VOTE_WON:
                if self.role == ROLE_PRE_CANDIDATE:
                    self._campaign(pre_vote=False)
                else:
                    self.become_leader()
            elif result == quorum.VOTE_LOST:
                self.become_follower(self.term, NONE)
        elif isinstance(message, MsgReadIndex):
            self.send(MsgReadIndexResp(to=message.sender, sender=self.id, term=self.term, index=0,
                                       context=message.context, reject=True))

    def step_leader(self, message: Message) -> None:
        if isinstance(message, MsgAppResp):
            self.handle_append_response(message)
        elif isinstance(message, MsgHeartbeatResp):
            self.handle_heartbeat_response(message)
        elif isinstance(message, MsgReadIndex):
            if message.sender in self.progress:
                self.pending_reads.append((message.sender, message.context))

    # ---- handlers ---------------------------------------------------------------

    def handle_append(self, message: MsgApp) -> None:
        if message.index < self.log.committed:
            self.send(MsgAppResp(to=message.sender, sender=self.id, term=self.term, index=self.log.committed))
            return
        last_new, accepted = self.log.maybe_append(message.index, message.log_term, message.commit, message.entries)
        if accepted:
            self.send(MsgAppResp(to=message.sender, sender=self.id, term=self.term, index=last_new))
            return
        hint_index = min(message.index, self.log.last_index())
        hint_index, hint_term = self.log.find_conflict_by_term(hint_index, message.log_term)
        self.send(MsgAppResp(to=message.sender, sender=self.id, term=self.term, index=message.index,
                             reject=True, reject_hint=hint_index, log_term=hint_term))

    def handle_snapshot(self, message: MsgSnap) -> None:
        """§7 InstallSnapshot, as etcd: a snapshot newer than our log resets the
        log to it (Ready.snapshot) and we answer at its index; an older one (or
        one our log already holds) is answered with our commit index."""
        if self.restore(message.snapshot):
            self.send(MsgAppResp(to=message.sender, sender=self.id, term=self.term, index=self.log.last_index()))
        else:
            self.send(MsgAppResp(to=message.sender, sender=self.id, term=self.term, index=self.log.committed))

    def restore(self, snapshot) -> bool:
        if snapshot.index <= self.log.committed:
            return False
        if self.log.match_term(snapshot.index, snapshot.term):
            # Our log has the snapshot's last entry: only the commit index moves.
            self.log.commit_to(snapshot.index)
            return False
        self.log.restore(snapshot)
        # The snapshot's configuration replaces ours: the changes that made it
        # are below the snapshot, so they will never be applied here.
        if snapshot.conf_state.voters:
            self.conf_history = [(snapshot.index, snapshot.conf_state)]
            self.unapplied_conf_indexes = []
            self.pending_conf_index = 0
            self.switch_to_config(snapshot.conf_state)
        return True

    def handle_heartbeat(self, message: MsgHeartbeat) -> None:
        self.log.commit_to(min(message.commit, self.log.last_index()))
        self.send(MsgHeartbeatResp(to=message.sender, sender=self.id, term=self.term, context=message.context))

    def handle_append_response(self, message: MsgAppResp) -> None:
        progress = self.progress.get(message.sender)
        if progress is None:
            return
        progress.recent_active = True
        if message.reject:
            next_probe = message.reject_hint
            if message.log_term > 0:
                next_probe, _ = self.log.find_conflict_by_term(message.reject_hint, message.log_term)
            if progress.maybe_decrease_to(message.index, next_probe):
                if progress.state == STATE_REPLICATE:
                    progress.become_probe()
                self.maybe_send_append(message.sender, send_if_empty=True)
            return
        if not progress.maybe_update(message.index):
            return
        if progress.state == STATE_PROBE:
            progress.become_replicate()
        elif progress.state == STATE_SNAPSHOT and progress.match + 1 >= self.log.first_index():
            # The follower installed a snapshot (ours, or a newer one) and the
            # log from there is ours to send: replicate again.
            progress.become_replicate()
        elif progress.state == STATE_REPLICATE:
            progress.inflights.free_le(message.index)
        if self.maybe_commit():
            self.broadcast_append()
        # Keep streaming while the window allows (bounded by max_inflight_appends).
        for _ in range(self.config.max_inflight_appends):
            if not self.maybe_send_append(message.sender, send_if_empty=False):
                break
        if message.sender == self.lead_transferee and progress.match == self.log.last_index():
            self.send(MsgTimeoutNow(to=message.sender, sender=self.id, term=self.term))

    def handle_heartbeat_response(self, message: MsgHeartbeatResp) -> None:
        progress = self.progress.get(message.sender)
        if progress is None:
            return
        progress.recent_active = True
        progress.probe_sent = False
        if progress.state == STATE_REPLICATE and progress.inflights.full():
            progress.inflights.free_le(progress.inflights.buffer[0])
        if progress.match < self.log.last_index():
            self.maybe_send_append(message.sender, send_if_empty=True)
        if message.context:
            self._ack_read_round(message.context, message.sender)

    def _ack_read_round(self, round_id: int, voter: int) -> None:
        for position, read_round in enumerate(self.read_rounds):
            if read_round.round_id == round_id:
                read_round.acks.add(voter)
                if quorum.has_quorum(self.voters, read_round.acks):
                    self._release_read_rounds_to(position)
                return

    def _release_read_rounds_to(self, position: int) -> None:
        """A quorum confirmed round `position`: it and every earlier one are served."""
        for done in self.read_rounds[:position + 1]:
            self._release_reads(done.index, done.requests)
        del self.read_rounds[:position + 1]

    def _release_confirmed_reads(self) -> None:
        """After a configuration change a smaller quorum may already confirm a round."""
        for position in range(len(self.read_rounds) - 1, -1, -1):
            if quorum.has_quorum(self.voters, self.read_rounds[position].acks):
                self._release_read_rounds_to(position)
                return


# ---- membership rules (pure functions of a configuration) ------------------------------

def validate_conf_change(conf_state: ConfState, change: ConfChange) -> None:
    """Raise the ConfChangeInvalid subclass that says why `change` does not fit."""
    members = conf_state.members()
    if change.kind in ("add_voter", "add_learner"):
        if change.node_id in members:
            raise MemberExists(f"{change.node_id} is already a member")
        return
    if change.node_id not in members:
        raise MemberNotFound(f"{change.node_id} is not a member")
    if change.kind == "promote_learner" and change.node_id not in conf_state.learners:
        raise MemberNotLearner(f"{change.node_id} is not a learner")
    if change.kind == "remove" and conf_state.voters == (change.node_id,):
        raise RemovingLastVoter(f"{change.node_id} is the only voter")


def changed_conf_state(conf_state: ConfState, change: ConfChange) -> ConfState:
    """The configuration after `change` (a change that does not fit is a no-op)."""
    voters, learners = set(conf_state.voters), set(conf_state.learners)
    node = change.node_id
    if change.kind == "add_voter" or (change.kind == "promote_learner" and node in learners):
        learners.discard(node)
        voters.add(node)
    elif change.kind == "add_learner" and node not in voters:
        learners.add(node)
    elif change.kind == "remove" and voters != {node}:
        voters.discard(node)
        learners.discard(node)
    return ConfState(tuple(sorted(voters)), tuple(sorted(learners)))
