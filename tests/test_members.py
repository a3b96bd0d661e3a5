"""Goal: the member table applies conf changes as every member must (the same
table everywhere, also for a member replaying the log after joining), the
leader's checks give etcd's errors, the gateway routes membership requests
and refuses a learner's linearizable ones, and quorumctl's member output is
etcdctl 3.4's byte for byte. Method: pure functions and the gateway core
driven by hand; expected etcdctl text captured from etcdctl 3.4.23 against
etcd 3.4.23."""

from __future__ import annotations

import pytest

from actors import members
from actors.config import NodeConfig, member_id_for
from actors.members import MemberTable, initial_table
from protocol.codec import STATUS_ERROR, STATUS_OK
from protocol.errors import QuorumError
from tests.test_gateway_core import make_core
from tools import ctl_members
from tools.ctl_args import CtlError
from tools.ctl_format import render

TOKEN = "t"
A, B, C = "http://127.0.0.1:1001", "http://127.0.0.1:1002", "http://127.0.0.1:1003"


def three(state: str = "new", own: str = A) -> NodeConfig:
    return NodeConfig(name="a", initial_cluster=f"a={A},b={B},c={C}", initial_cluster_token=TOKEN,
                      initial_advertise_peer_urls=(own,), initial_cluster_state=state)


def ids(*urls: str) -> list[int]:
    return [member_id_for((url,), TOKEN) for url in urls]


def test_initial_table_and_a_joining_member_counts_itself_a_learner():
    table = initial_table(three())
    assert sorted(table.voters()) == sorted(ids(A, B, C)) and table.learners() == ()
    assert {rec["name"] for rec in table.listed()} == {"a", "b", "c"}
    assert all(rec["clientURLs"] == [] for rec in table.listed())
    joining = initial_table(three("existing", C))
    assert joining.learners() == tuple(ids(C)) and sorted(joining.voters()) == sorted(ids(A, B))


def test_changes_apply_in_order_and_a_replay_over_the_flags_converges():
    (d,) = ids("http://127.0.0.1:1004")
    leader = initial_table(three())
    joiner = initial_table(NodeConfig(name="d", initial_cluster=f"a={A},b={B},c={C},d=http://127.0.0.1:1004",
                                      initial_cluster_token=TOKEN, initial_cluster_state="existing",
                                      initial_advertise_peer_urls=("http://127.0.0.1:1004",)))
    changes = [
        ("update", ids(A)[0], {"ID": ids(A)[0], "name": "a", "clientURLs": ["http://127.0.0.1:2379"]}, 3),
        ("add_learner", d, members.record(d, "", ["http://127.0.0.1:1004"], (), True), 5),
        ("update", d, {"ID": d, "name": "d", "clientURLs": ["http://127.0.0.1:4379"]}, 6),
        ("promote_learner", d, {"ID": d}, 8),
        ("remove", ids(B)[0], {"ID": ids(B)[0]}, 9),
    ]
    for table in (leader, joiner):
        for kind, member_id, member, index in changes:
            table.apply_change(kind, member_id, member, index)
    assert leader.to_wire() == joiner.to_wire()
    assert leader.conf_index == 9 and d in leader.voters() and ids(B)[0] not in leader.members
    assert MemberTable.from_wire(leader.to_wire()) == leader


