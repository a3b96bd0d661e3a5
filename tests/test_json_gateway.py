"""Goal: etcd's JSON gateway (`/v3/...` over HTTP) answers as etcd 3.4's does.

Method: start a real node with `--listen-client-http-urls` and talk to it with
plain HTTP requests (http.client), as curl or etcd3gw would: every endpoint,
checked field by field against what etcd 3.4.23 answers to the same request
(64-bit integers as strings, bytes base64, enums by name, defaults left out);
errors with grpc-gateway's HTTP status and body; watch streams of
{"result": ...} lines; malformed bodies refused with 400 without harm to the
gateway process.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import threading
import time

import pytest

from actors import http_gateway
from tests.conftest import free_port

HTTP_TIMEOUT_S = 10.0
LISTEN_TIMEOUT_S = 30.0
LOG_POLL_S = 0.05
# A restarted actor is back within the supervisor's backoff and its start-up.
RESTART_TIMEOUT_S = 30.0


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


class HttpNode:
    """A node with its JSON gateway port, and an HTTP client for it."""

    def __init__(self, node, http_port: int):
        self.node = node
        self.http_port = http_port

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=HTTP_TIMEOUT_S)

    def request(self, method: str, path: str, body: bytes | str | None = None,
                headers: dict | None = None) -> tuple[int, bytes, http.client.HTTPResponse]:
        connection = self.connect()
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read(), response
        finally:
            connection.close()

    def post(self, path: str, body: dict | str | bytes) -> tuple[int, dict]:
        payload = json.dumps(body) if isinstance(body, dict) else body
        status, data, _ = self.request("POST", path, payload, {"Content-Type": "application/json"})
        return status, json.loads(data)

    def ok(self, path: str, body: dict) -> dict:
        status, answer = self.post(path, body)
        assert status == 200, answer
        return answer


def http_listener_pids(node) -> set[int]:
    """The gateway processes that have said their HTTP server listens."""
    with open(node.log_path, encoding="utf-8") as log:
        return {json.loads(line)["pid"] for line in log if "http json gateway listening" in line}


def start_http_node(node_factory, gateways: int = 2, extra_args: tuple = ()) -> HttpNode:
    port = free_port()
    node = node_factory(gateways=gateways,
                        extra_args=("--listen-client-http-urls", f"http://127.0.0.1:{port}", *extra_args))
    wait_for_http_listeners(node, gateways)
    return HttpNode(node, port)


def wait_for_http_listeners(node, gateways: int) -> None:
    """The node is ready once one gateway answers; this waits for every gateway's HTTP server."""
    deadline = time.monotonic() + LISTEN_TIMEOUT_S
    while len(http_listener_pids(node)) < gateways:
        assert time.monotonic() < deadline, node.log_tail()
        time.sleep(LOG_POLL_S)  # polling the log for a condition, with a deadline


@pytest.fixture
def http_node(node_factory) -> HttpNode:
    return start_http_node(node_factory, extra_args=("--max-request-bytes", "65536"))


def assert_header(header: dict, revision: int | None = None) -> None:
    assert set(header) <= {"cluster_id", "member_id", "revision", "raft_term"}
    assert all(isinstance(value, str) for value in header.values())  # uint64/int64 as strings
    int(header["cluster_id"]), int(header["member_id"])
    if revision is not None:
        assert header["revision"] == str(revision)


def assert_error(status: int, answer: dict, http_status: int, grpc_code: int, message: str) -> None:
    assert (status, answer) == (http_status, {"error": message, "message": message, "code": grpc_code})


# ---- KV -------------------------------------------------------------------------

