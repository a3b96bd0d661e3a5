"""Raft over an in-memory network that drops, duplicates, cuts and isolates,
plus seeded whole-cluster simulations with safety invariants after every step
(tools/raft_sim.py; a failing seed replays with `python -m tools.raft_sim SEED`)."""

from __future__ import annotations

import pytest

from actors.raft import ROLE_LEADER
from tools.raft_sim import Invariants, Network, simulate


def settle(network: Network, ticks: int = 100) -> None:
    invariants = Invariants(network)
    for _ in range(ticks):
        network.tick()
        invariants.check()


def test_a_leader_is_elected_by_ticks_alone():
    network = Network([1, 2, 3], seed=5, pre_vote=True, check_quorum=True)
    settle(network, 40)
    leaders = [node_id for node_id in network.ids if network.raft(node_id).role == ROLE_LEADER]
    assert len(leaders) == 1


def test_replication_survives_drops_and_duplicates():
    """Goal: with 30% loss and 10% duplication the logs still converge once healed."""
    network = Network([1, 2, 3, 4, 5], seed=9)
    network.elect(1)
    network.drop_probability = 0.3
    network.duplicate_probability = 0.1
    for n in range(40):
        leader = network.leader()
        if leader is not None:
            network.propose(leader, b"v%d" % n)
        network.tick()
    network.recover()
    settle(network)
    commits = {network.raft(node_id).log.committed for node_id in network.ids}
    assert len(commits) == 1
    applied = [tuple(entry.data for entry in network.applied[node_id]) for node_id in network.ids]
    assert len(set(applied)) == 1


def test_isolated_leader_is_replaced_and_its_uncommitted_entries_discarded():
    """Goal: the majority elects a new leader; the old one steps down
    (check-quorum) and its unreplicated proposals are overwritten on heal."""
    network = Network([1, 2, 3], seed=3, pre_vote=True, check_quorum=True)
    network.elect(1)
    network.propose(1, b"committed")
    network.isolate(1)
    network.nodes[1].propose(b"lost")
    network.process()
    settle_ticks = 60
    for _ in range(settle_ticks):
        network.tick()
    assert network.raft(1).role != ROLE_LEADER  # stepped down (check-quorum), now pre-voting
    new_leader = network.leader()
    assert new_leader in (2, 3)
    network.propose(new_leader, b"after")
    network.recover()
    settle(network)
    for node_id in network.ids:
        data = [entry.data for entry in network.applied[node_id]]
        assert b"lost" not in data and b"committed" in data and b"after" in data


def test_cut_follower_catches_up_after_heal():
    network = Network([1, 2, 3], seed=4)
    network.elect(1)
    network.cut(1, 3)
    network.cut(2, 3)
    for n in range(30):
        network.propose(1, b"%d" % n)
    assert network.raft(3).log.last_index() < network.raft(1).log.last_index()
    network.recover()
    settle(network, 10)
    assert network.raft(3).log.last_index() == network.raft(1).log.last_index()
    assert network.raft(3).log.committed == network.raft(1).log.committed


def test_minority_cannot_commit():
    """§5.3: without a majority nothing commits."""
    network = Network([1, 2, 3, 4, 5], seed=6)
    network.elect(1)
    commit = network.raft(1).log.committed
    for other in (3, 4, 5):
        network.isolate(other)
    network.propose(1, b"x")
    assert network.raft(1).log.committed == commit


def test_crash_loses_only_unpersisted_state():
    network = Network([1, 2, 3], seed=8)
    network.elect(1)
    network.propose(1, b"durable")
    network.crash(2)
    assert network.raft(2).log.last_index() == network.raft(1).log.last_index()
    settle(network, 30)
    assert network.leader() is not None


@pytest.mark.parametrize("seed", range(1, 13))
def test_seeded_simulation_three_nodes(seed):
    """Goal: election safety, log matching and state machine safety hold under
    random ticks, proposals, reads, loss, duplication, partitions and crashes;
    after healing, one leader and equal commit indexes."""
    network = simulate(seed, steps=400, size=3)
    statuses = [network.nodes[node_id].status() for node_id in network.ids]
    assert sum(status["role"] == ROLE_LEADER for status in statuses) == 1
    assert len({status["commit"] for status in statuses}) == 1


@pytest.mark.parametrize("seed", range(100, 104))
def test_seeded_simulation_five_nodes(seed):
    network = simulate(seed, steps=500, size=5)
    statuses = [network.nodes[node_id].status() for node_id in network.ids]
    assert sum(status["role"] == ROLE_LEADER for status in statuses) == 1
    assert len({status["commit"] for status in statuses}) == 1


def test_same_seed_same_run():
    """Determinism: one seed replays exactly."""
    first = simulate(21, steps=200)
    second = simulate(21, steps=200)
    assert [first.nodes[i].status() for i in first.ids] == [second.nodes[i].status() for i in second.ids]
    assert first.delivered_count == second.delivered_count
