"""quorumctl: etcdctl 3.4's commands, flags and output, over quorumkv's ZeroMQ protocol.

How this works: `main()` parses the command line (tools.ctl_args), looks the
command up in COMMANDS (one function per command) and runs it with a
`Context` that makes clients and prints results through tools.ctl_format.
Failures become "Error: MESSAGE" on stderr and etcdctl's exit codes.

    quorumctl --endpoints 127.0.0.1:2382 put foo bar
    quorumctl get foo --prefix -w json
    quorumctl endpoint status -w table
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Callable

from protocol.client import Client, DeadlineExceededError
from protocol.errors import QuorumError
from tools import ctl_format, ctl_members
from tools.ctl_args import (
    EXIT_BAD_ARGS, EXIT_BAD_CONNECTION, EXIT_BAD_FEATURE, EXIT_ERROR, EXIT_INTERRUPTED,
    CtlError, delete_request, get_request, go_parse_int, parse_args, put_request,
)
from tools.ctl_txn import read_txn
from tools.ctl_recipes import cmd_elect, cmd_lock
from tools.ctl_watch import cmd_watch

VERSION = "3.4.0"
API_VERSION = "3.4"


def _error_text(error: QuorumError) -> str:
    # A request etcdctl's gRPC client would have given up on reads "context deadline exceeded".
    if isinstance(error, DeadlineExceededError):
        return "context deadline exceeded"
    return error.message


class Context:
    """What a command needs: its options, clients, and the printers."""

    def __init__(self, options, stdout: io.BufferedIOBase, stderr: io.BufferedIOBase, stdin):
        self.options = options
        self.stdout = stdout
        self.stderr = stderr
        self.stdin = stdin
        self._clients: list[Client] = []
        self._targets: list[tuple[str, str]] | None = None
        if options.write_out not in ctl_format.FORMATS:
            raise CtlError(EXIT_BAD_FEATURE, "unsupported output format")

    @property
    def endpoints(self) -> list[str]:
        return [e.strip() for e in self.options.endpoints.split(",") if e.strip()]

    def endpoint_targets(self) -> list[tuple[str, str]]:
        """(endpoint as printed, address to connect to): --endpoints, or with
        --cluster every member's client URL (tools.ctl_members)."""
        if self._targets is None:
            if getattr(self.options, "cluster", False):
                self._targets = ctl_members.cluster_endpoints(self)
            else:
                self._targets = [(endpoint, endpoint) for endpoint in self.endpoints]
        return self._targets

    def client(self, endpoints: list[str] | None = None) -> Client:
        """A client of the given endpoints (default: --endpoints).

        One command is one request or a few, so the client talks to the named
        gateway(s) only and skips the hello that finds the node's others.
        """
        client = Client(endpoints or self.endpoints, timeout_s=self.options.command_timeout,
                        connect_timeout_s=self.options.dial_timeout, discover_gateways=False)
        self._clients.append(client)
        return client

    def close(self) -> None:
        for client in self._clients:
            client.close()

    def write(self, text: str, to_stderr: bool = False) -> None:
        stream = self.stderr if to_stderr else self.stdout
        stream.write(text.encode("utf-8", "surrogateescape"))
        stream.flush()

    def emit(self, kind: str, data, **options) -> None:
        options.setdefault("hex", self.options.hex)
        text = ctl_format.render(kind, self.options.write_out, data, options)
        # etcdctl prints endpoint health's simple lines on stderr.
        to_stderr = kind == "endpoint_health" and self.options.write_out == "simple"
        self.write(text, to_stderr=to_stderr)


def _positional(options) -> list[str]:
    return list(getattr(options, "args", []) or [])


# ---------------------------------------------------------------------------
# KV commands.


def cmd_get(ctx: Context) -> int:
    options = ctx.options
    if options.print_value_only and options.write_out != "simple":
        raise CtlError(EXIT_BAD_ARGS, "print-value-only is only for `--write-out=simple`")
    if options.count_only and options.write_out != "fields":
        raise CtlError(EXIT_BAD_ARGS, "--count-only is only for `--write-out=fields`")
    op, body = get_request(options)
    response = ctx.client().request(op, body)
    ctx.emit("get", response, print_value_only=options.print_value_only)
    return 0


def cmd_put(ctx: Context) -> int:
    op, body = put_request(ctx.options, stdin=ctx.stdin)
    ctx.emit("put", ctx.client().request(op, body))
    return 0


def cmd_del(ctx: Context) -> int:
    op, body = delete_request(ctx.options)
    ctx.emit("del", ctx.client().request(op, body))
    return 0


