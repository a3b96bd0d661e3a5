"""Goal: the gRPC front end is a faithful skin: protobuf <-> dict conversion
copies every field, the Watch translator shows the broadcaster's streams as
etcd's server would, and the Watch, Lock, Election, Cluster and Maintenance
services behave as etcd 3.4's on a real node.
Method: convert etcd requests to our dicts and check them against the
schemas; convert our response dicts (snake_case, quorumkv's extra fields)
to etcd's messages and check every field, camelCase ones included; drive
the translator by hand; call real nodes with etcd's generated stubs, the
expected answers taken from the same calls against a real etcd 3.4."""

from __future__ import annotations

import os
import queue
import signal
import threading
import time

import grpc
import pytest

from actors.grpc_messages import to_body, to_message
from actors.grpc_watch import NO_WATCH_ID, BroadcasterLostError, WatchTranslator
from protocol import messages
from protocol.codec import STATUS_ERROR, STATUS_OK, STATUS_PARTIAL
from protocol.etcd.etcdserverpb import rpc_pb2 as pb, rpc_pb2_grpc as pb_grpc
from protocol.etcd.v3electionpb import v3election_pb2 as epb, v3election_pb2_grpc as epb_grpc
from protocol.etcd.v3lockpb import v3lock_pb2 as lpb, v3lock_pb2_grpc as lpb_grpc
from protocol.limits import Limits


def test_requests_become_valid_request_dicts():
    txn = pb.TxnRequest(
        compare=[pb.Compare(key=b"k", target=pb.Compare.VALUE, result=pb.Compare.NOT_EQUAL, value=b"v")],
        success=[pb.RequestOp(request_put=pb.PutRequest(key=b"k", value=b"w", prev_kv=True))],
        failure=[pb.RequestOp(request_range=pb.RangeRequest(key=b"a", range_end=b"b", sort_order=2))])
    body = to_body(txn)
    assert body == {"compare": [{"key": b"k", "target": 3, "result": 3, "value": b"v"}],
                    "success": [{"request_put": {"key": b"k", "value": b"w", "prev_kv": True}}],
                    "failure": [{"request_range": {"key": b"a", "range_end": b"b", "sort_order": 2}}]}
    normalised = messages.validate_request("txn", body, Limits())
    assert normalised["failure"][0]["request_range"]["sort_order"] == messages.SORT_DESCEND
    assert to_body(pb.LeaseGrantRequest(TTL=10, ID=7)) == {"TTL": 10, "ID": 7}
    assert to_body(pb.RangeRequest(key=b"x")) == {"key": b"x"}  # defaults left to the schema


def test_responses_become_etcds_messages():
    header = {"cluster_id": 1, "member_id": 2, "revision": 3, "raft_term": 4}
    status = to_message(pb.StatusResponse, {
        "header": header, "version": "3.4.0-quorumkv.0.1", "db_size": 100, "db_size_in_use": 50,
        "leader": 2, "raft_index": 9, "raft_term": 4, "raft_applied_index": 8, "errors": ["x"], "is_learner": False})
    assert (status.dbSize, status.dbSizeInUse, status.raftIndex, status.raftTerm, status.raftAppliedIndex) == \
        (100, 50, 9, 4, 8)
    assert status.header.raft_term == 4 and list(status.errors) == ["x"]
    alarms = to_message(pb.AlarmResponse, {"header": header, "alarms": [{"member_id": 2, "alarm": 1}]})
    assert alarms.alarms[0].memberID == 2 and alarms.alarms[0].alarm == pb.NOSPACE
    kv = {"key": b"k", "create_revision": 2, "mod_revision": 3, "version": 2, "value": b"v", "lease": 0}
    put = to_message(pb.PutResponse, {"header": header, "prev_kv": None})
    assert not put.HasField("prev_kv")
    txn = to_message(pb.TxnResponse, {"header": header, "succeeded": True, "responses": [
        {"response_range": {"header": {"revision": 3}, "kvs": [kv], "more": False, "count": 1}},
        {"response_put": {"header": {"revision": 3}, "prev_kv": kv}}]})
    assert txn.responses[0].response_range.kvs[0].value == b"v"
    assert txn.responses[1].response_put.prev_kv.mod_revision == 3
    ttl = to_message(pb.LeaseTimeToLiveResponse, {"header": header, "ID": 5, "TTL": 9, "grantedTTL": 10,
                                                  "keys": [b"a"], "quorumkv_only": 1})
    assert (ttl.ID, ttl.TTL, ttl.grantedTTL, list(ttl.keys)) == (5, 9, 10, [b"a"])


# ---- the Watch translator (no I/O) -------------------------------------------
#
# Goal: the gRPC Watch stream is the broadcaster's stream as etcd's server
# would show it. Method: feed WatchTranslator requests and broadcaster
# answers by hand and check what a gRPC client would be sent.

HEADER = {"cluster_id": 1, "member_id": 2, "revision": 7, "raft_term": 1}


def _create(**fields):
    return pb.WatchRequest(create_request=pb.WatchCreateRequest(**fields))


def _answer(watch_id, epoch=9, **fields):
    body = {"header": HEADER, "watch_id": watch_id, "created": False, "canceled": False, "compact_revision": 0,
            "cancel_reason": "", "fragment": False, "events": [], "stream_epoch": epoch}
    body.update(fields)
    return body


