"""quorumctl's command line: etcdctl 3.4's commands, flags, checks and exit codes.

How this works: one argparse tree mirrors etcdctl's cobra commands. Global
flags are accepted before or after the command (as cobra does) by adding
them to every sub-parser with SUPPRESS defaults. The get/put/del option sets
are shared with txn's request lines, and `get_request` / `put_request` /
`delete_request` turn parsed options into request bodies with etcdctl's own
argument checks and messages.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from protocol import messages
from protocol.client import DEFAULT_ENDPOINT, ops
from tools.ctl_format import go_quote

# etcdctl's exit codes (etcdctl/ctlv3/command/error.go).
EXIT_SUCCESS = 0
EXIT_ERROR = 1
EXIT_BAD_CONNECTION = 2
EXIT_INVALID_INPUT = 3
EXIT_BAD_FEATURE = 4
EXIT_INTERRUPTED = 5
EXIT_IO = 6
EXIT_BAD_ARGS = 128


class CtlError(Exception):
    """A failure quorumctl reports as "Error: MESSAGE" with an exit code."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


def go_parse_int(text: str, base: int = 10) -> int:
    """Go's strconv.ParseInt(text, base, 64), with its error text."""
    digits = "0-9" if base == 10 else "0-9a-fA-F"
    if not re.fullmatch(rf"[+-]?[{digits}]+", text):
        raise CtlError(EXIT_ERROR, f"strconv.ParseInt: parsing {go_quote(text)}: invalid syntax")
    value = int(text, base)
    if not -(1 << 63) <= value < (1 << 63):
        raise CtlError(EXIT_ERROR, f"strconv.ParseInt: parsing {go_quote(text)}: value out of range")
    return value


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def go_parse_duration(text: str) -> float:
    """Go's time.ParseDuration ("5s", "1m30s", "250ms") -> seconds."""
    if text == "0":
        return 0.0
    if not text or _DURATION_PART.sub("", text) != "":
        raise argparse.ArgumentTypeError(f'time: invalid duration "{text}"')
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in _DURATION_PART.findall(text))


