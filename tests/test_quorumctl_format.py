"""quorumctl's output, argument checks and txn language against real etcdctl 3.4.

Goal: quorumctl prints exactly what etcdctl 3.4.23 prints for the same data.
Method: every expected text below was captured from the real etcdctl talking
to a real etcd 3.4.23 (a throwaway single member on loopback); the response
dicts hold the same data as quorumkv's client returns it (etcd's protobuf
field names), and the formatters must reproduce the captured text byte for
byte. Ids and revisions are those of the capture run. No server is needed.
"""

from __future__ import annotations

import io

import pytest

from protocol import messages
from tools import ctl_format
from tools.ctl_args import EXIT_BAD_ARGS, EXIT_INVALID_INPUT, CtlError, delete_request, get_request, parse_args, put_request
from tools.ctl_txn import argify, parse_compare, parse_request, read_txn
from tools.quorumctl import run

CLUSTER_ID = 324952591200643719
MEMBER_ID = 3319814642761637952


def header(revision: int) -> dict:
    return {"cluster_id": CLUSTER_ID, "member_id": MEMBER_ID, "revision": revision, "raft_term": 2}


def kv(key: bytes, value: bytes, create: int, mod: int, version: int, lease: int = 0) -> dict:
    return {"key": key, "create_revision": create, "mod_revision": mod, "version": version,
            "value": value, "lease": lease}


HDR10 = '"ClusterID" : 324952591200643719\n"MemberID" : 3319814642761637952\n"Revision" : 10\n"RaftTerm" : 2\n'
JSON_HDR10 = '"header":{"cluster_id":324952591200643719,"member_id":3319814642761637952,"revision":10,"raft_term":2}'

GET_FOO = {"header": header(10), "kvs": [kv(b"foo", b"bar4", 2, 10, 4)], "more": False, "count": 1}
GET_LIMIT = {"header": header(10), "kvs": [kv(b"foo", b"bar4", 2, 10, 4), kv(b"foo2", b"hello", 4, 4, 1)],
             "more": True, "count": 6}
GET_NONE = {"header": header(10), "kvs": [], "more": False, "count": 0}


# ---------------------------------------------------------------------------
# get


@pytest.mark.parametrize("write_out, response, options, expected", [
    ("simple", GET_FOO, {}, "foo\nbar4\n"),
    ("simple", GET_FOO, {"hex": True}, "\\x66\\x6f\\x6f\n\\x62\\x61\\x72\\x34\n"),
    ("simple", GET_LIMIT, {"print_value_only": True}, "bar4\nhello\n"),
    ("simple", GET_NONE, {}, ""),
    ("json", GET_FOO, {},
     "{" + JSON_HDR10 + ',"kvs":[{"key":"Zm9v","create_revision":2,"mod_revision":10,"version":4,"value":"YmFyNA=="}],"count":1}\n'),
    ("json", GET_LIMIT, {},
     "{" + JSON_HDR10 + ',"kvs":[{"key":"Zm9v","create_revision":2,"mod_revision":10,"version":4,"value":"YmFyNA=="},'
     '{"key":"Zm9vMg==","create_revision":4,"mod_revision":4,"version":1,"value":"aGVsbG8="}],"more":true,"count":6}\n'),
    ("json", GET_NONE, {}, "{" + JSON_HDR10 + "}\n"),
    ("fields", GET_FOO, {}, HDR10 + '"Key" : "foo"\n"CreateRevision" : 2\n"ModRevision" : 10\n"Version" : 4\n'
     '"Value" : "bar4"\n"Lease" : 0\n"More" : false\n"Count" : 1\n'),
    ("fields", GET_FOO, {"hex": True}, HDR10 + '"Key" : "foo"\n"CreateRevision" : 2\n"ModRevision" : 10\n"Version" : 4\n'
     '"Value" : "bar4"\n"Lease" : 0\n"More" : false\n"Count" : 1\n'),
    ("fields", GET_LIMIT, {}, HDR10 + '"Key" : "foo"\n"CreateRevision" : 2\n"ModRevision" : 10\n"Version" : 4\n'
     '"Value" : "bar4"\n"Lease" : 0\n"Key" : "foo2"\n"CreateRevision" : 4\n"ModRevision" : 4\n"Version" : 1\n'
     '"Value" : "hello"\n"Lease" : 0\n"More" : true\n"Count" : 6\n'),
    ("fields", GET_NONE, {}, HDR10 + '"More" : false\n"Count" : 0\n'),
])
def test_get_formats_match_etcdctl(write_out, response, options, expected):
    assert ctl_format.render("get", write_out, response, options) == expected


def test_get_keys_only_prints_empty_value_lines():
    response = {"header": header(10), "kvs": [{"key": b"foo", "create_revision": 2, "mod_revision": 10, "version": 4},
                                               {"key": b"foo2", "create_revision": 4, "mod_revision": 4, "version": 1}],
                "count": 2}
    assert ctl_format.render("get", "simple", response) == "foo\n\nfoo2\n\n"
    assert ctl_format.render("get", "json", response) == (
        "{" + JSON_HDR10 + ',"kvs":[{"key":"Zm9v","create_revision":2,"mod_revision":10,"version":4},'
        '{"key":"Zm9vMg==","create_revision":4,"mod_revision":4,"version":1}],"count":2}\n')
    assert ctl_format.render("get", "simple", {"kvs": [{"key": b"x"}]}, {"hex": True}) == "\\x78\n\n"


