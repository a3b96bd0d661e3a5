"""quorumctl's cluster commands: member add/remove/update/list/promote, move-leader,
and the member list behind `endpoint ... --cluster`, as etcdctl 3.4 prints them.

How this works: each command is one request (member_* ops, move_leader) to
the first endpoint that answers (move-leader: to the endpoint whose status
says it leads, as etcdctl). The formatters below are registered into
tools.ctl_format.FORMATTERS under the kinds "member_list", "member_add",
"member_remove", "member_update", "member_promote" and "move_leader";
formats etcdctl 3.4 lacks for a kind (table for member add, ...) fail with
its "X not supported as output format" before anything is sent.

`endpoint status|health|hashkv --cluster` take the endpoints from the
member list's client URLs. A client URL names etcd's gRPC port; quorumctl
speaks the ZeroMQ protocol, which a member serves on that port + 3 unless
it was started with --listen-zmq-urls (actors.config.ZMQ_PORT_OFFSET), so
`cluster_endpoints` maps each URL to host:(port + 3) and keeps the URL for
display.
"""

from __future__ import annotations

from actors.config import ZMQ_PORT_OFFSET
from protocol.errors import QuorumError
from tools import ctl_format
from tools.ctl_args import EXIT_BAD_ARGS, EXIT_BAD_FEATURE, EXIT_ERROR, CtlError

# ---------------------------------------------------------------------------
# Formatters (pure).


def member_list_rows(response: dict) -> tuple[list[str], list[list[str]]]:
    header = ["ID", "Status", "Name", "Peer Addrs", "Client Addrs", "Is Learner"]
    rows = []
    for member in response.get("members") or []:
        rows.append([
            f"{member['ID']:x}",
            "started" if member.get("name") else "unstarted",
            member.get("name", ""),
            ",".join(member.get("peerURLs") or []),
            ",".join(member.get("clientURLs") or []),
            ctl_format.go_bool(member.get("isLearner", False)),
        ])
    return header, rows


def simple_member_list(response: dict, options: dict) -> str:
    return "".join(", ".join(row) + "\n" for row in member_list_rows(response)[1])


def json_member(member: dict) -> dict:
    # Go's encoding/json of etcdserverpb.Member: zero fields omitted.
    return ctl_format._omit_empty([
        ("ID", member.get("ID", 0)), ("name", member.get("name", "")),
        ("peerURLs", list(member.get("peerURLs") or [])), ("clientURLs", list(member.get("clientURLs") or [])),
        ("isLearner", member.get("isLearner", False)),
    ])


def _json_members(response: dict, with_member: bool = False) -> str:
    pairs = [("header", ctl_format.json_header(response.get("header")))]
    if with_member:
        pairs.append(("member", json_member(response.get("member") or {})))
    pairs.append(("members", [json_member(member) for member in response.get("members") or []]))
    return ctl_format.dumps(ctl_format._omit_empty(pairs))


def fields_member_list(response: dict, options: dict) -> str:
    text = ctl_format._fields_header(response.get("header"))
    for member in response.get("members") or []:
        text += f'"ID" : {member["ID"]}\n"Name" : {ctl_format.go_quote(member.get("name", ""))}\n'
        text += "".join(f'"PeerURL" : {ctl_format.go_quote(url)}\n' for url in member.get("peerURLs") or [])
        text += "".join(f'"ClientURL" : {ctl_format.go_quote(url)}\n' for url in member.get("clientURLs") or [])
        text += f'"IsLearner" : {ctl_format.go_bool(member.get("isLearner", False))}\n\n'
    return text


def _cluster_id(response: dict) -> int:
    return (response.get("header") or {}).get("cluster_id", 0)


def simple_member_add(response: dict, options: dict) -> str:
    # etcdctl 3.4.23 says "added to cluster" for a learner too.
    return f"Member {response['member']['ID']:16x} added to cluster {_cluster_id(response):16x}\n"


def _simple_member_done(verb: str):
    return lambda response, options: f"Member {options['member_id']:16x} {verb} cluster {_cluster_id(response):16x}\n"


def simple_move_leader(response: dict, options: dict) -> str:
    return f"Leadership transferred from {options['leader_id']:x} to {options['target_id']:x}\n"


def initial_cluster_lines(name: str, new_id: int, peer_urls: list[str], members: list[dict]) -> str:
    """etcdctl's environment lines after `member add` (its simple format only)."""
    pairs = []
    for member in members:
        member_name = name if member["ID"] == new_id else member.get("name", "")
        pairs.extend(f"{member_name}={url}" for url in member.get("peerURLs") or [])
    return ("\n"
            f"ETCD_NAME={ctl_format.go_quote(name)}\n"
            f"ETCD_INITIAL_CLUSTER={ctl_format.go_quote(','.join(pairs))}\n"
            f"ETCD_INITIAL_ADVERTISE_PEER_URLS={ctl_format.go_quote(','.join(peer_urls))}\n"
            'ETCD_INITIAL_CLUSTER_STATE="existing"\n')


FORMATTERS = {
    "simple": {
        "member_list": simple_member_list,
        "member_add": simple_member_add,
        "member_remove": _simple_member_done("removed from"),
        "member_update": _simple_member_done("updated in"),
        "member_promote": _simple_member_done("promoted in"),
        "move_leader": simple_move_leader,
    },
    "json": {
        "member_list": lambda response, options: _json_members(response),
        "member_add": lambda response, options: _json_members(response, with_member=True),
        "member_remove": lambda response, options: _json_members(response),
        "member_update": lambda response, options: _json_members(response),
        "member_promote": lambda response, options: _json_members(response),
        # etcdctl 3.4 prints an empty object for MoveLeaderResponse.
        "move_leader": lambda response, options: "{}\n",
    },
    "fields": {"member_list": fields_member_list},
    "table": {"member_list": lambda response, options: ctl_format.render_table(*member_list_rows(response))},
}
for _write_out, _formatters in FORMATTERS.items():
    ctl_format.FORMATTERS[_write_out].update(_formatters)


