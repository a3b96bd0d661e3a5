"""The Python client for quorumkv's ZeroMQ protocol.

How this works: one DEALER socket, connected to the gateway(s) named by the
caller and, after a "hello", to every gateway process of the node (DEALER
round-robins requests across them, which is how reads scale across cores).
The client is single-threaded and has no background thread: requests are
queued by `submit()`, packed many per frame when sent (the fast path), and
replies are read only while a caller waits (`PendingRequest.result()`,
`request_many()`, or any of the blocking helpers such as `get()`).

A Client belongs to one thread at a time: a second thread that calls it
while the first is inside it gets `ConcurrentUseError` at once (two threads on
one ZeroMQ socket would corrupt it and lose answers silently). Give each
thread its own Client.

Request ids are per-client integers; a reply whose id is unknown (late,
after a timeout, or duplicated) is ignored. A reply frame that cannot be
decoded raises `MalformedFrameError` from the call that was reading, and a
frame-level error from the server (request id nil) raises its QuorumError.
At most `max_in_flight` requests are queued or unanswered: `submit()` waits
for answers beyond that (back-pressure, not an unbounded queue).

Retries: a read (range, status, hash_kv, hello, alarm GET, lease reads and keep-alives) is
resent once more by default when it times out or fails with a code marked
`safe_to_retry`. A write is never resent: its timeout or error is raised,
since the write may or may not have been applied.

Usage:

    with Client(["127.0.0.1:2382"]) as client:
        client.put("k", "v")
        client.get("k")["kvs"][0]["value"]          # b"v"
        ok = (client.txn_builder()
              .if_(Compare.value("k") == "v")
              .then(ops.put("k", "w"))
              .else_(ops.get("k"))
              .commit())["succeeded"]
"""

from __future__ import annotations

import builtins
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import zmq

from protocol import codec
from protocol import messages
from protocol.errors import CODES, QuorumError
from protocol.limits import DEFAULT_LIMITS

DEFAULT_ENDPOINT = "127.0.0.1:2382"
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_READ_RETRIES = 1
# Requests one client may have queued or unanswered; a gateway holds at most
# Limits.max_pending_requests_per_gateway, so a client stays well under it.
DEFAULT_MAX_IN_FLIGHT = 16384
# Pause before resending a read refused with a safe_to_retry code (NoLeader...).
RETRY_BACKOFF_S = 0.05


# ---------------------------------------------------------------------------
# Errors: one QuorumError subclass per code, so callers can catch what they mean.


class EmptyKeyError(QuorumError): pass
class KeyNotFoundError(QuorumError): pass
class ValueProvidedError(QuorumError): pass
class LeaseProvidedError(QuorumError): pass
class TooManyOpsError(QuorumError): pass
class DuplicateKeyError(QuorumError): pass
class CompactedError(QuorumError): pass
class FutureRevError(QuorumError): pass
class NoSpaceError(QuorumError): pass
class LeaseNotFoundError(QuorumError): pass
class LeaseExistError(QuorumError): pass
class LeaseTTLTooLargeError(QuorumError): pass
class RequestTooLargeError(QuorumError): pass
class TooManyRequestsError(QuorumError): pass
class NoLeaderError(QuorumError): pass
class NotLeaderError(QuorumError): pass
class LeaderChangedError(QuorumError): pass
class StoppedError(QuorumError): pass
class CorruptError(QuorumError): pass
class UnhealthyError(QuorumError): pass
class NotCapableError(QuorumError): pass
class MemberNotFoundError(QuorumError): pass
class MemberExistError(QuorumError): pass
class PeerURLExistError(QuorumError): pass
class MemberNotLearnerError(QuorumError): pass
class LearnerNotReadyError(QuorumError): pass
class TooManyLearnersError(QuorumError): pass
class MemberBadURLsError(QuorumError): pass
class MemberNotEnoughStartedError(QuorumError): pass
class LearnerNotSupportedError(QuorumError): pass
class BadLeaderTransfereeError(QuorumError): pass
class LeaderTransferTimeoutError(QuorumError): pass
class MalformedFrameError(QuorumError): pass
class UnsupportedVersionError(QuorumError): pass
class UnknownOpError(QuorumError): pass
class InvalidArgumentError(QuorumError): pass
class InternalError(QuorumError): pass


