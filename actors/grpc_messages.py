"""etcd's protobuf messages <-> quorumkv's request and response dicts.

How this works: etcd's field names are ours (snake_case as in the .proto, and
etcd's camelCase ones such as `dbSize`, also accepted in snake_case), so a
request is copied field by field into a dict (`to_body`, leaving unset fields
to the schema's defaults) and a response dict into its message
(`to_message`, skipping quorumkv's own extra fields and absent messages).
The few ops whose etcd message differs from our dict beyond that go through
`core_request` / `etcd_answer`, which both front ends (gRPC, JSON) call.
Errors become etcd's gRPC status code and message (`abort`).
"""

from __future__ import annotations

import re

import grpc

from protocol.errors import QuorumError

_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


def to_body(message) -> dict:
    """A protobuf request as our request dict (unset fields left to the schema's defaults)."""
    body = {}
    for field, value in message.ListFields():
        if field.type == field.TYPE_MESSAGE:
            value = [to_body(item) for item in value] if field.is_repeated else to_body(value)
        elif field.is_repeated:
            value = list(value)
        body[field.name] = value
    return body


# etcd 3.4's AlarmResponse and DefragmentResponse carry no header.
HEADERLESS_OPS = frozenset({"alarm", "defragment"})


def core_request(op: str, message) -> dict:
    """The core's request dict for op from etcd's request message."""
    body = to_body(message)
    if op == "alarm" and "memberID" in body:
        body["member_id"] = body.pop("memberID")  # AlarmRequest's memberID; our alarm op's member_id
    return body


def etcd_answer(op: str, answer: dict) -> dict:
    """The core's answer to op as etcd's response message has it."""
    if op in HEADERLESS_OPS:
        return {key: value for key, value in answer.items() if key != "header"}
    return answer


_FIELD_MAPS: dict = {}


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def _field_map(descriptor) -> dict:
    """Our dict key -> protobuf field, for one message type (etcd's name and its snake_case)."""
    fields = _FIELD_MAPS.get(descriptor)
    if fields is None:
        fields = {}
        for field in descriptor.fields:
            fields[_snake(field.name)] = field
        for field in descriptor.fields:
            fields[field.name] = field
        _FIELD_MAPS[descriptor] = fields
    return fields


def _message_fields(descriptor, body: dict) -> dict:
    """Keyword arguments for a message: etcd's names, nested messages as dicts, no None."""
    fields = _field_map(descriptor)
    out = {}
    for name, value in body.items():
        field = fields.get(name)
        if field is None or value is None:
            continue  # fields of quorumkv's own, or an absent optional message
        if field.type == field.TYPE_MESSAGE and field.message_type.name != "KeyValue":
            if field.is_repeated:
                value = [_message_fields(field.message_type, item) for item in value]
            else:
                value = _message_fields(field.message_type, value)
        out[field.name] = value
    return out


def to_message(message_class, body: dict):
    return message_class(**_message_fields(message_class.DESCRIPTOR, body))


def abort(context, error: QuorumError):
    """End the RPC with etcd's gRPC status and message for a quorumkv error."""
    context.abort(_STATUS_CODES.get(error.grpc_status, grpc.StatusCode.UNKNOWN), error.message)
