"""The gateway's request-handling core, shared by every client front end.

How this works: a front end (the ZeroMQ ROUTER today, etcd's gRPC later)
hands each decoded request to `submit(origin, op, body)` with an opaque
`origin` it will recognise in the reply. The core validates the request
and sorts it into one of three paths:

- serializable reads are answered at once from the local store;
- linearizable reads wait for a read index from the raft log (one
  READ_INDEX round serves every read that arrived before it was asked),
  then for the applier to have applied up to that index, then are served
  from the local store;
- writes are queued as proposals; the actor sends the queue to the raft
  log as one PROPOSE per pass and the applier's RESULTS complete them.
  When the raft log reports a new term, or that this member stopped leading
  (LEADER_CHANGED, with its commit index then), the writes already sent are marked; those still
  unanswered once that index is applied went to a leader that is gone and
  are failed LeaderChanged at once (an unknown outcome, as a timeout, but
  without waiting for expire_unanswered);
- lease keep-alives and time-to-live go to the leader's lessor in the raft
  log (LEASE_REQUEST); its LEASE_REPLY completes them (time-to-live adds
  the attached keys from the local store);
- membership requests and move_leader go to the raft log (MEMBER_REQUEST);
  its MEMBER_REPLY completes them.

A learner (the raft log's status says so) refuses everything but status,
serializable reads and snapshots, as etcd 3.4 ("rpc not supported for
learner"); the raft log refuses proposals and read indexes of a learner
too, so a stale flag here never lets one through.

The core never touches a socket: replies go to `emit(origin, status,
body)` and work for the raft log and the applier is collected in
`take_proposals()` / `take_read_index_request()` / `take_raft_status_request()`
/ `take_lease_requests()` for the actor to send. Every queue is bounded by `Limits`.
"""

from __future__ import annotations

import collections
import itertools
import random
from typing import Callable

from protocol import messages
from protocol.codec import STATUS_ERROR, STATUS_OK
from protocol.errors import QuorumError
from protocol.limits import Limits

SERVER_VERSION = "3.4.0-quorumkv.0.1"

# Operations the gateway answers without the log: reads of the local store,
# and node-local maintenance handled by the actor.
_LOCAL_OPS = {"hello", "status", "hash_kv", "hash", "alarm", "defragment", "snapshot", "lease_leases"}
# What a learner serves (etcd 3.4's isRPCSupportedForLearner, plus our hello and the snapshot stream).
_LEARNER_OPS = {"hello", "status", "snapshot"}
# Operations the leader's lessor answers (remaining TTLs live only there).
_LESSOR_OPS = {"lease_keep_alive", "lease_time_to_live"}

Emit = Callable[[object, int, dict], None]


