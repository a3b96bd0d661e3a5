"""Goal: the pure watch registry keeps etcd's watch guarantees. Method: drive
`WatchRegistry` with an in-memory event history (the MVCC store's
`events()` shape) and check what it queues per stream: created/canceled
answers, ordering, no gaps or duplicates, atomic revisions, filters,
prev_kv, compaction, slow streams, progress. And the resuming client
(protocol.watch.Watcher) against a scripted broadcaster: a registry behind a
ROUTER the test drives request by request, so a restart is deterministic."""

from __future__ import annotations

import dataclasses

import pytest
import zmq

from actors.watch.core import (
    CANCEL_REASON_COMPACTED, PROGRESS_WATCH_ID, WatchRegistry,
)
from protocol import codec
from protocol.client import Client
from protocol.codec import STATUS_ERROR, STATUS_OK, STATUS_PARTIAL
from protocol.errors import QuorumError
from protocol.limits import Limits
from protocol.watch import Watcher


class History:
    """A store history: revision -> [(type, key, value)], with prev values."""

    def __init__(self):
        self.revisions: list[list] = []  # index = revision - 1
        self.values: dict[bytes, dict] = {}
        self.compacted = 0

    def write(self, *changes: tuple[str, bytes, bytes]) -> int:
        revision = len(self.revisions) + 1
        events = []
        for kind, key, value in changes:
            prev = self.values.get(key)
            if kind == "PUT":
                kv = {"key": key, "create_revision": prev["create_revision"] if prev else revision,
                      "mod_revision": revision, "version": prev["version"] + 1 if prev else 1,
                      "value": value, "lease": 0}
                self.values[key] = kv
            else:
                kv = {"key": key, "create_revision": 0, "mod_revision": revision, "version": 0,
                      "value": b"", "lease": 0}
                self.values.pop(key, None)
            events.append({"type": kind, "kv": kv, "prev_kv": prev})
        self.revisions.append(events)
        return revision

    def put(self, key: bytes, value: bytes = b"v") -> int:
        return self.write(("PUT", key, value))

    def delete(self, key: bytes) -> int:
        return self.write(("DELETE", key, b""))

    # The EventSource interface.
    def revision(self) -> int:
        return len(self.revisions)

    def compact_revision(self) -> int:
        return self.compacted

    def events(self, start: int, end: int, limit: int, prev_kv: bool = False) -> list:
        if 0 < start < self.compacted:
            raise QuorumError("Compacted")
        out = []
        for revision in range(max(start, 1), min(end, self.revision()) + 1):
            if len(out) >= limit:
                break
            events = [{k: v for k, v in e.items() if prev_kv or k != "prev_kv"} for e in self.revisions[revision - 1]]
            out.append([revision, events])
        return out


def make(history: History, **limit_overrides) -> WatchRegistry:
    limits = dataclasses.replace(Limits(), **limit_overrides)
    return WatchRegistry(source=history, limits=limits, header=lambda r: {"revision": r}, stream_epoch=7)


def create(registry: WatchRegistry, stream: bytes, request_id, key: bytes, **fields) -> None:
    registry.submit(stream, request_id, "watch_create", {"key": key, **fields})


def run(registry: WatchRegistry, history: History) -> dict[bytes, list]:
    registry.advance(history.revision())
    for _ in range(1000):
        if not registry.pump():
            break
    return registry.take_output()


def events_of(responses: list, request_id) -> list[tuple[int, int, bytes]]:
    return [(e["kv"]["mod_revision"], e["type"], e["kv"]["key"])
            for rid, _status, body in responses if rid == request_id for e in body.get("events", [])]


def test_create_assigns_ids_from_zero_and_refuses_duplicates():
    history = History()
    registry = make(history)
    create(registry, b"s", 1, b"a")
    create(registry, b"s", 2, b"b")
    create(registry, b"s", 3, b"c", watch_id=1)
    out = registry.take_output()[b"s"]
    assert [(r[0], r[1], r[2]["watch_id"], r[2]["created"], r[2]["canceled"]) for r in out] == [
        (1, STATUS_PARTIAL, 0, True, False), (2, STATUS_PARTIAL, 1, True, False), (3, STATUS_OK, 1, True, True)]
    assert all(r[2]["stream_epoch"] == 7 for r in out)


