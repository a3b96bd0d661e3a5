"""`quorumctl watch`: etcdctl 3.4's watch command over protocol.watch.

    quorumctl watch KEY [RANGE_END] [--prefix] [--rev N] [--prev-kv] [--progress-notify]
    quorumctl watch KEY -- COMMAND ARGS...     runs COMMAND per event (ETCD_WATCH_* in its env)
    quorumctl watch -i                          lines on stdin: "watch [options] KEY [RANGE_END] [-- COMMAND]",
                                                "progress" (asks every watch for a progress notification)

Output as etcdctl: simple prints "TYPE\\n[prev key\\nprev value\\n]key\\nvalue\\n" per
event, json one WatchResponse object per line, fields etcdctl's field lines
(table prints as simple, as etcdctl's table printer does). The key may also
come from ETCDCTL_WATCH_KEY / ETCDCTL_WATCH_RANGE_END. The command runs
until interrupted, or until the server cancels the watch (then it exits with
etcdctl's "watch is canceled by the server").
"""

from __future__ import annotations

import argparse
import os
import select
import shlex
import subprocess
import threading

from protocol.client import CompactedError, QuorumError
from protocol.watch import EVENT_DELETE, Watcher
from tools import ctl_format
from tools.ctl_args import EXIT_BAD_ARGS, EXIT_ERROR, EXIT_INTERRUPTED, CtlError

EVENT_NAMES = {0: "PUT", EVENT_DELETE: "DELETE"}
_STDIN_POLL_S = 0.2


def add_watch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", help="[key or prefix] [range_end] [--] [exec-command arg1 arg2 ...]")
    parser.add_argument("-i", "--interactive", action="store_true", help="Interactive mode")
    parser.add_argument("--prefix", action="store_true", help="Watch on a prefix if prefix is set")
    parser.add_argument("--rev", type=int, default=0, help="Revision to start watching")
    parser.add_argument("--prev-kv", dest="prev_kv", action="store_true",
                        help="get the previous key-value pair before the event happens")
    parser.add_argument("--progress-notify", dest="progress_notify", action="store_true",
                        help="get periodic watch progress notification from server")


# ---- output -------------------------------------------------------------------


def render_watch(response: dict, write_out: str, hex_output: bool) -> str:
    if write_out == "json":
        return ctl_format.dumps(_json_watch(response))
    if write_out == "fields":
        return _fields_watch(response)
    options = {"hex": hex_output}
    parts = []
    for event in response.get("events") or []:
        parts.append(EVENT_NAMES.get(event["type"], str(event["type"])) + "\n")
        if event.get("prev_kv"):
            parts.append(ctl_format._simple_kv(event["prev_kv"], options))
        parts.append(ctl_format._simple_kv(event["kv"], options))
    return "".join(parts)


def _json_event(event: dict) -> dict:
    out = {}
    if event["type"]:
        out["type"] = event["type"]
    out["kv"] = ctl_format.json_kv(event["kv"])
    if event.get("prev_kv"):
        out["prev_kv"] = ctl_format.json_kv(event["prev_kv"])
    return out


def _json_watch(response: dict) -> dict:
    # clientv3.WatchResponse as encoding/json writes it (no omitempty there).
    events = response.get("events") or []
    return {"Header": ctl_format.json_header(response.get("header")) or {},
            "Events": [_json_event(e) for e in events] if events else None,
            "CompactRevision": response.get("compact_revision", 0),
            "Canceled": bool(response.get("canceled")), "Created": bool(response.get("created"))}


def _fields_watch(response: dict) -> str:
    parts = [ctl_format._fields_header(response.get("header"))]
    for event in response.get("events") or []:
        parts.append(f'"Type" : {EVENT_NAMES.get(event["type"], event["type"])}\n')
        if event.get("prev_kv"):
            parts.append(ctl_format._fields_kv("Prev", event["prev_kv"]))
        parts.append(ctl_format._fields_kv("", event["kv"]))
    return "".join(parts)


# ---- arguments --------------------------------------------------------------------


def split_exec(argv: list[str], positional: list[str]) -> tuple[list[str], list[str]]:
    """(watch args, exec args): everything after the first "--" that follows "watch" is the command."""
    raw = argv[argv.index("watch") + 1:] if "watch" in argv else list(argv)
    if "--" not in raw:
        return positional, []
    separator = raw.index("--")
    command = raw[separator + 1:]
    if not command:
        raise CtlError(EXIT_BAD_ARGS, "bad number of arguments (no command after --)")
    watch_args = positional[:len(positional) - len(command)] if len(positional) >= len(command) else []
    return watch_args, command


