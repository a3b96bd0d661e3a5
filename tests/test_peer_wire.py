"""Goal: every Raft message survives the peer wire unchanged, and a peer's
malformed message is a WireError (logged and dropped by the actor), never a
crash. Method: encode, pass through msgpack, decode, compare; then mangle."""

from __future__ import annotations

import ormsgpack
import pytest

from actors.raft import (
    MESSAGE_TYPES, ConfState, Entry, MsgApp, MsgAppResp, MsgHeartbeat, MsgHeartbeatResp, MsgPreVote, MsgPreVoteResp,
    MsgReadIndex, MsgReadIndexResp, MsgSnap, MsgTimeoutNow, MsgVote, MsgVoteResp, SnapshotMeta,
)
from actors.raft import wire

ENTRIES = (Entry(5, 2, 0, b"\x93\x01a\x90"), Entry(6, 2, 1, b""))
SAMPLES = [
    MsgApp(to=2, sender=1, term=3, log_term=2, index=4, entries=ENTRIES, commit=4),
    MsgApp(to=2, sender=1, term=3, log_term=2, index=4),
    MsgAppResp(to=1, sender=2, term=3, index=6),
    MsgAppResp(to=1, sender=2, term=3, index=6, reject=True, reject_hint=3, log_term=1),
    MsgVote(to=2, sender=1, term=3, log_term=2, index=6),
    MsgVote(to=2, sender=1, term=3, log_term=2, index=6, transfer=True),  # a leadership transfer's campaign
    MsgVoteResp(to=1, sender=2, term=3, reject=True),
    MsgPreVote(to=2, sender=1, term=4, log_term=2, index=6),
    MsgPreVoteResp(to=1, sender=2, term=4),
    MsgHeartbeat(to=2, sender=1, term=3, commit=5, context=7),
    MsgHeartbeatResp(to=1, sender=2, term=3, context=7),
    MsgReadIndex(to=1, sender=2, term=3, context=(b"gateway-0", 12, 99)),
    MsgReadIndexResp(to=2, sender=1, term=3, index=6, context=(b"gateway-0", 12, 99)),
    MsgSnap(to=2, sender=1, term=3, snapshot=SnapshotMeta(10, 2, ConfState((1, 2, 3)))),
    MsgSnap(to=2, sender=1, term=3, snapshot=SnapshotMeta(10, 2, ConfState((1, 3), (2, 4)))),
    MsgTimeoutNow(to=2, sender=1, term=3),
]


def test_every_message_type_round_trips():
    assert {type(sample) for sample in SAMPLES} == set(MESSAGE_TYPES)
    for sample in SAMPLES:
        assert wire.decode(ormsgpack.unpackb(ormsgpack.packb(wire.encode(sample)))) == sample


@pytest.mark.parametrize("bad", [
    None, [], [0, 1, 2], [99, 1, 2, 3], ["x", 1, 2, 3],
    [0, 2, 1, 3, 2, 4, [[5, 2, 0, b""], [7, 2, 0, b""]], 4],  # entries with a gap
    [0, 2, 1, 3, 2, 4, [[5, 2, 0, "text"]], 4],  # entry data not bytes
    [0, 2, 1, 3, 2, 4, [], 4, "extra"],
    [0, 2, 1, 3, 2, 3, [[5, 2, 0, b""]], 4],  # entries not right after index
    [1, 1, 2, 3, 6, "yes", 0, 0],  # reject not a bool
    [4, 2, 1, -1, 2, 6],  # negative term
    [2, 2, 1, 3, 2, 6, 1],  # MsgVote transfer not a bool
    [10, 2, 1, 3, [10, 2, [1, 2], [2]]],  # a member both voter and learner
    [10, 2, 1, 3, [10, 2, [1, 2]]],  # snapshot without learners
    [11, 2, 1, 3, 0],  # MsgTimeoutNow has no fields
])
def test_malformed_messages_are_wire_errors(bad):
    with pytest.raises(wire.WireError):
        wire.decode(bad)