def test_fields_quote_like_go():
    # Captured: keys "k x", "a\tb", "ключ" and a value with bytes ff 01.
    response = {"header": header(33), "kvs": [kv(b"a\tb", b"k\nnl", 33, 33, 1)], "count": 1}
    assert '"Key" : "a\\tb"\n' in ctl_format.render("get", "fields", response)
    assert '"Value" : "k\\nnl"\n' in ctl_format.render("get", "fields", response)
    assert ctl_format.go_quote(b'v"q') == '"v\\"q"'
    assert ctl_format.go_quote("ключ".encode()) == '"ключ"'
    assert ctl_format.go_quote(b"\xff\x01") == '"\\xff\\x01"'
    assert ctl_format.render("get", "simple", response) == "a\tb\nk\nnl\n"


def test_lease_in_kv():
    response = {"header": header(21), "kvs": [kv(b"lk", b"lv", 21, 21, 1, lease=2324035666030732365)], "count": 1}
    assert ctl_format.render("get", "json", response) == (
        '{"header":{"cluster_id":324952591200643719,"member_id":3319814642761637952,"revision":21,"raft_term":2},'
        '"kvs":[{"key":"bGs=","create_revision":21,"mod_revision":21,"version":1,"value":"bHY=","lease":2324035666030732365}],"count":1}\n')
    assert '"Lease" : 2324035666030732365\n' in ctl_format.render("get", "fields", response)


def test_table_is_unsupported_for_kv():
    for kind in ("get", "put", "del", "txn", "alarm", "lease_grant"):
        with pytest.raises(ctl_format.UnsupportedFormat, match="^table not supported as output format$"):
            ctl_format.render(kind, "table", {})


# ---------------------------------------------------------------------------
# put / del


def test_put_formats():
    plain = {"header": header(5)}
    prev = {"header": header(9), "prev_kv": kv(b"foo", b"bar2", 2, 3, 2)}
    assert ctl_format.render("put", "simple", plain) == "OK\n"
    assert ctl_format.render("put", "simple", {"header": header(3), "prev_kv": kv(b"foo", b"bar", 2, 2, 1)}) == "OK\nfoo\nbar\n"
    assert ctl_format.render("put", "json", plain) == (
        '{"header":{"cluster_id":324952591200643719,"member_id":3319814642761637952,"revision":5,"raft_term":2}}\n')
    assert ctl_format.render("put", "json", {"header": header(37), "prev_kv": kv(b"foo", b"bar", 26, 36, 2)}) == (
        '{"header":{"cluster_id":324952591200643719,"member_id":3319814642761637952,"revision":37,"raft_term":2},'
        '"prev_kv":{"key":"Zm9v","create_revision":26,"mod_revision":36,"version":2,"value":"YmFy"}}\n')
    assert ctl_format.render("put", "fields", prev) == (
        '"ClusterID" : 324952591200643719\n"MemberID" : 3319814642761637952\n"Revision" : 9\n"RaftTerm" : 2\n'
        '"PrevKey" : "foo"\n"PrevCreateRevision" : 2\n"PrevModRevision" : 3\n"PrevVersion" : 2\n'
        '"PrevValue" : "bar2"\n"PrevLease" : 0\n')


def test_del_formats():
    assert ctl_format.render("del", "simple", {"header": header(11), "deleted": 1}) == "1\n"
    assert ctl_format.render("del", "simple", {"header": header(11), "deleted": 0}) == "0\n"
    assert ctl_format.render("del", "simple", {"header": header(12), "deleted": 1,
                                               "prev_kvs": [kv(b"foo5", b"v5", 7, 7, 1)]}) == "1\nfoo5\nv5\n"
    assert ctl_format.render("del", "json", {"header": header(11), "deleted": 0}) == (
        '{"header":{"cluster_id":324952591200643719,"member_id":3319814642761637952,"revision":11,"raft_term":2}}\n')
    assert ctl_format.render("del", "json", {"header": header(13), "deleted": 1,
                                             "prev_kvs": [kv(b"foo4", b"v4", 6, 6, 1)]}) == (
        '{"header":{"cluster_id":324952591200643719,"member_id":3319814642761637952,"revision":13,"raft_term":2},'
        '"deleted":1,"prev_kvs":[{"key":"Zm9vNA==","create_revision":6,"mod_revision":6,"version":1,"value":"djQ="}]}\n')
    assert ctl_format.render("del", "fields", {"header": header(14), "deleted": 1,
                                               "prev_kvs": [kv(b"foo3", b"v3", 5, 5, 1)]}) == (
        '"ClusterID" : 324952591200643719\n"MemberID" : 3319814642761637952\n"Revision" : 14\n"RaftTerm" : 2\n'
        '"Deleted" : 1\n"PrevKey" : "foo3"\n"PrevCreateRevision" : 5\n"PrevModRevision" : 5\n"PrevVersion" : 1\n'
        '"PrevValue" : "v3"\n"PrevLease" : 0\n')


