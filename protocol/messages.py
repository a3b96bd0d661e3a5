"""Request schemas: every operation, its fields, their types and defaults.

How this works: an operation's body is a msgpack map whose field names are
etcd's protobuf field names, in snake_case throughout (etcd's `dbSize` is our
`db_size`), so the ZeroMQ protocol and the etcd gRPC API map one to one. `validate_request(op, body, limits)` checks
every field (unknown fields are an error, as are wrong types), fills in the
defaults and applies etcd's request checks (empty key, txn op count,
duplicate keys in a txn). It returns the normalised body, which is what
travels through the raft log and what the MVCC core applies.

Pure: no I/O.
"""

from __future__ import annotations

from protocol.errors import QuorumError, invalid
from protocol.limits import Limits

# Enumerations, with etcd's numeric values.
SORT_NONE, SORT_ASCEND, SORT_DESCEND = 0, 1, 2
SORT_BY_KEY, SORT_BY_VERSION, SORT_BY_CREATE, SORT_BY_MOD, SORT_BY_VALUE = 0, 1, 2, 3, 4
COMPARE_EQUAL, COMPARE_GREATER, COMPARE_LESS, COMPARE_NOT_EQUAL = 0, 1, 2, 3
TARGET_VERSION, TARGET_CREATE, TARGET_MOD, TARGET_VALUE, TARGET_LEASE = 0, 1, 2, 3, 4
ALARM_GET, ALARM_ACTIVATE, ALARM_DEACTIVATE = 0, 1, 2
ALARM_NONE, ALARM_NOSPACE, ALARM_CORRUPT = 0, 1, 2

# Which operations change state (go through the raft log) and which only read.
WRITE_OPS = frozenset({"put", "delete_range", "txn", "compaction", "alarm_write", "lease_grant", "lease_revoke"})

_BYTES, _INT, _BOOL, _LIST = bytes, int, bool, list

# op -> {field: (type, default)}
SCHEMAS: dict[str, dict[str, tuple[type, object]]] = {
    "hello": {},
    "range": {
        "key": (_BYTES, b""),
        "range_end": (_BYTES, b""),
        "limit": (_INT, 0),
        "revision": (_INT, 0),
        "sort_order": (_INT, SORT_NONE),
        "sort_target": (_INT, SORT_BY_KEY),
        "serializable": (_BOOL, False),
        "keys_only": (_BOOL, False),
        "count_only": (_BOOL, False),
        "min_mod_revision": (_INT, 0),
        "max_mod_revision": (_INT, 0),
        "min_create_revision": (_INT, 0),
        "max_create_revision": (_INT, 0),
    },
    "put": {
        "key": (_BYTES, b""),
        "value": (_BYTES, b""),
        "lease": (_INT, 0),
        "prev_kv": (_BOOL, False),
        "ignore_value": (_BOOL, False),
        "ignore_lease": (_BOOL, False),
    },
    "delete_range": {
        "key": (_BYTES, b""),
        "range_end": (_BYTES, b""),
        "prev_kv": (_BOOL, False),
    },
    "txn": {
        "compare": (_LIST, []),
        "success": (_LIST, []),
        "failure": (_LIST, []),
    },
    "compaction": {"revision": (_INT, 0), "physical": (_BOOL, False)},
    "status": {},
    "hash_kv": {"revision": (_INT, 0)},
    "alarm": {"action": (_INT, ALARM_GET), "member_id": (_INT, 0), "alarm": (_INT, ALARM_NONE)},
    "defragment": {},
    "snapshot": {},
    "lease_grant": {"TTL": (_INT, 0), "ID": (_INT, 0)},
    "lease_revoke": {"ID": (_INT, 0)},
    "lease_time_to_live": {"ID": (_INT, 0), "keys": (_BOOL, False)},
    "lease_keep_alive": {"ID": (_INT, 0)},
    "lease_leases": {},
    # Cluster membership (etcd's Cluster service) and leadership transfer:
    # answered by the raft log (changes go through the log as conf changes).
    "member_list": {},
    "member_add": {"peerURLs": (_LIST, []), "isLearner": (_BOOL, False)},
    "member_remove": {"ID": (_INT, 0)},
    "member_update": {"ID": (_INT, 0), "peerURLs": (_LIST, [])},
    "member_promote": {"ID": (_INT, 0)},
    "move_leader": {"targetID": (_INT, 0)},
    # Maintenance Hash: a hash of the whole key space at the current revision.
    "hash": {},
    # Watch streams, served by the watch broadcaster's endpoint (hello's "watch").
    "watch_create": {
        "key": (_BYTES, b""),
        "range_end": (_BYTES, b""),
        "start_revision": (_INT, 0),
        "progress_notify": (_BOOL, False),
        "filters": (_LIST, []),
        "prev_kv": (_BOOL, False),
        "watch_id": (_INT, 0),
        "fragment": (_BOOL, False),
    },
    "watch_cancel": {"watch_id": (_INT, 0)},
    "watch_progress": {},
    "watch_ping": {},
}

