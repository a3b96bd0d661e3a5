"""Writes lost with their leader are answered LeaderChanged promptly, not after the expiry.

Goal: the member that forwarded (or proposed) a write fails it with etcd's
"leader changed" (gRPC Unavailable, an unknown outcome) as soon as its raft
log reports a new term or leader and the write was not answered by the time
the commit index known then is applied; writes still queued in the gateway
go to the new leader untouched; a write the applier answers first keeps its
answer. Method: the gateway core driven by hand (as tests/test_gateway_core.py);
then a real 3-member cluster (tests/cluster_harness.py) whose leader is
paused with SIGSTOP while clients write through the followers: every write
is answered (ok or LeaderChanged) well before the old 7.5 s expiry, and the
history stays linearizable.
"""

from __future__ import annotations

import random
import threading
import time

from actors.gateway import REQUEST_EXPIRY_MS
from actors.gateway_core import GatewayCore
from protocol.client import Client, DeadlineExceededError, ops
from protocol.codec import STATUS_ERROR, STATUS_OK
from protocol.errors import CODES, UNAVAILABLE, QuorumError
from protocol.limits import Limits
from tests.cluster_harness import Cluster, _outcome_of_error
from tools import linearizability as lin


class StubStore:
    def applied_index(self):
        return 0

    def revision(self):
        return 1


def make_core():
    replies = []
    core = GatewayCore(store=StubStore(), limits=Limits(), member_id=7, cluster_id=9, gateway_identity=b"gateway-0",
                       emit=lambda origin, status, body: replies.append((origin, status, body)),
                       rng=random.Random(1))
    return core, replies


def put(core, origin):
    core.submit(origin, "put", {"key": origin.encode(), "value": b"v"})


def test_leader_changed_is_etcds_unknown_outcome_error():
    code = CODES["LeaderChanged"]
    assert (code.grpc_status, code.message, code.safe_to_retry) == (UNAVAILABLE, "etcdserver: leader changed", False)
    # The checker's client (tests/cluster_harness.py, as tools/nemesis.py) calls a failed write unknown.
    assert _outcome_of_error(lin.PUT, QuorumError("LeaderChanged")) == lin.UNKNOWN
    assert _outcome_of_error(lin.CAS, QuorumError("LeaderChanged")) == lin.UNKNOWN


def test_sent_writes_fail_leader_changed_once_the_known_commit_index_is_applied():
    core, replies = make_core()
    core.on_leader_changed(2, 1, 10)  # the leader at start: nothing pending
    put(core, "sent-1")
    put(core, "sent-2")
    put(core, "answered")
    sent = core.take_proposals()
    assert [item[0] for item in sent] == [1, 2, 3]
    put(core, "queued")  # not sent yet: it will go to the new leader
    core.on_results([[3, STATUS_OK, {"header": {}}]])
    core.on_leader_changed(3, 0, 12)  # the leader is gone; index 12 is committed here
    assert [origin for origin, _, _ in replies] == ["answered"], "failed before index 12 was applied"
    core.on_results([[1, STATUS_OK, {"header": {}}]])  # it was at or below 12: its answer comes first
    core.on_applied(12)
    assert [(origin, status, body.get("code")) for origin, status, body in replies[1:]] == [
        ("sent-1", STATUS_OK, None), ("sent-2", STATUS_ERROR, "LeaderChanged")]
    assert replies[-1][2]["message"] == "etcdserver: leader changed"
    # The queued write is still pending, and goes out with the next PROPOSE.
    assert [item[0] for item in core.take_proposals()] == [4]
    assert list(core.pending_writes) == [4]


def test_repeated_stale_or_same_term_reports_fail_nothing():
    core, replies = make_core()
    core.on_leader_changed(3, 1, 5)
    put(core, "w")
    core.take_proposals()
    core.on_leader_changed(3, 1, 5)  # the same leadership again
    core.on_leader_changed(2, 4, 5)  # an older term
    core.on_leader_changed(3, 0, 5)  # a follower that lost sight of its leader (pre-vote): same term
    core.on_leader_changed(3, 1, 5)  # ... and found it again
    core.on_applied(100)
    assert replies == [] and list(core.pending_writes) == [1]


def test_a_leader_that_steps_down_fails_its_writes_in_the_same_term():
    core, replies = make_core()  # member id 7
    core.on_leader_changed(3, 7, 5)
    put(core, "w")
    core.take_proposals()
    core.on_leader_changed(3, 0, 5)  # check-quorum: it stepped down, its proposals are in doubt
    assert replies == []
    core.on_applied(5)
    assert [(origin, body["code"]) for origin, _status, body in replies] == [("w", "LeaderChanged")]


# ---- a real cluster -------------------------------------------------------------

