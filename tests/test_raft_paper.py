"""One test per claim of the Raft paper (Ongaro & Ousterhout 2014) or thesis
(Ongaro 2014), citing the section. Method: drive a Raft core directly with
hand-built messages, or a small in-memory network (tools/raft_sim.py)."""

from __future__ import annotations

import random

from actors.raft import (
    NONE, ROLE_CANDIDATE, ROLE_FOLLOWER, ROLE_LEADER, ROLE_PRE_CANDIDATE, Config, ConfState, Entry, HardState,
    MemoryStorage, MsgApp, MsgAppResp, MsgHeartbeat, MsgPreVote, MsgPreVoteResp, MsgVote, MsgVoteResp, RawNode,
)
from actors.raft.messages import entry_bytes
from actors.raft.tracker import STATE_REPLICATE
from tools.raft_sim import Network

VOTERS = (1, 2, 3)


def make_node(node_id=1, voters=VOTERS, log_terms=(), term=0, seed=1, **overrides) -> RawNode:
    """A node whose durable log has entries of the given terms (index 1..n)."""
    storage = MemoryStorage(ConfState(voters), HardState(term=term))
    storage.append([Entry(index, log_term, 0, b"") for index, log_term in enumerate(log_terms, start=1)])
    overrides.setdefault("pre_vote", False)
    overrides.setdefault("check_quorum", False)
    return RawNode(Config(id=node_id, **overrides), storage, random.Random(seed))


def drain(node: RawNode) -> list:
    messages = []
    while node.has_ready():  # bounded: each cycle empties the queues
        ready = node.ready()
        messages.extend(ready.messages)
        node.advance(ready)
    return messages


def make_leader(node: RawNode) -> RawNode:
    node.campaign()
    term = node.raft.term
    for voter in node.raft.voters:
        if voter != node.raft.id:
            node.step(MsgVoteResp(to=node.raft.id, sender=voter, term=term))
    assert node.raft.role == ROLE_LEADER
    drain(node)
    return node


def test_5_1_higher_term_makes_any_role_a_follower():
    """§5.1: a server that sees a higher term adopts it and becomes follower."""
    leader = make_leader(make_node())
    leader.step(MsgAppResp(to=1, sender=2, term=leader.raft.term + 3, index=0))
    assert leader.raft.role == ROLE_FOLLOWER and leader.raft.term == 4 and leader.raft.vote == NONE


def test_5_1_stale_term_messages_are_ignored():
    """§5.1: a request with a stale term is rejected (here: ignored, answered with our term)."""
    node = make_node(term=5)
    node.step(MsgApp(to=1, sender=2, term=3, log_term=0, index=0, entries=(Entry(1, 3, 0, b"x"),), commit=1))
    assert node.raft.log.last_index() == 0
    messages = drain(node)
    assert all(message.term == 5 for message in messages)


def test_5_2_follower_times_out_and_starts_an_election():
    """§5.2: after an election timeout a follower increments its term, votes
    for itself and requests votes from all others."""
    node = make_node()
    for _ in range(2 * node.raft.config.election_ticks):
        node.tick()
    assert node.raft.role == ROLE_CANDIDATE and node.raft.term == 1 and node.raft.vote == 1
    votes = [message for message in drain(node) if isinstance(message, MsgVote)]
    assert sorted(message.to for message in votes) == [2, 3]


def test_5_2_randomized_election_timeout_in_range():
    """§5.2: election timeouts are drawn from [T, 2T) from the passed-in RNG."""
    seen = set()
    for seed in range(50):
        node = make_node(seed=seed)
        timeout = node.raft.randomized_election_timeout
        assert 10 <= timeout < 20
        seen.add(timeout)
    assert len(seen) > 3
    assert make_node(seed=3).raft.randomized_election_timeout == make_node(seed=3).raft.randomized_election_timeout


def test_5_2_candidate_with_majority_becomes_leader():
    """§5.2: a candidate that receives votes from a majority becomes leader."""
    node = make_node(voters=(1, 2, 3, 4, 5))
    node.campaign()
    node.step(MsgVoteResp(to=1, sender=2, term=1))
    assert node.raft.role == ROLE_CANDIDATE
    node.step(MsgVoteResp(to=1, sender=3, term=1))
    assert node.raft.role == ROLE_LEADER


def test_5_2_candidate_loses_with_majority_of_rejections():
    node = make_node()
    node.campaign()
    node.step(MsgVoteResp(to=1, sender=2, term=1, reject=True))
    node.step(MsgVoteResp(to=1, sender=3, term=1, reject=True))
    assert node.raft.role == ROLE_FOLLOWER


def test_5_2_one_vote_per_term_first_come_first_served():
    """§5.2: each server votes for at most one candidate in a term."""
    node = make_node()
    node.step(MsgVote(to=1, sender=2, term=1, log_term=0, index=0))
    node.step(MsgVote(to=1, sender=3, term=1, log_term=0, index=0))
    responses = [message for message in drain(node) if isinstance(message, MsgVoteResp)]
    assert [(message.to, message.reject) for message in responses] == [(2, False), (3, True)]
    assert node.raft.vote == 2
    node.step(MsgVote(to=1, sender=2, term=1, log_term=0, index=0))  # a retry is granted again
    assert not drain(node)[-1].reject