class QuorumTimeoutError(QuorumError, builtins.TimeoutError):
    """Code "Timeout": the server gave up (sent by the server)."""


class DeadlineExceededError(QuorumTimeoutError):
    """Code "Timeout": no answer arrived within the client's timeout.

    The request may still have been applied (for a write) or may be
    answered later (the late answer is ignored).
    """


ERROR_CLASSES: dict[str, type[QuorumError]] = {
    "EmptyKey": EmptyKeyError,
    "KeyNotFound": KeyNotFoundError,
    "ValueProvided": ValueProvidedError,
    "LeaseProvided": LeaseProvidedError,
    "TooManyOps": TooManyOpsError,
    "DuplicateKey": DuplicateKeyError,
    "Compacted": CompactedError,
    "FutureRev": FutureRevError,
    "NoSpace": NoSpaceError,
    "LeaseNotFound": LeaseNotFoundError,
    "LeaseExist": LeaseExistError,
    "LeaseTTLTooLarge": LeaseTTLTooLargeError,
    "RequestTooLarge": RequestTooLargeError,
    "TooManyRequests": TooManyRequestsError,
    "NoLeader": NoLeaderError,
    "NotLeader": NotLeaderError,
    "LeaderChanged": LeaderChangedError,
    "Stopped": StoppedError,
    "Timeout": QuorumTimeoutError,
    "Corrupt": CorruptError,
    "Unhealthy": UnhealthyError,
    "NotCapable": NotCapableError,
    "MemberNotFound": MemberNotFoundError,
    "MemberExist": MemberExistError,
    "PeerURLExist": PeerURLExistError,
    "MemberNotLearner": MemberNotLearnerError,
    "LearnerNotReady": LearnerNotReadyError,
    "TooManyLearners": TooManyLearnersError,
    "MemberBadURLs": MemberBadURLsError,
    "MemberNotEnoughStarted": MemberNotEnoughStartedError,
    "LearnerNotSupported": LearnerNotSupportedError,
    "BadLeaderTransferee": BadLeaderTransfereeError,
    "LeaderTransferTimeout": LeaderTransferTimeoutError,
    "MalformedFrame": MalformedFrameError,
    "UnsupportedVersion": UnsupportedVersionError,
    "UnknownOp": UnknownOpError,
    "InvalidArgument": InvalidArgumentError,
    "Internal": InternalError,
}
assert set(ERROR_CLASSES) == set(CODES), "every error code needs a client exception class"


def error_from_wire(body: object) -> QuorumError:
    """The exception for a STATUS_ERROR body {"code", "message"}."""
    if not isinstance(body, dict):
        return InternalError("Internal", f"malformed error body from server: {body!r}")
    code = body.get("code")
    if code not in CODES:
        return InternalError("Internal", f"unknown error code from server: {code!r} ({body.get('message')!r})")
    error = ERROR_CLASSES[code](code)
    message = body.get("message")
    if isinstance(message, str) and message:
        error.message = message
        error.args = (message,)
    return error


# ---------------------------------------------------------------------------
# Request bodies: plain functions, shared by the client methods, the txn
# builder and quorumctl.


def to_bytes(value: str | bytes | bytearray | memoryview) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"expected str or bytes, got {type(value).__name__}")


def prefix_range_end(prefix: bytes) -> bytes:
    """etcd's GetPrefixRangeEnd: the smallest key above every key starting with prefix."""
    end = bytearray(prefix)
    for index in range(len(end) - 1, -1, -1):
        if end[index] < 0xFF:
            end[index] += 1
            return bytes(end[: index + 1])
    # The prefix is all 0xff (or empty): every key from prefix onwards.
    return b"\x00"


