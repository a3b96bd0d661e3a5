"""Membership changes (etcd-io/raft's single-step changes; thesis §4.1 and
§4.2.2 for the one-at-a-time rule) and leadership transfer (thesis §3.10) in
the pure Raft core. One test per claim. Method: drive one core with
hand-built messages, or a small in-memory network (tools/raft_sim.py
`Network`) that drops, cuts and isolates and applies committed changes the
way the actor does (`apply_conf_change` before `advance`)."""

from __future__ import annotations

import random

import ormsgpack
import pytest

from actors.raft import (
    ENTRY_CONF_CHANGE, NONE, ROLE_CANDIDATE, ROLE_FOLLOWER, ROLE_LEADER, BadTransferee, Compacted, ConfChange,
    ConfChangePending, Config, ConfState, Entry, HardState, MemberExists, MemberNotFound, MemberNotLearner,
    MemoryStorage, MsgApp, MsgAppResp, MsgHeartbeat, MsgTimeoutNow, MsgVote, MsgVoteResp, ProposalDropped, RawNode,
    RemovingLastVoter, Unavailable,
)
from tools.raft_sim import Invariants, Network


def make_node(node_id=1, voters=(1, 2, 3), learners=(), log_terms=(), term=0, **overrides) -> RawNode:
    storage = MemoryStorage(ConfState(voters, learners), HardState(term=term))
    storage.append([Entry(index, log_term, 0, b"") for index, log_term in enumerate(log_terms, start=1)])
    overrides.setdefault("pre_vote", False)
    overrides.setdefault("check_quorum", False)
    return RawNode(Config(id=node_id, **overrides), storage, random.Random(1))


def drain(node: RawNode) -> list:
    """Ready cycles until quiet, applying committed changes as the actor does."""
    messages = []
    while node.has_ready():  # bounded: each cycle empties the queues
        ready = node.ready()
        messages.extend(ready.messages)
        for entry in ready.committed_entries:
            if entry.type == ENTRY_CONF_CHANGE:
                node.apply_conf_change(ConfChange.from_wire(ormsgpack.unpackb(entry.data)))
        node.advance(ready)
    return messages


def make_leader(node: RawNode) -> RawNode:
    node.campaign()
    for voter in node.raft.voters:
        if voter != node.raft.id:
            node.step(MsgVoteResp(to=node.raft.id, sender=voter, term=node.raft.term))
    assert node.raft.role == ROLE_LEADER
    drain(node)
    return node


def ack(node: RawNode, sender: int, index: int) -> None:
    node.step(MsgAppResp(to=node.raft.id, sender=sender, term=node.raft.term, index=index))


def settle(network: Network, ticks: int) -> None:
    invariants = Invariants(network)
    for _ in range(ticks):
        network.tick()
        invariants.check()


def cluster(ids=(1, 2, 3), seed=1, **overrides) -> Network:
    overrides.setdefault("pre_vote", True)
    overrides.setdefault("check_quorum", True)
    network = Network(list(ids), seed=seed, **overrides)
    network.elect(1)
    assert network.raft(1).role == ROLE_LEADER
    return network


# ---- the entry format and the configuration --------------------------------------------------

@pytest.mark.parametrize("change", [
    ConfChange("add_voter", 4), ConfChange("remove", 200), ConfChange("update", 70000, b"x" * 300),
    ConfChange("add_learner", (1 << 64) - 1, b"m" * 70000), ConfChange("promote_learner", 1 << 31),
])
def test_conf_change_entry_data_is_the_msgpack_of_its_wire_form(change):
    """Contract: ENTRY_CONF_CHANGE data == ormsgpack.packb(change.to_wire()),
    written by the core without a msgpack library."""
    assert change.encode() == ormsgpack.packb(change.to_wire())
    assert ConfChange.from_wire(ormsgpack.unpackb(change.encode())) == change


def test_conf_state_and_conf_change_validate_themselves():
    for bad in (lambda: ConfState((1, 2), (2,)), lambda: ConfState((1,), (3, 2)), lambda: ConfState((0,)),
                lambda: ConfChange("demote", 1), lambda: ConfChange("remove", 0), lambda: ConfChange("remove", 1, "x"),
                lambda: ConfChange.from_wire(["remove", 1])):
        with pytest.raises(ValueError):
            bad()
    conf_state = ConfState((1, 3), (2,))
    assert ConfState.from_marker(conf_state.to_marker()) == conf_state
    assert ConfState.from_marker({"voters": [3, 1]}) == ConfState((1, 3))  # a marker written before learners