# ---------------------------------------------------------------------------
# txn (etcd fills only `revision` in the headers of a txn's own responses)


def sub_header(revision: int) -> dict:
    return {"revision": revision}


TXN_SUCCESS = {
    "header": header(30), "succeeded": True,
    "responses": [
        {"response_put": {"header": sub_header(30)}},
        {"response_range": {"header": sub_header(30), "kvs": [kv(b"y", b"2", 24, 28, 2)], "count": 1}},
        {"response_delete_range": {"header": sub_header(30), "deleted": 0}},
    ],
}
TXN_FAILURE = {
    "header": header(43), "succeeded": False,
    "responses": [
        {"response_put": {"header": sub_header(43), "prev_kv": kv(b"z", b"3", 39, 41, 3)}},
        {"response_range": {"header": sub_header(43), "kvs": [kv(b"x", b"1", 23, 38, 7)], "count": 1}},
        {"response_range": {"header": sub_header(43), "kvs": [], "count": 0}},
        {"response_delete_range": {"header": sub_header(43), "deleted": 1, "prev_kvs": [kv(b"y", b"2", 42, 42, 1)]}},
    ],
}


def test_txn_simple():
    assert ctl_format.render("txn", "simple", TXN_SUCCESS) == "SUCCESS\n\nOK\n\ny\n2\n\n0\n"
    assert ctl_format.render("txn", "simple", TXN_FAILURE) == "FAILURE\n\nOK\nz\n3\n\nx\n1\n\n\n1\ny\n2\n"
    assert ctl_format.render("txn", "simple", {"header": header(24), "succeeded": True}) == "SUCCESS\n"


def test_txn_json():
    assert ctl_format.render("txn", "json", TXN_SUCCESS) == (
        '{"header":{"cluster_id":324952591200643719,"member_id":3319814642761637952,"revision":30,"raft_term":2},'
        '"succeeded":true,"responses":[{"Response":{"ResponsePut":{"header":{"revision":30}}}},'
        '{"Response":{"ResponseRange":{"header":{"revision":30},"kvs":[{"key":"eQ==","create_revision":24,'
        '"mod_revision":28,"version":2,"value":"Mg=="}],"count":1}}},'
        '{"Response":{"ResponseDeleteRange":{"header":{"revision":30}}}}]}\n')
    assert ctl_format.render("txn", "json", TXN_FAILURE) == (
        '{"header":{"cluster_id":324952591200643719,"member_id":3319814642761637952,"revision":43,"raft_term":2},'
        '"responses":[{"Response":{"ResponsePut":{"header":{"revision":43},"prev_kv":{"key":"eg==","create_revision":39,'
        '"mod_revision":41,"version":3,"value":"Mw=="}}}},{"Response":{"ResponseRange":{"header":{"revision":43},'
        '"kvs":[{"key":"eA==","create_revision":23,"mod_revision":38,"version":7,"value":"MQ=="}],"count":1}}},'
        '{"Response":{"ResponseRange":{"header":{"revision":43}}}},{"Response":{"ResponseDeleteRange":'
        '{"header":{"revision":43},"deleted":1,"prev_kvs":[{"key":"eQ==","create_revision":42,"mod_revision":42,'
        '"version":1,"value":"Mg=="}]}}}]}\n')


def test_txn_fields():
    inner = '"ClusterID" : 0\n"MemberID" : 0\n"Revision" : 30\n"RaftTerm" : 0\n'
    assert ctl_format.render("txn", "fields", TXN_SUCCESS) == (
        '"ClusterID" : 324952591200643719\n"MemberID" : 3319814642761637952\n"Revision" : 30\n"RaftTerm" : 2\n'
        '"Succeeded" : true\n' + inner + inner +
        '"Key" : "y"\n"CreateRevision" : 24\n"ModRevision" : 28\n"Version" : 2\n"Value" : "2"\n"Lease" : 0\n'
        '"More" : false\n"Count" : 1\n' + inner + '"Deleted" : 0\n')


# ---------------------------------------------------------------------------
# endpoint status / health / hashkv, snapshot status


STATUS = {"header": header(46), "version": "3.4.23", "db_size": 24576, "leader": MEMBER_ID, "raft_index": 80,
          "raft_term": 2, "raft_applied_index": 80, "errors": [], "db_size_in_use": 24576, "is_learner": False}
STATUS_ROW = "| 127.0.0.1:23790 | 2e1259d415f2a040 |  3.4.23 |   25 kB |      true |      false |         2 |         80 |                 80 |        |\n"
STATUS_BORDER = "+-----------------+------------------+---------+---------+-----------+------------+-----------+------------+--------------------+--------+\n"