COMPARE_SCHEMA: dict[str, tuple[type, object]] = {
    "result": (_INT, COMPARE_EQUAL),
    "target": (_INT, TARGET_VERSION),
    "key": (_BYTES, b""),
    "range_end": (_BYTES, b""),
    "version": (_INT, 0),
    "create_revision": (_INT, 0),
    "mod_revision": (_INT, 0),
    "value": (_BYTES, b""),
    "lease": (_INT, 0),
}

# A txn branch item is {"request_range"|"request_put"|"request_delete_range"|"request_txn": body}.
TXN_REQUEST_OPS = {
    "request_range": "range",
    "request_put": "put",
    "request_delete_range": "delete_range",
    "request_txn": "txn",
}
TXN_RESPONSE_FIELDS = {
    "range": "response_range",
    "put": "response_put",
    "delete_range": "response_delete_range",
    "txn": "response_txn",
}

MAX_INT64 = (1 << 63) - 1


def _check_fields(where: str, body: object, schema: dict[str, tuple[type, object]]) -> dict:
    if not isinstance(body, dict):
        raise invalid(f"{where}: body must be a map")
    out = {}
    for name, value in body.items():
        if name not in schema:
            raise invalid(f"{where}: unknown field {name!r}")
        expected, _default = schema[name]
        if expected is _INT:
            if isinstance(value, bool) or not isinstance(value, int):
                raise invalid(f"{where}: field {name!r} must be an integer")
            if not -MAX_INT64 - 1 <= value <= MAX_INT64:
                raise invalid(f"{where}: field {name!r} out of int64 range")
        elif expected is _BYTES:
            if isinstance(value, str):
                value = value.encode()
            elif not isinstance(value, bytes):
                raise invalid(f"{where}: field {name!r} must be bytes")
        elif not isinstance(value, expected):
            raise invalid(f"{where}: field {name!r} must be {expected.__name__}")
        out[name] = value
    for name, (_expected, default) in schema.items():
        if name not in out:
            out[name] = list(default) if isinstance(default, list) else default
    return out


def _check_enum(where: str, name: str, value: int, allowed: range) -> None:
    if value not in allowed:
        raise invalid(f"{where}: {name} {value} is not one of {allowed.start}..{allowed.stop - 1}")


def _validate_range(body: dict) -> None:
    if not body["key"]:
        raise QuorumError("EmptyKey")
    _check_enum("range", "sort_order", body["sort_order"], range(0, 3))
    _check_enum("range", "sort_target", body["sort_target"], range(0, 5))
    for name in ("limit", "revision", "min_mod_revision", "max_mod_revision",
                 "min_create_revision", "max_create_revision"):
        if body[name] < 0:
            raise invalid(f"range: {name} must not be negative")


def _validate_put(body: dict) -> None:
    if not body["key"]:
        raise QuorumError("EmptyKey")
    if body["ignore_value"] and body["value"]:
        raise QuorumError("ValueProvided")
    if body["ignore_lease"] and body["lease"]:
        raise QuorumError("LeaseProvided")


def _validate_delete_range(body: dict) -> None:
    if not body["key"]:
        raise QuorumError("EmptyKey")


def _validate_compare(item: object) -> dict:
    compare = _check_fields("txn compare", item, COMPARE_SCHEMA)
    _check_enum("txn compare", "result", compare["result"], range(0, 4))
    _check_enum("txn compare", "target", compare["target"], range(0, 5))
    if not compare["key"]:
        raise QuorumError("EmptyKey")
    return compare


def _validate_txn(body: dict, limits: Limits) -> None:
    if max(len(body["compare"]), len(body["success"]), len(body["failure"])) > limits.max_txn_ops:
        raise QuorumError("TooManyOps")
    body["compare"] = [_validate_compare(item) for item in body["compare"]]
    body["success"] = [_validate_txn_item(item, limits) for item in body["success"]]
    body["failure"] = [_validate_txn_item(item, limits) for item in body["failure"]]
    for branch in ("success", "failure"):
        _check_txn_intervals(body[branch])