def test_core_starts_from_a_conf_state_with_learners():
    """A restarted learner stays a learner: it never campaigns."""
    learner = make_node(node_id=3, voters=(1, 2), learners=(3,))
    for _ in range(100):
        learner.tick()
    assert learner.raft.role == ROLE_FOLLOWER and learner.raft.term == 0 and not drain(learner)
    assert learner.conf_state() == ConfState((1, 2), (3,))


# ---- learners ----------------------------------------------------------------------------

def test_learner_does_not_vote_or_campaign():
    """A candidate asks only voters; a learner's grant does not count."""
    node = make_node(voters=(1, 2, 3), learners=(4, 5))
    node.campaign()
    votes = [message for message in drain(node) if isinstance(message, MsgVote)]
    assert sorted(message.to for message in votes) == [2, 3]
    node.step(MsgVoteResp(to=1, sender=4, term=1))
    node.step(MsgVoteResp(to=1, sender=5, term=1))
    assert node.raft.role == ROLE_CANDIDATE
    node.step(MsgVoteResp(to=1, sender=2, term=1))
    assert node.raft.role == ROLE_LEADER


def test_learner_gets_the_log_but_does_not_count_for_commit():
    leader = make_leader(make_node(voters=(1, 2, 3), learners=(4,)))
    for member in (2, 3, 4):
        ack(leader, member, 1)  # the no-op: all replicating now
    drain(leader)
    index = leader.propose(b"x")
    messages = drain(leader)
    assert {message.to for message in messages if isinstance(message, MsgApp) and message.entries} == {2, 3, 4}
    ack(leader, 4, index)
    assert leader.raft.log.committed < index  # leader + learner is no majority of 3 voters
    ack(leader, 2, index)
    assert leader.raft.log.committed == index
    leader.raft.broadcast_heartbeat(0)
    assert {message.to for message in drain(leader) if isinstance(message, MsgHeartbeat)} == {2, 3, 4}


# ---- changing the configuration -----------------------------------------------------------

def test_adding_a_voter_changes_the_quorum_only_after_apply():
    """The new configuration counts once applied, not once appended or committed."""
    network = cluster()
    network.hold_conf_changes = {1}
    index = network.change(1, "add_voter", 4)  # node 4 is not running
    assert network.raft(1).log.committed >= index and network.raft(1).voters == (1, 2, 3)
    network.cut(1, 3)
    x = network.propose(1, b"x")
    assert network.raft(1).log.committed == x  # 2 of the 3 voters still in effect
    network.apply_held_conf_changes(1)
    assert network.raft(1).voters == (1, 2, 3, 4)
    y = network.propose(1, b"y")
    assert network.raft(1).log.committed < y  # 2 of 4 is no majority


def test_one_change_at_a_time():
    """§4.1: the next change waits until the previous one is applied."""
    network = cluster()
    network.hold_conf_changes = {1}
    network.change(1, "add_learner", 4)
    with pytest.raises(ConfChangePending):
        network.change(1, "add_learner", 5)
    network.hold_conf_changes = set()
    network.apply_held_conf_changes(1)
    network.change(1, "add_learner", 5)
    assert network.raft(1).learners == (4, 5)


def test_new_leader_waits_until_its_log_is_applied_before_a_change():
    """etcd's rule: a new leader's log may hold a change it has not applied,
    so it sets its pending index to its last index on election."""
    leader = make_node(voters=(1, 2, 3), log_terms=(1, 1), term=1)
    leader.campaign()
    leader.step(MsgVoteResp(to=1, sender=2, term=2))
    assert leader.raft.role == ROLE_LEADER and leader.raft.pending_conf_index == 2
    with pytest.raises(ConfChangePending):
        leader.propose_conf_change(ConfChange("add_learner", 4))
    drain(leader)
    ack(leader, 2, 3)  # the no-op of term 2 commits, entries 1..3 are applied
    drain(leader)
    assert leader.raft.log.applied == 3
    assert leader.propose_conf_change(ConfChange("add_learner", 4)) == 4