def test_endpoint_status_formats():
    statuses = [("127.0.0.1:23790", STATUS)]
    assert ctl_format.render("endpoint_status", "simple", statuses) == (
        "127.0.0.1:23790, 2e1259d415f2a040, 3.4.23, 25 kB, true, false, 2, 80, 80, \n")
    assert ctl_format.render("endpoint_status", "json", statuses) == (
        '[{"Endpoint":"127.0.0.1:23790","Status":{"header":{"cluster_id":324952591200643719,"member_id":3319814642761637952,'
        '"revision":46,"raft_term":2},"version":"3.4.23","dbSize":24576,"leader":3319814642761637952,"raftIndex":80,'
        '"raftTerm":2,"raftAppliedIndex":80,"dbSizeInUse":24576}}]\n')
    assert ctl_format.render("endpoint_status", "fields", statuses) == (
        '"ClusterID" : 324952591200643719\n"MemberID" : 3319814642761637952\n"Revision" : 46\n"RaftTerm" : 2\n'
        '"Version" : "3.4.23"\n"DBSize" : 24576\n"Leader" : 3319814642761637952\n"IsLearner" : false\n'
        '"RaftIndex" : 80\n"RaftTerm" : 2\n"RaftAppliedIndex" : 80\n"Errors" : []\n"Endpoint" : "127.0.0.1:23790"\n\n')
    assert ctl_format.render("endpoint_status", "table", statuses) == (
        STATUS_BORDER +
        "|    ENDPOINT     |        ID        | VERSION | DB SIZE | IS LEADER | IS LEARNER | RAFT TERM | RAFT INDEX | RAFT APPLIED INDEX | ERRORS |\n"
        + STATUS_BORDER + STATUS_ROW + STATUS_BORDER)
    # Two endpoints: one row each (captured with the same member listed twice).
    assert ctl_format.render("endpoint_status", "table", statuses * 2).count(STATUS_ROW) == 2


def test_endpoint_hashkv_formats():
    hashes = [("127.0.0.1:23790", {"header": header(46), "hash": 2307658403, "compact_revision": 30})]
    assert ctl_format.render("endpoint_hashkv", "simple", hashes) == "127.0.0.1:23790, 2307658403\n"
    assert ctl_format.render("endpoint_hashkv", "json", hashes) == (
        '[{"Endpoint":"127.0.0.1:23790","HashKV":{"header":{"cluster_id":324952591200643719,"member_id":3319814642761637952,'
        '"revision":46,"raft_term":2},"hash":2307658403,"compact_revision":30}}]\n')
    assert ctl_format.render("endpoint_hashkv", "fields", hashes) == (
        '"ClusterID" : 324952591200643719\n"MemberID" : 3319814642761637952\n"Revision" : 46\n"RaftTerm" : 2\n'
        '"Endpoint" : "127.0.0.1:23790"\n"Hash" : 2307658403\n\n')
    assert ctl_format.render("endpoint_hashkv", "table", hashes) == (
        "+-----------------+------------+\n|    ENDPOINT     |    HASH    |\n+-----------------+------------+\n"
        "| 127.0.0.1:23790 | 2307658403 |\n+-----------------+------------+\n")
    never_compacted = [("127.0.0.1:23790", {"header": header(20), "hash": 3521993749, "compact_revision": -1})]
    assert '"hash":3521993749,"compact_revision":-1}' in ctl_format.render("endpoint_hashkv", "json", never_compacted)


def test_endpoint_health_formats():
    healths = [{"endpoint": "127.0.0.1:23790", "health": True, "took": "1.183667ms", "error": ""}]
    assert ctl_format.render("endpoint_health", "simple", healths) == (
        "127.0.0.1:23790 is healthy: successfully committed proposal: took = 1.183667ms\n")
    assert ctl_format.render("endpoint_health", "json", healths) == (
        '[{"endpoint":"127.0.0.1:23790","health":true,"took":"1.183667ms"}]\n')
    assert ctl_format.render("endpoint_health", "fields", healths) == (
        '"Endpoint" : "127.0.0.1:23790"\n"Health" : true\n"Took" : 1.183667ms\n"Error" : \n\n')
    assert ctl_format.render("endpoint_health", "table", healths) == (
        "+-----------------+--------+------------+-------+\n|    ENDPOINT     | HEALTH |    TOOK    | ERROR |\n"
        "+-----------------+--------+------------+-------+\n| 127.0.0.1:23790 |   true | 1.183667ms |       |\n"
        "+-----------------+--------+------------+-------+\n")
    sick = [{"endpoint": "127.0.0.1:1", "health": False, "took": "5s", "error": "context deadline exceeded"}]
    assert ctl_format.render("endpoint_health", "simple", sick) == (
        "127.0.0.1:1 is unhealthy: failed to commit proposal: context deadline exceeded\n")


def test_snapshot_status_formats():
    status = {"hash": 2150409809, "revision": 25, "total_key": 32, "total_size": 20480}
    assert ctl_format.render("snapshot_status", "simple", status) == "802ca651, 25, 32, 20 kB\n"
    assert ctl_format.render("snapshot_status", "json", status) == (
        '{"hash":2150409809,"revision":25,"totalKey":32,"totalSize":20480}\n')
    assert ctl_format.render("snapshot_status", "fields", status) == (
        '"Hash" : 2150409809\n"Revision" : 25\n"Keys" : 32\n"Size" : 20480\n')
    assert ctl_format.render("snapshot_status", "table", status) == (
        "+----------+----------+------------+------------+\n|   HASH   | REVISION | TOTAL KEYS | TOTAL SIZE |\n"
        "+----------+----------+------------+------------+\n| 802ca651 |       25 |         32 |      20 kB |\n"
        "+----------+----------+------------+------------+\n")


# ---------------------------------------------------------------------------
# leases and alarms