def _validate_txn_item(item: object, limits: Limits) -> dict:
    if not isinstance(item, dict) or len(item) != 1:
        raise invalid("txn: each op is a map with exactly one of " + ", ".join(TXN_REQUEST_OPS))
    (field, sub_body), = item.items()
    if field not in TXN_REQUEST_OPS:
        raise invalid(f"txn: unknown op {field!r}")
    return {field: validate_body(TXN_REQUEST_OPS[field], sub_body, limits)}


def _branch_writes(ops: list[dict]) -> tuple[set[bytes], list[tuple[bytes, bytes]]]:
    """Keys put and ranges deleted by a txn branch, nested txns included."""
    puts: set[bytes] = set()
    deletes: list[tuple[bytes, bytes]] = []
    for item in ops:
        (field, body), = item.items()
        if field == "request_put":
            if body["key"] in puts:
                raise QuorumError("DuplicateKey")
            puts.add(body["key"])
        elif field == "request_delete_range":
            deletes.append((body["key"], body["range_end"]))
        elif field == "request_txn":
            # Only one nested branch runs, so the two may share keys with each
            # other but not with this branch.
            nested_puts: set[bytes] = set()
            for branch in ("success", "failure"):
                branch_puts, branch_deletes = _branch_writes(body[branch])
                nested_puts |= branch_puts
                deletes.extend(branch_deletes)
            if puts & nested_puts:
                raise QuorumError("DuplicateKey")
            puts |= nested_puts
    return puts, deletes


def key_in_range(key: bytes, start: bytes, end: bytes) -> bool:
    """Whether `key` falls in etcd's range [start, end) (end b"" = just start, b"\\0" = to the end)."""
    if not end:
        return key == start
    if end == b"\x00":
        return key >= start
    return start <= key < end


def _check_txn_intervals(ops: list[dict]) -> None:
    # etcd refuses a txn branch that puts one key twice, or puts a key that the
    # same branch also deletes: the outcome would depend on op order.
    puts, deletes = _branch_writes(ops)
    for start, end in deletes:
        for key in puts:
            if key_in_range(key, start, end):
                raise QuorumError("DuplicateKey")


_OP_CHECKS = {
    "range": _validate_range,
    "put": _validate_put,
    "delete_range": _validate_delete_range,
}


def validate_body(op: str, body: object, limits: Limits) -> dict:
    schema = SCHEMAS.get(op)
    if schema is None:
        raise QuorumError("UnknownOp", repr(op))
    if body is None:
        body = {}
    normalised = _check_fields(op, body, schema)
    if op == "txn":
        _validate_txn(normalised, limits)
    elif op in _OP_CHECKS:
        _OP_CHECKS[op](normalised)
    elif op == "alarm":
        _check_enum("alarm", "action", normalised["action"], range(0, 3))
        _check_enum("alarm", "alarm", normalised["alarm"], range(0, 3))
    elif op == "compaction" and normalised["revision"] < 0:
        raise invalid("compaction: revision must not be negative")
    elif op == "watch_create":
        _validate_watch_create(normalised)
    elif op == "lease_grant" and normalised["ID"] < 0:
        raise invalid("lease_grant: ID must not be negative")
    elif op in ("member_add", "member_update"):
        urls = normalised["peerURLs"]
        if not urls or not all(isinstance(url, str) and url for url in urls):
            raise QuorumError("MemberBadURLs")
    return normalised


# The membership operations (the raft log answers them).
MEMBER_OPS = frozenset({"member_list", "member_add", "member_remove", "member_update", "member_promote",
                        "move_leader"})


def _validate_watch_create(body: dict) -> None:
    if not body["key"]:
        raise QuorumError("EmptyKey")
    if body["start_revision"] < 0:
        raise invalid("watch_create: start_revision must not be negative")
    if body["watch_id"] < 0:
        raise invalid("watch_create: watch_id must not be negative (0 = let the server pick)")
    if len(body["filters"]) > 2 or any(type(f) is not int or f not in (0, 1) for f in body["filters"]):
        raise invalid("watch_create: filters are 0 NOPUT and 1 NODELETE")


def validate_request(op: object, body: object, limits: Limits) -> dict:
    if not isinstance(op, str):
        raise QuorumError("UnknownOp", repr(op))
    return validate_body(op, body, limits)


def is_write(op: str, body: dict) -> bool:
    """Whether the request must go through the raft log.

    A txn whose branches only read is still a write in etcd when it
    compares (it is serialised through the log for a linearizable answer);
    quorumkv does the same so every txn gets a single linearization point.
    """
    if op == "alarm":
        return body["action"] != ALARM_GET
    return op in WRITE_OPS