def _key_range(key, range_end, prefix: bool, from_key: bool) -> tuple[bytes, bytes]:
    key = to_bytes(key)
    range_end = to_bytes(range_end)
    if prefix and from_key:
        raise ValueError("prefix and from_key cannot both be set")
    if prefix:
        if not key:
            return b"\x00", b"\x00"
        return key, prefix_range_end(key)
    if from_key:
        return (key or b"\x00"), b"\x00"
    return key, range_end


class ops:
    """Builders for request bodies, usable directly or inside a txn.

    `ops.get/put/delete` return (op, body) pairs; `Client.submit(*pair)`
    sends one, and the txn builder takes them as branch operations.
    """

    @staticmethod
    def get(key, range_end=b"", *, prefix=False, from_key=False, revision=0, limit=0,
            sort_order=messages.SORT_NONE, sort_target=messages.SORT_BY_KEY,
            serializable=False, keys_only=False, count_only=False,
            min_mod_revision=0, max_mod_revision=0,
            min_create_revision=0, max_create_revision=0) -> tuple[str, dict]:
        key, range_end = _key_range(key, range_end, prefix, from_key)
        if sort_order == messages.SORT_NONE and sort_target != messages.SORT_BY_KEY:
            # etcd sorts ascending when only a target is given.
            sort_order = messages.SORT_ASCEND
        body = {"key": key}
        optional = {
            "range_end": range_end, "revision": revision, "limit": limit,
            "sort_order": sort_order, "sort_target": sort_target,
            "serializable": serializable, "keys_only": keys_only, "count_only": count_only,
            "min_mod_revision": min_mod_revision, "max_mod_revision": max_mod_revision,
            "min_create_revision": min_create_revision, "max_create_revision": max_create_revision,
        }
        body.update({name: value for name, value in optional.items() if value})
        return "range", body

    @staticmethod
    def put(key, value=b"", lease=0, prev_kv=False, ignore_value=False, ignore_lease=False) -> tuple[str, dict]:
        body = {"key": to_bytes(key), "value": to_bytes(value)}
        optional = {"lease": lease, "prev_kv": prev_kv, "ignore_value": ignore_value,
                    "ignore_lease": ignore_lease}
        body.update({name: flag for name, flag in optional.items() if flag})
        return "put", body

    @staticmethod
    def delete(key, range_end=b"", *, prefix=False, from_key=False, prev_kv=False) -> tuple[str, dict]:
        key, range_end = _key_range(key, range_end, prefix, from_key)
        body = {"key": key}
        if range_end:
            body["range_end"] = range_end
        if prev_kv:
            body["prev_kv"] = True
        return "delete_range", body

    @staticmethod
    def txn(compare: Iterable, success: Iterable, failure: Iterable) -> tuple[str, dict]:
        return "txn", {
            "compare": [_compare_body(item) for item in compare],
            "success": [_txn_item(item) for item in success],
            "failure": [_txn_item(item) for item in failure],
        }


_TXN_REQUEST_FIELDS = {op: field for field, op in messages.TXN_REQUEST_OPS.items()}


def _txn_item(item) -> dict:
    """A branch operation: an (op, body) pair from `ops`, or a ready {"request_*": body} map."""
    if isinstance(item, dict):
        return item
    op, body = item
    if op not in _TXN_REQUEST_FIELDS:
        raise ValueError(f"{op!r} cannot be used inside a txn")
    return {_TXN_REQUEST_FIELDS[op]: body}


def _compare_body(item) -> dict:
    if isinstance(item, Compare):
        return item.to_body()
    if isinstance(item, dict):
        return item
    raise TypeError(f"a txn compare is a Compare or a dict, got {type(item).__name__}")


_TARGET_FIELDS = {
    messages.TARGET_VERSION: "version",
    messages.TARGET_CREATE: "create_revision",
    messages.TARGET_MOD: "mod_revision",
    messages.TARGET_VALUE: "value",
    messages.TARGET_LEASE: "lease",
}