def cmd_txn(ctx: Context) -> int:
    if _positional(ctx.options):
        raise CtlError(EXIT_BAD_ARGS, "txn command does not accept argument")
    text_stdin = io.TextIOWrapper(ctx.stdin, encoding="utf-8", errors="surrogateescape", newline="\n")
    prompt = (lambda text: ctx.write(text + "\n")) if ctx.options.interactive else None
    try:
        body = read_txn(text_stdin, prompt)
    finally:
        text_stdin.detach()  # leave the caller's stream open
    ctx.emit("txn", ctx.client().request("txn", body))
    return 0


def cmd_compaction(ctx: Context) -> int:
    args = _positional(ctx.options)
    if len(args) != 1:
        raise CtlError(EXIT_BAD_ARGS, "compaction command needs 1 argument")
    revision = go_parse_int(args[0])
    ctx.client().compact(revision, physical=ctx.options.physical)
    ctx.write(f"compacted revision {revision}\n")
    return 0


# ---------------------------------------------------------------------------
# Maintenance commands.


def cmd_defrag(ctx: Context) -> int:
    failed = False
    for endpoint, address in ctx.endpoint_targets():
        try:
            ctx.client([address]).defragment()
            ctx.write(f"Finished defragmenting etcd member[{endpoint}]\n")
        except QuorumError as error:
            ctx.write(f"Failed to defragment etcd member[{endpoint}] ({_error_text(error)})\n", to_stderr=True)
            failed = True
    return EXIT_ERROR if failed else 0


def cmd_alarm_list(ctx: Context) -> int:
    ctx.emit("alarm", ctx.client().alarm_list())
    return 0


def cmd_alarm_disarm(ctx: Context) -> int:
    ctx.emit("alarm", ctx.client().alarm_disarm())
    return 0


def _per_endpoint(ctx: Context, fetch: Callable[[Client], dict], what: str) -> tuple[list, str | None]:
    """(endpoint, response) for each endpoint that answered, and the last failure's text."""
    results, failure = [], None
    for endpoint, address in ctx.endpoint_targets():
        try:
            results.append((endpoint, fetch(ctx.client([address]))))
        except QuorumError as error:
            failure = _error_text(error)
            ctx.write(f"Failed to get the {what} of endpoint {endpoint} ({failure})\n", to_stderr=True)
    return results, failure


def cmd_endpoint_status(ctx: Context) -> int:
    statuses, failure = _per_endpoint(ctx, lambda client: client.status(), "status")
    ctx.emit("endpoint_status", statuses)
    return EXIT_ERROR if failure else 0


def cmd_endpoint_hashkv(ctx: Context) -> int:
    revision = ctx.options.rev
    hashes, failure = _per_endpoint(ctx, lambda client: client.hash_kv(revision), "hash")
    ctx.emit("endpoint_hashkv", hashes)
    if failure:
        raise CtlError(EXIT_ERROR, failure)  # etcdctl: after the table, "Error: <last failure>"
    return 0


def _check_health(ctx: Context, endpoint: str, address: str) -> dict:
    """etcdctl's health check: a linearizable read commits, and no alarm is raised."""
    started = time.monotonic()
    health = {"endpoint": endpoint, "health": False, "took": "", "error": ""}
    try:
        client = ctx.client([address])
        client.get("health")
        health["health"] = True
    except QuorumError as error:
        health["error"] = _error_text(error)
    health["took"] = ctl_format.go_duration(time.monotonic() - started)
    if health["health"]:
        try:
            alarms = client.alarm_list().get("alarms") or []
        except QuorumError:
            health["health"], health["error"] = False, "Unable to fetch the alarm list"
        else:
            if alarms:
                health["health"] = False
                health["error"] = "Active Alarm(s): " + "".join(
                    ctl_format.alarm_name(a.get("alarm", 0)) + " " for a in alarms)
    return health


def cmd_endpoint_health(ctx: Context) -> int:
    healths = [_check_health(ctx, endpoint, address) for endpoint, address in ctx.endpoint_targets()]
    # Healthy ones first, as etcdctl's concurrent checks tend to report them.
    healths.sort(key=lambda h: not h["health"])
    ctx.emit("endpoint_health", healths)
    if not all(h["health"] for h in healths):
        raise CtlError(EXIT_ERROR, "unhealthy cluster")
    return 0


def cmd_version(ctx: Context) -> int:
    ctx.write(f"quorumctl version: {VERSION}\nAPI version: {API_VERSION}\n")
    return 0


# ---------------------------------------------------------------------------
# Snapshots.


