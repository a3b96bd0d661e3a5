"""etcd's v3 gRPC API: a second skin over the gateway's request-handling core.

How this works: each gateway process runs a grpcio server (a thread pool)
on `--listen-client-urls`, with SO_REUSEPORT so every gateway of the node
serves the same port and the kernel spreads connections over them. A gRPC
handler thread does no KV or lease logic: it turns the protobuf request into
our request dict (the field names are etcd's, so this is mostly a copy) and
appends it, with a `GrpcOrigin` of its own, to a deque the gateway's
single-threaded loop drains; an inproc ZeroMQ message wakes the loop once
per batch (only when it is not already due to drain). The loop hands each
request to `GatewayCore.submit`; the gateway's `emit` gives answers for such
origins to `deliver`, which puts them on the origin's SimpleQueue, where the
handler thread waits (checking every `WAIT_POLL_S` that its client is still
there). The thread turns the answer dict into the protobuf response, or an
error into etcd's gRPC status code and message (protocol/errors.py). A
handler that stops waiting marks its origin gone, so the loop drops its
request or answer. Serializable reads (local by etcd's definition) skip the
loop: the handler thread runs them through the core itself, reading the
store under a `StoreGate` so the loop never reopens (defragment) or closes
the store under a read. The loop's own reads and the handler threads' all
read the latest committed LMDB state, so revisions stay monotonic.

Services: KV, Lease, Maintenance and Cluster map each RPC onto the core
operation of the same meaning (Cluster's onto the `member_*` ops, Hash onto
`hash`, MoveLeader onto `move_leader`). Watch is a translator onto the
node's watch broadcaster (actors/grpc_watch.py); v3lock and v3election run
the recipes through a native client of this gateway, as etcd's servers do
through clientv3 (actors/grpc_recipes.py). Conversions between protobuf
and our dicts, and errors to gRPC statuses, are in actors/grpc_messages.py.

Streams: Snapshot is a stream of chunks pumped by the loop (at most
`SNAPSHOT_QUEUED_CHUNKS_MAX` waiting per stream, so a slow reader holds a
few MiB, not the whole snapshot), ending with the snapshot's SHA-256 as
etcd's; LeaseKeepAlive is one core request per keep-alive the client
sends, answered in order.

Threads and bounds: a handler thread has one request in flight at a time;
`WORKER_THREADS` threads serve at most `CONCURRENT_RPCS_MAX` RPCs at once
(grpcio refuses more with RESOURCE_EXHAUSTED). Long-lived calls each hold a
thread, so they are bounded apart (watch streams by `WATCH_STREAMS_MAX`,
waiting Lock / Campaign / Observe calls by `RECIPE_WAITS_MAX`, beyond which
they are refused with RESOURCE_EXHAUSTED) and the pool has room for them
beside `SHORT_CALL_THREADS` threads of short calls. A request larger than
`--max-request-bytes` plus etcd's 512 KiB of gRPC overhead is refused by
grpcio, and one larger than `--max-request-bytes` by the core, as etcd does.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import queue
import threading

import grpc
import zmq

from actors.config import parse_url
from actors.grpc_messages import abort, core_request, etcd_answer, to_message
from actors.grpc_recipes import RECIPE_WAITS_MAX, ElectionService, LockService, RecipeHandlers
from actors.grpc_watch import WATCH_STREAMS_MAX, WatchService
from actors.snapshot_file import SnapshotFile
from protocol.codec import STATUS_ERROR, STATUS_OK, STATUS_PARTIAL
from protocol.errors import QuorumError
from protocol.etcd.etcdserverpb import rpc_pb2 as pb, rpc_pb2_grpc as pb_grpc
from protocol.etcd.v3electionpb import v3election_pb2_grpc as epb_grpc
from protocol.etcd.v3lockpb import v3lock_pb2_grpc as lpb_grpc

# Threads for short calls, plus one for every long-lived stream or wait allowed.
SHORT_CALL_THREADS = 64
WORKER_THREADS = SHORT_CALL_THREADS + WATCH_STREAMS_MAX + RECIPE_WAITS_MAX
CONCURRENT_RPCS_MAX = 1024
# etcd's grpcOverheadBytes: room for gRPC framing on top of --max-request-bytes.
GRPC_OVERHEAD_BYTES = 512 * 1024
MAX_SEND_MESSAGE_BYTES = (1 << 31) - 1  # etcd's default (math.MaxInt32)
SNAPSHOT_QUEUED_CHUNKS_MAX = 4
SNAPSHOT_CHUNKS_PER_PUMP = 4
# How often a waiting handler thread checks that its client is still there.
WAIT_POLL_S = 0.5

def server_options(limits) -> list:
    """grpcio options of a gateway's server (tools/grpc_null_server.py uses the same)."""
    return [("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", limits.max_request_bytes + GRPC_OVERHEAD_BYTES),
            ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES)]