def test_5_2_candidate_steps_down_for_a_leader_of_its_term():
    """§5.2: a candidate receiving AppendEntries from a leader of its term becomes follower."""
    node = make_node()
    node.campaign()
    node.step(MsgApp(to=1, sender=2, term=1, log_term=0, index=0, commit=0))
    assert node.raft.role == ROLE_FOLLOWER and node.raft.lead == 2


def test_5_3_leader_replicates_and_commits_on_majority():
    """§5.3: the leader appends a proposal, replicates it, commits it once a
    majority stored it, and followers learn the commit index."""
    network = Network([1, 2, 3])
    network.elect(1)
    index = network.propose(1, b"hello")
    for node_id in (1, 2, 3):
        assert network.raft(node_id).log.committed == index
        assert network.applied[node_id][-1].data == b"hello"


def test_5_3_follower_rejects_mismatched_append_and_leader_backs_up():
    """§5.3: consistency check: an append whose previous entry does not match is
    rejected; the leader decrements nextIndex (here with the fast-backtracking
    hint) until the logs match, overwriting the follower's conflicting entries."""
    follower = make_node(node_id=2, log_terms=(1, 1, 2, 2, 2, 2), term=2)
    follower.step(MsgApp(to=2, sender=1, term=3, log_term=3, index=6, commit=0))
    (response,) = [message for message in drain(follower) if isinstance(message, MsgAppResp)]
    assert response.reject and response.index == 6
    assert (response.reject_hint, response.log_term) == (6, 2)
    follower.step(MsgApp(to=2, sender=1, term=3, log_term=1, index=2,
                         entries=(Entry(3, 3, 0, b"a"), Entry(4, 3, 0, b"b")), commit=4))
    (response,) = [message for message in drain(follower) if isinstance(message, MsgAppResp)]
    assert not response.reject and response.index == 4
    assert [follower.raft.log.term(index) for index in range(1, 5)] == [1, 1, 3, 3]
    assert follower.raft.log.last_index() == 4 and follower.raft.log.committed == 4


def test_5_3_fast_backtracking_converges_in_few_round_trips():
    """§5.3 (end) optimisation: a follower with a long divergent tail is
    repaired in O(terms) round trips, not O(entries)."""
    network = Network([1, 2, 3], pre_vote=False, check_quorum=False)
    network.elect(1)
    network.isolate(1)
    for n in range(50):
        network.nodes[1].propose(b"stale %d" % n)  # never committed
    network.process()
    network.recover()
    network.isolate(1)
    network.elect(2)
    network.propose(2, b"new")
    before = network.delivered_count
    network.recover()
    network.tick(2, times=2)  # a heartbeat round unpauses the probe
    network.propose(2, b"newer")
    assert network.raft(1).log.term(network.raft(1).log.last_index()) == network.raft(2).term
    assert network.raft(1).log.last_index() == network.raft(2).log.last_index()
    assert network.delivered_count - before < 30


def test_5_4_1_voter_denies_a_less_up_to_date_candidate():
    """§5.4.1: a vote is denied when the voter's log is more up to date."""
    voter = make_node(node_id=1, log_terms=(1, 2), term=2)
    voter.step(MsgVote(to=1, sender=2, term=3, log_term=1, index=5))  # older last term
    voter.step(MsgVote(to=1, sender=3, term=4, log_term=2, index=1))  # same term, shorter
    responses = [message for message in drain(voter) if isinstance(message, MsgVoteResp)]
    assert [message.reject for message in responses] == [True, True]
    voter.step(MsgVote(to=1, sender=2, term=5, log_term=2, index=2))
    assert not drain(voter)[-1].reject


def test_5_4_2_no_commit_of_previous_term_entries_by_counting_replicas():
    """§5.4.2 (Figure 8): a leader commits an entry of an earlier term only
    indirectly, by committing an entry of its own term."""
    node = make_leader(make_node(log_terms=(1, 2), term=2))
    raft = node.raft
    assert raft.term == 3 and raft.log.last_index() == 3  # the no-op of term 3
    node.step(MsgAppResp(to=1, sender=2, term=3, index=2))  # majority has index 2 (term 2)
    drain(node)
    assert raft.log.committed == 0
    node.step(MsgAppResp(to=1, sender=2, term=3, index=3))  # majority has the term-3 no-op
    drain(node)
    assert raft.log.committed == 3


def test_5_5_duplicate_and_reordered_appends_are_harmless():
    """§5.5: RPCs are idempotent: a repeated or late AppendEntries changes nothing."""
    follower = make_node(node_id=2, term=1)
    first = MsgApp(to=2, sender=1, term=1, log_term=0, index=0, entries=(Entry(1, 1, 0, b"a"),), commit=0)
    second = MsgApp(to=2, sender=1, term=1, log_term=1, index=1, entries=(Entry(2, 1, 0, b"b"),), commit=2)
    for message in (first, second, first, second, first):
        follower.step(message)
        drain(follower)
    assert follower.raft.log.last_index() == 2 and follower.raft.log.committed == 2


