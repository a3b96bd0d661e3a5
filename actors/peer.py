"""The peer transport of the raft log actor: Raft messages between members over TCP.

How this works: each member binds one ROUTER on its --listen-peer-urls port
and connects one DEALER to every other member's advertised peer URL (from
the member table, actors.members), with ROUTING_ID = its own member id (8
bytes, big endian). Membership changes add, remove and re-point dealers
(`add_peer`, `remove_peer`, `update_peer`). Each loop pass the actor queues
what the core's Ready asks to send and `flush()` sends ONE frame per peer
(more only past max_append_entries_bytes): batching, Python pays per call.

Wire format (one ZeroMQ frame, msgpack):

    [PEER_WIRE_VERSION, token_hash, sender_id, raft_messages, forwards]

- token_hash: `token_hash(--initial-cluster-token)`. A frame with another
  token (a member of another cluster) is refused: logged (rate-limited) and
  dropped. So is a frame whose sender id is not a member, or whose ROUTER
  identity is not its sender id.
- raft_messages: `[actors.raft.wire.encode(message), ...]`.
- forwards: `[[kind, ...], ...]`, requests a follower forwards to the
  leader at the actor level (not through the Raft core) and their answers:
  - ["propose", entry_data]: a gateway's PROPOSE batch; entry_data is the
    entry's data, msgpack [member_id, gateway_identity, items], which the
    leader proposes as is after checking member_id == sender_id. Its result
    comes from the proposing member's own applier.
  - ["propose_failed", gateway_identity, [gw_request_id, ...], code]: the
    leader could not propose it (it lost leadership meanwhile).
  - ["lease_request", gateway_identity, items] / ["lease_reply",
    gateway_identity, replies]: keep-alive and time-to-live, answered by
    the leader's lessor (ipc.LEASE_REQUEST / LEASE_REPLY items).
  - ["snap_chunk", header, offset, data] / ["snap_ack", transfer_id,
    received_bytes] / ["snap_result", transfer_id, ok, reason]: a snapshot
    transfer (actors/snapshot_transfer.py, actors/snapshot_stream.py). A
    bare MsgSnap among the raft messages is dropped: only the actor steps
    one, once its store is installed.
  - ["member_request", gateway_identity, items] / ["member_reply",
    gateway_identity, replies]: membership changes (ipc.MEMBER_REQUEST
    items) for the leader to check and propose, and its refusals; a change
    it proposed is answered by the requesting member once applied there.
  - ["publish", record]: a member's name and client URLs for the leader to
    put in the member table (etcd's publish).
  - ["removed"]: "you were removed from the cluster". A member sends it to a
    removed member when it removes it and whenever a frame from it arrives
    (rate-limited), through a dealer it keeps for that (etcd's peers answer
    a removed member's messages with "removed member").

Stale, duplicated and reordered frames (ZeroMQ replays queued frames after a
partition heals or a peer restarts) are normal input: the Raft core ignores
what is stale. Sends never block: DEALERs have a bounded queue
(Limits.peer_high_water_mark) and IMMEDIATE (nothing is queued for a peer
that is not connected); a frame that does not fit is dropped and Raft
retransmits.

Fault injection (tests; no root, no iptables): the file `peer_faults_path(data_dir)`
(`<data-dir>/peer-faults`) lists peers to cut off, as member names (from
--initial-cluster) or member ids in hex, separated by spaces, commas or new
lines; `*` means every peer. All traffic to and from them is dropped, in both
directions at this member, until the file is changed or removed. The file is
re-read when its mtime changes (checked every FAULTS_CHECK_MS). Writing `*`
into one member's file isolates it completely.
"""

from __future__ import annotations

import hashlib
import os
import socket as socket_module
import time

import ormsgpack
import zmq

from actors.config import NodeConfig, member_id_for, parse_url
from actors.raft import Message
from actors.raft import wire

