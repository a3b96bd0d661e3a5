"""The applier actor: the one writer of the node's LMDB MVCC store.

A thin loop around `MvccStore.apply`. At start it asks the raft log for
every committed entry after the store's applied index (SUBSCRIBE), so a
restart re-applies exactly what is missing: the applied index is written
in the same LMDB transaction as the changes. The ENTRIES messages of one
loop pass are applied in one LMDB transaction; the results go back to the
gateways that proposed them, one RESULTS message per gateway (only for
entries proposed through this member: every member applies every entry,
and an entry names the member it was proposed through); then the gateways
and the watch broadcaster that asked for it (HELLO) hear how far the store
got (APPLIED), and the raft log gets its acknowledgement (flow control and
WAL release).

A store copy received from the leader (a follower too far behind) arrives
as INSTALL_SNAPSHOT once verified: the applier, between batches (so no
apply is under way), installs it as a new store generation when it is
ahead of the store (`MvccStore.install`: CURRENT is switched last), answers
the raft log, subscribes again from the new applied index and broadcasts
APPLIED with the new generation, on which readers reopen.

Physical compaction runs in bounded steps between batches; a compaction
request with `physical` is answered when its steps are done. Defragment
runs here because it needs the writer; the requests that arrive together
share one.

Nothing for a gateway is dropped because its queue is full (`GatewayOutbox`):
a message ZeroMQ refuses (the gateway's queue at its high-water mark) waits,
in order, and is resent every OUTBOX_RETRY_MS and before anything newer for
that gateway. An APPLIED supersedes the held one. Held results are bounded
by max_undelivered_results_per_gateway, which is at least what one gateway
can be owed (its max_pending_requests_per_gateway writes in flight).
"""

from __future__ import annotations

import collections
import os

import zmq

from actors import ipc
from actors.config import NodeConfig
from actors.gateway import map_size_bytes, store_dir
from actors.loop import ActorLoop
from actors.members import MemberTable, initial_table, unpack_context
from actors.mvcc import MvccStore
from actors.raft import ConfChange
from protocol import codec
from protocol.errors import QuorumError

COMPACTION_STEP_MS = 10
# How often messages a gateway's full queue refused are offered again.
OUTBOX_RETRY_MS = 10
RESUBSCRIBE_MS = 1000
# At most this long between applying an ENTRIES message and acknowledging it.
ACKNOWLEDGE_DELAY_MS = 2
# At start, how long to wait for every gateway's HELLO before asking for
# entries anyway: results for a gateway not yet connected would be lost.
GATEWAY_WAIT_MS = 2000