def test_thesis_9_6_prevote_does_not_disturb_terms():
    """Thesis §9.6: a partitioned server pre-votes and so does not increase its
    term; when it rejoins it does not depose the leader."""
    network = Network([1, 2, 3], pre_vote=True, check_quorum=True)
    network.elect(1)
    term = network.raft(1).term
    network.isolate(3)
    network.tick(3, times=100)
    assert network.raft(3).term == term and network.raft(3).role == ROLE_PRE_CANDIDATE
    network.recover()
    network.tick(times=5)
    assert network.leader() == 1 and network.raft(1).term == term
    assert network.raft(3).role == ROLE_FOLLOWER


def test_thesis_9_6_prevote_granted_without_changing_voter_state():
    voter = make_node(node_id=2, term=1, pre_vote=True)
    voter.step(MsgPreVote(to=2, sender=1, term=2, log_term=0, index=0))
    (response,) = [message for message in drain(voter) if isinstance(message, MsgPreVoteResp)]
    assert not response.reject and response.term == 2
    assert voter.raft.term == 1 and voter.raft.vote == NONE


def test_thesis_6_2_check_quorum_leader_steps_down_when_cut_off():
    """Thesis §6.2: a leader that hears from no majority for an election
    timeout steps down (so stale leaders stop serving)."""
    network = Network([1, 2, 3], pre_vote=True, check_quorum=True)
    network.elect(1)
    network.isolate(1)
    network.tick(1, times=25)
    assert network.raft(1).role == ROLE_FOLLOWER


def test_thesis_6_2_leader_lease_ignores_disruptive_vote_requests():
    """Thesis §6.2/§4.2.3: with check-quorum, a follower that heard from a
    leader within the election timeout ignores a higher-term vote request."""
    network = Network([1, 2, 3], check_quorum=True)
    network.elect(1)
    term = network.raft(1).term
    network.nodes[2].step(MsgVote(to=2, sender=3, term=term + 5, log_term=9, index=99))
    assert network.raft(2).term == term and network.raft(2).lead == 1


def test_thesis_6_4_read_index_needs_a_heartbeat_quorum():
    """Thesis §6.4: the leader serves a read at its commit index only after a
    round of heartbeats confirms it is still leader; a cut-off leader cannot."""
    network = Network([1, 2, 3])
    network.elect(1)
    for n in range(5):
        network.nodes[1].read_index(("batch", n))
    network.process()
    states = network.read_states[1]
    assert [state.context for state in states] == [("batch", n) for n in range(5)]
    assert all(state.index == network.raft(1).log.committed for state in states)
    network.isolate(1)
    network.nodes[1].read_index("cut")
    network.process()
    assert [state.context for state in network.read_states[1]][-1] != "cut"


def test_thesis_6_4_follower_read_index_goes_through_the_leader():
    network = Network([1, 2, 3])
    network.elect(1)
    network.propose(1, b"x")
    network.nodes[3].read_index("follower-read")
    network.process()
    (state,) = network.read_states[3]
    assert state.context == "follower-read" and state.index == network.raft(1).log.committed


def test_inflight_appends_are_bounded():
    """Flow control (etcd): a replicating follower that does not answer gets at
    most max_inflight_appends appends."""
    leader = make_leader(make_node(max_inflight_appends=3))
    leader.step(MsgAppResp(to=1, sender=2, term=1, index=1))
    drain(leader)
    assert leader.raft.progress[2].state == STATE_REPLICATE
    sent = []
    for n in range(10):
        leader.propose(b"%d" % n)
        sent.extend(message for message in drain(leader) if isinstance(message, MsgApp) and message.to == 2)
    assert len(sent) == 3


def test_append_messages_respect_the_byte_limit():
    """Bounded messages: one MsgApp carries at most max_append_entries_bytes
    (but always at least one entry)."""
    leader = make_leader(make_node(max_append_entries_bytes=1000, max_request_bytes=100))
    leader.raft.progress[2].become_replicate()
    for n in range(20):
        leader.raft.append_entries([(0, b"x" * 200)])
    messages = [message for message in drain(leader) if isinstance(message, MsgApp) and message.to == 2]
    assert len(messages) > 1
    for message in messages:
        assert message.entries
        assert sum(entry_bytes(entry) for entry in message.entries) <= 1000


def test_heartbeat_commit_never_exceeds_follower_match():
    """A heartbeat tells a follower at most min(its match, commit)."""
    leader = make_leader(make_node())
    leader.raft.broadcast_heartbeat(0)
    heartbeats = [message for message in drain(leader) if isinstance(message, MsgHeartbeat)]
    assert heartbeats and all(message.commit == 0 for message in heartbeats)