class GatewayCore:
    def __init__(self, *, store, limits: Limits, member_id: int, cluster_id: int,
                 gateway_identity: bytes, emit: Emit, rng: random.Random, min_lease_ttl_s: int = 1):
        self.store = store
        self.limits = limits
        self.member_id = member_id
        self.cluster_id = cluster_id
        self.gateway_identity = gateway_identity
        self.emit = emit
        self.rng = rng
        self.min_lease_ttl_s = min_lease_ttl_s
        self.raft_term = 0
        self.raft_status: dict = {}
        self.is_learner = False
        # How far the applier's APPLIED reports got: they come after the RESULTS
        # they cover, so leader-change cuts go by this one. Reads may also go
        # by the store's own applied index (`store_applied_index`, read when a
        # read index arrives): a read needs the data in the store, nothing more.
        self.applied_index = store.applied_index()
        self.store_applied_index = self.applied_index
        # Writes: gw_request_id -> origin, and the proposals not yet sent.
        self.next_request_id = 1
        self.pending_writes: dict[int, object] = {}
        self.proposals: list[list] = []
        self.proposal_sizes: list[int] = []
        # Linearizable reads: waiting for a READ_INDEX round to start, in a
        # round (read_id -> reads), and ready once applied >= index.
        self.reads_unrequested: list[tuple] = []
        self.next_read_id = 1
        self.reads_in_round: dict[int, list[tuple]] = {}
        self.reads_at_index: collections.deque[tuple[int, list[tuple]]] = collections.deque()
        self.reads_held = 0  # linearizable reads in any of the three stages above
        # Requests needing the raft log's status (Status), by status id.
        self.next_status_id = 1
        self.status_waiting: list[object] = []
        self.status_in_flight: dict[int, list[object]] = {}
        # Lease requests for the lessor: not yet sent, and sent (id -> (origin, op, body)).
        self.next_lease_request_id = 1
        self.lease_requests_unsent: list[list] = []
        self.lease_requests_pending: dict[int, tuple] = {}
        # Membership requests for the raft log: not yet sent, and sent (id -> (origin, op)).
        self.next_member_request_id = 1
        self.member_requests_unsent: list[list] = []
        self.member_requests_pending: dict[int, object] = {}
        # Leader changes: (term, leader) last heard, and (commit index, request id)
        # cuts: writes below the id still unanswered once the index is applied are lost.
        self.leadership: tuple[int, int] = (-1, 0)
        self.leader_change_cuts: collections.deque[tuple[int, int]] = collections.deque()
        # Expiry (expire_unanswered): ids below these marks were issued before the previous call.
        self.write_expiry_mark = self.next_request_id
        self.lease_expiry_mark = self.next_lease_request_id
        self.member_expiry_mark = self.next_member_request_id
        # Local handlers for node-local ops the actor implements (snapshot, defragment, hello).
        self.local_handlers: dict[str, Callable[[object, dict], None]] = {}

    # ---- intake -------------------------------------------------------

    def pending_count(self) -> int:
        return (len(self.pending_writes) + self.reads_held + len(self.lease_requests_pending)
                + len(self.member_requests_pending))

    def submit(self, origin: object, op: object, body: object, size_bytes: int = 0) -> None:
        """Take one request; `size_bytes` is its encoded size (for batch bounds)."""
        try:
            normalised = messages.validate_request(op, body, self.limits)
            # As etcd, the bound is on what goes through the raft log: reads
            # are bounded only by the transport (frame / gRPC message size).
            if size_bytes > self.limits.max_request_bytes and messages.is_write(op, normalised):
                raise QuorumError("RequestTooLarge")
            self._route(origin, op, normalised, size_bytes)
        except QuorumError as error:
            self.emit(origin, STATUS_ERROR, error.to_wire())

    def fail(self, origin: object, error: QuorumError) -> None:
        self.emit(origin, STATUS_ERROR, error.to_wire())

    def _route(self, origin: object, op: str, body: dict, size_bytes: int) -> None:
        if self.pending_count() >= self.limits.max_pending_requests_per_gateway:
            raise QuorumError("TooManyRequests", "gateway queue is full")
        if self.is_learner and op not in _LEARNER_OPS and not (op == "range" and body["serializable"]):
            raise QuorumError("LearnerNotSupported")
        if messages.is_write(op, body):
            self._queue_write(origin, op, body, size_bytes)
        elif op == "range":
            if body["serializable"]:
                self._serve_read(origin, op, body)
            else:
                self.reads_unrequested.append((origin, op, body))
                self.reads_held += 1
        elif op == "status":
            self.status_waiting.append(origin)
        elif op in _LESSOR_OPS:
            self._queue_lease_request(origin, op, body)
        elif op in messages.MEMBER_OPS:
            request_id = self.next_member_request_id
            self.next_member_request_id += 1
            self.member_requests_pending[request_id] = (origin, op)
            self.member_requests_unsent.append([request_id, op, body])
        elif op in self.local_handlers:
            self.local_handlers[op](origin, body)
        elif op in _LOCAL_OPS:
            self._serve_read(origin, op, body)
        else:
            raise QuorumError("UnknownOp", repr(op))

    def _queue_write(self, origin: object, op: str, body: dict, size_bytes: int) -> None:
        if op == "lease_grant" and body["ID"] == 0:
            # As etcd, the member that receives a grant picks the id, so the
            # log carries it and every member applies the same one.
            body["ID"] = self.rng.randrange(1, 1 << 63)
        if op == "lease_grant" and body["TTL"] < self.min_lease_ttl_s:
            # As etcd's lessor, a TTL below the minimum (1.5 election timeouts)
            # becomes the minimum; decided here so every member applies the same.
            body["TTL"] = self.min_lease_ttl_s
        request_id = self.next_request_id
        self.next_request_id += 1
        self.pending_writes[request_id] = origin
        self.proposals.append([request_id, op, body])
        self.proposal_sizes.append(size_bytes)

    def _queue_lease_request(self, origin: object, op: str, body: dict) -> None:
        request_id = self.next_lease_request_id
        self.next_lease_request_id += 1
        self.lease_requests_pending[request_id] = (origin, op, body)
        self.lease_requests_unsent.append([request_id, op, body])

    # ---- reads --------------------------------------------------------

    def header(self, revision: int) -> dict:
        return {"cluster_id": self.cluster_id, "member_id": self.member_id,
                "revision": revision, "raft_term": self.raft_term}

    def _serve_read(self, origin: object, op: str, body: dict) -> None:
        try:
            response = self._read(op, body)
        except QuorumError as error:
            self.emit(origin, STATUS_ERROR, error.to_wire())
            return
        self.emit(origin, STATUS_OK, response)

    def _read(self, op: str, body: dict) -> dict:
        if op == "range":
            response = self.store.range(body)
        elif op == "hash_kv":
            response = self.store.hash_kv(body["revision"])
        elif op == "hash":
            response = self.store.hash_all()
        elif op == "alarm":
            response = {"header": {"revision": self.store.revision()}, "alarms": self.store.alarms()}
        elif op == "lease_time_to_live":
            response = self.store.lease_time_to_live(body)
        elif op == "lease_leases":
            response = self.store.lease_leases()
        else:
            raise QuorumError("UnknownOp", repr(op))
        response["header"] = self.header(response["header"]["revision"])
        return response

    # ---- work for the actor to send ------------------------------------

    def take_proposals(self) -> list[list]:
        """The next PROPOSE batch (bounded), or [] if nothing is queued."""
        count, total_bytes = 0, 0
        for size_bytes in self.proposal_sizes[: self.limits.max_proposal_batch_requests]:
            if count and total_bytes + size_bytes > self.limits.max_proposal_batch_bytes:
                break
            count += 1
            total_bytes += size_bytes
        batch = self.proposals[:count]
        del self.proposals[:count]
        del self.proposal_sizes[:count]
        return batch

    def take_lease_requests(self) -> list[list]:
        """The next LEASE_REQUEST batch (bounded), or [] if none is queued."""
        count = self.limits.max_proposal_batch_requests
        batch = self.lease_requests_unsent[:count]
        del self.lease_requests_unsent[:count]
        return batch

    def take_member_requests(self) -> list[list]:
        """The next MEMBER_REQUEST batch (bounded), or [] if none is queued."""
        count = self.limits.max_proposal_batch_requests
        batch = self.member_requests_unsent[:count]
        del self.member_requests_unsent[:count]
        return batch

    def take_read_index_request(self) -> int | None:
        """A read id to send as READ_INDEX when reads are waiting for one."""
        if not self.reads_unrequested:
            return None
        read_id = self.next_read_id
        self.next_read_id += 1
        self.reads_in_round[read_id] = self.reads_unrequested
        self.reads_unrequested = []
        return read_id

    def take_raft_status_request(self) -> int | None:
        if not self.status_waiting:
            return None
        status_id = self.next_status_id
        self.next_status_id += 1
        self.status_in_flight[status_id] = self.status_waiting
        self.status_waiting = []
        return status_id

    # ---- answers from the raft log and the applier -----------------------

    def on_propose_failed(self, request_ids: list, code: str) -> None:
        for request_id in request_ids:
            origin = self.pending_writes.pop(request_id, None)
            if origin is not None:
                self.fail(origin, QuorumError(code))

    def on_results(self, results: list) -> None:
        for request_id, status, body in results:
            origin = self.pending_writes.pop(request_id, None)
            if origin is not None:
                self.emit(origin, status, body)

    def on_lease_replies(self, replies: list) -> None:
        for request_id, status, body in replies:
            pending = self.lease_requests_pending.pop(request_id, None)
            if pending is None:
                continue
            origin, op, request = pending
            if status != STATUS_OK:
                self.emit(origin, status, body)
                continue
            response = {"header": self.header(self.store.revision()), "ID": body["ID"], "TTL": body["TTL"]}
            if op == "lease_time_to_live":
                response["grantedTTL"] = body["grantedTTL"]
                response["keys"] = []
                if request["keys"] and body["TTL"] != -1:
                    response["keys"] = self.store.lease_time_to_live(request)["keys"]
            self.emit(origin, STATUS_OK, response)

    def on_member_replies(self, replies: list) -> None:
        for request_id, status, body in replies:
            pending = self.member_requests_pending.pop(request_id, None)
            if pending is None:
                continue
            origin, op = pending
            if status == STATUS_OK:
                # etcd's Cluster service header has no revision; Maintenance's (move_leader) has.
                body = dict(body, header=self.header(self.store.revision() if op == "move_leader" else 0))
            self.emit(origin, status, body)

    def on_read_index(self, read_id: int, index: int) -> None:
        reads = self.reads_in_round.pop(read_id, None)
        if reads is None:
            return
        self.reads_at_index.append((index, reads))
        self._catch_up_applied()
        self._serve_ready_reads()

    def on_read_index_failed(self, read_id: int, code: str) -> None:
        reads = self.reads_in_round.pop(read_id, [])
        self.reads_held -= len(reads)
        for origin, _op, _body in reads:
            self.fail(origin, QuorumError(code))

    def on_applied(self, applied_index: int) -> None:
        if applied_index > self.applied_index:
            self.applied_index = applied_index
        self._serve_ready_reads()
        self._fail_writes_lost_with_leader()

    def waits_for_applied(self) -> bool:
        """Whether reads or a leader-change cut wait for the applier: the actor
        asks for its APPLIED reports only then (they cost a message a batch)."""
        return bool(self.reads_at_index or self.leader_change_cuts)

    def _catch_up_applied(self) -> None:
        # Without APPLIED reports (none asked for) the index known here is
        # stale; the store's own is current.
        self.store_applied_index = self.store.applied_index()

    def on_leader_changed(self, term: int, leader: int, commit_index: int) -> None:
        """The raft log's term or leader changed. On a new term, or when this
        member stops leading, the writes sent to the raft log before (not
        those still queued here: they go to the new leader) and not answered
        once commit_index is applied (the applier answers every committed one
        before its APPLIED) were never known committed here: they are failed
        LeaderChanged, an unknown outcome. A follower that merely lost sight
        of its leader in the same term (a pre-vote) fails nothing: the
        leader may well go on and commit them."""
        previous_term, previous_leader = self.leadership
        if term < previous_term:
            return  # out of date
        self.leadership = (term, leader)
        if term == previous_term and not (previous_leader == self.member_id != leader):
            return
        first_unsent = self.proposals[0][0] if self.proposals else self.next_request_id
        if self.pending_writes and next(iter(self.pending_writes)) < first_unsent:
            self.leader_change_cuts.append((commit_index, first_unsent))
            self._fail_writes_lost_with_leader()

    def _fail_writes_lost_with_leader(self) -> None:
        while self.leader_change_cuts and self.leader_change_cuts[0][0] <= self.applied_index:
            _index, first_unsent = self.leader_change_cuts.popleft()
            for request_id in list(itertools.takewhile(lambda i: i < first_unsent, self.pending_writes)):
                self.fail(self.pending_writes.pop(request_id), QuorumError("LeaderChanged"))

    def _serve_ready_reads(self) -> None:
        # Read rounds complete in order, so their indexes never decrease.
        applied_index = max(self.applied_index, self.store_applied_index)
        while self.reads_at_index and self.reads_at_index[0][0] <= applied_index:
            _index, reads = self.reads_at_index.popleft()
            self.reads_held -= len(reads)
            for origin, op, body in reads:
                self._serve_read(origin, op, body)

    def on_raft_status(self, status_id: int, status: dict) -> None:
        self.raft_status = status
        self.raft_term = status.get("term", self.raft_term)
        self.is_learner = bool(status.get("is_learner", False))
        waiting = self.status_in_flight.pop(status_id, [])
        if not waiting:
            return
        store_status = self.store.status()
        response = {
            "header": self.header(store_status["revision"]),
            "version": SERVER_VERSION,
            "db_size": store_status["db_size"],
            "db_size_in_use": store_status["db_size_in_use"],
            "leader": status.get("leader", 0),
            "raft_index": status.get("last_index", 0),
            "raft_term": status.get("term", 0),
            "raft_applied_index": store_status["raft_applied_index"],
            "errors": [],
            "is_learner": self.is_learner,
        }
        alarms = self.store.alarms()
        if alarms:
            names = {messages.ALARM_NOSPACE: "NOSPACE", messages.ALARM_CORRUPT: "CORRUPT"}
            response["errors"] = [f"memberID:{a['member_id']} alarm:{names.get(a['alarm'], a['alarm'])} "
                                  for a in alarms]
        for origin in waiting:
            self.emit(origin, STATUS_OK, response)

    def expire_unanswered(self) -> int:
        """Fail with Timeout every write and lease request issued before the
        previous call and still unanswered; returns how many. Called every
        period by the actor, so a request gets between one and two periods.
        In a cluster a proposal can be lost (its leader died before it
        committed, or truncated it): without this its client would wait
        forever and the gateway's queue would fill. The outcome of such a
        write is unknown to the client, as etcd's "request timed out"."""
        expired = 0
        for request_id in list(itertools.takewhile(lambda i: i < self.write_expiry_mark, self.pending_writes)):
            self.fail(self.pending_writes.pop(request_id), QuorumError("Timeout"))
            expired += 1
        for request_id in list(itertools.takewhile(lambda i: i < self.lease_expiry_mark,
                                                   self.lease_requests_pending)):
            origin, _op, _body = self.lease_requests_pending.pop(request_id)
            self.fail(origin, QuorumError("Timeout"))
            expired += 1
        for request_id in list(itertools.takewhile(lambda i: i < self.member_expiry_mark,
                                                   self.member_requests_pending)):
            self.fail(self.member_requests_pending.pop(request_id)[0], QuorumError("Timeout"))
            expired += 1
        self.write_expiry_mark = self.next_request_id
        self.lease_expiry_mark = self.next_lease_request_id
        self.member_expiry_mark = self.next_member_request_id
        return expired

    def fail_everything(self, code: str) -> None:
        """Answer every request still held (the actor is stopping)."""
        error = QuorumError(code)
        for origin in list(self.pending_writes.values()):
            self.fail(origin, error)
        self.pending_writes.clear()
        for origin, _op, _body in self.lease_requests_pending.values():
            self.fail(origin, error)
        self.lease_requests_pending.clear()
        self.lease_requests_unsent.clear()
        for origin, _op in self.member_requests_pending.values():
            self.fail(origin, error)
        self.member_requests_pending.clear()
        self.member_requests_unsent.clear()
        self.proposals.clear()
        self.proposal_sizes.clear()
        for origin, _op, _body in self.reads_unrequested:
            self.fail(origin, error)
        for reads in self.reads_in_round.values():
            for origin, _op, _body in reads:
                self.fail(origin, error)
        for _index, reads in self.reads_at_index:
            for origin, _op, _body in reads:
                self.fail(origin, error)
        self.reads_unrequested, self.reads_in_round = [], {}
        self.reads_at_index.clear()
        self.reads_held = 0
