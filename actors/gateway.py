"""The gateway actor: the ZeroMQ client edge of a node.

A thin loop around `GatewayCore`: it decodes client frames, feeds each
request to the core, and after every batch sends what the core queued
(one PROPOSE to the raft log, one READ_INDEX round, one reply frame per
client). Gateway 0 binds the node's ZeroMQ client port; the others bind a
port of their own (kept across restarts when free) and announce it in the
run directory, where `hello` finds every gateway's endpoint for clients.
Snapshot streams and defragment requests are the node-local operations it
carries out itself. Defragments are coalesced: at most one is in flight to
the applier per gateway, and every request that arrives meanwhile is
answered by the next one (which starts after it arrived), so a burst of
requests costs two store copies, not one each, and cannot stall the applier's
writes behind a queue of them.
"""

from __future__ import annotations

import os
import random
import time
import urllib.parse

import zmq

from actors import ipc, sockets
from actors.compactor import CHECK_INTERVAL_MS, AutoCompactor
from actors.config import NodeConfig
from actors.gateway_core import SERVER_VERSION, GatewayCore
from actors.grpc_front import GrpcFront, GrpcOrigin, StoreGate
from actors.http_gateway import HttpFront
from actors.lessor import min_ttl_s
from actors.loop import ActorLoop
from actors.mvcc import MvccStore
from actors.snapshot_file import SnapshotFile
from protocol import codec
from protocol.codec import STATUS_ERROR, STATUS_OK, STATUS_PARTIAL
from protocol.errors import QuorumError

RAFT_STATUS_REFRESH_MS = 1000
APPLIER_HELLO_MS = 1000
SNAPSHOT_PUMP_MS = 10
# Writes and lease requests unanswered for one to two of these periods are
# failed with Timeout (a proposal lost with its leader is never answered).
REQUEST_EXPIRY_MS = 7500
# Chunks sent per snapshot stream per pump: paces a stream at about
# 400 MiB/s so a slow reader does not fill the socket queue at once.
SNAPSHOT_CHUNKS_PER_PUMP = 4


def open_store(config: NodeConfig) -> MvccStore:
    limits = config.limits()
    return MvccStore.open(store_dir(config), writer=False, map_size_bytes=map_size_bytes(config),
                          quota_backend_bytes=config.effective_quota_bytes(), limits=limits,
                          member_id=config.member_id())


def store_dir(config: NodeConfig) -> str:
    return os.path.join(config.data_dir, "store")


def map_size_bytes(config: NodeConfig) -> int:
    # Address space only; leave room past the quota so the NOSPACE alarm,
    # not LMDB's MapFullError, is what a full node hits.
    return max(2 * config.effective_quota_bytes(), 4 << 30)