def _key_args(args: list[str]) -> list[str]:
    env_key = os.environ.get("ETCDCTL_WATCH_KEY", "")
    env_range = os.environ.get("ETCDCTL_WATCH_RANGE_END", "")
    if env_key:
        if args:
            raise CtlError(EXIT_BAD_ARGS, "conflicting arguments: key/range_end given while "
                                          "ETCDCTL_WATCH_KEY or ETCDCTL_WATCH_RANGE_END is set")
        args = [env_key] + ([env_range] if env_range else [])
    if not 1 <= len(args) <= 2:
        raise CtlError(EXIT_BAD_ARGS, "bad number of arguments")
    return args


class _WatchSpec:
    def __init__(self, key: str, range_end: str, prefix: bool, rev: int, prev_kv: bool, progress_notify: bool,
                 command: list[str]):
        self.key, self.range_end, self.prefix = key, range_end, prefix
        self.rev, self.prev_kv, self.progress_notify = rev, prev_kv, progress_notify
        self.command = command


def _spec_from_options(options, args: list[str], command: list[str]) -> _WatchSpec:
    args = _key_args(args)
    return _WatchSpec(args[0], args[1] if len(args) > 1 else "", options.prefix, options.rev, options.prev_kv,
                      options.progress_notify, command)


# ---- running ---------------------------------------------------------------------------


def _open(ctx, spec: _WatchSpec) -> Watcher:
    if spec.prefix and spec.range_end:
        raise CtlError(EXIT_BAD_ARGS, "`range_end` and `--prefix` are mutually exclusive")
    try:
        return Watcher(ctx.endpoints, spec.key.encode("utf-8", "surrogateescape"),
                       spec.range_end.encode("utf-8", "surrogateescape"), prefix=spec.prefix,
                       start_revision=spec.rev, prev_kv=spec.prev_kv, progress_notify=spec.progress_notify,
                       timeout_s=ctx.options.dial_timeout + ctx.options.command_timeout)
    except QuorumError as error:
        raise CtlError(EXIT_ERROR, error.message) from None


def _run_command(ctx, command: list[str], response: dict) -> None:
    for event in response.get("events") or []:
        env = dict(os.environ)
        env["ETCD_WATCH_REVISION"] = str(response["header"]["revision"])
        env["ETCD_WATCH_EVENT_TYPE"] = ctl_format.go_quote(EVENT_NAMES.get(event["type"], str(event["type"])))
        env["ETCD_WATCH_KEY"] = ctl_format.go_quote(event["kv"]["key"])
        env["ETCD_WATCH_VALUE"] = ctl_format.go_quote(event["kv"]["value"])
        ctx.stdout.flush()
        try:
            result = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as error:
            raise CtlError(EXIT_ERROR, f"command {command!r} error ({error})") from None
        ctx.stdout.write(result.stdout)
        ctx.stdout.flush()
        ctx.stderr.write(result.stderr)
        ctx.stderr.flush()
        if result.returncode != 0:
            raise CtlError(EXIT_ERROR, f"command {command!r} error (exit status {result.returncode})")


def _print(ctx, response: dict, command: list[str], lock: threading.Lock | None = None) -> None:
    text = render_watch(response, ctx.options.write_out, ctx.options.hex)
    if lock is not None:
        with lock:
            ctx.write(text)
            if command:
                _run_command(ctx, command, response)
        return
    ctx.write(text)
    if command:
        _run_command(ctx, command, response)


def _follow(ctx, watcher: Watcher, command: list[str], lock=None, progress_wanted=None) -> None:
    """Print the watch's responses until the server cancels it."""
    try:
        while True:
            if progress_wanted is not None and progress_wanted.is_set():
                progress_wanted.clear()
                watcher.request_progress()
            try:
                response = watcher.get(timeout_s=_STDIN_POLL_S)
            except StopIteration:
                return
            if response is not None:
                _print(ctx, response, command, lock)
    except CompactedError as error:
        ctx.write(f"watch was canceled ({error.message})\n", to_stderr=True)


