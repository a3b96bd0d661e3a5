"""The pure Raft core (sans-I/O). Public API = what is re-exported here.

No zmq, lmdb, socket, time, os or random-module state: an RNG instance is
passed in, time enters as `tick()`, storage through `Storage`.
"""

from actors.raft.errors import (
    BadTransferee, Compacted, ConfChangeInvalid, ConfChangePending, ConfigError, MemberExists, MemberNotFound,
    MemberNotLearner, ProposalDropped, RaftError, ReadIndexDropped, RemovingLastVoter, Unavailable,
    UnknownMessageError,
)
from actors.raft.messages import (
    CONF_CHANGE_KINDS, ENTRY_CONF_CHANGE, ENTRY_EMPTY, ENTRY_NORMAL, MESSAGE_TYPES, NONE, ConfChange, ConfState,
    Entry, HardState, Message, MsgApp, MsgAppResp, MsgHeartbeat, MsgHeartbeatResp, MsgPreVote, MsgPreVoteResp,
    MsgReadIndex, MsgReadIndexResp, MsgSnap, MsgTimeoutNow, MsgVote, MsgVoteResp, ReadState, SnapshotMeta,
    SoftState,
)
from actors.raft.node import RawNode, Ready
from actors.raft.raft import ROLE_CANDIDATE, ROLE_FOLLOWER, ROLE_LEADER, ROLE_PRE_CANDIDATE, Config, Raft
from actors.raft.storage import MemoryStorage, Storage

__all__ = [
    "BadTransferee", "Compacted", "ConfChangeInvalid", "ConfChangePending", "ConfigError", "MemberExists",
    "MemberNotFound", "MemberNotLearner", "ProposalDropped", "RaftError", "ReadIndexDropped", "RemovingLastVoter",
    "Unavailable", "UnknownMessageError", "CONF_CHANGE_KINDS", "ENTRY_CONF_CHANGE", "ENTRY_EMPTY", "ENTRY_NORMAL",
    "MESSAGE_TYPES", "NONE", "ConfChange", "ConfState", "Entry", "HardState", "Message", "MsgApp", "MsgAppResp",
    "MsgHeartbeat", "MsgHeartbeatResp", "MsgPreVote", "MsgPreVoteResp", "MsgReadIndex", "MsgReadIndexResp",
    "MsgSnap", "MsgTimeoutNow", "MsgVote", "MsgVoteResp",
    "ReadState", "SnapshotMeta", "SoftState", "RawNode", "Ready", "ROLE_CANDIDATE", "ROLE_FOLLOWER",
    "ROLE_LEADER", "ROLE_PRE_CANDIDATE", "Config", "Raft", "MemoryStorage", "Storage",
]