def test_translator_maps_requests_onto_broadcaster_ops():
    translator = WatchTranslator(HEADER)
    request_id, op, body = translator.take_request(_create(key=b"a", range_end=b"b", start_revision=3,
                                                           filters=[pb.WatchCreateRequest.NOPUT], prev_kv=True,
                                                           watch_id=4, fragment=True, progress_notify=True))
    assert op == "watch_create"
    assert body == {"key": b"a", "range_end": b"b", "start_revision": 3, "progress_notify": True, "filters": [0],
                    "prev_kv": True, "watch_id": 4, "fragment": True}
    messages.validate_request("watch_create", body, Limits())
    # etcd's server: an empty key is its smallest key.
    assert translator.take_request(_create())[2]["key"] == b"\x00"
    assert translator.take_request(pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=4)))[1:] == \
        ["watch_cancel", {"watch_id": 4}]
    assert translator.take_request(pb.WatchRequest(progress_request=pb.WatchProgressRequest()))[1:] == \
        ["watch_progress", {}]
    assert translator.take_request(pb.WatchRequest()) is None  # etcd ignores an empty request
    # No watch on the stream (and none being created): answered from a ping, as etcd 3.4 answers at once.
    alone = WatchTranslator(HEADER)
    request_id, op, _body = alone.take_request(pb.WatchRequest(progress_request=pb.WatchProgressRequest()))
    assert op == "watch_ping"
    assert alone.on_response(request_id, STATUS_OK, {"header": dict(HEADER, revision=9), "stream_epoch": 9,
                                                     "watch_ids": []}) == \
        [{"header": dict(HEADER, revision=9), "watch_id": NO_WATCH_ID}]
    ids = [item[0] for item in (translator.take_request(_create(key=b"k")) for _ in range(3))]
    assert len(set(ids)) == 3
    # The same when the stream's last watch is being canceled: the broadcaster reads
    # the progress request after the cancel and would never answer it.
    canceling = WatchTranslator(HEADER)
    create_id = canceling.take_request(_create(key=b"a"))[0]
    canceling.on_response(create_id, STATUS_PARTIAL, _answer(0, created=True))
    canceling.take_request(pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=0)))
    assert canceling.take_request(pb.WatchRequest(progress_request=pb.WatchProgressRequest()))[1] == "watch_ping"


def test_translator_holds_a_bounded_number_of_unanswered_progress_requests():
    """The broadcaster drops progress requests waiting when a stream's last watch
    goes: the translator must not keep their ids for ever."""
    from actors.grpc_watch import PROGRESS_WAITING_MAX

    translator = WatchTranslator(HEADER)
    translator.take_request(_create(key=b"a"))
    for _ in range(10 * PROGRESS_WAITING_MAX):
        translator.take_request(pb.WatchRequest(progress_request=pb.WatchProgressRequest()))
    assert len(translator.kinds) == 1 + PROGRESS_WAITING_MAX


def test_translator_passes_a_watchs_life_and_drops_cancel_answers():
    translator = WatchTranslator(HEADER)
    create_id = translator.take_request(_create(key=b"a"))[0]
    created = _answer(0, created=True)
    assert translator.on_response(create_id, STATUS_PARTIAL, created) == [created]
    kv = {"key": b"a", "create_revision": 8, "mod_revision": 8, "version": 1, "value": b"v", "lease": 0}
    events = _answer(0, events=[{"type": 0, "kv": kv}])
    assert translator.on_response(create_id, STATUS_PARTIAL, events) == [events]
    progress_id = translator.take_request(pb.WatchRequest(progress_request=pb.WatchProgressRequest()))[0]
    progress = _answer(-1)
    assert translator.on_response(progress_id, STATUS_OK, progress) == [progress]
    cancel_id = translator.take_request(pb.WatchRequest(cancel_request=pb.WatchCancelRequest(watch_id=0)))[0]
    # The broadcaster answers the watch's own request and the cancel; etcd sends one canceled response.
    last = _answer(0, canceled=True)
    assert translator.on_response(create_id, STATUS_OK, last) == [last]
    assert translator.on_response(cancel_id, STATUS_OK, _answer(0, canceled=True)) == []
    assert translator.live == set() and translator.kinds == {}
    assert translator.on_response(create_id, STATUS_PARTIAL, events) == []  # late: its request is done


def test_translator_refuses_creates_as_etcd_does():
    translator = WatchTranslator(HEADER)
    first = translator.take_request(_create(key=b"a"))[0]
    # key >= range_end: refused without the broadcaster, but only after the earlier create's answer.
    refused_id, op, _body = translator.take_request(_create(key=b"b", range_end=b"a"))
    assert op == "watch_ping"
    assert translator.on_response(first, STATUS_PARTIAL, _answer(0, created=True))[0]["created"]
    (refusal,) = translator.on_response(refused_id, STATUS_OK, {"header": HEADER, "stream_epoch": 9,
                                                                "watch_ids": [0]})
    assert refusal == {"header": HEADER, "watch_id": NO_WATCH_ID, "created": True, "canceled": True,
                       "cancel_reason": "mvcc: watcher range is empty"}
    duplicate = translator.take_request(_create(key=b"a", watch_id=0))[0]
    (answer,) = translator.on_response(duplicate, STATUS_OK, _answer(0, created=True, canceled=True,
                                                                     cancel_reason="mvcc: duplicate watch ID"))
    assert answer["watch_id"] == NO_WATCH_ID and answer["canceled"]
    failing = translator.take_request(_create(key=b"a"))[0]
    (answer,) = translator.on_response(failing, STATUS_ERROR, {"code": "TooManyRequests", "message": "too many"})
    assert answer["created"] and answer["canceled"] and answer["cancel_reason"] == "too many"
    assert answer["watch_id"] == NO_WATCH_ID and answer["header"] == HEADER
    assert translator.live == {0}