def test_kv_endpoints_answer_as_etcd(http_node):
    put = http_node.ok("/v3/kv/put", {"key": b64("foo"), "value": b64("bar")})
    assert set(put) == {"header"}  # no prev_kv unless asked, as etcd
    assert_header(put["header"], 2)
    put = http_node.ok("/v3/kv/put", {"key": b64("foo"), "value": b64("baz"), "prev_kv": True})
    assert put["prev_kv"] == {"key": b64("foo"), "create_revision": "2", "mod_revision": "2", "version": "1",
                              "value": b64("bar")}

    got = http_node.ok("/v3/kv/range", {"key": b64("foo")})
    assert got["kvs"] == [{"key": b64("foo"), "create_revision": "2", "mod_revision": "3", "version": "2",
                           "value": b64("baz")}]
    assert got["count"] == "1" and "more" not in got  # false is a default: left out
    assert set(http_node.ok("/v3/kv/range", {"key": b64("none")})) == {"header"}
    # 64-bit integers are taken as strings or numbers, enums by name or number.
    old = http_node.ok("/v3/kv/range", {"key": b64("foo"), "revision": "2", "sort_order": "DESCEND"})
    assert old["kvs"][0]["value"] == b64("bar")
    assert http_node.ok("/v3/kv/range", {"key": b64("foo"), "revision": 2, "sort_order": 2})["kvs"] == old["kvs"]
    counted = http_node.ok("/v3/kv/range", {"key": b64("foo"), "count_only": True})
    assert counted["count"] == "1" and "kvs" not in counted
    # Unknown fields are ignored, as etcd's gateway does.
    assert http_node.ok("/v3/kv/range", {"key": b64("foo"), "bogus": 1})["count"] == "1"

    http_node.ok("/v3/kv/put", {"key": b64("p/a"), "value": b64("1")})
    http_node.ok("/v3/kv/put", {"key": b64("p/b"), "value": b64("2")})
    prefix = http_node.ok("/v3/kv/range", {"key": b64("p/"), "range_end": b64("p0"), "keys_only": True})
    assert [kv["key"] for kv in prefix["kvs"]] == [b64("p/a"), b64("p/b")]
    assert "value" not in prefix["kvs"][0]

    txn = http_node.ok("/v3/kv/txn", {
        "compare": [{"key": b64("foo"), "target": "VALUE", "result": "EQUAL", "value": b64("baz")}],
        "success": [{"request_put": {"key": b64("a"), "value": b64("1")}},
                    {"request_range": {"key": b64("foo")}}],
        "failure": []})
    assert txn["succeeded"] is True
    assert txn["responses"][0] == {"response_put": {"header": {"revision": "6"}}}
    assert txn["responses"][1]["response_range"]["kvs"][0]["value"] == b64("baz")
    failed = http_node.ok("/v3/kv/txn", {
        "compare": [{"key": b64("foo"), "target": "MOD", "result": "GREATER", "mod_revision": "100"}],
        "failure": [{"request_delete_range": {"key": b64("a"), "prev_kv": True}}]})
    assert "succeeded" not in failed  # false: left out
    deleted = failed["responses"][0]["response_delete_range"]
    assert deleted["deleted"] == "1" and deleted["prev_kvs"][0]["value"] == b64("1")

    assert http_node.ok("/v3/kv/deleterange", {"key": b64("foo")})["deleted"] == "1"
    assert "deleted" not in http_node.ok("/v3/kv/deleterange", {"key": b64("foo")})
    compacted = http_node.ok("/v3/kv/compaction", {"revision": "3", "physical": True})
    assert set(compacted) == {"header"}
    status, answer = http_node.post("/v3/kv/range", {"key": b64("foo"), "revision": "2"})
    assert_error(status, answer, 400, 11, "etcdserver: mvcc: required revision has been compacted")


# ---- leases -----------------------------------------------------------------------

