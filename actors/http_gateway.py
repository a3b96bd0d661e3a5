"""etcd's JSON gateway (grpc-gateway, `/v3/...` over HTTP/1.1): a third skin over the gateway core.

How this works: when `--listen-client-http-urls` is given, each gateway
process runs a threaded HTTP server on it (SO_REUSEPORT, so every gateway of
the node serves the same port, as the gRPC port does). A handler thread does
no KV or lease logic and has no request plumbing of its own: it parses the
JSON body into etcd's protobuf request with protobuf's JSON rules (the ones
grpc-gateway follows: bytes base64, 64-bit integers as strings or numbers,
enums by name or number, unknown fields ignored), turns it into our request
dict with the gRPC front end's `to_body`, and sends it through the gRPC
front end's inproc channel into the gateway loop (`GrpcFront.answers`), so
a JSON request takes exactly the path a gRPC one does. The answer goes back
through `to_message` into the protobuf response and out as JSON with the
.proto's field names, 64-bit integers as strings, enums by name and default
values left out, as etcd 3.4's gateway (grpc-gateway v1, `OrigName: true`).
Errors are grpc-gateway's: the HTTP status for the gRPC code and
{"error": msg, "message": msg, "code": grpc_code}.

Streams: `/v3/watch` reads every WatchRequest object in the body (JSON
objects one after another), creates each watch on the node's watch
broadcaster through the native watch client (`protocol.watch.Watcher`, which
survives broadcaster restarts) and writes each WatchResponse as a line
{"result": {...}} of a chunked response until the client goes away or the
server stops; watch ids are per stream, from 0, as etcd's. `/v3/lease/keepalive`
answers each LeaseKeepAliveRequest in the body with a line, then ends.

Bounds: at most `CONNECTIONS_MAX` connections per gateway process (more are
answered 503 and closed); a body above `--max-request-bytes` (as base64 JSON,
plus `JSON_OVERHEAD_BYTES`) is refused before it is read; at most
`WATCHES_PER_STREAM_MAX` watches per watch stream; a connection idle (or a
reader stalled) for `IDLE_TIMEOUT_S` is closed.
"""

from __future__ import annotations

import http
import http.server
import json
import select
import socket
import threading
import time

from google.protobuf import json_format

from actors.config import parse_url
from actors.gateway_core import SERVER_VERSION
from actors.grpc_front import GRPC_OVERHEAD_BYTES
from actors.grpc_messages import core_request, etcd_answer, to_body, to_message
from protocol import errors
from protocol.client import CompactedError
from protocol.codec import STATUS_ERROR, STATUS_PARTIAL
from protocol.errors import QuorumError
from protocol.etcd.etcdserverpb import rpc_pb2 as pb
from protocol.watch import Watcher, WatchCanceledError

CONNECTIONS_MAX = 256
REFUSED_DRAIN_BYTES = 64 * 1024
IDLE_TIMEOUT_S = 60.0
# A JSON body carries bytes as base64 (4/3 larger) and field names and quotes
# around them; room for that on top of --max-request-bytes.
JSON_OVERHEAD_BYTES = GRPC_OVERHEAD_BYTES
WATCHES_PER_STREAM_MAX = 64
# A unary request waits at most this long (the core itself fails writes
# unanswered for 7.5 to 15 s with Timeout).
REQUEST_TIMEOUT_S = 30.0
# etcd's /health: the linearizable read it does must answer within a second.
HEALTH_TIMEOUT_S = 1.0
# How often a watch stream looks for a gone client while no event comes.
WATCH_POLL_S = 0.5
# How long stop() waits for watch streams to close.
STOP_WAIT_S = 2.0

# grpc-gateway v1's HTTPStatusFromCode.
HTTP_STATUS_FOR_GRPC_CODE = {
    errors.OK: 200, errors.CANCELLED: 408, errors.UNKNOWN: 500, errors.INVALID_ARGUMENT: 400,
    errors.DEADLINE_EXCEEDED: 504, errors.NOT_FOUND: 404, errors.ALREADY_EXISTS: 409,
    errors.PERMISSION_DENIED: 403, errors.RESOURCE_EXHAUSTED: 429, errors.FAILED_PRECONDITION: 412,
    errors.ABORTED: 409, errors.OUT_OF_RANGE: 400, errors.UNIMPLEMENTED: 501, errors.INTERNAL: 500,
    errors.UNAVAILABLE: 503, errors.DATA_LOSS: 500, 16: 401,  # 16 = UNAUTHENTICATED
}
# /version: the etcd version whose API we serve, plain (clients such as etcd3gw
# parse it as integers to pick the API path), and the cluster's (major.minor.0).
ETCD_VERSION = SERVER_VERSION.split("-", 1)[0]
CLUSTER_VERSION = ".".join(ETCD_VERSION.split(".")[:2]) + ".0"
AUTH_NOT_ENABLED = (errors.FAILED_PRECONDITION, "etcdserver: authentication is not enabled")