def test_invalid_changes_are_named_errors():
    leader = make_leader(make_node(voters=(1, 2), learners=(3,)))
    for change, error in ((ConfChange("add_voter", 2), MemberExists), (ConfChange("add_learner", 3), MemberExists),
                          (ConfChange("remove", 9), MemberNotFound), (ConfChange("update", 9), MemberNotFound),
                          (ConfChange("promote_learner", 9), MemberNotFound),
                          (ConfChange("promote_learner", 2), MemberNotLearner)):
        with pytest.raises(error):
            leader.propose_conf_change(change)
    single = make_leader(make_node(voters=(1,)))
    with pytest.raises(RemovingLastVoter):
        single.propose_conf_change(ConfChange("remove", 1))
    with pytest.raises(ProposalDropped):
        make_node().propose_conf_change(ConfChange("add_learner", 4))  # not the leader


def test_update_changes_no_configuration():
    network = cluster()
    network.change(1, "update", 2)
    assert all(network.nodes[node_id].conf_state() == ConfState((1, 2, 3)) for node_id in network.ids)
    network.change(1, "add_learner", 4)  # and it was applied: the next change is taken


def test_removing_a_follower_shrinks_the_quorum_and_unblocks_a_stuck_commit():
    """4 voters, 4 is down: removing it commits (3 of 4); an entry that only 2
    of 4 have commits once the leader applies the removal (2 of 3)."""
    network = cluster(ids=(1, 2, 3, 4))
    network.isolate(4)
    network.hold_conf_changes = {1}
    network.change(1, "remove", 4)
    network.cut(1, 3)
    stuck = network.propose(1, b"stuck")
    assert network.raft(1).log.committed < stuck
    network.apply_held_conf_changes(1)
    assert network.raft(1).voters == (1, 2, 3) and 4 not in network.raft(1).progress
    assert network.raft(1).log.committed == stuck


def test_removed_follower_gets_nothing_more_and_never_campaigns():
    network = cluster()
    network.change(1, "remove", 3)
    network.process()
    assert network.nodes[3].conf_state() == ConfState((1, 2))  # it applied its own removal
    last = network.raft(3).log.last_index()
    network.propose(1, b"after")
    settle(network, 50)
    assert network.raft(3).log.last_index() == last and network.raft(3).role == ROLE_FOLLOWER
    assert network.raft(3).term == network.raft(1).term


def test_removing_the_leader_steps_it_down_and_the_rest_elect_at_once():
    """The leader leaves once it applies its removal; it hands over with
    MsgTimeoutNow, so a new leader is elected without an election timeout."""
    network = cluster()
    network.propose(1, b"before")
    term = network.raft(1).term
    network.change(1, "remove", 1)
    assert network.raft(1).role == ROLE_FOLLOWER
    new_leader = network.leader()
    assert new_leader in (2, 3) and network.raft(new_leader).term == term + 1
    network.propose(new_leader, b"after")
    settle(network, 50)
    assert network.raft(1).role == ROLE_FOLLOWER and network.leader() == new_leader
    assert all(network.raft(node_id).voters == (2, 3) for node_id in (2, 3))


def test_add_learner_catches_up_then_promote():
    network = cluster()
    for n in range(5):
        network.propose(1, b"%d" % n)
    network.change(1, "add_learner", 4)
    network.add_node(4)
    settle(network, 5)
    assert network.raft(4).log.last_index() == network.raft(1).log.last_index()
    assert network.nodes[4].conf_state() == ConfState((1, 2, 3), (4,))
    assert network.nodes[1].status()["progress"][4]["match"] == network.raft(1).log.last_index()
    network.change(1, "promote_learner", 4)
    assert network.nodes[4].conf_state() == ConfState((1, 2, 3, 4))
    network.isolate(2)
    network.isolate(3)
    index = network.propose(1, b"needs 4")
    assert network.raft(1).log.committed < index  # 1 and 4 are 2 of 4
    network.recover()
    network.isolate(3)
    network.tick()
    assert network.raft(1).log.committed >= index  # 1, 2 and 4: 3 of 4