def test_key_range_prefix_from_key_and_filters():
    history = History()
    registry = make(history)
    create(registry, b"s", "key", b"a")
    create(registry, b"s", "range", b"a", range_end=b"c")
    create(registry, b"s", "from", b"b", range_end=b"\x00")
    create(registry, b"s", "noput", b"a", range_end=b"\x00", filters=[0])
    create(registry, b"s", "nodel", b"a", range_end=b"\x00", filters=[1])
    registry.take_output()
    history.put(b"a")
    history.put(b"b")
    history.put(b"c")
    history.delete(b"a")
    out = run(registry, history)[b"s"]
    assert events_of(out, "key") == [(1, 0, b"a"), (4, 1, b"a")]
    assert events_of(out, "range") == [(1, 0, b"a"), (2, 0, b"b"), (4, 1, b"a")]
    assert events_of(out, "from") == [(2, 0, b"b"), (3, 0, b"c")]
    assert events_of(out, "noput") == [(4, 1, b"a")]
    assert events_of(out, "nodel") == [(1, 0, b"a"), (2, 0, b"b"), (3, 0, b"c")]


def test_prev_kv_only_when_asked():
    history = History()
    history.put(b"k", b"one")
    registry = make(history)
    create(registry, b"s", 1, b"k", prev_kv=True)
    create(registry, b"s", 2, b"k")
    registry.take_output()
    history.put(b"k", b"two")
    out = run(registry, history)[b"s"]
    with_prev = [e for r in out if r[0] == 1 for e in r[2]["events"]]
    without = [e for r in out if r[0] == 2 for e in r[2]["events"]]
    assert with_prev[0]["prev_kv"]["value"] == b"one" and with_prev[0]["kv"]["value"] == b"two"
    assert "prev_kv" not in without[0]


def test_history_replay_is_ordered_gapless_and_hands_over_to_live_events():
    history = History()
    for i in range(1000):
        history.put(b"k%d" % (i % 7))
    registry = make(history, watch_chunk_revisions=64)
    create(registry, b"s", 1, b"k", range_end=b"l", start_revision=10)
    out = run(registry, history)[b"s"]
    for i in range(20):
        history.put(b"k%d" % i)
    out += run(registry, history)[b"s"]
    revisions = [rev for rev, _t, _k in events_of(out, 1)]
    assert revisions == list(range(10, 1021))
    assert registry.streams[b"s"].watches[0].synced


def test_one_revision_stays_in_one_response_and_header_means_progress():
    history = History()
    registry = make(history, watch_response_bytes=400)
    create(registry, b"s", 1, b"a", range_end=b"b")
    registry.take_output()
    history.write(*[("PUT", b"a%d" % i, b"x" * 50) for i in range(10)])  # about 1.5 KiB in one revision
    history.put(b"a", b"small")
    history.put(b"zzz")  # not watched: the last response still says "complete up to 3"
    out = run(registry, history)[b"s"]
    bodies = [r[2] for r in out]
    assert [len(b["events"]) for b in bodies] == [10, 1]
    assert [b["header"]["revision"] for b in bodies] == [1, 3]
    assert not any(b["fragment"] for b in bodies)


def test_fragment_splits_a_large_revision_when_asked():
    history = History()
    registry = make(history, watch_response_bytes=400)
    create(registry, b"s", 1, b"a", range_end=b"b", fragment=True)
    registry.take_output()
    history.write(*[("PUT", b"a%d" % i, b"x" * 50) for i in range(10)])
    bodies = [r[2] for r in run(registry, history)[b"s"]]
    assert len(bodies) > 1
    assert all(b["fragment"] for b in bodies[:-1]) and not bodies[-1]["fragment"]
    assert sum(len(b["events"]) for b in bodies) == 10


def test_compacted_start_is_canceled_with_compact_revision():
    history = History()
    for _ in range(10):
        history.put(b"k")
    history.compacted = 5
    registry = make(history)
    create(registry, b"s", 1, b"k", start_revision=3)
    out = run(registry, history)[b"s"]
    assert out[0][2]["created"]
    status, body = out[-1][1], out[-1][2]
    assert status == STATUS_OK and body["canceled"] and body["compact_revision"] == 5
    assert body["cancel_reason"] == CANCEL_REASON_COMPACTED
    assert registry.watch_count() == 0


