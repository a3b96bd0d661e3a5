"""The watch broadcaster actor: serves watch streams from the MVCC history.

A thin loop around `actors.watch.core.WatchRegistry`. It binds a client
ROUTER of its own (an ephemeral port, or its previous one when free, written
to `<run dir>/watch.endpoint`; gateways announce it in `hello` as "watch"),
opens the store read-only, and learns how far the store got from the
applier's APPLIED broadcast (it connects a DEALER with the identity
b"watch_broadcaster" to applier.sock and says HELLO every second), with a
poll of the store's revision as a fallback. The HELLO says whether any
client stream is open: with none, the applier sends it no APPLIED (a write
then costs this actor nothing); the first stream's request reads the
store's revision here and says HELLO at once, and the applier answers a
HELLO with the latest APPLIED, so no revision is missed. Each pass it lets
the registry do a bounded step of fan-out and catch-up, then sends every
stream's responses as one frame.

Slow clients: the client ROUTER queues at most `watch_client_high_water_mark`
frames per client. A frame that does not fit (zmq.Again) is kept, the
stream is marked blocked (its watches stop receiving live events and are
caught up from the store once the kept frames are sent), so memory per slow
client is a few frames, never a queue of events per watch. A client that is
gone (EHOSTUNREACH) loses its watches; idle streams are probed with an empty
response frame so a vanished client is noticed.

Every response carries `stream_epoch`, a random id of this process start:
a client that sees it change knows its watches are gone and re-creates them
from the last revision it received + 1.
"""

from __future__ import annotations

import collections
import os
import random
import time

import zmq

from actors import ipc, sockets
from actors.config import NodeConfig
from actors.gateway import open_store
from actors.loop import ActorLoop
from actors.watch.core import WatchRegistry
from protocol import codec
from protocol.codec import STATUS_ERROR
from protocol.errors import QuorumError

APPLIER_HELLO_MS = 1000
PUMP_MS = 5
REVISION_POLL_MS = 100
TERM_REFRESH_MS = 1000
STREAM_PROBE_MS = 10_000
# Pump steps per pass before other sockets get a turn.
PUMP_STEPS_PER_PASS = 8
# Frames kept for one blocked client; past this the client is dropped.
MAX_KEPT_FRAMES_PER_STREAM = 64
# Responses per frame sent to a client.
MAX_RESPONSES_PER_FRAME = 1024