class Gateway:
    def __init__(self, config: NodeConfig, index: int, log):
        self.config = config
        self.index = index
        self.log = log
        self.limits = config.limits()
        self.identity = ipc.gateway_identity(index)
        self.context = zmq.Context()
        self.store = open_store(config)
        # The gRPC front's handler threads read the store too (serializable
        # reads): reopening or closing it waits for them.
        self.store_gate = StoreGate()
        self.outbox: dict[bytes, list] = {}
        self.core = GatewayCore(store=self.store, limits=self.limits, member_id=config.member_id(),
                                cluster_id=config.cluster_id(), gateway_identity=self.identity,
                                emit=self._emit, rng=random.Random(),
                                min_lease_ttl_s=min_ttl_s(config.election_timeout_ms, config.heartbeat_interval_ms))
        self.core.local_handlers.update(hello=self._hello, snapshot=self._snapshot, defragment=self._defragment)
        self.auto_compactor = AutoCompactor(config.auto_compaction_mode, config.auto_compaction_retention)
        self.snapshots: list[SnapshotFile] = []
        self.next_defrag_id = 1
        # Coalesced defragments: origins waiting for the next one, the id of
        # the one in flight and the origins it answers, and whether it was
        # already in flight at the previous expiry pass.
        self.defrags_waiting: list[object] = []
        self.defrag_in_flight: int | None = None
        self.defrags_running: list[object] = []
        self.defrag_expiry_mark: int | None = None
        self.client = self._bind_client_socket()
        self.raft = self._dealer(ipc.raft_endpoint(config.data_dir))
        self.applier = self._dealer(ipc.applier_endpoint(config.data_dir))
        # Results for our proposals come back over this link; proposing before
        # the applier has answered our HELLO could lose them (an unroutable reply).
        self.applier_linked = False
        self.told_wants_applied = False
        self.waited_since_hello = False
        self.say_hello()
        self.raft_handlers = {
            ipc.PROPOSE_FAILED: lambda m: self.core.on_propose_failed(m[1], m[2]),
            ipc.READ_INDEX: lambda m: self.core.on_read_index(m[1], m[2]),
            ipc.READ_INDEX_FAILED: lambda m: self.core.on_read_index_failed(m[1], m[2]),
            ipc.RAFT_STATUS: lambda m: self.core.on_raft_status(m[1], m[2]),
            ipc.LEASE_REPLY: lambda m: self.core.on_lease_replies(m[1]),
            ipc.MEMBER_REPLY: lambda m: self.core.on_member_replies(m[1]),
            ipc.LEADER_CHANGED: lambda m: self.core.on_leader_changed(m[1], m[2], m[3]),
        }
        self.applier_handlers = {
            ipc.RESULTS: lambda m: self.core.on_results(m[1]),
            ipc.APPLIED: self._on_applied,
            ipc.DEFRAGMENT: self._on_defragmented,
        }

    # ---- sockets --------------------------------------------------------

    def _dealer(self, endpoint: str) -> zmq.Socket:
        socket = self.context.socket(zmq.DEALER)
        socket.setsockopt(zmq.ROUTING_ID, self.identity)
        socket.setsockopt(zmq.SNDHWM, self.limits.socket_high_water_mark)
        socket.setsockopt(zmq.RCVHWM, self.limits.socket_high_water_mark)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(endpoint)
        return socket

    def _bind_client_socket(self) -> zmq.Socket:
        socket = sockets.client_router(self.context, self.limits, self.limits.socket_high_water_mark)
        host, port = self.config.zmq_url()
        # Gateway 0 serves the node's ZeroMQ port; the others a port of their own.
        endpoint = sockets.bind_announced(socket, host, ipc.gateway_endpoint_file(self.config.data_dir, self.index),
                                          port if self.index == 0 else None)
        self.log.info("gateway listening", endpoint=endpoint)
        return socket

    # ---- replies ----------------------------------------------------------

    def _emit(self, origin, status: int, body: dict) -> None:
        if origin is AUTO_COMPACTION:
            if status != STATUS_OK and body.get("code") != "Compacted":
                self.log.warning("auto-compaction failed", error=body)
            return
        if type(origin) is GrpcOrigin:
            self.grpc_front.deliver(origin, status, body)
            return
        identity, request_id = origin
        self.outbox.setdefault(identity, []).append([request_id, status, body])

    def _send_to_client(self, identity: bytes, frame: bytes) -> bool:
        try:
            self.client.send_multipart([identity, frame], zmq.NOBLOCK)
            return True
        except zmq.Again:
            self.log.warning("client send queue full, reply dropped", client=identity.hex())
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            # The client went away; nobody is left to hear the answer.
        return False

    def expire_unanswered(self) -> None:
        expired = self.core.expire_unanswered() + self._expire_defragment()
        if expired:
            self.log.warning("requests unanswered too long failed with Timeout", requests=expired)
            self.flush()

    def say_hello(self) -> None:
        # Repeated so a restarted applier learns of us. It also says whether
        # we want an APPLIED after every batch: while reads or a leader-change
        # cut wait here, and until a hello period has passed without any.
        waits = self.core.waits_for_applied()
        self.told_wants_applied = waits or self.waited_since_hello
        self.waited_since_hello = waits
        self.applier.send(codec.pack([ipc.HELLO, self.told_wants_applied]))

    def _ask_for_applied_if_waiting(self) -> None:
        if self.core.waits_for_applied():
            self.waited_since_hello = True
            if not self.told_wants_applied:
                self.say_hello()  # answered with the latest APPLIED, then one a batch

    def flush(self) -> None:
        while self.applier_linked:
            batch = self.core.take_proposals()
            if not batch:
                break
            self.raft.send(codec.pack([ipc.PROPOSE, batch]))
        while True:  # bounded: the queue only shrinks here
            lease_batch = self.core.take_lease_requests()
            if not lease_batch:
                break
            self.raft.send(codec.pack([ipc.LEASE_REQUEST, lease_batch]))
        while True:  # bounded: the queue only shrinks here
            member_batch = self.core.take_member_requests()
            if not member_batch:
                break
            self.raft.send(codec.pack([ipc.MEMBER_REQUEST, member_batch]))
        read_id = self.core.take_read_index_request()
        if read_id is not None:
            self.raft.send(codec.pack([ipc.READ_INDEX, read_id]))
        status_id = self.core.take_raft_status_request()
        if status_id is not None:
            self.raft.send(codec.pack([ipc.RAFT_STATUS, status_id]))
        for identity, responses in self.outbox.items():
            self._send_to_client(identity, codec.encode_response_frame(responses))
        self.outbox.clear()
        self._ask_for_applied_if_waiting()

    # ---- client frames ------------------------------------------------------

    def on_client(self, batch: list) -> None:
        for parts in batch:
            identity, frames = parts[0], parts[1:]
            if len(frames) != 1:
                error = QuorumError("MalformedFrame", "a message is one frame; got %d parts" % len(frames))
                self._emit((identity, None), STATUS_ERROR, error.to_wire())
                continue
            self._take_frame(identity, frames[0])
        self.flush()

    def _take_frame(self, identity: bytes, frame: bytes) -> None:
        try:
            items = codec.decode_frame(frame, self.limits.max_frame_bytes, self.limits.max_requests_per_frame)
        except QuorumError as error:
            self._emit((identity, None), STATUS_ERROR, error.to_wire())
            return
        share = len(frame) // max(1, len(items))
        for item in items:
            if not isinstance(item, list) or len(item) != 3:
                request_id = item[0] if isinstance(item, list) and item else None
                error = QuorumError("MalformedFrame", "a request is [request_id, op, body]")
                self._emit((identity, request_id if _is_plain(request_id) else None), STATUS_ERROR, error.to_wire())
                continue
            request_id, op, body = item
            if not _is_plain(request_id):
                self._emit((identity, None), STATUS_ERROR,
                           QuorumError("MalformedFrame", "request_id must be an integer or string").to_wire())
                continue
            size_bytes = share if len(frame) <= self.limits.max_request_bytes else len(codec.pack(item))
            self.core.submit((identity, request_id), op, body, size_bytes)

    # ---- messages from the raft log and the applier -----------------------

    def _dispatch(self, handlers: dict, batch: list, source: str) -> None:
        for frame in batch:
            try:
                message = codec.unpack(frame)
                handler = handlers[message[0]]
            except (QuorumError, KeyError, TypeError, IndexError):
                self.log.warning("malformed message dropped", source=source)
                continue
            handler(message)
        self.flush()

    def on_raft(self, batch: list) -> None:
        self._dispatch(self.raft_handlers, batch, "raft_log")

    def on_applier(self, batch: list) -> None:
        self._dispatch(self.applier_handlers, batch, "applier")

    def _on_applied(self, message: list) -> None:
        _kind, applied_index, _revision, generation = message
        self.applier_linked = True
        if generation != self.store.generation:
            with self.store_gate.changing():
                self.store.reopen_if_stale(generation)
        self.core.on_applied(applied_index)

    # ---- node-local operations ------------------------------------------------

    def _hello(self, origin, _body: dict) -> None:
        data_dir = self.config.data_dir
        # An actor that is (re)starting has no endpoint yet and is left out.
        gateways = [sockets.read_endpoint(ipc.gateway_endpoint_file(data_dir, index))
                    for index in range(self.config.gateway_count())]
        body = {"version": SERVER_VERSION, "member_id": self.core.member_id, "cluster_id": self.core.cluster_id,
                "gateways": [_advertised(endpoint, self.config) for endpoint in gateways if endpoint]}
        watch = sockets.read_endpoint(ipc.watch_endpoint_file(data_dir))
        if watch:
            body["watch"] = _advertised(watch, self.config)
        self._emit(origin, STATUS_OK, body)

    def _snapshot(self, origin, _body: dict) -> None:
        stream = SnapshotFile(self.store, self.config.data_dir, origin)
        self.snapshots.append(stream)
        self.log.info("snapshot stream started", bytes=stream.size)

    def pump_snapshots(self) -> None:
        for stream in list(self.snapshots):
            identity, request_id = stream.origin
            for _ in range(SNAPSHOT_CHUNKS_PER_PUMP):
                blob = stream.read_chunk(self.limits.snapshot_chunk_bytes)
                status = STATUS_OK if stream.done else STATUS_PARTIAL
                body = {"header": self.core.header(self.store.revision()), "blob": blob,
                        "remaining_bytes": stream.remaining}
                frame = codec.encode_response_frame([[request_id, status, body]])
                if not self._send_to_client(identity, frame) or stream.done:
                    stream.close()
                    self.snapshots.remove(stream)
                    break

    def _defragment(self, origin, _body: dict) -> None:
        self.defrags_waiting.append(origin)
        if self.defrag_in_flight is None:
            self._start_defragment()

    def _start_defragment(self) -> None:
        if not self.defrags_waiting:
            return
        self.defrag_in_flight = self.next_defrag_id
        self.next_defrag_id += 1
        self.defrags_running, self.defrags_waiting = self.defrags_waiting, []
        self.applier.send(codec.pack([ipc.DEFRAGMENT, self.defrag_in_flight]))

    def _on_defragmented(self, message: list) -> None:
        _kind, defrag_id, error = message
        if defrag_id != self.defrag_in_flight:
            return  # one given up on (expired), or from before a restart
        self._answer_defragments(QuorumError.from_wire(error) if error else None)
        self._start_defragment()

    def _answer_defragments(self, error: QuorumError | None) -> None:
        running, self.defrags_running = self.defrags_running, []
        self.defrag_in_flight = self.defrag_expiry_mark = None
        for origin in running:
            if error is not None:
                self.core.fail(origin, error)
            else:
                self._emit(origin, STATUS_OK, {"header": self.core.header(self.store.revision())})

    def _expire_defragment(self) -> int:
        """A defragment in flight at two expiry passes in a row (its answer
        lost with a restarted applier, or a very large store) is failed with
        Timeout, so the requests waiting behind it get a defragment of their own."""
        if self.defrag_in_flight is None or self.defrag_in_flight != self.defrag_expiry_mark:
            self.defrag_expiry_mark = self.defrag_in_flight
            return 0
        expired = len(self.defrags_running)
        self._answer_defragments(QuorumError("Timeout"))
        self._start_defragment()
        return expired

    def auto_compact(self) -> None:
        # Only the leader compacts, so members do not race each other's requests.
        if self.core.raft_status.get("leader") != self.core.member_id:
            return
        target = self.auto_compactor.observe(int(time.monotonic() * 1000), self.store.revision())
        if target is not None:
            self.log.info("auto-compaction", revision=target, mode=self.auto_compactor.mode)
            self.core.submit(AUTO_COMPACTION, "compaction", {"revision": target})
            self.flush()

    def refresh_raft_status(self) -> None:
        self.raft.send(codec.pack([ipc.RAFT_STATUS, 0]))

    def close(self) -> None:
        self.core.fail_everything("Stopped")
        for origin in self.defrags_running + self.defrags_waiting:
            self.core.fail(origin, QuorumError("Stopped"))
        self.flush()
        for stream in self.snapshots:
            stream.close()
        with self.store_gate.changing():
            self.store.close()
        self.context.destroy(linger=0)