def test_translator_notices_a_lost_broadcaster_stream():
    translator = WatchTranslator(HEADER)
    create_id = translator.take_request(_create(key=b"a"))[0]
    translator.on_response(create_id, STATUS_PARTIAL, _answer(3, created=True))
    ping_id = translator.take_ping()[0]
    assert translator.on_response(ping_id, STATUS_OK, {"header": HEADER, "stream_epoch": 9, "watch_ids": [3]}) == []
    assert translator.ping_id is None
    ping_id = translator.take_ping()[0]
    with pytest.raises(BroadcasterLostError):  # same broadcaster, but it dropped our stream
        translator.on_response(ping_id, STATUS_OK, {"header": HEADER, "stream_epoch": 9, "watch_ids": []})
    # A create sent to a broadcaster that died before answering it: a later
    # ping answered (by the new one, whose epoch is the first this stream sees)
    # before the create means the create is lost; the client must not wait for ever.
    lost_create = WatchTranslator(HEADER)
    lost_create.take_request(_create(key=b"a"))
    ping_id = lost_create.take_ping()[0]
    with pytest.raises(BroadcasterLostError):
        lost_create.on_response(ping_id, STATUS_OK, {"header": HEADER, "stream_epoch": 10, "watch_ids": []})
    restarted = WatchTranslator(HEADER)
    create_id = restarted.take_request(_create(key=b"a"))[0]
    restarted.on_response(create_id, STATUS_PARTIAL, _answer(0, created=True))
    with pytest.raises(BroadcasterLostError):
        restarted.on_response(create_id, STATUS_PARTIAL, _answer(0, epoch=10))


def test_watch_responses_become_etcds_messages():
    kv = {"key": b"k", "create_revision": 2, "mod_revision": 3, "version": 2, "value": b"v", "lease": 0}
    prev = dict(kv, mod_revision=2, version=1, value=b"u")
    message = to_message(pb.WatchResponse, _answer(5, compact_revision=0, fragment=True,
                                                   events=[{"type": 0, "kv": kv, "prev_kv": prev},
                                                           {"type": 1, "kv": {"key": b"k", "mod_revision": 4}}]))
    assert message.watch_id == 5 and message.fragment and message.header.revision == 7
    assert message.events[0].kv.value == b"v" and message.events[0].prev_kv.value == b"u"
    assert message.events[1].type == message.events[1].DELETE and not message.events[1].HasField("prev_kv")


# ---- one stream's pump, on a fake broadcaster and a fake clock ------------------
#
# Goal: the handler thread's loop (WatchStream._pump) keeps its liveness rules
# whatever pace the gRPC client reads at. Method: a ROUTER on inproc stands in
# for the broadcaster; the module's clock is replaced by one the test moves,
# so that "the client took a second to read this" costs no real time.


class FakeClock:
    def __init__(self):
        self.now_s = 1000.0

    def monotonic(self) -> float:
        return self.now_s


class FakeCall:
    """A grpc servicer context that is always active and moves the clock a little per look."""

    def __init__(self, clock: FakeClock, step_s: float = 0.0):
        self.clock = clock
        self.step_s = step_s

    def is_active(self) -> bool:
        self.clock.now_s += self.step_s
        return True


