"""Snapshot transfer with real processes: a follower too far behind gets the
leader's store, streamed in chunks, then the log after it.

Goal: (1) a follower paused (SIGSTOP) while the others write far more than
the catch-up entries past a snapshot marker comes back, is sent the store,
installs it, catches up from the log: HashKV equal on every member, every
acknowledged write readable on it at its revision, and a watch through the
lagging member delivers every write of its prefix in revision order with no
gap. (2) kill -9 of the receiving follower in the middle of a transfer,
then a restart: the transfer is retried and completes, same checks. (3) a
watch on the lagging member behind the leader's compaction point is
canceled with compact_revision, not moved past the gap.

Method: tests/cluster_harness.Cluster with small limits from flags
(--snapshot-count, --experimental-snapshot-catchup-entries) so a few hundred
writes are enough; values of a few KiB so the store spans several chunks.
Progress is observed through the members' log lines (conditions polled with
a deadline, no sleeps standing in for synchronisation); the transfer is
caught midway with the follower's `<data-dir>/snapshot-hold` hook
(actors/snapshot_stream.py), which makes it take the first chunk only.
"""

from __future__ import annotations

import os
import time

import pytest

from actors.snapshot_stream import SNAPSHOT_HOLD_FILE
from protocol.client import Client, CompactedError
from protocol.watch import watch
from tests.cluster_harness import POLL_S, Cluster, WatchRecorder, hashes_agree

SNAPSHOT_ARGS = ("--snapshot-count", "100", "--experimental-snapshot-catchup-entries", "50")
WRITES = 400
VALUE_BYTES = 8 * 1024
PREFIX = b"snap/"
WAIT_S = 60.0


def wait_for_log(cluster: Cluster, name: str, text: str, timeout_s: float = WAIT_S, count: int = 1) -> None:
    node = cluster.members[name]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(node.log_path, encoding="utf-8", errors="replace") as handle:
            if handle.read().count(text) >= count:
                return
        time.sleep(POLL_S)
    raise AssertionError(f"{name}: no {text!r} in its log within {timeout_s}s\n{cluster.log_tails(40)}")