def test_leader_checks_give_etcds_errors():
    table = initial_table(three())
    with pytest.raises(QuorumError, match="member ID already exist"):
        members.check_add(table, [A], False, TOKEN)
    with pytest.raises(QuorumError, match="Peer URLs already exists"):
        members.check_add(table, [A, "http://127.0.0.1:9"], False, TOKEN)
    learner = members.check_add(table, ["http://127.0.0.1:9"], True, TOKEN)
    learner_id = member_id_for(("http://127.0.0.1:9",), TOKEN)
    assert learner == members.record(learner_id, "", ["http://127.0.0.1:9"], (), True)
    table.apply_change("add_learner", learner["ID"], learner, 4)
    with pytest.raises(QuorumError, match="too many learner members"):
        members.check_add(table, ["http://127.0.0.1:10"], True, TOKEN)
    with pytest.raises(QuorumError, match="can only promote a learner member$"):
        members.check_promote(table, ids(A)[0], 0, 10)
    with pytest.raises(QuorumError, match="in sync with leader"):
        members.check_promote(table, learner["ID"], 80, 100)
    assert members.check_promote(table, learner["ID"], 90, 100) == {"ID": learner["ID"]}
    with pytest.raises(QuorumError, match="member not found"):
        members.check_remove(table, 12345)
    with pytest.raises(QuorumError, match="given member URLs are invalid"):
        members.check_peer_urls(["not a url"])
    with pytest.raises(QuorumError, match="Peer URLs already exists"):
        members.check_update(table, ids(A)[0], [B])
    # Adding a voter needs a started quorum of the bigger cluster (etcd's strict reconfig check).
    for rec in table.listed():
        rec["name"] = "" if rec["ID"] != ids(A)[0] else rec["name"]
    with pytest.raises(QuorumError, match="not enough started members"):
        members.check_add(table, ["http://127.0.0.1:11"], False, TOKEN)
    single = initial_table(NodeConfig(initial_advertise_peer_urls=(A,), initial_cluster_token=TOKEN))
    with pytest.raises(QuorumError, match="not enough started members"):
        members.check_remove(single, ids(A)[0])
    # etcd's exceptions: a one-member cluster may grow; a learner being promoted counts as started.
    assert members.check_add(single, ["http://127.0.0.1:12"], False, TOKEN)["isLearner"] is False
    second = members.check_add(single, ["http://127.0.0.1:12"], True, TOKEN)
    single.apply_change("add_learner", second["ID"], second, 3)
    assert members.check_promote(single, second["ID"], 10, 10) == {"ID": second["ID"]}


def test_context_round_trip():
    origin = [7, b"gateway-0", 3]
    member, back = members.unpack_context(members.pack_context({"ID": 5}, origin))
    assert member == {"ID": 5} and back == origin
    assert members.unpack_context(b"") == ({}, None)


def test_gateway_sends_member_requests_to_the_raft_log_and_adds_a_header():
    core, _store, replies = make_core()
    core.submit("c1", "member_list", {})
    core.submit("c2", "move_leader", {"targetID": 5})
    batch = core.take_member_requests()
    assert [item[1] for item in batch] == ["member_list", "move_leader"]
    core.on_member_replies([[batch[0][0], STATUS_OK, {"members": []}], [batch[1][0], STATUS_OK, {}]])
    assert replies[0][2]["header"]["revision"] == 0  # etcd's Cluster service header has none
    assert replies[1][2]["header"]["revision"] == 1
    core.submit("c3", "member_add", {"peerURLs": []})
    assert replies[-1][1] == STATUS_ERROR and replies[-1][2]["code"] == "MemberBadURLs"


def test_a_learner_gateway_serves_only_status_and_serializable_reads():
    core, _store, replies = make_core()
    core.on_raft_status(0, {"term": 2, "leader": 1, "is_learner": True})
    core.submit("lin", "range", {"key": b"k"})
    core.submit("put", "put", {"key": b"k", "value": b"v"})
    core.submit("ser", "range", {"key": b"k", "serializable": True})
    core.submit("st", "status", {})
    assert [(origin, status) for origin, status, _ in replies[:3]] == [
        ("lin", STATUS_ERROR), ("put", STATUS_ERROR), ("ser", STATUS_OK)]
    assert replies[0][2]["message"] == "etcdserver: rpc not supported for learner"
    core.on_raft_status(core.take_raft_status_request(), {"term": 2, "leader": 1, "is_learner": True})
    assert replies[-1][0] == "st" and replies[-1][2]["is_learner"] is True


# ---- quorumctl's member output, as etcdctl 3.4.23 printed it --------------------------------

HEADER = {"cluster_id": 14841639068965178418, "member_id": 10276657743932975437, "revision": 0, "raft_term": 2}
DEFAULT = {"ID": 10276657743932975437, "name": "default", "peerURLs": ["http://localhost:2380"],
           "clientURLs": ["http://127.0.0.1:23791"], "isLearner": False}
LEARNER = {"ID": 17424242745033974983, "name": "", "peerURLs": ["http://127.0.0.1:23804"], "clientURLs": [],
           "isLearner": True}
LISTED = {"header": HEADER, "members": [DEFAULT, LEARNER]}


