"""Named errors the core returns to its caller (expected failures).

A broken invariant is an AssertionError instead: the code is wrong, crash.
"""


class RaftError(Exception):
    pass


class ProposalDropped(RaftError):
    """This node cannot take a proposal now (not the leader, or the leader is
    transferring leadership)."""


class ReadIndexDropped(RaftError):
    """This node cannot serve a read index now (no leader known)."""


class Compacted(RaftError):
    """The requested entries are below the storage's first index."""


class Unavailable(RaftError):
    """The requested entries are above the storage's last index."""


class UnknownMessageError(RaftError):
    """step() was given something outside the closed message set."""


class ConfigError(RaftError, ValueError):
    """The Raft configuration is inconsistent."""


class ConfChangePending(ProposalDropped):
    """A membership change is proposed but not yet applied (one at a time)."""


class ConfChangeInvalid(RaftError, ValueError):
    """A membership change that does not fit the current configuration."""


class MemberExists(ConfChangeInvalid):
    """add_voter/add_learner of a node that is already a voter or learner."""


class MemberNotFound(ConfChangeInvalid):
    """remove/promote/update of a node that is not a member."""


class MemberNotLearner(ConfChangeInvalid):
    """promote_learner of a voter."""


class RemovingLastVoter(ConfChangeInvalid):
    """remove of the only voter: the cluster could never commit again."""


class BadTransferee(RaftError, ValueError):
    """transfer_leader to a node that is not a voter of the configuration."""