def test_lease_endpoints_answer_as_etcd(http_node):
    granted = http_node.ok("/v3/lease/grant", {"TTL": "30", "ID": "42"})
    assert (granted["ID"], granted["TTL"]) == ("42", "30") and "error" not in granted
    status, answer = http_node.post("/v3/lease/grant", {"TTL": 30, "ID": 42})
    assert_error(status, answer, 412, 9, "etcdserver: lease already exists")
    other = http_node.ok("/v3/lease/grant", {"TTL": 60})
    assert int(other["ID"]) > 0

    leases = http_node.ok("/v3/lease/leases", {})["leases"]
    assert sorted(lease["ID"] for lease in leases) == sorted(["42", other["ID"]])
    http_node.ok("/v3/kv/put", {"key": b64("lk"), "value": b64("v"), "lease": "42"})
    alive = http_node.ok("/v3/lease/timetolive", {"ID": "42", "keys": True})
    assert alive["ID"] == "42" and alive["grantedTTL"] == "30" and 0 < int(alive["TTL"]) <= 30
    assert alive["keys"] == [b64("lk")]
    alias = http_node.ok("/v3/kv/lease/timetolive", {"ID": "42"})  # etcd's older path
    assert alias["grantedTTL"] == "30" and "keys" not in alias
    assert http_node.ok("/v3/lease/timetolive", {"ID": "43"})["TTL"] == "-1"

    # keepalive is a stream: one {"result": ...} line per request in the body.
    status, data, response = http_node.request("POST", "/v3/lease/keepalive", '{"ID":"42"}{"ID":"43"}')
    assert status == 200 and response.getheader("Transfer-Encoding") == "chunked"
    lines = [json.loads(line) for line in data.splitlines()]
    assert [line["result"]["ID"] for line in lines] == ["42", "43"]
    assert lines[0]["result"]["TTL"] == "30" and "TTL" not in lines[1]["result"]  # 43 does not exist

    assert set(http_node.ok("/v3/lease/revoke", {"ID": "42"})) == {"header"}
    assert "kvs" not in http_node.ok("/v3/kv/range", {"key": b64("lk")})
    status, answer = http_node.post("/v3/kv/lease/revoke", {"ID": "42"})
    assert_error(status, answer, 404, 5, "etcdserver: requested lease not found")
    http_node.ok("/v3/kv/lease/revoke", {"ID": other["ID"]})
    assert "leases" not in http_node.ok("/v3/kv/lease/leases", {})


# ---- maintenance, health, version ----------------------------------------------------

def test_maintenance_health_and_version(http_node):
    status = http_node.ok("/v3/maintenance/status", {})
    assert status["leader"] == status["header"]["member_id"]
    assert int(status["dbSize"]) > 0 and int(status["raftIndex"]) >= int(status["raftAppliedIndex"]) > 0
    assert status["version"].startswith("3.4.")
    # No alarm: etcd's answer is empty (no header either).
    assert http_node.ok("/v3/maintenance/alarm", {"action": "GET"}) == {}
    assert http_node.ok("/v3/maintenance/alarm", {}) == {}
    assert http_node.ok("/v3/maintenance/defragment", {}) == {}

    code, data, response = http_node.request("GET", "/health")
    assert (code, json.loads(data)) == (200, {"health": "true"})
    code, data, _ = http_node.request("GET", "/version")
    versions = json.loads(data)
    assert code == 200 and versions["etcdcluster"] == "3.4.0"
    # Plain numbers, as etcd's: clients (etcd3gw) parse it to pick the API path.
    assert [int(part) for part in versions["etcdserver"].split(".")][:2] == [3, 4]


def test_health_is_false_during_an_alarm(node_factory):
    """etcd 3.4's /health says false (503) while an alarm is raised."""
    http_node = start_http_node(node_factory, extra_args=("--quota-backend-bytes", str(1 << 20)))
    value = b64(b"x" * 60_000)
    for index in range(200):  # bounded: 12 MB of values against a 1 MiB quota
        status, answer = http_node.post("/v3/kv/put", {"key": b64(f"fill/{index % 4}"), "value": value})
        if status != 200:
            assert_error(status, answer, 429, 8, "etcdserver: mvcc: database space exceeded")
            break
    else:
        pytest.fail("the quota never filled")
    alarms = http_node.ok("/v3/maintenance/alarm", {"action": "GET"})["alarms"]
    assert alarms == [{"memberID": alarms[0]["memberID"], "alarm": "NOSPACE"}]
    code, data, _ = http_node.request("GET", "/health")
    assert (code, json.loads(data)) == (503, {"health": "false"})