def cmd_snapshot_save(ctx: Context) -> int:
    args = _positional(ctx.options)
    if len(args) != 1:
        raise CtlError(EXIT_BAD_ARGS, "snapshot save expects one argument")
    path = args[0]
    endpoints = ctx.endpoints
    if len(endpoints) != 1:
        # etcdctl exits with ExitInterrupted (5) for every failure of the save itself.
        raise CtlError(EXIT_INTERRUPTED, "snapshot must be requested to one selected node, not multiple ["
                       + " ".join(endpoints) + "]")
    client = ctx.client(endpoints)
    interactive = hasattr(ctx.stderr, "isatty") and ctx.stderr.isatty()
    last_report = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last_report[0] >= 0.5 or done >= total:
            last_report[0] = now
            end = "\r" if interactive and done < total else "\n"
            ctx.write(f"downloading snapshot: {ctl_format.humanize_bytes(done)} / "
                      f"{ctl_format.humanize_bytes(total)}{end}", to_stderr=True)

    try:
        size = client.snapshot(path, progress=progress)
    except (QuorumError, OSError) as error:
        message = _error_text(error) if isinstance(error, QuorumError) else str(error)
        raise CtlError(EXIT_INTERRUPTED, message) from None
    ctx.write(f"fetched snapshot: {ctl_format.humanize_bytes(size)}\n", to_stderr=True)
    ctx.write(f"Snapshot saved at {path}\n")
    return 0


def _mvcc_store():
    # Imported only here: the offline snapshot commands need the store code,
    # the online ones must not pay for (or depend on) it.
    from actors.mvcc import MvccStore
    return MvccStore


def _stat_snapshot(path: str) -> None:
    try:
        os.stat(path)
    except OSError as error:
        reason = (error.strerror or str(error))
        raise CtlError(EXIT_ERROR, f"stat {path}: {reason[:1].lower()}{reason[1:]}") from None


def cmd_snapshot_status(ctx: Context) -> int:
    args = _positional(ctx.options)
    if len(args) != 1:
        raise CtlError(EXIT_BAD_ARGS, "snapshot status requires exactly one argument")
    _stat_snapshot(args[0])
    try:
        status = _mvcc_store().snapshot_status(args[0])
    except Exception as error:  # OSError, lmdb.Error: a file that is not a snapshot
        raise CtlError(EXIT_ERROR, str(error)) from None
    ctx.emit("snapshot_status", status)
    return 0


def cmd_snapshot_restore(ctx: Context) -> int:
    args = _positional(ctx.options)
    if len(args) != 1:
        raise CtlError(EXIT_BAD_ARGS, "snapshot restore requires exactly one argument")
    _stat_snapshot(args[0])
    data_dir = ctx.options.data_dir or f"{ctx.options.name}.qkv"
    if os.path.exists(data_dir):
        raise CtlError(EXIT_ERROR, f"data-dir {ctl_format.go_quote(data_dir)} exists")
    from actors.config import NodeConfig
    from actors.restore import restore_data_dir

    try:
        restore_data_dir(args[0], NodeConfig(
            name=ctx.options.name, data_dir=data_dir, initial_cluster=ctx.options.initial_cluster,
            initial_cluster_token=ctx.options.initial_cluster_token,
            initial_advertise_peer_urls=tuple(ctx.options.initial_advertise_peer_urls.split(","))))
    except OSError as error:
        raise CtlError(EXIT_ERROR, str(error)) from None
    ctx.write(f"restored snapshot {args[0]} to {data_dir}\n", to_stderr=True)
    return 0


# ---------------------------------------------------------------------------
# Leases.


def _lease_id_arg(ctx: Context, usage: str, bad: str) -> int:
    args = _positional(ctx.options)
    if len(args) != 1:
        raise CtlError(EXIT_BAD_ARGS, usage)
    try:
        return go_parse_int(args[0], 16)
    except CtlError as error:
        raise CtlError(EXIT_BAD_ARGS, f"{bad} ({error.message}), expecting ID in Hex") from None


def cmd_lease_grant(ctx: Context) -> int:
    args = _positional(ctx.options)
    if len(args) != 1:
        raise CtlError(EXIT_BAD_ARGS, "lease grant command needs TTL argument")
    try:
        ttl = go_parse_int(args[0])
    except CtlError as error:
        raise CtlError(EXIT_BAD_ARGS, f"bad TTL ({error.message})") from None
    try:
        response = ctx.client().lease_grant(ttl)
    except QuorumError as error:
        raise CtlError(EXIT_ERROR, f"failed to grant lease ({_error_text(error)})") from None
    ctx.emit("lease_grant", response)
    return 0


def cmd_lease_revoke(ctx: Context) -> int:
    lease_id = _lease_id_arg(ctx, "lease revoke command needs 1 argument", "bad lease ID arg")
    try:
        response = ctx.client().lease_revoke(lease_id)
    except QuorumError as error:
        raise CtlError(EXIT_ERROR, f"failed to revoke lease ({_error_text(error)})") from None
    ctx.emit("lease_revoke", response, lease_id=lease_id)
    return 0