def test_conf_state_at_an_applied_index():
    network = cluster()
    first = network.change(1, "add_learner", 4)
    second = network.change(1, "promote_learner", 4)
    node = network.nodes[2]
    assert node.conf_state_at(first - 1) == ConfState((1, 2, 3))
    assert node.conf_state_at(first) == node.conf_state_at(second - 1) == ConfState((1, 2, 3), (4,))
    assert node.conf_state_at(second) == ConfState((1, 2, 3, 4))
    with pytest.raises(Unavailable):
        node.conf_state_at(node.raft.log.applied + 1)
    restarted = make_node(node_id=2, voters=(1, 2, 3, 4), applied=0)
    with pytest.raises(Unavailable):
        restarted.conf_state_at(1)
    with pytest.raises(Compacted):
        make_node(node_id=2, log_terms=(1, 1), applied=2).conf_state_at(1)


# ---- leadership transfer ------------------------------------------------------------------

def test_transfer_to_an_up_to_date_follower():
    """§3.10: the leader sends MsgTimeoutNow at once; the target wins the next
    term although every voter's lease (check-quorum) is still running."""
    network = cluster()
    network.propose(1, b"x")
    term = network.raft(1).term
    network.nodes[1].transfer_leader(3)
    network.process()
    assert network.leader() == 3 and network.raft(3).term == term + 1
    assert network.raft(1).role == ROLE_FOLLOWER and network.raft(1).lead == 3
    assert network.raft(1).lead_transferee == NONE


def test_transfer_to_a_lagging_follower_catches_it_up_first():
    network = cluster()
    network.cut(1, 3)
    for n in range(10):
        network.propose(1, b"%d" % n)
    last = network.raft(1).log.last_index()
    assert network.raft(3).log.last_index() < last
    network.nodes[1].transfer_leader(3)
    network.process()
    assert network.nodes[1].status()["lead_transferee"] == 3 and network.leader() == 1
    with pytest.raises(ProposalDropped):
        network.nodes[1].propose(b"while transferring")
    network.recover()
    network.tick(1)  # a heartbeat response shows 3 behind; the catch-up append, then MsgTimeoutNow
    assert network.leader() == 3
    assert network.raft(3).log.term(last) == network.raft(1).log.term(last)
    network.propose(3, b"the new leader takes proposals")


def test_lead_transferee_is_reported_in_the_soft_state():
    leader = make_leader(make_node())
    leader.transfer_leader(2)
    ready = leader.ready()
    assert ready.soft_state.lead_transferee == 2 and ready.soft_state.role == ROLE_LEADER
    leader.advance(ready)


def test_transfer_only_to_a_voter_and_only_by_the_leader():
    leader = make_leader(make_node(voters=(1, 2, 3), learners=(4,)))
    for target in (4, 9):
        with pytest.raises(BadTransferee):
            leader.transfer_leader(target)
    assert leader.raft.lead_transferee == NONE
    with pytest.raises(ProposalDropped):
        make_node().transfer_leader(2)
    leader.transfer_leader(1)  # to itself: nothing to do
    assert leader.raft.lead_transferee == NONE and leader.raft.role == ROLE_LEADER


def test_transfer_is_given_up_after_an_election_timeout():
    network = cluster()
    network.isolate(3)
    network.nodes[1].transfer_leader(3)
    network.process()
    with pytest.raises(ProposalDropped):
        network.nodes[1].propose(b"x")
    network.cut(1, 3)
    for _ in range(network.raft(1).config.election_ticks):
        network.tick(1)
    assert network.raft(1).role == ROLE_LEADER and network.raft(1).lead_transferee == NONE
    network.propose(1, b"accepted again")


def test_removing_the_transferee_aborts_the_transfer():
    """A removal committed before the transfer began and applied during it."""
    network = cluster()
    network.hold_conf_changes = {1}
    network.change(1, "remove", 3)
    network.isolate(3)
    network.nodes[1].transfer_leader(3)
    network.process()
    assert network.raft(1).lead_transferee == 3
    network.apply_held_conf_changes(1)
    assert network.raft(1).lead_transferee == NONE and network.raft(1).role == ROLE_LEADER
    network.propose(1, b"accepted again")