# ---- errors ---------------------------------------------------------------------------

def test_errors_have_grpc_gateway_status_and_body(http_node):
    status, answer = http_node.post("/v3/kv/range", {"key": b64("foo"), "revision": 100})
    assert_error(status, answer, 400, 11, "etcdserver: mvcc: required revision is a future revision")
    status, answer = http_node.post("/v3/kv/put", {"value": b64("v")})
    assert_error(status, answer, 400, 3, "etcdserver: key is not provided")
    status, answer = http_node.post("/v3/kv/range", "")  # an empty body is an empty request, as etcd
    assert_error(status, answer, 400, 3, "etcdserver: key is not provided")
    status, answer = http_node.post("/v3/kv/put", {"key": b64("k"), "value": b64(b"v" * 70_000)})
    assert_error(status, answer, 400, 3, "etcdserver: request is too large")
    status, answer = http_node.post("/v3/auth/authenticate", {"name": "root", "password": "x"})
    assert_error(status, answer, 412, 9, "etcdserver: authentication is not enabled")
    status, answer = http_node.post("/v3/maintenance/snapshot", {})
    assert status == 501 and answer["code"] == 12


def test_cluster_member_list(http_node):
    status, answer = http_node.post("/v3/cluster/member/list", {})
    assert status == 200, answer
    [member] = answer["members"]
    assert member["ID"] == answer["header"]["member_id"] and member["name"] == "test-node"

    code, data, _ = http_node.request("POST", "/v3/nothing", "{}")
    assert (code, data) == (404, b"Not Found\n")
    code, data, _ = http_node.request("GET", "/v3/kv/range")
    assert (code, data) == (405, b"Method Not Allowed\n")


def test_an_oversized_body_is_refused_before_it_is_read(http_node):
    connection = http_node.connect()
    try:
        connection.putrequest("POST", "/v3/kv/put")
        connection.putheader("Content-Length", str(64 << 20))
        connection.endheaders()  # and no body: the server must not wait for it
        response = connection.getresponse()
        answer = json.loads(response.read())
        assert (response.status, answer["code"]) == (400, 3)
        assert answer["error"] == "etcdserver: request is too large"
        assert response.getheader("Connection") == "close"
    finally:
        connection.close()


# Bodies that are not a request, and where each goes wrong.
MALFORMED_BODIES = [
    b'{"key":',                                    # truncated
    b'[1, 2]',                                     # not an object
    b'"just a string"',
    b'{"key": 5}',                                 # wrong type
    b'{"key": "Zm9v", "revision": "ten"}',         # not an integer
    b'{"key": "@@not base64@@"}',
    b'{"key": "Zm9v", "sort_order": "SIDEWAYS"}',  # no such enum value
    b'{"key": "Zm9v"}{"key": "YmFy"}',             # two requests for a unary call
    b'\xff\xfe{}',                                 # not UTF-8
]
# The same mistakes in a watch stream's body (fields of a WatchCreateRequest).
MALFORMED_WATCH_BODIES = [
    b'{"create_request": {"key":',
    b'[{"create_request": {}}]',
    b'{"create_request": {"key": 5}}',
    b'{"create_request": {"key": "Zm9v", "start_revision": "ten"}}',
    b'{"create_request": {"key": "@@not base64@@"}}',
    b'{"create_request": {"key": "Zm9v", "filters": ["NOTHING"]}}',
    b'{"create_request": {"key": "Zm9v"}} trailing',
    b'\xff\xfe{}',
    b'',                                           # no request at all
]


