"""quorumctl's output formats, byte for byte as etcdctl 3.4 prints them.

How this works: every printable result has a kind ("get", "put", "del",
"txn", "endpoint_status", ...). `render(kind, write_out, data, options)`
looks up FORMATTERS[write_out][kind] and returns the text to print; a kind
a format lacks raises `UnsupportedFormat` ("table not supported as output
format", as etcdctl). Each formatter is a pure function of the response
dicts the client returns, so the tests check them without a server.

etcdctl's formats, mirrored here:
- simple: etcdctl's own lines ("OK", key/value lines, "lease ... granted").
- json: Go's encoding/json of etcd's structs: zero fields omitted
  (omitempty), []byte as base64, field names as etcd's json tags.
- fields: `"Name" : value` lines, strings quoted like Go's %q.
- table: olekukonko/tablewriter, header centred, cells right-aligned.

Text holds raw key/value bytes decoded with surrogateescape, so writing it
with the same error handler gives back the exact bytes.

Pure: no I/O.
"""

from __future__ import annotations

import base64
import json
import unicodedata

from protocol import messages


class UnsupportedFormat(Exception):
    def __init__(self, write_out: str):
        super().__init__(f"{write_out} not supported as output format")
        self.write_out = write_out


FORMATS = ("simple", "json", "fields", "table")