LEASE_ID = 2324035666030732365  # 2040a21fff19a44d


def test_lease_formats():
    grant = {"header": header(20), "ID": 2324035666030732360, "TTL": 100, "error": ""}
    assert ctl_format.render("lease_grant", "simple", {"ID": 0x2040A21FFF19A446, "TTL": 100}) == (
        "lease 2040a21fff19a446 granted with TTL(100s)\n")
    assert ctl_format.render("lease_grant", "json", grant) == (
        '{"cluster_id":324952591200643719,"member_id":3319814642761637952,"revision":20,"raft_term":2,'
        '"ID":2324035666030732360,"TTL":100,"Error":""}\n')
    assert ctl_format.render("lease_grant", "fields", dict(grant, ID=2324035666030732362)) == (
        '"ClusterID" : 324952591200643719\n"MemberID" : 3319814642761637952\n"Revision" : 20\n"RaftTerm" : 2\n'
        '"ID" : 2324035666030732362\n"TTL" : 100\n')
    assert ctl_format.render("lease_revoke", "simple", {"header": header(22)}, {"lease_id": LEASE_ID}) == (
        "lease 2040a21fff19a44d revoked\n")


def test_lease_time_to_live_formats():
    ttl = {"header": header(21), "ID": LEASE_ID, "TTL": 299, "grantedTTL": 300, "keys": [b"lk"]}
    assert ctl_format.render("lease_time_to_live", "simple", ttl, {"keys": False}) == (
        "lease 2040a21fff19a44d granted with TTL(300s), remaining(299s)\n")
    assert ctl_format.render("lease_time_to_live", "simple", ttl, {"keys": True}) == (
        "lease 2040a21fff19a44d granted with TTL(300s), remaining(299s), attached keys([lk])\n")
    assert ctl_format.render("lease_time_to_live", "json", dict(ttl, keys=[])) == (
        '{"cluster_id":324952591200643719,"member_id":3319814642761637952,"revision":21,"raft_term":2,'
        '"id":2324035666030732365,"ttl":299,"granted-ttl":300,"keys":null}\n')
    assert ctl_format.render("lease_time_to_live", "json", ttl, {"keys": True}) == (
        '{"cluster_id":324952591200643719,"member_id":3319814642761637952,"revision":21,"raft_term":2,'
        '"id":2324035666030732365,"ttl":299,"granted-ttl":300,"keys":["bGs="]}\n')
    assert ctl_format.render("lease_time_to_live", "fields", ttl, {"keys": True}) == (
        '"ClusterID" : 324952591200643719\n"MemberID" : 3319814642761637952\n"Revision" : 21\n"RaftTerm" : 2\n'
        '"ID" : 2324035666030732365\n"TTL" : 299\n"GrantedTTL" : 300\n"Key" : "lk"\n')
    expired = {"header": header(20), "ID": 0x1234, "TTL": -1, "grantedTTL": 0}
    assert ctl_format.render("lease_time_to_live", "simple", expired) == "lease 0000000000001234 already expired\n"
    assert ctl_format.render("lease_time_to_live", "json", expired) == (
        '{"cluster_id":324952591200643719,"member_id":3319814642761637952,"revision":20,"raft_term":2,'
        '"id":4660,"ttl":-1,"granted-ttl":0,"keys":null}\n')


def test_lease_list_and_keep_alive_formats():
    leases = {"header": header(20), "leases": [{"ID": 2324035666030732358}, {"ID": 2324035666030732360}]}
    assert ctl_format.render("lease_leases", "simple", leases) == "found 2 leases\n2040a21fff19a446\n2040a21fff19a448\n"
    assert ctl_format.render("lease_leases", "json", leases) == (
        '{"cluster_id":324952591200643719,"member_id":3319814642761637952,"revision":20,"raft_term":2,'
        '"leases":[{"id":2324035666030732358},{"id":2324035666030732360}]}\n')
    assert ctl_format.render("lease_leases", "fields", leases) == (
        '"ClusterID" : 324952591200643719\n"MemberID" : 3319814642761637952\n"Revision" : 20\n"RaftTerm" : 2\n'
        '"ID" : 2324035666030732358\n"ID" : 2324035666030732360\n')
    alive = {"header": header(21), "ID": LEASE_ID, "TTL": 300}
    assert ctl_format.render("lease_keep_alive", "simple", alive) == "lease 2040a21fff19a44d keepalived with TTL(300)\n"
    assert ctl_format.render("lease_keep_alive", "json", alive) == (
        '{"cluster_id":324952591200643719,"member_id":3319814642761637952,"revision":21,"raft_term":2,'
        '"ID":2324035666030732365,"TTL":300}\n')


def test_alarm_formats():
    assert ctl_format.render("alarm", "simple", {"alarms": []}) == ""
    assert ctl_format.render("alarm", "json", {"alarms": []}) == "{}\n"
    raised = {"alarms": [{"member_id": 13803658152347727308, "alarm": messages.ALARM_NOSPACE}]}
    # etcd's documented output for a NOSPACE alarm (gogo-protobuf's %+v, trailing space included).
    assert ctl_format.render("alarm", "simple", raised) == "memberID:13803658152347727308 alarm:NOSPACE \n"