def test_blocked_stream_catches_up_from_the_store_without_loss():
    history = History()
    registry = make(history, watch_chunk_revisions=16)
    create(registry, b"slow", 1, b"k")
    create(registry, b"fast", 1, b"k")
    registry.take_output()
    delivered = {b"slow": [], b"fast": []}
    for round_number in range(10):
        for _ in range(20):
            history.put(b"k")
        out = run(registry, history)
        if round_number in (3, 4, 5):
            assert b"slow" not in out  # blocked: nothing queued for it
        for stream, responses in out.items():
            delivered[stream] += events_of(responses, 1)
        if round_number == 2:
            registry.stream_blocked(b"slow")  # its client's queue is full from now on
        if round_number == 5:
            registry.stream_unblocked(b"slow")
    # What the slow client got before it blocked plus everything after: no gap, no duplicate.
    slow = [rev for rev, _t, _k in delivered[b"slow"]]
    assert [rev for rev, _t, _k in delivered[b"fast"]] == list(range(1, 201))
    assert slow == list(range(1, 201))


def test_watch_progress_waits_until_every_watch_is_synced():
    history = History()
    for _ in range(600):
        history.put(b"k")
    registry = make(history, watch_chunk_revisions=100)
    registry.advance(history.revision())
    create(registry, b"s", 1, b"k", start_revision=1)
    registry.submit(b"s", 2, "watch_progress", {})
    registry.pump()
    first = registry.take_output()[b"s"]
    assert not [r for r in first if r[0] == 2]
    out = first + run(registry, history)[b"s"]
    progress = [r for r in out if r[0] == 2]
    assert len(progress) == 1 and progress[0][2]["watch_id"] == PROGRESS_WATCH_ID
    assert progress[0][2]["header"]["revision"] == 600
    # Every event up to 600 came before the progress answer.
    index = out.index(progress[0])
    assert events_of(out[:index], 1)[-1][0] == 600


def test_periodic_progress_only_for_idle_synced_progress_notify_watches():
    history = History()
    registry = make(history)
    create(registry, b"s", 1, b"a", progress_notify=True)
    create(registry, b"s", 2, b"b", progress_notify=True)
    create(registry, b"s", 3, b"c")
    registry.take_output()
    history.put(b"a")
    run(registry, history)
    registry.progress_tick()
    ticks = registry.take_output()[b"s"]
    assert [(r[0], r[2]["events"], r[2]["header"]["revision"]) for r in ticks] == [(2, [], 1)]
    registry.progress_tick()
    assert sorted(r[0] for r in registry.take_output()[b"s"]) == [1, 2]


def test_cancel_ends_the_create_stream_and_is_idempotent():
    history = History()
    registry = make(history)
    create(registry, b"s", 1, b"a", watch_id=5)
    registry.submit(b"s", 2, "watch_cancel", {"watch_id": 5})
    registry.submit(b"s", 3, "watch_cancel", {"watch_id": 5})
    out = registry.take_output()[b"s"]
    assert [(r[0], r[1], r[2]["canceled"]) for r in out] == [
        (1, STATUS_PARTIAL, False), (1, STATUS_OK, True), (2, STATUS_OK, True), (3, STATUS_OK, True)]
    history.put(b"a")
    assert run(registry, history) == {}


def test_bad_requests_and_ping():
    registry = make(History())
    registry.submit(b"s", 1, "watch_create", {"key": b""})
    registry.submit(b"s", 2, "watch_create", {"key": b"a", "filters": [3]})
    registry.submit(b"s", 3, "put", {"key": b"a"})
    registry.submit(b"s", 4, "watch_ping", {})
    out = registry.take_output()[b"s"]
    assert [r[1] for r in out[:3]] == [STATUS_ERROR] * 3
    assert [r[2]["code"] for r in out[:3]] == ["EmptyKey", "InvalidArgument", "UnknownOp"]
    assert out[3][2]["stream_epoch"] == 7 and out[3][2]["watch_ids"] == []