def cmd_lease_timetolive(ctx: Context) -> int:
    lease_id = _lease_id_arg(ctx, "lease timetolive command needs lease ID as argument", "bad lease ID arg")
    try:
        response = ctx.client().lease_time_to_live(lease_id, keys=ctx.options.keys)
    except QuorumError as error:
        raise CtlError(EXIT_BAD_CONNECTION, _error_text(error)) from None
    ctx.emit("lease_time_to_live", response, lease_id=lease_id, keys=ctx.options.keys)
    return 0


def cmd_lease_list(ctx: Context) -> int:
    try:
        response = ctx.client().lease_leases()
    except QuorumError as error:
        raise CtlError(EXIT_BAD_CONNECTION, _error_text(error)) from None
    ctx.emit("lease_leases", response)
    return 0


def cmd_lease_keep_alive(ctx: Context) -> int:
    from protocol.lease import KeepAlive

    lease_id = _lease_id_arg(ctx, "lease keep-alive command needs lease ID as argument", "bad lease ID arg")
    client = ctx.client()
    if ctx.options.once:
        try:
            response = client.lease_keep_alive_once(lease_id)
        except QuorumError as error:
            raise CtlError(EXIT_BAD_CONNECTION, _error_text(error)) from None
        if response.get("TTL", 0) <= 0:  # clientv3's KeepAliveOnce turns TTL 0 into an error
            raise CtlError(EXIT_BAD_CONNECTION, QuorumError("LeaseNotFound").message)
        ctx.emit("lease_keep_alive", response)
        return 0
    # As etcdctl: renew at once, then at a third of the TTL, printing every
    # answer, until the lease is gone or could have expired unrenewed.
    keep_alive = KeepAlive(client, lease_id, on_renewed=lambda response: ctx.emit("lease_keep_alive", response))
    try:
        while not keep_alive.wait_lost(0.5):  # until lost or interrupted
            pass
    finally:
        keep_alive.stop()
    if ctx.options.write_out == "simple":
        ctx.write(f"lease {lease_id:016x} expired or revoked.\n")
    return 0


COMMANDS: dict[str, Callable[[Context], int]] = {
    "get": cmd_get,
    "put": cmd_put,
    "del": cmd_del,
    "txn": cmd_txn,
    "compaction": cmd_compaction,
    "defrag": cmd_defrag,
    "version": cmd_version,
    "alarm list": cmd_alarm_list,
    "alarm disarm": cmd_alarm_disarm,
    "endpoint status": cmd_endpoint_status,
    "endpoint health": cmd_endpoint_health,
    "endpoint hashkv": cmd_endpoint_hashkv,
    "snapshot save": cmd_snapshot_save,
    "snapshot status": cmd_snapshot_status,
    "snapshot restore": cmd_snapshot_restore,
    "lease grant": cmd_lease_grant,
    "lease revoke": cmd_lease_revoke,
    "lease timetolive": cmd_lease_timetolive,
    "lease list": cmd_lease_list,
    "lease keep-alive": cmd_lease_keep_alive,
    "member add": ctl_members.cmd_member_add,
    "member remove": ctl_members.cmd_member_remove,
    "member update": ctl_members.cmd_member_update,
    "member list": ctl_members.cmd_member_list,
    "member promote": ctl_members.cmd_member_promote,
    "move-leader": ctl_members.cmd_move_leader,
    "lock": cmd_lock,
    "elect": cmd_elect,
    "watch": cmd_watch,
}


def run(argv: list[str], stdin=None, stdout=None, stderr=None) -> int:
    """Run one quorumctl command; returns its exit code. Streams are binary."""
    stdin = stdin if stdin is not None else sys.stdin.buffer
    stdout = stdout if stdout is not None else sys.stdout.buffer
    stderr = stderr if stderr is not None else sys.stderr.buffer

    def fail(exit_code: int, message: str) -> int:
        stderr.write(f"Error: {message}\n".encode("utf-8", "surrogateescape"))
        stderr.flush()
        return exit_code

    ctx = None
    try:
        options = parse_args(argv)
        ctx = Context(options, stdout, stderr, stdin)
        return COMMANDS[options.command](ctx)
    except CtlError as error:
        return fail(error.exit_code, error.message)
    except ctl_format.UnsupportedFormat as error:
        return fail(EXIT_BAD_FEATURE, str(error))
    except QuorumError as error:
        return fail(EXIT_ERROR, _error_text(error))
    except KeyboardInterrupt:
        return fail(EXIT_INTERRUPTED, "interrupted")
    finally:
        if ctx is not None:
            ctx.close()


def main(argv: list[str] | None = None) -> None:
    sys.exit(run(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