def test_malformed_bodies_get_400_and_never_harm_the_gateway(http_node):
    pids_before = http_node.node.actor_pids()
    requests = [("/v3/kv/range", body) for body in MALFORMED_BODIES]
    requests += [("/v3/lease/keepalive", body) for body in (b'{"ID":', b'[1]', b'{"ID": "ten"}', b'{"ID": {}}')]
    requests += [("/v3/watch", body) for body in MALFORMED_WATCH_BODIES]
    for path, body in requests:
        status, data, response = http_node.request("POST", path, body)
        answer = json.loads(data)
        assert status == 400 and response.getheader("Content-Type") == "application/json", (path, body, data)
        assert answer["code"] == 3 and answer["error"] == answer["message"] and answer["error"], (path, body)
    # The same gateways still serve, on the same port.
    assert http_node.ok("/v3/kv/put", {"key": b64("after"), "value": b64("ok")})
    assert http_node.ok("/v3/kv/range", {"key": b64("after")})["kvs"][0]["value"] == b64("ok")
    assert http_node.node.actor_pids() == pids_before


def test_bad_http_framing_is_refused(http_node):
    status, data, _ = http_node.request("POST", "/v3/kv/range", None, {"Content-Length": "many"})
    assert status == 400 and json.loads(data)["code"] == 3
    connection = http_node.connect()
    try:
        connection.request("POST", "/v3/kv/range", body=iter([b'{"key":"Zm9v"}']),
                           headers={"Transfer-Encoding": "chunked"})
        response = connection.getresponse()
        assert response.status == 400 and "chunked" in json.loads(response.read())["error"]
    finally:
        connection.close()
    assert http_node.ok("/v3/kv/range", {"key": b64("k"), "serializable": True})


def test_keep_alive_connection_serves_many_requests(http_node):
    connection = http_node.connect()
    try:
        for index in range(20):
            connection.request("POST", "/v3/kv/put", body=json.dumps({"key": b64(f"ka/{index}"), "value": b64("v")}))
            response = connection.getresponse()
            assert response.status == 200, response.read()
            response.read()
        connection.request("POST", "/v3/kv/range", body=json.dumps({"key": b64("ka/"), "range_end": b64("ka0"),
                                                                    "count_only": True}))
        assert json.loads(connection.getresponse().read())["count"] == "20"
    finally:
        connection.close()


# ---- watch --------------------------------------------------------------------------------

class WatchStream:
    """A /v3/watch request whose response lines are read one at a time."""

    def __init__(self, http_node: HttpNode, *requests: dict, timeout_s: float = HTTP_TIMEOUT_S):
        self.connection = http.client.HTTPConnection("127.0.0.1", http_node.http_port, timeout=timeout_s)
        self.connection.request("POST", "/v3/watch", body="".join(json.dumps(request) for request in requests))
        self.response = self.connection.getresponse()
        assert self.response.status == 200
        assert self.response.getheader("Transfer-Encoding") == "chunked"

    def next(self) -> dict:
        """The next response line (waits at most HTTP_TIMEOUT_S, the socket's timeout)."""
        line = self.response.readline()
        assert line.endswith(b"\n"), line
        return json.loads(line)["result"]

    def close(self) -> None:
        self.connection.close()


def test_watch_stream_delivers_events_as_etcd(http_node):
    stream = WatchStream(http_node, {"create_request": {"key": b64("w/"), "range_end": b64("w0"), "prev_kv": True}},
                         {"create_request": {"key": b64("w/a"), "filters": ["NOPUT"]}})
    try:
        first, second = stream.next(), stream.next()
        assert first["created"] is True and "watch_id" not in first  # watch 0: a default, left out
        assert (second["created"], second["watch_id"]) == (True, "1")
        assert_header(first["header"])
        http_node.ok("/v3/kv/put", {"key": b64("w/a"), "value": b64("1")})
        http_node.ok("/v3/kv/put", {"key": b64("w/a"), "value": b64("2")})
        http_node.ok("/v3/kv/deleterange", {"key": b64("w/a")})
        seen: dict[str, list] = {"0": [], "1": []}
        while len(seen["0"]) < 3 or len(seen["1"]) < 1:  # bounded by the socket timeout per line
            result = stream.next()
            seen[result.get("watch_id", "0")].extend(result["events"])
        put1, put2, delete = seen["0"]
        assert put1 == {"kv": {"key": b64("w/a"), "create_revision": "2", "mod_revision": "2", "version": "1",
                               "value": b64("1")}}  # PUT is the default type: left out
        assert put2["kv"]["value"] == b64("2") and put2["prev_kv"]["value"] == b64("1")
        assert delete["type"] == "DELETE" and delete["kv"] == {"key": b64("w/a"), "mod_revision": "4"}
        assert seen["1"] == [{"type": "DELETE", "kv": {"key": b64("w/a"), "mod_revision": "4"}}]
    finally:
        stream.close()
    # The server noticed the client leave; a new stream works.
    again = WatchStream(http_node, {"create_request": {"key": b64("w/a"), "start_revision": "2"}})
    try:
        assert again.next()["created"] is True
        revisions: list[str] = []
        while len(revisions) < 3:  # history from revision 2, in one or more responses
            revisions += [event["kv"]["mod_revision"] for event in again.next()["events"]]
        assert revisions == ["2", "3", "4"]
    finally:
        again.close()