def test_dropped_stream_forgets_its_watches():
    history = History()
    registry = make(history)
    create(registry, b"s", 1, b"a")
    create(registry, b"s", 2, b"a", range_end=b"b")
    registry.drop_stream(b"s")
    history.put(b"a")
    assert run(registry, history) == {} and registry.watch_count() == 0


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_every_watch_sees_exactly_its_history(seed):
    import random  # the test's own RNG, seeded; the core never imports random

    rng = random.Random(seed)
    history = History()
    registry = make(history, watch_chunk_revisions=rng.choice([1, 3, 50]))
    watches = {}
    delivered: dict[tuple, list] = {}
    keys = [b"k%d" % i for i in range(8)]
    for step in range(300):
        roll = rng.random()
        if roll < 0.6:
            history.put(rng.choice(keys))
        elif roll < 0.7:
            history.delete(rng.choice(keys))
        elif roll < 0.8 and len(watches) < 20:
            stream = rng.choice([b"a", b"b", b"c"])
            request_id = step
            start = rng.randint(0, history.revision() + 2)
            key = rng.choice(keys)
            range_end = rng.choice([b"", b"k5", b"\x00"])
            create(registry, stream, request_id, key, range_end=range_end, start_revision=start)
            watches[(stream, request_id)] = (key, range_end, start or history.revision() + 1)
            delivered[(stream, request_id)] = []
        elif roll < 0.85:
            stream = rng.choice([b"a", b"b", b"c"])
            registry.stream_blocked(stream)
        elif roll < 0.9:
            registry.stream_unblocked(rng.choice([b"a", b"b", b"c"]))
        registry.advance(history.revision())
        registry.pump()
        for stream, responses in registry.take_output().items():
            for request_id, _status, body in responses:
                if (stream, request_id) in delivered:
                    delivered[(stream, request_id)] += [(e["kv"]["mod_revision"], e["kv"]["key"])
                                                        for e in body["events"]]
    for stream in (b"a", b"b", b"c"):
        registry.stream_unblocked(stream)
    for stream, responses in run(registry, history).items():
        for request_id, _status, body in responses:
            if (stream, request_id) in delivered:
                delivered[(stream, request_id)] += [(e["kv"]["mod_revision"], e["kv"]["key"]) for e in body["events"]]
    from protocol.messages import key_in_range

    for name, (key, range_end, start) in watches.items():
        expected = [(revision, event["kv"]["key"])
                    for revision in range(start, history.revision() + 1)
                    for event in history.revisions[revision - 1]
                    if key_in_range(event["kv"]["key"], key, range_end)]
        assert delivered[name] == expected, name


def test_progress_notify_interval_takes_go_durations():
    from actors import config

    assert config.parse(["--watch-progress-notify-interval", "100ms"]).watch_progress_notify_interval_ms == 100
    assert config.parse(["--experimental-watch-progress-notify-interval", "1m30s"]) \
        .watch_progress_notify_interval_ms == 90_000
    assert config.parse([]).watch_progress_notify_interval_ms == 600_000  # etcd's 10m
    for bad in ("10", "10x", "0s", ""):
        with pytest.raises(ValueError):
            config.parse(["--watch-progress-notify-interval", bad])


# ---- the resuming client against a scripted broadcaster ----------------------


def _hello_only(endpoint: str) -> Client:
    """Stands in for a protocol.client.Client whose hello names the watch endpoint."""

    class HelloOnly(Client):
        def __init__(self):  # no gateway connection
            pass

        def hello(self) -> dict:
            return {"watch": endpoint}

    return HelloOnly()


class _ScriptedBroadcaster:
    """A ROUTER in front of a WatchRegistry; the test decides which registry
    (which broadcaster process, by its stream_epoch) each request reaches."""

    def __init__(self, context: zmq.Context):
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        port = self.socket.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"

    def receive(self, count: int) -> list:
        """The next `count` requests from clients, as (identity, [request_id, op, body])."""
        requests = []
        while len(requests) < count:
            assert self.socket.poll(5000), f"only {len(requests)} of {count} requests arrived"
            identity, frame = self.socket.recv_multipart()
            requests += [(identity, item) for item in codec.decode_frame(frame, 1 << 24, 1 << 16)]
        return requests

    def serve(self, registry: WatchRegistry, history: History, requests: list) -> None:
        """Submit the requests in order, pump, and send each stream its answers as one frame."""
        for identity, (request_id, op, body) in requests:
            registry.submit(identity, request_id, op, body)
        for identity, responses in run(registry, history).items():
            self.socket.send_multipart([identity, codec.encode_response_frame(responses)])

    def close(self) -> None:
        self.socket.close(linger=0)


def _drain(watcher, quiet_s: float = 0.3) -> list[dict]:
    responses = []
    while (response := watcher.get(timeout_s=quiet_s)) is not None:
        responses.append(response)
    return responses