class GrpcOrigin:
    """The `origin` of a request that came in over gRPC: where its answers go.

    `answers` is read only by the handler thread that made the request; it
    sets `gone` when it stops listening (answered, client away, stopping),
    after which the loop drops what it would have handed over."""

    __slots__ = ("answers", "gone")

    def __init__(self):
        self.answers = queue.SimpleQueue()
        self.gone = False


class StoreGate:
    """Many handler threads reading the gateway's store, or the loop alone
    changing it (reopening it after a defragment, closing it).

    The lock is held only to count readers, never across a read, so readers
    do not wait for one another. A change waits for the reads under way
    (each one range of the local store) and holds new ones off until done."""

    def __init__(self):
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._readers = 0
        self._changing = False

    def enter(self) -> None:
        with self._lock:
            if self._changing:
                self._changed.wait_for(lambda: not self._changing)  # bounded: one reopen
            self._readers += 1

    def leave(self) -> None:
        with self._lock:
            self._readers -= 1
            if self._readers == 0 and self._changing:
                self._changed.notify_all()

    @contextlib.contextmanager
    def changing(self):
        with self._lock:
            self._changing = True
            self._changed.wait_for(lambda: self._readers == 0)  # bounded: each read is one range
        try:
            yield
        finally:
            with self._lock:
                self._changing = False
                self._changed.notify_all()


# ---- the front ---------------------------------------------------------------

