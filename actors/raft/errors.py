"""Named errors the core returns to its caller (expected failures).

A broken invariant is an AssertionError instead: the code is wrong, crash.
"""


class RaftError(Exception):
    pass


class ProposalDropped(RaftError):
    """This node cannot take a proposal now (not the leader)."""


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