class Broadcaster:
    def __init__(self, config: NodeConfig, log):
        self.config = config
        self.log = log
        self.limits = config.limits()
        self.member_id = config.member_id()
        self.cluster_id = config.cluster_id()
        self.raft_term = 0
        self.context = zmq.Context()
        self.store = open_store(config)
        self.stream_epoch = random.SystemRandom().randrange(1, 1 << 63)
        self.registry = WatchRegistry(source=self.store, limits=self.limits, header=self.header,
                                      stream_epoch=self.stream_epoch)
        self.kept: dict[bytes, collections.deque] = {}
        self.client = self._bind_client_socket()
        self.applier = self.context.socket(zmq.DEALER)
        self.applier.setsockopt(zmq.ROUTING_ID, ipc.WATCH_BROADCASTER_IDENTITY)
        self.applier.setsockopt(zmq.LINGER, 0)
        self.applier.connect(ipc.applier_endpoint(config.data_dir))
        self.refresh_term()
        self.told_interested = False
        self.say_hello()

    # ---- sockets ------------------------------------------------------------

    def _bind_client_socket(self) -> zmq.Socket:
        socket = sockets.client_router(self.context, self.limits, self.limits.watch_client_high_water_mark)
        # A client that reconnects with its routing id takes its stream back.
        socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        host, _port = self.config.zmq_url()
        endpoint = sockets.bind_announced(socket, host, ipc.watch_endpoint_file(self.config.data_dir))
        self.log.info("watch broadcaster listening", endpoint=endpoint, stream_epoch=self.stream_epoch)
        return socket

    def header(self, revision: int) -> dict:
        return {"cluster_id": self.cluster_id, "member_id": self.member_id, "revision": revision,
                "raft_term": self.raft_term}

    # ---- the applier -----------------------------------------------------------

    def say_hello(self) -> None:
        # Repeated so a restarted applier learns of us (and of our interest).
        self.told_interested = bool(self.registry.streams)
        self.applier.send(codec.pack([ipc.HELLO, self.told_interested]))

    def _interest_changed(self) -> None:
        if bool(self.registry.streams) != self.told_interested:
            self.say_hello()

    def on_applier(self, batch: list) -> None:
        latest = None
        for frame in batch:
            try:
                message = codec.unpack(frame)
                if message[0] == ipc.APPLIED:
                    latest = message
            except (QuorumError, TypeError, IndexError):
                self.log.warning("malformed message from the applier dropped")
        if latest is not None:
            _kind, _applied_index, revision, generation = latest
            if generation != self.store.generation:
                self.store.reopen_if_stale(generation)
            self.refresh_term()
            self.registry.advance(revision)
            self.pump()

    def poll_revision(self) -> None:
        # A fallback for a lost APPLIED (an applier restart, a full queue).
        self.store.reopen_if_stale()
        self.registry.advance(self.store.revision())

    def refresh_term(self) -> None:
        self.raft_term = self.store.status()["raft_term"]

    # ---- clients ----------------------------------------------------------------

    def on_client(self, batch: list) -> None:
        if not self.told_interested:
            # No APPLIED came while no stream was open: catch up with the store
            # first (with no watches, the pump moves straight to its revision).
            self.poll_revision()
            self.registry.pump()
        for parts in batch:
            identity, frames = parts[0], parts[1:]
            if len(frames) != 1:
                error = QuorumError("MalformedFrame", "a message is one frame; got %d parts" % len(frames))
                self.registry.outbox.setdefault(identity, []).append([None, STATUS_ERROR, error.to_wire()])
                continue
            try:
                items = codec.decode_frame(frames[0], self.limits.max_frame_bytes,
                                           self.limits.max_requests_per_frame)
            except QuorumError as error:
                self.registry.outbox.setdefault(identity, []).append([None, STATUS_ERROR, error.to_wire()])
                continue
            for item in items:
                if not isinstance(item, list) or len(item) != 3 or not _is_plain(item[0]):
                    error = QuorumError("MalformedFrame", "a request is [request_id, op, body]")
                    self.registry.outbox.setdefault(identity, []).append([None, STATUS_ERROR, error.to_wire()])
                    continue
                self.registry.submit(identity, item[0], item[1], item[2])
        self._interest_changed()
        self.pump()

    def pump(self) -> None:
        for _ in range(PUMP_STEPS_PER_PASS):
            more = self.registry.pump()
            self.flush()
            if not more:
                break

    def flush(self) -> None:
        for identity in list(self.kept):
            self._send_kept(identity)
        for identity, responses in self.registry.take_output().items():
            frames = [codec.encode_response_frame(responses[i:i + MAX_RESPONSES_PER_FRAME])
                      for i in range(0, len(responses), MAX_RESPONSES_PER_FRAME)]
            kept = self.kept.get(identity)
            if kept is not None:
                kept.extend(frames)
                if len(kept) > MAX_KEPT_FRAMES_PER_STREAM:
                    self.log.warning("watch client not reading, stream dropped", client=identity.hex())
                    self._drop(identity)
                continue
            for index, frame in enumerate(frames):
                if not self._send(identity, frame):
                    if identity in self.registry.streams:
                        self.kept[identity] = collections.deque(frames[index:])
                        self.registry.stream_blocked(identity)
                        self.log.info("watch client slow: its watches will catch up from the store",
                                      client=identity.hex())
                    break

    def _send(self, identity: bytes, frame: bytes) -> bool:
        """True if sent; False if the client's queue is full. A gone client is dropped."""
        try:
            self.client.send_multipart([identity, frame], zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self._drop(identity)
            return True  # nothing more to do for it

    def _send_kept(self, identity: bytes) -> None:
        kept = self.kept[identity]
        while kept:
            if not self._send(identity, kept[0]):
                return
            if identity not in self.kept:
                return  # dropped
            kept.popleft()
        del self.kept[identity]
        self.registry.stream_unblocked(identity)

    def _drop(self, identity: bytes) -> None:
        self.kept.pop(identity, None)
        self.registry.drop_stream(identity)

    def probe_streams(self) -> None:
        # An empty response frame: clients ignore it; a gone client is dropped.
        empty = codec.encode_response_frame([])
        for identity in self.registry.stream_identities():
            if identity not in self.kept:
                self._send(identity, empty)

    def progress_tick(self) -> None:
        self.registry.progress_tick()
        self.flush()

    def close(self) -> None:
        self.store.close()
        self.context.destroy(linger=0)


def _is_plain(request_id) -> bool:
    return isinstance(request_id, (int, str)) and not isinstance(request_id, bool)


def run(config: NodeConfig, index: int, log) -> None:
    broadcaster = Broadcaster(config, log)
    loop = ActorLoop(log, broadcaster.limits.max_messages_per_poll, parent_pid=os.getppid())
    loop.add_socket(broadcaster.client, broadcaster.on_client)
    loop.add_socket(broadcaster.applier, broadcaster.on_applier, multipart=False)
    loop.add_timer(PUMP_MS, broadcaster.pump, active=lambda: bool(broadcaster.registry.streams))
    loop.add_timer(REVISION_POLL_MS, broadcaster.poll_revision)
    loop.add_timer(APPLIER_HELLO_MS, broadcaster.say_hello)
    loop.add_timer(TERM_REFRESH_MS, broadcaster.refresh_term)
    loop.add_timer(STREAM_PROBE_MS, broadcaster.probe_streams)
    loop.add_timer(config.watch_progress_notify_interval_ms, broadcaster.progress_tick)
    log.info("watch broadcaster started", revision=broadcaster.store.revision(), started_at=time.time())
    try:
        reason = loop.run()
        log.info("watch broadcaster stopping", reason=reason)
    finally:
        broadcaster.close()
