"""etcd's Watch service over gRPC: a translator onto the node's watch broadcaster.

How this works: one gRPC Watch stream is one stream of the watch
broadcaster (protocol/PROTOCOL.md, "Watch streams"): the handler thread
connects a DEALER of its own (a random routing id) to the broadcaster's
endpoint and turns each WatchRequest into the broadcaster's operation
(create -> `watch_create`, cancel -> `watch_cancel`, progress ->
`watch_progress`) and each broadcaster response back into a WatchResponse.
Every watch rule (ids, start revisions, filters, prev_kv, fragments,
progress, compaction) is the broadcaster's; `WatchTranslator`, which holds
the mapping, only decides which answers a gRPC client gets to see:

- a create's responses pass through: first `created`, then events,
  progress notifications, and a last `canceled` one (also with
  `compact_revision` when its history was compacted away); a create the
  broadcaster refuses is answered `created` + `canceled` with watch id -1
  and the reason, as etcd's server does;
- a cancel's own answer is dropped: the watch's last response (canceled)
  is etcd's answer to a cancel, and an unknown id gets none, as in etcd;
- progress answers (watch id -1) pass through; on a stream without watches
  (or whose last ones are being canceled), where the broadcaster answers
  none, the answer is the broadcaster's revision at once, as etcd 3.4's;
- an empty key becomes "\\x00" (etcd's smallest key), as etcd's server does.

grpcio gives a streaming handler its requests as a blocking iterator, so a
reader thread per stream takes them and hands them over an inproc PAIR to
the handler thread, which owns the DEALER and polls both. Back-pressure: the
handler thread reads from the broadcaster only when grpcio has sent what it
yielded (a slow gRPC reader stops it), the DEALER queues at most
`WATCH_RECEIVE_FRAMES_MAX` frames, and then the broadcaster holds the
stream's watches and catches them up from the store later; requests wait in
a queue of `WATCH_REQUESTS_QUEUED_MAX`. Memory per stream is bounded.

Liveness: the handler pings the broadcaster when nothing came for a second.
When the broadcaster restarted (another `stream_epoch`, or a ping answered
before a create sent earlier: the create went to the old one) or forgot the
stream (its ping answer lacks a live watch), or sends nothing for
`WATCH_PING_TIMEOUT_S` (time the handler spends handing responses to a
slow gRPC reader does not count), the RPC ends with UNAVAILABLE: etcd's
clients then watch again from their last revision + 1, as after a server
restart.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
import time

import grpc
import zmq

from actors import ipc, sockets
from actors.grpc_messages import to_message
from protocol import codec
from protocol.codec import STATUS_ERROR, STATUS_OK
from protocol.errors import QuorumError
from protocol.etcd.etcdserverpb import rpc_pb2 as pb, rpc_pb2_grpc as pb_grpc
from protocol.watch import DEFAULT_PING_INTERVAL_S, DEFAULT_PING_TIMEOUT_S

# Long-lived streams hold a handler thread each: at most this many per gateway.
WATCH_STREAMS_MAX = 64
WATCH_RECEIVE_FRAMES_MAX = 8
WATCH_REQUESTS_QUEUED_MAX = 64
WATCH_FRAMES_PER_PASS = 8
# The native watch client's liveness rule (protocol/watch.py), kept the same here.
WATCH_PING_INTERVAL_S = DEFAULT_PING_INTERVAL_S
WATCH_PING_TIMEOUT_S = DEFAULT_PING_TIMEOUT_S
# How long a new stream waits for the broadcaster to announce its endpoint.
BROADCASTER_WAIT_S = 5.0
BROADCASTER_WAIT_STEP_S = 0.1
# The longest a handler thread waits before looking whether its RPC is still on.
POLL_MAX_S = 0.5
# etcd's watch id for a response that is about no one watch (refused create, progress).
NO_WATCH_ID = -1
CANCEL_REASON_EMPTY_RANGE = "mvcc: watcher range is empty"
# Requests answered by a `watch_ping` of their own (see take_request).
PING_KINDS = ("watch_ping", "refused", "progress_alone")
# Progress requests a stream may have unanswered before the oldest is forgotten.
PROGRESS_WAITING_MAX = 64


_stream_numbers = itertools.count(1)


class BroadcasterLostError(Exception):
    """The broadcaster restarted or forgot this stream: its watches are gone."""


# ---- the translation (no I/O) ------------------------------------------------

class WatchTranslator:
    """WatchRequests -> broadcaster requests; broadcaster answers -> WatchResponse dicts."""

    def __init__(self, fallback_header: dict):
        self.ids = itertools.count(1)
        self.kinds: dict[int, str] = {}  # request id -> op, until its final answer
        self.live: set[int] = set()  # watch ids the gRPC client was told are created
        self.canceling: set[int] = set()  # live watch ids with a cancel sent
        self.epoch: int | None = None
        self.header = dict(fallback_header)
        self.ping_id: int | None = None
        # Creates refused without the broadcaster: ping request id -> the answer it stands for.
        self.refusals: dict[int, dict] = {}
        self.progress_ids: collections.deque[int] = collections.deque()
        # Creates sent and not answered yet. The broadcaster answers a create at
        # once and a stream's requests in order, so a later ping answered first
        # means the create went to a broadcaster that is gone.
        self.unanswered_creates: set[int] = set()

    def take_request(self, request: pb.WatchRequest) -> list | None:
        """[request_id, op, body] for the broadcaster, or None for a request etcd ignores."""
        kind = request.WhichOneof("request_union")
        if kind == "create_request":
            create = request.create_request
            body = {"key": create.key or b"\x00", "range_end": create.range_end,
                    "start_revision": create.start_revision, "progress_notify": create.progress_notify,
                    "filters": list(create.filters), "prev_kv": create.prev_kv, "watch_id": create.watch_id,
                    "fragment": create.fragment}
            op = "watch_create"
            if body["range_end"] not in (b"", b"\x00") and body["key"] >= body["range_end"]:
                # etcd's server refuses it before any watch exists (mvcc.ErrEmptyWatcherRange).
                # The refusal must come after the answers to earlier creates (clients match
                # them in order): a ping stands in its place in the stream.
                request_id = next(self.ids)
                self.kinds[request_id] = "refused"
                self.refusals[request_id] = {"watch_id": NO_WATCH_ID, "created": True, "canceled": True,
                                             "cancel_reason": CANCEL_REASON_EMPTY_RANGE}
                return [request_id, "watch_ping", {}]
        elif kind == "cancel_request":
            op, body = "watch_cancel", {"watch_id": request.cancel_request.watch_id}
            if body["watch_id"] in self.live:
                self.canceling.add(body["watch_id"])
        elif kind == "progress_request":
            if self.live <= self.canceling and not self.unanswered_creates:
                # No watch on the stream once the broadcaster reads this (canceled ones
                # included): it answers no progress there, etcd 3.4 answers at once
                # with its revision; a ping's answer (in order) carries it.
                request_id = next(self.ids)
                self.kinds[request_id] = "progress_alone"
                return [request_id, "watch_ping", {}]
            op, body = "watch_progress", {}
        else:
            return None
        request_id = next(self.ids)
        self.kinds[request_id] = op
        if op == "watch_create":
            self.unanswered_creates.add(request_id)
        if op == "watch_progress":
            self.progress_ids.append(request_id)
            if len(self.progress_ids) > PROGRESS_WAITING_MAX:
                # The broadcaster drops waiting progress requests when the stream's last
                # watch goes; forget the oldest rather than hold their ids for ever.
                self.kinds.pop(self.progress_ids.popleft(), None)
        return [request_id, op, body]

    def take_ping(self) -> list:
        self.ping_id = next(self.ids)
        self.kinds[self.ping_id] = "watch_ping"
        return [self.ping_id, "watch_ping", {}]

    def on_response(self, request_id, status: int, body) -> list[dict]:
        """The WatchResponse dicts a gRPC client gets for one broadcaster answer."""
        op = self.kinds.get(request_id)
        if op is None or not isinstance(body, dict):
            return []  # a frame-level answer or a late one: nothing the client asked about
        if status != codec.STATUS_PARTIAL:
            del self.kinds[request_id]
        self._check_epoch(body)
        self.unanswered_creates.discard(request_id)
        if op in PING_KINDS and self.unanswered_creates and min(self.unanswered_creates) < request_id:
            raise BroadcasterLostError("the watch broadcaster lost a create (it restarted)")
        if isinstance(body.get("header"), dict):
            self.header = body["header"]
        if op == "watch_create":
            return [self._on_create_answer(status, body)]
        if op == "progress_alone":
            return [{"header": self.header, "watch_id": NO_WATCH_ID}]
        if op == "refused":
            return [dict(self.refusals.pop(request_id), header=self.header)]
        if op == "watch_progress" and status == STATUS_OK:
            return [body]
        if op == "watch_ping":
            self.ping_id = None
            if status == STATUS_OK and not self.live <= set(body.get("watch_ids") or ()):
                raise BroadcasterLostError("the watch broadcaster forgot this stream")
        return []  # cancel answers (the watch's own last response says it), failed progress

    def _check_epoch(self, body: dict) -> None:
        epoch = body.get("stream_epoch")
        if epoch is None:
            return
        if self.epoch is None:
            self.epoch = epoch
        elif epoch != self.epoch:
            raise BroadcasterLostError("the watch broadcaster restarted")

    def _on_create_answer(self, status: int, body: dict) -> dict:
        if status == STATUS_ERROR:
            error = QuorumError.from_wire(body)
            return {"header": self.header, "watch_id": NO_WATCH_ID, "created": True, "canceled": True,
                    "cancel_reason": error.message}
        if body.get("created") and body.get("canceled"):
            # A refused create (a duplicate id): etcd answers it with id -1.
            return dict(body, watch_id=NO_WATCH_ID)
        if body.get("created"):
            self.live.add(body["watch_id"])
        if body.get("canceled"):
            self.live.discard(body["watch_id"])
            self.canceling.discard(body["watch_id"])
            if body.get("compact_revision"):
                # etcd 3.4 cancels for compaction with compact_revision alone: no
                # cancel_reason and a header without a revision.
                body = {key: value for key, value in body.items() if key != "cancel_reason"}
                body["header"] = {**(body.get("header") or {}), "revision": 0}
        return body


# ---- the service ---------------------------------------------------------------

class WatchService(pb_grpc.WatchServicer):
    def __init__(self, front):
        self.front = front
        self.slots = threading.BoundedSemaphore(WATCH_STREAMS_MAX)

    def Watch(self, request_iterator, context):
        if not self.slots.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"etcdserver: too many requests: at most {WATCH_STREAMS_MAX} watch streams per gateway")
        release = _once(self.slots.release)
        # The slot is free as soon as the RPC ends, before the handler notices (within POLL_MAX_S).
        context.add_callback(release)
        try:
            yield from WatchStream(self.front, context).serve(request_iterator)
        finally:
            release()


class WatchStream:
    """One gRPC Watch stream and its broadcaster stream, served from one handler thread."""

    def __init__(self, front, context):
        self.front = front
        self.context = context
        gateway = front.gateway
        self.zmq_context = gateway.context
        self.translator = WatchTranslator({"cluster_id": gateway.core.cluster_id,
                                           "member_id": gateway.core.member_id})
        self.closed = threading.Event()
        # Unique for the process's life: ZeroMQ frees an inproc address some time
        # after close (in its reaper thread), and a new stream often gets the id()
        # of the one just gone.
        self.requests_address = f"inproc://grpc-watch-{os.getpid()}-{next(_stream_numbers)}"

    def serve(self, request_iterator):
        endpoint = self._broadcaster_endpoint()
        dealer = self.zmq_context.socket(zmq.DEALER)
        requests = self.zmq_context.socket(zmq.PAIR)
        try:
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.setsockopt(zmq.ROUTING_ID, os.urandom(16))
            dealer.setsockopt(zmq.RCVHWM, WATCH_RECEIVE_FRAMES_MAX)
            dealer.connect(endpoint)
            requests.setsockopt(zmq.LINGER, 0)
            requests.setsockopt(zmq.RCVHWM, WATCH_REQUESTS_QUEUED_MAX)
            requests.bind(self.requests_address)
            reader = threading.Thread(target=self._read_requests, args=(request_iterator,),
                                      name="grpc-watch-reader", daemon=True)
            reader.start()
            yield from self._pump(dealer, requests)
        except BroadcasterLostError as error:
            self.context.abort(grpc.StatusCode.UNAVAILABLE, f"etcdserver: {error}; watch again")
        finally:
            self.closed.set()
            dealer.close(linger=0)
            requests.close(linger=0)

    def _broadcaster_endpoint(self) -> str:
        path = ipc.watch_endpoint_file(self.front.gateway.config.data_dir)
        deadline = time.monotonic() + BROADCASTER_WAIT_S
        while True:  # bounded by the deadline
            endpoint = sockets.read_endpoint(path)
            if endpoint:
                return sockets.dialable(endpoint)
            if time.monotonic() >= deadline or not self.context.is_active():
                self.context.abort(grpc.StatusCode.UNAVAILABLE, "etcdserver: the watch broadcaster is not up")
            time.sleep(BROADCASTER_WAIT_STEP_S)

    def _read_requests(self, request_iterator) -> None:
        """The reader thread: the client's requests, serialized, to the handler thread."""
        socket = self.zmq_context.socket(zmq.PAIR)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDHWM, WATCH_REQUESTS_QUEUED_MAX)
        socket.setsockopt(zmq.SNDTIMEO, int(POLL_MAX_S * 1000))
        socket.connect(self.requests_address)
        try:
            for request in request_iterator:  # bounded by the client's stream
                data = request.SerializeToString()
                while not self.closed.is_set():
                    try:
                        socket.send(data)
                        break
                    except zmq.Again:
                        continue  # the handler is behind: the client waits (back-pressure)
                if self.closed.is_set():
                    return
        except Exception:  # the RPC ended (grpcio raises from the iterator); nothing to tell
            return
        finally:
            socket.close(linger=0)
        # A client that half-closes keeps receiving (as etcd).

    def _pump(self, dealer: zmq.Socket, requests: zmq.Socket):
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(requests, zmq.POLLIN)
        last_heard = ping_sent_at = time.monotonic()
        while self.context.is_active() and not self.front.stopping:  # the stream's life
            ready = dict(poller.poll(int(POLL_MAX_S * 1000)))
            if requests in ready:
                self._forward_requests(dealer, requests)
            if dealer in ready:
                for _ in range(WATCH_FRAMES_PER_PASS):
                    try:
                        frame = dealer.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    for request_id, status, body in codec.decode_response_frame(frame):
                        for response in self.translator.on_response(request_id, status, body):
                            yield to_watch_response(response)
                    # Taken after the yields: a slow gRPC reader holds this thread in them
                    # for as long as it likes, and that time is no silence of the broadcaster's
                    # (a ping's answer waits behind the frames it sent before it).
                    last_heard = time.monotonic()
            now = time.monotonic()
            if self.translator.ping_id is not None:
                if now - max(ping_sent_at, last_heard) > WATCH_PING_TIMEOUT_S:
                    raise BroadcasterLostError("the watch broadcaster does not answer")
            elif now - last_heard >= WATCH_PING_INTERVAL_S:
                ping_sent_at = now
                _send(dealer, codec.encode_request_frame([self.translator.take_ping()]))

    def _forward_requests(self, dealer: zmq.Socket, requests: zmq.Socket) -> None:
        batch = []
        for _ in range(WATCH_REQUESTS_QUEUED_MAX):
            try:
                data = requests.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            item = self.translator.take_request(pb.WatchRequest.FromString(data))
            if item is not None:
                batch.append(item)
        if batch:
            _send(dealer, codec.encode_request_frame(batch))


def _send(dealer: zmq.Socket, frame: bytes) -> None:
    # The DEALER queues requests while the broadcaster is unreachable; never block on
    # a full queue (the handler would stop noticing that its RPC ended).
    try:
        dealer.send(frame, zmq.NOBLOCK)
    except zmq.Again:
        raise BroadcasterLostError("the watch broadcaster is not taking requests") from None


def _once(function):
    """`function`, callable from any thread, run at most once."""
    lock = threading.Lock()
    done = []

    def call():
        with lock:
            if done:
                return
            done.append(True)
        function()
    return call


def to_watch_response(body: dict) -> pb.WatchResponse:
    return to_message(pb.WatchResponse, body)