class _Parser(argparse.ArgumentParser):
    """argparse, with cobra's (etcdctl's) wording for the two common mistakes."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # pflag takes no abbreviations
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        choice = re.match(r"argument <(?:sub)?command>: invalid choice: '([^']*)'", message)
        if choice:
            message = f'unknown command "{choice.group(1)}" for "{self.prog}"'
        elif message.startswith("unrecognized arguments: "):
            message = "unknown flag: " + message.split(": ", 1)[1].split()[0]
        raise CtlError(EXIT_ERROR, message)


# ---------------------------------------------------------------------------
# Global flags.


def _env(name: str, default: str) -> str:
    return os.environ.get(f"QUORUMCTL_{name}") or os.environ.get(f"ETCDCTL_{name}") or default


def _add_global_flags(parser: argparse.ArgumentParser, with_defaults: bool) -> None:
    def default(value):
        return value if with_defaults else argparse.SUPPRESS

    parser.add_argument("--endpoints", default=default(_env("ENDPOINTS", DEFAULT_ENDPOINT)),
                        help="ZeroMQ endpoints of the node's gateways (comma separated)")
    parser.add_argument("-w", "--write-out", default=default(_env("WRITE_OUT", "simple")),
                        help="set the output format (fields, json, simple, table)")
    parser.add_argument("--hex", action="store_true",
                        default=default(_env("HEX", "false").lower() in ("1", "true")),
                        help="print byte strings as hex encoded strings")
    parser.add_argument("--command-timeout", type=go_parse_duration,
                        default=default(go_parse_duration(_env("COMMAND_TIMEOUT", "5s"))),
                        help="timeout for short running command (excluding dial timeout)")
    parser.add_argument("--dial-timeout", type=go_parse_duration,
                        default=default(go_parse_duration(_env("DIAL_TIMEOUT", "2s"))),
                        help="dial timeout for client connections")


# ---------------------------------------------------------------------------
# get / put / del options (shared with txn request lines).


def add_get_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*")
    parser.add_argument("--consistency", default="l", help="Linearizable(l) or Serializable(s)")
    parser.add_argument("--order", default="", help="Order of results; ASCEND or DESCEND (ASCEND by default)")
    parser.add_argument("--sort-by", default="", help="Sort target; CREATE, KEY, MODIFY, VALUE, or VERSION")
    parser.add_argument("--limit", type=int, default=0, help="Maximum number of results")
    parser.add_argument("--prefix", action="store_true", help="Get keys with matching prefix")
    parser.add_argument("--from-key", action="store_true",
                        help="Get keys that are greater than or equal to the given key using byte compare")
    parser.add_argument("--rev", type=int, default=0, help="Specify the kv revision")
    parser.add_argument("--keys-only", action="store_true", help="Get only the keys")
    parser.add_argument("--count-only", action="store_true", help="Get only the count")
    parser.add_argument("--print-value-only", action="store_true",
                        help='Only write values when using the "simple" output format')


def add_put_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*")
    parser.add_argument("--lease", default="0", help="lease ID (in hexadecimal) to attach to the key")
    parser.add_argument("--prev-kv", action="store_true", help="return the previous key-value pair before modification")
    parser.add_argument("--ignore-value", action="store_true", help="updates the key using its current value")
    parser.add_argument("--ignore-lease", action="store_true", help="updates the key using its current lease")


def add_del_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*")
    parser.add_argument("--prefix", action="store_true", help="delete keys with matching prefix")
    parser.add_argument("--prev-kv", action="store_true", help="return deleted key-value pairs")
    parser.add_argument("--from-key", action="store_true",
                        help="delete keys that are greater than or equal to the given key using byte compare")


_SORT_ORDERS = {"ASCEND": messages.SORT_ASCEND, "DESCEND": messages.SORT_DESCEND, "": messages.SORT_NONE}
_SORT_TARGETS = {"CREATE": messages.SORT_BY_CREATE, "KEY": messages.SORT_BY_KEY,
                 "MODIFY": messages.SORT_BY_MOD, "VALUE": messages.SORT_BY_VALUE,
                 "VERSION": messages.SORT_BY_VERSION, "": messages.SORT_BY_KEY}


def _check_key_range_args(command: str, options) -> None:
    if not 1 <= len(options.args) <= 2:
        raise CtlError(EXIT_BAD_ARGS, f"{command} command needs one argument as key and an optional argument as range_end")
    if options.prefix and options.from_key:
        raise CtlError(EXIT_BAD_ARGS, "`--prefix` and `--from-key` cannot be set at the same time, choose one")
    if (options.prefix or options.from_key) and len(options.args) > 1:
        raise CtlError(EXIT_BAD_ARGS, "too many arguments, only accept one argument when `--prefix` or `--from-key` is set")


def _arg_bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def get_request(options, stdin=None) -> tuple[str, dict]:
    _check_key_range_args("get", options)
    consistency = {"l": False, "s": True}.get(options.consistency)
    if consistency is None:
        raise CtlError(EXIT_BAD_FEATURE, f'unknown consistency flag "{options.consistency}"')
    order = _SORT_ORDERS.get(options.order.upper())
    if order is None:
        raise CtlError(EXIT_BAD_FEATURE, f"bad sort order {options.order}")
    target = _SORT_TARGETS.get(options.sort_by.upper())
    if target is None:
        raise CtlError(EXIT_BAD_FEATURE, f"bad sort target {options.sort_by}")
    if target == messages.SORT_BY_KEY and order == messages.SORT_ASCEND:
        order = messages.SORT_NONE  # clientv3.WithSort: ascending by key is the default
    key = _arg_bytes(options.args[0])
    range_end = _arg_bytes(options.args[1]) if len(options.args) > 1 else b""
    return ops.get(key, range_end, prefix=options.prefix, from_key=options.from_key,
                   revision=max(options.rev, 0), limit=max(options.limit, 0),
                   sort_order=order, sort_target=target, serializable=consistency,
                   keys_only=options.keys_only, count_only=options.count_only)


def put_request(options, stdin=None) -> tuple[str, dict]:
    if not options.args:
        raise CtlError(EXIT_BAD_ARGS, "put command needs 1 argument and input from stdin or 2 arguments")
    key = _arg_bytes(options.args[0])
    if options.ignore_value and len(options.args) > 1:
        raise CtlError(EXIT_BAD_ARGS, "put command needs only 1 argument when 'ignore-value' is set")
    value = b""
    if not options.ignore_value:
        if len(options.args) > 1:
            value = _arg_bytes(options.args[1])
        elif stdin is not None:
            value = stdin.read()
        else:
            raise CtlError(EXIT_BAD_ARGS, "put command needs 1 argument and input from stdin or 2 arguments")
    try:
        lease = go_parse_int(options.lease, 16)
    except CtlError as error:
        raise CtlError(EXIT_BAD_ARGS, f"bad lease ID ({error.message}), expecting ID in Hex") from None
    return ops.put(key, value, lease=lease, prev_kv=options.prev_kv,
                   ignore_value=options.ignore_value, ignore_lease=options.ignore_lease)


def delete_request(options, stdin=None) -> tuple[str, dict]:
    _check_key_range_args("del", options)
    key = _arg_bytes(options.args[0])
    range_end = _arg_bytes(options.args[1]) if len(options.args) > 1 else b""
    return ops.delete(key, range_end, prefix=options.prefix, from_key=options.from_key, prev_kv=options.prev_kv)


TXN_REQUEST_BUILDERS = {"get": get_request, "put": put_request, "del": delete_request}
_TXN_OPTION_ADDERS = {"get": add_get_options, "put": add_put_options, "del": add_del_options}


def parse_txn_request(command: str, args: list[str]):
    parser = _Parser(prog=command, add_help=False)
    _TXN_OPTION_ADDERS[command](parser)
    return parser.parse_args(args)


# ---------------------------------------------------------------------------
# The command tree. Each leaf sets `command` to its key in quorumctl.COMMANDS.


def _leaf(subparsers, name: str, command: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help_text)
    _add_global_flags(parser, with_defaults=False)
    parser.set_defaults(command=command)
    return parser


def _group(subparsers, name: str, help_text: str):
    parser = subparsers.add_parser(name, help=help_text)
    _add_global_flags(parser, with_defaults=False)
    parser.set_defaults(command=None, group=name)
    return parser.add_subparsers(dest=f"{name}_command", metavar="<subcommand>", parser_class=_Parser)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="quorumctl", description="A simple command line client for quorumkv (etcdctl 3.4 compatible).")
    _add_global_flags(parser, with_defaults=True)
    commands = parser.add_subparsers(dest="command_name", metavar="<command>", parser_class=_Parser)

    add_get_options(_leaf(commands, "get", "get", "Gets the key or a range of keys"))
    add_put_options(_leaf(commands, "put", "put", "Puts the given key into the store"))
    add_del_options(_leaf(commands, "del", "del", "Removes the specified key or range of keys [key, range_end)"))
    txn = _leaf(commands, "txn", "txn", "Txn processes all the requests in one transaction")
    txn.add_argument("args", nargs="*")
    txn.add_argument("-i", "--interactive", action="store_true", help="Input transaction in interactive mode")
    compaction = _leaf(commands, "compaction", "compaction", "Compacts the event history in etcd")
    compaction.add_argument("args", nargs="*")
    compaction.add_argument("--physical", action="store_true",
                            help="'true' to wait for compaction to physically remove all old revisions")
    defrag = _leaf(commands, "defrag", "defrag", "Defragments the storage of the etcd members with given endpoints")
    _leaf(commands, "version", "version", "Prints the version of quorumctl")

    alarm = _group(commands, "alarm", "Alarm related commands")
    _leaf(alarm, "list", "alarm list", "Lists all alarms")
    _leaf(alarm, "disarm", "alarm disarm", "Disarms all alarms")

    endpoint = _group(commands, "endpoint", "Endpoint related commands")
    endpoint_status = _leaf(endpoint, "status", "endpoint status",
                            "Prints out the status of endpoints specified in `--endpoints` flag")
    endpoint_health = _leaf(endpoint, "health", "endpoint health",
                            "Checks the healthiness of endpoints specified in `--endpoints` flag")
    hashkv = _leaf(endpoint, "hashkv", "endpoint hashkv", "Prints the KV history hash for each endpoint in --endpoints")
    hashkv.add_argument("--rev", type=int, default=0, help="maximum revision to hash (default: all revisions)")
    for leaf in (endpoint_status, endpoint_health, hashkv, defrag):
        leaf.add_argument("--cluster", action="store_true",
                          help="use all endpoints from the cluster member list")

    member = _group(commands, "member", "Membership related commands")
    member_add = _leaf(member, "add", "member add", "Adds a member into the cluster")
    member_add.add_argument("args", nargs="*")
    member_add.add_argument("--peer-urls", default="", help="comma separated peer URLs for the new member.")
    member_add.add_argument("--learner", action="store_true", help="indicates if the new member is raft learner")
    member_remove = _leaf(member, "remove", "member remove", "Removes a member from the cluster")
    member_remove.add_argument("args", nargs="*")
    member_update = _leaf(member, "update", "member update", "Updates a member in the cluster")
    member_update.add_argument("args", nargs="*")
    member_update.add_argument("--peer-urls", default="", help="comma separated peer URLs for the updated member.")
    _leaf(member, "list", "member list", "Lists all members in the cluster")
    member_promote = _leaf(member, "promote", "member promote", "Promotes a non-voting member in the cluster")
    member_promote.add_argument("args", nargs="*")
    move_leader = _leaf(commands, "move-leader", "move-leader", "Transfers leadership to another etcd cluster member.")
    move_leader.add_argument("args", nargs="*")

    snapshot = _group(commands, "snapshot", "Manages etcd node snapshots")
    save = _leaf(snapshot, "save", "snapshot save", "Stores an etcd node backend snapshot to a given file")
    save.add_argument("args", nargs="*")
    restore = _leaf(snapshot, "restore", "snapshot restore", "Restores an etcd member snapshot to an etcd directory")
    restore.add_argument("args", nargs="*")
    restore.add_argument("--data-dir", default="", help="Path to the data directory")
    restore.add_argument("--name", default="default", help="Human-readable name for this member")
    restore.add_argument("--initial-cluster", default="", help="Initial cluster configuration for restore bootstrap")
    restore.add_argument("--initial-cluster-token", default="etcd-cluster",
                         help="Initial cluster token for the etcd cluster during restore bootstrap")
    restore.add_argument("--initial-advertise-peer-urls", default="http://localhost:2380",
                         help="List of this member's peer URLs to advertise to the rest of the cluster")
    status = _leaf(snapshot, "status", "snapshot status", "Gets backend snapshot status of a given file")
    status.add_argument("args", nargs="*")

    lease = _group(commands, "lease", "Lease related commands")
    grant = _leaf(lease, "grant", "lease grant", "Creates leases")
    grant.add_argument("args", nargs="*")
    revoke = _leaf(lease, "revoke", "lease revoke", "Revokes leases")
    revoke.add_argument("args", nargs="*")
    ttl = _leaf(lease, "timetolive", "lease timetolive", "Get lease information")
    ttl.add_argument("args", nargs="*")
    ttl.add_argument("--keys", action="store_true", help="Get keys attached to this lease")
    _leaf(lease, "list", "lease list", "List all active leases")
    keep_alive = _leaf(lease, "keep-alive", "lease keep-alive", "Keeps leases alive (renew)")
    keep_alive.add_argument("args", nargs="*")
    keep_alive.add_argument("--once", action="store_true", help="Resets the keep-alive time to its original value and exits immediately")

    lock = _leaf(commands, "lock", "lock", "Acquires a named lock")
    lock.add_argument("args", nargs="*", help="<lockname> [exec-command arg1 arg2 ...] (a command after --)")
    lock.add_argument("--ttl", type=int, default=10, help="timeout for session")
    elect = _leaf(commands, "elect", "elect", "Observes and participates in leader election")
    elect.add_argument("args", nargs="*", help="<election-name> [proposal]")
    elect.add_argument("-l", "--listen", action="store_true", help="observation mode")

    from tools.ctl_watch import add_watch_options  # here: ctl_watch imports this module
    add_watch_options(_leaf(commands, "watch", "watch", "Watches events stream on keys or prefixes"))
    return parser


def _parse_with_separator(parser: argparse.ArgumentParser, argv: list[str]):
    """As pflag: words after "--" are positional, even after flags (`watch k --rev 3 -- cmd -x`)."""
    if "--" not in argv:
        return parser.parse_args(argv)
    split = argv.index("--")
    options = parser.parse_args(argv[:split])
    if not hasattr(options, "args"):
        return parser.parse_args(argv)  # this command takes no arguments: argparse's own error
    options.args = list(options.args or []) + argv[split + 1:]
    return options


def parse_args(argv: list[str]):
    parser = build_parser()
    options = _parse_with_separator(parser, list(argv))
    options.argv = list(argv)  # the raw words: `watch KEY -- COMMAND` needs to see the "--"
    if getattr(options, "command", None) is None:
        group = getattr(options, "group", None)
        if group is None:
            parser.print_help(sys.stderr)
            raise CtlError(EXIT_BAD_ARGS, "no command given")
        raise CtlError(EXIT_BAD_ARGS, f"{group} needs a subcommand")
    return options