@pytest.fixture
def pump_link(monkeypatch):
    """(stream, dealer, requests socket, router standing in for the broadcaster, clock)."""
    import types

    import zmq

    from actors import grpc_watch

    clock = FakeClock()
    monkeypatch.setattr(grpc_watch, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    context = zmq.Context()
    front = types.SimpleNamespace(stopping=False, gateway=types.SimpleNamespace(
        context=context, core=types.SimpleNamespace(cluster_id=1, member_id=2)))
    stream = grpc_watch.WatchStream(front, FakeCall(clock))
    router = context.socket(zmq.ROUTER)
    dealer = context.socket(zmq.DEALER)
    requests = context.socket(zmq.PAIR)
    try:
        router.bind(f"inproc://fake-broadcaster-{id(stream)}")
        dealer.setsockopt(zmq.ROUTING_ID, b"stream")
        dealer.setsockopt(zmq.RCVHWM, grpc_watch.WATCH_RECEIVE_FRAMES_MAX)
        dealer.connect(f"inproc://fake-broadcaster-{id(stream)}")
        requests.bind(stream.requests_address)
        yield stream, dealer, requests, router, clock
    finally:
        for socket in (router, dealer, requests):
            socket.close(linger=0)
        context.term()


def test_a_slow_grpc_reader_is_not_taken_for_a_lost_broadcaster(pump_link):
    """Goal: a client that reads slowly (the handler thread waits in its
    yields) keeps its stream while the broadcaster keeps sending; the stream
    ends UNAVAILABLE only when the broadcaster is silent past the ping
    timeout. Method: queue a created answer and 40 event frames; read one
    response per fake second; the broadcaster leaves the ping unanswered
    (its answer would queue behind the events). Then nothing more comes."""
    from actors import grpc_watch
    from protocol import codec

    stream, dealer, requests, router, clock = pump_link
    request_id, op, body = stream.translator.take_request(_create(key=b"a"))
    dealer.send(codec.encode_request_frame([[request_id, op, body]]))
    assert router.poll(WAIT_S * 1000)
    identity, _frame = router.recv_multipart()
    kv = {"key": b"a", "create_revision": 2, "mod_revision": 2, "version": 1, "value": b"v", "lease": 0}
    frames = [[request_id, STATUS_PARTIAL, _answer(0, created=True)]]
    frames += [[request_id, STATUS_PARTIAL, _answer(0, events=[{"type": 0, "kv": kv}])] for _ in range(40)]
    for frame in frames:
        router.send_multipart([identity, codec.encode_response_frame([frame])])
    pump = stream._pump(dealer, requests)
    for count in range(len(frames)):
        response = next(pump)  # a BroadcasterLostError here is the bug
        assert (response.created, len(response.events)) == ((True, 0) if count == 0 else (False, 1))
        clock.now_s += 1.0  # the client takes a second to read each response
    # Now the broadcaster is silent: a ping, then the ping timeout ends the stream.
    silent_since_s = clock.now_s
    stream.context.step_s = 0.5
    with pytest.raises(BroadcasterLostError):
        next(pump)
    assert clock.now_s - silent_since_s > grpc_watch.WATCH_PING_TIMEOUT_S
    assert router.poll(WAIT_S * 1000)
    (_request_id, op, _body), = codec.decode_frame(router.recv_multipart()[1], 1 << 20, 16)
    assert op == "watch_ping"


def test_watch_streams_bind_a_new_inproc_address_each(pump_link):
    """Goal: a stream never binds the inproc address of one just closed
    (ZeroMQ frees it later, in its reaper: the bind would fail). Method:
    make streams one after another, each dropped before the next, as
    sequential RPCs do, and compare their addresses."""
    from actors import grpc_watch

    stream = pump_link[0]
    addresses = {stream.requests_address}
    for _ in range(5):
        addresses.add(grpc_watch.WatchStream(stream.front, stream.context).requests_address)
    assert len(addresses) == 6


# ---- real nodes, etcd's generated stubs ---------------------------------------------

WAIT_S = 10.0


class GrpcWatch:
    """One Watch stream: send WatchRequests, receive WatchResponses with a deadline."""

    def __init__(self, channel):
        self.requests: queue.Queue = queue.Queue()
        self.responses: queue.Queue = queue.Queue()
        self.call = pb_grpc.WatchStub(channel).Watch(iter(self.requests.get, None))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for response in self.call:
                self.responses.put(response)
        except grpc.RpcError as error:
            self.responses.put(error)

    def send(self, **request):
        self.requests.put(pb.WatchRequest(**request))

    def create(self, **fields):
        self.send(create_request=pb.WatchCreateRequest(**fields))

    def recv(self, timeout_s: float = WAIT_S):
        """The next response; an RpcError that ended the stream is raised; None if nothing came."""
        try:
            response = self.responses.get(timeout=timeout_s)
        except queue.Empty:
            return None
        if isinstance(response, grpc.RpcError):
            raise response
        return response

    def events(self, count: int, timeout_s: float = WAIT_S) -> list:
        """Responses until `count` events came (progress responses dropped), joining fragments."""
        deadline = time.monotonic() + timeout_s
        events = []
        while len(events) < count:
            response = self.recv(max(0.0, deadline - time.monotonic()))
            assert response is not None, f"got {len(events)} of {count} events"
            events.extend(response.events)
        return events

    def close(self):
        self.call.cancel()


@pytest.fixture
def channel(node):
    with grpc.insecure_channel(f"127.0.0.1:{node.client_port}") as channel:
        yield channel


def test_watch_stream_creates_delivers_filters_and_cancels(node, channel):
    """Goal: a Watch stream behaves as etcd 3.4's: created responses in the
    order of the creates (ids assigned from 0, or the client's), events with
    prev_kv from a start revision, filters, a progress answer, one canceled
    response per cancel, refused creates. Method: etcd's generated stubs on a
    real node; the same requests were checked against a real etcd 3.4."""
    kv = pb_grpc.KVStub(channel)
    for value in (b"1", b"2", b"3"):
        kv.Put(pb.PutRequest(key=b"a", value=value))  # revisions 2..4
    watch = GrpcWatch(channel)
    try:
        watch.send(progress_request=pb.WatchProgressRequest())  # no watch yet: answered at once, as etcd 3.4
        alone = watch.recv()
        assert (alone.watch_id, alone.header.revision, alone.created) == (-1, 4, False)
        watch.create(key=b"a", start_revision=3, prev_kv=True)
        watch.create(key=b"p/", range_end=b"p0", filters=[pb.WatchCreateRequest.NODELETE])
        watch.create(key=b"a", watch_id=7)
        watch.create(key=b"a", watch_id=7)
        watch.create(key=b"z", range_end=b"a")
        created, other = [], []
        while len(created) < 5:  # watch 0's history may come between them
            response = watch.recv()
            assert response is not None, created
            (created if response.created else other).append(response)
        assert [(r.watch_id, r.canceled) for r in created] == \
            [(0, False), (1, False), (7, False), (-1, True), (-1, True)]
        assert created[3].cancel_reason == "mvcc: duplicate watch ID provided on the WatchStream"
        assert created[4].cancel_reason == "mvcc: watcher range is empty"
        assert all(r.header.revision == 4 and r.header.member_id and r.header.cluster_id for r in created)
        # Revisions 3 and 4 of watch 0, from the store, in one response or more
        # (how events are grouped into responses is not fixed, in etcd either).
        history = []
        while len(history) < 2:
            response = other.pop(0) if other else watch.recv()
            assert response is not None and response.watch_id == 0, response
            history.extend(response.events)
        assert [(e.kv.value, e.prev_kv.value, e.kv.mod_revision) for e in history] == [(b"2", b"1", 3),
                                                                                      (b"3", b"2", 4)]
        kv.Put(pb.PutRequest(key=b"p/x", value=b"v"))
        kv.DeleteRange(pb.DeleteRangeRequest(key=b"p/x"))  # filtered for watch 1
        kv.Put(pb.PutRequest(key=b"p/y", value=b"w"))
        seen = []
        while len(seen) < 2:
            response = watch.recv()
            assert response is not None and response.watch_id == 1, response
            seen.extend((e.type, e.kv.key) for e in response.events)
        assert seen == [(0, b"p/x"), (0, b"p/y")]
        watch.send(progress_request=pb.WatchProgressRequest())
        progress = watch.recv()
        assert progress.watch_id == -1 and not progress.events and progress.header.revision == 7
        watch.send(cancel_request=pb.WatchCancelRequest(watch_id=1))
        watch.send(cancel_request=pb.WatchCancelRequest(watch_id=99))  # unknown: no answer, as etcd
        canceled = watch.recv()
        assert (canceled.watch_id, canceled.canceled, canceled.created) == (1, True, False)
        kv.Put(pb.PutRequest(key=b"a", value=b"4"))
        after = [watch.recv(), watch.recv()]
        assert sorted(r.watch_id for r in after) == [0, 7]
        assert watch.recv(0.5) is None
    finally:
        watch.close()


def test_watch_canceled_by_compaction_and_progress_notify(node_factory):
    """Goal: a create below the compaction point is created then canceled with
    compact_revision (etcd's order); a progress_notify watch gets etcd's
    empty progress responses. Method: compact, create from revision 1; a node
    with a 200 ms --watch-progress-notify-interval."""
    node = node_factory(extra_args=("--watch-progress-notify-interval", "200ms"))
    with grpc.insecure_channel(f"127.0.0.1:{node.client_port}") as channel:
        kv = pb_grpc.KVStub(channel)
        for value in (b"1", b"2", b"3"):
            kv.Put(pb.PutRequest(key=b"a", value=value))
        kv.Compact(pb.CompactionRequest(revision=3))
        watch = GrpcWatch(channel)
        try:
            watch.create(key=b"a", start_revision=1)
            created, canceled = watch.recv(), watch.recv()
            assert created.created and not created.canceled
            assert (canceled.watch_id, canceled.canceled, canceled.compact_revision) == (created.watch_id, True, 3)
            watch.create(key=b"b", progress_notify=True)
            assert watch.recv().created
            notes = [watch.recv(), watch.recv()]
            assert all(n.watch_id == 1 and not n.events and not n.canceled and n.header.revision == 4 for n in notes)
        finally:
            watch.close()


def test_watch_fragments_a_large_revision_when_asked(node_factory):
    """Goal: `fragment` splits one revision larger than a watch response into
    pieces marked fragment, the last one not; without it the revision comes
    whole. Method: a txn of four 900 KiB values (one revision) on a node that
    takes 4 MiB requests, watched both ways."""
    node = node_factory(extra_args=("--max-request-bytes", str(4 << 20)))
    options = [("grpc.max_send_message_length", 8 << 20), ("grpc.max_receive_message_length", 16 << 20)]
    with grpc.insecure_channel(f"127.0.0.1:{node.client_port}", options=options) as channel:
        watch = GrpcWatch(channel)
        try:
            watch.create(key=b"f/", range_end=b"f0", fragment=True)
            watch.create(key=b"f/", range_end=b"f0")
            assert watch.recv().created and watch.recv().created
            puts = [pb.RequestOp(request_put=pb.PutRequest(key=b"f/%d" % i, value=bytes([i]) * (900 << 10)))
                    for i in range(4)]
            pb_grpc.KVStub(channel).Txn(pb.TxnRequest(success=puts), timeout=30)
            by_watch = {0: [], 1: []}
            while sum(len(pieces) and not pieces[-1].fragment for pieces in by_watch.values()) < 2:
                response = watch.recv(30)
                assert response is not None
                by_watch[response.watch_id].append(response)
            fragments, whole = by_watch[0], by_watch[1]
            assert len(fragments) > 1 and all(r.fragment for r in fragments[:-1])
            assert [e.kv.key for r in fragments for e in r.events] == [b"f/0", b"f/1", b"f/2", b"f/3"]
            assert len(whole) == 1 and len(whole[0].events) == 4
        finally:
            watch.close()


def _anonymous_memory_kib(pids) -> int:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1])
    return total