class Compare:
    """One txn comparison, built with Python operators.

        Compare.value("k") == "v"      Compare.mod("k") > 5
        Compare.version("k") != 0      Compare.create("k") < 10
        Compare.lease("k") == lease_id
    """

    __slots__ = ("target", "key", "range_end", "result", "operand")

    def __init__(self, target: int, key, range_end=b""):
        self.target = target
        self.key = to_bytes(key)
        self.range_end = to_bytes(range_end)
        self.result: int | None = None
        self.operand: Any = None

    @classmethod
    def value(cls, key, range_end=b"") -> "Compare":
        return cls(messages.TARGET_VALUE, key, range_end)

    @classmethod
    def version(cls, key, range_end=b"") -> "Compare":
        return cls(messages.TARGET_VERSION, key, range_end)

    @classmethod
    def create(cls, key, range_end=b"") -> "Compare":
        return cls(messages.TARGET_CREATE, key, range_end)

    @classmethod
    def mod(cls, key, range_end=b"") -> "Compare":
        return cls(messages.TARGET_MOD, key, range_end)

    @classmethod
    def lease(cls, key, range_end=b"") -> "Compare":
        return cls(messages.TARGET_LEASE, key, range_end)

    def _with(self, result: int, operand) -> "Compare":
        done = Compare(self.target, self.key, self.range_end)
        done.result = result
        if self.target == messages.TARGET_VALUE:
            done.operand = to_bytes(operand)
        else:
            if isinstance(operand, bool) or not isinstance(operand, int):
                raise TypeError(f"{_TARGET_FIELDS[self.target]} compares with an int")
            done.operand = operand
        return done

    def __eq__(self, operand) -> "Compare":  # type: ignore[override]
        return self._with(messages.COMPARE_EQUAL, operand)

    def __ne__(self, operand) -> "Compare":  # type: ignore[override]
        return self._with(messages.COMPARE_NOT_EQUAL, operand)

    def __gt__(self, operand) -> "Compare":
        return self._with(messages.COMPARE_GREATER, operand)

    def __lt__(self, operand) -> "Compare":
        return self._with(messages.COMPARE_LESS, operand)

    __hash__ = None  # type: ignore[assignment]

    def to_body(self) -> dict:
        if self.result is None:
            raise ValueError("incomplete comparison: use ==, !=, < or > on it")
        body = {"result": self.result, "target": self.target, "key": self.key,
                _TARGET_FIELDS[self.target]: self.operand}
        if self.range_end:
            body["range_end"] = self.range_end
        return body


class TxnBuilder:
    """client.txn_builder().if_(...).then(...).else_(...).commit()"""

    def __init__(self, client: "Client"):
        self._client = client
        self._compare: list = []
        self._success: list = []
        self._failure: list = []

    def if_(self, *compares) -> "TxnBuilder":
        self._compare.extend(compares)
        return self

    def then(self, *operations) -> "TxnBuilder":
        self._success.extend(operations)
        return self

    def else_(self, *operations) -> "TxnBuilder":
        self._failure.extend(operations)
        return self

    def request(self) -> tuple[str, dict]:
        return ops.txn(self._compare, self._success, self._failure)

    def commit(self) -> dict:
        return self._client.request(*self.request())


# ---------------------------------------------------------------------------
# Pending requests.


def is_retryable_read(op: str, body: dict) -> bool:
    if op == "alarm":
        return body.get("action", messages.ALARM_GET) == messages.ALARM_GET
    return op in _READ_OPS


# lease_keep_alive is safe to resend too: a renewal twice is a renewal.
_READ_OPS = frozenset({"hello", "range", "status", "hash_kv", "lease_time_to_live", "lease_leases",
                       "lease_keep_alive"})

_WAITING, _DONE = 0, 1