def test_watch_stream_survives_a_watch_broadcaster_restart(http_node):
    """Goal: an HTTP watch loses nothing when the node's watch broadcaster dies.
    Method: SIGKILL the broadcaster while a stream is open, write meanwhile; the
    stream must deliver that write (the native watch client under it resumes
    from the last revision it delivered + 1)."""
    stream = WatchStream(http_node, {"create_request": {"key": b64("r")}}, timeout_s=RESTART_TIMEOUT_S)
    try:
        assert stream.next()["created"] is True
        http_node.ok("/v3/kv/put", {"key": b64("r"), "value": b64("1")})
        assert stream.next()["events"][0]["kv"]["value"] == b64("1")
        os.kill(http_node.node.actor_pids()["watch_broadcaster"], signal.SIGKILL)
        http_node.ok("/v3/kv/put", {"key": b64("r"), "value": b64("2")})
        http_node.ok("/v3/kv/put", {"key": b64("r"), "value": b64("3")})
        values: list[str] = []
        while len(values) < 2:  # each line waits at most RESTART_TIMEOUT_S
            values += [event["kv"]["value"] for event in stream.next()["events"]]
        assert values == [b64("2"), b64("3")]
    finally:
        stream.close()


def test_watch_from_a_compacted_revision_is_canceled(http_node):
    for value in "123":
        http_node.ok("/v3/kv/put", {"key": b64("c"), "value": b64(value)})
    http_node.ok("/v3/kv/compaction", {"revision": "3"})
    stream = WatchStream(http_node, {"create_request": {"key": b64("c"), "start_revision": "1"}})
    try:
        assert stream.next()["created"] is True
        canceled = stream.next()
        assert canceled["canceled"] is True and canceled["compact_revision"] == "3"
    finally:
        stream.close()


def test_watch_progress_and_cancel_requests(http_node):
    http_node.ok("/v3/kv/put", {"key": b64("x"), "value": b64("1")})
    stream = WatchStream(http_node, {"progress_request": {}})
    try:
        progress = stream.next()
        assert progress["watch_id"] == "-1" and progress["header"]["revision"] == "2"
    finally:
        stream.close()
    stream = WatchStream(http_node, {"create_request": {"key": b64("x")}}, {"cancel_request": {"watch_id": "0"}})
    try:
        assert stream.next()["created"] is True
        assert stream.next()["canceled"] is True
    finally:
        stream.close()
    # Watch ids chosen by the client (etcd 3.4), a duplicate refused, 0 meaning "pick one".
    stream = WatchStream(http_node, {"create_request": {"key": b64("x"), "watch_id": "7"}},
                         {"create_request": {"key": b64("y"), "watch_id": 7}},
                         {"create_request": {"key": b64("z")}})
    try:
        chosen, duplicate, picked = stream.next(), stream.next(), stream.next()
        assert (chosen["watch_id"], chosen["created"]) == ("7", True) and "canceled" not in chosen
        assert (duplicate["watch_id"], duplicate["created"], duplicate["canceled"]) == ("7", True, True)
        assert picked["created"] is True and "watch_id" not in picked and "canceled" not in picked
        http_node.ok("/v3/kv/put", {"key": b64("z"), "value": b64("1")})
        event = stream.next()
        assert "watch_id" not in event and event["events"][0]["kv"]["key"] == b64("z")
    finally:
        stream.close()


