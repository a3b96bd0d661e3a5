"""The Raft core's single-voter path, the Ready contract, config, storage and purity."""

from __future__ import annotations

import ast
import os
import random

import pytest

from actors.raft import (
    ENTRY_EMPTY, ROLE_FOLLOWER, ROLE_LEADER, Compacted, Config, ConfigError, ConfState, Entry, HardState,
    MemoryStorage, MsgApp, ProposalDropped, RawNode, ReadIndexDropped, ReadState, UnknownMessageError,
)
from actors.raft.log import RaftLog

RAFT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "actors", "raft")
FORBIDDEN_MODULES = {"zmq", "lmdb", "socket", "time", "random", "os", "ormsgpack", "structlog", "threading"}


def single_node(storage: MemoryStorage | None = None, **overrides) -> RawNode:
    storage = storage or MemoryStorage(ConfState((1,)))
    return RawNode(Config(id=1, **overrides), storage, random.Random(7))


def cycle(node: RawNode):
    """One Ready cycle with everything 'persisted'; returns the Ready."""
    ready = node.ready()
    node.advance(ready)
    return ready


def test_single_voter_is_leader_at_once_with_a_noop():
    """Goal: a single voter campaigns at start (no election timeout) and
    appends a no-op of its new term; nothing is committed before persistence."""
    node = single_node()
    assert node.raft.role == ROLE_LEADER and node.raft.term == 1
    ready = node.ready()
    assert ready.hard_state == HardState(term=1, vote=1, commit=0)
    assert ready.entries == [Entry(1, 1, ENTRY_EMPTY, b"")]
    assert ready.committed_entries == [] and ready.messages == []
    assert ready.must_sync()
    assert ready.soft_state.role == ROLE_LEADER and ready.soft_state.lead == 1
    node.advance(ready)
    ready = cycle(node)
    assert [entry.index for entry in ready.committed_entries] == [1]
    assert ready.hard_state.commit == 1
    assert not ready.must_sync()  # a commit-only change needs no fsync
    assert not node.has_ready()


def test_commit_waits_for_persistence():
    """Goal: the leader's own match index advances only in advance(), so an
    entry is committed only after the Ready that carried it was persisted."""
    node = single_node()
    cycle(node)
    cycle(node)
    index = node.propose(b"a")
    assert index == 2
    ready = node.ready()
    assert [entry.index for entry in ready.entries] == [2]
    assert node.raft.log.committed == 1  # not yet durable, not committed
    with pytest.raises(AssertionError):
        node.ready()  # one Ready outstanding at a time
    node.advance(ready)
    assert node.raft.log.committed == 2
    ready = cycle(node)
    assert [entry.data for entry in ready.committed_entries] == [b"a"]


def test_many_proposals_in_one_ready_are_one_batch():
    """Goal: proposals between two Readys are persisted and committed together."""
    node = single_node()
    cycle(node)
    cycle(node)
    for n in range(100):
        node.propose(b"%d" % n)
    ready = cycle(node)
    assert len(ready.entries) == 100
    ready = cycle(node)
    assert len(ready.committed_entries) == 100


def test_read_index_single_voter_waits_for_current_term_commit_then_is_immediate():
    """Goal: ReadIndex (thesis §6.4) answers only once an entry of the current
    term is committed; then at once, with index = commit, many per round."""
    node = single_node()
    node.read_index("early")
    ready = cycle(node)
    assert ready.read_states == []  # the no-op is not committed yet
    ready = cycle(node)
    assert ready.read_states == [ReadState(1, "early")]
    node.propose(b"x")
    for n in range(10):
        node.read_index(n)
    ready = cycle(node)
    assert ready.read_states == [ReadState(1, n) for n in range(10)]


