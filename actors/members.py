"""The member table: who is in the cluster, with what URLs, and the checks etcd makes before a change.

How this works: a member record is etcd's Member message as a dict,
{"ID", "name", "peerURLs", "clientURLs", "isLearner"}. The table is
replicated state: it changes only when a conf-change entry (kinds of
actors.raft's ConfChange: add_voter, add_learner, promote_learner, remove,
update) is applied, and every member applies the same entries in the same
order, so every member holds the same table. The conf-change's `context` is
msgpack {"member": record, "origin": [member_id, gateway_identity,
request_id] | None}: the record the change sets (for update: only the
fields it names besides "ID"), and who to answer.

Where it is kept: the applier writes the table into the LMDB store (meta
key "members", with the index of the conf change that produced it) in the
same transaction as the entry, so a store snapshot carries it. At start the
raft log takes the table from the store (or, before the first conf change,
builds it from the initial-cluster flags: `initial_table`) and re-applies
conf changes of the WAL above the table's index; a change at or below it is
already in the table and is skipped.

Member IDs are deterministic: `member_id_for(peer URLs, cluster token)`, so
a member added with `member add` and the process started for it compute the
same ID (etcd mixes in the time; see README "Differences from etcd").

`apply_change` is tolerant by design: a member joining with
--initial-cluster-state existing starts from its flags (the members listed
there, itself as a learner) and receives the whole log, whose conf changes
may restate what its flags already said (add of a member it lists). Such a
change sets the record and is a no-op for the Raft configuration.

Pure: no I/O.
"""

from __future__ import annotations

import dataclasses

import ormsgpack

from actors.config import NodeConfig, member_id_for, parse_url
from protocol.errors import QuorumError

KINDS = ("add_voter", "add_learner", "promote_learner", "remove", "update")
# etcd 3.4's maxLearners: at most one learner in the cluster.
MAX_LEARNERS = 1
# etcd's readyPercent: a learner is "in sync" once its match index is at
# least this share of the leader's.
LEARNER_READY_PERCENT = 0.9
MAX_PEER_URLS = 16
MAX_URL_BYTES = 512
MAX_NAME_BYTES = 256
_UPDATE_FIELDS = ("name", "peerURLs", "clientURLs")


def record(member_id: int, name: str, peer_urls, client_urls=(), is_learner: bool = False) -> dict:
    return {"ID": member_id, "name": name, "peerURLs": list(peer_urls), "clientURLs": list(client_urls),
            "isLearner": bool(is_learner)}


@dataclasses.dataclass
class MemberTable:
    members: dict[int, dict]
    conf_index: int = 0  # the index of the last conf change applied (0: the initial table)

    def copy(self) -> "MemberTable":
        return MemberTable({member_id: dict(rec, peerURLs=list(rec["peerURLs"]), clientURLs=list(rec["clientURLs"]))
                            for member_id, rec in self.members.items()}, self.conf_index)

    def listed(self) -> list[dict]:
        """The records sorted by ID (etcd's member list order is by ID too)."""
        return [self.members[member_id] for member_id in sorted(self.members)]

    def voters(self) -> tuple[int, ...]:
        return tuple(sorted(i for i, rec in self.members.items() if not rec["isLearner"]))

    def learners(self) -> tuple[int, ...]:
        return tuple(sorted(i for i, rec in self.members.items() if rec["isLearner"]))

    def peer_url_owner(self, url: str) -> int | None:
        for member_id, rec in self.members.items():
            if url in rec["peerURLs"]:
                return member_id
        return None

    def to_wire(self) -> dict:
        return {"members": self.listed(), "conf_index": self.conf_index}

    @classmethod
    def from_wire(cls, value: dict) -> "MemberTable":
        return cls({rec["ID"]: rec for rec in value["members"]}, value["conf_index"])

    # ---- applying a committed change -------------------------------------------------

    def apply_change(self, kind: str, member_id: int, member: dict, index: int) -> None:
        """Apply a committed conf change (see the module docstring: tolerant)."""
        assert kind in KINDS, kind
        current = self.members.get(member_id)
        if kind in ("add_voter", "add_learner"):
            rec = record(member_id, member.get("name", ""), member.get("peerURLs", ()),
                         member.get("clientURLs", ()), kind == "add_learner")
            if current is not None and current["name"] and not rec["name"]:
                # A joining member's own record from its flags keeps its name
                # until it publishes (the same name, through the log).
                rec["name"], rec["clientURLs"] = current["name"], current["clientURLs"]
            self.members[member_id] = rec
        elif kind == "promote_learner":
            if current is not None:
                current["isLearner"] = False
        elif kind == "remove":
            self.members.pop(member_id, None)
        elif current is not None:  # update
            for field in _UPDATE_FIELDS:
                if field in member:
                    current[field] = list(member[field]) if field != "name" else member[field]
        self.conf_index = max(self.conf_index, index)