# ---------------------------------------------------------------------------
# Go formatting helpers


@pytest.mark.parametrize("size, text", [(0, "0 B"), (9, "9 B"), (20480, "20 kB"), (24576, "25 kB"),
                                        (1_000_000, "1.0 MB"), (1_500_000, "1.5 MB"), (123_400_000, "123 MB")])
def test_humanize_bytes(size, text):
    assert ctl_format.humanize_bytes(size) == text


@pytest.mark.parametrize("seconds, text", [(0.001283209, "1.283209ms"), (0.000002, "2µs"), (0.5, "500ms"),
                                           (2.0, "2s"), (90.5, "1m30.5s"), (0, "0s")])
def test_go_duration(seconds, text):
    assert ctl_format.go_duration(seconds) == text


# ---------------------------------------------------------------------------
# txn input language


def test_parse_compare_targets_and_ops():
    assert parse_compare('mod("x") > "0"') == {"result": messages.COMPARE_GREATER, "target": messages.TARGET_MOD,
                                               "key": b"x", "mod_revision": 0}
    assert parse_compare('value("y") = "2"') == {"result": messages.COMPARE_EQUAL, "target": messages.TARGET_VALUE,
                                                 "key": b"y", "value": b"2"}
    assert parse_compare('ver("k") != "3"')["version"] == 3
    assert parse_compare('c("k") < "10"') == {"result": messages.COMPARE_LESS, "target": messages.TARGET_CREATE,
                                              "key": b"k", "create_revision": 10}
    assert parse_compare('val("a b") == "c\\nd"')["value"] == b"c\nd"
    assert parse_compare('lease("k") = "2040a21fff19a44d"')["lease"] == LEASE_ID


@pytest.mark.parametrize("line, message", [
    # Messages captured from etcdctl 3.4.23.
    ('bogus("x") = "2"', 'malformed comparison: bogus("x") = "2" (unknown target bogus)'),
    ('mod("x") > "abc"', 'invalid txn compare request: mod("x") > "abc"'),
    ('mod(x) > "1"', 'malformed comparison: mod(x) > "1"; got mod("")  ""'),
    ('mod("x") >', 'malformed comparison: mod("x") >; got mod("x") > ""'),
    ("nothing", "malformed comparison: nothing"),
])
def test_parse_compare_errors(line, message):
    with pytest.raises(CtlError) as caught:
        parse_compare(line)
    assert caught.value.message == message
    assert caught.value.exit_code == EXIT_INVALID_INPUT


def test_parse_request_lines():
    assert parse_request("put x 10") == {"request_put": {"key": b"x", "value": b"10"}}
    assert parse_request('put "a b" "c d" --prev-kv') == {"request_put": {"key": b"a b", "value": b"c d", "prev_kv": True}}
    assert parse_request("get y") == {"request_range": {"key": b"y"}}
    assert parse_request("get x --prefix") == {"request_range": {"key": b"x", "range_end": b"y"}}
    assert parse_request("del z --prev-kv") == {"request_delete_range": {"key": b"z", "prev_kv": True}}
    assert argify("put 'single q' \"dbl\\tq\" plain") == ["put", "single q", "dbl\tq", "plain"]


@pytest.mark.parametrize("line, code, message", [
    ("foo x 1", EXIT_INVALID_INPUT, "invalid txn request: foo x 1"),
    ("put", EXIT_INVALID_INPUT, "invalid txn compare request: put"),
    ("put x", EXIT_BAD_ARGS, "put command needs 1 argument and input from stdin or 2 arguments"),
])
def test_parse_request_errors(line, code, message):
    with pytest.raises(CtlError) as caught:
        parse_request(line)
    assert (caught.value.exit_code, caught.value.message) == (code, message)


def test_read_txn_blocks_and_prompts():
    text = 'mod("x") > "0"\nvalue("y") = "2"\n\nput x 10\nget y\ndel nosuch\n\nput z 3\n\n'
    prompts = []
    body = read_txn(io.StringIO(text), prompts.append)
    assert prompts == ["compares:", "success requests (get, put, del):", "failure requests (get, put, del):"]
    assert [c["key"] for c in body["compare"]] == [b"x", b"y"]
    assert body["success"] == [{"request_put": {"key": b"x", "value": b"10"}}, {"request_range": {"key": b"y"}},
                               {"request_delete_range": {"key": b"nosuch"}}]
    assert body["failure"] == [{"request_put": {"key": b"z", "value": b"3"}}]
    assert read_txn(io.StringIO("\n\n\n")) == {"compare": [], "success": [], "failure": []}


def test_read_txn_without_final_empty_line_is_eof():
    # etcdctl: "Error: EOF", exit 3, when a block is not ended by an empty line.
    with pytest.raises(CtlError) as caught:
        read_txn(io.StringIO('mod("x") > "0"\n\nput x 10\n\nput z 3\n'))
    assert (caught.value.exit_code, caught.value.message) == (EXIT_INVALID_INPUT, "EOF")


# ---------------------------------------------------------------------------
# argument parsing and etcdctl's argument errors (no server needed: they fail first)