class PendingRequest:
    """A submitted request: `result()` waits for its answer (Future-like)."""

    __slots__ = ("client", "request_id", "op", "body", "deadline", "attempts_left",
                 "on_partial", "state", "response", "error")

    def __init__(self, client: "Client", request_id: int, op: str, body: dict,
                 attempts_left: int, on_partial: Callable[[dict], None] | None):
        self.client = client
        self.request_id = request_id
        self.op = op
        self.body = body
        self.deadline = 0.0
        self.attempts_left = attempts_left
        self.on_partial = on_partial
        self.state = _WAITING
        self.response: dict | None = None
        self.error: QuorumError | None = None

    def done(self) -> bool:
        return self.state == _DONE

    def result(self) -> dict:
        """The response body; raises the request's QuorumError."""
        self.client.wait([self])
        if self.error is not None:
            raise self.error
        return self.response  # type: ignore[return-value]

    def exception(self) -> QuorumError | None:
        self.client.wait([self])
        return self.error


# ---------------------------------------------------------------------------
# The client.


def normalise_endpoint(endpoint: str) -> str:
    """ "host:port", "http://host:port" or "tcp://host:port" -> "tcp://host:port"."""
    endpoint = endpoint.strip()
    for scheme in ("http://", "https://"):
        if endpoint.startswith(scheme):
            endpoint = endpoint[len(scheme):]
    if not endpoint.startswith("tcp://"):
        endpoint = "tcp://" + endpoint
    return endpoint.rstrip("/")


class ConcurrentUseError(RuntimeError):
    """Two threads used one Client at the same time (see the module doc)."""


