"""quorumctl txn's input language, as etcdctl 3.4 reads it.

Three blocks, each ended by an empty line: compares, success requests,
failure requests. A compare is `TARGET("key") OP "value"` with TARGET one
of version/ver, create/c, mod/m, value/val, lease and OP one of = == != < >.
A request is a get/put/del command line with the same flags as the
commands themselves; arguments may be "double quoted" (Go escapes) or
'single quoted'.

    mod("key1") > "0"

    put key1 "overwrote-key1"

    put key1 "created-key1"
    put key2 "some extra key"

Input that ends before a block's empty line is "Error: EOF" (exit 3), as in
etcdctl. The lease operand is a hexadecimal lease id, as everywhere else in
etcdctl (etcdctl 3.4 itself crashes on lease compares).

Pure: reads from the text stream it is given.
"""

from __future__ import annotations

import re
from typing import TextIO

from protocol import messages
from tools import ctl_args
from tools.ctl_args import EXIT_BAD_ARGS, EXIT_INVALID_INPUT, CtlError, go_parse_int
from tools.ctl_format import go_quote

_QUOTED = r'"(?:[^"\\]|\\.)*"'
_ARG = re.compile(_QUOTED + r"""|'[^']*'|[^'"\s]\S*[^'"\s]?""")

_TARGETS = {
    "ver": messages.TARGET_VERSION, "version": messages.TARGET_VERSION,
    "c": messages.TARGET_CREATE, "create": messages.TARGET_CREATE,
    "m": messages.TARGET_MOD, "mod": messages.TARGET_MOD,
    "val": messages.TARGET_VALUE, "value": messages.TARGET_VALUE,
    "lease": messages.TARGET_LEASE,
}
_TARGET_FIELDS = {
    messages.TARGET_VERSION: "version", messages.TARGET_CREATE: "create_revision",
    messages.TARGET_MOD: "mod_revision", messages.TARGET_VALUE: "value",
    messages.TARGET_LEASE: "lease",
}
_RESULTS = {"=": messages.COMPARE_EQUAL, "==": messages.COMPARE_EQUAL,
            "!=": messages.COMPARE_NOT_EQUAL, ">": messages.COMPARE_GREATER,
            "<": messages.COMPARE_LESS}

_TXN_REQUEST_FIELDS = {op: field for field, op in messages.TXN_REQUEST_OPS.items()}

_GO_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
               "\\": "\\", '"': '"', "'": "'"}


def go_unquote(quoted: str) -> bytes:
    """Go's strconv.Unquote of a "double quoted" string, to bytes."""
    if len(quoted) < 2 or quoted[0] != '"' or quoted[-1] != '"':
        raise ValueError("invalid syntax")
    body, out, index = quoted[1:-1], bytearray(), 0
    while index < len(body):
        char = body[index]
        if char != "\\":
            out += char.encode("utf-8", "surrogateescape")
            index += 1
            continue
        if index + 1 >= len(body):
            raise ValueError("invalid syntax")
        escape = body[index + 1]
        if escape in _GO_ESCAPES:
            out += _GO_ESCAPES[escape].encode()
            index += 2
        elif escape == "x":
            out.append(int(body[index + 2:index + 4], 16))
            index += 4
        elif escape in "uU":
            width = 4 if escape == "u" else 8
            out += chr(int(body[index + 2:index + 2 + width], 16)).encode()
            index += 2 + width
        elif escape in "01234567":
            out.append(int(body[index + 1:index + 4], 8))
            index += 4
        else:
            raise ValueError("invalid syntax")
    return bytes(out)


def argify(line: str) -> list[str]:
    """etcdctl's argify: split a request line into arguments."""
    args = []
    for arg in _ARG.findall(line):
        if arg.startswith("'"):
            arg = arg[1:-1]
        elif arg.startswith('"'):
            try:
                arg = go_unquote(arg).decode("utf-8", "surrogateescape")
            except ValueError:
                raise CtlError(EXIT_INVALID_INPUT, "invalid syntax") from None
        args.append(arg)
    return args


