"""Installing a received snapshot on a follower, step by step, with crashes between steps.

Goal: each step of the install keeps the node either in its old state or in
the new one (actors/snapshot_stream.py's ordering argument): the store
switches generations only through CURRENT, after its data is in place and
checked; the WAL reset record drops the older entries on replay even when
the older segments are still there; and a store ahead of the WAL (a crash
after the store switched, before the WAL reset) is finished at start by
`finish_interrupted_install`.

Method: real LMDB stores and WALs in tmp_path; a "crash" is reopening from
disk what the previous step left there (including copies of files a later
step would have removed).
"""

from __future__ import annotations

import os
import shutil

import pytest
import structlog

from actors.config import NodeConfig
from actors.gateway import store_dir
from actors.mvcc import MvccStore
from actors.raft_log import finish_interrupted_install
from actors.wal import HardState, Wal
from protocol.limits import DEFAULT_LIMITS
from protocol.messages import validate_request

SEGMENT_BYTES = 4096
MAP_BYTES = 1 << 30


def put(index: int, key: bytes, value: bytes, term: int = 1) -> tuple:
    body = validate_request("put", {"key": key, "value": value}, DEFAULT_LIMITS)
    return (index, term, [((None, index), "put", body)])


def make_store(directory: str, entries: int, term: int = 1) -> MvccStore:
    store = MvccStore.open(directory, writer=True, map_size_bytes=MAP_BYTES, quota_backend_bytes=MAP_BYTES // 2)
    store.apply([put(index, b"k%d" % index, b"v%d" % index, term) for index in range(1, entries + 1)])
    return store


def leader_copy(tmp_path, entries: int, term: int = 2) -> str:
    leader = make_store(str(tmp_path / "leader-store"), entries, term)
    path = str(tmp_path / "copy.mdb")
    leader.copy_to(path)
    leader.close()
    return path


def test_store_install_switches_generation_and_refuses_a_mismatched_copy(tmp_path):
    follower = make_store(str(tmp_path / "store"), 3)
    bad_copy = leader_copy(tmp_path, 50)
    with pytest.raises(ValueError):
        follower.install(bad_copy, 49)  # not the index the header promised
    assert follower.applied_index() == 3 and follower.generation == 1
    copy = leader_copy(tmp_path, 50)
    assert MvccStore.snapshot_position(copy) == (50, 2)
    generation = follower.install(copy, 50)
    assert generation == 2 and follower.applied_index() == 50 and follower.get(b"k50")["value"] == b"v50"
    assert sorted(os.listdir(tmp_path / "store")) == ["CURRENT", "gen-2"]
    follower.close()
    reader = MvccStore.open(str(tmp_path / "store"), writer=False, map_size_bytes=MAP_BYTES,
                            quota_backend_bytes=MAP_BYTES // 2)
    assert reader.applied_index() == 50
    reader.close()


def test_a_crash_before_current_is_switched_leaves_the_old_store(tmp_path):
    """The new generation dir exists but CURRENT still names the old one: the
    next writer open keeps the old store and removes the stale dir."""
    directory = str(tmp_path / "store")
    follower = make_store(directory, 3)
    follower.close()
    os.makedirs(os.path.join(directory, "gen-2"))
    shutil.copyfile(leader_copy(tmp_path, 50), os.path.join(directory, "gen-2", "data.mdb"))
    reopened = MvccStore.open(directory, writer=True, map_size_bytes=MAP_BYTES, quota_backend_bytes=MAP_BYTES // 2)
    assert reopened.applied_index() == 3 and not os.path.exists(os.path.join(directory, "gen-2"))
    reopened.close()


def write_wal(directory: str, last_index: int, term: int = 1) -> None:
    wal, _recovery = Wal.open(directory, SEGMENT_BYTES)
    for index in range(1, last_index + 1):
        wal.append_entries([(index, term, 0, b"x" * 100)])
    wal.set_hard_state(term, 1, last_index - 2)
    wal.sync()
    wal.close()


def test_wal_reset_drops_older_entries_even_if_old_segments_survive_a_crash(tmp_path):
    directory = str(tmp_path / "wal")
    write_wal(directory, 60)
    saved = {name: open(os.path.join(directory, name), "rb").read() for name in os.listdir(directory)}
    assert len(saved) > 1
    wal, _recovery = Wal.open(directory, SEGMENT_BYTES)
    wal.reset_to_snapshot(40, 3, {"voters": [1, 2, 3]}, HardState(3, 0, 40))
    wal.append_entries([(41, 3, 0, b"after")])
    wal.sync()
    wal.close()
    # The crash: the older segments are back as if their removal never happened.
    for name, data in saved.items():
        with open(os.path.join(directory, name), "wb") as handle:
            handle.write(data)
    _wal, recovery = Wal.open(directory, SEGMENT_BYTES)
    _wal.close()
    assert recovery.snapshot.index == 40 and recovery.snapshot.term == 3
    assert recovery.hard_state == HardState(3, 0, 40)
    assert [entry[0] for entry in recovery.entries] == [41]


def test_a_store_ahead_of_the_wal_gets_the_wal_reset_at_start(tmp_path):
    config = NodeConfig(data_dir=str(tmp_path / "node"))
    wal_dir = os.path.join(config.data_dir, "wal")
    write_wal(wal_dir, 10)  # the old log: entries 1..10 of term 1
    follower = make_store(store_dir(config), 5)
    follower.install(leader_copy(tmp_path, 30, term=2), 30)  # switched; then "kill -9"
    follower.close()
    wal, recovery = Wal.open(wal_dir, SEGMENT_BYTES)
    wal, recovery = finish_interrupted_install(config, wal, recovery, structlog.get_logger())
    wal.close()
    assert (recovery.snapshot.index, recovery.snapshot.term) == (30, 2)
    assert recovery.entries == [] and recovery.hard_state.commit == 30 and recovery.hard_state.term == 2
    # A second start changes nothing more.
    wal, again = Wal.open(wal_dir, SEGMENT_BYTES)
    wal, again = finish_interrupted_install(config, wal, again, structlog.get_logger())
    wal.close()
    assert again.snapshot == recovery.snapshot and again.entries == []


def test_a_store_within_the_wal_is_left_alone_at_start(tmp_path):
    config = NodeConfig(data_dir=str(tmp_path / "node"))
    wal_dir = os.path.join(config.data_dir, "wal")
    write_wal(wal_dir, 10)
    make_store(store_dir(config), 7).close()  # applied 7 of term 1: the WAL holds it
    wal, recovery = Wal.open(wal_dir, SEGMENT_BYTES)
    wal, after = finish_interrupted_install(config, wal, recovery, structlog.get_logger())
    wal.close()
    assert len(after.entries) == 10 and after.snapshot.index == 0