WRITERS_PER_FOLLOWER = 3
# Well before the gateway's expiry (7.5 to 15 s): a new leader is elected in one
# or two election timeouts (500 ms here); a loaded machine gets generous room.
PROMPT_ANSWER_S = REQUEST_EXPIRY_MS / 1000 * 0.6
CLIENT_TIMEOUT_S = 30.0


def test_writes_through_followers_are_answered_promptly_when_the_leader_is_paused(tmp_path):
    with Cluster(str(tmp_path), size=3) as cluster:
        cluster.start()
        leader = cluster.wait_for_leader()
        followers = [name for name in cluster.names if name != leader]
        history: list[lin.Op] = []
        history_lock = threading.Lock()
        paused_at: list[float] = []
        stop = threading.Event()
        errors: list[str] = []

        def writer(name: str, number: int) -> None:
            client = Client([cluster.members[name].zmq_endpoint], timeout_s=CLIENT_TIMEOUT_S,
                            discover_gateways=False, read_retries=0)
            key = b"leader-changed-%d" % number
            sequence = 0
            try:
                while not stop.is_set():
                    sequence += 1
                    value = b"%s-%d-%d" % (name.encode(), number, sequence)
                    start_ns = time.monotonic_ns()
                    try:
                        response = client.request(*ops.put(key, value))
                        outcome, revision = lin.OK, response["header"]["revision"]
                    except QuorumError as error:
                        outcome, revision = _outcome_of_error(lin.PUT, error), None
                        if isinstance(error, DeadlineExceededError):
                            errors.append(f"{name}: no answer in {CLIENT_TIMEOUT_S}s")
                        elif error.code not in ("LeaderChanged", "NoLeader", "Timeout"):
                            errors.append(f"{name}: {error.code}")
                    end_ns = time.monotonic_ns()
                    with history_lock:
                        history.append(lin.Op(client=f"{name}-{number}", op=lin.PUT, key=key, start_ns=start_ns,
                                              end_ns=end_ns, outcome=outcome, value=value, revision=revision))
            finally:
                client.close()

        threads = [threading.Thread(target=writer, args=(name, index), daemon=True)
                   for name in followers for index in range(WRITERS_PER_FOLLOWER)]
        for thread in threads:
            thread.start()
        try:
            wait_until(lambda: sum(op.outcome == lin.OK for op in list(history)) >= 30, 30.0, "writes before the pause")
            paused_at.append(time.monotonic_ns())
            cluster.pause_member(leader)
            elected: list[str] = []
            wait_until(lambda: elected.append(cluster.leader(among=followers)) or elected[-1] in followers,
                       30.0, "a new leader")
            new_leader = elected[-1]
            wait_until(lambda: sum(op.outcome == lin.OK and op.start_ns > paused_at[0] for op in list(history)) >= 30,
                       30.0, "writes under the new leader")
        finally:
            stop.set()
            for thread in threads:
                thread.join(CLIENT_TIMEOUT_S + 5)
            cluster.resume_member(leader)
        assert not errors, errors
        # Every write in flight when the leader stopped was answered promptly.
        spanning = [op for op in history if op.start_ns < paused_at[0]]
        slowest_s = max((op.end_ns - op.start_ns) / 1e9 for op in history)
        print(f"{len(history)} writes, {sum(op.outcome == lin.UNKNOWN for op in history)} unknown; "
              f"slowest answer {slowest_s:.2f}s; {len(spanning)} started before the pause")
        assert slowest_s < PROMPT_ANSWER_S, f"a write took {slowest_s:.2f}s (the expiry is {REQUEST_EXPIRY_MS} ms)"
        history.extend(final_reads(cluster.members[new_leader].zmq_endpoint,
                                   [b"leader-changed-%d" % number for number in range(WRITERS_PER_FOLLOWER)]))
        report = lin.check(history)
        assert report.ok, report.summary()


def final_reads(endpoint: str, keys: list[bytes]) -> list[lin.Op]:
    """A linearizable get of each key once the writers stopped: the value every
    write's outcome must explain (an unknown write may or may not be it)."""
    client = Client([endpoint], timeout_s=CLIENT_TIMEOUT_S, discover_gateways=False)
    try:
        reads = []
        for key in keys:
            start_ns = time.monotonic_ns()
            kvs = client.request(*ops.get(key)).get("kvs") or []
            reads.append(lin.Op(client="final", op=lin.GET, key=key, start_ns=start_ns, end_ns=time.monotonic_ns(),
                                outcome=lin.OK, result=kvs[0]["value"] if kvs else None,
                                mod_revision=kvs[0]["mod_revision"] if kvs else None))
        return reads
    finally:
        client.close()


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling a real cluster's progress, not synchronising threads