# ---------------------------------------------------------------------------
# Commands.


def _args(ctx) -> list[str]:
    return list(getattr(ctx.options, "args", []) or [])


def _require_format(ctx, kind: str) -> None:
    """etcdctl refuses a format its printer lacks for the command before sending."""
    if kind not in ctl_format.FORMATTERS[ctx.options.write_out]:
        raise CtlError(EXIT_BAD_FEATURE, f"{ctx.options.write_out} not supported as output format")


def _member_id_arg(ctx) -> int:
    args = _args(ctx)
    if len(args) != 1:
        raise CtlError(EXIT_BAD_ARGS, "member ID is not provided")
    return parse_hex_id(args[0], "bad member ID arg ({}), expecting ID in Hex")


def parse_hex_id(text: str, wrap: str = "{}") -> int:
    """Go's strconv.ParseUint(text, 16, 64), with etcdctl's message around its error."""
    try:
        if not text or text.startswith(("+", "-")) or "_" in text:
            raise ValueError
        value = int(text, 16)
    except ValueError:
        detail = f"strconv.ParseUint: parsing {ctl_format.go_quote(text)}: invalid syntax"
        raise CtlError(EXIT_BAD_ARGS, wrap.format(detail)) from None
    if value >= 1 << 64:
        detail = f"strconv.ParseUint: parsing {ctl_format.go_quote(text)}: value out of range"
        raise CtlError(EXIT_BAD_ARGS, wrap.format(detail))
    return value


def _peer_urls(ctx) -> list[str]:
    urls = [url.strip() for url in (ctx.options.peer_urls or "").split(",") if url.strip()]
    if not urls:
        raise CtlError(EXIT_BAD_ARGS, "member peer urls not provided")
    return urls


def cmd_member_list(ctx) -> int:
    _require_format(ctx, "member_list")
    ctx.emit("member_list", ctx.client().member_list())
    return 0


def cmd_member_add(ctx) -> int:
    args = _args(ctx)
    if len(args) < 1:
        raise CtlError(EXIT_BAD_ARGS, "member name not provided")
    if len(args) > 1:
        raise CtlError(EXIT_BAD_ARGS, f"too many arguments, did you mean --peer-urls={args[1]}")
    name = args[0]
    peer_urls = _peer_urls(ctx)
    _require_format(ctx, "member_add")
    client = ctx.client()
    response = client.member_add(peer_urls, is_learner=ctx.options.learner)
    ctx.emit("member_add", response)
    if ctx.options.write_out == "simple":
        # The member that answered has the new member in its list already.
        ctx.write(initial_cluster_lines(name, response["member"]["ID"], peer_urls, response.get("members") or []))
    return 0


def cmd_member_remove(ctx) -> int:
    member_id = _member_id_arg(ctx)
    _require_format(ctx, "member_remove")
    ctx.emit("member_remove", ctx.client().member_remove(member_id), member_id=member_id)
    return 0


def cmd_member_update(ctx) -> int:
    member_id = _member_id_arg(ctx)
    peer_urls = _peer_urls(ctx)
    _require_format(ctx, "member_update")
    ctx.emit("member_update", ctx.client().member_update(member_id, peer_urls), member_id=member_id)
    return 0


def cmd_member_promote(ctx) -> int:
    member_id = _member_id_arg(ctx)
    _require_format(ctx, "member_promote")
    ctx.emit("member_promote", ctx.client().member_promote(member_id), member_id=member_id)
    return 0


def cmd_move_leader(ctx) -> int:
    args = _args(ctx)
    if len(args) != 1:
        raise CtlError(EXIT_BAD_ARGS, "move-leader command needs 1 argument")
    target_id = parse_hex_id(args[0])
    # As etcdctl: ask each endpoint's status, send to the one that leads.
    leader_client, leader_id = None, 0
    for endpoint in ctx.endpoints:
        client = ctx.client([endpoint])
        status = client.status()
        member_id = (status.get("header") or {}).get("member_id", 0)
        if member_id and status.get("leader") == member_id:
            leader_client, leader_id = client, member_id
            break
    if leader_client is None:
        raise CtlError(EXIT_BAD_ARGS, f"no leader endpoint given at [{' '.join(ctx.endpoints)}]")
    _require_format(ctx, "move_leader")
    response = leader_client.move_leader(target_id)
    ctx.emit("move_leader", response, leader_id=leader_id, target_id=target_id)
    return 0


def cluster_endpoints(ctx) -> list[tuple[str, str]]:
    """(client URL as shown, ZeroMQ host:port) of every member, from the member list."""
    try:
        members = ctx.client().member_list().get("members") or []
    except QuorumError as error:
        raise CtlError(EXIT_ERROR, f"failed to fetch endpoints from etcd cluster member list: {error.message}") \
            from None
    endpoints = []
    for member in members:
        for url in member.get("clientURLs") or []:
            endpoints.append((url, zmq_endpoint_of(url)))
    return endpoints


def zmq_endpoint_of(client_url: str) -> str:
    from actors.config import parse_url

    host, port = parse_url(client_url)
    return f"{host}:{port + ZMQ_PORT_OFFSET}"
