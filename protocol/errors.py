"""Error codes: one table, shared by the server, the client and the CLI.

Every expected failure has a name here with etcd's gRPC status and message
where etcd has one, so the gRPC front end (and etcd's clients) can match on
them. On the ZeroMQ wire an error travels as {"code": NAME, "message": TEXT};
the client raises `QuorumError` subclasses carrying the same code.

`grpc_status` is the numeric gRPC status code (3 = INVALID_ARGUMENT,
11 = OUT_OF_RANGE, ...).
"""

from __future__ import annotations

import dataclasses

# gRPC status codes, by name.
OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
ALREADY_EXISTS = 6
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
ABORTED = 10
OUT_OF_RANGE = 11
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
DATA_LOSS = 15


@dataclasses.dataclass(frozen=True, slots=True)
class ErrorCode:
    name: str
    grpc_status: int
    message: str
    # A client may resend the request on this error without risk of applying it twice.
    safe_to_retry: bool = False


_CODES = [
    # etcd's own (api/v3rpc/rpctypes), same status and text.
    ErrorCode("EmptyKey", INVALID_ARGUMENT, "etcdserver: key is not provided"),
    ErrorCode("KeyNotFound", INVALID_ARGUMENT, "etcdserver: key not found"),
    ErrorCode("ValueProvided", INVALID_ARGUMENT, "etcdserver: value is provided"),
    ErrorCode("LeaseProvided", INVALID_ARGUMENT, "etcdserver: lease is provided"),
    ErrorCode("TooManyOps", INVALID_ARGUMENT, "etcdserver: too many operations in txn request"),
    ErrorCode("DuplicateKey", INVALID_ARGUMENT, "etcdserver: duplicate key given in txn request"),
    ErrorCode("Compacted", OUT_OF_RANGE, "etcdserver: mvcc: required revision has been compacted"),
    ErrorCode("FutureRev", OUT_OF_RANGE, "etcdserver: mvcc: required revision is a future revision"),
    ErrorCode("NoSpace", RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded"),
    ErrorCode("LeaseNotFound", NOT_FOUND, "etcdserver: requested lease not found"),
    ErrorCode("LeaseExist", FAILED_PRECONDITION, "etcdserver: lease already exists"),
    ErrorCode("LeaseTTLTooLarge", OUT_OF_RANGE, "etcdserver: too large lease TTL"),
    ErrorCode("RequestTooLarge", INVALID_ARGUMENT, "etcdserver: request is too large"),
    ErrorCode("TooManyRequests", RESOURCE_EXHAUSTED, "etcdserver: too many requests", safe_to_retry=True),
    ErrorCode("NoLeader", UNAVAILABLE, "etcdserver: no leader", safe_to_retry=True),
    ErrorCode("NotLeader", FAILED_PRECONDITION, "etcdserver: not leader", safe_to_retry=True),
    ErrorCode("LeaderChanged", UNAVAILABLE, "etcdserver: leader changed"),
    ErrorCode("Stopped", UNAVAILABLE, "etcdserver: server stopped"),
    ErrorCode("Timeout", UNAVAILABLE, "etcdserver: request timed out"),
    ErrorCode("Corrupt", DATA_LOSS, "etcdserver: corrupt cluster"),
    ErrorCode("Unhealthy", UNAVAILABLE, "etcdserver: unhealthy cluster", safe_to_retry=True),
    ErrorCode("NotCapable", UNAVAILABLE, "etcdserver/api/v3rpc: not capable"),
    ErrorCode("MemberNotFound", NOT_FOUND, "etcdserver: member not found"),
    ErrorCode("MemberExist", FAILED_PRECONDITION, "etcdserver: member ID already exist"),
    ErrorCode("PeerURLExist", FAILED_PRECONDITION, "etcdserver: Peer URLs already exists"),
    ErrorCode("MemberNotLearner", FAILED_PRECONDITION, "etcdserver: can only promote a learner member"),
    ErrorCode("LearnerNotReady", FAILED_PRECONDITION, "etcdserver: can only promote a learner member which is in sync with leader"),
    ErrorCode("TooManyLearners", FAILED_PRECONDITION, "etcdserver: too many learner members in cluster"),
    ErrorCode("MemberBadURLs", INVALID_ARGUMENT, "etcdserver: given member URLs are invalid"),
    ErrorCode("MemberNotEnoughStarted", FAILED_PRECONDITION,
              "etcdserver: re-configuration failed due to not enough started members"),
    ErrorCode("LearnerNotSupported", UNAVAILABLE, "etcdserver: rpc not supported for learner"),
    ErrorCode("BadLeaderTransferee", FAILED_PRECONDITION, "etcdserver: bad leader transferee"),
    ErrorCode("LeaderTransferTimeout", UNAVAILABLE, "etcdserver: request timed out, leader transfer took too long"),
    # quorumkv's own: protocol and validation errors without an etcd twin.
    ErrorCode("MalformedFrame", INVALID_ARGUMENT, "quorumkv: malformed frame"),
    ErrorCode("UnsupportedVersion", INVALID_ARGUMENT, "quorumkv: unsupported protocol version"),
    ErrorCode("UnknownOp", UNIMPLEMENTED, "quorumkv: unknown operation"),
    ErrorCode("InvalidArgument", INVALID_ARGUMENT, "quorumkv: invalid argument"),
    ErrorCode("Internal", INTERNAL, "quorumkv: internal error"),
]

CODES: dict[str, ErrorCode] = {code.name: code for code in _CODES}


class QuorumError(Exception):
    """An expected failure with a code from `CODES`.

    The message defaults to the code's standard text; a detail, if given, is
    appended after a colon (e.g. which field was wrong).
    """

    def __init__(self, code: str, detail: str | None = None):
        if code not in CODES:
            code, detail = "Internal", f"unknown error code {code!r}: {detail}"
        self.code = code
        base = CODES[code].message
        self.message = f"{base}: {detail}" if detail else base
        super().__init__(self.message)

    @property
    def grpc_status(self) -> int:
        return CODES[self.code].grpc_status

    @property
    def safe_to_retry(self) -> bool:
        return CODES[self.code].safe_to_retry

    def to_wire(self) -> dict:
        return {"code": self.code, "message": self.message}

    @classmethod
    def from_wire(cls, body: object) -> "QuorumError":
        if not isinstance(body, dict):
            return cls("Internal", f"malformed error body {body!r}")
        error = cls(str(body.get("code", "Internal")))
        message = body.get("message")
        if isinstance(message, str):
            error.message = message
            error.args = (message,)
        return error


def invalid(detail: str) -> QuorumError:
    return QuorumError("InvalidArgument", detail)
