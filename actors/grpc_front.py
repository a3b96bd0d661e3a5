"""etcd's v3 gRPC API: a second skin over the gateway's request-handling core.

How this works: each gateway process runs a grpcio server (a thread pool)
on `--listen-client-urls`, with SO_REUSEPORT so every gateway of the node
serves the same port and the kernel spreads connections over them. A gRPC
handler thread does no KV or lease logic: it turns the protobuf request into
our request dict (the field names are etcd's, so this is mostly a copy), packs
it with a token and pushes it over an inproc ZeroMQ socket to the gateway's
single-threaded loop, then waits on a queue of its own for the answer. The
loop hands the request to `GatewayCore.submit` with a `GrpcOrigin`; the
gateway's `emit` gives answers for such origins to `deliver`, which puts them
on the waiting thread's queue. The thread turns the answer dict into the
protobuf response, or an error into etcd's gRPC status code and message
(protocol/errors.py).

Streams: Snapshot is a stream of chunks pumped by the loop (at most
`SNAPSHOT_QUEUED_CHUNKS_MAX` waiting per stream, so a slow reader holds a
few MiB, not the whole snapshot), ending with the snapshot's SHA-256 as etcd's; LeaseKeepAlive is one core request per
keep-alive the client sends, answered in order.

Threads and bounds: a handler thread has one request in flight at a time;
`WORKER_THREADS` threads serve at most `CONCURRENT_RPCS_MAX` RPCs at once
(grpcio refuses more with RESOURCE_EXHAUSTED); a request larger than
`--max-request-bytes` plus etcd's 512 KiB of gRPC overhead is refused by
grpcio, and one larger than `--max-request-bytes` by the core, as etcd does.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import queue
import re
import threading

import grpc
import zmq

from actors import ipc
from actors.config import parse_url
from actors.snapshot_file import SnapshotFile
from protocol import codec
from protocol.codec import STATUS_ERROR, STATUS_OK, STATUS_PARTIAL
from protocol.errors import QuorumError
from protocol.etcd.etcdserverpb import rpc_pb2 as pb, rpc_pb2_grpc as pb_grpc

WORKER_THREADS = 64
CONCURRENT_RPCS_MAX = 1024
# etcd's grpcOverheadBytes: room for gRPC framing on top of --max-request-bytes.
GRPC_OVERHEAD_BYTES = 512 * 1024
MAX_SEND_MESSAGE_BYTES = (1 << 31) - 1  # etcd's default (math.MaxInt32)
SNAPSHOT_QUEUED_CHUNKS_MAX = 4
SNAPSHOT_CHUNKS_PER_PUMP = 4
# How often a waiting handler thread checks that its client is still there.
WAIT_POLL_S = 0.5

_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


class GrpcOrigin:
    """The `origin` of a request that came in over gRPC: its waiting queue's token."""

    __slots__ = ("token",)

    def __init__(self, token: int):
        self.token = token


# ---- protobuf <-> request/response dicts ------------------------------------

def to_body(message) -> dict:
    """A protobuf request as our request dict (unset fields left to the schema's defaults)."""
    body = {}
    for field, value in message.ListFields():
        if field.type == field.TYPE_MESSAGE:
            value = [to_body(item) for item in value] if field.is_repeated else to_body(value)
        elif field.is_repeated:
            value = list(value)
        body[field.name] = value
    return body


_FIELD_MAPS: dict = {}


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def _field_map(descriptor) -> dict:
    """Our dict key -> protobuf field, for one message type (etcd's name and its snake_case)."""
    fields = _FIELD_MAPS.get(descriptor)
    if fields is None:
        fields = {}
        for field in descriptor.fields:
            fields[_snake(field.name)] = field
        for field in descriptor.fields:
            fields[field.name] = field
        _FIELD_MAPS[descriptor] = fields
    return fields


def _message_fields(descriptor, body: dict) -> dict:
    """Keyword arguments for a message: etcd's names, nested messages as dicts, no None."""
    fields = _field_map(descriptor)
    out = {}
    for name, value in body.items():
        field = fields.get(name)
        if field is None or value is None:
            continue  # fields of quorumkv's own, or an absent optional message
        if field.type == field.TYPE_MESSAGE and field.message_type.name != "KeyValue":
            if field.is_repeated:
                value = [_message_fields(field.message_type, item) for item in value]
            else:
                value = _message_fields(field.message_type, value)
        out[field.name] = value
    return out