class GatewayOutbox:
    """Sends to gateways over the applier's ROUTER and keeps, per gateway, what
    its full queue refused, to resend in order (`flush`). Held: RESULTS and
    DEFRAGMENT answers in order, then the latest APPLIED (it supersedes earlier
    ones and goes after every result it covers). A gateway that is gone
    (unroutable) has its held messages dropped: its clients lost their
    connection with it."""

    def __init__(self, socket: zmq.Socket, max_held_results: int, log):
        self.socket = socket
        self.max_held_results = max_held_results
        self.log = log
        self.held: dict[bytes, collections.deque] = {}
        self.held_applied: dict[bytes, list] = {}
        self.held_results: dict[bytes, int] = {}
        self.results_dropped = 0  # over max_held_results: a bug, or a gateway that stopped reading

    def send(self, gateway: bytes, message: list) -> None:
        if message[0] == ipc.APPLIED:
            self.held_applied[gateway] = message  # the newest applied state is all a gateway needs
        else:
            self.held.setdefault(gateway, collections.deque()).append(message)
            if message[0] == ipc.RESULTS:
                self._count_results(gateway, len(message[1]))
        self._flush_one(gateway)

    def holding(self) -> bool:
        return bool(self.held or self.held_applied)

    def held_count(self) -> int:
        return sum(len(held) for held in self.held.values()) + len(self.held_applied)

    def flush(self) -> None:
        for gateway in list(self.held.keys() | self.held_applied.keys()):
            self._flush_one(gateway)

    def _count_results(self, gateway: bytes, count: int) -> None:
        total = self.held_results.get(gateway, 0) + count
        held = self.held[gateway]
        while total > self.max_held_results:
            # The oldest results go: their clients' requests expire (Timeout, an unknown outcome).
            index = next(i for i, message in enumerate(held) if message[0] == ipc.RESULTS)
            dropped = len(held[index][1])
            del held[index]
            total -= dropped
            self.results_dropped += dropped
            self.log.error("gateway not reading its results; oldest dropped", gateway=gateway.decode(),
                           dropped=dropped, limit=self.max_held_results)
        self.held_results[gateway] = total

    def _flush_one(self, gateway: bytes) -> None:
        held = self.held.get(gateway)
        try:
            while held:
                self._send_now(gateway, held[0])
                message = held.popleft()
                if message[0] == ipc.RESULTS:
                    self.held_results[gateway] -= len(message[1])
            applied = self.held_applied.get(gateway)
            if applied is not None:
                self._send_now(gateway, applied)
                del self.held_applied[gateway]
        except zmq.Again:
            return  # still full: kept for the next flush
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            # That gateway is down; its clients lost their connection with it.
            self.held_applied.pop(gateway, None)
        self.held.pop(gateway, None)
        self.held_results.pop(gateway, None)

    def _send_now(self, gateway: bytes, message: list) -> None:
        self.socket.send_multipart([gateway, codec.pack(message)], zmq.NOBLOCK)


def open_writer(config: NodeConfig) -> MvccStore:
    return MvccStore.open(store_dir(config), writer=True, map_size_bytes=map_size_bytes(config),
                          quota_backend_bytes=config.effective_quota_bytes(), limits=config.limits(),
                          member_id=config.member_id())