def run_ctl(*argv: str, stdin: bytes = b"") -> tuple[int, str, str]:
    stdout, stderr = io.BytesIO(), io.BytesIO()
    code = run(list(argv), stdin=io.BytesIO(stdin), stdout=stdout, stderr=stderr)
    return code, stdout.getvalue().decode(), stderr.getvalue().decode()


def test_global_flags_before_or_after_command():
    options = parse_args(["get", "foo", "--prefix", "-w", "json", "--endpoints", "127.0.0.1:1", "--hex"])
    assert (options.command, options.write_out, options.endpoints, options.hex) == ("get", "json", "127.0.0.1:1", True)
    options = parse_args(["--endpoints=h:1", "-w", "fields", "--command-timeout=250ms", "put", "k", "v"])
    assert (options.command, options.write_out, options.endpoints, options.command_timeout) == ("put", "fields", "h:1", 0.25)
    options = parse_args(["lease", "keep-alive", "--once", "abc"])
    assert (options.command, options.once, options.args) == ("lease keep-alive", True, ["abc"])
    assert parse_args(["endpoint", "status", "-w", "table"]).command == "endpoint status"


def test_endpoints_from_environment(monkeypatch):
    monkeypatch.setenv("ETCDCTL_ENDPOINTS", "10.0.0.1:2382")
    assert parse_args(["get", "k"]).endpoints == "10.0.0.1:2382"
    monkeypatch.setenv("QUORUMCTL_ENDPOINTS", "10.0.0.2:2382")
    assert parse_args(["get", "k"]).endpoints == "10.0.0.2:2382"
    assert parse_args(["--endpoints", "x:1", "get", "k"]).endpoints == "x:1"


def test_get_request_bodies():
    def body(*argv):
        return get_request(parse_args(["get", *argv]))

    assert body("foo") == ("range", {"key": b"foo"})
    assert body("foo", "--prefix") == ("range", {"key": b"foo", "range_end": b"fop"})
    assert body("", "--prefix") == ("range", {"key": b"\0", "range_end": b"\0"})
    assert body("a", "--from-key") == ("range", {"key": b"a", "range_end": b"\0"})
    assert body("a", "z", "--rev", "5", "--limit", "2", "--consistency=s", "--keys-only") == (
        "range", {"key": b"a", "range_end": b"z", "revision": 5, "limit": 2, "serializable": True, "keys_only": True})
    _, sorted_body = body("a", "--sort-by=MODIFY", "--order=DESCEND")
    assert (sorted_body["sort_target"], sorted_body["sort_order"]) == (messages.SORT_BY_MOD, messages.SORT_DESCEND)
    _, by_key_asc = body("a", "--order=ASCEND")
    assert "sort_order" not in by_key_asc  # clientv3: ascending by key is the default order
    _, by_value = body("a", "--sort-by=VALUE")
    assert by_value["sort_order"] == messages.SORT_ASCEND


def test_put_and_delete_request_bodies():
    assert put_request(parse_args(["put", "k", "v", "--lease=2040a21fff19a44d", "--prev-kv"])) == (
        "put", {"key": b"k", "value": b"v", "lease": LEASE_ID, "prev_kv": True})
    assert put_request(parse_args(["put", "k"]), stdin=io.BytesIO(b"fromstdin\n")) == (
        "put", {"key": b"k", "value": b"fromstdin\n"})
    assert put_request(parse_args(["put", "k", "--ignore-value"])) == ("put", {"key": b"k", "value": b"", "ignore_value": True})
    assert delete_request(parse_args(["del", "a", "c"])) == ("delete_range", {"key": b"a", "range_end": b"c"})
    assert delete_request(parse_args(["del", "a", "--prefix", "--prev-kv"])) == (
        "delete_range", {"key": b"a", "range_end": b"b", "prev_kv": True})


@pytest.mark.parametrize("argv, code, message", [
    # Messages and exit codes captured from etcdctl 3.4.23.
    (["get"], 128, "get command needs one argument as key and an optional argument as range_end"),
    (["del"], 128, "del command needs one argument as key and an optional argument as range_end"),
    (["put"], 128, "put command needs 1 argument and input from stdin or 2 arguments"),
    (["put", "x", "v", "--ignore-value"], 128, "put command needs only 1 argument when 'ignore-value' is set"),
    (["put", "q", "v", "--lease=zz"], 128, 'bad lease ID (strconv.ParseInt: parsing "zz": invalid syntax), expecting ID in Hex'),
    (["get", "x", "--from-key", "--prefix"], 128, "`--prefix` and `--from-key` cannot be set at the same time, choose one"),
    (["get", "x", "y", "--prefix"], 128, "too many arguments, only accept one argument when `--prefix` or `--from-key` is set"),
    (["del", "x", "--from-key", "--prefix"], 128, "`--prefix` and `--from-key` cannot be set at the same time, choose one"),
    (["del", "x", "y", "--prefix"], 128, "too many arguments, only accept one argument when `--prefix` or `--from-key` is set"),
    (["get", "foo", "--sort-by=bad"], 4, "bad sort target bad"),
    (["get", "x", "--order=bad"], 4, "bad sort order bad"),
    (["get", "foo", "--consistency=x"], 4, 'unknown consistency flag "x"'),
    (["get", "foo", "--print-value-only", "-w", "json"], 128, "print-value-only is only for `--write-out=simple`"),
    (["-w", "yaml", "get", "foo"], 4, "unsupported output format"),
    (["lease", "grant", "abc"], 128, 'bad TTL (strconv.ParseInt: parsing "abc": invalid syntax)'),
    (["lease", "revoke", "zzz"], 128, 'bad lease ID arg (strconv.ParseInt: parsing "zzz": invalid syntax), expecting ID in Hex'),
    (["lease", "timetolive", "zz"], 128, 'bad lease ID arg (strconv.ParseInt: parsing "zz": invalid syntax), expecting ID in Hex'),
    (["compaction", "abc"], 1, 'strconv.ParseInt: parsing "abc": invalid syntax'),
    (["txn", "foo"], 128, "txn command does not accept argument"),
    (["snapshot", "save"], 128, "snapshot save expects one argument"),
    (["nosuchcmd"], 1, 'unknown command "nosuchcmd" for "quorumctl"'),
    (["get", "foo", "--count"], 1, "unknown flag: --count"),
    (["snapshot", "status", "/nonexistent/nosuch.db"], 1, "stat /nonexistent/nosuch.db: no such file or directory"),
])
def test_argument_errors_match_etcdctl(argv, code, message):
    assert run_ctl("--endpoints", "127.0.0.1:1", "--dial-timeout", "100ms", *argv) == (code, "", f"Error: {message}\n")


