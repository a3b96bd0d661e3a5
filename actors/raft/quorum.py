"""Majority arithmetic, pure functions over a sorted tuple of voter ids.

How this works: a value is committed when a majority of voters have it; the
committed index is the median-from-the-top of the voters' match indexes. A
vote is won with a majority of grants, lost when a majority is out of reach.
"""

from __future__ import annotations

VOTE_PENDING = "pending"
VOTE_WON = "won"
VOTE_LOST = "lost"


def majority(voter_count: int) -> int:
    return voter_count // 2 + 1


def committed_index(voters: tuple[int, ...], match_index: dict[int, int]) -> int:
    """The largest index that a majority of voters have (0 if none)."""
    if not voters:
        return 0
    matched = sorted((match_index.get(voter, 0) for voter in voters), reverse=True)
    return matched[majority(len(voters)) - 1]


def vote_result(voters: tuple[int, ...], votes: dict[int, bool]) -> str:
    granted = sum(1 for voter in voters if votes.get(voter) is True)
    rejected = sum(1 for voter in voters if votes.get(voter) is False)
    needed = majority(len(voters))
    if granted >= needed:
        return VOTE_WON
    if len(voters) - rejected < needed:
        return VOTE_LOST
    return VOTE_PENDING


def has_quorum(voters: tuple[int, ...], members: set[int]) -> bool:
    return sum(1 for voter in voters if voter in members) >= majority(len(voters))
