"""Raft messages to and from plain msgpack-able lists (the peer wire). Pure.

How this works: a message is `[type_code, to, sender, term, *fields]`, the
fields in the order of the dataclass (`MESSAGE_TYPES` gives the codes, by
position: never reorder it, append only). Entries travel as
`[index, term, type, data]`, a snapshot marker as `[index, term, voters,
learners]`.
`decode` validates everything it builds (types, sizes are the transport's
business) and raises `WireError` on a peer's bad input, which the caller logs
and drops: a malformed message from a peer must not kill the log.
"""

from __future__ import annotations

import dataclasses

from actors.raft.messages import MESSAGE_TYPES, ConfState, Entry, Message, SnapshotMeta


class WireError(ValueError):
    """A peer sent something that is not a valid Raft message (the peer's fault)."""


_CODE_OF = {message_type: code for code, message_type in enumerate(MESSAGE_TYPES)}
# Field names after (to, sender, term), per type, in dataclass order.
_FIELDS = {
    message_type: tuple(f.name for f in dataclasses.fields(message_type) if f.name not in ("to", "sender", "term"))
    for message_type in MESSAGE_TYPES
}


def _encode_value(name: str, value):
    if name == "entries":
        return [tuple(entry) for entry in value]
    if name == "snapshot":
        return [value.index, value.term, list(value.conf_state.voters), list(value.conf_state.learners)]
    return value


def encode(message: Message) -> list:
    message_type = type(message)
    out = [_CODE_OF[message_type], message.to, message.sender, message.term]
    out.extend(_encode_value(name, getattr(message, name)) for name in _FIELDS[message_type])
    return out


def _int(value) -> int:
    if type(value) is not int:
        raise WireError(f"expected an integer, got {type(value).__name__}")
    return value


def _decode_entries(value) -> tuple:
    if not isinstance(value, list):
        raise WireError("entries must be a list")
    entries = []
    for item in value:
        if not isinstance(item, list) or len(item) != 4 or not isinstance(item[3], bytes):
            raise WireError("an entry is [index, term, type, data]")
        entries.append(Entry(_int(item[0]), _int(item[1]), _int(item[2]), item[3]))
    for previous, entry in zip(entries, entries[1:]):
        if entry.index != previous.index + 1:
            raise WireError("entries are not consecutive")
    return tuple(entries)


def _decode_context(value):
    # Contexts are opaque to the core; lists (msgpack has no tuples) become tuples.
    if isinstance(value, list):
        return tuple(_decode_context(item) for item in value)
    return value


def _decode_value(name: str, value):
    if name == "entries":
        return _decode_entries(value)
    if name == "snapshot":
        if (not isinstance(value, list) or len(value) != 4 or not isinstance(value[2], list)
                or not isinstance(value[3], list)):
            raise WireError("a snapshot is [index, term, voters, learners]")
        voters, learners = tuple(_int(v) for v in value[2]), tuple(_int(v) for v in value[3])
        try:
            return SnapshotMeta(_int(value[0]), _int(value[1]), ConfState(voters, learners))
        except ValueError as error:
            raise WireError(f"invalid snapshot configuration: {error}") from None
    if name == "context":
        return _decode_context(value)
    if name in ("reject", "transfer"):
        if type(value) is not bool:
            raise WireError(f"{name} must be a boolean")
        return value
    return _int(value)


def decode(value) -> Message:
    if not isinstance(value, list) or len(value) < 4:
        raise WireError("a message is [type, to, sender, term, ...]")
    code = _int(value[0])
    if not 0 <= code < len(MESSAGE_TYPES):
        raise WireError(f"unknown message type {code}")
    message_type = MESSAGE_TYPES[code]
    names = _FIELDS[message_type]
    if len(value) != 4 + len(names):
        raise WireError(f"{message_type.__name__} wants {4 + len(names)} items, got {len(value)}")
    fields = {name: _decode_value(name, item) for name, item in zip(names, value[4:])}
    entries = fields.get("entries")
    if entries and entries[0].index != fields["index"] + 1:
        raise WireError("MsgApp entries must follow its index")
    try:
        return message_type(to=_int(value[1]), sender=_int(value[2]), term=_int(value[3]), **fields)
    except (TypeError, ValueError) as error:
        raise WireError(f"invalid {message_type.__name__}: {error}") from None


__all__ = ["WireError", "encode", "decode"]
