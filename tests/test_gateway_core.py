"""Goal: the gateway core routes each request to the right path and keeps
linearizable reads honest. Method: drive GatewayCore directly with a stub
store and play the raft log's and the applier's answers by hand."""

from __future__ import annotations

import dataclasses
import random

from actors.gateway_core import GatewayCore
from protocol.codec import STATUS_ERROR, STATUS_OK
from protocol.limits import Limits


class StubStore:
    def __init__(self):
        self.applied = 0
        self.reads = []

    def applied_index(self):
        return self.applied

    def revision(self):
        return 1

    def range(self, body):
        self.reads.append(body["key"])
        return {"header": {"revision": 1}, "kvs": [], "more": False, "count": 0}

    def alarms(self):
        return []

    def status(self):
        return {"db_size": 1, "db_size_in_use": 1, "revision": 1, "raft_applied_index": self.applied,
                "raft_term": 1, "compact_revision": 0}


def make_core(limits=Limits()):
    replies = []
    store = StubStore()
    core = GatewayCore(store=store, limits=limits, member_id=7, cluster_id=9, gateway_identity=b"gateway-0",
                       emit=lambda origin, status, body: replies.append((origin, status, body)),
                       rng=random.Random(1))
    return core, store, replies


def test_serializable_read_answers_at_once_with_full_header():
    core, store, replies = make_core()
    core.submit("c1", "range", {"key": b"k", "serializable": True})
    assert [(origin, status) for origin, status, _ in replies] == [("c1", STATUS_OK)]
    assert replies[0][2]["header"] == {"cluster_id": 9, "member_id": 7, "revision": 1, "raft_term": 0}


def test_linearizable_read_waits_for_read_index_and_apply():
    core, store, replies = make_core()
    core.submit("early", "range", {"key": b"a"})
    assert replies == [] and store.reads == []
    first_round = core.take_read_index_request()
    assert first_round is not None
    # A read arriving after the round was requested must not ride on it.
    core.submit("late", "range", {"key": b"b"})
    core.on_read_index(first_round, 5)
    assert replies == []  # applied (0) is behind the read index (5)
    core.on_applied(4)
    assert replies == []
    core.on_applied(5)
    assert [origin for origin, _, _ in replies] == ["early"]
    second_round = core.take_read_index_request()
    core.on_read_index(second_round, 5)
    assert [origin for origin, _, _ in replies] == ["early", "late"]


def test_read_goes_by_the_store_when_no_applied_report_came():
    """The actor asks for APPLIED reports only while something waits, so a read
    index may find the store already past it: served at once. A leader-change
    cut goes by the reports alone (they follow the RESULTS they cover)."""
    core, store, replies = make_core()
    assert not core.waits_for_applied()
    store.applied = 6  # applied, and no APPLIED report came
    core.submit("read", "range", {"key": b"a"})
    core.on_read_index(core.take_read_index_request(), 5)
    assert [origin for origin, _, _ in replies] == ["read"]
    core.submit("behind", "range", {"key": b"b"})
    core.on_read_index(core.take_read_index_request(), 8)
    assert len(replies) == 1 and core.waits_for_applied()
    core.on_applied(8)
    assert [origin for origin, _, _ in replies] == ["read", "behind"] and not core.waits_for_applied()
    core.submit("w", "put", {"key": b"a", "value": b"1"}, size_bytes=10)
    core.take_proposals()
    core.on_leader_changed(2, 3, 9)
    store.applied = 9  # the store is there, but the write's RESULTS may still be on the way
    core.submit("read2", "range", {"key": b"c"})
    core.on_read_index(core.take_read_index_request(), 9)
    assert [origin for origin, _, _ in replies][-1] == "read2"
    assert "w" not in [origin for origin, _, _ in replies] and core.waits_for_applied()
    core.on_applied(9)
    assert [(origin, body["code"]) for origin, status, body in replies if origin == "w"] == [("w", "LeaderChanged")]


def test_writes_are_batched_and_completed_by_results():
    core, _store, replies = make_core()
    core.submit("w1", "put", {"key": b"a", "value": b"1"}, size_bytes=10)
    core.submit("w2", "delete_range", {"key": b"a"}, size_bytes=10)
    batch = core.take_proposals()
    assert [op for _, op, _ in batch] == ["put", "delete_range"]
    assert core.take_proposals() == []
    core.on_results([[batch[1][0], STATUS_OK, {"header": {}}], [batch[0][0], STATUS_OK, {"header": {}}]])
    assert [origin for origin, _, _ in replies] == ["w2", "w1"]
    core.on_results([[batch[0][0], STATUS_OK, {}]])  # a duplicate answer is ignored
    assert len(replies) == 2


def test_proposal_batches_respect_request_and_byte_bounds():
    limits = dataclasses.replace(Limits(), max_proposal_batch_requests=3, max_proposal_batch_bytes=2_000_000)
    core, _store, _replies = make_core(limits)
    for i in range(5):
        core.submit(i, "put", {"key": b"k%d" % i}, size_bytes=900_000)
    sizes = []
    while batch := core.take_proposals():
        sizes.append(len(batch))
    assert sizes == [2, 2, 1]