class GrpcFront:
    """The gRPC server of one gateway process and its link to the gateway's loop."""

    def __init__(self, gateway, log):
        self.gateway = gateway
        self.log = log
        self.limits = gateway.limits
        self.endpoint = f"inproc://grpc-front-{os.getpid()}-{id(self)}"
        self.socket = gateway.context.socket(zmq.PULL)
        self.socket.setsockopt(zmq.RCVHWM, self.limits.socket_high_water_mark)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(self.endpoint)
        # Requests from handler threads for the loop (at most one per thread),
        # and whether the loop has been woken for them and not yet drained.
        self.intake: collections.deque = collections.deque()
        self.wake_pending = False
        self.thread_sockets = threading.local()
        self.snapshots: list[SnapshotFile] = []
        self.stopping = False
        self.server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="grpc"),
            maximum_concurrent_rpcs=CONCURRENT_RPCS_MAX, options=server_options(self.limits))
        pb_grpc.add_KVServicer_to_server(KVService(self), self.server)
        pb_grpc.add_LeaseServicer_to_server(LeaseService(self), self.server)
        pb_grpc.add_MaintenanceServicer_to_server(MaintenanceService(self), self.server)
        pb_grpc.add_WatchServicer_to_server(WatchService(self), self.server)
        pb_grpc.add_ClusterServicer_to_server(ClusterService(self), self.server)
        recipes = RecipeHandlers(self)
        lpb_grpc.add_LockServicer_to_server(LockService(recipes), self.server)
        epb_grpc.add_ElectionServicer_to_server(ElectionService(recipes), self.server)
        self.addresses = []
        for url in gateway.config.listen_client_urls:
            host, port = parse_url(url)
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            self.server.add_insecure_port(address)  # raises when the port cannot be bound
            self.addresses.append(address)

    def start(self) -> None:
        self.server.start()
        self.log.info("grpc listening", addresses=self.addresses)

    def stop(self) -> None:
        self.stopping = True
        self.server.stop(grace=1.0).wait(5.0)
        for stream in self.snapshots:
            stream.close()
        self.snapshots.clear()

    # ---- handler threads -------------------------------------------------

    def _push(self, origin: GrpcOrigin, op: str, body: dict, size_bytes: int) -> None:
        # The deque is the hand-off; the inproc message only wakes the loop,
        # once per batch: a thread that finds `wake_pending` set knows the
        # loop has yet to clear it, so it will drain after this append.
        self.intake.append((origin, op, body, size_bytes))
        if self.wake_pending:
            return
        self.wake_pending = True
        socket = getattr(self.thread_sockets, "socket", None)
        if socket is None:
            socket = self.gateway.context.socket(zmq.PUSH)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(self.endpoint)
            self.thread_sockets.socket = socket
        socket.send(b"")

    def open(self, op: str, body: dict, size_bytes: int) -> GrpcOrigin:
        origin = GrpcOrigin()
        if op == "range" and body.get("serializable") is True:
            # A serializable read is local (etcd: possibly stale): served
            # here from the store, not through the loop. The gate keeps the
            # loop from swapping the store (defragment) or closing it meanwhile.
            gate = self.gateway.store_gate
            gate.enter()
            try:
                if self.stopping:
                    raise QuorumError("Stopped")
                self.gateway.core.submit(origin, op, body, size_bytes)
            finally:
                gate.leave()
            return origin
        try:
            self._push(origin, op, body, size_bytes)
        except zmq.ZMQError:
            origin.gone = True
            raise QuorumError("Stopped")
        return origin

    def answers(self, op: str, body: dict, size_bytes: int, context):
        """(status, body) answers to one request, until the final one; a generator."""
        try:
            origin = self.open(op, body, size_bytes)
        except QuorumError as error:
            yield STATUS_ERROR, error.to_wire()
            return
        answers = origin.answers
        try:
            while True:  # bounded by the client's deadline or the core's answer
                try:
                    status, answer = answers.get(timeout=WAIT_POLL_S)
                except queue.Empty:
                    if not context.is_active() or self.stopping:
                        return
                    continue
                yield status, answer
                if status != STATUS_PARTIAL:
                    return
        finally:
            origin.gone = True

    def call(self, op: str, body: dict, size_bytes: int, context) -> dict:
        """One request, its one answer; an error aborts the RPC with etcd's status."""
        for status, answer in self.answers(op, body, size_bytes, context):
            if status == STATUS_ERROR:
                abort(context, QuorumError.from_wire(answer))
            return answer
        abort(context, QuorumError("Stopped") if self.stopping else QuorumError("Timeout"))

    # ---- the gateway's loop ------------------------------------------------

    def on_requests(self, _wake_ups: list) -> None:
        # Cleared before draining: a request appended after this point
        # either is drained below or sends a wake-up of its own.
        self.wake_pending = False
        intake = self.intake
        for _ in range(len(intake)):  # each handler thread has at most one request here
            origin, op, body, size_bytes = intake.popleft()
            if origin.gone:
                continue
            if op == "snapshot":
                self._start_snapshot(origin)
            else:
                self.gateway.core.submit(origin, op, body, size_bytes)
        self.gateway.flush()

    def deliver(self, origin: GrpcOrigin, status: int, body: dict) -> bool:
        """Hand an answer to the waiting handler thread; False when it has gone."""
        if origin.gone:
            return False
        origin.answers.put((status, body))
        return True

    def _start_snapshot(self, origin: GrpcOrigin) -> None:
        stream = SnapshotFile(self.gateway.store, self.gateway.config.data_dir, origin)
        self.snapshots.append(stream)
        self.log.info("grpc snapshot stream started", bytes=stream.size)

    def pump_snapshots(self) -> None:
        for stream in list(self.snapshots):
            answers = None if stream.origin.gone else stream.origin.answers
            finished = answers is None  # the handler thread has gone
            for _ in range(SNAPSHOT_CHUNKS_PER_PUMP if answers is not None else 0):
                if answers.qsize() >= SNAPSHOT_QUEUED_CHUNKS_MAX:
                    break  # the reader is behind: hold the rest in the file
                blob = stream.read_chunk(self.limits.snapshot_chunk_bytes)
                header = self.gateway.core.header(self.gateway.store.revision())
                answers.put((STATUS_PARTIAL, {"header": header, "blob": blob, "remaining_bytes": stream.remaining}))
                if stream.done:
                    # As etcd: the stream ends with the SHA-256 of the snapshot,
                    # which etcdctl looks for (and `snapshot restore` checks).
                    answers.put((STATUS_OK, {"header": header, "blob": stream.digest.digest(), "remaining_bytes": 0}))
                    finished = True
                    break
            if finished:
                stream.close()
                self.snapshots.remove(stream)