def test_every_gateway_serves_the_http_port(http_node):
    """Both gateway processes bind the port (SO_REUSEPORT) and say so in the log."""
    pids = http_node.node.actor_pids()
    assert http_listener_pids(http_node.node) == {pids["gateway-0"], pids["gateway-1"]}


# ---- bounds --------------------------------------------------------------------------------

class _FrontWithoutCore:
    """What the HTTP server itself needs of its front: enough for /version."""

    def __init__(self, connections_max: int):
        self.connection_slots = threading.BoundedSemaphore(connections_max)
        self.max_body_bytes = 1024
        self.stopping = False


def test_connections_beyond_the_bound_get_503():
    """Goal: a gateway holds at most its bound of connections. Method: an HTTP
    server whose bound is 1; an idle keep-alive connection holds the slot, so a
    second connection is answered 503 and closed; once the first closes, the
    slot is free again (waited for with a deadline)."""
    server = http_gateway._Server(("127.0.0.1", free_port()), _FrontWithoutCore(connections_max=1))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        holder = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
        holder.request("GET", "/version")
        assert holder.getresponse().read().startswith(b'{"etcdserver"')  # kept alive: holds the slot
        # The refusal comes at once, before any request (one sent could race the close).
        with socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT_S) as refused:
            answer = b""
            while chunk := refused.recv(4096):  # until the server closes; bounded by the timeout
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 503 ") and b"Connection: close" in answer
        holder.close()
        deadline = time.monotonic() + HTTP_TIMEOUT_S
        while True:  # the server's thread releases the slot when it sees the close
            again = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT_S)
            again.request("GET", "/version")
            status = again.getresponse().status
            again.close()
            if status == 200:
                break
            assert time.monotonic() < deadline, "the slot was never released"
            time.sleep(LOG_POLL_S)
    finally:
        server.shutdown()
        server.server_close()


# ---- the same requests to real etcd 3.4 -------------------------------------------------------

# (path, body); bodies choose lease ids so both servers use the same ones.
DIFFERENTIAL_SCRIPT = [
    ("/v3/kv/put", {"key": b64("foo"), "value": b64("bar")}),
    ("/v3/kv/put", {"key": b64("foo"), "value": b64("baz"), "prev_kv": True}),
    ("/v3/kv/put", {"key": b64("foo/1"), "value": b64("1")}),
    ("/v3/kv/put", {"key": b64("foo/2"), "value": b64("2"), "prev_kv": True}),
    ("/v3/kv/range", {"key": b64("foo")}),
    ("/v3/kv/range", {"key": b64("none")}),
    ("/v3/kv/range", {"key": b64("foo/"), "range_end": b64("foo0"), "limit": "1"}),
    ("/v3/kv/range", {"key": b64("foo/"), "range_end": b64("foo0"), "keys_only": True,
                      "sort_order": "DESCEND", "sort_target": "MOD"}),
    ("/v3/kv/range", {"key": b64("f"), "range_end": "AA==", "count_only": True}),
    ("/v3/kv/range", {"key": b64("foo"), "revision": "2"}),
    ("/v3/kv/range", {"key": b64("foo"), "revision": 99}),
    ("/v3/kv/txn", {"compare": [{"key": b64("foo"), "target": "VALUE", "result": "EQUAL", "value": b64("baz")}],
                    "success": [{"request_put": {"key": b64("t"), "value": b64("1"), "prev_kv": True}},
                                {"request_range": {"key": b64("foo")}}]}),
    ("/v3/kv/txn", {"compare": [{"key": b64("foo"), "target": "MOD", "result": "GREATER", "mod_revision": "99"},
                                {"key": b64("t"), "target": "VERSION", "result": "EQUAL", "version": 1}],
                    "failure": [{"request_delete_range": {"key": b64("t"), "prev_kv": True}}]}),
    ("/v3/kv/deleterange", {"key": b64("foo/"), "range_end": b64("foo0"), "prev_kv": True}),
    ("/v3/kv/deleterange", {"key": b64("none")}),
    ("/v3/kv/put", {"value": b64("v")}),
    ("/v3/kv/range", {"key": b64("foo"), "sort_order": "SIDEWAYS"}),
    ("/v3/kv/put", {"key": b64("k"), "value": b64("v"), "lease": "999"}),
    ("/v3/kv/compaction", {"revision": "3"}),
    ("/v3/kv/compaction", {"revision": "3"}),
    ("/v3/kv/range", {"key": b64("foo"), "revision": "2"}),
    ("/v3/lease/grant", {"TTL": "30", "ID": "42"}),
    ("/v3/lease/grant", {"TTL": 30, "ID": 42}),
    ("/v3/lease/grant", {"TTL": "60", "ID": "43"}),
    ("/v3/kv/put", {"key": b64("leased"), "value": b64("v"), "lease": "42"}),
    ("/v3/lease/leases", {}),
    ("/v3/lease/timetolive", {"ID": "42", "keys": True}),
    ("/v3/kv/lease/timetolive", {"ID": "44"}),
    ("/v3/lease/keepalive", {"ID": "42"}),
    ("/v3/lease/keepalive", {"ID": "44"}),
    ("/v3/lease/revoke", {"ID": "42"}),
    ("/v3/kv/lease/revoke", {"ID": "42"}),
    ("/v3/kv/range", {"key": b64("leased")}),
    ("/v3/lease/revoke", {"ID": "43"}),
    ("/v3/auth/authenticate", {"name": "root", "password": "x"}),
]