# path -> (core op, etcd request message, etcd response message, stream?)
UNARY, STREAM = False, True
ROUTES = {
    "/v3/kv/range": ("range", pb.RangeRequest, pb.RangeResponse, UNARY),
    "/v3/kv/put": ("put", pb.PutRequest, pb.PutResponse, UNARY),
    "/v3/kv/deleterange": ("delete_range", pb.DeleteRangeRequest, pb.DeleteRangeResponse, UNARY),
    "/v3/kv/txn": ("txn", pb.TxnRequest, pb.TxnResponse, UNARY),
    "/v3/kv/compaction": ("compaction", pb.CompactionRequest, pb.CompactionResponse, UNARY),
    "/v3/lease/grant": ("lease_grant", pb.LeaseGrantRequest, pb.LeaseGrantResponse, UNARY),
    "/v3/lease/revoke": ("lease_revoke", pb.LeaseRevokeRequest, pb.LeaseRevokeResponse, UNARY),
    "/v3/kv/lease/revoke": ("lease_revoke", pb.LeaseRevokeRequest, pb.LeaseRevokeResponse, UNARY),
    "/v3/lease/timetolive": ("lease_time_to_live", pb.LeaseTimeToLiveRequest, pb.LeaseTimeToLiveResponse, UNARY),
    "/v3/kv/lease/timetolive": ("lease_time_to_live", pb.LeaseTimeToLiveRequest, pb.LeaseTimeToLiveResponse,
                                UNARY),
    "/v3/lease/leases": ("lease_leases", pb.LeaseLeasesRequest, pb.LeaseLeasesResponse, UNARY),
    "/v3/kv/lease/leases": ("lease_leases", pb.LeaseLeasesRequest, pb.LeaseLeasesResponse, UNARY),
    "/v3/lease/keepalive": ("lease_keep_alive", pb.LeaseKeepAliveRequest, pb.LeaseKeepAliveResponse, STREAM),
    "/v3/maintenance/status": ("status", pb.StatusRequest, pb.StatusResponse, UNARY),
    "/v3/maintenance/alarm": ("alarm", pb.AlarmRequest, pb.AlarmResponse, UNARY),
    "/v3/maintenance/defragment": ("defragment", pb.DefragmentRequest, pb.DefragmentResponse, UNARY),
    # The same core operations as the gRPC Maintenance and Cluster services
    # (a core without one answers Unimplemented, HTTP 501).
    "/v3/maintenance/hash": ("hash", pb.HashRequest, pb.HashResponse, UNARY),
    "/v3/maintenance/transfer-leadership": ("move_leader", pb.MoveLeaderRequest, pb.MoveLeaderResponse, UNARY),
    "/v3/cluster/member/list": ("member_list", pb.MemberListRequest, pb.MemberListResponse, UNARY),
    "/v3/cluster/member/add": ("member_add", pb.MemberAddRequest, pb.MemberAddResponse, UNARY),
    "/v3/cluster/member/remove": ("member_remove", pb.MemberRemoveRequest, pb.MemberRemoveResponse, UNARY),
    "/v3/cluster/member/update": ("member_update", pb.MemberUpdateRequest, pb.MemberUpdateResponse, UNARY),
    "/v3/cluster/member/promote": ("member_promote", pb.MemberPromoteRequest, pb.MemberPromoteResponse, UNARY),
}
# etcd serves these; quorumkv's JSON gateway does not (a stream of snapshot chunks).
UNIMPLEMENTED_PATHS = {"/v3/maintenance/snapshot"}


class RequestError(Exception):
    """A request refused before it reached the core: a gRPC code and a message."""

    def __init__(self, grpc_code: int, message: str):
        super().__init__(message)
        self.grpc_code = grpc_code
        self.message = message