def raw(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------
# Go formatting helpers.


def go_quote(data: bytes | str) -> str:
    """Go's strconv.Quote (fmt %q) of a byte string."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    text = data.decode("utf-8", "surrogateescape")
    out = ['"']
    simple_escapes = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
                      "\t": "\\t", "\v": "\\v", '"': '\\"', "\\": "\\\\"}
    for char in text:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # an invalid UTF-8 byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char in simple_escapes:
            out.append(simple_escapes[char])
        elif _go_is_print(char):
            out.append(char)
        elif code < 0x80:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def _go_is_print(char: str) -> bool:
    if char == " ":
        return True
    return unicodedata.category(char)[0] in "LMNPS"


def hex_bytes(data: bytes) -> str:
    """etcdctl's --hex: every byte as \\xNN."""
    return "".join(f"\\x{byte:02x}" for byte in data)


def humanize_bytes(size: int) -> str:
    """go-humanize's Bytes (SI units): 20480 -> "20 kB"."""
    if size < 10:
        return f"{size} B"
    units = ("B", "kB", "MB", "GB", "TB", "PB", "EB")
    exponent = 0
    scaled = float(size)
    while scaled >= 1000 and exponent < len(units) - 1:
        scaled /= 1000
        exponent += 1
    value = int(size / 1000 ** exponent * 10 + 0.5) / 10
    pattern = "%.1f %s" if value < 10 else "%.0f %s"
    return pattern % (value, units[exponent])


def go_duration(seconds: float) -> str:
    """Go's time.Duration.String(): 0.001283209 -> "1.283209ms"."""
    nanoseconds = int(round(seconds * 1e9))
    if nanoseconds == 0:
        return "0s"
    sign = "-" if nanoseconds < 0 else ""
    nanoseconds = abs(nanoseconds)
    if nanoseconds < 1_000:
        return f"{sign}{nanoseconds}ns"
    if nanoseconds < 1_000_000:
        return sign + _fixed(nanoseconds, 3) + "µs"
    if nanoseconds < 1_000_000_000:
        return sign + _fixed(nanoseconds, 6) + "ms"
    hours, rest = divmod(nanoseconds, 3600 * 10**9)
    minutes, rest = divmod(rest, 60 * 10**9)
    text = _fixed(rest, 9) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{text}"
    if minutes:
        return f"{sign}{minutes}m{text}"
    return sign + text


def _fixed(value: int, decimals: int) -> str:
    whole, fraction = divmod(value, 10**decimals)
    digits = f"{fraction:0{decimals}d}".rstrip("0")
    return f"{whole}.{digits}" if digits else str(whole)


def go_bool(value: object) -> str:
    return "true" if value else "false"


# ---------------------------------------------------------------------------
# JSON: Go's encoding/json of etcd's (gogo-protobuf generated) structs.


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _omit_empty(pairs: list[tuple[str, object]]) -> dict:
    return {name: value for name, value in pairs if value not in (0, False, None, "", b"", [], {})}


def json_header(header: dict | None) -> dict | None:
    if not header:
        return None
    return _omit_empty([(name, header.get(name, 0)) for name in
                        ("cluster_id", "member_id", "revision", "raft_term")]) or {}


def json_kv(kv: dict) -> dict:
    return _omit_empty([
        ("key", _b64(kv.get("key", b"")) if kv.get("key") else None),
        ("create_revision", kv.get("create_revision", 0)),
        ("mod_revision", kv.get("mod_revision", 0)),
        ("version", kv.get("version", 0)),
        ("value", _b64(kv.get("value", b"")) if kv.get("value") else None),
        ("lease", kv.get("lease", 0)),
    ])


def json_range(response: dict) -> dict:
    return _omit_empty([
        ("header", json_header(response.get("header"))),
        ("kvs", [json_kv(kv) for kv in response.get("kvs") or []]),
        ("more", response.get("more", False)),
        ("count", response.get("count", 0)),
    ])


def json_put(response: dict) -> dict:
    prev = response.get("prev_kv")
    return _omit_empty([("header", json_header(response.get("header"))),
                        ("prev_kv", json_kv(prev) if prev else None)])


def json_delete(response: dict) -> dict:
    return _omit_empty([
        ("header", json_header(response.get("header"))),
        ("deleted", response.get("deleted", 0)),
        ("prev_kvs", [json_kv(kv) for kv in response.get("prev_kvs") or []]),
    ])


_JSON_TXN_RESPONSES = {
    "response_range": ("ResponseRange", json_range),
    "response_put": ("ResponsePut", json_put),
    "response_delete_range": ("ResponseDeleteRange", json_delete),
}


def json_txn(response: dict) -> dict:
    responses = []
    for item in response.get("responses") or []:
        (field, body), = item.items()
        if field == "response_txn":
            responses.append({"Response": {"ResponseTxn": json_txn(body)}})
        else:
            name, encode = _JSON_TXN_RESPONSES[field]
            responses.append({"Response": {name: encode(body)}})
    return _omit_empty([
        ("header", json_header(response.get("header"))),
        ("succeeded", response.get("succeeded", False)),
        ("responses", responses),
    ])


def _json_flat_header(response: dict) -> dict:
    """clientv3's lease responses embed *ResponseHeader: its fields inline."""
    return json_header(response.get("header")) or {}


def dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------
# Table: olekukonko/tablewriter as etcdctl configures it.


def render_table(header: list[str], rows: list[list[str]]) -> str:
    titles = [title.upper() for title in header]
    widths = [len(title) for title in titles]
    for row in rows:
        for index, cell in enumerate(row):
            widths[index] = max(widths[index], len(cell))
    border = "+" + "+".join("-" * (width + 2) for width in widths) + "+\n"

    def centre(text: str, width: int) -> str:
        gap = width - len(text)
        left = gap // 2
        return " " * left + text + " " * (gap - left)

    lines = [border, "|" + "|".join(f" {centre(t, w)} " for t, w in zip(titles, widths)) + "|\n", border]
    for row in rows:
        lines.append("|" + "|".join(f" {cell.rjust(w)} " for cell, w in zip(row, widths)) + "|\n")
    lines.append(border)
    return "".join(lines)


# ---------------------------------------------------------------------------
# Rows shared by the simple and table formats (etcdctl's make*Table).


def endpoint_status_rows(statuses: list[tuple[str, dict]]) -> tuple[list[str], list[list[str]]]:
    header = ["endpoint", "ID", "version", "db size", "is leader", "is learner", "raft term",
              "raft index", "raft applied index", "errors"]
    rows = []
    for endpoint, status in statuses:
        member_id = (status.get("header") or {}).get("member_id", 0)
        rows.append([
            endpoint,
            f"{member_id:x}",
            str(status.get("version", "")),
            humanize_bytes(int(status.get("db_size", 0))),
            go_bool(status.get("leader", 0) == member_id),
            go_bool(status.get("is_learner", False)),
            str(status.get("raft_term", 0)),
            str(status.get("raft_index", 0)),
            str(status.get("raft_applied_index", 0)),
            ", ".join(status.get("errors") or []),
        ])
    return header, rows


def endpoint_health_rows(healths: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["endpoint", "health", "took", "error"]
    rows = [[h["endpoint"], go_bool(h["health"]), h["took"], h.get("error", "")] for h in healths]
    return header, rows


def endpoint_hashkv_rows(hashes: list[tuple[str, dict]]) -> tuple[list[str], list[list[str]]]:
    return ["endpoint", "hash"], [[endpoint, str(h.get("hash", 0))] for endpoint, h in hashes]


def snapshot_status_rows(status: dict) -> tuple[list[str], list[list[str]]]:
    header = ["hash", "revision", "total keys", "total size"]
    return header, [[f"{status.get('hash', 0):x}", str(status.get("revision", 0)),
                     str(status.get("total_key", 0)), humanize_bytes(int(status.get("total_size", 0)))]]


# ---------------------------------------------------------------------------
# simple


def _simple_kv(kv: dict, options: dict) -> str:
    key, value = kv.get("key", b""), kv.get("value", b"")
    if options.get("hex"):
        key_text, value_text = hex_bytes(key), hex_bytes(value)
    else:
        key_text, value_text = raw(key), raw(value)
    if options.get("print_value_only"):
        return value_text + "\n"
    return key_text + "\n" + value_text + "\n"


def simple_get(response: dict, options: dict) -> str:
    return "".join(_simple_kv(kv, options) for kv in response.get("kvs") or [])


def simple_put(response: dict, options: dict) -> str:
    text = "OK\n"
    if response.get("prev_kv"):
        text += _simple_kv(response["prev_kv"], options)
    return text


def simple_del(response: dict, options: dict) -> str:
    text = f"{response.get('deleted', 0)}\n"
    return text + "".join(_simple_kv(kv, options) for kv in response.get("prev_kvs") or [])


_SIMPLE_TXN_RESPONSES = {"response_range": simple_get, "response_put": simple_put,
                         "response_delete_range": simple_del}


def simple_txn(response: dict, options: dict) -> str:
    parts = ["SUCCESS\n" if response.get("succeeded") else "FAILURE\n"]
    for item in response.get("responses") or []:
        parts.append("\n")
        (field, body), = item.items()
        if field in _SIMPLE_TXN_RESPONSES:
            parts.append(_SIMPLE_TXN_RESPONSES[field](body, options))
        else:
            parts.append(f"unexpected response {item!r}\n")
    return "".join(parts)


def simple_lease_grant(response: dict, options: dict) -> str:
    return f"lease {response.get('ID', 0):016x} granted with TTL({response.get('TTL', 0)}s)\n"


def simple_lease_revoke(response: dict, options: dict) -> str:
    return f"lease {options['lease_id']:016x} revoked\n"


def simple_lease_keep_alive(response: dict, options: dict) -> str:
    return f"lease {response.get('ID', 0):016x} keepalived with TTL({response.get('TTL', 0)})\n"


def simple_lease_time_to_live(response: dict, options: dict) -> str:
    lease_id = response.get("ID", options.get("lease_id", 0))
    granted, ttl = response.get("grantedTTL", 0), response.get("TTL", 0)
    if granted == 0 and ttl == -1:
        return f"lease {lease_id:016x} already expired\n"
    text = f"lease {lease_id:016x} granted with TTL({granted}s), remaining({ttl}s)"
    if options.get("keys"):
        text += ", attached keys([" + " ".join(raw(key) for key in response.get("keys") or []) + "])"
    return text + "\n"


def simple_lease_leases(response: dict, options: dict) -> str:
    leases = response.get("leases") or []
    return f"found {len(leases)} leases\n" + "".join(f"{lease.get('ID', 0):016x}\n" for lease in leases)


_ALARM_NAMES = {messages.ALARM_NONE: "NONE", messages.ALARM_NOSPACE: "NOSPACE",
                messages.ALARM_CORRUPT: "CORRUPT"}


def alarm_name(alarm: int) -> str:
    return _ALARM_NAMES.get(alarm, str(alarm))


def simple_alarm(response: dict, options: dict) -> str:
    # Go's %+v of an AlarmMember (gogo-protobuf String()), trailing space and all.
    lines = []
    for alarm in response.get("alarms") or []:
        text = ""
        if alarm.get("member_id"):
            text += f"memberID:{alarm['member_id']} "
        if alarm.get("alarm"):
            text += f"alarm:{alarm_name(alarm['alarm'])} "
        lines.append(text + "\n")
    return "".join(lines)


def simple_endpoint_status(statuses: list, options: dict) -> str:
    _header, rows = endpoint_status_rows(statuses)
    return "".join(", ".join(row) + "\n" for row in rows)


def simple_endpoint_health(healths: list, options: dict) -> str:
    # etcdctl writes these lines to stderr; the caller routes kind "endpoint_health" there.
    lines = []
    for health in healths:
        if not health.get("error"):
            lines.append(f"{health['endpoint']} is healthy: successfully committed proposal: took = {health['took']}\n")
        else:
            lines.append(f"{health['endpoint']} is unhealthy: failed to commit proposal: {health['error']}\n")
    return "".join(lines)


def simple_endpoint_hashkv(hashes: list, options: dict) -> str:
    _header, rows = endpoint_hashkv_rows(hashes)
    return "".join(", ".join(row) + "\n" for row in rows)


def simple_snapshot_status(status: dict, options: dict) -> str:
    _header, rows = snapshot_status_rows(status)
    return "".join(", ".join(row) + "\n" for row in rows)


# ---------------------------------------------------------------------------
# json


def json_lease_grant(response: dict, options: dict) -> str:
    body = _json_flat_header(response)
    body.update({"ID": response.get("ID", 0), "TTL": response.get("TTL", 0),
                 "Error": response.get("error", "") or ""})
    return dumps(body)


def json_lease_keep_alive(response: dict, options: dict) -> str:
    body = _json_flat_header(response)
    body.update({"ID": response.get("ID", 0), "TTL": response.get("TTL", 0)})
    return dumps(body)


def json_lease_time_to_live(response: dict, options: dict) -> str:
    body = _json_flat_header(response)
    keys = response.get("keys")
    body.update({
        "id": response.get("ID", options.get("lease_id", 0)),
        "ttl": response.get("TTL", 0),
        "granted-ttl": response.get("grantedTTL", 0),
        "keys": [_b64(key) for key in keys] if keys else None,
    })
    return dumps(body)


def json_lease_leases(response: dict, options: dict) -> str:
    body = _json_flat_header(response)
    body["leases"] = [{"id": lease.get("ID", 0)} for lease in response.get("leases") or []]
    return dumps(body)


def json_header_only(response: dict, options: dict) -> str:
    return dumps(_omit_empty([("header", json_header(response.get("header")))]))


def json_alarm(response: dict, options: dict) -> str:
    alarms = [_omit_empty([("memberID", a.get("member_id", 0)), ("alarm", a.get("alarm", 0))])
              for a in response.get("alarms") or []]
    # etcd's AlarmResponse carries no header (etcd 3.4 never fills it): etcdctl prints none.
    return dumps(_omit_empty([("alarms", alarms)]))


def json_status_body(status: dict) -> dict:
    return _omit_empty([
        ("header", json_header(status.get("header"))),
        ("version", status.get("version", "")),
        ("dbSize", status.get("db_size", 0)),
        ("leader", status.get("leader", 0)),
        ("raftIndex", status.get("raft_index", 0)),
        ("raftTerm", status.get("raft_term", 0)),
        ("raftAppliedIndex", status.get("raft_applied_index", 0)),
        ("errors", list(status.get("errors") or [])),
        ("dbSizeInUse", status.get("db_size_in_use", 0)),
        ("isLearner", status.get("is_learner", False)),
    ])


def json_endpoint_status(statuses: list, options: dict) -> str:
    return dumps([{"Endpoint": endpoint, "Status": json_status_body(status)} for endpoint, status in statuses])


def json_endpoint_health(healths: list, options: dict) -> str:
    out = []
    for health in healths:
        item = {"endpoint": health["endpoint"], "health": health["health"], "took": health["took"]}
        if health.get("error"):
            item["error"] = health["error"]
        out.append(item)
    return dumps(out)


def json_endpoint_hashkv(hashes: list, options: dict) -> str:
    out = []
    for endpoint, response in hashes:
        body = _omit_empty([("header", json_header(response.get("header"))),
                            ("hash", response.get("hash", 0)),
                            ("compact_revision", response.get("compact_revision", 0))])
        out.append({"Endpoint": endpoint, "HashKV": body})
    return dumps(out)


def json_snapshot_status(status: dict, options: dict) -> str:
    return dumps({"hash": status.get("hash", 0), "revision": status.get("revision", 0),
                  "totalKey": status.get("total_key", 0), "totalSize": status.get("total_size", 0)})


def _json_of(encode):
    return lambda response, options: dumps(encode(response))


# ---------------------------------------------------------------------------
# fields


def _fields_header(header: dict | None) -> str:
    header = header or {}
    return (f'"ClusterID" : {header.get("cluster_id", 0)}\n'
            f'"MemberID" : {header.get("member_id", 0)}\n'
            f'"Revision" : {header.get("revision", 0)}\n'
            f'"RaftTerm" : {header.get("raft_term", 0)}\n')


def _fields_kv(prefix: str, kv: dict) -> str:
    return (f'"{prefix}Key" : {go_quote(kv.get("key", b""))}\n'
            f'"{prefix}CreateRevision" : {kv.get("create_revision", 0)}\n'
            f'"{prefix}ModRevision" : {kv.get("mod_revision", 0)}\n'
            f'"{prefix}Version" : {kv.get("version", 0)}\n'
            f'"{prefix}Value" : {go_quote(kv.get("value", b""))}\n'
            f'"{prefix}Lease" : {kv.get("lease", 0)}\n')


def fields_get(response: dict, options: dict) -> str:
    text = _fields_header(response.get("header"))
    text += "".join(_fields_kv("", kv) for kv in response.get("kvs") or [])
    return text + f'"More" : {go_bool(response.get("more"))}\n"Count" : {response.get("count", 0)}\n'


def fields_put(response: dict, options: dict) -> str:
    text = _fields_header(response.get("header"))
    if response.get("prev_kv"):
        text += _fields_kv("Prev", response["prev_kv"])
    return text


def fields_del(response: dict, options: dict) -> str:
    text = _fields_header(response.get("header")) + f'"Deleted" : {response.get("deleted", 0)}\n'
    return text + "".join(_fields_kv("Prev", kv) for kv in response.get("prev_kvs") or [])


_FIELDS_TXN_RESPONSES = {"response_range": fields_get, "response_put": fields_put,
                         "response_delete_range": fields_del}


def fields_txn(response: dict, options: dict) -> str:
    text = _fields_header(response.get("header")) + f'"Succeeded" : {go_bool(response.get("succeeded"))}\n'
    for item in response.get("responses") or []:
        (field, body), = item.items()
        if field in _FIELDS_TXN_RESPONSES:
            text += _FIELDS_TXN_RESPONSES[field](body, options)
        else:
            text += f'"Unknown" : {go_quote(repr(body))}\n'
    return text


def fields_lease_grant(response: dict, options: dict) -> str:
    return _fields_header(response.get("header")) + f'"ID" : {response.get("ID", 0)}\n"TTL" : {response.get("TTL", 0)}\n'


fields_lease_keep_alive = fields_lease_grant


def fields_lease_time_to_live(response: dict, options: dict) -> str:
    text = _fields_header(response.get("header"))
    text += (f'"ID" : {response.get("ID", options.get("lease_id", 0))}\n"TTL" : {response.get("TTL", 0)}\n'
             f'"GrantedTTL" : {response.get("grantedTTL", 0)}\n')
    return text + "".join(f'"Key" : {go_quote(key)}\n' for key in response.get("keys") or [])


def fields_lease_leases(response: dict, options: dict) -> str:
    text = _fields_header(response.get("header"))
    return text + "".join(f'"ID" : {lease.get("ID", 0)}\n' for lease in response.get("leases") or [])


def fields_header_only(response: dict, options: dict) -> str:
    return _fields_header(response.get("header"))


def fields_alarm(response: dict, options: dict) -> str:
    # (etcdctl 3.4 crashes here when the response has no header; this prints zeros.)
    text = _fields_header(response.get("header"))
    for alarm in response.get("alarms") or []:
        text += f'"MemberID" : {alarm.get("member_id", 0)}\n"AlarmType" : {alarm_name(alarm.get("alarm", 0))}\n\n'
    return text


def _go_string_list(items: list[str]) -> str:
    return "[" + " ".join(items) + "]"


def fields_endpoint_status(statuses: list, options: dict) -> str:
    text = ""
    for endpoint, status in statuses:
        text += _fields_header(status.get("header"))
        text += (f'"Version" : {go_quote(str(status.get("version", "")))}\n'
                 f'"DBSize" : {status.get("db_size", 0)}\n'
                 f'"Leader" : {status.get("leader", 0)}\n'
                 f'"IsLearner" : {go_bool(status.get("is_learner"))}\n'
                 f'"RaftIndex" : {status.get("raft_index", 0)}\n'
                 f'"RaftTerm" : {status.get("raft_term", 0)}\n'
                 f'"RaftAppliedIndex" : {status.get("raft_applied_index", 0)}\n'
                 f'"Errors" : {_go_string_list(list(status.get("errors") or []))}\n'
                 f'"Endpoint" : {go_quote(endpoint)}\n\n')
    return text


def fields_endpoint_health(healths: list, options: dict) -> str:
    return "".join(f'"Endpoint" : {go_quote(h["endpoint"])}\n"Health" : {go_bool(h["health"])}\n'
                   f'"Took" : {h["took"]}\n"Error" : {h.get("error", "")}\n\n' for h in healths)


def fields_endpoint_hashkv(hashes: list, options: dict) -> str:
    return "".join(_fields_header(h.get("header")) + f'"Endpoint" : {go_quote(endpoint)}\n"Hash" : {h.get("hash", 0)}\n\n'
                   for endpoint, h in hashes)


def fields_snapshot_status(status: dict, options: dict) -> str:
    return (f'"Hash" : {status.get("hash", 0)}\n"Revision" : {status.get("revision", 0)}\n'
            f'"Keys" : {status.get("total_key", 0)}\n"Size" : {status.get("total_size", 0)}\n')


# ---------------------------------------------------------------------------
# table


def _table_of(rows_of):
    return lambda data, options: render_table(*rows_of(data))


FORMATTERS = {
    "simple": {
        "get": simple_get,
        "put": simple_put,
        "del": simple_del,
        "txn": simple_txn,
        "lease_grant": simple_lease_grant,
        "lease_revoke": simple_lease_revoke,
        "lease_keep_alive": simple_lease_keep_alive,
        "lease_time_to_live": simple_lease_time_to_live,
        "lease_leases": simple_lease_leases,
        "alarm": simple_alarm,
        "endpoint_status": simple_endpoint_status,
        "endpoint_health": simple_endpoint_health,
        "endpoint_hashkv": simple_endpoint_hashkv,
        "snapshot_status": simple_snapshot_status,
    },
    "json": {
        "get": _json_of(json_range),
        "put": _json_of(json_put),
        "del": _json_of(json_delete),
        "txn": _json_of(json_txn),
        "lease_grant": json_lease_grant,
        "lease_revoke": json_header_only,
        "lease_keep_alive": json_lease_keep_alive,
        "lease_time_to_live": json_lease_time_to_live,
        "lease_leases": json_lease_leases,
        "alarm": json_alarm,
        "endpoint_status": json_endpoint_status,
        "endpoint_health": json_endpoint_health,
        "endpoint_hashkv": json_endpoint_hashkv,
        "snapshot_status": json_snapshot_status,
    },
    "fields": {
        "get": fields_get,
        "put": fields_put,
        "del": fields_del,
        "txn": fields_txn,
        "lease_grant": fields_lease_grant,
        "lease_revoke": fields_header_only,
        "lease_keep_alive": fields_lease_keep_alive,
        "lease_time_to_live": fields_lease_time_to_live,
        "lease_leases": fields_lease_leases,
        "alarm": fields_alarm,
        "endpoint_status": fields_endpoint_status,
        "endpoint_health": fields_endpoint_health,
        "endpoint_hashkv": fields_endpoint_hashkv,
        "snapshot_status": fields_snapshot_status,
    },
    "table": {
        "endpoint_status": _table_of(endpoint_status_rows),
        "endpoint_health": _table_of(endpoint_health_rows),
        "endpoint_hashkv": _table_of(endpoint_hashkv_rows),
        "snapshot_status": _table_of(snapshot_status_rows),
    },
}


def render(kind: str, write_out: str, data, options: dict | None = None) -> str:
    formatter = FORMATTERS[write_out].get(kind)
    if formatter is None:
        raise UnsupportedFormat(write_out)
    return formatter(data, options or {})