def _scan_quoted(text: str) -> tuple[bytes | None, str]:
    """Go's Sscanf %q: skip spaces, read a quoted string; (None, text) when there is none."""
    text = text.lstrip(" \t")
    match = re.match(_QUOTED, text)
    if not match:
        return None, text
    try:
        return go_unquote(match.group(0)), text[match.end():]
    except ValueError:
        return None, text


def parse_compare(line: str) -> dict:
    """One compare line -> a txn compare body (etcdctl's parseCompare)."""
    target_name, paren, rest = line.partition("(")
    if not paren:
        raise CtlError(EXIT_INVALID_INPUT, f"malformed comparison: {line}")
    key, op, value = b"", "", b""
    count = 0
    scanned, rest = _scan_quoted(rest)
    if scanned is not None:
        key, count = scanned, 1
        if rest.startswith(")"):
            token = re.match(r"\s*(\S+)", rest[1:])
            if token:
                op, count = token.group(1), 2
                scanned, rest = _scan_quoted(rest[1 + token.end():])
                if scanned is not None:
                    value, count = scanned, 3
    if count != 3:
        raise CtlError(EXIT_INVALID_INPUT, f"malformed comparison: {line}; got "
                       f"{target_name}({go_quote(key)}) {op} {go_quote(value)}")
    target = _TARGETS.get(target_name)
    if target is None:
        raise CtlError(EXIT_INVALID_INPUT, f"malformed comparison: {line} (unknown target {target_name})")
    result = _RESULTS.get(op)
    if result is None:
        raise CtlError(EXIT_INVALID_INPUT, f"invalid txn compare request: {line}")
    if target == messages.TARGET_VALUE:
        operand: bytes | int = value
    else:
        base = 16 if target == messages.TARGET_LEASE else 10
        try:
            operand = go_parse_int(value.decode("utf-8", "surrogateescape"), base)
        except CtlError:
            raise CtlError(EXIT_INVALID_INPUT, f"invalid txn compare request: {line}") from None
    return {"result": result, "target": target, "key": key, _TARGET_FIELDS[target]: operand}


def parse_request(line: str) -> dict:
    """One request line -> a txn branch item {"request_range"|"request_put"|"request_delete_range": body}."""
    args = argify(line)
    if len(args) < 2:
        raise CtlError(EXIT_INVALID_INPUT, f"invalid txn compare request: {line}")
    command, rest = args[0], args[1:]
    builder = ctl_args.TXN_REQUEST_BUILDERS.get(command)
    if builder is None:
        raise CtlError(EXIT_INVALID_INPUT, f"invalid txn request: {line}")
    try:
        options = ctl_args.parse_txn_request(command, rest)
    except CtlError as error:
        if error.exit_code == EXIT_BAD_ARGS:
            raise
        raise CtlError(EXIT_INVALID_INPUT, f"invalid txn request: {line}") from None
    op, body = builder(options, stdin=None)
    return {_TXN_REQUEST_FIELDS[op]: body}


def _read_line(stream: TextIO) -> str | None:
    """A line without its newline, or None for an empty line; EOF before a newline is an error."""
    line = stream.readline()
    if not line.endswith("\n"):
        raise CtlError(EXIT_INVALID_INPUT, "EOF")
    line = line.strip()
    return line or None


def read_compares(stream: TextIO) -> list[dict]:
    compares = []
    while (line := _read_line(stream)) is not None:
        compares.append(parse_compare(line))
    return compares


def read_requests(stream: TextIO) -> list[dict]:
    requests = []
    while (line := _read_line(stream)) is not None:
        requests.append(parse_request(line))
    return requests


def read_txn(stream: TextIO, prompt=None) -> dict:
    """The whole txn request body from `stream`; prompt(text) before each block when interactive."""
    say = prompt or (lambda text: None)
    say("compares:")
    compare = read_compares(stream)
    say("success requests (get, put, del):")
    success = read_requests(stream)
    say("failure requests (get, put, del):")
    failure = read_requests(stream)
    return {"compare": compare, "success": success, "failure": failure}
