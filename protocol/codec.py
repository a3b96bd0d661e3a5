"""The wire codec: msgpack frames for clients and for the actors.

How this works: a client frame is one ZeroMQ message part holding the
msgpack array [version, requests], each request [request_id, op, body];
the reply frame is [version, responses], each [request_id, status, body].
Many requests per frame is the fast path (Python pays per call, not per
byte). Decoding never raises anything but `QuorumError("MalformedFrame")`
so a bad frame is answered, logged and dropped, never fatal.

Pure: no sockets, no clock.
"""

from __future__ import annotations

import ormsgpack

from protocol.errors import QuorumError

PROTOCOL_VERSION = 1

# Response status values.
STATUS_OK = 0  # final, body is the response
STATUS_ERROR = 1  # final, body is {"code", "message"}
STATUS_PARTIAL = 2  # more responses follow for this request id (streams)


def pack(obj) -> bytes:
    return ormsgpack.packb(obj)


def unpack(data: bytes):
    """Decode msgpack; any failure becomes MalformedFrame."""
    try:
        return ormsgpack.unpackb(data)
    except (ormsgpack.MsgpackDecodeError, ValueError, TypeError) as exc:
        raise QuorumError("MalformedFrame", f"not msgpack: {exc}") from None


def encode_request_frame(requests: list) -> bytes:
    return pack([PROTOCOL_VERSION, requests])


def encode_response_frame(responses: list) -> bytes:
    return pack([PROTOCOL_VERSION, responses])


def decode_frame(data: bytes, max_frame_bytes: int, max_items: int) -> list:
    """Decode a client frame to its list of [request_id, op, body] items.

    Only the envelope is checked here; each item is validated on its own
    (see protocol.messages) so one bad request does not spoil its neighbours.
    """
    if len(data) > max_frame_bytes:
        raise QuorumError("RequestTooLarge", f"frame of {len(data)} bytes exceeds {max_frame_bytes}")
    frame = unpack(data)
    if not isinstance(frame, list) or len(frame) != 2:
        raise QuorumError("MalformedFrame", "a frame is [version, items]")
    version, items = frame
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise QuorumError("UnsupportedVersion", f"got {version!r}, this server speaks {PROTOCOL_VERSION}")
    if not isinstance(items, list):
        raise QuorumError("MalformedFrame", "items must be an array")
    if len(items) > max_items:
        raise QuorumError("TooManyRequests", f"{len(items)} requests in one frame, at most {max_items}")
    return items


def decode_response_frame(data: bytes) -> list:
    frame = unpack(data)
    if not isinstance(frame, list) or len(frame) != 2 or not isinstance(frame[1], list):
        raise QuorumError("MalformedFrame", "a response frame is [version, items]")
    if frame[0] != PROTOCOL_VERSION:
        raise QuorumError("UnsupportedVersion", f"server speaks {frame[0]!r}")
    return frame[1]
