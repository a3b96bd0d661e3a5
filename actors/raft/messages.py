"""The closed set of values the Raft core exchanges: entries, state, messages.

How this works: every message between Raft peers is one of the frozen,
slotted, keyword-only dataclasses below (`MESSAGE_TYPES` is the closed set).
Each carries `to` (recipient member id), `sender` (member id) and `term` (the
sender's term; for MsgPreVote the term the sender *would* campaign in). The
core never sends anything else, and `Raft.step()` rejects anything else with
`UnknownMessageError`. Local requests (propose, campaign, read index, tick,
conf changes, leader transfer) are method calls on the core, not messages.

Membership (etcd-io/raft's single-step changes): `ConfState` is the set of
voters and learners; a `ConfChange` travels in an `ENTRY_CONF_CHANGE` entry
whose data is the msgpack form of `ConfChange.to_wire()` (`encode()` writes
it without a msgpack library: the core imports none) and takes effect on each
node when that node applies the entry.

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
ENTRY_CONF_CHANGE = 2  # data: ConfChange.encode()

CONF_CHANGE_KINDS = ("add_voter", "add_learner", "promote_learner", "remove", "update")


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
    """The members: voters elect and count for commit; learners only receive
    the log (they never vote, campaign or count for any quorum)."""

    voters: tuple[int, ...] = ()
    learners: tuple[int, ...] = ()

    def __post_init__(self):
        if list(self.voters) != sorted(set(self.voters)):
            raise ValueError("ConfState.voters must be sorted and unique")
        if list(self.learners) != sorted(set(self.learners)):
            raise ValueError("ConfState.learners must be sorted and unique")
        if set(self.voters) & set(self.learners):
            raise ValueError("ConfState: a member is either a voter or a learner")
        if any(type(member) is not int or member <= 0 for member in self.voters + self.learners):
            raise ValueError("ConfState: member ids are positive integers")

    def members(self) -> tuple[int, ...]:
        return tuple(sorted(self.voters + self.learners))

    def to_marker(self) -> dict:
        """The WAL snapshot marker's form."""
        return {"voters": list(self.voters), "learners": list(self.learners)}

    @classmethod
    def from_marker(cls, marker: dict) -> "ConfState":
        """From a WAL snapshot marker (older markers have no "learners")."""
        return cls(tuple(sorted(marker["voters"])), tuple(sorted(marker.get("learners", ()))))


@dataclasses.dataclass(frozen=True, slots=True)
class ConfChange:
    """One membership change (single-step, as etcd's ConfChange v1).

    kind: "add_voter" (a new voter), "add_learner" (a new learner),
    "promote_learner" (learner -> voter), "remove" (a voter or learner),
    "update" (no Raft change: member metadata in `context` only). `context`
    is opaque to the core (the actor's member record and routing)."""

    kind: str
    node_id: int
    context: bytes = b""

    def __post_init__(self):
        if self.kind not in CONF_CHANGE_KINDS:
            raise ValueError(f"ConfChange.kind must be one of {CONF_CHANGE_KINDS}, not {self.kind!r}")
        if type(self.node_id) is not int or not 0 < self.node_id < 1 << 64:
            raise ValueError("ConfChange.node_id must be a positive 64-bit integer")
        if not isinstance(self.context, bytes):
            raise ValueError("ConfChange.context must be bytes")

    def to_wire(self) -> list:
        return [self.kind, self.node_id, self.context]

    @classmethod
    def from_wire(cls, value) -> "ConfChange":
        """From the unpacked entry data; ValueError if it is not a ConfChange."""
        if not isinstance(value, (list, tuple)) or len(value) != 3:
            raise ValueError("a ConfChange is [kind, node_id, context]")
        return cls(value[0], value[1], value[2])

    def encode(self) -> bytes:
        """The entry data: byte for byte `ormsgpack.packb(self.to_wire())`."""
        kind = self.kind.encode()
        return b"\x93" + bytes((0xa0 | len(kind),)) + kind + _msgpack_uint(self.node_id) + _msgpack_bin(self.context)


def _msgpack_uint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    for marker, size in ((0xcc, 1), (0xcd, 2), (0xce, 4), (0xcf, 8)):
        if value < 1 << (8 * size):
            return bytes((marker,)) + value.to_bytes(size, "big")
    raise ValueError("integer too large for msgpack")


def _msgpack_bin(value: bytes) -> bytes:
    for marker, size in ((0xc4, 1), (0xc5, 2), (0xc6, 4)):
        if len(value) < 1 << (8 * size):
            return bytes((marker,)) + len(value).to_bytes(size, "big") + value
    raise ValueError("bytes too long for msgpack")


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
    lead_transferee: int = NONE  # the leader is handing leadership to this voter


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
    entry is (`index`, `log_term`) (§5.4.1 up-to-date check). `transfer`: the
    candidate campaigns because the leader told it to (MsgTimeoutNow; etcd's
    campaignTransfer context), so receivers ignore their leader lease."""

    log_term: int
    index: int
    transfer: bool = False


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


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MsgTimeoutNow(Message):
    """Leader -> voter (thesis §3.10 leadership transfer): "your log matches
    mine, campaign now": the receiver starts an election at once, without
    pre-vote and with `MsgVote.transfer` set."""


MESSAGE_TYPES = (
    MsgApp, MsgAppResp, MsgVote, MsgVoteResp, MsgPreVote, MsgPreVoteResp,
    MsgHeartbeat, MsgHeartbeatResp, MsgReadIndex, MsgReadIndexResp, MsgSnap,
    MsgTimeoutNow,
)
