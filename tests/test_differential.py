"""Goal: quorumkv answers etcd's gRPC API as real etcd 3.4 does.

Method: start a fresh real etcd (tests/etcd_server.py: Debian's etcd-server on
spare loopback ports) and a fresh quorumkv node, run one scripted scenario of
many requests against both through the generated stubs, one step at a time on
each, and compare every answer field by field: a response as the dict
protobuf's json_format makes of it, an error as its gRPC status code and
message. Fields that legitimately differ are normalised first (each with its
reason, in `normalise`). Steps whose answers still differ must be listed in
`KNOWN_DIFFERENCES` with the reason (and in README "Differences from etcd");
a listed step that matches again fails too, so the list stays true. On
failure the test prints each differing step with both answers and a diff.

The same is done for etcdctl commands (`-w json` mostly: output, exit code,
last stderr line) and for Watch streams (each watch's responses in order,
consecutive event responses merged). Requests that crash etcd 3.4.23 itself
(`ETCD_CRASHES`) are only sent to quorumkv, which must refuse them.

Answers to last session's open questions, checked here against etcd 3.4.23:
compaction 0 on a never-compacted store is accepted (once), as is 1 after it;
a watch starting exactly at the compact revision is not canceled and does
not get a DELETE made at that revision (compaction removed the tombstone);
a txn that puts and deletes one key (either order, or a put inside a deleted
range) is refused with "duplicate key given in txn request".
"""

from __future__ import annotations

import difflib
import json
import os
import queue
import re
import shutil
import subprocess

import grpc
import pytest
from google.protobuf import json_format

from protocol.etcd.etcdserverpb import rpc_pb2 as pb, rpc_pb2_grpc as pb_grpc
from tests.etcd_server import etcd_factory, etcd_server  # noqa: F401 (fixtures used by name)

CALL_TIMEOUT_S = 15
TRANSPORT_FAILURES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"}
MIB = 1024 * 1024
MEMBER = "<member id>"
CLUSTER = "<cluster id>"

# Steps whose answers differ from etcd's, with the reason. Each is in README
# "Differences from etcd".
NEGATIVE_REFUSED = "quorumkv refuses a negative revision, revision filter or limit as InvalidArgument " \
                   "(a client bug); etcd reads a revision <= 0 as the current one, a limit <= 0 as none, " \
                   "filters by a negative min/max as a number, and answers Compacted to a negative compaction"
UNKNOWN_ENUM = "quorumkv refuses an enum value etcd does not define as InvalidArgument; etcd takes it " \
               "(an unknown compare result or target is true, an unknown sort order is none) or crashes " \
               "(ETCD_CRASHES)"
KNOWN_DIFFERENCES: dict[str, str] = {
    "range with an unknown sort order": UNKNOWN_ENUM,
    "txn with an unknown compare result": UNKNOWN_ENUM,
    "txn with an unknown compare target": UNKNOWN_ENUM,
    "compact a negative revision": NEGATIVE_REFUSED,
    "range at a negative revision": NEGATIVE_REFUSED,
    "range with a negative limit": NEGATIVE_REFUSED,
    "range with a negative min_mod_revision": NEGATIVE_REFUSED,
    "range with a negative max_mod_revision": NEGATIVE_REFUSED,
    "range with a negative min_create_revision": NEGATIVE_REFUSED,
    "range with a negative max_create_revision": NEGATIVE_REFUSED,
    "put a value above what gRPC accepts": "same code (RESOURCE_EXHAUSTED) and sizes, but the text is "
                                           "grpcio's ('SERVER: Received message larger than max ...'), "
                                           "not grpc-go's ('grpc: received message larger than max ...')",
    "read-only txn above --max-request-bytes": "etcd serves a txn that only reads without the raft log, so "
                                               "no size bound but gRPC's; quorumkv puts every txn through "
                                               "the log, so --max-request-bytes applies",
}


# ---- the scenario ------------------------------------------------------------

def prefix_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


def put(key: bytes, value: bytes = b"", **fields):
    return ("kv", "Put", pb.PutRequest(key=key, value=value, **fields))


def get(key: bytes, range_end: bytes = b"", **fields):
    return ("kv", "Range", pb.RangeRequest(key=key, range_end=range_end, **fields))


def delete(key: bytes, range_end: bytes = b"", **fields):
    return ("kv", "DeleteRange", pb.DeleteRangeRequest(key=key, range_end=range_end, **fields))


def txn(compare=(), success=(), failure=()):
    return ("kv", "Txn", pb.TxnRequest(compare=list(compare), success=list(success), failure=list(failure)))


def compact(revision: int, physical: bool = False):
    return ("kv", "Compact", pb.CompactionRequest(revision=revision, physical=physical))


def grant(ttl: int, lease_id: int = 0):
    return ("lease", "LeaseGrant", pb.LeaseGrantRequest(TTL=ttl, ID=lease_id))


def revoke(lease_id: int):
    return ("lease", "LeaseRevoke", pb.LeaseRevokeRequest(ID=lease_id))


def time_to_live(lease_id: int, keys: bool = False):
    return ("lease", "LeaseTimeToLive", pb.LeaseTimeToLiveRequest(ID=lease_id, keys=keys))


def keep_alive(lease_id: int):
    """One keep-alive on a LeaseKeepAlive stream; the answer is the stream's first response."""
    return ("lease", "LeaseKeepAlive", pb.LeaseKeepAliveRequest(ID=lease_id))


def op_put(key: bytes, value: bytes = b"", **fields):
    return pb.RequestOp(request_put=pb.PutRequest(key=key, value=value, **fields))


