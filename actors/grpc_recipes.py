"""etcd's v3lock and v3election gRPC services, on top of protocol/recipes.py.

How this works: as etcd's v3lock and v3election servers, which are clients
of their own node (clientv3/concurrency over KV, Watch and Lease): a
handler thread uses a native `Client` of its own (one per thread, kept for
the thread's life) connected to this gateway's ZeroMQ endpoint, and runs
the recipes' algorithms with the lease the request names. As in etcd, the
server neither grants nor renews that lease (etcd: NewSession(WithLease),
then Orphan): keeping it alive is the caller's job, and a lock or a
leadership ends when it expires.

- Lock: `Mutex(name).lock()`; answers the header of the read that made it
  the holder and its key `name/<lease in hex>`. Unlock deletes that key.
- Campaign: `Election(name).campaign(value)`; answers the LeaderKey (name,
  key, create revision, lease). Proclaim and Resign are etcd's one txn each
  on that key and revision; Leader reads the key with the lowest create
  revision; Observe streams `Observer`'s leaders.

A waiting Lock, Campaign or Observe holds its handler thread; at most
`RECIPE_WAITS_MAX` wait at once per gateway (beyond: RESOURCE_EXHAUSTED). A
wait ends when the RPC does (the client cancels, or its deadline passes:
the queued key is deleted, as etcd does). Errors are etcd's: a lease that
does not exist is "etcdserver: requested lease not found"; the recipes'
own ("election: not leader", "election: no leader") and the node's errors
travel as UNKNOWN with etcd's text, as etcd's servers return them (their
clientv3 errors are not gRPC statuses).
"""

from __future__ import annotations

import threading

import grpc

from actors import ipc, sockets
from actors.grpc_messages import to_message
from protocol import messages
from protocol.client import Client, Compare, ops
from protocol.errors import QuorumError
from protocol.etcd.v3electionpb import v3election_pb2 as epb, v3election_pb2_grpc as epb_grpc
from protocol.etcd.v3lockpb import v3lock_pb2 as lpb, v3lock_pb2_grpc as lpb_grpc
from protocol.recipes import (
    DEFAULT_SESSION_TTL_S, Election, ElectionNoLeaderError, ElectionNotLeaderError, Mutex, RecipeError,
    SessionExpiredError, WaitTimeoutError, observe_election,
)

RECIPE_WAITS_MAX = 32
# A native request from a handler thread to its own gateway.
CLIENT_TIMEOUT_S = 10.0
# How often a waiting Observe looks whether its RPC is still on.
OBSERVE_POLL_S = 0.5
# etcd's v3election.ErrMissingLeaderKey.
MISSING_LEADER_KEY = '"leader" field must be provided'


class CallEndedError(Exception):
    """The RPC ended (canceled by the client or past its deadline) while waiting."""


class LeaseSession:
    """The recipes' Session interface over a lease the caller keeps alive.

    As etcd's servers (NewSession(WithLease) then Orphan): no grant, no
    keep-alive. `check_alive`, which the recipes call while they wait, ends
    the wait once the RPC is over.
    """

    def __init__(self, client: Client, lease_id: int, context):
        self.client = client
        self.lease_id = lease_id
        self.context = context
        self.done = threading.Event()
        self.lost = False

    def check_alive(self) -> None:
        if self.done.is_set():
            raise SessionExpiredError()
        if not self.context.is_active():
            raise CallEndedError()

    def mark_lost(self) -> None:
        self.lost = True
        self.done.set()


class RecipeHandlers:
    """What the two services share: a Client per handler thread, the bound on waits, errors."""

    def __init__(self, front):
        self.front = front
        self.local = threading.local()
        self.waits = threading.BoundedSemaphore(RECIPE_WAITS_MAX)

    def client(self, context) -> Client:
        client = getattr(self.local, "client", None)
        if client is None:
            endpoint = sockets.read_endpoint(ipc.gateway_endpoint_file(self.front.gateway.config.data_dir,
                                                                       self.front.gateway.index))
            if not endpoint:
                context.abort(grpc.StatusCode.UNAVAILABLE, QuorumError("Stopped").message)
            client = self.local.client = Client([sockets.dialable(endpoint)], timeout_s=CLIENT_TIMEOUT_S, discover_gateways=False,
                                                context=self.front.gateway.context)
        return client

    def session(self, context, lease_id: int) -> LeaseSession:
        client = self.client(context)
        if lease_id == 0:
            # etcd's NewSession without a lease grants one of the default TTL (and,
            # orphaned at once, leaves it to expire): the lock or leadership lasts that long.
            lease_id = client.lease_grant(DEFAULT_SESSION_TTL_S)["ID"]
        return LeaseSession(client, lease_id, context)

    def wait_slot(self, context) -> None:
        if not self.waits.acquire(blocking=False):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"etcdserver: too many requests: at most {RECIPE_WAITS_MAX} waiting lock/election calls")

    def timeout_s(self, context) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None or remaining > 1e9 else max(0.0, remaining)

    def fail(self, context, error: BaseException, session: LeaseSession | None = None):
        """Abort the RPC with etcd's status for what went wrong."""
        if isinstance(error, CallEndedError):
            context.abort(grpc.StatusCode.CANCELLED, "context canceled")
        if isinstance(error, WaitTimeoutError):
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "context deadline exceeded")
        if isinstance(error, SessionExpiredError) and session is not None and session.lost:
            error = QuorumError("LeaseNotFound")  # the queueing txn was refused for the lease
        if isinstance(error, QuorumError):
            # etcd's servers call their node through clientv3, whose errors reach the
            # caller as UNKNOWN with etcd's text.
            context.abort(grpc.StatusCode.UNKNOWN, error.message)
        if isinstance(error, RecipeError):
            context.abort(grpc.StatusCode.UNKNOWN, str(error))
        raise error