def test_slow_watch_reader_is_held_back_not_buffered(node):
    """Goal: a gRPC watcher that does not read costs the gateways bounded
    memory, and loses nothing. Method: a stream whose client reads nothing
    while 64 MiB of events are written (32 KiB values); the gateways'
    anonymous memory must grow by far less than that; then the client reads
    and gets every event, in order, once."""
    gateways = [pid for name, pid in node.actor_pids().items() if name.startswith("gateway")]
    with grpc.insecure_channel(f"127.0.0.1:{node.client_port}") as channel:
        kv = pb_grpc.KVStub(channel)
        requests: queue.Queue = queue.Queue()
        call = pb_grpc.WatchStub(channel).Watch(iter(requests.get, None))
        requests.put(pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"s/", range_end=b"s0")))
        assert next(call).created
        before = _anonymous_memory_kib(gateways)
        value = b"x" * (32 << 10)
        count = 2048
        for i in range(count):
            kv.Put(pb.PutRequest(key=b"s/%05d" % i, value=value))
        grown_kib = _anonymous_memory_kib(gateways) - before
        assert grown_kib < 24 << 10, f"gateways grew {grown_kib} KiB while the watcher did not read"
        keys = []
        deadline = time.monotonic() + 60
        while len(keys) < count and time.monotonic() < deadline:
            keys.extend(event.kv.key for event in next(call).events)
        call.cancel()
        assert keys == [b"s/%05d" % i for i in range(count)]