def test_follower_refuses_proposals_and_reads_without_leader():
    """Goal: expected failures are named errors, not crashes."""
    storage = MemoryStorage(ConfState((1, 2, 3)))
    node = RawNode(Config(id=1), storage, random.Random(1))
    assert node.raft.role == ROLE_FOLLOWER
    with pytest.raises(ProposalDropped):
        node.propose(b"x")
    with pytest.raises(ReadIndexDropped):
        node.read_index("r")
    with pytest.raises(UnknownMessageError):
        node.step("not a message")


def test_restart_from_storage_keeps_the_log_and_bumps_the_term():
    """Goal: a restarted single voter keeps its durable log and becomes leader
    of a new term; unpersisted entries are lost, as they were never acked."""
    storage = MemoryStorage(ConfState((1,)))
    node = single_node(storage)
    cycle(node)
    node.propose(b"a")
    cycle(node)
    cycle(node)
    node.propose(b"lost")  # never persisted
    node.ready()
    restarted = single_node(storage)
    assert restarted.raft.term == 2
    assert restarted.raft.log.last_index() == 3  # 1 no-op, 2 "a", 3 new no-op
    first = cycle(restarted)
    assert [entry.index for entry in first.entries] == [3]
    second = cycle(restarted)
    applied = first.committed_entries + second.committed_entries  # Config.applied = 0: all again
    assert [entry.data for entry in applied] == [b"", b"a", b""]


def test_config_is_validated_at_construction():
    storage = MemoryStorage(ConfState((1,)))
    for bad in (dict(election_ticks=1, heartbeat_ticks=1), dict(max_inflight_appends=0),
                dict(max_append_entries_bytes=10, max_request_bytes=100), dict(heartbeat_ticks=0)):
        with pytest.raises(ConfigError):
            RawNode(Config(id=1, **bad), storage, random.Random(1))
    with pytest.raises(ConfigError):
        RawNode(Config(id=1), MemoryStorage(ConfState(())), random.Random(1))


def test_messages_validate_themselves():
    with pytest.raises(ValueError):
        MsgApp(to=-1, sender=1, term=1, log_term=0, index=0)
    with pytest.raises(TypeError):
        MsgApp(2, 1, 1, 0, 0)  # keyword-only
    with pytest.raises(ValueError):
        ConfState((2, 1))


def test_memory_storage_append_overwrite_and_compact():
    storage = MemoryStorage(ConfState((1,)))
    storage.append([Entry(index, 1, 0, b"") for index in range(1, 11)])
    storage.append([Entry(6, 2, 0, b"")])
    assert storage.last_index() == 6 and storage.term(6) == 2
    storage.compact(3)
    assert storage.first_index() == 4 and storage.term(3) == 1
    with pytest.raises(Compacted):
        storage.entries(2, 5, 1 << 20)
    assert [entry.index for entry in storage.entries(4, 7, 1 << 20)] == [4, 5, 6]
    assert len(storage.entries(4, 7, 0)) == 1  # always at least one


def test_log_unstable_shadowing_persisted_entries():
    """Goal: a conflicting append hides persisted entries until it is persisted."""
    storage = MemoryStorage(ConfState((1,)))
    storage.append([Entry(index, 1, 0, b"old") for index in range(1, 6)])
    log = RaftLog(storage)
    log.append([Entry(3, 2, 0, b"new")])
    assert log.last_index() == 3 and log.term(3) == 2 and log.term(4) is None
    assert log.persisted_last_index() == 2
    assert [entry.data for entry in log.slice(1, 4)] == [b"old", b"old", b"new"]


def _imports(path: str) -> set[str]:
    tree = ast.parse(open(path).read())
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            skipped |= {id(child) for child in ast.walk(node)}
    modules = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module.split(".")[0])
    return modules


def test_core_is_pure():
    """Goal: the core imports no I/O, clock or global randomness (sans-I/O)."""
    for name in sorted(os.listdir(RAFT_DIR)):
        if name.endswith(".py"):
            imported = _imports(os.path.join(RAFT_DIR, name))
            assert not imported & FORBIDDEN_MODULES, (name, imported & FORBIDDEN_MODULES)