# ---- v3lock -----------------------------------------------------------------

class LockService(lpb_grpc.LockServicer):
    def __init__(self, handlers: RecipeHandlers):
        self.handlers = handlers

    def Lock(self, request, context):
        self.handlers.wait_slot(context)
        try:
            session = None
            try:
                session = self.handlers.session(context, request.lease)
                mutex = Mutex(session, request.name)
                mutex.lock(timeout=self.handlers.timeout_s(context))
            except Exception as error:
                self.handlers.fail(context, error, session)
            return to_message(lpb.LockResponse, {"header": mutex.header, "key": mutex.key})
        finally:
            self.handlers.waits.release()

    def Unlock(self, request, context):
        try:
            response = self.handlers.client(context).delete(request.key)
        except Exception as error:
            self.handlers.fail(context, error)
        return to_message(lpb.UnlockResponse, {"header": response["header"]})


# ---- v3election -----------------------------------------------------------------

class ElectionService(epb_grpc.ElectionServicer):
    def __init__(self, handlers: RecipeHandlers):
        self.handlers = handlers

    def Campaign(self, request, context):
        self.handlers.wait_slot(context)
        try:
            session = None
            try:
                session = self.handlers.session(context, request.lease)
                election = Election(session, request.name)
                election.campaign(request.value, timeout=self.handlers.timeout_s(context))
            except Exception as error:
                self.handlers.fail(context, error, session)
            leader = {"name": request.name, "key": election.key, "rev": election.revision, "lease": session.lease_id}
            return to_message(epb.CampaignResponse, {"header": election.header, "leader": leader})
        finally:
            self.handlers.waits.release()

    def Proclaim(self, request, context):
        if not request.HasField("leader"):
            context.abort(grpc.StatusCode.UNKNOWN, MISSING_LEADER_KEY)
        leader = request.leader
        try:
            response = self.handlers.client(context).txn(
                [Compare.create(leader.key) == leader.rev],
                [ops.put(leader.key, request.value, lease=leader.lease)])
            if not response["succeeded"]:
                raise ElectionNotLeaderError()
        except Exception as error:
            self.handlers.fail(context, error)
        return to_message(epb.ProclaimResponse, {"header": response["header"]})

    def Resign(self, request, context):
        if not request.HasField("leader"):
            context.abort(grpc.StatusCode.UNKNOWN, MISSING_LEADER_KEY)
        leader = request.leader
        try:
            # As etcd: the key goes only if it is still this leadership's; either way the answer is OK.
            response = self.handlers.client(context).txn([Compare.create(leader.key) == leader.rev],
                                                         [ops.delete(leader.key)])
        except Exception as error:
            self.handlers.fail(context, error)
        return to_message(epb.ResignResponse, {"header": response["header"]})

    def Leader(self, request, context):
        try:
            # etcd's Election.Leader: the key with the lowest create revision under name/.
            response = self.handlers.client(context).get(
                request.name + b"/", prefix=True, sort_target=messages.SORT_BY_CREATE,
                sort_order=messages.SORT_ASCEND, limit=1)
            if not response.get("kvs"):
                raise ElectionNoLeaderError()
        except Exception as error:
            self.handlers.fail(context, error)
        return to_message(epb.LeaderResponse, {"header": response["header"], "kv": response["kvs"][0]})

    def Observe(self, request, context):
        self.handlers.wait_slot(context)
        try:
            observer = observe_election(self.handlers.client(context), request.name)
            try:
                while context.is_active():  # the stream's life
                    try:
                        response = observer.next(timeout=OBSERVE_POLL_S)
                    except WaitTimeoutError:
                        continue
                    except StopIteration:
                        return
                    except Exception as error:
                        self.handlers.fail(context, error)
                    yield to_message(epb.LeaderResponse, {"header": response["header"], "kv": response["kvs"][0]})
            finally:
                observer.close()
        finally:
            self.handlers.waits.release()