def initial_table(config: NodeConfig) -> MemberTable:
    """The table before any conf change: the --initial-cluster members (names
    from the flag, no client URLs until each publishes them, as etcd). A member
    joining an existing cluster counts itself a learner until the log says what
    it was added as: it must never campaign on a guess."""
    token = config.initial_cluster_token
    own_id = config.member_id()
    members = {}
    for name, urls in config.cluster_members().items():
        member_id = member_id_for(urls, token)
        is_learner = config.initial_cluster_state == "existing" and member_id == own_id
        members[member_id] = record(member_id, name, urls, (), is_learner)
    return MemberTable(members, 0)


# ---- conf-change context -------------------------------------------------------------


def pack_context(member: dict, origin: list | None) -> bytes:
    return ormsgpack.packb({"member": member, "origin": origin})


def unpack_context(context: bytes) -> tuple[dict, list | None]:
    value = ormsgpack.unpackb(context) if context else {}
    if not isinstance(value, dict):
        return {}, None
    member = value.get("member") if isinstance(value.get("member"), dict) else {}
    origin = value.get("origin")
    return member, origin if isinstance(origin, list) and len(origin) == 3 else None


# ---- request checks (the leader, before proposing) ------------------------------------


def check_peer_urls(urls: object) -> list[str]:
    if (not isinstance(urls, list) or not urls or len(urls) > MAX_PEER_URLS
            or not all(isinstance(url, str) and 0 < len(url) <= MAX_URL_BYTES for url in urls)):
        raise QuorumError("MemberBadURLs")
    for url in urls:
        try:
            parse_url(url)
        except ValueError:
            raise QuorumError("MemberBadURLs", url[:MAX_URL_BYTES]) from None
    return sorted(urls)


def started_voters(table: MemberTable) -> int:
    # etcd's Member.IsStarted: it has published its name.
    return sum(1 for rec in table.members.values() if not rec["isLearner"] and rec["name"])


def ready_to_add_voter(table: MemberTable) -> bool:
    """etcd's strict reconfig check (IsReadyToAddVotingMember): a started
    quorum of the bigger cluster; a one-member cluster may always grow."""
    started, voters = started_voters(table), len(table.voters())
    return (started == 1 and voters == 1) or started >= (voters + 1) // 2 + 1


def check_add(table: MemberTable, peer_urls: list[str], is_learner: bool, token: str) -> dict:
    """The record a member_add would add, or etcd's error."""
    member_id = member_id_for(tuple(peer_urls), token)
    if member_id in table.members:
        raise QuorumError("MemberExist")
    if any(table.peer_url_owner(url) is not None for url in peer_urls):
        raise QuorumError("PeerURLExist")
    if is_learner:
        if len(table.learners()) >= MAX_LEARNERS:
            raise QuorumError("TooManyLearners")
    elif not ready_to_add_voter(table):
        raise QuorumError("MemberNotEnoughStarted")
    return record(member_id, "", peer_urls, (), is_learner)


def check_remove(table: MemberTable, member_id: int) -> dict:
    rec = table.members.get(member_id)
    if rec is None:
        raise QuorumError("MemberNotFound")
    if not rec["isLearner"]:
        # etcd's isReadyToRemoveVotingMember: the rest keep a started quorum.
        remaining = len(table.voters()) - 1
        started = started_voters(table) - (1 if rec["name"] else 0)
        if remaining == 0 or started < remaining // 2 + 1:
            raise QuorumError("MemberNotEnoughStarted")
    return rec


def check_update(table: MemberTable, member_id: int, peer_urls: list[str]) -> dict:
    rec = table.members.get(member_id)
    if rec is None:
        raise QuorumError("MemberNotFound")
    for url in peer_urls:
        owner = table.peer_url_owner(url)
        if owner is not None and owner != member_id:
            raise QuorumError("PeerURLExist")
    return {"ID": member_id, "peerURLs": peer_urls}


def check_promote(table: MemberTable, member_id: int, learner_match: int, leader_match: int) -> dict:
    rec = table.members.get(member_id)
    if rec is None:
        raise QuorumError("MemberNotFound")
    if not rec["isLearner"]:
        raise QuorumError("MemberNotLearner")
    # etcd's IsReadyToPromoteMember: the learner counts as started.
    if started_voters(table) + 1 < (len(table.voters()) + 1) // 2 + 1:
        raise QuorumError("MemberNotEnoughStarted")
    if learner_match < leader_match * LEARNER_READY_PERCENT:
        raise QuorumError("LearnerNotReady")
    return {"ID": member_id}