def error_body(grpc_code: int, message: str) -> dict:
    return {"error": message, "message": message, "code": grpc_code}


def to_json(message) -> bytes:
    """An etcd protobuf message as grpc-gateway writes it."""
    as_dict = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return json.dumps(as_dict, separators=(",", ":")).encode()


def parse_objects(data: bytes) -> list:
    """The JSON values in a body, one after another (a stream body holds several)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(errors.INVALID_ARGUMENT, f"body is not UTF-8: {exc}") from None
    decoder = json.JSONDecoder()
    objects, position = [], 0
    while True:  # bounded by the body's length: each pass consumes at least one character
        while position < len(text) and text[position] in " \t\r\n":
            position += 1
        if position == len(text):
            return objects
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise RequestError(errors.INVALID_ARGUMENT, f"malformed JSON body: {exc}") from None
        objects.append(value)


def to_request(message_class, value):
    """A JSON object as an etcd request message; RequestError when it is not one."""
    if not isinstance(value, dict):
        raise RequestError(errors.INVALID_ARGUMENT,
                           f"malformed JSON body: want an object for {message_class.DESCRIPTOR.name}")
    try:
        return json_format.ParseDict(known_fields(value, message_class.DESCRIPTOR), message_class())
    except json_format.ParseError as exc:
        raise RequestError(errors.INVALID_ARGUMENT, f"malformed {message_class.DESCRIPTOR.name}: {exc}") from None


def known_fields(value: dict, descriptor) -> dict:
    """`value` without the fields its message does not have, at every depth.

    etcd's gateway ignores unknown fields but refuses unknown enum values and
    wrong types; protobuf's `ignore_unknown_fields` would let all three
    through, so only the unknown fields are dropped here and the rest is
    parsed strictly."""
    kept = {}
    for name, item in value.items():
        field = descriptor.fields_by_name.get(name) or descriptor.fields_by_camelcase_name.get(name)
        if field is None:
            continue
        if field.message_type is not None:
            if field.is_repeated and isinstance(item, list):
                item = [known_fields(element, field.message_type) if isinstance(element, dict) else element
                        for element in item]
            elif not field.is_repeated and isinstance(item, dict):
                item = known_fields(item, field.message_type)
        kept[name] = item
    return kept


class Deadline:
    """The `context` GrpcFront.answers polls: active until a deadline or a stop."""

    def __init__(self, front: "HttpFront", timeout_s: float):
        self.front = front
        self.deadline = time.monotonic() + timeout_s

    def is_active(self) -> bool:
        return not self.front.stopping and time.monotonic() < self.deadline


# ---- the front ---------------------------------------------------------------

class HttpFront:
    """The HTTP servers of one gateway process, sending requests through its gRPC front's channel."""

    def __init__(self, grpc_front, gateway, log):
        self.grpc_front = grpc_front
        self.gateway = gateway
        self.log = log
        self.limits = gateway.limits
        self.max_body_bytes = self.limits.max_request_bytes * 4 // 3 + JSON_OVERHEAD_BYTES
        self.stopping = False
        self.connection_slots = threading.BoundedSemaphore(CONNECTIONS_MAX)
        self.watch_endpoint = _local_endpoint(*gateway.config.zmq_url())
        self.servers = [_Server(parse_url(url), self) for url in gateway.config.listen_client_http_urls]
        self.threads: list[threading.Thread] = []
        self.watch_streams = 0  # open /v3/watch streams, under streams_changed
        self.streams_changed = threading.Condition()

    def start(self) -> None:
        for server in self.servers:
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                      name="http-accept", daemon=True)
            thread.start()
            self.threads.append(thread)
        self.log.info("http json gateway listening", addresses=[server.address for server in self.servers])

    def stop(self) -> None:
        self.stopping = True
        for server in self.servers:
            server.shutdown()
            server.server_close()
        # Watch streams notice `stopping` within WATCH_POLL_S; let them close
        # their watchers before the gateway destroys the ZeroMQ context.
        with self.streams_changed:
            self.streams_changed.wait_for(lambda: self.watch_streams == 0, timeout=STOP_WAIT_S)

    # ---- requests through the gateway loop ---------------------------------

    def call(self, op: str, body: dict, size_bytes: int, timeout_s: float = REQUEST_TIMEOUT_S) -> dict:
        """One request through the gateway core; its answer, or QuorumError."""
        for status, answer in self.grpc_front.answers(op, body, size_bytes, Deadline(self, timeout_s)):
            if status == STATUS_ERROR:
                raise QuorumError.from_wire(answer)
            if status != STATUS_PARTIAL:
                return answer
        raise QuorumError("Stopped" if self.stopping else "Timeout")

    def health(self) -> bool:
        """etcd 3.4's /health: no alarm, a leader, and a linearizable read within a second."""
        try:
            if self.call("alarm", {"action": 0}, 0, HEALTH_TIMEOUT_S).get("alarms"):
                return False
            if not self.call("status", {}, 0, HEALTH_TIMEOUT_S).get("leader"):
                return False
            self.call("range", {"key": b"health", "count_only": True}, 0, HEALTH_TIMEOUT_S)
        except QuorumError:
            return False
        return True

    def open_watch(self, create: dict) -> Watcher:
        filters = [0 if item in (0, "NOPUT") else 1 for item in create.get("filters", ())]
        return Watcher([self.watch_endpoint], create.get("key", b""), create.get("range_end", b""),
                       start_revision=create.get("start_revision", 0), prev_kv=create.get("prev_kv", False),
                       filters=filters, progress_notify=create.get("progress_notify", False),
                       created_notify=True, timeout_s=REQUEST_TIMEOUT_S, context=self.gateway.context)

    def header(self) -> dict:
        core = self.gateway.core  # plain reads of numbers the loop thread sets
        return {"cluster_id": core.cluster_id, "member_id": core.member_id, "raft_term": core.raft_term}