def to_message(message_class, body: dict):
    return message_class(**_message_fields(message_class.DESCRIPTOR, body))


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
        self.tokens = itertools.count(1)
        self.waiting: dict[int, queue.Queue] = {}
        self.thread_sockets = threading.local()
        self.snapshots: list[SnapshotFile] = []
        self.stopping = False
        self.server = grpc.server(
            concurrent.futures.ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="grpc"),
            maximum_concurrent_rpcs=CONCURRENT_RPCS_MAX,
            options=[("grpc.so_reuseport", 1),
                     ("grpc.max_receive_message_length", self.limits.max_request_bytes + GRPC_OVERHEAD_BYTES),
                     ("grpc.max_send_message_length", MAX_SEND_MESSAGE_BYTES)])
        pb_grpc.add_KVServicer_to_server(KVService(self), self.server)
        pb_grpc.add_LeaseServicer_to_server(LeaseService(self), self.server)
        pb_grpc.add_MaintenanceServicer_to_server(MaintenanceService(self), self.server)
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

    def _push(self, token: int, op: str, body: dict, size_bytes: int) -> None:
        socket = getattr(self.thread_sockets, "socket", None)
        if socket is None:
            socket = self.gateway.context.socket(zmq.PUSH)
            socket.setsockopt(zmq.LINGER, 0)
            socket.connect(self.endpoint)
            self.thread_sockets.socket = socket
        socket.send(codec.pack([token, op, body, size_bytes]))

    def open(self, op: str, body: dict, size_bytes: int) -> tuple[int, queue.Queue]:
        token = next(self.tokens)
        answers: queue.Queue = queue.Queue()
        self.waiting[token] = answers
        try:
            self._push(token, op, body, size_bytes)
        except zmq.ZMQError:
            self.waiting.pop(token, None)
            raise QuorumError("Stopped")
        return token, answers

    def answers(self, op: str, body: dict, size_bytes: int, context):
        """(status, body) answers to one request, until the final one; a generator."""
        try:
            token, answers = self.open(op, body, size_bytes)
        except QuorumError as error:
            yield STATUS_ERROR, error.to_wire()
            return
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
            self.waiting.pop(token, None)

    def call(self, op: str, body: dict, size_bytes: int, context) -> dict:
        """One request, its one answer; an error aborts the RPC with etcd's status."""
        for status, answer in self.answers(op, body, size_bytes, context):
            if status == STATUS_ERROR:
                abort(context, QuorumError.from_wire(answer))
            return answer
        abort(context, QuorumError("Stopped") if self.stopping else QuorumError("Timeout"))

    # ---- the gateway's loop ------------------------------------------------

    def on_requests(self, batch: list) -> None:
        for frame in batch:
            token, op, body, size_bytes = codec.unpack(frame)
            origin = GrpcOrigin(token)
            if op == "snapshot":
                self._start_snapshot(origin)
            else:
                self.gateway.core.submit(origin, op, body, size_bytes)
        self.gateway.flush()

    def deliver(self, origin: GrpcOrigin, status: int, body: dict) -> bool:
        """Hand an answer to the waiting handler thread; False when it has gone."""
        answers = self.waiting.get(origin.token)
        if answers is None:
            return False
        answers.put((status, body))
        return True

    def _start_snapshot(self, origin: GrpcOrigin) -> None:
        if origin.token not in self.waiting:
            return
        stream = SnapshotFile(self.gateway.store, self.gateway.config.data_dir, origin)
        self.snapshots.append(stream)
        self.log.info("grpc snapshot stream started", bytes=stream.size)

    def pump_snapshots(self) -> None:
        for stream in list(self.snapshots):
            answers = self.waiting.get(stream.origin.token)
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


def abort(context, error: QuorumError):
    context.abort(_STATUS_CODES.get(error.grpc_status, grpc.StatusCode.UNKNOWN), error.message)


# ---- services: protobuf in, core request, protobuf out --------------------------

class KVService(pb_grpc.KVServicer):
    def __init__(self, front: GrpcFront):
        self.front = front

    def _unary(self, op: str, request, response_class, context):
        body = self.front.call(op, to_body(request), request.ByteSize(), context)
        return to_message(response_class, body)

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


class LeaseService(pb_grpc.LeaseServicer):
    def __init__(self, front: GrpcFront):
        self.front = front

    def _unary(self, op: str, request, response_class, context):
        body = self.front.call(op, to_body(request), request.ByteSize(), context)
        return to_message(response_class, body)

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


class MaintenanceService(pb_grpc.MaintenanceServicer):
    def __init__(self, front: GrpcFront):
        self.front = front

    def _unary(self, op: str, body: dict, response_class, context):
        return to_message(response_class, self.front.call(op, body, 0, context))

    def Status(self, request, context):
        return self._unary("status", {}, pb.StatusResponse, context)

    def HashKV(self, request, context):
        return self._unary("hash_kv", to_body(request), pb.HashKVResponse, context)

    def Defragment(self, request, context):
        return self._unary("defragment", {}, pb.DefragmentResponse, context)

    def Alarm(self, request, context):
        body = to_body(request)
        if "memberID" in body:
            body["member_id"] = body.pop("memberID")
        return self._unary("alarm", body, pb.AlarmResponse, context)

    def Snapshot(self, request, context):
        for status, body in self.front.answers("snapshot", {}, 0, context):
            if status == STATUS_ERROR:
                abort(context, QuorumError.from_wire(body))
            yield to_message(pb.SnapshotResponse, body)