def write_many(cluster: Cluster, leader: str, count: int, start: int = 0) -> dict[bytes, tuple[bytes, int]]:
    """Sequential puts (one entry each) through the leader: key -> (value, revision)."""
    written = {}
    with Client([cluster.endpoints[leader]], timeout_s=10.0, discover_gateways=False) as client:
        for number in range(start, start + count):
            key = PREFIX + b"%05d" % number
            value = (b"%05d-" % number) * (VALUE_BYTES // 6)
            response = client.put(key, value)
            written[key] = (value, response["header"]["revision"])
    return written


def check_member(cluster: Cluster, name: str, written: dict) -> None:
    with Client([cluster.endpoints[name]], timeout_s=10.0, discover_gateways=False) as client:
        for key, (value, revision) in written.items():
            kvs = client.get(key, revision=revision, serializable=True).get("kvs") or []
            assert kvs and kvs[0]["value"] == value and kvs[0]["mod_revision"] == revision, (name, key)
    _revision, hashes, problems = hashes_agree(cluster)
    assert not problems, problems


def check_watch(recorder: WatchRecorder, written: dict) -> None:
    want = sorted(revision for _value, revision in written.values())
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and len(recorder.events) < len(want) and not recorder.errors:
        time.sleep(POLL_S)
    assert not recorder.errors, recorder.errors
    got = [revision for revision, _key, _value in recorder.events]
    assert got == want, f"watch through {recorder.member}: {len(got)} events, gaps or repeats"


def follower_of(cluster: Cluster, leader: str) -> str:
    return next(name for name in cluster.names if name != leader)


def test_a_paused_follower_is_sent_a_snapshot_and_catches_up(tmp_path):
    with Cluster(str(tmp_path), 3, extra_args=SNAPSHOT_ARGS).start() as cluster:
        leader = cluster.wait_for_leader()
        lagging = follower_of(cluster, leader)
        recorder = WatchRecorder(lagging, cluster.endpoints[lagging], PREFIX)
        recorder.start()
        try:
            written = write_many(cluster, leader, 5)
            cluster.wait_for_revision(max(revision for _value, revision in written.values()))
            cluster.pause_member(lagging)
            written.update(write_many(cluster, leader, WRITES, start=5))
            wait_for_log(cluster, leader, "snapshot marker written", count=2)
            started = time.monotonic()
            cluster.resume_member(lagging)
            wait_for_log(cluster, lagging, "raft log reset to an installed snapshot")
            wait_for_log(cluster, leader, "snapshot sent and installed")
            print(f"snapshot transfer and install took {time.monotonic() - started:.2f}s after resume")
            written.update(write_many(cluster, leader, 20, start=WRITES + 5))
            check_member(cluster, lagging, written)
            check_watch(recorder, written)
        finally:
            recorder.stop()


def test_a_follower_killed_mid_transfer_gets_the_snapshot_after_restart(tmp_path):
    with Cluster(str(tmp_path), 3, extra_args=SNAPSHOT_ARGS).start() as cluster:
        leader = cluster.wait_for_leader()
        lagging = follower_of(cluster, leader)
        written = write_many(cluster, leader, 5)
        cluster.wait_for_revision(max(revision for _value, revision in written.values()))
        cluster.kill_member(lagging)
        written.update(write_many(cluster, leader, WRITES, start=5))
        wait_for_log(cluster, leader, "snapshot marker written", count=2)
        hold = os.path.join(cluster.members[lagging].data_dir, SNAPSHOT_HOLD_FILE)
        with open(hold, "w", encoding="utf-8"):
            pass
        cluster.start_member(lagging)
        wait_for_log(cluster, lagging, "snapshot first chunk received")
        cluster.kill_member(lagging)  # kill -9 with a partial file on disk
        os.remove(hold)
        cluster.start_member(lagging)
        wait_for_log(cluster, lagging, "raft log reset to an installed snapshot")
        wait_for_log(cluster, leader, "snapshot sent and installed")
        snap_dir = os.path.join(cluster.members[lagging].data_dir, "snap")
        assert not [name for name in os.listdir(snap_dir) if name.startswith("incoming-")]
        written.update(write_many(cluster, leader, 20, start=WRITES + 5))
        check_member(cluster, lagging, written)
        recorder = WatchRecorder(lagging, cluster.endpoints[lagging], PREFIX)
        recorder.start()
        try:
            check_watch(recorder, written)
        finally:
            recorder.stop()


def test_a_watch_behind_the_snapshots_compaction_point_is_canceled_not_skipped(tmp_path):
    """Goal: a watcher on the lagging member whose next revision the leader
    compacted away while the member was paused is canceled with
    compact_revision (as for compaction), never moved forward silently.
    Method: watch from the current revision + 1 through the member, pause it,
    write and compact on the leader, resume; the watch raises CompactedError."""
    with Cluster(str(tmp_path), 3, extra_args=SNAPSHOT_ARGS).start() as cluster:
        leader = cluster.wait_for_leader()
        lagging = follower_of(cluster, leader)
        written = write_many(cluster, leader, 5)
        last = max(revision for _value, revision in written.values())
        cluster.wait_for_revision(last)
        watcher = watch([cluster.endpoints[lagging]], PREFIX, prefix=True, start_revision=last + 1, timeout_s=2.0)
        try:
            cluster.pause_member(lagging)
            written.update(write_many(cluster, leader, WRITES, start=5))
            compact_at = max(revision for _value, revision in written.values()) - 10
            with Client([cluster.endpoints[leader]], timeout_s=10.0, discover_gateways=False) as client:
                client.compact(compact_at, physical=True)
            wait_for_log(cluster, leader, "snapshot marker written", count=2)
            cluster.resume_member(lagging)
            wait_for_log(cluster, lagging, "raft log reset to an installed snapshot")
            deadline = time.monotonic() + WAIT_S
            events = []
            with pytest.raises(CompactedError) as raised:
                while time.monotonic() < deadline:  # until the cancel arrives
                    response = watcher.get(timeout_s=0.2)
                    events += (response or {}).get("events") or []
            assert raised.value.compact_revision == compact_at
            assert events == []  # nothing after the gap was delivered
        finally:
            watcher.close()