PEER_WIRE_VERSION = 1
FAULTS_CHECK_MS = 100
_WARN_INTERVAL_S = 5.0
# Bytes counted per message on top of its entries' data (headers, framing).
_MESSAGE_OVERHEAD_BYTES = 64
# Removed members a transport keeps a dealer to (to tell them), and how often it tells each.
MAX_REMOVED_PEERS_KEPT = 16
REMOVED_NOTICE_INTERVAL_S = 1.0


def token_hash(token: str) -> int:
    return int.from_bytes(hashlib.sha1(b"quorumkv-cluster-token:" + token.encode()).digest()[:8], "big") >> 1


def peer_faults_path(data_dir: str) -> str:
    return os.path.join(os.path.abspath(data_dir), "peer-faults")


def identity_of(member_id: int) -> bytes:
    return member_id.to_bytes(8, "big")


def cluster_peers(config: NodeConfig) -> dict[int, tuple[str, str]]:
    """member id -> (name, first advertised peer URL), for every member of --initial-cluster."""
    return {member_id_for(urls, config.initial_cluster_token): (name, urls[0])
            for name, urls in config.cluster_members().items()}


def table_peers(records: list[dict]) -> dict[int, tuple[str, str]]:
    """member id -> (name or hex id, first peer URL), from member records."""
    return {rec["ID"]: (rec["name"] or f"{rec['ID']:x}", sorted(rec["peerURLs"])[0]) for rec in records}


def _tcp_endpoint(url: str) -> str:
    host, port = parse_url(url)
    try:
        host = socket_module.gethostbyname(host)
    except OSError:
        pass  # leave it to ZeroMQ (an interface name, say)
    return f"tcp://{host}:{port}"