def test_stale_and_duplicated_timeout_now_are_harmless():
    """A duplicate MsgTimeoutNow arrives after the target already campaigned
    (its term is then old: ignored); one from an older term is ignored; a
    learner ignores it."""
    follower = make_node(node_id=2, voters=(1, 2, 3), log_terms=(1,), term=1)
    follower.step(MsgApp(to=2, sender=1, term=1, log_term=1, index=1, commit=1))
    timeout_now = MsgTimeoutNow(to=2, sender=1, term=1)
    follower.step(timeout_now)
    assert follower.raft.role == ROLE_CANDIDATE and follower.raft.term == 2
    votes = [message for message in drain(follower) if isinstance(message, MsgVote)]
    assert votes and all(message.transfer for message in votes)
    follower.step(timeout_now)
    assert follower.raft.term == 2 and not drain(follower)
    stale = make_node(node_id=2, log_terms=(1, 3), term=3)
    stale.step(MsgTimeoutNow(to=2, sender=1, term=2))
    assert stale.raft.role == ROLE_FOLLOWER and stale.raft.term == 3
    learner = make_node(node_id=4, voters=(1, 2, 3), learners=(4,), term=1)
    learner.step(MsgTimeoutNow(to=4, sender=1, term=1))
    assert learner.raft.role == ROLE_FOLLOWER and learner.raft.term == 1


def test_transfer_vote_ignores_the_lease_an_ordinary_one_does_not():
    """Thesis §6.2/§9.6: a voter that heard from its leader ignores a
    candidate, unless the candidate says the leader sent it (transfer)."""
    voter = make_node(node_id=3, log_terms=(1,), term=1, check_quorum=True)
    voter.step(MsgHeartbeat(to=3, sender=1, term=1, commit=1))
    drain(voter)
    voter.step(MsgVote(to=3, sender=2, term=2, log_term=1, index=1))
    assert voter.raft.term == 1 and not drain(voter)
    voter.step(MsgVote(to=3, sender=2, term=2, log_term=1, index=1, transfer=True))
    assert voter.raft.term == 2 and voter.raft.vote == 2
    assert [(type(m), m.reject) for m in drain(voter)] == [(MsgVoteResp, False)]


def test_replacing_a_member_under_loss_and_duplication_converges():
    """Goal: add a learner, promote it, remove an old voter and transfer
    leadership while 20% of messages are lost and 10% duplicated; once healed
    every member has the same log and configuration, and the removed node
    stops receiving the log."""
    network = cluster(ids=(1, 2, 3), seed=11)
    network.add_node(4)
    network.drop_probability = 0.2
    network.duplicate_probability = 0.1
    invariants = Invariants(network)
    steps = [("add_learner", 4), ("promote_learner", 4), ("remove", 2), ("transfer", 4)]
    for _ in range(400):  # bounded: retry each step until the leader takes it
        if not steps:
            break
        leader = network.leader()
        if leader is not None:
            kind, member = steps[0]
            try:
                if kind == "transfer":
                    network.nodes[leader].transfer_leader(member)
                else:
                    network.nodes[leader].propose_conf_change(ConfChange(kind, member))
                steps.pop(0)
            except ProposalDropped:
                pass  # a change still unapplied, or a transfer under way
        network.tick()
        invariants.check()
    assert not steps
    network.recover()
    settle(network, 60)
    members = (1, 3, 4)
    assert {network.nodes[node_id].conf_state() for node_id in members} == {ConfState((1, 3, 4))}
    assert len({network.raft(node_id).log.last_index() for node_id in members}) == 1
    assert network.leader() in members
    assert network.raft(2).log.last_index() < network.raft(1).log.last_index()


def test_a_restarted_node_rebuilds_its_configuration_from_the_log():
    """The core starts from the storage's ConfState (the one at Config.applied)
    and the caller re-applies the committed changes above it."""
    network = cluster()
    network.change(1, "add_learner", 4)
    network.change(1, "promote_learner", 4)
    network.change(1, "remove", 3)
    network.crash(2)
    assert network.nodes[2].conf_state() == ConfState((1, 2, 3))  # the initial one, until replayed
    network.tick(2)
    assert network.nodes[2].conf_state() == ConfState((1, 2, 4))
    assert network.nodes[2].conf_state_at(network.raft(2).log.applied) == ConfState((1, 2, 4))
