"""Goal: watches on a real node keep etcd's guarantees through concurrent
writes, a compaction, and kill -9 of the watch broadcaster and of the applier.

Method: a writer thread puts, deletes and writes multi-key txns on a few
prefixes while watcher threads (protocol.watch, one connection each) watch
a prefix, a range, a single key, from-key, with filters, prev_kv and
progress notifications. Halfway, the test kills the broadcaster, then the
applier, then compacts. The oracle is the store's own history, read from the
node's LMDB (read-only) before the compaction and after the writes. The
checker then asserts, per watcher: events in revision order, each exactly
once, none missing (every revision from its start to the end that touches
its range is there, filtered as asked), all events of a revision in one
response, prev_kv right, and every progress point R (a response's header
revision, periodic or requested) preceded by every event up to R."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from actors.mvcc import MvccStore
from protocol.client import CompactedError, QuorumError, ops
from protocol.messages import key_in_range
from protocol.watch import FILTER_NODELETE, FILTER_NOPUT, PROGRESS_WATCH_ID, watch

WATCHER_DEADLINE_S = 40


def read_history(data_dir: str, start: int, end: int) -> dict[int, list]:
    store = MvccStore.open(os.path.join(data_dir, "store"), writer=False)
    try:
        history = {}
        while start <= end:
            chunk = store.events(start, end, 1000, False)
            if not chunk:
                break
            for revision, events in chunk:
                history[revision] = [(0 if e["type"] == "PUT" else 1, e["kv"]) for e in events]
            start = chunk[-1][0] + 1
        return history
    finally:
        store.close()


class Recorder(threading.Thread):
    """Runs one watcher until it has delivered everything up to `stop_at`."""

    def __init__(self, name: str, endpoint: str, key, range_end, options: dict, state: dict):
        super().__init__(name=name, daemon=True)
        self.endpoint = endpoint
        self.key, self.range_end, self.options = key, range_end, options
        self.state = state
        self.responses: list[dict] = []
        self.error: BaseException | None = None
        self.reconnects = 0
        self.start_revision = 0
        self.revision = 0

    def run(self) -> None:
        try:
            with watch([self.endpoint], self.key, self.range_end, created_notify=True, **self.options) as watcher:
                deadline = time.monotonic() + WATCHER_DEADLINE_S
                count = 0
                next_progress = 0.0
                while time.monotonic() < deadline:
                    stop_at = self.state.get("stop_at")
                    if stop_at is not None and self.revision >= stop_at:
                        break
                    if time.monotonic() >= next_progress:
                        # Quiet watches learn how far they are from progress answers.
                        watcher.request_progress()
                        next_progress = time.monotonic() + 0.5
                    response = watcher.get(timeout_s=0.2)
                    if response is None:
                        continue
                    if response.get("created"):
                        self.start_revision = (self.options.get("start_revision")
                                               or response["header"]["revision"] + 1)
                        continue
                    self.responses.append(response)
                    self.revision = max(self.revision, response["header"]["revision"])
                    count += 1
                self.reconnects = watcher.reconnects
        except BaseException as error:  # handed to the test thread
            self.error = error


def writer(client, rng: random.Random, count: int) -> None:
    """count writes of assorted shapes; errors (a killed applier) are tolerated."""
    keys = [f"{p}/k{i}" for p in ("a", "b", "c") for i in range(6)]
    for _ in range(count):
        roll = rng.random()
        try:
            if roll < 0.6:
                client.put(rng.choice(keys), os.urandom(4).hex())
            elif roll < 0.75:
                client.delete(rng.choice(keys))
            elif roll < 0.9:
                picked = rng.sample(keys, 3)
                client.txn([], [ops.put(k, "t") for k in picked])
            else:
                client.delete(rng.choice(["a/", "b/"]), prefix=True)
        except QuorumError:
            pass  # outcome unknown; the store's history is the oracle


def check(recorder: Recorder, history: dict[int, list], first_revision: int, last_revision: int,
          filters: set, prev_kv: bool) -> int:
    key, range_end = recorder.key, recorder.range_end
    start = recorder.start_revision
    expected = []
    latest: dict[bytes, dict] = {}
    for revision in range(first_revision, last_revision + 1):
        for event_type, kv in history.get(revision, []):
            if revision >= start and key_in_range(kv["key"], key, range_end) and event_type not in filters:
                expected.append((revision, event_type, kv["key"], latest.get(kv["key"])))
            if event_type == 0:
                latest[kv["key"]] = kv
            else:
                latest.pop(kv["key"], None)
    got = []
    seen_revisions = set()
    for response in recorder.responses:
        revisions = []
        for event in response["events"]:
            got.append((event["kv"]["mod_revision"], event["type"], event["kv"]["key"], event.get("prev_kv")))
            revisions.append(event["kv"]["mod_revision"])
        assert revisions == sorted(revisions), f"{recorder.name}: events out of order in one response"
        for revision in set(revisions):
            assert revision not in seen_revisions, f"{recorder.name}: revision {revision} split over responses"
            seen_revisions.add(revision)
        # Progress: a header revision R means every event up to R was delivered by now.
        progress = response["header"]["revision"]
        owed = [e for e in expected if e[0] <= progress]
        assert [g[:3] for g in got[:len(owed)]] == [o[:3] for o in owed], \
            f"{recorder.name}: response at header revision {progress} before all its events"
    if not prev_kv:
        got = [g[:3] + (None,) for g in got]
        expected = [e[:3] + (None,) for e in expected]
    else:
        got = [(r, t, k, p["value"] if p else None) for r, t, k, p in got]
        expected = [(r, t, k, p["value"] if p else None) for r, t, k, p in expected]
    assert [g[0] for g in got] == sorted(g[0] for g in got), f"{recorder.name}: not in revision order"
    assert len(set(got)) == len(got), f"{recorder.name}: duplicate events"
    assert got == expected, f"{recorder.name}: delivered != history ({len(got)} vs {len(expected)} events)"
    return len(got)


def test_watch_guarantees_through_kills_and_compaction(node_factory):
    node = node_factory(extra_args=("--watch-progress-notify-interval", "200ms"))
    client = node.client(timeout_s=2.0)
    rng = random.Random(7)
    writer(client, rng, 60)
    state: dict = {}
    specs = {
        "prefix_prev_kv": (b"a/", b"a0", {"prev_kv": True}, set(), True),
        "range_replay_noput": (b"a/", b"c/", {"start_revision": 1, "filters": [FILTER_NOPUT]}, {0}, False),
        "key_nodelete": (b"b/k1", b"", {"filters": [FILTER_NODELETE]}, {1}, False),
        "from_key_progress": (b"b/", b"\x00", {"progress_notify": True}, set(), False),
        "all_from_30": (b"\x00", b"\x00", {"start_revision": 30}, set(), False),
        "quiet_progress": (b"q/", b"q0", {"progress_notify": True}, set(), False),
    }
    recorders = {name: Recorder(name, node.zmq_endpoint, key, end, options, state)
                 for name, (key, end, options, _filters, _prev) in specs.items()}
    for recorder in recorders.values():
        recorder.start()
    writer(client, rng, 150)
    os.kill(node.actor_pids()["watch_broadcaster"], signal.SIGKILL)
    writer(client, rng, 150)
    os.kill(node.actor_pids()["applier"], signal.SIGKILL)
    writer(client, rng, 150)
    node.wait_ready()
    compact_at = client.get("x")["header"]["revision"] - 20
    # Compact only what every watcher has seen: the ones that live through it.
    deadline = time.monotonic() + WATCHER_DEADLINE_S
    while time.monotonic() < deadline and min(r.revision for r in recorders.values()) < compact_at:
        time.sleep(0.05)
    history = read_history(node.data_dir, 1, compact_at)
    client.compact(compact_at)
    writer(client, rng, 100)
    final = client.get("x")["header"]["revision"]
    state["stop_at"] = final
    for recorder in recorders.values():
        recorder.join(WATCHER_DEADLINE_S + 5)
    history.update(read_history(node.data_dir, compact_at + 1, final))
    totals = {}
    for name, (_key, _end, options, filters, prev_kv) in specs.items():
        recorder = recorders[name]
        assert recorder.error is None, f"{name}: {recorder.error!r}"
        totals[name] = check(recorder, history, 1, final, filters, prev_kv)
    assert all(count > 0 for name, count in totals.items() if name != "quiet_progress"), totals
    assert recorders["prefix_prev_kv"].reconnects >= 1  # it lived through the broadcaster's kill
    progress_only = [r for r in recorders["quiet_progress"].responses if not r["events"]]
    assert progress_only, "no periodic progress notification arrived"
    requested = [r for r in recorders["key_nodelete"].responses if r["watch_id"] == PROGRESS_WATCH_ID]
    assert requested, "no answer to watch_progress"

    # A watch whose start was compacted is canceled with compact_revision, never skipped.
    with pytest.raises(CompactedError) as raised:
        with watch([node.zmq_endpoint], "a/", prefix=True, start_revision=2) as watcher:
            watcher.get(timeout_s=5)
    assert raised.value.compact_revision == compact_at

    # Resumable: a new watch from any revision above the compaction point
    # delivers exactly the history's suffix.
    resume_from = compact_at + 5
    resumed = Recorder("resumed", node.zmq_endpoint, b"a/", b"a0", {"start_revision": resume_from}, state)
    resumed.run()
    assert resumed.error is None, repr(resumed.error)
    assert resumed.start_revision == resume_from
    check(resumed, history, 1, final, set(), False)
    client.close()


def test_watch_requests_are_validated_and_hello_names_the_endpoint(node):
    import zmq

    from protocol import codec

    deadline = time.monotonic() + 10
    hello = node.client().hello()
    while "watch" not in hello and time.monotonic() < deadline:  # the broadcaster may still be starting
        time.sleep(0.05)
        hello = node.client().hello()
    assert hello["watch"].startswith("tcp://127.0.0.1:")
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(hello["watch"])
    try:
        socket.send(codec.encode_request_frame([
            [1, "watch_create", {"key": b""}],
            [2, "watch_create", {"key": b"k", "bogus": 1}],
            [3, "range", {"key": b"k"}],
            [4, "watch_create", {"key": b"k", "watch_id": 9}],
            [5, "watch_create", {"key": b"k", "watch_id": 9}],
            [6, "watch_ping", {}],
        ]))
        responses = []
        while len(responses) < 6 and socket.poll(5000):
            responses += codec.decode_response_frame(socket.recv())
        by_id = {request_id: (status, body) for request_id, status, body in responses}
        assert by_id[1][1]["code"] == "EmptyKey"
        assert by_id[2][1]["code"] == "InvalidArgument"
        assert by_id[3][1]["code"] == "UnknownOp"
        assert by_id[4][0] == codec.STATUS_PARTIAL and by_id[4][1]["created"] and by_id[4][1]["watch_id"] == 9
        assert by_id[5][0] == codec.STATUS_OK and by_id[5][1]["created"] and by_id[5][1]["canceled"]
        assert by_id[6][1]["watch_ids"] == [9] and by_id[6][1]["stream_epoch"] == by_id[4][1]["stream_epoch"]
    finally:
        socket.close()


def test_quorumctl_watch_prints_like_etcdctl(node):
    """Goal: `quorumctl watch` prints etcdctl 3.4's output (simple, json, exec
    command, interactive). Method: three writes, then watchers as subprocesses
    from the delete's revision (--rev), SIGINT, and stdout compared with what
    etcdctl 3.4 prints for the same events."""
    import subprocess
    import sys

    from tests.conftest import REPO

    def start(*args, stdin=None):
        return subprocess.Popen([sys.executable, "-m", "tools.quorumctl", "--endpoints", node.zmq_endpoint, *args],
                                cwd=REPO, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    client = node.client()
    client.put("foo", "bar")
    delete_rev = client.delete("foo")["header"]["revision"]
    put_rev = client.put("foo", "baz")["header"]["revision"]
    rev = str(delete_rev)
    procs = {
        "simple": start("watch", "foo", "--prev-kv", "--rev", rev),
        "json": start("watch", "foo", "-w", "json", "--rev", rev),
        "exec": start("watch", "foo", "--rev", rev, "--", sys.executable, "-c",
                      "import os; print(os.environ['ETCD_WATCH_EVENT_TYPE'], os.environ['ETCD_WATCH_KEY'])"),
        "interactive": start("watch", "-i", stdin=subprocess.PIPE),
    }
    procs["interactive"].stdin.write(f"watch foo --prev-kv --rev {rev}\nbogus\n".encode())
    procs["interactive"].stdin.flush()
    time.sleep(2.5)  # start-up of four CLI processes and their watches
    outputs = {}
    for name, proc in procs.items():
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        outputs[name] = (out.decode(), err.decode(), proc.returncode)
    simple = outputs["simple"][0]
    assert simple == "DELETE\nfoo\nbar\nfoo\n\nPUT\nfoo\nbaz\n", simple
    assert outputs["interactive"][0] == "DELETE\nfoo\nbar\nfoo\n\nPUT\nfoo\nbaz\n", outputs["interactive"]
    assert "Invalid command bogus" in outputs["interactive"][1]
    import json

    lines = [json.loads(line) for line in outputs["json"][0].splitlines()]
    assert all(set(line) == {"Header", "Events", "CompactRevision", "Canceled", "Created"} for line in lines)
    events = [event for line in lines for event in line["Events"]]
    # etcdctl's event JSON: type omitted for PUT, zero fields omitted, bytes base64.
    assert events == [{"type": 1, "kv": {"key": "Zm9v", "mod_revision": delete_rev}},
                      {"kv": {"key": "Zm9v", "create_revision": put_rev, "mod_revision": put_rev, "version": 1,
                              "value": "YmF6"}}], events
    # The command runs per event after its response is printed (one response may hold both).
    exec_lines = outputs["exec"][0].splitlines()
    assert [line for line in exec_lines if not line.startswith('"')] == ["DELETE", "foo", "", "PUT", "foo", "baz"]
    assert [line for line in exec_lines if line.startswith('"')] == ['"DELETE" "foo"', '"PUT" "foo"'], exec_lines
    assert all(err.endswith("Error: interrupted\n") for _out, err, _code in outputs.values())


def test_a_client_that_stops_reading_is_caught_up_from_the_store(node):
    """Goal: a watch client that does not read loses nothing and costs the
    broadcaster no per-event memory. Method: a raw stream with tiny receive
    buffers creates a prev_kv watch and stops reading while 8 KiB values are
    written one by one, until the broadcaster reports the client slow; then the
    client reads everything and finds every revision once, in order, prev_kv
    matching, ending with a response whose header is the last revision."""
    import zmq

    from protocol import codec

    client = node.client()
    deadline = time.monotonic() + 10
    while "watch" not in client.hello() and time.monotonic() < deadline:
        time.sleep(0.05)
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVHWM, 1)
    socket.setsockopt(zmq.RCVBUF, 4096)
    socket.setsockopt(zmq.ROUTING_ID, os.urandom(16))
    socket.connect(client.hello()["watch"])
    socket.send(codec.encode_request_frame([[1, "watch_create", {"key": b"slow", "prev_kv": True}]]))
    assert socket.poll(5000)
    (_rid, _status, created), = codec.decode_response_frame(socket.recv())
    first = created["header"]["revision"] + 1
    value = b"v" * 8192
    written = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (len(written) < 300 or "watch client slow" not in node.log_tail(200)):
        written.append(client.put("slow", value + b"%d" % len(written))["header"]["revision"])
    assert "watch client slow" in node.log_tail(400), "the client never filled its queue"
    written.append(client.put("slow", b"last")["header"]["revision"])
    events = []
    last_header = 0
    deadline = time.monotonic() + 20
    while last_header < written[-1] and time.monotonic() < deadline:
        if not socket.poll(1000):
            continue
        for _rid, _status, body in codec.decode_response_frame(socket.recv()):
            events += body["events"]
            last_header = max(last_header, body["header"]["revision"])
    socket.close()
    assert [e["kv"]["mod_revision"] for e in events] == list(range(first, written[-1] + 1)) == written
    for previous, event in zip(events, events[1:]):
        assert event["prev_kv"]["value"] == previous["kv"]["value"]
