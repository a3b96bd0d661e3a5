"""The chunking and verification rules of member-to-member snapshot transfers.

Goal: the leader streams a file in order within a bounded window, moves on
only with acks, goes back to the last acked offset when acks stop (a lost
frame) and declares a stall after the timeout; the follower takes only the
next piece, and installs only what hashes to the header's SHA-256; a
malformed header or chunk is the peer's fault (SnapshotWireError).

Method: drive actors/snapshot_transfer.py (pure) with byte strings, a lossy
in-memory "network" and a fake clock; one seeded loss pattern per case.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from actors.snapshot_transfer import (
    IncomingSnapshot, OutgoingSnapshot, SnapshotHeader, SnapshotWireError, TransferLimits,
)

LIMITS = TransferLimits(chunk_bytes=10, max_chunks_in_flight=3, retransmit_ms=100, stall_timeout_ms=1000)


def header_for(data: bytes, transfer_id: int = 7) -> SnapshotHeader:
    return SnapshotHeader(transfer_id=transfer_id, index=42, term=3, raft_message=[10, 2, 1, 3, [42, 3, [1, 2, 3]]],
                          size=len(data), sha256=hashlib.sha256(data).digest())


def run_transfer(data: bytes, loss: float, seed: int,
                 corrupt_at: int | None = None) -> tuple[bytes, IncomingSnapshot, int]:
    """Stream `data` over a link losing `loss` of chunks and acks; returns
    (bytes received, receiver, fake ms elapsed)."""
    rng = random.Random(seed)
    header = header_for(data)
    sender = OutgoingSnapshot(2, header, LIMITS, now_ms=0)
    receiver = IncomingSnapshot(1, header, now_ms=0)
    received = bytearray()
    now_ms = 0
    for _ in range(10_000):  # bounded: a lossy link still converges
        if receiver.complete:
            break
        chunks = sender.next_chunks(now_ms)
        assert len(chunks) <= LIMITS.max_chunks_in_flight
        assert all(offset + length <= sender.acked + LIMITS.chunk_bytes * LIMITS.max_chunks_in_flight
                   for offset, length in chunks)
        for offset, length in chunks:
            if rng.random() < loss:
                continue
            piece = data[offset:offset + length]
            if corrupt_at is not None and offset <= corrupt_at < offset + length:
                piece = piece[:corrupt_at - offset] + b"X" + piece[corrupt_at - offset + 1:]
            if receiver.accept(offset, piece, now_ms):
                received += piece
            if rng.random() >= loss:
                sender.on_ack(receiver.received, now_ms)
        now_ms += 10
        assert not sender.stalled(now_ms), "a link that delivers something must not stall"
    return bytes(received), receiver, now_ms


def test_a_clean_link_delivers_every_byte_in_order_and_verifies():
    data = bytes(range(256)) * 3
    received, receiver, _ = run_transfer(data, loss=0.0, seed=1)
    assert received == data and receiver.verified()


@pytest.mark.parametrize("seed", range(5))
def test_a_lossy_link_converges_by_going_back_to_the_last_ack(seed):
    data = random.Random(seed).randbytes(997)
    received, receiver, elapsed_ms = run_transfer(data, loss=0.3, seed=seed)
    assert received == data and receiver.verified()
    assert elapsed_ms > 100  # it needed retransmits


def test_a_corrupted_chunk_fails_verification():
    data = b"abcdefghij" * 20
    _received, receiver, _ = run_transfer(data, loss=0.0, seed=2, corrupt_at=55)
    assert receiver.complete and not receiver.verified()


def test_out_of_order_and_duplicate_chunks_are_not_taken():
    data = b"0123456789" * 3
    receiver = IncomingSnapshot(1, header_for(data), now_ms=0)
    assert not receiver.accept(10, data[10:20], 0)  # ahead of what it holds
    assert receiver.accept(0, data[0:10], 0)
    assert not receiver.accept(0, data[0:10], 0)  # a duplicate
    assert receiver.received == 10
    with pytest.raises(SnapshotWireError):
        receiver.accept(10, data[10:] + b"too long", 0)


def test_stale_and_bogus_acks_are_ignored():
    data = b"x" * 100
    sender = OutgoingSnapshot(2, header_for(data), LIMITS, now_ms=0)
    assert sender.next_chunks(0) == [(0, 10), (10, 10), (20, 10)]
    assert sender.next_chunks(0) == []  # window full
    assert not sender.on_ack(40, 5)  # beyond what was sent
    assert sender.on_ack(10, 5)
    assert not sender.on_ack(10, 6)  # stale
    assert sender.next_chunks(6) == [(30, 10)]


def test_no_progress_resends_then_stalls():
    data = b"y" * 50
    sender = OutgoingSnapshot(2, header_for(data), LIMITS, now_ms=0)
    sender.next_chunks(0)
    assert sender.next_chunks(99) == []
    assert sender.next_chunks(100) == [(0, 10), (10, 10), (20, 10)]  # go back to the last ack
    assert not sender.stalled(999) and sender.stalled(1000)


def test_headers_validate_themselves_and_round_trip():
    header = header_for(b"data")
    assert SnapshotHeader.from_wire(header.to_wire()) == header
    for bad in ([], [1, 2, 3], [1, 0, 1, [], 4, b"x" * 32], [1, 1, 1, [], 4, b"short"], [1, 1, 1, "m", 4, b"x" * 32],
                [-1, 1, 1, [], 4, b"x" * 32]):
        with pytest.raises(SnapshotWireError):
            SnapshotHeader.from_wire(bad)
    with pytest.raises(ValueError):
        TransferLimits(chunk_bytes=1, max_chunks_in_flight=1, retransmit_ms=10, stall_timeout_ms=5)