def _local_endpoint(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, host_port: tuple[str, int], front: HttpFront):
        host, port = host_port
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.front = front
        self.address = f"{host}:{port}"
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        # Every gateway of the node serves the same port, as the gRPC port.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def process_request(self, request, client_address) -> None:
        if not self.front.connection_slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                # What the client already sent, read so the close is a FIN and not a
                # reset that could beat the 503 to it (best effort, never waits).
                request.recv(REFUSED_DRAIN_BYTES, socket.MSG_DONTWAIT)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def handle_error(self, request, client_address) -> None:
        # A handler that failed: logged as every other line, the connection closed, the server serves on.
        self.front.log.error("http handler failed", client=str(client_address), exc_info=True)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.front.connection_slots.release()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT_S
    # Buffered: a response's status line, headers and body leave in one send
    # (the server flushes after each request; streams flush per chunk).
    wbufsize = -1

    def setup(self) -> None:
        super().setup()
        # Small answers go at once, not held back by Nagle waiting for the client's ACK.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def version_string(self) -> str:
        return "quorumkv"

    @property
    def front(self) -> HttpFront:
        return self.server.front

    def log_message(self, format: str, *args) -> None:
        pass  # one line per request is too many; errors are logged where they happen

    # ---- responses ------------------------------------------------------------

    def end_headers(self) -> None:
        # etcd's gateway allows any origin (its CORS default).
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Methods", "POST, GET, OPTIONS, PUT, DELETE")
        self.send_header("Access-Control-Allow-Headers", "accept, content-type, authorization")
        super().end_headers()

    def _send(self, status: int, payload: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)

    def _send_error(self, grpc_code: int, message: str) -> None:
        status = HTTP_STATUS_FOR_GRPC_CODE.get(grpc_code, 500)
        self._send(status, json.dumps(error_body(grpc_code, message), separators=(",", ":")).encode())

    def _send_chunk(self, payload: bytes) -> None:
        # As grpc-gateway, the headers go with the first response of a stream:
        # a client that waits for them (etcd3gw's watch) knows its watch exists.
        if not self.stream_started:
            self.stream_started = True
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(payload), payload))
        self.wfile.flush()

    def _end_stream(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    # ---- methods ----------------------------------------------------------------

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            healthy = self.front.health()
            payload = b'{"health":"true"}' if healthy else b'{"health":"false"}'
            self._send(200 if healthy else 503, payload, "text/plain; charset=utf-8")
        elif path == "/version":
            versions = {"etcdserver": ETCD_VERSION, "etcdcluster": CLUSTER_VERSION, "quorumkv": SERVER_VERSION}
            self._send(200, json.dumps(versions, separators=(",", ":")).encode(), "text/plain; charset=utf-8")
        elif path in ROUTES or path == "/v3/watch" or path in UNIMPLEMENTED_PATHS:
            self._send(405, b"Method Not Allowed\n", "text/plain; charset=utf-8")
        else:
            self._send(404, b"Not Found\n", "text/plain; charset=utf-8")

    def do_OPTIONS(self) -> None:
        self._send(200, b"", "text/plain; charset=utf-8")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        self.stream_started = False
        try:
            data = self._read_body()
            if path == "/v3/watch":
                self._watch(data)
            elif path in ROUTES:
                self._route(path, data)
            elif path.startswith("/v3/auth/"):
                self._send_error(*AUTH_NOT_ENABLED)
            elif path in UNIMPLEMENTED_PATHS:
                self._send_error(errors.UNIMPLEMENTED, f"quorumkv: {path} is not served yet")
            else:
                self._send(404, b"Not Found\n", "text/plain; charset=utf-8")
        except RequestError as error:
            self._send_error(error.grpc_code, error.message)
        except QuorumError as error:
            self._send_error(error.grpc_status, error.message)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError(errors.INVALID_ARGUMENT, "quorumkv: a chunked request body is not supported; "
                                                        "send Content-Length")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise RequestError(errors.INVALID_ARGUMENT, "malformed Content-Length") from None
        if length < 0 or length > self.front.max_body_bytes:
            self.close_connection = True  # the body is left unread
            raise QuorumError("RequestTooLarge")
        data = self.rfile.read(length)
        if len(data) != length:
            self.close_connection = True
            raise RequestError(errors.INVALID_ARGUMENT, "unexpected EOF")
        return data

    def _route(self, path: str, data: bytes) -> None:
        op, request_class, response_class, stream = ROUTES[path]
        values = parse_objects(data) or [{}]
        if not stream:
            if len(values) > 1:
                raise RequestError(errors.INVALID_ARGUMENT, "malformed JSON body: more than one object")
            message = to_request(request_class, values[0])
            answer = self.front.call(op, core_request(op, message), message.ByteSize())
            self._send(200, to_json(to_message(response_class, etcd_answer(op, answer))))
            return
        messages = [to_request(request_class, value) for value in values]
        for message in messages:
            try:
                answer = self.front.call(op, core_request(op, message), message.ByteSize())
            except QuorumError as error:
                if not self.stream_started:
                    raise  # nothing sent yet: a plain error answer
                self._send_chunk(_stream_error(error.grpc_status, error.message))
                break
            self._send_chunk(b'{"result":%s}\n' % to_json(to_message(response_class, answer)))
        self._end_stream()

    # ---- watch -----------------------------------------------------------------------

    def _watch(self, data: bytes) -> None:
        requests = [to_request(pb.WatchRequest, value) for value in parse_objects(data)]
        if not requests:
            # etcd waits for a first request; a body without one never gets one.
            raise RequestError(errors.INVALID_ARGUMENT, "malformed JSON body: no WatchRequest")
        self.close_connection = True  # the stream ends only with the connection
        stream = _WatchStream(self)
        with self.front.streams_changed:
            self.front.watch_streams += 1
        try:
            for request in requests:
                stream.take_request(request)
            stream.run()
        except QuorumError as error:
            if not self.stream_started:
                raise  # nothing sent yet: a plain error answer
            self._send_chunk(_stream_error(error.grpc_status, error.message))
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass  # the client went away, or stopped reading
        finally:
            stream.close()
            with self.front.streams_changed:
                self.front.watch_streams -= 1
                self.front.streams_changed.notify_all()

    def client_gone(self) -> bool:
        """True when the client closed its end, or sent bytes past its request.

        A watch request's body is all of its requests (Content-Length), so
        anything readable now is the end of the connection or a client we
        cannot follow: either way the stream ends (and never spins on it)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
        except OSError:
            return True
        return bool(readable)


def _stream_error(grpc_code: int, message: str) -> bytes:
    # grpc-gateway v1's error chunk in a stream.
    status = HTTP_STATUS_FOR_GRPC_CODE.get(grpc_code, 500)
    chunk = {"error": {"grpc_code": grpc_code, "http_code": status, "message": message,
                       "http_status": http.HTTPStatus(status).phrase}}
    return json.dumps(chunk, separators=(",", ":")).encode() + b"\n"


class _WatchStream:
    """The watches of one /v3/watch request, by the stream's own watch ids."""

    def __init__(self, handler: _Handler):
        self.handler = handler
        self.front = handler.front
        self.watchers: dict[int, Watcher] = {}
        self.created_sent: set[int] = set()
        self.next_watch_id = 0

    def send(self, body: dict) -> None:
        self.handler._send_chunk(b'{"result":%s}\n' % to_json(to_message(pb.WatchResponse, body)))

    def take_request(self, request) -> None:
        kind = request.WhichOneof("request_union")
        if kind == "create_request":
            self._create(to_body(request.create_request))
        elif kind == "cancel_request":
            watch_id = request.cancel_request.watch_id
            watcher = self.watchers.pop(watch_id, None)
            if watcher is not None:
                watcher.close()
                if watch_id not in self.created_sent:
                    self.send({"header": self.front.header(), "watch_id": watch_id, "created": True})
                self.send({"header": self.front.header(), "watch_id": watch_id, "canceled": True})
        elif kind == "progress_request":
            self._progress()

    def _create(self, create: dict) -> None:
        watch_id = create.get("watch_id", 0)
        if watch_id and watch_id in self.watchers:
            # etcd 3.4: a watch id the client chose that the stream already has.
            self.send({"header": self.front.header(), "watch_id": watch_id, "created": True, "canceled": True,
                       "cancel_reason": "mvcc: duplicate watch ID provided on the WatchStream"})
            return
        if not watch_id:  # 0: the stream picks the next free one, as etcd's
            while self.next_watch_id in self.watchers:  # bounded by WATCHES_PER_STREAM_MAX
                self.next_watch_id += 1
            watch_id = self.next_watch_id
            self.next_watch_id += 1
        if len(self.watchers) >= WATCHES_PER_STREAM_MAX:
            self.send({"header": self.front.header(), "watch_id": watch_id, "created": True, "canceled": True,
                       "cancel_reason": f"quorumkv: at most {WATCHES_PER_STREAM_MAX} watches per stream"})
            return
        try:
            watcher = self.front.open_watch(create)
        except (ValueError, QuorumError) as error:
            self.send({"header": self.front.header(), "watch_id": watch_id, "created": True, "canceled": True,
                       "cancel_reason": str(error)})
            return
        self.watchers[watch_id] = watcher
        # Its created response now, so responses keep the order of the requests.
        self._forward(watch_id, watcher, REQUEST_TIMEOUT_S)

    def _progress(self) -> None:
        if self.watchers:
            next(iter(self.watchers.values())).request_progress()
            return
        # No watch to carry it: the revision every watch of this stream is at is the store's.
        answer = self.front.call("range", {"key": b"\x00", "count_only": True, "serializable": True}, 0)
        header = dict(self.front.header(), revision=answer["header"]["revision"])
        self.send({"header": header, "watch_id": -1})

    def run(self) -> None:
        """Forward responses until the client goes or the server stops (the stream's lifetime)."""
        while not self.front.stopping:
            if not self.watchers:
                if self.handler.client_gone():
                    return
                select.select([self.handler.connection], [], [], WATCH_POLL_S)
                continue
            wait_s = WATCH_POLL_S / len(self.watchers)
            for watch_id, watcher in list(self.watchers.items()):
                self._forward(watch_id, watcher, wait_s)
            if self.handler.client_gone():
                return

    def _forward(self, watch_id: int, watcher: Watcher, wait_s: float) -> None:
        try:
            response = watcher.get(timeout_s=wait_s)
        except StopIteration:
            self.watchers.pop(watch_id).close()
            return
        except CompactedError as error:
            self.watchers.pop(watch_id).close()
            if watch_id not in self.created_sent:
                # The watcher took the refusal together with its creation; etcd says both.
                self.send({"header": self.front.header(), "watch_id": watch_id, "created": True})
            self.send({"header": self.front.header(), "watch_id": watch_id, "canceled": True,
                       "compact_revision": getattr(error, "compact_revision", 0)})
            return
        except (WatchCanceledError, QuorumError) as error:
            self.watchers.pop(watch_id).close()
            self.send({"header": self.front.header(), "watch_id": watch_id, "canceled": True,
                       "cancel_reason": str(error)})
            return
        if response is None:
            return
        response = dict(response)
        if response.get("created"):
            self.created_sent.add(watch_id)
        if response.get("watch_id") != -1:  # a progress notification keeps etcd's -1
            response["watch_id"] = watch_id
        self.send(response)

    def close(self) -> None:
        for watcher in self.watchers.values():
            watcher.close()
        self.watchers.clear()