def test_member_list_formats_match_etcdctl():
    assert render("member_list", "simple", LISTED) == (
        "8e9e05c52164694d, started, default, http://localhost:2380, http://127.0.0.1:23791, false\n"
        "f1cf587581ed64c7, unstarted, , http://127.0.0.1:23804, , true\n")
    assert render("member_list", "json", LISTED) == (
        '{"header":{"cluster_id":14841639068965178418,"member_id":10276657743932975437,"raft_term":2},'
        '"members":[{"ID":10276657743932975437,"name":"default","peerURLs":["http://localhost:2380"],'
        '"clientURLs":["http://127.0.0.1:23791"]},{"ID":17424242745033974983,"peerURLs":["http://127.0.0.1:23804"],'
        '"isLearner":true}]}\n')
    assert render("member_list", "fields", LISTED) == (
        '"ClusterID" : 14841639068965178418\n"MemberID" : 10276657743932975437\n"Revision" : 0\n"RaftTerm" : 2\n'
        '"ID" : 10276657743932975437\n"Name" : "default"\n"PeerURL" : "http://localhost:2380"\n'
        '"ClientURL" : "http://127.0.0.1:23791"\n"IsLearner" : false\n\n'
        '"ID" : 17424242745033974983\n"Name" : ""\n"PeerURL" : "http://127.0.0.1:23804"\n"IsLearner" : true\n\n')
    assert render("member_list", "table", {"header": HEADER, "members": [LEARNER, DEFAULT]}) == (
        "+------------------+-----------+---------+------------------------+------------------------+------------+\n"
        "|        ID        |  STATUS   |  NAME   |       PEER ADDRS       |      CLIENT ADDRS      | IS LEARNER |\n"
        "+------------------+-----------+---------+------------------------+------------------------+------------+\n"
        "| f1cf587581ed64c7 | unstarted |         | http://127.0.0.1:23804 |                        |       true |\n"
        "| 8e9e05c52164694d |   started | default |  http://localhost:2380 | http://127.0.0.1:23791 |      false |\n"
        "+------------------+-----------+---------+------------------------+------------------------+------------+\n")


def test_member_change_and_move_leader_lines_match_etcdctl():
    added = {"header": HEADER, "member": LEARNER, "members": [DEFAULT, LEARNER]}
    assert render("member_add", "simple", added) == "Member f1cf587581ed64c7 added to cluster cdf818194e3a8c32\n"
    assert render("member_add", "json", added).startswith(
        '{"header":{"cluster_id":14841639068965178418,"member_id":10276657743932975437,"raft_term":2},'
        '"member":{"ID":17424242745033974983,"peerURLs":["http://127.0.0.1:23804"],"isLearner":true},"members":[')
    assert render("member_remove", "simple", LISTED, {"member_id": 0x21ffe1e9bd43e1a0}) == \
        "Member 21ffe1e9bd43e1a0 removed from cluster cdf818194e3a8c32\n"
    assert render("member_update", "simple", LISTED, {"member_id": 0x21ffe1e9bd43e1a0}) == \
        "Member 21ffe1e9bd43e1a0 updated in cluster cdf818194e3a8c32\n"
    # %16x pads with spaces, not zeros.
    assert render("member_promote", "simple", LISTED, {"member_id": 0xabc}) == \
        "Member              abc promoted in cluster cdf818194e3a8c32\n"
    assert render("move_leader", "simple", {}, {"leader_id": 0x8e9e05c52164694d, "target_id": 0xabc}) == \
        "Leadership transferred from 8e9e05c52164694d to abc\n"
    assert render("move_leader", "json", {"header": HEADER}) == "{}\n"
    assert ctl_members.initial_cluster_lines("e2", 0x21ffe1e9bd43e1a0, ["http://127.0.0.1:23802"], [
        {"ID": 0x21ffe1e9bd43e1a0, "name": "", "peerURLs": ["http://127.0.0.1:23802"]}, DEFAULT]) == (
        '\nETCD_NAME="e2"\nETCD_INITIAL_CLUSTER="e2=http://127.0.0.1:23802,default=http://localhost:2380"\n'
        'ETCD_INITIAL_ADVERTISE_PEER_URLS="http://127.0.0.1:23802"\nETCD_INITIAL_CLUSTER_STATE="existing"\n')


def test_ids_parse_as_etcdctl_and_client_urls_map_to_the_zmq_port():
    assert ctl_members.parse_hex_id("8e9e05c52164694d") == 0x8e9e05c52164694d
    with pytest.raises(CtlError, match=r'^strconv.ParseUint: parsing "zz": invalid syntax$'):
        ctl_members.parse_hex_id("zz")
    with pytest.raises(CtlError, match="value out of range"):
        ctl_members.parse_hex_id("1" * 17)
    assert ctl_members.zmq_endpoint_of("http://127.0.0.1:2379") == "127.0.0.1:2382"