class Client:
    """A connection to one quorumkv node (all of its gateway processes)."""

    def __init__(self, endpoints: Iterable[str] | str = (DEFAULT_ENDPOINT,),
                 timeout_s: float = DEFAULT_TIMEOUT_S, *,
                 discover_gateways: bool = True,
                 connect_timeout_s: float | None = None,
                 read_retries: int = DEFAULT_READ_RETRIES,
                 max_requests_per_frame: int = DEFAULT_LIMITS.max_requests_per_frame,
                 max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 context: zmq.Context | None = None):
        if isinstance(endpoints, str):
            endpoints = endpoints.split(",")
        self.endpoints = [normalise_endpoint(e) for e in endpoints if e.strip()]
        if not self.endpoints:
            raise ValueError("no endpoint given")
        assert timeout_s > 0 and read_retries >= 0 and max_requests_per_frame > 0 and max_in_flight > 0
        self.timeout_s = timeout_s
        # How long a send waits for a connected gateway (etcdctl's dial timeout).
        self.connect_timeout_s = timeout_s if connect_timeout_s is None else connect_timeout_s
        self.read_retries = read_retries
        self.max_requests_per_frame = max_requests_per_frame
        # Back-pressure: submit() waits for answers rather than queue more than this.
        self.max_in_flight = max_in_flight
        self._context = context or zmq.Context.instance()
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        # Send only to gateways whose connection is up, so a request is not
        # parked on a pipe to a gateway that is down.
        self._socket.setsockopt(zmq.IMMEDIATE, 1)
        self._socket.setsockopt(zmq.SNDHWM, DEFAULT_LIMITS.socket_high_water_mark)
        self._socket.setsockopt(zmq.RCVHWM, DEFAULT_LIMITS.socket_high_water_mark)
        self._connected: list[str] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, PendingRequest] = {}
        self._outbox: list[PendingRequest] = []
        self._closed = False
        # Who is inside submit/flush/wait now (see _enter): misuse detection.
        self._in_use = threading.Lock()
        self._user: int | None = None
        self.server_info: dict | None = None
        for endpoint in self.endpoints:
            self._connect(endpoint)
        if discover_gateways:
            self.discover_gateways()

    # -- lifecycle

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._socket.close(linger=0)

    @property
    def gateways(self) -> list[str]:
        """The gateway endpoints this client's socket is connected to."""
        return list(self._connected)

    def _connect(self, endpoint: str) -> None:
        if endpoint not in self._connected:
            self._socket.connect(endpoint)
            self._connected.append(endpoint)

    def discover_gateways(self) -> dict:
        """Say hello and connect to every gateway process the node reports."""
        info = self.hello()
        self.server_info = info
        for endpoint in info.get("gateways") or []:
            if isinstance(endpoint, str):
                self._connect(normalise_endpoint(endpoint))
        return info

    # -- pipelining

    def _enter(self) -> bool:
        """Claim the client for this thread; True if this call must release it
        (False when the thread is already inside: submit -> flush, wait -> flush)."""
        if self._in_use.acquire(blocking=False):
            self._user = threading.get_ident()
            return True
        if self._user == threading.get_ident():
            return False
        raise ConcurrentUseError("this Client is in use by another thread: give each thread its own Client")

    def _leave(self) -> None:
        self._user = None
        self._in_use.release()

    def submit(self, op: str, body: dict | None = None, *,
               on_partial: Callable[[dict], None] | None = None) -> PendingRequest:
        """Queue a request; it is sent (packed with its neighbours) at the next wait or flush."""
        if self._closed:
            raise RuntimeError("client is closed")
        release = self._enter()
        try:
            return self._submit(op, body, on_partial)
        finally:
            if release:
                self._leave()

    def _submit(self, op: str, body: dict | None, on_partial: Callable[[dict], None] | None) -> PendingRequest:
        body = {} if body is None else body
        while len(self._pending) + len(self._outbox) >= self.max_in_flight:
            self._pump()
        retries = self.read_retries if is_retryable_read(op, body) else 0
        request = PendingRequest(self, next(self._ids), op, body, 1 + retries, on_partial)
        self._outbox.append(request)
        if len(self._outbox) >= self.max_requests_per_frame:
            self._flush()
        return request

    def flush(self) -> None:
        """Send every queued request, many per frame."""
        release = self._enter()
        try:
            self._flush()
        finally:
            if release:
                self._leave()

    def _flush(self) -> None:
        while self._outbox:
            batch = self._outbox[: self.max_requests_per_frame]
            del self._outbox[: len(batch)]
            self._send_batch(batch)

    def _send_batch(self, batch: list[PendingRequest]) -> None:
        frame = codec.encode_request_frame([[r.request_id, r.op, r.body] for r in batch])
        if not self._socket.poll(int(self.connect_timeout_s * 1000), zmq.POLLOUT):
            error_text = f"no gateway reachable at {', '.join(self._connected)} within {self.connect_timeout_s}s"
            for request in batch:
                self._retry_or_fail(request, DeadlineExceededError("Timeout", error_text))
            return
        self._socket.send(frame, copy=False)
        deadline = time.monotonic() + self.timeout_s
        for request in batch:
            request.deadline = deadline
            self._pending[request.request_id] = request

    def wait(self, requests: Iterable[PendingRequest]) -> None:
        """Read replies until every one of `requests` is done (answered, failed or timed out)."""
        release = self._enter()
        try:
            self._flush()
            for request in requests:
                while not request.done():
                    self._pump()
        finally:
            if release:
                self._leave()

    def _pump(self) -> None:
        """One pass: expire, send what is queued, wait for replies up to the earliest deadline."""
        if self._closed:
            raise RuntimeError("client is closed")
        now = time.monotonic()
        self._expire(now)
        if self._outbox:
            self._flush()
            return
        if not self._pending:
            return
        # _pending is kept in deadline order (see _expire), so the first is the earliest.
        earliest = next(iter(self._pending.values())).deadline
        timeout_ms = max(0, int((earliest - now) * 1000) + 1)
        if self._socket.poll(timeout_ms, zmq.POLLIN):
            self._drain()

    def _drain(self) -> None:
        """Read every reply frame already here (bounded per call)."""
        for _ in range(DEFAULT_LIMITS.max_messages_per_poll):
            try:
                data = self._socket.recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self._handle_frame(data)

    def _handle_frame(self, data: bytes) -> None:
        try:
            items = codec.decode_response_frame(data)
        except QuorumError as error:
            detail = error.message.removeprefix(CODES[error.code].message + ": ")
            raise ERROR_CLASSES[error.code](error.code, f"bad response frame from server: {detail}") from None
        frame_error = None
        for item in items:
            if not isinstance(item, list) or len(item) != 3:
                raise MalformedFrameError("MalformedFrame", f"bad response item from server: {item!r:.200}")
            request_id, status, body = item
            if request_id is None and status == codec.STATUS_ERROR:
                # The server could not read one of our frames as a whole: a
                # client bug. Its requests will time out; say why, loudly,
                # once this frame's other answers are handled.
                frame_error = error_from_wire(body)
                continue
            request = self._pending.get(request_id)
            if request is None:
                continue  # late (timed out) or unknown: ignored
            self._handle_response(request, status, body)
        if frame_error is not None:
            raise frame_error

    def _handle_response(self, request: PendingRequest, status: object, body: object) -> None:
        if status == codec.STATUS_PARTIAL:
            # A stream is alive as long as it keeps talking (and moves to the
            # end of _pending, which is kept in deadline order).
            request.deadline = time.monotonic() + self.timeout_s
            del self._pending[request.request_id]
            self._pending[request.request_id] = request
            if request.on_partial is not None:
                request.on_partial(body if isinstance(body, dict) else {})
            return
        del self._pending[request.request_id]
        if status == codec.STATUS_OK:
            if not isinstance(body, dict):
                raise MalformedFrameError("MalformedFrame", f"response body is not a map: {body!r:.200}")
            request.response = body
            request.state = _DONE
        elif status == codec.STATUS_ERROR:
            self._retry_or_fail(request, error_from_wire(body))
        else:
            raise MalformedFrameError("MalformedFrame", f"unknown response status {status!r}")

    def _expire(self, now: float) -> None:
        # Requests enter _pending in send order with deadline = send time +
        # timeout, and a stream that talks is moved to the end: the dict is in
        # deadline order, so expiring is popping from the front.
        while self._pending:
            request = next(iter(self._pending.values()))
            if request.deadline > now:
                return
            del self._pending[request.request_id]
            error = DeadlineExceededError(
                "Timeout", f"no answer to {request.op!r} within {self.timeout_s}s")
            self._retry_or_fail(request, error)

    def _retry_or_fail(self, request: PendingRequest, error: QuorumError) -> None:
        retryable = isinstance(error, DeadlineExceededError) or error.safe_to_retry
        request.attempts_left -= 1
        if retryable and request.attempts_left > 0 and is_retryable_read(request.op, request.body):
            if not isinstance(error, DeadlineExceededError):
                time.sleep(RETRY_BACKOFF_S)
            # A new id, so a late answer to the first attempt is ignored.
            request.request_id = next(self._ids)
            self._outbox.append(request)
            return
        request.error = error
        request.state = _DONE

    def request_many(self, requests: Iterable[tuple[str, dict]], *,
                     raise_errors: bool = True) -> list:
        """Send many requests pipelined (many per frame); their responses in order.

        With raise_errors=False a failed request's slot holds its QuorumError
        instead of raising the first one.
        """
        pending = [self.submit(op, body) for op, body in requests]
        self.wait(pending)
        results = []
        for request in pending:
            if request.error is not None:
                if raise_errors:
                    raise request.error
                results.append(request.error)
            else:
                results.append(request.response)
        return results

    def request(self, op: str, body: dict | None = None) -> dict:
        """One request, waited for."""
        return self.submit(op, body).result()

    # -- KV

    def get(self, key, range_end=b"", **options) -> dict:
        """Range: same keyword options as `ops.get` (prefix, from_key, revision, limit, ...)."""
        return self.request(*ops.get(key, range_end, **options))

    def put(self, key, value, lease=0, prev_kv=False, ignore_value=False, ignore_lease=False) -> dict:
        return self.request(*ops.put(key, value, lease, prev_kv, ignore_value, ignore_lease))

    def delete(self, key, range_end=b"", prefix=False, from_key=False, prev_kv=False) -> dict:
        return self.request(*ops.delete(key, range_end, prefix=prefix, from_key=from_key, prev_kv=prev_kv))

    def txn(self, compare: Iterable, success: Iterable, failure: Iterable = ()) -> dict:
        return self.request(*ops.txn(compare, success, failure))

    def txn_builder(self) -> TxnBuilder:
        return TxnBuilder(self)

    def compact(self, revision: int, physical: bool = False) -> dict:
        return self.request("compaction", {"revision": revision, "physical": physical})

    # -- maintenance

    def hello(self) -> dict:
        return self.request("hello", {})

    def status(self) -> dict:
        return self.request("status", {})

    def hash_kv(self, revision: int = 0) -> dict:
        return self.request("hash_kv", {"revision": revision})

    def hash(self) -> dict:
        """Maintenance Hash: {"hash"} of the whole key space at the current revision."""
        return self.request("hash", {})

    def alarm_list(self) -> dict:
        return self.request("alarm", {"action": messages.ALARM_GET})

    # -- cluster membership (etcd's Cluster service) and leadership

    def member_list(self) -> dict:
        return self.request("member_list", {})

    def member_add(self, peer_urls: list[str], is_learner: bool = False) -> dict:
        return self.request("member_add", {"peerURLs": list(peer_urls), "isLearner": is_learner})

    def member_remove(self, member_id: int) -> dict:
        return self.request("member_remove", {"ID": member_id})

    def member_update(self, member_id: int, peer_urls: list[str]) -> dict:
        return self.request("member_update", {"ID": member_id, "peerURLs": list(peer_urls)})

    def member_promote(self, member_id: int) -> dict:
        return self.request("member_promote", {"ID": member_id})

    def move_leader(self, target_id: int) -> dict:
        """Must go to the leader (NotLeaderError otherwise); answered once leadership moved."""
        return self.request("move_leader", {"targetID": target_id})

    def alarm_disarm(self, member_id: int = 0, alarm: int = messages.ALARM_NONE) -> dict:
        """Deactivate alarms; with no arguments, every alarm currently raised (as etcdctl)."""
        if member_id or alarm:
            return self.request("alarm", {"action": messages.ALARM_DEACTIVATE,
                                          "member_id": member_id, "alarm": alarm})
        alarms = self.alarm_list().get("alarms") or []
        response = {"alarms": []}
        for raised in alarms:
            response = self.request("alarm", {"action": messages.ALARM_DEACTIVATE,
                                              "member_id": raised.get("member_id", 0),
                                              "alarm": raised.get("alarm", 0)})
        return response

    def defragment(self) -> dict:
        return self.request("defragment", {})

    def snapshot(self, path: str, progress: Callable[[int, int], None] | None = None) -> int:
        """Stream the node's snapshot into `path`; returns its size in bytes.

        Written to path + ".part", fsynced, then renamed, so `path` is either
        absent or complete. progress(bytes_so_far, bytes_total) after each chunk.
        """
        part_path = path + ".part"
        received = 0
        with open(part_path, "wb") as handle:

            def on_chunk(body: dict) -> None:
                nonlocal received
                blob = body.get("blob") or b""
                handle.write(blob)
                received += len(blob)
                if progress is not None:
                    progress(received, received + int(body.get("remaining_bytes") or 0))

            try:
                final = self.submit("snapshot", {}, on_partial=on_chunk).result()
                if final.get("blob"):
                    on_chunk(final)
            except BaseException:
                handle.close()
                os.unlink(part_path)
                raise
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(part_path, path)
        return received

    # -- leases

    def lease_grant(self, ttl: int, lease_id: int = 0) -> dict:
        return self.request("lease_grant", {"TTL": ttl, "ID": lease_id})

    def lease_revoke(self, lease_id: int) -> dict:
        return self.request("lease_revoke", {"ID": lease_id})

    def lease_time_to_live(self, lease_id: int, keys: bool = False) -> dict:
        return self.request("lease_time_to_live", {"ID": lease_id, "keys": keys})

    def lease_leases(self) -> dict:
        return self.request("lease_leases", {})

    def lease_keep_alive_once(self, lease_id: int) -> dict:
        """Renew a lease once: {"header", "ID", "TTL"}, TTL the granted TTL, 0 if the
        lease is not found (as etcd's wire; protocol.lease.keep_alive_once raises instead)."""
        return self.request("lease_keep_alive", {"ID": lease_id})