def test_failed_proposals_and_read_rounds_answer_with_the_code():
    core, _store, replies = make_core()
    core.submit("w", "put", {"key": b"a"})
    core.submit("r", "range", {"key": b"a"})
    batch = core.take_proposals()
    core.on_propose_failed([batch[0][0]], "NoLeader")
    core.on_read_index_failed(core.take_read_index_request(), "NoLeader")
    assert {(origin, body["code"]) for origin, status, body in replies if status == STATUS_ERROR} == {
        ("w", "NoLeader"), ("r", "NoLeader")}


def test_invalid_requests_and_full_queue_are_refused():
    limits = dataclasses.replace(Limits(), max_pending_requests_per_gateway=2)
    core, _store, replies = make_core(limits)
    core.submit("bad", "put", {"key": b""})
    core.submit("big", "put", {"key": b"a"}, size_bytes=limits.max_request_bytes + 1)
    core.submit(1, "put", {"key": b"a"})
    core.submit(2, "put", {"key": b"b"})
    core.submit("full", "put", {"key": b"c"})
    codes = {origin: body["code"] for origin, status, body in replies if status == STATUS_ERROR}
    assert codes == {"bad": "EmptyKey", "big": "RequestTooLarge", "full": "TooManyRequests"}


def test_lease_grant_gets_an_id_before_it_is_proposed():
    core, _store, _replies = make_core()
    core.submit("g", "lease_grant", {"TTL": 10})
    (_request_id, op, body), = core.take_proposals()
    assert op == "lease_grant" and body["ID"] > 0


def test_pending_count_follows_reads_through_every_stage():
    core, _store, _replies = make_core()
    core.submit("a", "range", {"key": b"a"})
    core.submit("b", "range", {"key": b"b"})
    core.submit("w", "put", {"key": b"w"})
    assert core.pending_count() == 3
    round_id = core.take_read_index_request()
    assert core.pending_count() == 3
    core.on_read_index(round_id, 1)
    assert core.pending_count() == 3  # waiting for the applier
    core.on_applied(1)
    assert core.pending_count() == 1
    core.submit("c", "range", {"key": b"c"})
    core.on_read_index_failed(core.take_read_index_request(), "NoLeader")
    assert core.pending_count() == 1


def test_lease_grant_below_the_minimum_ttl_is_raised_before_it_is_proposed():
    core, _store, _replies = make_core()
    core.min_lease_ttl_s = 2
    core.submit("g", "lease_grant", {"TTL": 1})
    core.submit("h", "lease_grant", {"TTL": 30})
    assert [body["TTL"] for _id, _op, body in core.take_proposals()] == [2, 30]


def test_lease_keep_alive_and_time_to_live_go_to_the_lessor():
    core, store, replies = make_core()
    store.lease_time_to_live = lambda body: {"header": {"revision": 1}, "keys": [b"k"]}
    core.submit("ka", "lease_keep_alive", {"ID": 5})
    core.submit("ttl", "lease_time_to_live", {"ID": 5, "keys": True})
    core.submit("gone", "lease_time_to_live", {"ID": 6, "keys": True})
    assert replies == [] and core.pending_count() == 3
    (ka_id, _, _), (ttl_id, _, _), (gone_id, _, _) = core.take_lease_requests()
    assert core.take_lease_requests() == []
    core.on_lease_replies([[ka_id, STATUS_OK, {"ID": 5, "TTL": 10}],
                           [ttl_id, STATUS_OK, {"ID": 5, "TTL": 9, "grantedTTL": 10}],
                           [gone_id, STATUS_OK, {"ID": 6, "TTL": -1, "grantedTTL": 0}]])
    answers = {origin: body for origin, status, body in replies if status == STATUS_OK}
    assert {k: v for k, v in answers["ka"].items() if k != "header"} == {"ID": 5, "TTL": 10}
    assert answers["ttl"]["keys"] == [b"k"] and answers["ttl"]["TTL"] == 9 and answers["ttl"]["grantedTTL"] == 10
    assert answers["gone"]["keys"] == [] and answers["gone"]["TTL"] == -1
    assert core.pending_count() == 0
    core.submit("nl", "lease_keep_alive", {"ID": 5})
    (nl_id, _, _), = core.take_lease_requests()
    core.on_lease_replies([[nl_id, STATUS_ERROR, {"code": "NoLeader", "message": "etcdserver: no leader"}]])
    assert replies[-1] == ("nl", STATUS_ERROR, {"code": "NoLeader", "message": "etcdserver: no leader"})


def test_unanswered_writes_and_lease_requests_expire_after_one_to_two_periods():
    """Goal: a proposal lost with its leader (never answered) does not hold its
    client or the gateway's queue forever. Method: queue writes and a lease
    request, call expire_unanswered twice, check only those issued before the
    first call fail with Timeout, on the second call."""
    core, _store, emitted = make_core()
    core.submit(("c", 1), "put", {"key": b"a", "value": b"1"})
    core.submit(("c", 2), "lease_keep_alive", {"ID": 7})
    core.take_proposals()
    core.take_lease_requests()
    assert core.expire_unanswered() == 0  # issued before this first call: they get one more period
    core.submit(("c", 3), "put", {"key": b"b", "value": b"2"})
    assert core.expire_unanswered() == 2
    failed = {origin: body["code"] for origin, status, body in emitted if status == STATUS_ERROR}
    assert failed == {("c", 1): "Timeout", ("c", 2): "Timeout"}
    assert core.expire_unanswered() == 1  # the third write, one period later
