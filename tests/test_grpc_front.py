"""Goal: the gRPC front end's protobuf <-> dict conversion is a faithful copy.
Method: convert etcd requests to our dicts and check them against the
schemas; convert our response dicts (snake_case, quorumkv's extra fields)
to etcd's messages and check every field, camelCase ones included."""

from __future__ import annotations

from actors.grpc_front import to_body, to_message
from protocol import messages
from protocol.etcd.etcdserverpb import rpc_pb2 as pb
from protocol.limits import Limits


def test_requests_become_valid_request_dicts():
    txn = pb.TxnRequest(
        compare=[pb.Compare(key=b"k", target=pb.Compare.VALUE, result=pb.Compare.NOT_EQUAL, value=b"v")],
        success=[pb.RequestOp(request_put=pb.PutRequest(key=b"k", value=b"w", prev_kv=True))],
        failure=[pb.RequestOp(request_range=pb.RangeRequest(key=b"a", range_end=b"b", sort_order=2))])
    body = to_body(txn)
    assert body == {"compare": [{"key": b"k", "target": 3, "result": 3, "value": b"v"}],
                    "success": [{"request_put": {"key": b"k", "value": b"w", "prev_kv": True}}],
                    "failure": [{"request_range": {"key": b"a", "range_end": b"b", "sort_order": 2}}]}
    normalised = messages.validate_request("txn", body, Limits())
    assert normalised["failure"][0]["request_range"]["sort_order"] == messages.SORT_DESCEND
    assert to_body(pb.LeaseGrantRequest(TTL=10, ID=7)) == {"TTL": 10, "ID": 7}
    assert to_body(pb.RangeRequest(key=b"x")) == {"key": b"x"}  # defaults left to the schema


def test_responses_become_etcds_messages():
    header = {"cluster_id": 1, "member_id": 2, "revision": 3, "raft_term": 4}
    status = to_message(pb.StatusResponse, {
        "header": header, "version": "3.4.0-quorumkv.0.1", "db_size": 100, "db_size_in_use": 50,
        "leader": 2, "raft_index": 9, "raft_term": 4, "raft_applied_index": 8, "errors": ["x"], "is_learner": False})
    assert (status.dbSize, status.dbSizeInUse, status.raftIndex, status.raftTerm, status.raftAppliedIndex) == \
        (100, 50, 9, 4, 8)
    assert status.header.raft_term == 4 and list(status.errors) == ["x"]
    alarms = to_message(pb.AlarmResponse, {"header": header, "alarms": [{"member_id": 2, "alarm": 1}]})
    assert alarms.alarms[0].memberID == 2 and alarms.alarms[0].alarm == pb.NOSPACE
    kv = {"key": b"k", "create_revision": 2, "mod_revision": 3, "version": 2, "value": b"v", "lease": 0}
    put = to_message(pb.PutResponse, {"header": header, "prev_kv": None})
    assert not put.HasField("prev_kv")
    txn = to_message(pb.TxnResponse, {"header": header, "succeeded": True, "responses": [
        {"response_range": {"header": {"revision": 3}, "kvs": [kv], "more": False, "count": 1}},
        {"response_put": {"header": {"revision": 3}, "prev_kv": kv}}]})
    assert txn.responses[0].response_range.kvs[0].value == b"v"
    assert txn.responses[1].response_put.prev_kv.mod_revision == 3
    ttl = to_message(pb.LeaseTimeToLiveResponse, {"header": header, "ID": 5, "TTL": 9, "grantedTTL": 10,
                                                  "keys": [b"a"], "quorumkv_only": 1})
    assert (ttl.ID, ttl.TTL, ttl.grantedTTL, list(ttl.keys)) == (5, 9, 10, [b"a"])