def cmd_watch(ctx) -> int:
    options = ctx.options
    argv = getattr(options, "argv", None) or []
    if options.interactive:
        return _interactive(ctx)
    args, command = split_exec(argv, list(options.args or []))
    spec = _spec_from_options(options, args, command)
    watcher = _open(ctx, spec)
    try:
        _follow(ctx, watcher, spec.command)
    finally:
        watcher.close()
    raise CtlError(EXIT_INTERRUPTED, "watch is canceled by the server")


def _parse_interactive_watch(line_args: list[str]) -> _WatchSpec:
    parser = argparse.ArgumentParser(prog="watch", add_help=False, exit_on_error=False)
    add_watch_options(parser)
    command: list[str] = []
    if "--" in line_args:
        separator = line_args.index("--")
        line_args, command = line_args[:separator], line_args[separator + 1:]
        if not command:
            raise CtlError(EXIT_BAD_ARGS, "bad number of arguments (no command after --)")
    try:
        options, unknown = parser.parse_known_args(line_args)
    except argparse.ArgumentError as error:
        raise CtlError(EXIT_BAD_ARGS, str(error)) from None
    if unknown:
        raise CtlError(EXIT_BAD_ARGS, f"unknown flag: {unknown[0]}")
    return _spec_from_options(options, list(options.args), command)


def _interactive(ctx) -> int:
    """etcdctl's -i: one watch per "watch ..." line, all printing as they go; "progress" asks each."""
    lock = threading.Lock()
    threads: list[tuple[threading.Thread, threading.Event, threading.Event]] = []
    stop = threading.Event()

    def run(spec: _WatchSpec, progress_wanted: threading.Event, failed: threading.Event) -> None:
        try:
            watcher = _open(ctx, spec)
        except CtlError as error:
            with lock:
                ctx.write(f"Error: {error.message}\n", to_stderr=True)
            failed.set()
            return
        try:
            while not stop.is_set():
                if progress_wanted.is_set():
                    progress_wanted.clear()
                    watcher.request_progress()
                try:
                    response = watcher.get(timeout_s=_STDIN_POLL_S)
                except StopIteration:
                    return
                except CompactedError as error:
                    with lock:
                        ctx.write(f"watch was canceled ({error.message})\n", to_stderr=True)
                    return
                if response is not None:
                    _print(ctx, response, spec.command, lock)
        finally:
            watcher.close()

    try:
        for line in _lines(ctx.stdin, stop):
            text = line.rstrip("\n")
            args = shlex.split(text) if text.strip() else []
            if not args:
                continue
            if args[0] == "progress":
                for _thread, progress_wanted, _failed in threads:
                    progress_wanted.set()
                continue
            if args[0] != "watch" or len(args) < 2 and not os.environ.get("ETCDCTL_WATCH_KEY"):
                with lock:
                    ctx.write(f"Invalid command {text} (only support watch and progress)\n", to_stderr=True)
                continue
            try:
                spec = _parse_interactive_watch(args[1:])
            except CtlError as error:
                with lock:
                    ctx.write(f"Invalid command {text} ({error.message})\n", to_stderr=True)
                continue
            progress_wanted, failed = threading.Event(), threading.Event()
            thread = threading.Thread(target=run, args=(spec, progress_wanted, failed), daemon=True)
            thread.start()
            threads.append((thread, progress_wanted, failed))
        # stdin closed: keep watching, as etcdctl does, until interrupted.
        while any(thread.is_alive() for thread, _p, _f in threads):
            for thread, _p, _f in threads:
                thread.join(_STDIN_POLL_S)
    finally:
        stop.set()
        for thread, _p, _f in threads:
            thread.join(2.0)
    raise CtlError(EXIT_INTERRUPTED, "watch is canceled by the server")


def _lines(stdin, stop: threading.Event):
    """Lines of stdin (binary or text), read without blocking the watch threads' output."""
    buffer = b""
    try:
        fileno = stdin.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        fileno = None
    while not stop.is_set():
        if fileno is not None:
            ready, _w, _x = select.select([fileno], [], [], _STDIN_POLL_S)
            if not ready:
                continue
            chunk = os.read(fileno, 65536)
        else:
            chunk = stdin.readline()
            chunk = chunk.encode() if isinstance(chunk, str) else chunk
        if not chunk:
            if buffer:
                yield buffer.decode("utf-8", "surrogateescape")
            return
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield line.decode("utf-8", "surrogateescape") + "\n"