def op_get(key: bytes, range_end: bytes = b"", **fields):
    return pb.RequestOp(request_range=pb.RangeRequest(key=key, range_end=range_end, **fields))


def op_delete(key: bytes, range_end: bytes = b"", **fields):
    return pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=key, range_end=range_end, **fields))


def op_txn(compare=(), success=(), failure=()):
    return pb.RequestOp(request_txn=pb.TxnRequest(compare=list(compare), success=list(success),
                                                  failure=list(failure)))


def cmp(key: bytes, target: str, result: str, value, range_end: bytes = b""):
    """A Compare: target VERSION|CREATE|MOD|VALUE|LEASE, result EQUAL|GREATER|LESS|NOT_EQUAL."""
    field = {"VERSION": "version", "CREATE": "create_revision", "MOD": "mod_revision",
             "VALUE": "value", "LEASE": "lease"}[target]
    return pb.Compare(key=key, range_end=range_end, target=getattr(pb.Compare, target),
                      result=getattr(pb.Compare, result), **{field: value})


LEASE_A, LEASE_B, LEASE_EMPTY = 1001, 1002, 1003
EXPLICIT_LEASES = set(range(1001, 1007))  # every lease id the scenario gives; others are the server's
ASC, DESC, NONE = pb.RangeRequest.ASCEND, pb.RangeRequest.DESCEND, pb.RangeRequest.NONE
ALL = (b"\0", b"\0")  # every key