def _advertised(endpoint: str, config: NodeConfig) -> str:
    """A wildcard bind (0.0.0.0) is advertised under the first client URL's host."""
    if "://0.0.0.0:" not in endpoint and "://[::]:" not in endpoint:
        return endpoint
    port = endpoint.rsplit(":", 1)[1]
    host = urllib.parse.urlsplit(config.advertise_client_urls[0]).hostname or "127.0.0.1"
    return f"tcp://{host}:{port}"


AUTO_COMPACTION = object()  # the origin of auto-compaction requests


def _is_plain(request_id) -> bool:
    return isinstance(request_id, (int, str)) and not isinstance(request_id, bool)


def run(config: NodeConfig, index: int, log) -> None:
    gateway = Gateway(config, index, log)
    loop = ActorLoop(log, gateway.limits.max_messages_per_poll, parent_pid=os.getppid())
    loop.add_socket(gateway.client, gateway.on_client)
    loop.add_socket(gateway.raft, gateway.on_raft, multipart=False)
    loop.add_socket(gateway.applier, gateway.on_applier, multipart=False)
    loop.add_timer(RAFT_STATUS_REFRESH_MS, gateway.refresh_raft_status)
    loop.add_timer(SNAPSHOT_PUMP_MS, gateway.pump_snapshots, active=lambda: bool(gateway.snapshots))
    loop.add_timer(APPLIER_HELLO_MS, gateway.say_hello)
    loop.add_timer(REQUEST_EXPIRY_MS, gateway.expire_unanswered)
    if index == 0 and gateway.auto_compactor.enabled:
        loop.add_timer(CHECK_INTERVAL_MS, gateway.auto_compact)
    # etcd's gRPC API on --listen-client-urls (every gateway, SO_REUSEPORT).
    gateway.grpc_front = GrpcFront(gateway, log)
    loop.add_socket(gateway.grpc_front.socket, gateway.grpc_front.on_requests, multipart=False)
    loop.add_timer(SNAPSHOT_PUMP_MS, gateway.grpc_front.pump_snapshots,
                   active=lambda: bool(gateway.grpc_front.snapshots))
    gateway.grpc_front.start()
    # etcd's JSON gateway on --listen-client-http-urls, through the gRPC front's channel.
    http_front = HttpFront(gateway.grpc_front, gateway, log) if config.listen_client_http_urls else None
    if http_front is not None:
        http_front.start()
    gateway.refresh_raft_status()
    try:
        reason = loop.run()
        log.info("gateway stopping", reason=reason)
    finally:
        if http_front is not None:
            http_front.stop()
        gateway.grpc_front.stop()
        gateway.close()
