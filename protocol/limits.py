"""Every limit quorumkv enforces, in one place.

A limit is a named field of `Limits`; `Limits.validate()` checks that the
set is consistent and is called at start-up by every process. Code that
enforces a limit reads it from here, never from a literal.
"""

from __future__ import annotations

import dataclasses

MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    # Client requests (etcd's defaults).
    max_request_bytes: int = int(1.5 * MIB)
    max_txn_ops: int = 128
    # A frame may carry many pipelined requests; each is still checked against
    # max_request_bytes. The frame bound leaves room for a full batch of them.
    max_requests_per_frame: int = 256
    max_frame_bytes: int = 64 * MIB
    # Responses larger than this are refused with ErrRangeTooLarge... except
    # ranges, which are truncated by the client's own `limit` only (as etcd).
    max_response_bytes: int = 256 * MIB
    # Requests a gateway holds while waiting for the log or the applier.
    max_pending_requests_per_gateway: int = 65536
    # Proposal batching: a gateway sends at most this many requests (and bytes)
    # to the raft log in one message; the raft log turns one message into one entry.
    max_proposal_batch_requests: int = 1024
    max_proposal_batch_bytes: int = 8 * MIB
    # Raft log: entries handed to the applier per message, and how many such
    # messages may be unacknowledged.
    max_apply_batch_entries: int = 512
    max_apply_batch_bytes: int = 16 * MIB
    max_apply_inflight_batches: int = 4
    # Raft replication (issue 4): per AppendEntries message and inflight window.
    max_append_entries_bytes: int = 4 * MIB
    max_inflight_appends: int = 256
    # WAL segment size; a segment is closed and a new one started past this.
    wal_segment_bytes: int = 64 * MIB
    # Entries kept in the log behind the last snapshot so a slow applier or
    # follower catches up from the log rather than needing a snapshot.
    snapshot_catchup_entries: int = 5000
    # Entry bytes the raft log may take in between snapshots (it holds them in
    # memory); past this a snapshot is taken before --snapshot-count is reached.
    max_log_bytes_between_snapshots: int = 256 * MIB
    # Messages drained from one socket per loop pass (fairness between sockets).
    max_messages_per_poll: int = 256
    # ZeroMQ high-water marks (messages) on every socket.
    socket_high_water_mark: int = 100_000
    # Frames queued per peer connection (each up to about max_append_entries_bytes);
    # past it a frame to that peer is dropped and Raft retransmits.
    peer_high_water_mark: int = 64
    # Snapshot streaming chunk (client snapshots and member-to-member transfers).
    snapshot_chunk_bytes: int = 1 * MIB
    # Member-to-member snapshot transfers (actors/snapshot_transfer.py): chunks
    # unacknowledged per transfer, transfers a leader sends at once, the time
    # without acked progress before chunks are resent and before a transfer
    # is aborted (and retried), and the pause before a peer whose transfer
    # failed gets another.
    snapshot_chunks_in_flight: int = 4
    max_outgoing_snapshots: int = 2
    snapshot_retransmit_ms: int = 1000
    snapshot_stall_timeout_ms: int = 10_000
    snapshot_retry_backoff_ms: int = 1000
    # Compaction deletes at most this many revisions per LMDB transaction so
    # the applier keeps serving writes while a large compaction runs.
    compaction_batch_revisions: int = 10_000
    # Watch: revisions read from the store per fan-out or catch-up step, bytes
    # of events per watch response (etcd fragments at its request size),
    # watch streams per node and watches per stream, and the frames ZeroMQ
    # queues per watch client before that client counts as slow.
    watch_chunk_revisions: int = 256
    watch_response_bytes: int = int(1.5 * MIB)
    max_watch_streams: int = 10_000
    max_watches_per_stream: int = 100_000
    watch_client_high_water_mark: int = 1000
    # Leases: the leader's lessor revokes at most this many expired leases per
    # pass (one pass per 100 ms: etcd's rate of 1000 per second), and holds at
    # most this many keep-alive / time-to-live requests while it is promoted.
    max_lease_revokes_per_pass: int = 100
    max_held_lease_requests: int = 65536
    # LMDB: the map is reserved address space, not disk; it must exceed the quota.
    default_quota_backend_bytes: int = 2 * 1024 * MIB
    max_quota_backend_bytes: int = 8 * 1024 * MIB

    def validate(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"limit {field.name} must be a positive integer, got {value!r}")
        if self.max_frame_bytes < self.max_request_bytes:
            raise ValueError("max_frame_bytes must be >= max_request_bytes")
        if self.max_proposal_batch_bytes < self.max_request_bytes:
            raise ValueError("max_proposal_batch_bytes must be >= max_request_bytes")
        if self.max_append_entries_bytes < self.max_request_bytes:
            raise ValueError("max_append_entries_bytes must be >= max_request_bytes")
        if self.max_apply_batch_bytes < self.max_proposal_batch_bytes:
            raise ValueError("max_apply_batch_bytes must be >= max_proposal_batch_bytes")
        if self.wal_segment_bytes < self.max_proposal_batch_bytes:
            raise ValueError("wal_segment_bytes must be >= max_proposal_batch_bytes")
        if self.snapshot_chunk_bytes * self.snapshot_chunks_in_flight + self.max_append_entries_bytes > \
                self.max_frame_bytes:
            raise ValueError("a peer frame (max_frame_bytes) must hold a window of snapshot chunks and an append")
        if self.snapshot_stall_timeout_ms < self.snapshot_retransmit_ms:
            raise ValueError("snapshot_stall_timeout_ms must be >= snapshot_retransmit_ms")
        if self.default_quota_backend_bytes > self.max_quota_backend_bytes:
            raise ValueError("default quota exceeds the maximum quota")


DEFAULT_LIMITS = Limits()
