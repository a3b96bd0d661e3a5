"""The messages actors of one node send each other, and where they meet.

Every internal message is one ZeroMQ frame holding a msgpack array whose
first element is its kind (a string below). Sockets (all `ipc://` in the
node's run directory):

  raft.sock     ROUTER bound by the raft log.
                Gateways (identity b"gateway-<i>") and the applier (b"applier")
                connect DEALERs.
  applier.sock  ROUTER bound by the applier. Gateways connect DEALERs
                (identity b"gateway-<i>") and say HELLO so the applier knows them;
                so does the watch broadcaster (identity b"watch_broadcaster"),
                which hears only APPLIED.

gateway -> raft log
  [PROPOSE, [[gw_request_id, op, body], ...]]
      One message = one raft entry (batching). Bodies are already validated.
  [READ_INDEX, read_id]
      Ask for an index such that serving a read once the applier has
      applied up to it is linearizable.
  [RAFT_STATUS, status_id]
  [LEASE_REQUEST, [[lease_request_id, op, body], ...]]
      Lease operations the leader's lessor answers without the log:
      op "lease_keep_alive" {"ID"} and "lease_time_to_live" {"ID", "keys"}
      (bodies validated). A leader whose lessor is not promoted yet (the
      applier is still applying earlier terms) holds them until it is.
  [MEMBER_REQUEST, [[member_request_id, op, body], ...]]
      Membership and leadership transfer (protocol.messages.MEMBER_OPS,
      bodies validated). member_list is answered from the raft log's member
      table; the changes are checked and proposed as conf-change entries by
      the leader (a follower forwards them, actors.peer) and answered by
      this member's raft log once the entry is applied here; move_leader is
      answered by the leader once leadership moved.
raft log -> gateway
  [MEMBER_REPLY, [[member_request_id, status, body], ...]]   (status as protocol.codec)
      body {"members": [...]} (member_add: also "member"; move_leader: {}),
      without a header (the gateway adds it).
  [PROPOSE_FAILED, [gw_request_id, ...], error_code]  (e.g. "NoLeader")
      On a follower a PROPOSE is forwarded to the leader (actors.peer);
      its result still comes from this member's applier.
  [LEADER_CHANGED, term, leader, commit_index]
      The term or the leader (0: none) changed. On a new term, or when this
      member stopped leading, writes the gateway sent before and still
      unanswered once commit_index is applied are answered LeaderChanged
      (outcome unknown).
  [READ_INDEX, read_id, index]
  [READ_INDEX_FAILED, read_id, error_code]
      "NoLeader", "LeaderChanged", or "Timeout" (no answer from the leader
      within 2 election timeouts). On a follower the read index comes from
      the leader (Raft ReadIndex forwarding).
  [RAFT_STATUS, status_id, {"term", "leader", "commit_index", "last_index",
                            "member_id", "cluster_id", "snapshot_index", "is_learner"}]
  [LEASE_REPLY, [[lease_request_id, status, body], ...]]   (status as protocol.codec)
      keep-alive: {"ID", "TTL"}: the granted TTL, 0 if the lease is unknown
      or expired; time-to-live: {"ID", "TTL", "grantedTTL"}: remaining whole
      seconds (truncated, as etcd), TTL -1 and grantedTTL 0 if unknown.
      Errors: NotLeader / NoLeader on a member that is not the leader.

applier -> raft log
  [SUBSCRIBE, applied_index]    (at start: send me committed entries after this)
  [APPLIED, applied_index, durable_index]
  [APPLIED, applied_index, durable_index, lease_changes]
      Acknowledges delivered entries (flow control; every second ENTRIES
      message, or within 2 ms) and says how far the store is durable, so the
      raft log may truncate its WAL below it (the commit before the latest:
      the store's commits do not sync their own meta page).
      lease_changes (only when the batch had any): [[lease_id, ttl_s], ...]
      in apply order, ttl_s the granted TTL of an applied lease_grant, 0 for
      a lease_revoke (applied, or the lease was already gone). The leader's
      lessor follows the store with them.
raft log -> applier
  [INSTALL_SNAPSHOT, path, applied_index]
      A verified store copy received from the leader (actors/snapshot_stream.py):
      install it as a new store generation if it is ahead of the store.
      Answered [SNAPSHOT_INSTALLED, applied_index, ok, generation_or_reason],
      then (when ok) a SUBSCRIBE from the new applied index and an APPLIED
      broadcast naming the new generation (gateways and the watch
      broadcaster reopen).
  [ENTRIES, [[index, term, entry_type, data], ...]]
      Committed entries in order, with no gaps. For ENTRY_NORMAL, data is
      msgpack [member_id, gateway_identity, [[gw_request_id, op, body], ...]]:
      member_id is the member whose gateway proposed it. Every member applies
      every entry; an applier sends RESULTS only for entries whose member_id
      is its own.
      The leader's lessor proposes the revokes of expired leases itself, as
      entries from gateway_identity b"lessor": their results go nowhere.
      An ENTRY_EMPTY (a new leader's no-op) has data b"". An
      ENTRY_CONF_CHANGE's data is actors.raft.ConfChange.encode(): the
      applier stores the member table it produces (actors.members).

gateway -> applier
  [HELLO, wants_applied]       (answered with an APPLIED; with wants_applied false
                                the gateway gets no APPLIED after each batch)
  [DEFRAGMENT, defrag_id]      (answered with [DEFRAGMENT, defrag_id, error_or_None])
watch broadcaster -> applier
  [HELLO, has_streams]         (with has_streams false the applier sends it no APPLIED)
applier -> gateway
  [RESULTS, [[gw_request_id, status, body], ...]]   (status as protocol.codec)
  [APPLIED, applied_index, revision, store_generation]
      After every applied batch to those that want it (see HELLO): reads
      waiting for a read index may now be served. A new store generation
      (a defragment, an installed snapshot) goes to everyone: reopen the store.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

PROPOSE = "propose"
PROPOSE_FAILED = "propose_failed"
READ_INDEX = "read_index"
READ_INDEX_FAILED = "read_index_failed"
RAFT_STATUS = "raft_status"
SUBSCRIBE = "subscribe"
APPLIED = "applied"
ENTRIES = "entries"
HELLO = "hello"
DEFRAGMENT = "defragment"
RESULTS = "results"
LEASE_REQUEST = "lease_request"
LEASE_REPLY = "lease_reply"
INSTALL_SNAPSHOT = "install_snapshot"
SNAPSHOT_INSTALLED = "snapshot_installed"
# The detail of a SNAPSHOT_INSTALLED refusal because the store already holds the
# snapshot's index: the raft log still steps the MsgSnap so the core answers the
# leader with its commit index (else a lost ack makes the leader resend forever).
STORE_ALREADY_AHEAD = "store already at or past the snapshot"
MEMBER_REQUEST = "member_request"
MEMBER_REPLY = "member_reply"
LEADER_CHANGED = "leader_changed"

ENTRY_NORMAL = 0
ENTRY_EMPTY = 1
ENTRY_CONF_CHANGE = 2

APPLIER_IDENTITY = b"applier"
WATCH_BROADCASTER_IDENTITY = b"watch_broadcaster"
# The gateway identity of the lessor's own proposals (revokes of expired
# leases); no gateway has it, so the applier drops their results.
LESSOR_IDENTITY = b"lessor"

# Unix socket paths are limited to 107 bytes; a deep data dir gets its
# sockets in a short directory under the system temp dir instead.
_MAX_SOCKET_PATH = 100


def gateway_identity(index: int) -> bytes:
    return f"gateway-{index}".encode()


def run_dir(data_dir: str) -> str:
    preferred = os.path.join(os.path.abspath(data_dir), "run")
    if len(os.path.join(preferred, "applier.sock")) <= _MAX_SOCKET_PATH:
        return preferred
    digest = hashlib.sha1(os.path.abspath(data_dir).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"qkv-{digest}")


def endpoint(data_dir: str, name: str) -> str:
    return "ipc://" + os.path.join(run_dir(data_dir), name)


def gateway_endpoint_file(data_dir: str, index: int) -> str:
    """Where gateway `index` announces its client endpoint."""
    return os.path.join(run_dir(data_dir), f"gateway-{index}.endpoint")


def watch_endpoint_file(data_dir: str) -> str:
    """Where the watch broadcaster announces its client endpoint."""
    return os.path.join(run_dir(data_dir), "watch.endpoint")


def raft_endpoint(data_dir: str) -> str:
    return endpoint(data_dir, "raft.sock")


def applier_endpoint(data_dir: str) -> str:
    return endpoint(data_dir, "applier.sock")
