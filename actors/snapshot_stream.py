"""Snapshot transfers of the raft log actor: the I/O around actors/snapshot_transfer.py.

How this works. Leader: the Raft core sends MsgSnap when a follower needs
entries it compacted. The actor hands that MsgSnap here instead of to the
transport (`start`): a child process (`python -m actors.snapshot_stream`,
so the actor's loop never blocks on a copy of a large store) writes a
consistent compacted copy of the LMDB store into `<data-dir>/snap/`, and
reports its applied raft index and term (read from the copy itself: the
snapshot is the store as of that index, not the WAL marker's index) and its
SHA-256. The file is then streamed to the follower in chunks over the peer
transport (see actors/snapshot_transfer.py for the window, acks,
retransmits and aborts). The end of a transfer (the follower's snap_result,
a stall, a failed copy, a full budget) is reported to the core
(RawNode.report_snapshot); a failure also starts a backoff before that peer
gets another. At most one transfer per follower and
`Limits.max_outgoing_snapshots` in all (copies included).

Follower: chunks are written to `<data-dir>/snap/incoming-<id>.mdb` and
hashed in order; when all bytes are in, the file is fsynced, its SHA-256 and
its own applied index/term are checked against the header, and the applier
is asked to install it (INSTALL_SNAPSHOT). Only once the applier has
switched the store (SNAPSHOT_INSTALLED ok) is the MsgSnap stepped into the
core, which resets its log to the snapshot; the actor then persists
Ready.snapshot before anything else of that Ready: a new WAL segment with
the hard state and a reset record, synced, then older segments removed.

Crash safety (kill -9 anywhere leaves the old or the new state, never a mix).
The commit point is the rename of the store's CURRENT file by the applier.
  - Before it: the store is the old generation and the WAL is untouched; a
    half-received or unverified file in snap/ is removed at start, a new
    generation dir that CURRENT does not name is removed by the applier's
    next open. The node restarts exactly as it was and is sent the
    snapshot again.
  - After it, before the WAL reset is synced: the store holds a committed
    prefix of the log up to index A that the WAL may not reach (or holds
    entries of a deposed leader at A). At start the raft log compares the
    store's applied (index, term) with the WAL (`finish_interrupted_install`)
    and, when the WAL does not hold that entry, finishes the reset itself
    (the same as offline restore does): the new state.
  - After the WAL reset: the new state; the reset record makes replay drop
    the entries before it even if the old segments were not removed yet.
An installed store is never behind the log's commit in a harmful way: any
committed prefix is a valid state, and delivery to the applier resumes at
its applied index + 1 from the log (the applier refuses a snapshot that is
not ahead of it).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys

import lmdb

from actors import ipc
from actors.config import NodeConfig
from actors.raft import MsgSnap, SnapshotMeta
from actors.raft import wire
from actors.snapshot_transfer import (
    IncomingSnapshot, OutgoingSnapshot, SnapshotHeader, SnapshotWireError, TransferLimits,
)

SNAPSHOT_DIR = "snap"
# Test hook: while `<data-dir>/snapshot-hold` exists, a receiving follower
# takes the first chunk of a transfer and no more (a transfer caught midway).
SNAPSHOT_HOLD_FILE = "snapshot-hold"
_READ_BLOCK_BYTES = 1024 * 1024
# A receiving follower syncs its file every this many bytes, so the sync at the
# end (in the actor's loop, before install) is short even for a large store.
INCOMING_SYNC_BYTES = 8 * 1024 * 1024


def snapshot_dir(data_dir: str) -> str:
    return os.path.join(data_dir, SNAPSHOT_DIR)


def open_store_read_only(config: NodeConfig):
    """The node's store, read-only, as actors.gateway.open_store opens it
    (that module is not imported here: it pulls in grpc, seconds of start-up)."""
    from actors.mvcc import MvccStore

    quota_bytes = config.effective_quota_bytes()
    return MvccStore.open(os.path.join(config.data_dir, "store"), writer=False,
                          map_size_bytes=max(2 * quota_bytes, 4 << 30), quota_backend_bytes=quota_bytes,
                          limits=config.limits(), member_id=config.member_id())


class SnapshotStreams:
    def __init__(self, config: NodeConfig, log, transport, send_to_applier, clock_ms):
        self.config = config
        self.log = log
        self.transport = transport
        self.send_to_applier = send_to_applier
        self.clock_ms = clock_ms
        self.member_id = config.member_id()
        limits = config.limits()
        self.limits = limits
        self.transfer_limits = TransferLimits(
            chunk_bytes=limits.snapshot_chunk_bytes, max_chunks_in_flight=limits.snapshot_chunks_in_flight,
            retransmit_ms=limits.snapshot_retransmit_ms, stall_timeout_ms=limits.snapshot_stall_timeout_ms)
        self.directory = snapshot_dir(config.data_dir)
        os.makedirs(self.directory, exist_ok=True)
        for name in os.listdir(self.directory):  # leftovers of a run that died mid-transfer
            os.remove(os.path.join(self.directory, name))
        self.hold_path = os.path.join(config.data_dir, SNAPSHOT_HOLD_FILE)
        self.next_transfer_id = random.SystemRandom().randrange(1, 1 << 62)
        # Leader side.
        self.copies: dict[int, tuple[subprocess.Popen, MsgSnap, str, int]] = {}  # peer -> (copy, MsgSnap, path, id)
        self.outgoing: dict[int, tuple[OutgoingSnapshot, int, str]] = {}  # peer -> (transfer, fd, path)
        self.backoff_until_ms: dict[int, float] = {}
        self.reports: list[tuple[int, bool]] = []
        # Follower side.
        self.incoming: IncomingSnapshot | None = None
        self.incoming_file = None
        self.incoming_path = ""
        self.installing: tuple | None = None  # (header, sender, path, message, started_ms)
        self.steps: list[MsgSnap] = []
        self.sent_total = 0
        self.received_total = 0
        self.failed_total = 0

    # ---- for the actor -----------------------------------------------------------------

    def take_reports(self) -> list[tuple[int, bool]]:
        reports, self.reports = self.reports, []
        return reports

    def take_steps(self) -> list[MsgSnap]:
        steps, self.steps = self.steps, []
        return steps

    def busy(self) -> bool:
        """Whether a transfer, copy or install is under way (poll has work)."""
        return bool(self.copies or self.outgoing or self.incoming or self.installing or self.reports)

    def on_forward(self, sender: int, item: list) -> None:
        try:
            kind = item[0]
            if kind == "snap_chunk":
                self._on_chunk(sender, item)
            elif kind == "snap_ack":
                self._on_ack(sender, item)
            elif kind == "snap_result":
                self._on_result(sender, item)
        except (SnapshotWireError, ValueError, TypeError, IndexError) as error:
            self.log.warning("malformed snapshot message dropped", sender=f"{sender:x}", error=str(error)[:200])

    def poll(self, is_leader: bool) -> None:
        """Timer: finished copies start streaming, stalled transfers end."""
        now_ms = self.clock_ms()
        for peer in list(self.copies):
            self._poll_copy(peer, is_leader)
        for peer in list(self.outgoing):
            transfer = self.outgoing[peer][0]
            if not is_leader:
                self._end_outgoing(peer)  # the core forgot its progress anyway
            elif transfer.stalled(now_ms):
                self._fail_outgoing(peer, "stalled")
            else:
                self._send_chunks(peer)
        if self.incoming is not None and self.incoming.stalled(now_ms, self.limits.snapshot_stall_timeout_ms):
            self.log.warning("incoming snapshot stalled; dropped", received_bytes=self.incoming.received)
            self._drop_incoming()
        if self.installing is not None and now_ms - self.installing[4] > self.limits.snapshot_stall_timeout_ms:
            header, sender, path, _message, _started = self.installing
            self.log.warning("snapshot install not answered by the applier; dropped", index=header.index)
            self._finish_install(header, sender, path, ok=False, reason="install timed out")

    # ---- leader --------------------------------------------------------------------------

    def start(self, message: MsgSnap) -> None:
        """The core asks to send a snapshot to message.to."""
        peer = message.to
        if peer in self.copies or peer in self.outgoing:
            return  # one at a time per follower; the running one reports
        now_ms = self.clock_ms()
        if now_ms < self.backoff_until_ms.get(peer, 0.0):
            self.reports.append((peer, True))
            return
        if len(self.copies) + len(self.outgoing) >= self.limits.max_outgoing_snapshots:
            self.log.info("snapshot for a follower deferred: transfer budget in use", peer=f"{peer:x}")
            self.reports.append((peer, True))
            return
        transfer_id = self._new_transfer_id()
        path = os.path.join(self.directory, f"outgoing-{transfer_id:x}.mdb")
        process = subprocess.Popen(
            [sys.executable, "-m", "actors.snapshot_stream", self.config.to_json(), path],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.copies[peer] = (process, message, path, transfer_id)
        self.log.info("snapshot copy started", peer=f"{peer:x}", marker_index=message.snapshot.index)

    def _new_transfer_id(self) -> int:
        self.next_transfer_id += 1
        return self.next_transfer_id

    def _poll_copy(self, peer: int, is_leader: bool) -> None:
        process, message, path, transfer_id = self.copies[peer]
        if process.poll() is None:
            if not is_leader:
                process.kill()
                process.wait()
                del self.copies[peer]
                _remove(path)
            return
        del self.copies[peer]
        stdout, stderr = process.communicate()
        if process.returncode != 0 or not is_leader:
            if process.returncode != 0:
                self.log.error("snapshot copy failed", peer=f"{peer:x}", error=stderr.decode(errors="replace")[-400:])
            _remove(path)
            self._note_failure(peer)
            return
        copied = json.loads(stdout)
        index, term = copied["index"], copied["term"]
        raft_message = wire.encode(MsgSnap(to=peer, sender=self.member_id, term=message.term,
                                           snapshot=SnapshotMeta(index, term, message.snapshot.conf_state)))
        header = SnapshotHeader(transfer_id=transfer_id, index=index, term=term,
                                raft_message=raft_message, size=copied["size"], sha256=bytes.fromhex(copied["sha256"]))
        descriptor = os.open(path, os.O_RDONLY)
        self.outgoing[peer] = (OutgoingSnapshot(peer, header, self.transfer_limits, self.clock_ms()), descriptor, path)
        self.log.info("snapshot sending", peer=f"{peer:x}", index=index, term=term, size_bytes=header.size,
                      copy_ms=copied["copy_ms"])
        self._send_chunks(peer)

    def _send_chunks(self, peer: int) -> None:
        transfer, descriptor, _path = self.outgoing[peer]
        header_wire = transfer.header.to_wire()
        for offset, length in transfer.next_chunks(self.clock_ms()):
            data = os.pread(descriptor, length, offset)
            self.transport.queue_forward(peer, ["snap_chunk", header_wire, offset, data])

    def _on_ack(self, sender: int, item: list) -> None:
        _kind, transfer_id, received = item
        entry = self.outgoing.get(sender)
        if entry is None or entry[0].header.transfer_id != transfer_id:
            return
        if entry[0].on_ack(received, self.clock_ms()):
            self._send_chunks(sender)

    def _on_result(self, sender: int, item: list) -> None:
        _kind, transfer_id, ok, reason = item
        entry = self.outgoing.get(sender)
        if entry is None or entry[0].header.transfer_id != transfer_id:
            return
        if ok is True:
            self.sent_total += 1
            self.log.info("snapshot sent and installed", peer=f"{sender:x}", index=entry[0].header.index,
                          size_bytes=entry[0].header.size)
            self._end_outgoing(sender)
            self.reports.append((sender, False))
        else:
            self._fail_outgoing(sender, f"follower: {str(reason)[:200]}")

    def _fail_outgoing(self, peer: int, reason: str) -> None:
        self.log.warning("snapshot transfer failed; retried later", peer=f"{peer:x}", reason=reason)
        self._end_outgoing(peer)
        self._note_failure(peer)

    def _note_failure(self, peer: int) -> None:
        self.failed_total += 1
        self.backoff_until_ms[peer] = self.clock_ms() + self.limits.snapshot_retry_backoff_ms
        self.reports.append((peer, True))

    def _end_outgoing(self, peer: int) -> None:
        _transfer, descriptor, path = self.outgoing.pop(peer)
        os.close(descriptor)
        _remove(path)

    # ---- follower --------------------------------------------------------------------------

    def _on_chunk(self, sender: int, item: list) -> None:
        _kind, header_wire, offset, data = item
        header = SnapshotHeader.from_wire(header_wire)
        if self.installing is not None:
            return  # busy installing one: the sender's transfer waits or stalls
        incoming = self.incoming
        if incoming is None or incoming.header.transfer_id != header.transfer_id or incoming.sender != sender:
            if offset != 0:
                # A transfer we do not know (we restarted mid-way): say so at once.
                self.transport.queue_forward(sender, ["snap_result", header.transfer_id, False, "unknown transfer"])
                return
            if incoming is not None:
                self._drop_incoming()
            incoming = self.incoming = IncomingSnapshot(sender, header, self.clock_ms())
            self.incoming_path = os.path.join(self.directory, f"incoming-{header.transfer_id:x}.mdb")
            self.incoming_file = open(self.incoming_path, "wb")
            self.log.info("snapshot receiving", sender=f"{sender:x}", index=header.index, size_bytes=header.size)
        if incoming.received > 0 and os.path.exists(self.hold_path):
            return  # test hook: hold the transfer after its first chunk
        if incoming.accept(offset, data, self.clock_ms()):
            self.incoming_file.write(data)
            if incoming.received // INCOMING_SYNC_BYTES != (incoming.received - len(data)) // INCOMING_SYNC_BYTES:
                self.incoming_file.flush()
                os.fdatasync(self.incoming_file.fileno())
        self.transport.queue_forward(sender, ["snap_ack", header.transfer_id, incoming.received])
        if incoming.received > 0 and offset == 0:
            self.log.info("snapshot first chunk received", received_bytes=incoming.received)
        if incoming.complete:
            self._complete_incoming()

    def _complete_incoming(self) -> None:
        incoming, path = self.incoming, self.incoming_path
        header, sender = incoming.header, incoming.sender
        self.incoming_file.flush()
        os.fsync(self.incoming_file.fileno())
        self.incoming_file.close()
        self.incoming, self.incoming_file = None, None
        problem = ""
        message = None
        if not incoming.verified():
            problem = "sha256 mismatch"
        else:
            try:
                from actors.mvcc import MvccStore  # only a follower installing needs it

                position = MvccStore.snapshot_position(path)
                message = wire.decode(header.raft_message)
                if position != (header.index, header.term):
                    problem = f"store copy holds {position}, header says {(header.index, header.term)}"
                elif (not isinstance(message, MsgSnap) or message.to != self.member_id or message.sender != sender
                      or (message.snapshot.index, message.snapshot.term) != position):
                    problem = "the MsgSnap does not describe the store copy"
            except (lmdb.Error, wire.WireError) as error:
                problem = f"not a store copy: {error}"
        if problem:
            self.log.warning("received snapshot refused", sender=f"{sender:x}", reason=problem)
            _remove(path)
            self.transport.queue_forward(sender, ["snap_result", header.transfer_id, False, problem])
            return
        self.log.info("snapshot received; installing", sender=f"{sender:x}", index=header.index,
                      size_bytes=header.size)
        self.installing = (header, sender, path, message, self.clock_ms())
        self.send_to_applier([ipc.INSTALL_SNAPSHOT, path, header.index])

    def on_installed(self, index: int, ok: bool, detail) -> None:
        """The applier's SNAPSHOT_INSTALLED."""
        if self.installing is None or self.installing[0].index != index:
            return
        header, sender, path, message, _started = self.installing
        if ok:
            self.received_total += 1
        if ok or str(detail).startswith(ipc.STORE_ALREADY_AHEAD):
            # Stepped also when the store already holds it: the core then answers
            # the leader with its commit index, as etcd's does for an old snapshot.
            self.steps.append(message)
        self._finish_install(header, sender, path, ok, "" if ok else str(detail))

    def _finish_install(self, header: SnapshotHeader, sender: int, path: str, ok: bool, reason: str) -> None:
        self.installing = None
        _remove(path)  # moved into the store when installed
        self.transport.queue_forward(sender, ["snap_result", header.transfer_id, ok, reason])

    def _drop_incoming(self) -> None:
        self.incoming_file.close()
        _remove(self.incoming_path)
        self.incoming, self.incoming_file = None, None

    def close(self) -> None:
        for peer in list(self.copies):
            process, _message, path, _transfer_id = self.copies.pop(peer)
            process.kill()
            process.wait()
            _remove(path)
        for peer in list(self.outgoing):
            self._end_outgoing(peer)
        if self.incoming is not None:
            self._drop_incoming()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def copy_store(config: NodeConfig, path: str) -> dict:
    """A consistent copy of the store at `path`: its applied index/term, size, SHA-256."""
    import time

    from actors.mvcc import MvccStore

    started = time.monotonic()
    store = open_store_read_only(config)
    try:
        store.copy_to(path)
    finally:
        store.close()
    index, term = MvccStore.snapshot_position(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_READ_BLOCK_BYTES):  # bounded by the file size
            digest.update(block)
    return {"index": index, "term": term, "size": os.path.getsize(path), "sha256": digest.hexdigest(),
            "copy_ms": int((time.monotonic() - started) * 1000)}


if __name__ == "__main__":
    print(json.dumps(copy_store(NodeConfig.from_json(sys.argv[1]), sys.argv[2])))
