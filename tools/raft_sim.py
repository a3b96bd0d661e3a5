"""An in-memory network of Raft cores, and a seeded simulation over it.

How this works: `Network` holds RawNodes with MemoryStorages (the "disk":
what advance() stored survives `crash()`, unstable entries do not). `process()`
runs every node's Ready cycle — persist, then collect messages, then apply —
and delivers messages through filters (`drop`, `cut`, `isolate`), so a test
can script exact scenarios. `simulate(seed)` drives random ticks, proposals,
reads, loss, duplication, delay, reordering, partitions and crashes from one seed and checks Raft's safety properties
after every step; a failing seed replays exactly:

    python -m tools.raft_sim SEED [STEPS]
"""

from __future__ import annotations

import random
import sys

from actors.raft import ROLE_LEADER, Config, ConfState, MemoryStorage, ProposalDropped, RawNode, ReadIndexDropped


class Network:
    def __init__(self, ids: list[int], seed: int = 1, **config_overrides):
        self.ids = sorted(ids)
        self.rng = random.Random(seed)
        self.config_overrides = dict(election_ticks=10, heartbeat_ticks=1)
        self.config_overrides.update(config_overrides)
        self.storages = {node_id: MemoryStorage(ConfState(tuple(self.ids))) for node_id in self.ids}
        self.nodes: dict[int, RawNode] = {}
        for node_id in self.ids:
            self.start(node_id)
        self.in_flight: list = []
        self.dropped: set[tuple[int, int]] = set()
        self.drop_probability = 0.0
        self.duplicate_probability = 0.0
        self.reorder = False
        self.delayed: list = []  # held back until the next tick (late, stale messages)
        self.delay_probability = 0.0
        self.applied: dict[int, list] = {node_id: [] for node_id in self.ids}
        self.read_states: dict[int, list] = {node_id: [] for node_id in self.ids}
        self.delivered_count = 0

    def start(self, node_id: int) -> None:
        config = Config(id=node_id, **self.config_overrides)
        self.nodes[node_id] = RawNode(config, self.storages[node_id], random.Random(self.rng.random()))

    def crash(self, node_id: int) -> None:
        """Lose everything not durable (unstable entries, volatile state), restart."""
        self.in_flight = [message for message in self.in_flight if message.to != node_id]
        self.delayed = [message for message in self.delayed if message.to != node_id]
        self.applied[node_id] = []
        self.start(node_id)

    # ---- filters ----------------------------------------------------------------

    def cut(self, a: int, b: int) -> None:
        self.dropped |= {(a, b), (b, a)}

    def isolate(self, node_id: int) -> None:
        for other in self.ids:
            if other != node_id:
                self.cut(node_id, other)

    def recover(self) -> None:
        self.dropped = set()
        self.drop_probability = 0.0
        self.duplicate_probability = 0.0
        self.delay_probability = 0.0
        self.reorder = False

    # ---- driving ----------------------------------------------------------------

    def tick(self, node_id: int | None = None, times: int = 1) -> None:
        for _ in range(times):
            self.in_flight.extend(self.delayed)
            self.delayed = []
            for target in ([node_id] if node_id else self.ids):
                self.nodes[target].tick()
            self.process()

    def process(self, max_rounds: int = 1000) -> None:
        """Run Ready cycles and deliver messages until quiet (bounded)."""
        for _ in range(max_rounds):
            progressed = False
            for node_id in self.ids:
                node = self.nodes[node_id]
                if node.has_ready():
                    progressed = True
                    self._handle_ready(node_id, node)
            if self.in_flight:
                progressed = True
                messages, self.in_flight = self.in_flight, []
                if self.reorder:
                    self.rng.shuffle(messages)
                for message in messages:
                    self.nodes[message.to].step(message)
                    self.delivered_count += 1
            if not progressed:
                return
        raise AssertionError("network did not quiesce")

    def _handle_ready(self, node_id: int, node: RawNode) -> None:
        ready = node.ready()
        # Persist (advance() moves entries into the MemoryStorage), then send, then apply.
        for message in ready.messages:
            if (message.sender, message.to) in self.dropped:
                continue
            if self.drop_probability and self.rng.random() < self.drop_probability:
                continue
            if self.delay_probability and self.rng.random() < self.delay_probability:
                self.delayed.append(message)
                continue
            self.in_flight.append(message)
            if self.duplicate_probability and self.rng.random() < self.duplicate_probability:
                self.in_flight.append(message)
        self.applied[node_id].extend(ready.committed_entries)
        self.read_states[node_id].extend(ready.read_states)
        node.advance(ready)

    def leader(self) -> int | None:
        leaders = [node_id for node_id in self.ids if self.nodes[node_id].raft.role == ROLE_LEADER]
        return max(leaders, key=lambda node_id: self.nodes[node_id].raft.term) if leaders else None

    def elect(self, node_id: int) -> None:
        self.nodes[node_id].campaign()
        self.process()

    def propose(self, node_id: int, data: bytes) -> int:
        index = self.nodes[node_id].propose(data)
        self.process()
        return index

    def raft(self, node_id: int):
        return self.nodes[node_id].raft