def scenario() -> list[tuple[str, tuple]]:
    """(label, (service, method, request)) in order; the comments are etcd's revisions."""
    steps = [
        ("hash of an empty store", ("maintenance", "HashKV", pb.HashKVRequest())),
        ("range on an empty store", get(*ALL)),
        # Open question (a): compaction of a never-compacted store.
        ("compact 0 on a never-compacted store", compact(0)),
        ("compact 0 again", compact(0)),
        ("compact 1 after compact 0", compact(1)),
        ("compact 1 again", compact(1)),
        ("compact a future revision", compact(100)),
        ("compact a negative revision", compact(-1)),
        ("lease grant A", grant(600, LEASE_A)),
        ("lease grant B", grant(600, LEASE_B)),
        ("lease grant EMPTY", grant(600, LEASE_EMPTY)),
        ("lease grant an existing id", grant(600, LEASE_A)),
        ("lease grant with a server-chosen id", grant(600)),
        ("lease grant a TTL that is too large", grant(9_000_000_001, 1004)),
        ("lease grant TTL 0", grant(0, 1005)),
        ("lease revoke the TTL 0 lease", revoke(1005)),
        ("put a", put(b"a", b"1")),  # 2
        ("put b with lease A", put(b"b", b"1", lease=LEASE_A)),  # 3
        ("put c with lease A", put(b"c", b"1", lease=LEASE_A)),  # 4
        ("put a again with prev_kv", put(b"a", b"2", prev_kv=True)),  # 5
        ("put d/x", put(b"d/x", b"x1")),  # 6
        ("put d/y with lease B", put(b"d/y", b"y1", lease=LEASE_B)),  # 7
        ("put d/z with an empty value", put(b"d/z")),  # 8
        ("put e", put(b"e", b"zz")),  # 9
        ("put a binary key", put(b"\x00\xffk", b"\x01\x02")),  # 10
        ("put d/x again", put(b"d/x", b"x2", prev_kv=True)),  # 11
        ("put with prev_kv on a new key", put(b"f", b"1", prev_kv=True)),  # 12
        ("put with a lease that does not exist", put(b"g", b"1", lease=9999)),
        ("put an empty key", put(b"", b"1")),
        ("put ignore_value on a key", put(b"a", ignore_value=True, prev_kv=True)),  # 13
        ("put ignore_value with a value", put(b"a", b"3", ignore_value=True)),
        ("put ignore_value on a missing key", put(b"missing", ignore_value=True)),
        ("put ignore_lease keeps the lease", put(b"b", b"2", ignore_lease=True, prev_kv=True)),  # 14
        ("put ignore_lease with a lease", put(b"b", b"2", ignore_lease=True, lease=LEASE_A)),
        ("put ignore_lease on a missing key", put(b"missing", b"1", ignore_lease=True)),
        ("put both ignore flags", put(b"a", ignore_value=True, ignore_lease=True)),  # 15
        ("range one key", get(b"a")),
        ("range a missing key", get(b"missing")),
        ("range an empty key", get(b"")),
        ("range a prefix", get(b"d/", prefix_end(b"d/"))),
        ("range from a key", get(b"c", b"\0")),
        ("range everything", get(*ALL)),
        ("range with range_end before key", get(b"e", b"a")),
        ("range limit 2", get(*ALL, limit=2)),
        ("range limit larger than the result", get(*ALL, limit=100)),
        ("range limit 2 sorted by key descending", get(*ALL, limit=2, sort_order=DESC)),
        ("range count_only", get(*ALL, count_only=True)),
        ("range keys_only", get(*ALL, keys_only=True)),
        ("range keys_only and count_only", get(*ALL, keys_only=True, count_only=True)),
        ("range count_only with a limit", get(*ALL, count_only=True, limit=1)),
        ("range serializable", get(*ALL, serializable=True)),
        ("range min_mod_revision", get(*ALL, min_mod_revision=9)),
        ("range max_mod_revision", get(*ALL, max_mod_revision=6)),
        ("range min_create_revision", get(*ALL, min_create_revision=6)),
        ("range max_create_revision", get(*ALL, max_create_revision=4)),
        ("range min and max mod revision", get(*ALL, min_mod_revision=4, max_mod_revision=11)),
        ("range mod filter with a limit", get(*ALL, min_mod_revision=6, limit=2)),
        ("range at revision 3", get(*ALL, revision=3)),
        ("range one key at revision 2", get(b"a", revision=2)),
        ("range at a future revision", get(b"a", revision=1000)),
        ("range at a negative revision", get(b"a", revision=-1)),
        ("range with a negative limit", get(*ALL, limit=-1)),
        ("range with an unknown sort order", get(*ALL, sort_order=7, keys_only=True)),
        ("txn with an unknown compare result", txn([pb.Compare(key=b"a", result=9, target=pb.Compare.VERSION,
                                                               version=1)], [op_get(b"a")], [op_get(b"e")])),
        ("txn with an unknown compare target", txn([pb.Compare(key=b"a", result=pb.Compare.EQUAL, target=9)],
                                                   [op_get(b"a")], [op_get(b"e")])),
        ("range with a negative min_mod_revision", get(*ALL, min_mod_revision=-1, keys_only=True)),
        ("range with a negative max_mod_revision", get(*ALL, max_mod_revision=-1)),
        ("range with a negative min_create_revision", get(*ALL, min_create_revision=-5, count_only=True)),
        ("range with a negative max_create_revision", get(*ALL, max_create_revision=-5)),
        ("lease keep-alive A", keep_alive(LEASE_A)),
        ("lease keep-alive of a missing lease", keep_alive(9999)),
    ]
    targets = [("KEY", pb.RangeRequest.KEY), ("VERSION", pb.RangeRequest.VERSION),
               ("CREATE", pb.RangeRequest.CREATE), ("MOD", pb.RangeRequest.MOD),
               ("VALUE", pb.RangeRequest.VALUE)]
    for target_name, target in targets:
        for order_name, order in (("NONE", NONE), ("ASCEND", ASC), ("DESCEND", DESC)):
            steps.append((f"range sorted by {target_name} {order_name}",
                          get(*ALL, sort_target=target, sort_order=order)))
        steps.append((f"range sorted by {target_name} DESCEND limit 3",
                      get(*ALL, sort_target=target, sort_order=DESC, limit=3)))
    steps += [
        # Txn compares: every target and result, on a key that exists.
        *[(f"txn compare {target} {result}", txn([cmp(b"a", target, result, value)],
                                                 [op_get(b"a")], [op_get(b"e")]))
          for target, value in (("VERSION", 3), ("CREATE", 2), ("MOD", 5), ("VALUE", b"2"), ("LEASE", 0))
          for result in ("EQUAL", "GREATER", "LESS", "NOT_EQUAL")],
        ("txn compare LEASE of a key with a lease", txn([cmp(b"b", "LEASE", "EQUAL", LEASE_A)], [op_get(b"b")])),
        ("txn compare on a missing key VERSION 0", txn([cmp(b"missing", "VERSION", "EQUAL", 0)],
                                                       [op_put(b"h", b"1")])),  # 16
        ("txn compare on a missing key CREATE 0", txn([cmp(b"missing2", "CREATE", "EQUAL", 0)], [op_get(b"h")])),
        ("txn compare on a missing key VALUE", txn([cmp(b"missing", "VALUE", "EQUAL", b"")], [op_get(b"h")],
                                                   [op_get(b"a")])),
        ("txn compare over a range (all match)", txn([cmp(b"d/", "VERSION", "GREATER", 0, prefix_end(b"d/"))],
                                                     [op_get(b"d/", prefix_end(b"d/"))])),
        ("txn compare over a range (one fails)", txn([cmp(b"d/", "MOD", "LESS", 8, prefix_end(b"d/"))],
                                                     [op_get(b"a")], [op_get(b"d/", prefix_end(b"d/"), keys_only=True)])),
        ("txn several compares, all true", txn([cmp(b"a", "VALUE", "EQUAL", b"2"), cmp(b"e", "VERSION", "EQUAL", 1)],
                                               [op_put(b"i", b"1", prev_kv=True), op_get(b"i"),
                                                op_delete(b"h", prev_kv=True)])),  # 17
        ("txn several compares, one false", txn([cmp(b"a", "VALUE", "EQUAL", b"2"), cmp(b"e", "VERSION", "EQUAL", 9)],
                                                [op_put(b"i", b"2")], [op_put(b"j", b"1"), op_get(b"j")])),  # 18
        ("txn with no compares", txn([], [op_get(b"a"), op_put(b"k", b"1")])),  # 19
        ("empty txn", txn()),
        ("txn that only reads", txn([], [op_get(*ALL, count_only=True), op_get(b"a", revision=3)])),
        ("txn with a nested txn", txn([cmp(b"a", "VERSION", "GREATER", 0)],
                                      [op_put(b"l", b"1"),
                                       op_txn([cmp(b"l", "VALUE", "EQUAL", b"1")],
                                              [op_put(b"m", b"1"), op_get(b"l")], [op_get(b"zz")]),
                                       op_get(b"m")])),  # 20
        ("txn nested in the failure branch", txn([cmp(b"a", "VERSION", "EQUAL", 0)], [op_get(b"a")],
                                                 [op_txn([], [op_delete(b"m", prev_kv=True)]), op_get(b"m")])),  # 21
        ("txn delete a range with prev_kv", txn([], [op_delete(b"d/", prefix_end(b"d/"), prev_kv=True)])),  # 22
        ("txn range at an older revision", txn([], [op_get(b"d/", prefix_end(b"d/"), revision=11)])),
        ("txn range at a future revision", txn([], [op_get(b"a", revision=1000)])),
        ("txn put with a missing lease", txn([], [op_put(b"n", b"1", lease=9999)])),
        ("txn put ignore_value on a missing key", txn([], [op_put(b"nothere", ignore_value=True)])),
        ("txn with an empty key in a put", txn([], [op_put(b"", b"1")])),
        ("txn with an empty key in a compare", txn([cmp(b"", "VERSION", "EQUAL", 0)], [op_get(b"a")])),
        ("txn with too many ops", txn([], [op_put(b"many%d" % i, b"1") for i in range(129)])),
        ("txn with 128 ops", txn([], [op_put(b"many%03d" % i, b"1") for i in range(128)])),  # 23
        ("txn with too many compares", txn([cmp(b"a", "VERSION", "GREATER", 0)] * 129, [op_get(b"a")])),
        ("txn putting one key twice", txn([], [op_put(b"x", b"1"), op_put(b"x", b"2")])),
        # Open question (c): put and delete of the same key in one txn.
        ("txn put then delete of one key", txn([], [op_put(b"x", b"1"), op_delete(b"x")])),
        ("txn delete then put of one key", txn([], [op_delete(b"a"), op_put(b"a", b"1")])),
        ("txn put inside a deleted range", txn([], [op_delete(b"a", b"c"), op_put(b"b", b"9")])),
        ("txn deleting one key twice", txn([], [op_delete(b"x"), op_delete(b"x")])),
        ("txn put in a branch and in its nested txn", txn([], [op_put(b"x", b"1"),
                                                               op_txn([], [op_put(b"x", b"2")])])),
        ("txn same key in the two branches of a nested txn", txn([], [op_txn([], [op_put(b"x", b"1")],
                                                                              [op_put(b"x", b"2")])])),  # 24
        ("txn same key in success and failure", txn([cmp(b"a", "VERSION", "GREATER", 0)],
                                                    [op_put(b"y", b"1")], [op_put(b"y", b"2")])),  # 25
        ("txn put and read back one key", txn([], [op_put(b"z", b"1"), op_get(b"z"), op_get(*ALL, count_only=True)])),
        ("delete a key with prev_kv", delete(b"e", prev_kv=True)),
        ("delete a missing key", delete(b"missing", prev_kv=True)),
        ("delete an empty key", delete(b"")),
        ("delete a range without prev_kv", delete(b"many000", b"many010")),
        ("delete from a key with prev_kv", delete(b"many120", b"\0", prev_kv=True)),
        ("put c without a lease detaches it from A", put(b"c", b"2", prev_kv=True)),
        ("put i with lease B", put(b"i", b"3", lease=LEASE_B)),
        ("put i with lease A moves it from B", put(b"i", b"4", lease=LEASE_A, prev_kv=True)),
        ("lease time-to-live A with keys", time_to_live(LEASE_A, keys=True)),
        ("lease time-to-live B with keys", time_to_live(LEASE_B, keys=True)),
        ("lease time-to-live B without keys", time_to_live(LEASE_B)),
        ("lease time-to-live of a missing lease", time_to_live(9999, keys=True)),
        ("lease leases", ("lease", "LeaseLeases", pb.LeaseLeasesRequest())),
        ("lease revoke A (deletes its keys)", revoke(LEASE_A)),
        ("range the keys of revoked A", get(b"b", b"d")),
        ("lease revoke A again", revoke(LEASE_A)),
        ("lease revoke a lease without keys", revoke(LEASE_EMPTY)),
        ("lease revoke a missing lease", revoke(9999)),
        ("lease time-to-live of revoked A", time_to_live(LEASE_A, keys=True)),
        ("range after the revokes", get(*ALL, keys_only=True)),
        ("hash before compaction", ("maintenance", "HashKV", pb.HashKVRequest())),
        ("compact 12 physically", compact(12, physical=True)),
        ("range at a compacted revision", get(b"a", revision=11)),
        ("range at the compact revision", get(*ALL, revision=12)),
        ("range one key at the compact revision", get(b"a", revision=12)),
        ("range min_mod_revision below the compact revision", get(*ALL, min_mod_revision=3, keys_only=True)),
        ("txn range at a compacted revision", txn([], [op_get(b"a", revision=5)])),
        ("compact below the compact revision", compact(5)),
        ("compact at the compact revision", compact(12)),
        ("hash at the compact revision", ("maintenance", "HashKV", pb.HashKVRequest(revision=12))),
        ("hash below the compact revision", ("maintenance", "HashKV", pb.HashKVRequest(revision=3))),
        ("hash at a future revision", ("maintenance", "HashKV", pb.HashKVRequest(revision=1000))),
        ("hash after compaction", ("maintenance", "HashKV", pb.HashKVRequest())),
        ("put a value above --max-request-bytes", put(b"big", b"v" * (MIB + MIB // 2 + 1024))),
        ("put a value above what gRPC accepts", put(b"big", b"v" * (2 * MIB + 1024))),
        ("range with a key above --max-request-bytes", get(b"k" * (MIB + MIB // 2 + 1024))),
        ("read-only txn above --max-request-bytes", txn([], [op_get(b"k" * (MIB + MIB // 2 + 1024))])),
        ("put a value just below --max-request-bytes", put(b"big", b"v" * (MIB + MIB // 2 - 1024))),
        ("range the big value's size", get(b"big", count_only=True)),
        ("status", ("maintenance", "Status", pb.StatusRequest())),
        ("alarm list", ("maintenance", "Alarm", pb.AlarmRequest(action=pb.AlarmRequest.GET))),
        ("alarm deactivate an alarm that is not raised",
         ("maintenance", "Alarm", pb.AlarmRequest(action=pb.AlarmRequest.DEACTIVATE, alarm=pb.NOSPACE))),
        ("defragment", ("maintenance", "Defragment", pb.DefragmentRequest())),
        ("range everything at the end", get(*ALL)),
        # Last: a lease below the minimum TTL gets the minimum (it may expire afterwards).
        ("lease grant TTL 1 gets the minimum TTL", grant(1, 1006)),
    ]
    return steps


# ---- running and normalising ---------------------------------------------------

class Endpoint:
    """gRPC stubs for one server."""

    def __init__(self, address: str):
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 * MIB),
                                                               ("grpc.max_send_message_length", 64 * MIB)])
        self.stubs = {"kv": pb_grpc.KVStub(self.channel), "lease": pb_grpc.LeaseStub(self.channel),
                      "maintenance": pb_grpc.MaintenanceStub(self.channel), "watch": pb_grpc.WatchStub(self.channel)}

    def run(self, service: str, method: str, request) -> dict:
        try:
            if method == "LeaseKeepAlive":
                response = next(self.stubs[service].LeaseKeepAlive(iter([request]), timeout=CALL_TIMEOUT_S))
            else:
                response = getattr(self.stubs[service], method)(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as error:
            return {"error": {"code": error.code().name, "message": error.details()}}
        return {"response": json_format.MessageToDict(response, preserving_proto_field_name=True)}

    def close(self) -> None:
        self.channel.close()


# The longest a test here runs between a grant and a time-to-live (a loaded machine).
TTL_TICK_TOLERANCE_S = 60
TTL_TICKING = "<granted TTL, less the time the test took>"


def ttl_ticking(granted_s: int, remaining_s: int) -> bool:
    return granted_s > TTL_TICK_TOLERANCE_S and granted_s - TTL_TICK_TOLERANCE_S <= remaining_s <= granted_s


def normalise(method: str, answer: dict) -> dict:
    """The answer with what legitimately differs between two clusters replaced or removed."""
    response = answer.get("response")
    if response is None:
        return answer
    response = json.loads(json.dumps(response))
    member = None
    for header in _headers(response):
        # Ids are random per cluster and member; raft's term depends on how
        # each server elected itself (etcd starts at term 2, a single
        # quorumkv member at 1): neither is about the API's behaviour.
        if "member_id" in header:
            member, header["member_id"] = header["member_id"], MEMBER
        if "cluster_id" in header:
            header["cluster_id"] = CLUSTER
        header.pop("raft_term", None)
    if method == "Status":
        # Version strings, database size and raft's log indexes and term are
        # each server's own (different storage engines and log entries per
        # request); the leader must be the member itself.
        for field in ("version", "dbSize", "dbSizeInUse", "raftIndex", "raftTerm", "raftAppliedIndex"):
            if field in response:
                response[field] = f"<{field}>"
        if response.get("leader") == member:
            response["leader"] = MEMBER
    elif method == "HashKV":
        # etcd hashes its bolt keys and values; quorumkv its own records
        # (README "Differences from etcd"): the value cannot match.
        response["hash"] = "<hash>"
    elif method == "LeaseGrant":
        # A server-chosen lease id is random-ish in both.
        if int(response.get("ID", 0)) not in EXPLICIT_LEASES:
            response["ID"] = "<server-chosen lease id>"
    elif method == "LeaseTimeToLive":
        # The remaining TTL ticks on while the test runs (whole seconds, and
        # the two servers are asked at different times): within the test's
        # time of the granted TTL is the same answer.
        if ttl_ticking(int(response.get("grantedTTL", 0)), int(response.get("TTL", 0))):
            response["TTL"] = TTL_TICKING
        # etcd lists a lease's keys in Go map order.
        if "keys" in response:
            response["keys"] = sorted(response["keys"])
    elif method == "LeaseLeases":
        # Go map order again, and a server-chosen id normalised as in LeaseGrant.
        ids = [int(lease["ID"]) for lease in response.get("leases", [])]
        response["leases"] = sorted(str(lease_id) if lease_id in EXPLICIT_LEASES else "<server-chosen lease id>"
                                    for lease_id in ids)
    return {"response": response}


def _headers(value):
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "header" and isinstance(item, dict):
                yield item
            else:
                yield from _headers(item)
    elif isinstance(value, list):
        for item in value:
            yield from _headers(item)


def describe(request) -> str:
    text = str(request).replace("\n", " ")
    return text if len(text) < 300 else text[:300] + f"... ({request.ByteSize()} bytes)"


def render(answer: dict) -> list[str]:
    return json.dumps(answer, indent=1, sort_keys=True).splitlines()


def differences(steps, etcd: Endpoint, ours: Endpoint) -> tuple[list[str], list[str]]:
    """(reports of unexpected differences, labels of known differences that now match)."""
    reports, fixed = [], []
    for label, (service, method, request) in steps:
        expected = normalise(method, etcd.run(service, method, request))
        got = normalise(method, ours.run(service, method, request))
        for server, answer in (("etcd", expected), ("quorumkv", got)):
            # A server that is gone would "match" the other one's failure.
            assert answer.get("error", {}).get("code") not in TRANSPORT_FAILURES, (server, label, answer)
        if expected == got:
            if label in KNOWN_DIFFERENCES:
                fixed.append(label)
            continue
        if label in KNOWN_DIFFERENCES:
            continue
        diff = difflib.unified_diff(render(expected), render(got), "etcd", "quorumkv", lineterm="", n=2)
        reports.append(f"--- step {label!r}: {method} {describe(request)}\n" + "\n".join(diff))
    return reports, fixed


@pytest.fixture
def quorumkv(node_factory):
    # One gateway: a test's channel is one connection, served by one gateway anyway.
    return node_factory(gateways=1)


@pytest.fixture
def pair(etcd_server, quorumkv):
    """(etcd, quorumkv) gRPC endpoints on fresh servers."""
    etcd, ours = Endpoint(etcd_server.endpoint), Endpoint(f"127.0.0.1:{quorumkv.client_port}")
    try:
        yield etcd, ours
    finally:
        etcd.close()
        ours.close()


# Requests real etcd 3.4.23 crashes on (a nil pointer dereference in its
# applier's Range: the whole server exits): quorumkv refuses them instead.
ETCD_CRASHES = [
    ("range with an unknown sort target", get(*ALL, sort_target=9, sort_order=DESC)),
    ("range with an unknown sort target, no order", get(*ALL, sort_target=9)),
    ("alarm with an unknown action", ("maintenance", "Alarm", pb.AlarmRequest(action=7))),
]


def test_requests_that_crash_etcd_are_refused(quorumkv):
    """Goal: what crashes etcd is an InvalidArgument error here (README
    "Differences from etcd"). Method: send each to a node, which then serves on."""
    ours = Endpoint(f"127.0.0.1:{quorumkv.client_port}")
    try:
        for label, (service, method, request) in ETCD_CRASHES:
            answer = ours.run(service, method, request)
            assert answer.get("error", {}).get("code") == "INVALID_ARGUMENT", (label, answer)
        assert "response" in ours.run(*get(b"a")), "the node stopped serving"
    finally:
        ours.close()


def test_scenario_answers_as_etcd(pair):
    """Goal: every answer of the scripted scenario is etcd's, after normalising.
    Method: run each step on both servers in turn and compare (module docstring)."""
    etcd, ours = pair
    steps = scenario()
    assert len({label for label, _ in steps}) == len(steps), "step labels must be unique"
    reports, fixed = differences(steps, etcd, ours)
    message = ""
    if reports:
        message += f"{len(reports)} of {len(steps)} steps differ from etcd:\n\n" + "\n\n".join(reports)
    if fixed:
        message += "\n\nnow the same as etcd: remove from KNOWN_DIFFERENCES (and README): " + ", ".join(fixed)
    assert not message, message


# ---- etcdctl -w json -----------------------------------------------------------

ETCDCTL = shutil.which("etcdctl")


def etcdctl(endpoint: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([ETCDCTL, "--endpoints", endpoint, "--command-timeout=10s", *args], input=input,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "ETCDCTL_API": "3"})


# (label, etcdctl arguments, stdin). The state comes from the commands before.
ETCDCTL_COMMANDS = [
    ("put", ["put", "k1", "v1", "-w", "json"], None),
    ("put with a lease", ["put", "k2", "v2", "--lease", "3e9", "-w", "json"], None),
    ("put with prev-kv", ["put", "k1", "v1b", "--prev-kv", "-w", "json"], None),
    ("get a prefix", ["get", "k", "--prefix", "-w", "json"], None),
    ("get at a revision", ["get", "k1", "--rev", "2", "-w", "json"], None),
    ("get sorted, limited", ["get", "k", "--prefix", "--sort-by=MODIFY", "--order=DESCEND", "--limit", "1",
                             "-w", "json"], None),
    ("get keys only", ["get", "", "--from-key", "--keys-only", "-w", "json"], None),
    ("get a missing key", ["get", "missing", "-w", "json"], None),
    ("get fields", ["get", "k1", "-w", "fields"], None),
    ("txn", ["txn", "-w", "json"], 'value("k1") = "v1b"\n\nput k3 v3\nget k1\n\ndel k2\n\n'),
    ("txn failing", ["txn", "-w", "json"], 'mod("k1") = "1"\n\nput k3 v3\n\nget k3\n\n'),
    ("lease time-to-live with keys", ["lease", "timetolive", "3e9", "--keys", "-w", "json"], None),
    ("lease list", ["lease", "list", "-w", "json"], None),
    ("del with prev-kv", ["del", "k", "--prefix", "--prev-kv", "-w", "json"], None),
    ("get at a future revision", ["get", "k1", "--rev", "1000", "-w", "json"], None),
    ("compaction", ["compaction", "3", "--physical"], None),
    ("get at a compacted revision", ["get", "k1", "--rev", "2", "-w", "json"], None),
    ("lease revoke", ["lease", "revoke", "3e9", "-w", "json"], None),
    ("lease revoke again", ["lease", "revoke", "3e9"], None),
    ("compaction again", ["compaction", "3"], None),
    ("put ignore-lease", ["put", "k1", "v1c", "--ignore-lease", "-w", "json"], None),
    ("put ignore-value on a missing key", ["put", "nothere", "--ignore-value"], None),
    ("get print-value-only", ["get", "k1", "--print-value-only"], None),
    ("del from a key", ["del", "k", "--from-key", "-w", "json"], None),
    ("endpoint health", ["endpoint", "health", "-w", "json"], None),
    ("endpoint hashkv", ["endpoint", "hashkv", "-w", "json"], None),
    ("endpoint status", ["endpoint", "status", "-w", "json"], None),
    ("alarm list", ["alarm", "list", "-w", "json"], None),
    ("defrag", ["defrag"], None),
]


def normalise_etcdctl(text: str, endpoint: str) -> object:
    """etcdctl's output normalised as `normalise` does for gRPC answers, and its endpoint replaced."""
    text = text.replace(endpoint, "<endpoint>")
    # -w fields prints the header as lines of its own.
    text = re.sub(r'^"(ClusterID|MemberID)" : \d+$', r'"\1" : <id>', text, flags=re.M)
    text = re.sub(r'^"RaftTerm" : \d+\n', "", text, flags=re.M)
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if isinstance(value, list):
        # endpoint status / hashkv / health: [{"Endpoint": ..., "Status" | "HashKV": ...}]
        # (health's "took" is how long the check took).
        return [{key: "<duration>" if key == "took" else
                 normalise(key, {"response": item})["response"] if isinstance(item, dict) else item
                 for key, item in entry.items()} for entry in value]
    if isinstance(value, dict) and "cluster_id" in value:
        # The lease commands print the header's fields at the top level.
        value["cluster_id"], value["member_id"] = CLUSTER, MEMBER
        value.pop("raft_term", None)
        if ttl_ticking(value.get("granted-ttl", 0), value.get("ttl", -1)):
            value["ttl"] = TTL_TICKING
    return normalise("", {"response": value})["response"]


@pytest.fixture
def ctl_pair(etcd_server, quorumkv):
    """(etcd, quorumkv) client endpoints for etcdctl, on fresh servers."""
    if ETCDCTL is None:
        assert not os.environ.get("CI"), "CI must have etcdctl (tools/test.sh installs etcd-client)"
        pytest.skip("etcdctl not installed")
    yield etcd_server.endpoint, f"127.0.0.1:{quorumkv.client_port}"


def test_etcdctl_json_output_as_etcds(ctl_pair, pair):
    """Goal: etcdctl prints the same thing (json, exit code, stderr's last line)
    for both servers. Method: grant the lease the commands use over gRPC, run
    each command on both in turn, normalise as the gRPC scenario does."""
    etcd_endpoint, our_endpoint = ctl_pair
    for endpoint in pair:
        assert endpoint.run("lease", "LeaseGrant", pb.LeaseGrantRequest(TTL=600, ID=0x3e9)).get("response")
    reports = []
    for label, args, stdin in ETCDCTL_COMMANDS:
        answers = []
        for endpoint in (etcd_endpoint, our_endpoint):
            result = etcdctl(endpoint, *args, input=stdin)
            stderr_lines = result.stderr.strip().splitlines()
            # A server that is gone would "match" the other one's failure.
            assert not re.search(r"deadline exceeded|connection refused|Unavailable", result.stderr), \
                (endpoint, label, result.stderr)
            answers.append({"exit": result.returncode,
                            "stdout": normalise_etcdctl(result.stdout, endpoint),
                            "stderr": normalise_etcdctl(stderr_lines[-1], endpoint) if stderr_lines else ""})
        if answers[0] != answers[1] and label not in KNOWN_DIFFERENCES:
            diff = difflib.unified_diff(render(answers[0]), render(answers[1]), "etcd", "quorumkv", lineterm="", n=2)
            reports.append(f"--- etcdctl {' '.join(args)} ({label})\n" + "\n".join(diff))
    assert not reports, f"{len(reports)} etcdctl commands differ from etcd:\n\n" + "\n\n".join(reports)


# ---- watch --------------------------------------------------------------------

WATCH_TIMEOUT_S = 60  # the whole life of a watch stream, on a loaded machine


class WatchStream:
    """One gRPC Watch stream: requests from a queue, responses read on demand."""

    def __init__(self, endpoint: Endpoint):
        self.requests: queue.Queue = queue.Queue()
        self.call = endpoint.stubs["watch"].Watch(iter(self.requests.get, None), timeout=WATCH_TIMEOUT_S)

    def send(self, request) -> None:
        self.requests.put(request)

    def next(self) -> dict:
        return json_format.MessageToDict(next(self.call), preserving_proto_field_name=True)

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()


def watch_create(key: bytes, range_end: bytes = b"", **fields):
    return pb.WatchRequest(create_request=pb.WatchCreateRequest(key=key, range_end=range_end, **fields))


NOPUT, NODELETE = pb.WatchCreateRequest.NOPUT, pb.WatchCreateRequest.NODELETE
# The history written before the watches (etcd's revisions in the comments),
# then compacted at COMPACT_REVISION, where w/b was deleted.
WATCH_HISTORY = [
    put(b"w/a", b"1"),  # 2
    put(b"w/b", b"1"),  # 3
    put(b"w/c", b"1"),  # 4
    put(b"w/a", b"2"),  # 5
    delete(b"w/b"),  # 6
    put(b"w/b", b"2"),  # 7
    txn([], [op_put(b"w/a", b"3"), op_put(b"w/d", b"1")]),  # 8: two events in one revision
    delete(b"w/d"),  # 9
]
COMPACT_REVISION = 6
LIVE_REVISION = 10
# Written once every watch is created: an event for each of them.
WATCH_LIVE = txn([], [op_put(b"w/a", b"4"), op_put(b"w/b", b"3"), op_delete(b"w/c"), op_put(b"w/e", b"1")])
WATCHES = [
    ("one key from the compact revision, prev_kv", watch_create(b"w/a", start_revision=6, prev_kv=True)),
    # Open question (b): is the DELETE at the compact revision delivered?
    ("a key deleted at the compact revision, from there", watch_create(b"w/b", start_revision=COMPACT_REVISION)),
    ("below the compact revision", watch_create(b"w/a", start_revision=5)),
    ("everything from revision 1", watch_create(b"\0", b"\0", start_revision=1)),
    ("a prefix, NOPUT, prev_kv", watch_create(b"w/", prefix_end(b"w/"), start_revision=7, filters=[NOPUT],
                                              prev_kv=True)),
    ("from a key, NODELETE", watch_create(b"w/b", b"\0", start_revision=7, filters=[NODELETE])),
    ("a prefix, live only", watch_create(b"w/", prefix_end(b"w/"))),
    ("a prefix from the next revision", watch_create(b"w/", prefix_end(b"w/"), start_revision=LIVE_REVISION)),
    ("a missing key's live delete", watch_create(b"w/c", start_revision=LIVE_REVISION, prev_kv=True)),
]


def normalise_watch_response(response: dict) -> dict:
    return normalise("Watch", {"response": response})["response"]


def watch_answers(endpoint: Endpoint) -> dict:
    """label -> the normalised responses of each watch, then a progress and a cancel on the live one."""
    for service, method, request in WATCH_HISTORY + [compact(COMPACT_REVISION, physical=True)]:
        assert "response" in endpoint.run(service, method, request)
    streams, answers = {}, {}
    try:
        for label, request in WATCHES:
            stream = streams[label] = WatchStream(endpoint)
            stream.send(request)
            answers[label] = [normalise_watch_response(stream.next())]  # created
        assert "response" in endpoint.run(*WATCH_LIVE)
        for label, stream in streams.items():
            while True:  # until the live revision's events or the cancel; bounded by WATCH_TIMEOUT_S
                response = stream.next()
                answers[label].append(normalise_watch_response(response))
                if response.get("canceled") or any(int(event["kv"]["mod_revision"]) == LIVE_REVISION
                                                   for event in response.get("events", [])):
                    break
        live = streams["a prefix, live only"]
        live.send(pb.WatchRequest(progress_request=pb.WatchProgressRequest()))
        answers["progress on the live stream"] = [normalise_watch_response(live.next())]
        live.send(pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=0)))
        answers["cancel on the live stream"] = [normalise_watch_response(live.next())]
    finally:
        for stream in streams.values():
            stream.close()
    return answers


def merge_event_responses(responses: list[dict]) -> list[dict]:
    """Consecutive event responses as one, without their header revisions.

    etcd sends a watch's catch-up events, and the live ones written before
    its next 100 ms sync, in one response: how events are grouped depends on
    timing (in etcd too); the events and their order are what must match.
    """
    out: list[dict] = []
    for response in responses:
        only_events = set(response) <= {"header", "events", "watch_id"} and response.get("events")
        if only_events:
            response = {"watch_id": response.get("watch_id"), "events": list(response["events"])}
            if out and "events" in out[-1] and set(out[-1]) == {"watch_id", "events"}:
                out[-1]["events"].extend(response["events"])
                continue
        out.append(response)
    return out


def test_watch_answers_as_etcd(pair):
    """Goal: the Watch service streams etcd's responses for the same history.
    Method: write a history and compact it, open one watch per stream with each
    kind of range, start revision and filter, write one revision that all of
    them see, then compare each stream's responses, then a progress request
    and a cancel."""
    etcd, ours = pair
    expected, got = watch_answers(etcd), watch_answers(ours)
    expected = {label: merge_event_responses(responses) for label, responses in expected.items()}
    got = {label: merge_event_responses(responses) for label, responses in got.items()}
    reports = []
    for label in expected:
        if expected[label] == got[label]:
            if label in KNOWN_DIFFERENCES:
                reports.append(f"--- watch {label!r} is now the same as etcd's: remove it from "
                               "KNOWN_DIFFERENCES (and README)")
        elif label not in KNOWN_DIFFERENCES:
            diff = difflib.unified_diff(render(expected[label]), render(got[label]), "etcd", "quorumkv",
                                        lineterm="", n=3)
            reports.append(f"--- watch {label!r}\n" + "\n".join(diff))
    assert not reports, f"{len(reports)} watches differ from etcd:\n\n" + "\n\n".join(reports)


def stream_answers(endpoint: Endpoint) -> list:
    """One stream with several watches: ids chosen and assigned, a duplicate id,
    an unknown cancel, a live write seen by two watches, a cancel, no id reused."""
    stream = WatchStream(endpoint)
    answers = []
    try:
        for request in (watch_create(b"s/a"), watch_create(b"s/", prefix_end(b"s/"), watch_id=7),
                        watch_create(b"s/b", watch_id=7), watch_create(b"s/c", prev_kv=True)):
            stream.send(request)
            answers.append(normalise_watch_response(stream.next()))
        # etcd answers nothing to a cancel of an unknown id: the next answer is the progress one.
        stream.send(pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=99)))
        stream.send(pb.WatchRequest(progress_request=pb.WatchProgressRequest()))
        answers.append(normalise_watch_response(stream.next()))
        assert "response" in endpoint.run(*put(b"s/a", b"1"))
        # Watches 0 and 7 see it, each in a response of its own, in either order.
        answers.append(sorted((normalise_watch_response(stream.next()) for _ in range(2)),
                              key=lambda response: response.get("watch_id", "0")))
        stream.send(pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=7)))
        answers.append(normalise_watch_response(stream.next()))
        for step in (put(b"s/c", b"1"), delete(b"s/c")):  # watch 1 alone, with prev_kv
            assert "response" in endpoint.run(*step)
            answers.append(normalise_watch_response(stream.next()))
        # A canceled id is not given out again (etcd 3.4 counts ids up), so a
        # late response for the old watch cannot pass for the new one's.
        stream.send(pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=0)))
        stream.send(watch_create(b"s/d"))
        answers.extend(normalise_watch_response(stream.next()) for _ in range(2))
    finally:
        stream.close()
    return answers


def test_watch_stream_answers_as_etcd(pair):
    """Goal: several watches on one stream behave as etcd's (ids, errors, cancel).
    Method: the same requests on one stream to each server, answers compared in order."""
    etcd, ours = pair
    expected, got = stream_answers(etcd), stream_answers(ours)
    diff = difflib.unified_diff(render(expected), render(got), "etcd", "quorumkv", lineterm="", n=3)
    assert expected == got, "the stream's answers differ from etcd's:\n" + "\n".join(diff)