def test_txn_input_errors_come_before_any_request():
    assert run_ctl("--endpoints", "127.0.0.1:1", "txn", stdin=b'bogus("x") = "2"\n\n\n') == (
        3, "", 'Error: malformed comparison: bogus("x") = "2" (unknown target bogus)\n')
    assert run_ctl("--endpoints", "127.0.0.1:1", "txn", "-i", stdin=b"\nput x 1\n") == (
        3, "compares:\nsuccess requests (get, put, del):\n", "Error: EOF\n")


def test_unreachable_endpoint_is_context_deadline_exceeded():
    code, out, err = run_ctl("--endpoints", "127.0.0.1:1", "--dial-timeout", "100ms", "get", "foo")
    assert (code, out, err) == (1, "", "Error: context deadline exceeded\n")


def test_version():
    code, out, _err = run_ctl("version")
    assert code == 0 and out.startswith("quorumctl version: ") and out.endswith("API version: 3.4\n")


def test_snapshot_save_needs_one_endpoint_and_leaves_no_partial_file(tmp_path):
    path = str(tmp_path / "s.db")
    assert run_ctl("--endpoints", "127.0.0.1:1,127.0.0.1:2", "snapshot", "save", path) == (
        5, "", "Error: snapshot must be requested to one selected node, not multiple [127.0.0.1:1 127.0.0.1:2]\n")
    assert run_ctl("--endpoints", "127.0.0.1:1", "--dial-timeout", "100ms", "snapshot", "save", path) == (
        5, "", "Error: context deadline exceeded\n")
    assert list(tmp_path.iterdir()) == []


def test_go_quote_and_txn_arguments_round_trip():
    # Goal: any key printed by the fields format (Go's %q) can be pasted back
    # into a txn request line. Method: hypothesis over arbitrary bytes.
    from hypothesis import given, settings, strategies

    from tools.ctl_txn import go_unquote

    @settings(max_examples=300, deadline=None)
    @given(strategies.binary(max_size=40))
    def round_trip(data: bytes):
        quoted = ctl_format.go_quote(data)
        assert go_unquote(quoted) == data
        (_put, key, _value) = argify(f"put {quoted} v")
        assert key.encode("utf-8", "surrogateescape") == data

    round_trip()


@pytest.mark.parametrize("argv, expected", [
    # Captured from etcdctl 3.4.23 with an endpoint nobody listens on.
    (["endpoint", "status"], (1, "", "Failed to get the status of endpoint 127.0.0.1:1 (context deadline exceeded)\n")),
    (["endpoint", "hashkv"], (1, "", "Failed to get the hash of endpoint 127.0.0.1:1 (context deadline exceeded)\n"
                                     "Error: context deadline exceeded\n")),
    (["defrag"], (1, "", "Failed to defragment etcd member[127.0.0.1:1] (context deadline exceeded)\n")),
    (["compaction", "5"], (1, "", "Error: context deadline exceeded\n")),
    (["endpoint", "status", "-w", "table"], (
        1, "+----------+----+---------+---------+-----------+------------+-----------+------------+--------------------+--------+\n"
           "| ENDPOINT | ID | VERSION | DB SIZE | IS LEADER | IS LEARNER | RAFT TERM | RAFT INDEX | RAFT APPLIED INDEX | ERRORS |\n"
           "+----------+----+---------+---------+-----------+------------+-----------+------------+--------------------+--------+\n"
           "+----------+----+---------+---------+-----------+------------+-----------+------------+--------------------+--------+\n",
        "Failed to get the status of endpoint 127.0.0.1:1 (context deadline exceeded)\n")),
])
def test_unreachable_endpoint_reports_like_etcdctl(argv, expected):
    assert run_ctl("--endpoints", "127.0.0.1:1", "--dial-timeout", "100ms", "--command-timeout", "200ms", *argv) == expected