# ---- invariants ---------------------------------------------------------------------

class Invariants:
    """Raft's safety properties (§5.2 Figure 3), checked across the run."""

    def __init__(self, network: Network):
        self.network = network
        self.leader_of_term: dict[int, int] = {}
        self.committed: dict[int, tuple[int, bytes]] = {}  # index -> (term, data)

    def check(self) -> None:
        network = self.network
        for node_id in network.ids:
            raft = network.raft(node_id)
            if raft.role == ROLE_LEADER:
                # Election safety: at most one leader per term.
                previous = self.leader_of_term.setdefault(raft.term, node_id)
                assert previous == node_id, f"two leaders in term {raft.term}: {previous}, {node_id}"
            # State machine safety: whatever a node applied is what everyone applies.
            for entry in network.applied[node_id]:
                known = self.committed.setdefault(entry.index, (entry.term, entry.data))
                assert known == (entry.term, entry.data), f"node {node_id} applied a different entry {entry.index}"
            applied = [entry.index for entry in network.applied[node_id]]
            assert applied == list(range(applied[0], applied[0] + len(applied))) if applied else True
        # Log matching (§5.3): same index and term => same prefix (checked on the last common entry).
        for a in network.ids:
            for b in network.ids:
                if a < b:
                    self._check_log_matching(network.raft(a).log, network.raft(b).log)

    @staticmethod
    def _check_log_matching(log_a, log_b) -> None:
        high = min(log_a.last_index(), log_b.last_index())
        low = max(log_a.first_index(), log_b.first_index())
        for index in range(high, low - 1, -1):
            if log_a.term(index) == log_b.term(index):
                for earlier in range(low, index + 1):
                    assert log_a.term(earlier) == log_b.term(earlier), f"log matching broken at {earlier}"
                return


def simulate(seed: int, steps: int = 400, size: int = 3) -> Network:
    """Random ticks, proposals, drops, partitions and crashes; invariants after every step."""
    rng = random.Random(seed)
    network = Network(list(range(1, size + 1)), seed=seed)
    invariants = Invariants(network)
    proposals = 0
    for _ in range(steps):
        action = rng.random()
        if action < 0.55:
            network.tick(rng.choice(network.ids))
        elif action < 0.80:
            leader = network.leader()
            if leader is not None:
                proposals += 1
                try:
                    network.nodes[leader].propose(b"p%d" % proposals)
                except ProposalDropped:
                    pass
                network.process()
        elif action < 0.85:
            node_id = rng.choice(network.ids)
            try:
                network.nodes[node_id].read_index(("read", proposals))
            except ReadIndexDropped:
                pass
            network.process()
        elif action < 0.90:
            network.isolate(rng.choice(network.ids))
        elif action < 0.93:
            network.drop_probability = rng.choice([0.0, 0.1, 0.3])
            network.duplicate_probability = rng.choice([0.0, 0.1])
            network.delay_probability = rng.choice([0.0, 0.2])
            network.reorder = rng.random() < 0.5
        elif action < 0.97:
            network.recover()
        else:
            network.crash(rng.choice(network.ids))
        invariants.check()
    # Heal and let it settle: a leader emerges and everything committed is applied everywhere.
    network.recover()
    for _ in range(200):
        network.tick()
        invariants.check()
    return network


def main(argv: list[str]) -> int:
    seed = int(argv[1]) if len(argv) > 1 else 1
    steps = int(argv[2]) if len(argv) > 2 else 400
    network = simulate(seed, steps)
    for node_id in network.ids:
        print(node_id, network.nodes[node_id].status())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
