"""The watch registry: etcd's watch semantics as a pure state machine.

Theory of operation. A *stream* is one client connection (its ZeroMQ
routing identity); it carries many *watches*. Every watch is in one of two
states:

- **synced**: every event up to `synced_revision` (the broadcaster's fan-out
  point, S) that it matches has been queued for its client. When the store
  moves on, `pump()` reads the new revisions once, in bounded chunks, and
  fans each chunk out to every synced watch: one response per watch per
  chunk, many responses per stream frame. A synced watch whose start
  revision lies in the future simply ignores the events below it.
- **unsynced**: it still needs history from `next_revision` on (a watch
  created with a past start revision, or one whose client's queue was full).
  `pump()` catches unsynced watches up from the store in bounded chunks and
  moves each to the synced set once it reaches S. A watch whose
  `next_revision` is below the compaction point is canceled with
  `compact_revision` set; it is never silently moved forward.

No watch has an event queue of its own: a watch that cannot be sent to
stays at its `next_revision` and is caught up from the store later, so
memory per watch is a few fields whatever the write rate.

Guarantees, per watch: events in revision order, each once, no gaps, all
events of one revision in one response (unless the watch asked for
`fragment` and the revision alone exceeds the fragment size), and the
response's header revision R means "every event of this watch up to R was
sent" (true of event responses, periodic progress notifications and
`watch_progress` answers alike).

The core does no I/O: events come from a `source` with
`events(start, end, limit, prev_kv)` (the MVCC store's shape, raising
QuorumError("Compacted") below the compaction point), `revision()` and
`compact_revision()`; replies are collected per stream for the actor to
take with `take_output()`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

from protocol import messages
from protocol.codec import STATUS_ERROR, STATUS_OK, STATUS_PARTIAL
from protocol.errors import QuorumError
from protocol.limits import Limits

EVENT_PUT, EVENT_DELETE = 0, 1
FILTER_NOPUT, FILTER_NODELETE = 0, 1
# etcd: a progress answer for the whole stream is not about any one watch.
PROGRESS_WATCH_ID = -1
# etcd's texts.
CANCEL_REASON_COMPACTED = "mvcc: required revision has been compacted"
CANCEL_REASON_DUPLICATE = "mvcc: duplicate watch ID provided on the WatchStream"
# Estimated msgpack overhead of one event beyond its keys and values.
_EVENT_OVERHEAD_BYTES = 96

WATCH_OPS = ("watch_create", "watch_cancel", "watch_progress", "watch_ping")
_STORE_TYPES = {"PUT": EVENT_PUT, "DELETE": EVENT_DELETE}


class EventSource(Protocol):
    def events(self, start_revision: int, end_revision: int, limit: int, prev_kv: bool = False) -> list: ...
    def revision(self) -> int: ...
    def compact_revision(self) -> int: ...


@dataclasses.dataclass(eq=False, slots=True)
class Watch:
    stream: bytes
    watch_id: int
    request_id: object
    key: bytes
    range_end: bytes
    start_revision: int
    next_revision: int  # meaningful while unsynced; a synced watch is at S + 1 (or its start)
    prev_kv: bool
    no_put: bool
    no_delete: bool
    progress_notify: bool
    fragment: bool
    synced: bool = False
    # Whether a response went out since the last periodic progress tick (etcd
    # skips the notification for a watch that just got events).
    sent_since_tick: bool = False

    def matches(self, event_type: int, key: bytes) -> bool:
        if event_type == EVENT_PUT and self.no_put:
            return False
        if event_type == EVENT_DELETE and self.no_delete:
            return False
        return messages.key_in_range(key, self.key, self.range_end)


@dataclasses.dataclass(slots=True)
class Stream:
    identity: bytes
    watches: dict[int, Watch] = dataclasses.field(default_factory=dict)
    next_auto_id: int = 0
    blocked: bool = False
    progress_waiting: list = dataclasses.field(default_factory=list)


class WatchRegistry:
    def __init__(self, *, source: EventSource, limits: Limits, header: Callable[[int], dict], stream_epoch: int):
        self.source = source
        self.limits = limits
        self.header = header
        self.stream_epoch = stream_epoch
        self.streams: dict[bytes, Stream] = {}
        self.synced_revision = source.revision()  # S
        self.target_revision = self.synced_revision
        # Synced watches, indexed: single keys by key, everything else scanned.
        self.key_index: dict[bytes, dict[Watch, None]] = {}
        self.range_watches: dict[Watch, None] = {}
        self.synced_prev_kv_count = 0  # read prev_kv from the store only when some synced watch wants it
        self.unsynced: dict[Watch, None] = {}
        self.outbox: dict[bytes, list] = {}

    # ---- requests -------------------------------------------------------

    def submit(self, stream_identity: bytes, request_id: object, op: object, body: object) -> None:
        try:
            if op not in WATCH_OPS:
                raise QuorumError("UnknownOp", f"{op!r} (the watch endpoint serves {', '.join(WATCH_OPS)})")
            normalised = messages.validate_request(op, body, self.limits)
            stream = self._stream(stream_identity)
            getattr(self, "_on_" + op)(stream, request_id, normalised)
        except QuorumError as error:
            self._queue(stream_identity, request_id, STATUS_ERROR, error.to_wire())

    def _stream(self, identity: bytes) -> Stream:
        stream = self.streams.get(identity)
        if stream is None:
            if len(self.streams) >= self.limits.max_watch_streams:
                raise QuorumError("TooManyRequests", "too many watch streams on this node")
            stream = self.streams[identity] = Stream(identity)
        return stream

    def _on_watch_create(self, stream: Stream, request_id, body: dict) -> None:
        current = self.source.revision()
        watch_id = body["watch_id"]
        if watch_id == 0:
            while stream.next_auto_id in stream.watches:
                stream.next_auto_id += 1
            watch_id = stream.next_auto_id
            stream.next_auto_id += 1
        elif watch_id in stream.watches:
            self._queue(stream.identity, request_id, STATUS_OK,
                        self._body(watch_id, current, created=True, canceled=True,
                                   cancel_reason=CANCEL_REASON_DUPLICATE))
            return
        if len(stream.watches) >= self.limits.max_watches_per_stream:
            raise QuorumError("TooManyRequests", f"at most {self.limits.max_watches_per_stream} watches per stream")
        start = body["start_revision"] or current + 1
        filters = set(body["filters"])
        watch = Watch(stream=stream.identity, watch_id=watch_id, request_id=request_id, key=body["key"],
                      range_end=body["range_end"], start_revision=start, next_revision=start,
                      prev_kv=body["prev_kv"], no_put=FILTER_NOPUT in filters,
                      no_delete=FILTER_NODELETE in filters, progress_notify=body["progress_notify"],
                      fragment=body["fragment"])
        stream.watches[watch_id] = watch
        self._queue(stream.identity, request_id, STATUS_PARTIAL, self._body(watch_id, current, created=True))
        if start > self.synced_revision:
            self._add_synced(watch)
        else:
            self.unsynced[watch] = None

    def _on_watch_cancel(self, stream: Stream, request_id, body: dict) -> None:
        watch = stream.watches.get(body["watch_id"])
        revision = self.synced_revision
        if watch is not None:
            self._remove(watch)
            self._queue(stream.identity, watch.request_id, STATUS_OK,
                        self._body(watch.watch_id, revision, canceled=True))
        # Cancel is idempotent: an unknown id is answered the same way.
        self._queue(stream.identity, request_id, STATUS_OK, self._body(body["watch_id"], revision, canceled=True))
        self._maybe_answer_progress(stream)

    def _on_watch_progress(self, stream: Stream, request_id, _body: dict) -> None:
        if len(stream.progress_waiting) >= self.limits.max_watches_per_stream:
            raise QuorumError("TooManyRequests", "too many progress requests waiting")
        stream.progress_waiting.append(request_id)
        self._maybe_answer_progress(stream)

    def _on_watch_ping(self, stream: Stream, request_id, _body: dict) -> None:
        body = {"header": self.header(self.synced_revision), "stream_epoch": self.stream_epoch,
                "watch_ids": sorted(stream.watches)}
        self._queue(stream.identity, request_id, STATUS_OK, body)

    # ---- streams, as the actor sees them ---------------------------------

    def drop_stream(self, identity: bytes) -> None:
        """The client is gone: forget its watches."""
        stream = self.streams.pop(identity, None)
        if stream is None:
            return
        for watch in stream.watches.values():
            self._unindex(watch)
            self.unsynced.pop(watch, None)
        self.outbox.pop(identity, None)

    def stream_blocked(self, identity: bytes) -> None:
        """The client's queue is full: stop sending it events until it drains.

        Its synced watches become unsynced at S + 1: they lose nothing and
        are caught up from the store once the stream is unblocked.
        """
        stream = self.streams.get(identity)
        if stream is None or stream.blocked:
            return
        stream.blocked = True
        for watch in stream.watches.values():
            if watch.synced:
                self._unindex(watch)
                watch.next_revision = max(self.synced_revision + 1, watch.start_revision)
                self.unsynced[watch] = None

    def stream_unblocked(self, identity: bytes) -> None:
        stream = self.streams.get(identity)
        if stream is not None:
            stream.blocked = False

    def stream_identities(self) -> list[bytes]:
        return list(self.streams)

    # ---- the pump --------------------------------------------------------

    def advance(self, revision: int) -> None:
        """The store has applied up to `revision` (APPLIED, or a poll)."""
        if revision > self.target_revision:
            self.target_revision = revision

    def pump(self) -> bool:
        """One bounded unit of work: a fan-out chunk and a catch-up chunk.

        True if more work is waiting (call again soon).
        """
        if self.synced_revision < self.target_revision:
            self._fan_out_chunk()
        self._catch_up_chunk()
        self._promote_caught_up()
        for stream in self.streams.values():
            if stream.progress_waiting:
                self._maybe_answer_progress(stream)
        return self.synced_revision < self.target_revision or self._catch_up_candidates_exist()

    def _fan_out_chunk(self) -> None:
        if not self.key_index and not self.range_watches:
            # Nobody is synced: nothing to read; catch-up reads what it needs itself.
            self.synced_revision = self.target_revision
            return
        start = self.synced_revision + 1
        want_prev = self.synced_prev_kv_count > 0
        try:
            chunk = self.source.events(start, self.target_revision, self.limits.watch_chunk_revisions, want_prev)
        except QuorumError as error:
            if error.code != "Compacted":
                raise
            # The fan-out point itself was compacted away: every synced watch
            # goes through catch-up, which cancels it with compact_revision.
            for watch in list(self._synced_watches()):
                self._unindex(watch)
                watch.next_revision = max(start, watch.start_revision)
                self.unsynced[watch] = None
            self.synced_revision = self.target_revision
            return
        end = self._bounded_end(chunk, self.target_revision)
        per_watch: dict[Watch, list] = {}
        for revision, store_events in chunk:
            for store_event in store_events:
                event_type = _STORE_TYPES[store_event["type"]]
                key = store_event["kv"]["key"]
                for watch in self.key_index.get(key, ()):
                    self._collect(per_watch, watch, revision, event_type, store_event)
                for watch in self.range_watches:
                    self._collect(per_watch, watch, revision, event_type, store_event)
        for watch, events in per_watch.items():
            self._send_events(watch, events, end)
        self.synced_revision = end

    def _collect(self, per_watch: dict, watch: Watch, revision: int, event_type: int, store_event: dict) -> None:
        if revision < watch.start_revision or not watch.matches(event_type, store_event["kv"]["key"]):
            return
        per_watch.setdefault(watch, []).append((revision, _wire_event(event_type, store_event, watch.prev_kv)))

    def _catch_up_candidates(self) -> list[Watch]:
        return [w for w in self.unsynced
                if w.next_revision <= self.synced_revision and not self.streams[w.stream].blocked]

    def _catch_up_candidates_exist(self) -> bool:
        return any(w.next_revision <= self.synced_revision and not self.streams[w.stream].blocked
                   for w in self.unsynced)

    def _catch_up_chunk(self) -> None:
        candidates = self._catch_up_candidates()
        if not candidates:
            return
        compact = self.source.compact_revision()
        live = []
        for watch in candidates:
            if watch.next_revision < compact:
                self._cancel_compacted(watch, compact)
            else:
                live.append(watch)
        if not live:
            return
        start = min(w.next_revision for w in live)
        want_prev = any(w.prev_kv for w in live)
        try:
            chunk = self.source.events(start, self.synced_revision, self.limits.watch_chunk_revisions, want_prev)
        except QuorumError as error:
            if error.code != "Compacted":
                raise
            return  # compacted meanwhile: the next pass cancels those watches
        end = self._bounded_end(chunk, self.synced_revision)
        for watch in live:
            if watch.next_revision > end:
                continue
            events = []
            for revision, store_events in chunk:
                if revision < watch.next_revision:
                    continue
                for store_event in store_events:
                    event_type = _STORE_TYPES[store_event["type"]]
                    if watch.matches(event_type, store_event["kv"]["key"]):
                        events.append((revision, _wire_event(event_type, store_event, watch.prev_kv)))
            self._send_events(watch, events, end)
            watch.next_revision = end + 1

    def _bounded_end(self, chunk: list, wanted_end: int) -> int:
        if len(chunk) >= self.limits.watch_chunk_revisions:
            return chunk[-1][0]
        return wanted_end

    def _promote_caught_up(self) -> None:
        for watch in [w for w in self.unsynced if w.next_revision > self.synced_revision]:
            if not self.streams[watch.stream].blocked:
                del self.unsynced[watch]
                self._add_synced(watch)

    def _cancel_compacted(self, watch: Watch, compact: int) -> None:
        self._remove(watch)
        self._queue(watch.stream, watch.request_id, STATUS_OK,
                    self._body(watch.watch_id, self.synced_revision, canceled=True,
                               compact_revision=compact, cancel_reason=CANCEL_REASON_COMPACTED))

    # ---- progress --------------------------------------------------------

    def _maybe_answer_progress(self, stream: Stream) -> None:
        """Answer waiting watch_progress requests once every watch is synced (etcd 3.5's rule).

        A stream without watches gets no answer (as etcd): its revision would
        speak for no watch, and a client whose stream we lost (a restart of
        ours, or a stream dropped as gone) sends its requests to a new, empty
        stream; taken for its watch's progress, the answer would make it
        resume past events it never got.
        """
        if not stream.progress_waiting or stream.blocked:
            return
        if not stream.watches:
            stream.progress_waiting = []
            return
        if any(not watch.synced for watch in stream.watches.values()):
            return
        for request_id in stream.progress_waiting:
            self._queue(stream.identity, request_id, STATUS_OK, self._body(PROGRESS_WATCH_ID, self.synced_revision))
        stream.progress_waiting = []

    def progress_tick(self) -> None:
        """Periodic notifications (--watch-progress-notify-interval) for progress_notify watches."""
        for stream in self.streams.values():
            if stream.blocked:
                continue
            for watch in stream.watches.values():
                if watch.progress_notify and watch.synced and not watch.sent_since_tick:
                    self._queue(stream.identity, watch.request_id, STATUS_PARTIAL,
                                self._body(watch.watch_id, self.synced_revision))
                watch.sent_since_tick = False

    # ---- responses ---------------------------------------------------------

    def _send_events(self, watch: Watch, events: list, end: int) -> None:
        """Queue `events` [(revision, event)] for `watch`, complete up to `end`."""
        if not events:
            return
        watch.sent_since_tick = True
        limit = self.limits.watch_response_bytes
        pieces: list[tuple[list, int, bool]] = []  # (events, header revision, fragment)
        current: list = []
        current_bytes = 0
        for revision, group in _by_revision(events):
            group_bytes = sum(_event_bytes(event) for event in group)
            if current and current_bytes + group_bytes > limit:
                pieces.append((current, current[-1][0], False))
                current, current_bytes = [], 0
            if group_bytes > limit and watch.fragment:
                pieces.extend(_fragments(group, revision, limit))
                continue
            current.extend((revision, event) for event in group)
            current_bytes += group_bytes
        if current:
            pieces.append((current, end, False))
        elif pieces and not pieces[-1][2]:
            pieces[-1] = (pieces[-1][0], end, False)
        for piece, revision, fragment in pieces:
            body = self._body(watch.watch_id, revision, fragment=fragment)
            body["events"] = [event for _revision, event in piece]
            self._queue(watch.stream, watch.request_id, STATUS_PARTIAL, body)

    def _body(self, watch_id: int, revision: int, *, created=False, canceled=False, compact_revision=0,
              cancel_reason="", fragment=False) -> dict:
        return {"header": self.header(revision), "watch_id": watch_id, "created": created, "canceled": canceled,
                "compact_revision": compact_revision, "cancel_reason": cancel_reason, "fragment": fragment,
                "events": [], "stream_epoch": self.stream_epoch}

    def _queue(self, stream: bytes, request_id, status: int, body: dict) -> None:
        body.setdefault("stream_epoch", self.stream_epoch)
        self.outbox.setdefault(stream, []).append([request_id, status, body])

    def take_output(self) -> dict[bytes, list]:
        """{stream identity: [[request_id, status, body], ...]} queued since the last call."""
        output, self.outbox = self.outbox, {}
        return output

    # ---- bookkeeping ---------------------------------------------------------

    def _synced_watches(self):
        for watches in self.key_index.values():
            yield from watches
        yield from self.range_watches

    def _add_synced(self, watch: Watch) -> None:
        watch.synced = True
        self.synced_prev_kv_count += watch.prev_kv
        if watch.range_end:
            self.range_watches[watch] = None
        else:
            self.key_index.setdefault(watch.key, {})[watch] = None

    def _unindex(self, watch: Watch) -> None:
        if not watch.synced:
            return
        watch.synced = False
        self.synced_prev_kv_count -= watch.prev_kv
        if watch.range_end:
            self.range_watches.pop(watch, None)
        else:
            watches = self.key_index.get(watch.key)
            if watches is not None:
                watches.pop(watch, None)
                if not watches:
                    del self.key_index[watch.key]

    def _remove(self, watch: Watch) -> None:
        self._unindex(watch)
        self.unsynced.pop(watch, None)
        stream = self.streams.get(watch.stream)
        if stream is not None:
            stream.watches.pop(watch.watch_id, None)

    def watch_count(self) -> int:
        return sum(len(stream.watches) for stream in self.streams.values())


def _wire_event(event_type: int, store_event: dict, with_prev: bool) -> dict:
    """etcd's mvccpb.Event: type 0 PUT / 1 DELETE, kv, prev_kv when asked for and present."""
    event = {"type": event_type, "kv": store_event["kv"]}
    if with_prev and store_event.get("prev_kv") is not None:
        event["prev_kv"] = store_event["prev_kv"]
    return event


def _event_bytes(event: dict) -> int:
    size = _EVENT_OVERHEAD_BYTES + len(event["kv"]["key"]) + len(event["kv"]["value"])
    prev = event.get("prev_kv")
    if prev is not None:
        size += _EVENT_OVERHEAD_BYTES + len(prev["key"]) + len(prev["value"])
    return size


def _by_revision(events: list):
    group: list = []
    for revision, event in events:
        if group and revision != group_revision:
            yield group_revision, group
            group = []
        group_revision = revision
        group.append(event)
    if group:
        yield group_revision, group


def _fragments(group: list, revision: int, limit: int) -> list[tuple[list, int, bool]]:
    """One revision's events split into pieces of about `limit` bytes; all but the last say fragment."""
    pieces: list[tuple[list, int, bool]] = []
    current: list = []
    current_bytes = 0
    for event in group:
        size = _event_bytes(event)
        if current and current_bytes + size > limit:
            pieces.append((current, revision, True))
            current, current_bytes = [], 0
        current.append((revision, event))
        current_bytes += size
    pieces.append((current, revision, False))
    return pieces
