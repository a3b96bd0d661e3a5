"""Recipes built on leases and watch: sessions, a mutex, leader election, service discovery.

Theory of operation. These are etcd's clientv3/concurrency algorithms, with the
same keys, so a quorumkv lock looks in the store exactly like an etcd lock:

- A `Session` is a lease kept alive in the background. Every key a recipe
  writes carries the session's lease, so when the process dies or is cut off
  the lease expires (the leader decides) and its keys are deleted, which wakes
  whoever waits behind them. `session.done` is set when the lease is lost or
  the session closed.
- `Mutex` and `Election` queue their sessions under a prefix: each puts
  `prefix/<lease id in hex>` in a txn (or finds it already there: a session
  re-entering). The key's create revision is its place in the queue; the
  holder (leader) is the key with the lowest create revision. A waiter
  watches for the delete of the key with the greatest create revision below
  its own, then looks again (that key may have been the last before it, or a
  waiter that gave up): it never polls, and it wakes once per key ahead of it.
- Never "acquired" on a lease that is gone: the txn that queues the key is
  refused when the lease does not exist; after waiting, the key itself is read
  back (it exists only while its lease does), and the session is checked not
  lost. A lock taken when the lease is gone is released and fails with
  `SessionExpiredError`. The holder may still lose its lease later (that is
  what a lease is); fence writes with `mutex.is_owner()` in a txn.
- Service discovery: an instance is a key `prefix/<instance id>` on a
  session's lease; `LiveView` lists the prefix, then watches it from the
  list's revision + 1 and applies every event, so it is the store's view of
  the prefix at some revision, moving forward; an instance whose keep-alive
  stops disappears when its lease expires (within its TTL).

Threads. A `Client` is not thread-safe, so a recipe uses its session's client
(and the watches it opens with it) only from the caller's thread, checking
every SESSION_CHECK_INTERVAL_S while it waits whether its session was lost.
The keep-alive (protocol.lease.KeepAlive) and a LiveView's watch run in
threads of their own, each with its own client.

    with Client(endpoints) as client, Session(client, ttl=10) as session:
        lock = Mutex(session, "locks/db")
        lock.lock(timeout=30)
        try:
            client.txn([lock.is_owner()], [ops.put("db/config", "v")])
        finally:
            lock.unlock()
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from protocol import messages
from protocol.client import Client, CompactedError, Compare, LeaseNotFoundError, ops, to_bytes

DEFAULT_SESSION_TTL_S = 60  # etcd's concurrency.NewSession default
# A waiter looks whether its session was lost (or its view closed) this often
# while it waits for a watch event.
SESSION_CHECK_INTERVAL_S = 0.1
# How long LiveView.close() waits for its thread to finish.
THREAD_JOIN_TIMEOUT_S = 5.0

EVENT_PUT, EVENT_DELETE = 0, 1


class RecipeError(Exception):
    """A recipe could not do what was asked (its message says why)."""


class SessionExpiredError(RecipeError):
    def __init__(self, message: str = "mutex: session is expired"):
        super().__init__(message)


class LockedError(RecipeError):
    def __init__(self, message: str = "mutex: Locked by another session"):
        super().__init__(message)


class ElectionNotLeaderError(RecipeError):
    def __init__(self, message: str = "election: not leader"):
        super().__init__(message)


class ElectionNoLeaderError(RecipeError):
    def __init__(self, message: str = "election: no leader"):
        super().__init__(message)


class WatchLostError(RecipeError):
    """The watch a recipe waited on ended without the event it waited for."""


class WaitTimeoutError(RecipeError, TimeoutError):
    """A lock(), campaign() or observer wait reached its timeout."""


def _watch_function():
    # Imported when first used: the watch client lives in its own module.
    from protocol.watch import watch
    return watch


def _keep_alive_class():
    from protocol.lease import KeepAlive
    return KeepAlive


def _deadline(timeout_s: float | None) -> float | None:
    return None if timeout_s is None else time.monotonic() + timeout_s


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


# ---------------------------------------------------------------------------
# Watching from the caller's thread.


def _next_response(watcher, deadline: float | None, session: "Session | None" = None) -> dict | None:
    """The watcher's next response within the deadline and the next session check.

    None when nothing came in this slice (the caller loops). Raises
    WaitTimeoutError at the deadline, SessionExpiredError once the session is
    done, WatchLostError if the watch ended.
    """
    if session is not None:
        session.check_alive()
    remaining = _remaining(deadline)
    if remaining is not None and remaining <= 0:
        raise WaitTimeoutError("timed out waiting for a watch event")
    slice_s = remaining
    if session is not None:
        slice_s = SESSION_CHECK_INTERVAL_S if slice_s is None else min(slice_s, SESSION_CHECK_INTERVAL_S)
    try:
        return watcher.get(timeout_s=slice_s)
    except StopIteration:
        raise WatchLostError("lost watcher waiting for an event") from None


# ---------------------------------------------------------------------------
# Session.


class Session:
    """A lease kept alive in the background (etcd's concurrency.Session).

    `lease_id`, `ttl` (as granted), `done` (a threading.Event set when the lease
    is lost or the session is closed), `lost` (True once the lease was lost),
    `close()` (revoke the lease: every key on it is deleted), `orphan()` (stop
    renewing without revoking: the lease expires after its TTL).
    """

    def __init__(self, client: Client, ttl: int = DEFAULT_SESSION_TTL_S, *, lease_id: int = 0):
        if ttl <= 0:
            raise ValueError("a session's TTL must be positive")
        self.client = client
        response = client.lease_grant(ttl, lease_id)
        self.lease_id: int = response["ID"]
        self.ttl: int = response.get("TTL", ttl)
        self.done = threading.Event()
        self.lost = False
        self._closed = False
        # Its own thread, with its own client of the same gateways.
        self._keep_alive = _keep_alive_class()(client, self.lease_id, on_lost=self._on_lost)

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _on_lost(self, _error=None) -> None:
        # Called from the keep-alive's thread.
        self.mark_lost()

    def mark_lost(self) -> None:
        """Record that the lease is gone (the keep-alive said so, or the server did)."""
        self.lost = True
        self.done.set()

    def check_alive(self) -> None:
        if self.done.is_set():
            raise SessionExpiredError()

    def _stop_keep_alive(self) -> None:
        self._keep_alive.stop()

    @property
    def keep_alive(self):
        """The protocol.lease.KeepAlive renewing the lease (its `ttl_s`, `renewals`, `error`)."""
        return self._keep_alive

    def orphan(self) -> None:
        """Stop renewing the lease without revoking it (it expires after its TTL)."""
        if not self._closed:
            self._closed = True
            self._stop_keep_alive()
            self.done.set()

    def close(self) -> None:
        """Stop renewing and revoke the lease; the session's keys are deleted."""
        if self._closed:
            return
        self._closed = True
        try:
            self._stop_keep_alive()
        finally:
            self.done.set()
        try:
            self.client.lease_revoke(self.lease_id)
        except LeaseNotFoundError:
            pass  # expired already: its keys are gone either way


# ---------------------------------------------------------------------------
# Waiting for the keys ahead in a queue.


def _lease_key(prefix: bytes, session: Session) -> bytes:
    return prefix + f"{session.lease_id:x}".encode()


def _queue_prefix(prefix) -> bytes:
    return to_bytes(prefix) + b"/"  # as etcd: NewMutex(s, "x") queues under "x/"


def _first_created(prefix: bytes) -> tuple[str, dict]:
    """The key under prefix with the lowest create revision (clientv3.WithFirstCreate)."""
    return ops.get(prefix, prefix=True, sort_target=messages.SORT_BY_CREATE,
                   sort_order=messages.SORT_ASCEND, limit=1)


def _wait_delete(session: Session, key: bytes, revision: int, deadline: float | None) -> None:
    """Return once `key` is deleted (at or after `revision`), or when its history was compacted."""
    try:
        with _watch_function()(session.client, key, start_revision=revision) as watcher:
            while True:
                response = _next_response(watcher, deadline, session)
                if response is None:
                    continue
                if any(event.get("type") == EVENT_DELETE for event in response.get("events") or ()):
                    return
    except CompactedError:
        return  # the caller looks again (from the current revision)


def wait_deletes(session: Session, prefix: bytes, max_create_revision: int,
                 deadline: float | None = None) -> dict:
    """Wait until no key under prefix has a create revision <= max_create_revision.

    etcd's waitDeletes: find the last-created key ahead, wait for its delete, look
    again. Returns the header of the last read.
    """
    while True:
        response = session.client.get(prefix, prefix=True, sort_target=messages.SORT_BY_CREATE,
                                      sort_order=messages.SORT_DESCEND, limit=1,
                                      max_create_revision=max_create_revision)
        if not response.get("kvs"):
            return response["header"]
        session.check_alive()
        _wait_delete(session, response["kvs"][0]["key"], response["header"]["revision"], deadline)


def _queue_up(session: Session, key: bytes, value: bytes, prefix: bytes) -> dict:
    """Put key on the session's lease unless it exists; also read it and the queue's head.

    One txn: responses[0] is the put (or the get of the existing key),
    responses[1] the first-created key under prefix.
    """
    try:
        return session.client.txn(
            [Compare.create(key) == 0],
            [ops.put(key, value, lease=session.lease_id), _first_created(prefix)],
            [ops.get(key), _first_created(prefix)])
    except LeaseNotFoundError:
        # The lease is gone on the server, whatever the keep-alive thread thinks.
        session.mark_lost()
        raise SessionExpiredError() from None


def _branch_kvs(response: dict, index: int) -> list[dict]:
    return response["responses"][index]["response_range"].get("kvs") or []


# ---------------------------------------------------------------------------
# Mutex.


class Mutex:
    """A distributed lock (etcd's concurrency.Mutex): `lock()`, `try_lock()`, `unlock()`.

    After lock(): `key` is this session's key, `revision` its create revision,
    `header` the response header of the acquiring read (its revision is what
    etcdctl exports as ETCD_LOCK_REV).
    """

    def __init__(self, session: Session, prefix):
        self.session = session
        self.prefix = _queue_prefix(prefix)
        self.key = b""
        self.revision = -1
        self.header: dict | None = None

    def _enqueue(self) -> dict:
        self.session.check_alive()
        self.key = _lease_key(self.prefix, self.session)
        response = _queue_up(self.session, self.key, b"", self.prefix)
        if response["succeeded"]:
            self.revision = response["header"]["revision"]
        else:
            self.revision = _branch_kvs(response, 0)[0]["create_revision"]
        return response

    def _is_head(self, response: dict) -> bool:
        owner = _branch_kvs(response, 1)
        return not owner or owner[0]["create_revision"] == self.revision

    def try_lock(self) -> None:
        """Take the lock if nobody holds it; else raise LockedError (and leave no key behind)."""
        response = self._enqueue()
        if self._is_head(response):
            self.header = response["header"]
            self._confirm_session()
            return
        self.session.client.delete(self.key)
        self._reset()
        raise LockedError()

    def lock(self, timeout: float | None = None) -> None:
        """Wait for the lock; WaitTimeoutError after `timeout` seconds (the key is removed).

        Raises SessionExpiredError if the session's lease is lost before the lock
        is held: a lock is never reported taken on a dead lease.
        """
        deadline = _deadline(timeout)
        response = self._enqueue()
        if self._is_head(response):
            self.header = response["header"]
            self._confirm_session()
            return
        try:
            self.header = wait_deletes(self.session, self.prefix, self.revision - 1, deadline)
            # The keys ahead are gone; is mine still here (is the lease alive)?
            mine = self.session.client.get(self.key)
        except BaseException:
            self._release_quietly()
            raise
        if not mine.get("kvs") or mine["kvs"][0]["create_revision"] != self.revision:
            self._reset()
            raise SessionExpiredError()
        self.header = mine["header"]
        self._confirm_session()

    def _confirm_session(self) -> None:
        if self.session.done.is_set():
            self._release_quietly()
            raise SessionExpiredError()

    def _release_quietly(self) -> None:
        try:
            self.unlock()
        except Exception:
            self._reset()  # the lease's expiry removes the key anyway

    def _reset(self) -> None:
        self.key = b""
        self.revision = -1

    def unlock(self) -> None:
        if self.key:
            self.session.client.delete(self.key)
        self._reset()

    def is_owner(self) -> Compare:
        """A txn compare that holds only while this mutex holds the lock (fencing)."""
        return Compare.create(self.key or b"\x00") == self.revision

    def __enter__(self) -> "Mutex":
        self.lock()
        return self

    def __exit__(self, *exc_info) -> None:
        self.unlock()


# ---------------------------------------------------------------------------
# Election.


class Election:
    """Leader election on a prefix (etcd's concurrency.Election).

    `campaign(value)` waits to become leader; `proclaim(value)` changes the
    leader's value; `resign()` steps down; `leader()` is the current leader's kv;
    `observe()` iterates over leader changes. After campaign(): `key`,
    `revision` (its create revision) and `header`.
    """

    def __init__(self, session: Session, prefix):
        self.session = session
        self.prefix = _queue_prefix(prefix)
        self.key = b""
        self.revision = -1
        self.header: dict | None = None
        self._leading = False

    @property
    def is_leader(self) -> bool:
        return self._leading

    def campaign(self, value, timeout: float | None = None) -> None:
        """Put value as a candidate and wait until it is the leader."""
        deadline = _deadline(timeout)
        value = to_bytes(value)
        self.session.check_alive()
        key = _lease_key(self.prefix, self.session)
        response = _queue_up(self.session, key, value, self.prefix)
        self.key, self.revision, self._leading = key, response["header"]["revision"], True
        if not response["succeeded"]:
            kv = _branch_kvs(response, 0)[0]
            self.revision = kv["create_revision"]
            if kv["value"] != value:
                try:
                    self.proclaim(value)
                except BaseException:
                    self._resign_quietly()
                    raise
        try:
            wait_deletes(self.session, self.prefix, self.revision - 1, deadline)
            mine = self.session.client.get(self.key)
        except BaseException:
            self._resign_quietly()
            raise
        if not mine.get("kvs") or mine["kvs"][0]["create_revision"] != self.revision or self.session.done.is_set():
            self._resign_quietly()
            raise SessionExpiredError("election: session is expired")
        self.header = mine["header"]

    def proclaim(self, value) -> None:
        """Set the leader's value without a new election; ElectionNotLeaderError if not leader."""
        if not self._leading:
            raise ElectionNotLeaderError()
        response = self.session.client.txn(
            [Compare.create(self.key) == self.revision],
            [ops.put(self.key, value, lease=self.session.lease_id)])
        if not response["succeeded"]:
            self.key, self._leading = b"", False
            raise ElectionNotLeaderError()
        self.header = response["header"]

    def resign(self) -> None:
        """Step down (delete the key if it is still ours); no-op when not campaigning."""
        if not self._leading:
            return
        try:
            response = self.session.client.txn([Compare.create(self.key) == self.revision],
                                               [ops.delete(self.key)])
            self.header = response["header"]
        finally:
            self.key, self._leading = b"", False

    def _resign_quietly(self) -> None:
        try:
            self.resign()
        except Exception:
            self.key, self._leading = b"", False

    def leader(self) -> dict:
        """The leader's kv (lowest create revision); ElectionNoLeaderError if none."""
        response = self.session.client.request(*_first_created(self.prefix))
        if not response.get("kvs"):
            raise ElectionNoLeaderError()
        return response["kvs"][0]

    def observe(self) -> "Observer":
        return Observer(self.session.client, self.prefix)


def observe_election(client: Client, prefix) -> "Observer":
    """Observe an election's leaders without taking part (no session needed)."""
    return Observer(client, _queue_prefix(prefix))


class Observer:
    """Leader changes of an election, as etcd's Observe: an iterator of
    {"header", "kvs": [leader kv]} responses.

    Yields the current leader first (once there is one), then each new value it
    proclaims and each new leader. Intermediate leaders may be skipped, the
    latest is always reported. `next(timeout)` waits at most timeout seconds
    (WaitTimeoutError); iteration waits for ever. `close()` ends it. Everything
    runs in the iterating thread.
    """

    def __init__(self, client: Client, prefix: bytes):
        self._client = client
        self._prefix = prefix
        self._ready: deque[dict] = deque()
        self._watcher = None
        self._following: bytes | None = None  # the leader key watched; None: waiting for a first key
        self._closed = False

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        return self.next()

    def next(self, timeout: float | None = None) -> dict:
        deadline = _deadline(timeout)
        while not self._ready:
            if self._closed:
                raise StopIteration
            self._step(deadline)
        return self._ready.popleft()

    def _step(self, deadline: float | None) -> None:
        if self._watcher is None:
            response = self._client.request(*_first_created(self._prefix))
            if response.get("kvs"):
                self._emit_and_follow(response["header"], response["kvs"][0])
            else:
                self._following = None
                self._watcher = _watch_function()(self._client, self._prefix, prefix=True,
                                                  start_revision=response["header"]["revision"])
            return
        try:
            response = _next_response(self._watcher, deadline)
        except CompactedError:
            self._drop_watcher()  # read the leader again
            return
        if response is None:
            return
        for event in response.get("events") or ():
            if self._following is None:
                if event.get("type") == EVENT_PUT:
                    kv = event["kv"]
                    self._drop_watcher()
                    self._emit_and_follow(dict(response["header"], revision=kv["mod_revision"]), kv)
                    return
            elif event.get("type") == EVENT_DELETE:
                self._drop_watcher()
                return
            else:
                self._ready.append({"header": response["header"], "kvs": [event["kv"]]})

    def _emit_and_follow(self, header: dict, kv: dict) -> None:
        self._ready.append({"header": header, "kvs": [kv]})
        self._following = kv["key"]
        self._watcher = _watch_function()(self._client, kv["key"], start_revision=header["revision"] + 1)

    def _drop_watcher(self) -> None:
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None

    def close(self) -> None:
        self._closed = True
        self._drop_watcher()

    def __enter__(self) -> "Observer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ---------------------------------------------------------------------------
# Service discovery.


def _instance_prefix(prefix) -> bytes:
    return _queue_prefix(prefix)


def _instance_id(prefix: bytes, key: bytes) -> str:
    return key[len(prefix):].decode("utf-8", "surrogateescape")


class Registration:
    """One registered instance: its key lives as long as its session's lease."""

    def __init__(self, session: Session, key: bytes, instance_id: str):
        self.session = session
        self.key = key
        self.instance_id = instance_id

    @property
    def done(self) -> threading.Event:
        return self.session.done

    def close(self) -> None:
        """Deregister: revoke the lease, which deletes the key."""
        self.session.close()

    def __enter__(self) -> "Registration":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class ServiceRegistry:
    """Instances of services under prefixes: `register`, `instances`, `live_view`."""

    def __init__(self, client: Client):
        self.client = client

    def register(self, prefix, instance_id: str, value=b"", ttl: int = DEFAULT_SESSION_TTL_S) -> Registration:
        """Put `prefix/instance_id` = value on a new lease kept alive in the background."""
        if not instance_id or "/" in instance_id:
            raise ValueError("an instance id is a non-empty string without '/'")
        key = _instance_prefix(prefix) + instance_id.encode("utf-8", "surrogateescape")
        session = Session(self.client, ttl)
        try:
            self.client.put(key, value, lease=session.lease_id)
        except BaseException:
            session.close()
            raise
        return Registration(session, key, instance_id)

    def instances(self, prefix) -> dict[str, bytes]:
        """instance id -> value, as the store has them now."""
        prefix = _instance_prefix(prefix)
        response = self.client.get(prefix, prefix=True)
        return {_instance_id(prefix, kv["key"]): kv["value"] for kv in response.get("kvs") or ()}

    def live_view(self, prefix, on_change: Callable[[dict[str, bytes]], None] | None = None) -> "LiveView":
        return LiveView(self.client, prefix, on_change=on_change)


class LiveView:
    """The instances under a prefix, kept up to date by a watch.

    Lists the prefix, then watches it from the list's revision + 1 in a helper
    thread and applies each event. `instances()` is a copy of the view,
    `revision` the store revision it reflects, `wait_until(predicate, timeout)`
    waits for the view to satisfy predicate(instances). If the watch is
    canceled (its history was compacted away) the view lists the prefix again.
    `on_change(instances)`, if given, is called after each change (from the
    view's thread, once from the constructor's). A failure of the view's thread
    is kept in `error` and raised by wait_until().
    """

    def __init__(self, client: Client, prefix, *, on_change: Callable[[dict[str, bytes]], None] | None = None):
        self.prefix = _instance_prefix(prefix)
        self._endpoints = client.gateways
        self._timeout_s = client.timeout_s
        self._on_change = on_change
        self._changed = threading.Condition()
        self._instances: dict[str, bytes] = {}
        self.revision = 0
        self.error: BaseException | None = None
        self._closed = threading.Event()
        self._load(client.get(self.prefix, prefix=True))
        self._thread = threading.Thread(target=self._run, name="live-view", daemon=True)
        self._thread.start()

    def _load(self, response: dict) -> None:
        with self._changed:
            self._instances = {_instance_id(self.prefix, kv["key"]): kv["value"]
                               for kv in response.get("kvs") or ()}
            self.revision = response["header"]["revision"]
            self._changed.notify_all()
        self._notify()

    def _notify(self) -> None:
        if self._on_change is not None:
            self._on_change(self.instances())

    def _run(self) -> None:
        client = None
        try:
            client = Client(self._endpoints, timeout_s=self._timeout_s, discover_gateways=False)
            while not self._closed.is_set():
                try:
                    self._follow(client)
                except CompactedError:
                    self._load(client.get(self.prefix, prefix=True))  # list again, watch from there
        except BaseException as error:  # kept for the owner, who sees it in `error`
            if not self._closed.is_set():
                with self._changed:
                    self.error = error
                    self._changed.notify_all()
        finally:
            if client is not None:
                client.close()

    def _follow(self, client: Client) -> None:
        """Apply the watch's events until closed."""
        with _watch_function()(client, self.prefix, prefix=True, start_revision=self.revision + 1) as watcher:
            while not self._closed.is_set():
                try:
                    response = watcher.get(timeout_s=SESSION_CHECK_INTERVAL_S)
                except StopIteration:
                    raise WatchLostError("lost watcher of the live view") from None
                if response is not None and response.get("events"):
                    self._apply(response)

    def _apply(self, response: dict) -> None:
        with self._changed:
            for event in response["events"]:
                kv = event["kv"]
                instance_id = _instance_id(self.prefix, kv["key"])
                if event.get("type") == EVENT_DELETE:
                    self._instances.pop(instance_id, None)
                else:
                    self._instances[instance_id] = kv["value"]
                self.revision = max(self.revision, kv["mod_revision"])
            self._changed.notify_all()
        self._notify()

    def instances(self) -> dict[str, bytes]:
        with self._changed:
            return dict(self._instances)

    def wait_until(self, predicate: Callable[[dict[str, bytes]], bool], timeout: float) -> bool:
        """Wait until predicate(instances) holds; False after timeout seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(dict(self._instances)):
                if self.error is not None:
                    raise self.error
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True

    def close(self) -> None:
        self._closed.set()
        self._thread.join(THREAD_JOIN_TIMEOUT_S)

    def __enter__(self) -> "LiveView":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