def test_progress_is_not_answered_on_a_stream_without_watches():
    """etcd's rule: its revision would speak for no watch (see the client test below)."""
    history = History()
    for _ in range(3):
        history.put(b"k")
    registry = make(history)
    registry.submit(b"s", 1, "watch_progress", {})
    assert run(registry, history) == {}
    # A stream that lost its watches (here: dropped as gone, then written to again).
    create(registry, b"t", 2, b"k")
    registry.submit(b"t", 3, "watch_progress", {})
    assert [r[0] for r in run(registry, history)[b"t"]] == [2, 3]
    registry.drop_stream(b"t")
    registry.submit(b"t", 4, "watch_progress", {})
    assert run(registry, history) == {}
    # The requests are not kept for a watch created later either.
    create(registry, b"t", 5, b"k")
    registry.submit(b"t", 6, "watch_progress", {})
    assert [r[0] for r in run(registry, history)[b"t"]] == [5, 6]


def _progress_answer(request_id, revision: int, stream_epoch: int) -> list:
    return [request_id, STATUS_OK, {"header": {"revision": revision}, "watch_id": PROGRESS_WATCH_ID,
                                    "created": False, "canceled": False, "compact_revision": 0,
                                    "cancel_reason": "", "fragment": False, "events": [],
                                    "stream_epoch": stream_epoch}]


@pytest.mark.parametrize("answered_by", ["old_rule", "registry"])
def test_client_ignores_progress_answered_before_its_recreated_watch_existed(answered_by):
    """Regression: a watch through a restarted broadcaster skipped a whole range
    of revisions. The client's watch_progress requests sent while the
    broadcaster was down are queued by ZeroMQ and reach the new broadcaster on
    reconnect, before the client knows of the restart. The new broadcaster
    answered them at once (the stream has no watch yet) with its current
    revision, in one frame: the first answer's new stream_epoch made the client
    re-create its watch from its last revision + 1, the next ones were taken as
    progress of that watch, moving its resume point to the broadcaster's
    revision; the replayed events were then dropped as already delivered.
    "old_rule": a broadcaster that still answers (the client must ignore it);
    "registry": the registry, which no longer answers on a watchless stream."""
    context = zmq.Context()
    broadcaster = _ScriptedBroadcaster(context)
    history = History()
    for _ in range(5):
        history.put(b"k")
    limits = Limits()
    first = WatchRegistry(source=history, limits=limits, header=lambda r: {"revision": r}, stream_epoch=1)
    watcher = Watcher(_hello_only(broadcaster.endpoint), b"k", start_revision=1, ping_interval_s=60,
                      context=context)
    try:
        broadcaster.serve(first, history, broadcaster.receive(1))
        delivered = [e["kv"]["mod_revision"] for r in _drain(watcher) for e in r["events"]]
        assert delivered == [1, 2, 3, 4, 5] and watcher.revision == 5
        # The broadcaster is killed; writes go on; the client asks for progress meanwhile.
        for _ in range(5):
            history.put(b"k")
        watcher.request_progress()
        watcher.request_progress()
        queued = broadcaster.receive(2)
        # The restarted broadcaster (another stream_epoch) gets the queued requests first.
        second = WatchRegistry(source=history, limits=limits, header=lambda r: {"revision": r}, stream_epoch=2)
        if answered_by == "old_rule":
            identity = queued[0][0]
            answers = [_progress_answer(request_id, 10, 2) for _identity, (request_id, _op, _body) in queued]
            broadcaster.socket.send_multipart([identity, codec.encode_response_frame(answers)])
            responses = _drain(watcher)
        else:
            broadcaster.serve(second, history, queued)
            responses = _drain(watcher)
            assert watcher.watch_id is not None  # nothing came: the client does not know of the restart yet
            # Its ping (sent after ping_interval_s of silence) reaches the new
            # broadcaster: the answer's epoch tells it.
            watcher.ping_interval_s = 0.05
            assert watcher.get(timeout_s=0.3) is None
            watcher.ping_interval_s = 60
            broadcaster.serve(second, history, broadcaster.receive(1))
            responses += _drain(watcher)
        recreate = broadcaster.receive(1)
        (_identity, (_request_id, op, body)), = recreate
        assert op == "watch_create" and body["start_revision"] == 6
        broadcaster.serve(second, history, recreate)
        responses += _drain(watcher)
        delivered = []
        for response in responses:
            delivered += [e["kv"]["mod_revision"] for e in response["events"]]
            # A header revision R means every event up to R was delivered by now.
            assert delivered == list(range(6, min(response["header"]["revision"], 10) + 1)), \
                (response["header"]["revision"], delivered)
        assert delivered == [6, 7, 8, 9, 10]
        assert watcher.revision == 10
    finally:
        watcher.close()
        broadcaster.close()
        context.destroy(linger=0)