class Applier:
    def __init__(self, config: NodeConfig, log):
        self.config = config
        self.log = log
        self.limits = config.limits()
        self.member_id = config.member_id()
        self.cluster_id = config.cluster_id()
        self.gateway_identities = [ipc.gateway_identity(i) for i in range(config.gateway_count())]
        self.store = open_writer(config)
        # The writer's own view of the store (no read transaction per batch).
        self.applied_index, self.revision = self.store.applied_index(), self.store.revision()
        # The store runs with MDB_NOMETASYNC: a commit's fsync makes the commit
        # before it durable, not itself. So the durable index reported to the
        # raft log (which releases WAL segments by it) is the previous commit's.
        self.durable_index = self.applied_index
        stored_members = self.store.member_table()
        self.members = MemberTable.from_wire(stored_members) if stored_members else initial_table(config)
        self.context = zmq.Context()
        self.raft = self.context.socket(zmq.DEALER)
        self.raft.setsockopt(zmq.ROUTING_ID, ipc.APPLIER_IDENTITY)
        self.raft.setsockopt(zmq.LINGER, 0)
        self.raft.connect(ipc.raft_endpoint(config.data_dir))
        self.gateways = self.context.socket(zmq.ROUTER)
        self.gateways.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.gateways.setsockopt(zmq.SNDHWM, self.limits.socket_high_water_mark)
        self.gateways.setsockopt(zmq.LINGER, 0)
        endpoint = ipc.applier_endpoint(config.data_dir)
        _remove_stale_socket(endpoint)
        self.gateways.bind(endpoint)
        self.outbox = GatewayOutbox(self.gateways, self.limits.max_undelivered_results_per_gateway, log)
        # Physical compactions waiting for their steps: (gateway, request id, body).
        self.physical_compactions: list[tuple[bytes, object, dict]] = []
        self.idle_periods = 0
        # ENTRIES messages applied and not yet acknowledged. The raft log may have
        # max_apply_inflight_batches unacknowledged, so acknowledging every
        # second one (or within ACKNOWLEDGE_DELAY_MS) never stalls its delivery,
        # and costs it half the wake-ups.
        self.unacknowledged_messages = 0
        self.acknowledge_every_messages = max(1, self.limits.max_apply_inflight_batches // 2)
        self.gateways_heard: set[bytes] = set()
        # Who wants an APPLIED after every batch (their HELLOs say): gateways
        # with reads or leader-change cuts waiting, the watch broadcaster while
        # it has client streams. Everyone hears of a new store generation.
        self.gateways_wanting_applied = set(self.gateway_identities)
        self.broadcaster_interested = True
        # A compaction's physical steps may be under way (also one a restart interrupted).
        self.compacting = True
        self.subscribed = False
        self.handlers = {ipc.ENTRIES: self._on_entries, ipc.INSTALL_SNAPSHOT: self._on_install_snapshot}

    def subscribe(self) -> None:
        self.subscribed = True
        self.raft.send(codec.pack([ipc.SUBSCRIBE, self.applied_index]))

    def resubscribe_if_idle(self) -> None:
        # A restarted raft log has forgotten us; asking again is harmless
        # because delivery restarts from our applied index.
        if self.subscribed and self.idle_periods >= 1:
            self.subscribe()
        self.idle_periods += 1

    def subscribe_when_gateways_heard(self) -> None:
        if not self.subscribed and self.gateways_heard >= set(self.gateway_identities):
            self.subscribe()

    # ---- entries --------------------------------------------------------

    def on_raft(self, batch: list) -> None:
        self.idle_periods = 0
        # Consecutive ENTRIES messages are applied together: one transaction,
        # one fsync and one round of answers for all of them (the raft log's
        # window bounds how many can be waiting).
        waiting_entries: list = []
        for frame in batch:
            try:
                message = codec.unpack(frame)
                handler = self.handlers[message[0]]
                if message[0] == ipc.ENTRIES:
                    waiting_entries.extend(message[1])
                    self.unacknowledged_messages += 1
                    continue
            except (QuorumError, KeyError, TypeError, IndexError):
                self.log.warning("malformed message from raft log dropped")
                continue
            if waiting_entries:
                self._on_entries([ipc.ENTRIES, waiting_entries])
                waiting_entries = []
            handler(message)
        if waiting_entries:
            self._on_entries([ipc.ENTRIES, waiting_entries])

    def _on_entries(self, message: list) -> None:
        entries = []
        physical = set()
        applied = self.applied_index
        for index, term, entry_type, data in message[1]:
            if index <= applied:
                continue  # a redelivery after a resubscribe
            assert index == applied + 1 + len(entries), f"gap in committed entries at {index}"
            requests = []
            if entry_type == ipc.ENTRY_NORMAL:
                member_id, gateway, items = codec.unpack(data)
                if member_id != self.member_id:
                    gateway = None  # proposed through another member: its applier answers
                requests = [((gateway, request_id), op, body) for request_id, op, body in items]
                for tag, op, body in requests:
                    if op == "compaction":
                        self.compacting = True  # its physical steps run between batches
                        if body["physical"]:
                            physical.add(tag)
            elif entry_type == ipc.ENTRY_CONF_CHANGE:
                requests = self._member_table_write(index, data)
            entries.append((index, term, requests))
        if not entries:
            return
        results = self.store.apply(entries)
        term = entries[-1][1]
        self.durable_index = self.applied_index
        self.applied_index = entries[-1][0]
        self.revision = self.store.written_revision
        # The raft log hears of lease changes before any client hears of its
        # grant, so a keep-alive right after a grant finds the lease.
        lease_changes = _lease_changes(entries, results)
        if lease_changes or self.unacknowledged_messages >= self.acknowledge_every_messages:
            self.acknowledge(lease_changes)
        self._send_results(results, term, physical)
        self._broadcast_applied()

    def acknowledge(self, lease_changes: list | None = None) -> None:
        """APPLIED to the raft log: frees its delivery window (and reports lease changes)."""
        self.unacknowledged_messages = 0
        report = [ipc.APPLIED, self.applied_index, self.durable_index]
        self.raft.send(codec.pack(report + [lease_changes] if lease_changes else report))

    def _on_install_snapshot(self, message: list) -> None:
        _kind, path, applied_index = message
        current = self.applied_index
        if applied_index <= current:
            self.raft.send(codec.pack([ipc.SNAPSHOT_INSTALLED, applied_index, False,
                                       f"{ipc.STORE_ALREADY_AHEAD}: applied index {current}"]))
            return
        try:
            generation = self.store.install(path, applied_index)
        except (OSError, ValueError) as error:
            self.log.error("snapshot install failed", path=path, error=str(error)[:200])
            self.raft.send(codec.pack([ipc.SNAPSHOT_INSTALLED, applied_index, False, str(error)[:200]]))
            return
        self.applied_index, self.revision = self.store.applied_index(), self.store.revision()
        self.durable_index = self.applied_index  # an installed copy is synced before CURRENT names it
        # The snapshot carries the leader's member table as of its index.
        stored_members = self.store.member_table()
        if stored_members:
            self.members = MemberTable.from_wire(stored_members)
        self.log.info("snapshot installed", applied_index=applied_index, previous_applied_index=current,
                      generation=generation, revision=self.revision)
        # Physical compactions waiting on the old store are moot: answer them.
        self._answer_physical_compactions()
        self.raft.send(codec.pack([ipc.SNAPSHOT_INSTALLED, applied_index, True, generation]))
        self.subscribe()
        self._broadcast_applied(new_generation=True)

    def _member_table_write(self, index: int, data: bytes) -> list:
        """The store write of the member table a conf-change entry produces
        (nothing for a change the table already holds: a redelivery)."""
        if index <= self.members.conf_index:
            return []
        change = ConfChange.from_wire(codec.unpack(data))
        member, _origin = unpack_context(change.context)
        self.members.apply_change(change.kind, change.node_id, member, index)
        self.log.info("member table changed", change=change.kind, member_id=f"{change.node_id:x}",
                      members=len(self.members.members), index=index)
        return [((None, 0), "member_table", self.members.to_wire())]

    def _send_results(self, results: list, term: int, physical: set) -> None:
        by_gateway: dict[bytes, list] = {}
        for tag, status, body in results:
            gateway, request_id = tag
            if gateway is None:
                continue
            if status == codec.STATUS_OK:
                header = body["header"]
                header["cluster_id"] = self.cluster_id
                header["member_id"] = self.member_id
                header["raft_term"] = term
                if tag in physical and self.store.compaction_pending():
                    # Answered once compaction_step has reclaimed the space.
                    self.physical_compactions.append((gateway, request_id, body))
                    continue
            by_gateway.setdefault(gateway, []).append([request_id, status, body])
        lessor_results = by_gateway.pop(ipc.LESSOR_IDENTITY, None)
        if lessor_results:
            # The lessor's own revokes of expired leases: nobody waits for them.
            self.log.debug("lessor revokes applied", count=len(lessor_results),
                           failed=sum(1 for _, status, _ in lessor_results if status != codec.STATUS_OK))
        for gateway, items in by_gateway.items():
            self._send(gateway, [ipc.RESULTS, items])

    def _send(self, gateway: bytes, message: list) -> None:
        self.outbox.send(gateway, message)

    def _broadcast_applied(self, new_generation: bool = False) -> None:
        message = [ipc.APPLIED, self.applied_index, self.revision, self.store.generation]
        for gateway in self.gateway_identities:
            if new_generation or gateway in self.gateways_wanting_applied:
                self._send(gateway, message)
        if new_generation or self.broadcaster_interested:
            self._send(ipc.WATCH_BROADCASTER_IDENTITY, message)

    # ---- compaction and defragment ------------------------------------------

    def compaction_step(self) -> None:
        if not self.store.compaction_pending():
            self.compacting = False
        elif self.store.compact_step():
            self._answer_physical_compactions()

    def _answer_physical_compactions(self) -> None:
        done, self.physical_compactions = self.physical_compactions, []
        for gateway, request_id, body in done:
            self._send(gateway, [ipc.RESULTS, [[request_id, codec.STATUS_OK, body]]])

    def on_gateways(self, batch: list) -> None:
        defragments = []  # (gateway, defrag_id): one defragment answers every request of the batch
        for parts in batch:
            if len(parts) != 2:
                continue
            gateway, frame = parts
            try:
                message = codec.unpack(frame)
                kind = message[0]
            except (QuorumError, TypeError, IndexError):
                self.log.warning("malformed message from a gateway dropped")
                continue
            if kind == ipc.HELLO:
                self.gateways_heard.add(gateway)
                wants_applied = len(message) < 2 or message[1] is not False
                if gateway == ipc.WATCH_BROADCASTER_IDENTITY:
                    self.broadcaster_interested = wants_applied
                elif wants_applied:
                    self.gateways_wanting_applied.add(gateway)
                else:
                    self.gateways_wanting_applied.discard(gateway)
                self._send(gateway, [ipc.APPLIED, self.applied_index, self.revision, self.store.generation])
            elif kind == ipc.DEFRAGMENT and len(message) == 2:
                defragments.append((gateway, message[1]))
        if defragments:
            self._defragment(defragments)
        self.subscribe_when_gateways_heard()

    def _defragment(self, requests: list[tuple[bytes, object]]) -> None:
        """One store copy for every request in `requests` (all arrived before it starts)."""
        error = None
        try:
            while not self.store.compact_step():
                pass  # finish a running compaction first: a defragment reclaims its space
            self._answer_physical_compactions()
            generation = self.store.defragment()
            self.log.info("defragmented", generation=generation, requests=len(requests))
        except QuorumError as failure:
            error = failure.to_wire()
        for gateway, defrag_id in requests:
            self._send(gateway, [ipc.DEFRAGMENT, defrag_id, error])
        self._broadcast_applied(new_generation=True)

    def close(self) -> None:
        self.store.close()
        self.context.destroy(linger=0)


def _lease_changes(entries: list, results: list) -> list:
    """[[lease_id, ttl_s or 0 for gone], ...] from the batch's lease grants and
    revokes, in apply order (results are one per request, in request order)."""
    changes = []
    requests = [request for _index, _term, batch in entries for request in batch]
    assert len(requests) == len(results), (len(requests), len(results))
    for (_tag, op, body), (_result_tag, status, response) in zip(requests, results):
        if op == "lease_grant" and status == codec.STATUS_OK:
            changes.append([response["ID"], response["TTL"]])
        elif op == "lease_revoke" and (status == codec.STATUS_OK or response.get("code") == "LeaseNotFound"):
            # Applied or not found: either way the lease is gone after this entry.
            changes.append([body["ID"], 0])
    return changes


def _remove_stale_socket(endpoint: str) -> None:
    path = endpoint.removeprefix("ipc://")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def run(config: NodeConfig, index: int, log) -> None:
    applier = Applier(config, log)
    loop = ActorLoop(log, applier.limits.max_messages_per_poll, parent_pid=os.getppid())
    loop.add_socket(applier.raft, applier.on_raft, multipart=False)
    loop.add_socket(applier.gateways, applier.on_gateways)
    loop.add_timer(COMPACTION_STEP_MS, applier.compaction_step, active=lambda: applier.compacting)
    loop.add_timer(OUTBOX_RETRY_MS, applier.outbox.flush, active=applier.outbox.holding)
    loop.add_timer(ACKNOWLEDGE_DELAY_MS, applier.acknowledge, active=lambda: applier.unacknowledged_messages > 0)
    loop.add_timer(RESUBSCRIBE_MS, applier.resubscribe_if_idle)
    loop.add_timer(GATEWAY_WAIT_MS, lambda: applier.subscribed or applier.subscribe())
    log.info("applier started", applied_index=applier.store.applied_index(), revision=applier.store.revision())
    try:
        reason = loop.run()
        log.info("applier stopping", reason=reason)
    finally:
        applier.close()