def test_watch_stream_ends_unavailable_when_the_broadcaster_restarts(node, channel):
    """Goal: a broadcaster restart loses the stream's watches; the RPC ends
    with UNAVAILABLE (etcd's clients then watch again from their last
    revision + 1) instead of going quiet. Method: kill -9 the broadcaster
    under an open stream."""
    watch = GrpcWatch(channel)
    try:
        watch.create(key=b"a")
        assert watch.recv().created
        os.kill(node.actor_pids()["watch_broadcaster"], signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as raised:
            while True:
                assert watch.recv() is not None, "the stream neither ended nor answered"
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        watch.close()


def test_lock_service_queues_holders_and_releases_on_cancel(node, channel):
    """Goal: v3lock as etcd's server: Lock answers the key name/<lease hex>
    and the header of the acquiring txn; a second lease waits until the first
    unlocks; a Lock whose RPC ends while waiting leaves no key behind; a lease
    that does not exist is etcd's error. Method: etcd's stubs, two leases."""
    lease = pb_grpc.LeaseStub(channel)
    lock = lpb_grpc.LockStub(channel)
    kv = pb_grpc.KVStub(channel)
    first, second, third = (lease.LeaseGrant(pb.LeaseGrantRequest(TTL=60)).ID for _ in range(3))
    held = lock.Lock(lpb.LockRequest(name=b"l", lease=first), timeout=WAIT_S)
    assert held.key == b"l/%x" % first
    assert held.header.revision == kv.Range(pb.RangeRequest(key=held.key)).kvs[0].create_revision
    assert lock.Lock(lpb.LockRequest(name=b"l", lease=first), timeout=WAIT_S).key == held.key  # same lease: held
    waiting = lock.Lock.future(lpb.LockRequest(name=b"l", lease=second), timeout=30)
    # Once its key is queued it must still be waiting (the key holds the lock's place).
    deadline = time.monotonic() + WAIT_S
    while not kv.Range(pb.RangeRequest(key=b"l/%x" % second)).kvs:
        assert time.monotonic() < deadline, "the waiting Lock never queued its key"
        time.sleep(0.05)
    assert not waiting.done()
    with pytest.raises(grpc.RpcError) as raised:
        lock.Lock(lpb.LockRequest(name=b"l", lease=third), timeout=1.0)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    unlocked = lock.Unlock(lpb.UnlockRequest(key=held.key), timeout=WAIT_S)
    assert unlocked.header.revision > held.header.revision
    taken = waiting.result(timeout=WAIT_S)
    assert taken.key == b"l/%x" % second and taken.header.revision >= unlocked.header.revision
    deadline = time.monotonic() + WAIT_S
    while kv.Range(pb.RangeRequest(key=b"l/%x" % third)).kvs and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not kv.Range(pb.RangeRequest(key=b"l/%x" % third)).kvs, "the timed-out Lock left its key"
    with pytest.raises(grpc.RpcError) as raised:
        lock.Lock(lpb.LockRequest(name=b"l2", lease=12345), timeout=WAIT_S)
    assert (raised.value.code(), raised.value.details()) == \
        (grpc.StatusCode.UNKNOWN, "etcdserver: requested lease not found")
    # No lease: as etcd's NewSession, the server grants one of 60 s (and does not renew it).
    unleased = lock.Lock(lpb.LockRequest(name=b"l3"), timeout=WAIT_S)
    granted = int(unleased.key.split(b"/")[1], 16)
    assert lease.LeaseTimeToLive(pb.LeaseTimeToLiveRequest(ID=granted)).grantedTTL == 60


def test_election_service_campaign_proclaim_observe_resign(node, channel):
    """Goal: v3election as etcd's server: LeaderKey fields, Proclaim guarded by
    the key's create revision, Leader and an Observe stream that starts with
    the current leader, Resign handing over to the next campaigner, etcd's
    error texts. Method: etcd's stubs, two leases; expected values checked
    against a real etcd 3.4 with the same calls."""
    lease = pb_grpc.LeaseStub(channel)
    election = epb_grpc.ElectionStub(channel)
    first, second = (lease.LeaseGrant(pb.LeaseGrantRequest(TTL=60)).ID for _ in range(2))
    with pytest.raises(grpc.RpcError) as raised:
        election.Leader(epb.LeaderRequest(name=b"e"), timeout=WAIT_S)
    assert (raised.value.code(), raised.value.details()) == (grpc.StatusCode.UNKNOWN, "election: no leader")
    won = election.Campaign(epb.CampaignRequest(name=b"e", lease=first, value=b"v1"), timeout=WAIT_S)
    assert (won.leader.name, won.leader.key, won.leader.lease) == (b"e", b"e/%x" % first, first)
    assert won.leader.rev == won.header.revision
    leader = election.Leader(epb.LeaderRequest(name=b"e"), timeout=WAIT_S).kv
    assert (leader.key, leader.value, leader.create_revision, leader.lease) == (won.leader.key, b"v1",
                                                                                 won.leader.rev, first)
    observe = election.Observe(epb.LeaderRequest(name=b"e"), timeout=30)
    assert next(observe).kv.value == b"v1"
    proclaimed = election.Proclaim(epb.ProclaimRequest(leader=won.leader, value=b"v2"), timeout=WAIT_S)
    assert next(observe).kv.value == b"v2"
    assert proclaimed.header.revision == won.header.revision + 1
    stale = epb.LeaderKey(name=b"e", key=won.leader.key, rev=1, lease=first)
    with pytest.raises(grpc.RpcError) as raised:
        election.Proclaim(epb.ProclaimRequest(leader=stale, value=b"x"), timeout=WAIT_S)
    assert (raised.value.code(), raised.value.details()) == (grpc.StatusCode.UNKNOWN, "election: not leader")
    with pytest.raises(grpc.RpcError) as raised:
        election.Resign(epb.ResignRequest(), timeout=WAIT_S)
    assert raised.value.details() == '"leader" field must be provided'
    unleased = election.Campaign(epb.CampaignRequest(name=b"e2", value=b"x"), timeout=WAIT_S).leader
    assert unleased.lease and unleased.key == b"e2/%x" % unleased.lease
    waiting = election.Campaign.future(epb.CampaignRequest(name=b"e", lease=second, value=b"w"), timeout=30)
    election.Resign(epb.ResignRequest(leader=stale), timeout=WAIT_S)  # not ours: a no-op answered OK
    election.Resign(epb.ResignRequest(leader=won.leader), timeout=WAIT_S)
    next_leader = waiting.result(timeout=WAIT_S)
    assert next_leader.leader.key == b"e/%x" % second
    assert next(observe).kv.key == b"e/%x" % second
    observe.cancel()


def test_member_ops_answer_etcds_errors_and_kv_goes_on(node, channel):
    """Goal: the Cluster and MoveLeader RPCs reach the core's membership checks
    and come back with etcd's status codes and texts (not by hanging or
    crashing the gateway). Method: one change each that a one-member cluster
    must refuse; KV still answers after."""
    maintenance = pb_grpc.MaintenanceStub(channel)
    cluster = pb_grpc.ClusterStub(channel)
    own_peer_urls = list(cluster.MemberList(pb.MemberListRequest(), timeout=WAIT_S).members[0].peerURLs)
    refused = [
        (lambda: maintenance.MoveLeader(pb.MoveLeaderRequest(targetID=1), timeout=WAIT_S),
         grpc.StatusCode.FAILED_PRECONDITION, "etcdserver: bad leader transferee"),
        (lambda: cluster.MemberAdd(pb.MemberAddRequest(peerURLs=own_peer_urls), timeout=WAIT_S),
         grpc.StatusCode.FAILED_PRECONDITION, "etcdserver: member ID already exist"),
        (lambda: cluster.MemberRemove(pb.MemberRemoveRequest(ID=1), timeout=WAIT_S),
         grpc.StatusCode.NOT_FOUND, "etcdserver: member not found"),
        (lambda: cluster.MemberUpdate(pb.MemberUpdateRequest(ID=1, peerURLs=["http://a:1"]), timeout=WAIT_S),
         grpc.StatusCode.NOT_FOUND, "etcdserver: member not found"),
        (lambda: cluster.MemberPromote(pb.MemberPromoteRequest(ID=1), timeout=WAIT_S),
         grpc.StatusCode.NOT_FOUND, "etcdserver: member not found"),
    ]
    for call, code, text in refused:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert (caught.value.code(), caught.value.details()) == (code, text)
    assert pb_grpc.KVStub(channel).Put(pb.PutRequest(key=b"a", value=b"1"), timeout=WAIT_S).header.revision == 2


def test_member_list_over_grpc(node, channel):
    """Goal: Cluster.MemberList answers etcd's Member fields for this node.
    Method: etcd's stubs on a one-member node."""
    cluster = pb_grpc.ClusterStub(channel)
    status = pb_grpc.MaintenanceStub(channel).Status(pb.StatusRequest(), timeout=WAIT_S)
    # The node answers before its publish (name, client URLs) is applied; etcd would not.
    deadline = time.monotonic() + WAIT_S
    while not (members := cluster.MemberList(pb.MemberListRequest(), timeout=WAIT_S)).members[0].clientURLs:
        assert time.monotonic() < deadline, "the member never published its client URLs"
        time.sleep(0.1)  # polling the node for a state
    assert members.header.member_id == status.header.member_id
    (member,) = members.members
    assert member.ID == status.header.member_id and member.name == "test-node" and not member.isLearner
    assert member.clientURLs and member.peerURLs


def test_hash_over_grpc(node, channel):
    """Goal: Maintenance.Hash answers a uint32 with this member's header.
    Method: etcd's stubs."""
    maintenance = pb_grpc.MaintenanceStub(channel)
    status = maintenance.Status(pb.StatusRequest(), timeout=WAIT_S)
    hashed = maintenance.Hash(pb.HashRequest(), timeout=WAIT_S)
    assert hashed.header.member_id == status.header.member_id and hashed.hash


def _thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_watch_streams_are_bounded_and_leave_nothing_behind(node):
    """Goal: a gateway serves at most WATCH_STREAMS_MAX watch streams (then
    RESOURCE_EXHAUSTED, not a hang), and streams that end give back their
    slot at once and their reader threads. Method: one channel (one
    connection, so one gateway) opens the maximum and one more, three times
    over, canceling all in between; the gateways never hold more threads
    than the handler pool's bound plus their own (leaked readers would add
    WATCH_STREAMS_MAX a round)."""
    from actors.grpc_front import WORKER_THREADS
    from actors.grpc_watch import WATCH_STREAMS_MAX

    gateways = [pid for name, pid in node.actor_pids().items() if name.startswith("gateway")]
    baseline = sum(_thread_count(pid) for pid in gateways)
    with grpc.insecure_channel(f"127.0.0.1:{node.client_port}") as channel:
        for _round in range(3):
            streams = [GrpcWatch(channel) for _ in range(WATCH_STREAMS_MAX)]
            for stream in streams:
                stream.create(key=b"a")
            answers = [stream.recv() for stream in streams]
            assert all(answer is not None and answer.created for answer in answers)
            extra = GrpcWatch(channel)
            with pytest.raises(grpc.RpcError) as raised:
                extra.create(key=b"a")
                extra.recv()
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for stream in streams:
                stream.close()
            deadline = time.monotonic() + 20
            while sum(_thread_count(pid) for pid in gateways) > baseline + WORKER_THREADS + 2:
                assert time.monotonic() < deadline, (sum(_thread_count(pid) for pid in gateways), baseline)
                time.sleep(0.1)


def test_watch_and_lock_through_a_follower(tmp_path):
    """Goal: a follower serves Watch, Lock and Election over gRPC as the
    leader does: a watch on a follower sees writes made through the leader
    (with the follower's member id in its headers), and locks taken through
    two members queue on one another. Method: a 3-member cluster; etcd's
    stubs on the leader's and a follower's client ports."""
    from tests.cluster_harness import Cluster

    with Cluster(str(tmp_path), 3) as cluster:
        cluster.start()
        leader = cluster.wait_for_leader()
        follower = next(name for name in cluster.names if name != leader)
        to_leader = grpc.insecure_channel(f"127.0.0.1:{cluster.members[leader].client_port}")
        to_follower = grpc.insecure_channel(f"127.0.0.1:{cluster.members[follower].client_port}")
        with to_leader, to_follower:
            watch = GrpcWatch(to_follower)
            try:
                watch.create(key=b"c/", range_end=b"c0")
                created = watch.recv()
                assert created.created and created.header.member_id == cluster.member_ids[follower]
                pb_grpc.KVStub(to_leader).Put(pb.PutRequest(key=b"c/1", value=b"v"), timeout=WAIT_S)
                (event,) = watch.events(1)
                assert (event.kv.key, event.kv.value) == (b"c/1", b"v")
            finally:
                watch.close()
            leases = [pb_grpc.LeaseStub(channel).LeaseGrant(pb.LeaseGrantRequest(TTL=60), timeout=WAIT_S).ID
                      for channel in (to_leader, to_follower)]
            held = lpb_grpc.LockStub(to_leader).Lock(lpb.LockRequest(name=b"m", lease=leases[0]), timeout=WAIT_S)
            waiting = lpb_grpc.LockStub(to_follower).Lock.future(lpb.LockRequest(name=b"m", lease=leases[1]),
                                                                 timeout=30)
            kv = pb_grpc.KVStub(to_follower)
            deadline = time.monotonic() + WAIT_S
            while not kv.Range(pb.RangeRequest(key=b"m/%x" % leases[1])).kvs:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert not waiting.done()
            lpb_grpc.LockStub(to_follower).Unlock(lpb.UnlockRequest(key=held.key), timeout=WAIT_S)
            assert waiting.result(timeout=WAIT_S).key == b"m/%x" % leases[1]


def test_watch_stream_keeps_sending_after_the_client_half_closes(node, channel):
    """Goal: as etcd's server, a client that closes its sending side keeps
    receiving its watches' events. Method: a request iterator that ends
    after one create; then a write."""
    create = pb.WatchRequest(create_request=pb.WatchCreateRequest(key=b"h"))
    call = pb_grpc.WatchStub(channel).Watch(iter([create]), timeout=30)
    try:
        assert next(call).created
        pb_grpc.KVStub(channel).Put(pb.PutRequest(key=b"h", value=b"v"), timeout=WAIT_S)
        assert [event.kv.value for event in next(call).events] == [b"v"]
    finally:
        call.cancel()