def normalised(answer):
    """What must be equal: not the ids of cluster and member, raft terms, or a TTL that ticks."""
    if isinstance(answer, list):
        return [normalised(item) for item in answer]
    if not isinstance(answer, dict):
        return answer
    out = {}
    for name, value in answer.items():
        if name in ("cluster_id", "member_id", "raft_term"):
            continue
        if name == "TTL" and "grantedTTL" in answer:
            value = "ticks"
        out[name] = normalised(value)
    return out


def run_script(port: int, watch_port_requests: dict) -> list:
    """Each request's (HTTP status, normalised answer); a parse error's text is the library's own."""
    target = HttpNode(None, port)
    stream = WatchStream(target, watch_port_requests)
    assert normalised(stream.next()) == {"header": {"revision": "1"}, "created": True}
    results = []
    try:
        for path, body in DIFFERENTIAL_SCRIPT:
            status, data, _ = target.request("POST", path, json.dumps(body))
            lines = [json.loads(line) for line in data.splitlines() if line.strip()]
            answer = lines if len(lines) > 1 else lines[0]
            if isinstance(answer, dict) and "code" in answer and not answer["error"].startswith("etcdserver"):
                answer = {"code": answer["code"]}  # a JSON parser's message: ours and grpc-gateway's differ
            results.append((path, status, normalised(answer)))
        events = []
        while len(events) < 10:  # every write of the script to "foo..." and "t"/"leased"
            events += normalised(stream.next())["events"]
        results.append(("watch", events))
    finally:
        stream.close()
    return results


def test_json_answers_equal_real_etcd(http_node, tmp_path):
    """Goal: for every endpoint the JSON is etcd 3.4's, byte for byte after normalising ids.
    Method: the same script of requests (and a watch of every key) to real etcd's
    gateway and to ours, both fresh; compare each answer."""
    from tests.etcd_server import EtcdServer

    etcd = EtcdServer(str(tmp_path))
    try:
        etcd.start()
        watch = {"create_request": {"key": "AA==", "range_end": "AA==", "prev_kv": True}}
        expected = run_script(etcd.client_port, watch)
    finally:
        etcd.stop()
    got = run_script(http_node.http_port, watch)
    for want, have in zip(expected, got):
        assert have == want
    assert len(got) == len(expected)