# ---- services: protobuf in, core request, protobuf out --------------------------

class _CoreCalls:
    """What the services share: an RPC that is one core request of the same meaning."""

    def __init__(self, front: GrpcFront):
        self.front = front

    def _unary(self, op: str, request, response_class, context):
        body = self.front.call(op, core_request(op, request), request.ByteSize(), context)
        return to_message(response_class, etcd_answer(op, body))


class KVService(_CoreCalls, pb_grpc.KVServicer):
    def Range(self, request, context):
        return self._unary("range", request, pb.RangeResponse, context)

    def Put(self, request, context):
        return self._unary("put", request, pb.PutResponse, context)

    def DeleteRange(self, request, context):
        return self._unary("delete_range", request, pb.DeleteRangeResponse, context)

    def Txn(self, request, context):
        return self._unary("txn", request, pb.TxnResponse, context)

    def Compact(self, request, context):
        return self._unary("compaction", request, pb.CompactionResponse, context)


class LeaseService(_CoreCalls, pb_grpc.LeaseServicer):
    def LeaseGrant(self, request, context):
        return self._unary("lease_grant", request, pb.LeaseGrantResponse, context)

    def LeaseRevoke(self, request, context):
        return self._unary("lease_revoke", request, pb.LeaseRevokeResponse, context)

    def LeaseTimeToLive(self, request, context):
        return self._unary("lease_time_to_live", request, pb.LeaseTimeToLiveResponse, context)

    def LeaseLeases(self, request, context):
        return self._unary("lease_leases", request, pb.LeaseLeasesResponse, context)

    def LeaseKeepAlive(self, request_iterator, context):
        # etcd's stream: one response per keep-alive request, in order.
        for request in request_iterator:  # bounded by the client's stream
            yield self._unary("lease_keep_alive", request, pb.LeaseKeepAliveResponse, context)


class MaintenanceService(_CoreCalls, pb_grpc.MaintenanceServicer):
    def Status(self, request, context):
        return self._unary("status", request, pb.StatusResponse, context)

    def HashKV(self, request, context):
        return self._unary("hash_kv", request, pb.HashKVResponse, context)

    def Defragment(self, request, context):
        return self._unary("defragment", request, pb.DefragmentResponse, context)

    def Alarm(self, request, context):
        return self._unary("alarm", request, pb.AlarmResponse, context)

    def Hash(self, request, context):
        return self._unary("hash", request, pb.HashResponse, context)

    def MoveLeader(self, request, context):
        return self._unary("move_leader", request, pb.MoveLeaderResponse, context)

    def Snapshot(self, request, context):
        for status, body in self.front.answers("snapshot", {}, 0, context):
            if status == STATUS_ERROR:
                abort(context, QuorumError.from_wire(body))
            yield to_message(pb.SnapshotResponse, body)


class ClusterService(_CoreCalls, pb_grpc.ClusterServicer):
    """Membership: each call is the native op of the same name (etcd's fields as they are)."""

    def MemberAdd(self, request, context):
        return self._unary("member_add", request, pb.MemberAddResponse, context)

    def MemberRemove(self, request, context):
        return self._unary("member_remove", request, pb.MemberRemoveResponse, context)

    def MemberUpdate(self, request, context):
        return self._unary("member_update", request, pb.MemberUpdateResponse, context)

    def MemberList(self, request, context):
        return self._unary("member_list", request, pb.MemberListResponse, context)

    def MemberPromote(self, request, context):
        return self._unary("member_promote", request, pb.MemberPromoteResponse, context)
