"""Snapshot transfer between members: the chunking and verification rules. Pure.

How this works: a leader whose follower needs compacted entries streams it
a consistent copy of the LMDB store (a file of `header.size` bytes with
SHA-256 `header.sha256`) over the peer transport, as actor-level forwards
(actors/peer.py):

    leader -> follower  ["snap_chunk", header, offset, data]
    follower -> leader  ["snap_ack", transfer_id, received_bytes]
                        ["snap_result", transfer_id, ok, reason]

`OutgoingSnapshot` (leader) sends chunks of `chunk_bytes` in order with at
most `max_chunks_in_flight` unacknowledged (the window). The follower accepts
a chunk only at the offset it expects (`IncomingSnapshot.accept`) and always
acks the bytes it holds, so a lost frame (the transport drops frames rather
than block) shows up as an ack that does not move: after `retransmit_ms`
without progress the leader goes back to the last acked offset (go-back-N);
after `stall_timeout_ms` without progress the transfer is aborted and
reported failed (the Raft core probes again, and a new MsgSnap retries it).
Every chunk carries the header, so a follower that restarted mid-transfer
sees a chunk of a transfer it does not know at an offset > 0 and answers
`snap_result` failed at once instead of letting the leader wait for a stall.

The follower hashes chunks as they arrive; once all bytes are in, the
digest must equal the header's before anything is installed. The header's
(index, term) are checked again against the received store's own applied
index and term by the installer.

Time enters only as `now_ms` arguments.
"""

from __future__ import annotations

import dataclasses
import hashlib

SHA256_BYTES = 32


class SnapshotWireError(ValueError):
    """A peer sent a malformed snapshot message (the peer's fault): drop it."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SnapshotHeader:
    """What a transfer carries besides the bytes.

    `index`/`term`: the store copy's applied raft index and its term;
    `raft_message`: the wire form (actors.raft.wire) of the MsgSnap the
    follower steps into its core once the data is installed — its snapshot
    meta, configuration included, is the leader core's, passed through."""

    transfer_id: int
    index: int
    term: int
    raft_message: list
    size: int
    sha256: bytes

    def __post_init__(self):
        for name in ("transfer_id", "index", "term", "size"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise SnapshotWireError(f"snapshot header {name} must be a non-negative integer")
        if self.index <= 0 or self.size <= 0:
            raise SnapshotWireError("snapshot header index and size must be positive")
        if not isinstance(self.raft_message, list):
            raise SnapshotWireError("snapshot header raft_message must be a list")
        if not isinstance(self.sha256, bytes) or len(self.sha256) != SHA256_BYTES:
            raise SnapshotWireError("snapshot header sha256 must be 32 bytes")

    def to_wire(self) -> list:
        return [self.transfer_id, self.index, self.term, self.raft_message, self.size, self.sha256]

    @classmethod
    def from_wire(cls, value) -> "SnapshotHeader":
        if not isinstance(value, list) or len(value) != 6:
            raise SnapshotWireError("a snapshot header is [transfer_id, index, term, raft_message, size, sha256]")
        transfer_id, index, term, raft_message, size, sha256 = value
        return cls(transfer_id=transfer_id, index=index, term=term, raft_message=raft_message, size=size,
                   sha256=sha256)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TransferLimits:
    chunk_bytes: int
    max_chunks_in_flight: int
    retransmit_ms: int
    stall_timeout_ms: int

    def __post_init__(self):
        if min(self.chunk_bytes, self.max_chunks_in_flight, self.retransmit_ms, self.stall_timeout_ms) <= 0:
            raise ValueError("transfer limits must be positive")
        if self.stall_timeout_ms < self.retransmit_ms:
            raise ValueError("stall_timeout_ms must be >= retransmit_ms")


class OutgoingSnapshot:
    """The leader's side of one transfer: which byte ranges to send when."""

    def __init__(self, peer: int, header: SnapshotHeader, limits: TransferLimits, now_ms: float):
        self.peer = peer
        self.header = header
        self.limits = limits
        self.acked = 0  # the follower holds bytes [0, acked)
        self.sent = 0  # bytes [0, sent) were sent at least once since the last go-back
        self.last_progress_ms = now_ms
        self.retransmits = 0

    @property
    def all_acked(self) -> bool:
        return self.acked == self.header.size

    def next_chunks(self, now_ms: float) -> list[tuple[int, int]]:
        """(offset, length) of the chunks to send now, in order, within the window."""
        waited_ms = now_ms - self.last_progress_ms
        if self.sent > self.acked and waited_ms >= self.limits.retransmit_ms * (self.retransmits + 1):
            # Acks stopped moving: a chunk (or its ack) was lost. Go back.
            self.sent = self.acked
            self.retransmits += 1
        chunks = []
        window_end = min(self.header.size, self.acked + self.limits.chunk_bytes * self.limits.max_chunks_in_flight)
        while self.sent < window_end:  # bounded by max_chunks_in_flight
            length = min(self.limits.chunk_bytes, self.header.size - self.sent)
            chunks.append((self.sent, length))
            self.sent += length
        return chunks

    def on_ack(self, received: int, now_ms: float) -> bool:
        """The follower holds `received` bytes. False if the ack is stale or bogus."""
        if type(received) is not int or received <= self.acked or received > self.sent:
            return False
        self.acked = received
        self.last_progress_ms = now_ms
        self.retransmits = 0
        return True

    def stalled(self, now_ms: float) -> bool:
        return now_ms - self.last_progress_ms >= self.limits.stall_timeout_ms


class IncomingSnapshot:
    """The follower's side of one transfer: in-order acceptance and the digest."""

    def __init__(self, sender: int, header: SnapshotHeader, now_ms: float):
        self.sender = sender
        self.header = header
        self.received = 0
        self.digest = hashlib.sha256()
        self.last_progress_ms = now_ms

    def accept(self, offset: int, data: bytes, now_ms: float) -> bool:
        """True if `data` at `offset` is the next piece (the caller writes it);
        False for a duplicate or an out-of-order chunk (dropped, re-acked)."""
        if type(offset) is not int or not isinstance(data, bytes) or not data:
            raise SnapshotWireError("a chunk is an integer offset and non-empty bytes")
        if offset != self.received:
            return False
        if offset + len(data) > self.header.size:
            raise SnapshotWireError("chunk past the end of the snapshot")
        self.digest.update(data)
        self.received += len(data)
        self.last_progress_ms = now_ms
        return True

    @property
    def complete(self) -> bool:
        return self.received == self.header.size

    def verified(self) -> bool:
        """All bytes in and their SHA-256 is the header's."""
        return self.complete and self.digest.digest() == self.header.sha256

    def stalled(self, now_ms: float, stall_timeout_ms: int) -> bool:
        return now_ms - self.last_progress_ms >= stall_timeout_ms