class PeerTransport:
    def __init__(self, context: zmq.Context, config: NodeConfig, log,
                 members: dict[int, tuple[str, str]] | None = None):
        self.config = config
        self.context = context
        self.log = log
        self.limits = config.limits()
        self.member_id = config.member_id()
        self.token = token_hash(config.initial_cluster_token)
        members = cluster_peers(config) if members is None else members
        assert self.member_id in members, "this member is not in the member table"
        self.names = {member_id: name for member_id, (name, _url) in members.items()}
        self.peers = sorted(member_id for member_id in members if member_id != self.member_id)
        self.urls = {member_id: url for member_id, (_name, url) in members.items()}
        # Removed members: a dealer kept to tell them so, and when we last did.
        self.removed: dict[int, zmq.Socket] = {}
        self.removed_told_s: dict[int, float] = {}
        self.router = context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.RCVHWM, self.limits.peer_high_water_mark)
        self.router.setsockopt(zmq.MAXMSGSIZE, self.limits.max_frame_bytes)
        self.router.setsockopt(zmq.LINGER, 0)
        # A restarted peer reconnects with the same identity while its old
        # connection may linger: the new connection takes over.
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.router.bind(_tcp_endpoint(config.listen_peer_urls[0]))
        self.dealers: dict[int, zmq.Socket] = {}
        for peer in self.peers:
            self.dealers[peer] = self._dealer(members[peer][1])
        # Per peer: [raft messages (encoded), forwards], and the raft bytes queued.
        self.outbox: dict[int, list] = {}
        self.outbox_bytes: dict[int, int] = {}
        self.cut_off: frozenset[int] = frozenset()
        self.faults_mtime: float | None = None
        self.frames_sent = 0
        self.frames_dropped = 0
        self.frames_refused = 0
        self.last_warning_s: dict[str, float] = {}
        self.reload_faults()

    def _dealer(self, url: str) -> zmq.Socket:
        dealer = self.context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.ROUTING_ID, identity_of(self.member_id))
        dealer.setsockopt(zmq.SNDHWM, self.limits.peer_high_water_mark)
        dealer.setsockopt(zmq.IMMEDIATE, 1)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.RECONNECT_IVL, 50)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        dealer.connect(_tcp_endpoint(url))
        return dealer

    # ---- membership changes -------------------------------------------------------

    def add_peer(self, member_id: int, name: str, url: str) -> None:
        if member_id == self.member_id or member_id in self.dealers:
            return
        stale = self.removed.pop(member_id, None)
        if stale is not None:
            stale.close(0)
        self.names[member_id] = name
        self.urls[member_id] = url
        self.dealers[member_id] = self._dealer(url)
        self.peers = sorted(self.dealers)
        self.log.info("peer added", peer=name, member_id=f"{member_id:x}", url=url)

    def update_peer(self, member_id: int, name: str, url: str) -> None:
        self.names[member_id] = name
        if member_id not in self.dealers or self.urls.get(member_id) == url:
            return
        self.dealers.pop(member_id).close(0)
        self.outbox.pop(member_id, None)
        self.outbox_bytes.pop(member_id, None)
        self.urls[member_id] = url
        self.dealers[member_id] = self._dealer(url)
        self.log.info("peer URL changed", peer=name, member_id=f"{member_id:x}", url=url)

    def remove_peer(self, member_id: int) -> None:
        """Stop talking Raft with a removed member; keep a dealer to tell it so."""
        dealer = self.dealers.pop(member_id, None)
        if dealer is None:
            return
        self.peers = sorted(self.dealers)
        self.outbox.pop(member_id, None)
        self.outbox_bytes.pop(member_id, None)
        if len(self.removed) >= MAX_REMOVED_PEERS_KEPT:
            oldest = next(iter(self.removed))
            self.removed.pop(oldest).close(0)
            self.removed_told_s.pop(oldest, None)
        self.removed[member_id] = dealer
        self.log.info("peer removed", peer=self.names.get(member_id, f"{member_id:x}"), member_id=f"{member_id:x}")
        self.tell_removed(member_id)

    def tell_removed(self, member_id: int) -> None:
        """Send ["removed"] to a removed member, at most once per REMOVED_NOTICE_INTERVAL_S."""
        now = time.monotonic()
        if now - self.removed_told_s.get(member_id, -REMOVED_NOTICE_INTERVAL_S) < REMOVED_NOTICE_INTERVAL_S:
            return
        self.removed_told_s[member_id] = now
        frame = ormsgpack.packb([PEER_WIRE_VERSION, self.token, self.member_id, [], [["removed"]]])
        try:
            self.removed[member_id].send(frame, zmq.NOBLOCK)
        except zmq.Again:
            self.removed_told_s.pop(member_id, None)  # not connected yet: try at its next frame

    # ---- fault injection ----------------------------------------------------------

    def reload_faults(self) -> None:
        path = peer_faults_path(self.config.data_dir)
        try:
            mtime = os.stat(path).st_mtime
        except FileNotFoundError:
            mtime = None
        if mtime == self.faults_mtime:
            return
        self.faults_mtime = mtime
        cut_off = set()
        if mtime is not None:
            try:
                with open(path, encoding="utf-8") as handle:
                    text = handle.read(64 * 1024)
            except OSError:
                text = ""
            by_name = {name: member_id for member_id, name in self.names.items()}
            for token in text.replace(",", " ").split():
                if token == "*":
                    cut_off.update(self.peers)
                elif token in by_name:
                    cut_off.add(by_name[token])
                else:
                    try:
                        cut_off.add(int(token, 16))
                    except ValueError:
                        self.log.warning("peer-faults: unknown peer ignored", peer=token[:40])
        cut_off.discard(self.member_id)
        if frozenset(cut_off) != self.cut_off:
            self.cut_off = frozenset(cut_off)
            self.log.warning("peer faults changed: traffic to and from these peers is dropped",
                             peers=sorted(self.names.get(p, f"{p:x}") for p in self.cut_off))

    # ---- sending ------------------------------------------------------------------

    def _box(self, peer: int) -> list:
        box = self.outbox.get(peer)
        if box is None:
            box = self.outbox[peer] = [[], []]
            self.outbox_bytes[peer] = 0
        return box

    def queue_message(self, message: Message) -> None:
        if message.to not in self.dealers:
            return  # not a peer of ours (a stale or foreign id): nothing to send it to
        entries = getattr(message, "entries", ())
        size = _MESSAGE_OVERHEAD_BYTES + sum(len(entry.data) + 24 for entry in entries)
        if self.outbox_bytes.get(message.to, 0) + size > self.limits.max_append_entries_bytes and \
                self.outbox.get(message.to, [[]])[0]:
            self._send(message.to)  # this frame is full: send it, start another
        self._box(message.to)[0].append(wire.encode(message))
        self.outbox_bytes[message.to] += size

    def queue_forward(self, peer: int, item: list) -> None:
        """An actor-level message ([kind, ...]) for a peer, sent with the next flush."""
        if peer in self.dealers:
            self._box(peer)[1].append(item)

    def flush(self) -> None:
        for peer in list(self.outbox):
            self._send(peer)

    def _send(self, peer: int) -> None:
        raft_messages, forwards = self.outbox.pop(peer)
        self.outbox_bytes.pop(peer, None)
        if peer in self.cut_off:
            self.frames_dropped += 1
            return
        frame = ormsgpack.packb([PEER_WIRE_VERSION, self.token, self.member_id, raft_messages, forwards])
        try:
            self.dealers[peer].send(frame, zmq.NOBLOCK)
            self.frames_sent += 1
        except zmq.Again:
            # Not connected, or its queue is full: Raft retransmits what matters.
            self.frames_dropped += 1

    # ---- receiving ----------------------------------------------------------------

    def decode(self, frames: list) -> tuple[int, list, list] | None:
        """(sender, raft messages, forwards) of a received
        frame, or None when it is refused or cut off (logged, rate-limited)."""
        if len(frames) != 2:
            return self._refuse("not [identity, frame]")
        identity, payload = frames
        try:
            value = ormsgpack.unpackb(payload)
        except ormsgpack.MsgpackDecodeError:
            return self._refuse("not msgpack")
        if not isinstance(value, list) or len(value) != 5 or value[0] != PEER_WIRE_VERSION:
            return self._refuse("not a peer frame of this version")
        _version, token, sender, raft_messages, forwards = value
        if token != self.token:
            return self._refuse("another cluster token (--initial-cluster-token differs)", peer=identity.hex())
        if type(sender) is int and sender in self.removed and identity == identity_of(sender):
            self.tell_removed(sender)
            return None
        if type(sender) is not int or sender not in self.dealers or identity != identity_of(sender):
            return self._refuse("sender is not a member of this cluster", peer=identity.hex())
        if sender in self.cut_off:
            self.frames_dropped += 1
            return None
        if not isinstance(raft_messages, list) or not isinstance(forwards, list):
            return self._refuse("bad frame body", peer=self.names[sender])
        messages = []
        for item in raft_messages:
            try:
                message = wire.decode(item)
            except wire.WireError as error:
                self._refuse(f"bad raft message: {error}", peer=self.names[sender])
                continue
            if message.sender != sender or message.to != self.member_id:
                self._refuse("raft message not from its sender or not for us", peer=self.names[sender])
                continue
            messages.append(message)
        return sender, messages, forwards

    def _refuse(self, reason: str, **fields) -> None:
        self.frames_refused += 1
        now = time.monotonic()
        if now - self.last_warning_s.get(reason, 0.0) >= _WARN_INTERVAL_S:
            self.last_warning_s[reason] = now
            self.log.warning("peer frame refused", reason=reason, refused_total=self.frames_refused, **fields)
        return None

    def close(self) -> None:
        for dealer in list(self.dealers.values()) + list(self.removed.values()):
            dealer.close(0)
        self.router.close(0)
