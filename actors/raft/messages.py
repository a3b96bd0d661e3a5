"""The closed set of values the Raft core exchanges: entries, state, messages.

How this works: every message between Raft peers is one of the frozen,
slotted, keyword-only dataclasses below (`MESSAGE_TYPES` is the closed set).
Each carries `to` (recipient member id), `sender` (member id) and `term` (the
sender's term; for MsgPreVote the term the sender *would* campaign in). The
core never sends anything else, and `Raft.step()` rejects anything else with
`UnknownMessageError`. Local requests (propose, campaign, read index, tick)
are method calls on the core, not messages.

Entries are `Entry` named tuples rather than dataclasses: there is one per
proposal batch and they are created, sliced and stored on the hot path, where
a tuple is several times cheaper; `tuple(entry)` is their wire/WAL form.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

NONE = 0  # "no member": no leader known, no vote cast

ENTRY_NORMAL = 0
ENTRY_EMPTY = 1  # a new leader's no-op, data b""
ENTRY_CONF_CHANGE = 2


class Entry(NamedTuple):
    index: int
    term: int
    type: int
    data: bytes


def entry_bytes(entry: Entry) -> int:
    """The size an entry counts for against message limits."""
    return len(entry.data) + 24


@dataclasses.dataclass(frozen=True, slots=True)
class HardState:
    """What must be durable before any message depending on it is sent."""

    term: int = 0
    vote: int = NONE
    commit: int = 0


@dataclasses.dataclass(frozen=True, slots=True)
class ConfState:
    voters: tuple[int, ...] = ()

    def __post_init__(self):
        if list(self.voters) != sorted(set(self.voters)):
            raise ValueError("ConfState.voters must be sorted and unique")


@dataclasses.dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """A snapshot *marker*: the state machine (LMDB, owned by the applier)
    holds everything up to `index`, an entry of `term`. Log entries at or
    below it may be compacted away."""

    index: int = 0
    term: int = 0
    conf_state: ConfState = ConfState()


@dataclasses.dataclass(frozen=True, slots=True)
class ReadState:
    """A linearizable read identified by `context` may be served once the
    state machine has applied up to `index`."""

    index: int
    context: object


@dataclasses.dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state worth reporting (not persisted)."""

    lead: int
    role: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Message:
    to: int
    sender: int
    term: int

    def __post_init__(self):
        if type(self) is Message:
            raise TypeError("Message is abstract; use one of MESSAGE_TYPES")
        if self.to < 0 or self.sender < 0 or self.term < 0:
            raise ValueError(f"{type(self).__name__}: ids and term must not be negative")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MsgApp(Message):
    """Leader -> follower AppendEntries (§5.3): `entries` follow the entry at
    (`index`, `log_term`); `commit` is the leader's commit index. Empty
    entries = a probe."""

    log_term: int
    index: int
    entries: tuple = ()
    commit: int = 0


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MsgAppResp(Message):
    """Follower -> leader. Accepted: `index` is the follower's last index
    matching the leader. Rejected: `index` is the rejected MsgApp.index and
    (`reject_hint`, `log_term`) is the follower's guess of the last entry that
    may match (fast backtracking, thesis §5.3 end / etcd's findConflictByTerm)."""

    index: int
    reject: bool = False
    reject_hint: int = 0
    log_term: int = 0


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MsgVote(Message):
    """Candidate -> voter RequestVote (§5.2) for `term`; the candidate's last
    entry is (`index`, `log_term`) (§5.4.1 up-to-date check)."""

    log_term: int
    index: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MsgVoteResp(Message):
    reject: bool = False


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MsgPreVote(Message):
    """Pre-candidate -> voter (thesis §9.6): "would you vote for me in
    `term`?" Changes no state on the receiver."""

    log_term: int
    index: int


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MsgPreVoteResp(Message):
    reject: bool = False


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MsgHeartbeat(Message):
    """Leader -> follower: keeps the follower's election timer reset; `commit`
    is min(follower's match, leader commit); `context` is the ReadIndex round
    being confirmed (0 = none)."""

    commit: int = 0
    context: int = 0


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MsgHeartbeatResp(Message):
    context: int = 0


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MsgReadIndex(Message):
    """Follower -> leader: a linearizable read request (thesis §6.4)."""

    context: object = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MsgReadIndexResp(Message):
    """Leader -> follower: the read `context` may be served at `index`
    (index 0 with `reject` = the leader could not serve it)."""

    index: int
    context: object = None
    reject: bool = False


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MsgSnap(Message):
    """Leader -> follower: install a snapshot (§7). The core sends its
    snapshot marker when a follower needs compacted entries; the actor
    streams the state machine's data (actors/snapshot_transfer.py) and steps
    the MsgSnap of what it streamed into the follower's core once the data
    is installed. The follower answers MsgAppResp at the snapshot's index
    (or its commit index when the snapshot is not newer than its log)."""

    snapshot: SnapshotMeta


MESSAGE_TYPES = (
    MsgApp, MsgAppResp, MsgVote, MsgVoteResp, MsgPreVote, MsgPreVoteResp,
    MsgHeartbeat, MsgHeartbeatResp, MsgReadIndex, MsgReadIndexResp, MsgSnap,
)
