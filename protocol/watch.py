"""Watching keys: an iterator of etcd WatchResponses that survives broadcaster restarts.

How this works: `watch()` asks a gateway's `hello` for the node's watch
endpoint (hello's "watch"), connects a DEALER of its own to it and creates
one watch. Iterating yields every response that carries events (fragments
put back together) and every progress notification, as dicts with etcd's
WatchResponse fields (see protocol/PROTOCOL.md, "Watch streams").

The watcher remembers the revision up to which it has delivered everything
(`revision`: the header revision of the last response yielded, which the
server sets to "every event of this watch up to here was sent"). When the
broadcaster restarts (a response or ping answer with another
`stream_epoch`, a ping answer that no longer lists the watch, or no answer
to a ping within `ping_timeout_s`), it reconnects (asking `hello` again)
and re-creates the watch from `revision + 1`: no event is lost or
repeated. If that history was compacted meanwhile, or the server cancels
the watch because it fell behind the compaction point, iteration raises
`CompactedError` with `compact_revision` set.

    with watch(["127.0.0.1:2382"], "config/", prefix=True) as watcher:
        for response in watcher:
            for event in response["events"]:
                print(event["type"], event["kv"]["key"], event["kv"]["value"])
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable

import zmq

from protocol import codec
from protocol.client import (
    Client, CompactedError, DeadlineExceededError, _key_range, error_from_wire, normalise_endpoint, to_bytes,
)
from protocol.codec import STATUS_ERROR, STATUS_OK
from protocol.limits import DEFAULT_LIMITS

FILTER_NOPUT, FILTER_NODELETE = 0, 1
EVENT_PUT, EVENT_DELETE = 0, 1
PROGRESS_WATCH_ID = -1
DEFAULT_PING_INTERVAL_S = 1.0
DEFAULT_PING_TIMEOUT_S = 3.0
# Pause between reconnect attempts while the node is unreachable.
RECONNECT_BACKOFF_S = 0.2


class WatchCanceledError(Exception):
    """The server canceled the watch for a reason other than compaction."""


class Watcher:
    """One watch on its own connection to the node's watch broadcaster."""

    def __init__(self, client_or_endpoints, key, range_end=b"", *, prefix: bool = False, from_key: bool = False,
                 start_revision: int = 0, prev_kv: bool = False, filters: Iterable[int] = (),
                 progress_notify: bool = False, fragment: bool = False, created_notify: bool = False,
                 timeout_s: float = 5.0, ping_interval_s: float = DEFAULT_PING_INTERVAL_S,
                 ping_timeout_s: float = DEFAULT_PING_TIMEOUT_S, context: zmq.Context | None = None):
        key, range_end = _key_range(key, range_end, prefix, from_key)
        if not key:
            raise ValueError("a watch needs a key")
        self.body = {"key": key, "range_end": range_end, "prev_kv": prev_kv, "filters": sorted(set(filters)),
                     "progress_notify": progress_notify, "fragment": fragment}
        assert start_revision >= 0 and ping_interval_s > 0 and ping_timeout_s > 0
        self.created_notify = created_notify
        self.timeout_s = timeout_s
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self._context = context or zmq.Context.instance()
        if isinstance(client_or_endpoints, Client):
            self._client, self._own_client = client_or_endpoints, False
        else:
            self._client = Client(client_or_endpoints, timeout_s=timeout_s, discover_gateways=False,
                                  context=self._context)
            self._own_client = True
        # Everything up to `revision` was delivered; 0 = nothing yet.
        self.revision = start_revision - 1 if start_revision > 0 else 0
        self._start_given = start_revision > 0
        self.watch_id: int | None = None
        self.stream_epoch: int | None = None
        self.endpoint: str | None = None
        self.reconnects = 0
        self._ids = itertools.count(1)
        self._socket: zmq.Socket | None = None
        self._create_id: int | None = None
        self._ping_id: int | None = None
        self._ping_sent_at = 0.0
        self._last_heard = 0.0
        self._fragments: list = []
        self._ready: list[dict] = []
        self._created_seen = False
        self._closed = False
        self._done = False
        self._connect()

    # ---- lifecycle -----------------------------------------------------------

    def __enter__(self) -> "Watcher":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._socket is not None:
            try:
                if self.watch_id is not None:
                    self._send([[next(self._ids), "watch_cancel", {"watch_id": self.watch_id}]])
            except zmq.ZMQError:
                pass
            self._socket.close(linger=0)
            self._socket = None
        if self._own_client:
            self._client.close()

    # ---- connecting -------------------------------------------------------------

    def _connect(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            endpoint = self._client.hello().get("watch")
            if isinstance(endpoint, str):
                break
            # The broadcaster is (re)starting and has not announced itself yet.
            if time.monotonic() >= deadline:
                raise DeadlineExceededError("Timeout", "the node has no watch broadcaster (hello has no 'watch')")
            time.sleep(RECONNECT_BACKOFF_S)
        if self._socket is not None:
            self._socket.close(linger=0)
        self.endpoint = normalise_endpoint(endpoint)
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        # A routing id of our own: a TCP reconnect to the same broadcaster keeps the stream.
        self._socket.setsockopt(zmq.ROUTING_ID, os.urandom(16))
        self._socket.setsockopt(zmq.RCVHWM, DEFAULT_LIMITS.socket_high_water_mark)
        self._socket.connect(self.endpoint)
        self.stream_epoch = None
        self._create()

    def _create(self) -> None:
        body = dict(self.body)
        if self._start_given or self._created_seen:
            body["start_revision"] = self.revision + 1
        self._create_id = next(self._ids)
        self._ping_id = None
        self._fragments = []
        self.watch_id = None
        self._send([[self._create_id, "watch_create", body]])
        self._last_heard = time.monotonic()

    def _reconnect(self) -> None:
        self.reconnects += 1
        while True:
            try:
                self._connect()
                return
            except DeadlineExceededError:
                if self._closed:
                    raise
                time.sleep(RECONNECT_BACKOFF_S)  # the node is down or restarting; try again

    def _send(self, requests: list) -> None:
        self._socket.send(codec.encode_request_frame(requests))

    # ---- iteration ------------------------------------------------------------------

    def __iter__(self) -> "Watcher":
        return self

    def __next__(self) -> dict:
        while True:
            response = self.get(timeout_s=self.ping_interval_s)
            if response is not None:
                return response
            if self._done:
                raise StopIteration

    def get(self, timeout_s: float | None = None) -> dict | None:
        """The next response, or None if none came within timeout_s (None: wait for ever)."""
        if self._ready:
            return self._ready.pop(0)
        if self._done or self._closed:
            raise StopIteration
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._ready:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return None
            wait_s = self.ping_interval_s if deadline is None else min(self.ping_interval_s, deadline - now)
            if self._socket.poll(max(1, int(wait_s * 1000))):
                while self._socket.poll(0):
                    self._handle_frame(self._socket.recv())
            else:
                self._check_liveness()
            if self._done and not self._ready:
                raise StopIteration
        return self._ready.pop(0)

    def request_progress(self) -> None:
        """Ask for a progress notification (watch_id -1), delivered through the iterator."""
        self._send([[next(self._ids), "watch_progress", {}]])

    def _check_liveness(self) -> None:
        now = time.monotonic()
        if self._ping_id is not None and now - self._ping_sent_at > self.ping_timeout_s:
            self._reconnect()
        elif self._ping_id is None and now - self._last_heard >= self.ping_interval_s:
            self._ping_id = next(self._ids)
            self._ping_sent_at = now
            self._send([[self._ping_id, "watch_ping", {}]])

    # ---- responses -----------------------------------------------------------------------

    def _handle_frame(self, data: bytes) -> None:
        self._last_heard = time.monotonic()
        for request_id, status, body in codec.decode_response_frame(data):
            if self._done:
                return
            if not isinstance(body, dict):
                continue
            epoch = body.get("stream_epoch")
            if self.stream_epoch is not None and epoch is not None and epoch != self.stream_epoch:
                if request_id == self._create_id and body.get("created"):
                    self.stream_epoch = epoch  # our create reached the new broadcaster
                else:
                    # The broadcaster restarted: our watch is gone on the new one.
                    self._recreate_on_new_epoch()
                    continue
            if request_id == self._ping_id:
                self._on_ping(status, body)
            elif request_id == self._create_id:
                self._on_watch_response(status, body)
            elif status == STATUS_OK and body.get("watch_id") == PROGRESS_WATCH_ID:
                self._on_progress(body)

    def _recreate_on_new_epoch(self) -> None:
        self.stream_epoch = None
        self.reconnects += 1
        self._create()

    def _on_ping(self, status: int, body: dict) -> None:
        self._ping_id = None
        if status != STATUS_OK:
            return
        if self.stream_epoch is None:
            return  # our create is still on its way
        if self.watch_id is not None and self.watch_id not in body.get("watch_ids", ()):
            # Same broadcaster, but it forgot our stream (it took us for gone).
            self._create()

    def _on_watch_response(self, status: int, body: dict) -> None:
        if status == STATUS_ERROR:
            self._done = True
            raise error_from_wire(body)
        if self.stream_epoch is None or body.get("created"):
            self.stream_epoch = body.get("stream_epoch")
        if body.get("created"):
            self.watch_id = body.get("watch_id")
            if body.get("canceled"):
                self._done = True
                raise WatchCanceledError(body.get("cancel_reason") or "watch refused")
            first = not self._created_seen
            if not self._created_seen and not self._start_given:
                self.revision = body["header"]["revision"]
            self._created_seen = True
            if first and self.created_notify:
                self._ready.append(body)
            return
        if body.get("canceled"):
            self._done = True
            if body.get("compact_revision"):
                error = CompactedError("Compacted")
                error.compact_revision = body["compact_revision"]
                error.message = (f"etcdserver: mvcc: required revision has been compacted "
                                 f"(needed {self.revision + 1}, compacted up to {body['compact_revision']})")
                error.args = (error.message,)
                raise error
            if status == STATUS_OK and self._closed is False:
                self._ready.append(body)
            return
        if body.get("fragment"):
            self._fragments.extend(body.get("events") or [])
            return
        if self._fragments:
            body["events"] = self._fragments + (body.get("events") or [])
            self._fragments = []
        self._deliver(body)

    def _on_progress(self, body: dict) -> None:
        if self.watch_id is None:
            # Our (re-)create is not answered yet, so this answer was given before
            # the server had our watch: progress of a stream without it (requests
            # queued while a broadcaster was down reach the restarted one first; a
            # broadcaster that answers them does so at once, at its revision).
            # Taken as ours, it would move the resume point past events not yet
            # sent, and _deliver would drop them.
            return
        self._deliver(body)

    def _deliver(self, body: dict) -> None:
        revision = body["header"]["revision"]
        events = body.get("events") or []
        if events:
            # Resuming after a reconnect never repeats an event already delivered.
            events = [event for event in events if event["kv"]["mod_revision"] > self.revision]
            if not events:
                self.revision = max(self.revision, revision)
                return
            body["events"] = events
        if revision > self.revision:
            self.revision = revision
        self._ready.append(body)


def watch(client_or_endpoints, key, range_end=b"", *, prefix: bool = False, from_key: bool = False,
          start_revision: int = 0, prev_kv: bool = False, filters: Iterable[int] = (),
          progress_notify: bool = False, **options) -> Watcher:
    """A `Watcher`: iterate it for WatchResponse dicts; `close()` (or `with`) when done."""
    return Watcher(client_or_endpoints, to_bytes(key), to_bytes(range_end), prefix=prefix, from_key=from_key,
                   start_revision=start_revision, prev_kv=prev_kv, filters=filters,
                   progress_notify=progress_notify, **options)
