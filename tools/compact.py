"""`python -m tools.compact`: compact a node's MVCC history, and say what was done.

Three ways to pick the revision to compact to:

  python -m tools.compact REVISION               exactly that revision
  python -m tools.compact --keep-revisions N     current revision - N
  python -m tools.compact --keep-hours T         the newest revision that was
                                                 current at least T hours ago

--physical waits until the history is really deleted from the store (the
server answers once the applier's compaction steps are done), as etcdctl's
`compaction --physical`.

How --keep-hours knows which revision was current T hours ago: the server
keeps no revision-at-time history, so this script records one. Every run
(any mode) appends a (unix time, current revision) sample to a small JSON
state file (--state-file; by default one per cluster under
$XDG_STATE_HOME/quorumkv or ~/.local/state/quorumkv), keeping at most
MAX_SAMPLES samples. Run it periodically (e.g. hourly from cron): the first
runs only record samples, and compaction starts once a sample is T hours
old. This is the same sampling etcd's periodic auto-compaction does inside
the server (see actors/compactor.py for quorumkv's own).

Exit status: 0 done (or nothing to do), 1 the server refused, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from protocol.client import Client, CompactedError, normalise_endpoint
from protocol.errors import QuorumError

DEFAULT_ENDPOINT = "127.0.0.1:2382"
# Samples kept in the state file: a year of hourly runs fits in 10,000.
MAX_SAMPLES = 10_000
DEFAULT_TIMEOUT_S = 60.0


def default_state_file(cluster_id: int) -> str:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "quorumkv", f"compact-samples-{cluster_id:x}.json")


def load_samples(path: str) -> list[tuple[float, int]]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as error:
        raise ValueError(f"state file {path} is unreadable ({error}); move it away to start afresh") from None
    samples = data.get("samples", []) if isinstance(data, dict) else []
    return [(float(at), int(revision)) for at, revision in samples][-MAX_SAMPLES:]


def save_samples(path: str, samples: list[tuple[float, int]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump({"samples": [[at, revision] for at, revision in samples[-MAX_SAMPLES:]]}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def revision_at_least_hours_old(samples: list[tuple[float, int]], now: float, hours: float) -> int | None:
    """The newest sampled revision that was current at least `hours` before `now`."""
    cutoff = now - hours * 3600
    old_enough = [revision for at, revision in samples if at <= cutoff]
    return max(old_enough) if old_enough else None


def choose_target(args: argparse.Namespace, current: int, samples: list[tuple[float, int]],
                  now: float) -> tuple[int | None, str]:
    """The revision to compact to (None = nothing to do) and why."""
    if args.revision is not None:
        return args.revision, f"revision {args.revision} as asked"
    if args.keep_revisions is not None:
        target = current - args.keep_revisions
        if target <= 0:
            return None, f"current revision {current} has fewer than {args.keep_revisions} revisions to keep"
        return target, f"keep the last {args.keep_revisions} revisions of {current}"
    target = revision_at_least_hours_old(samples, now, args.keep_hours)
    if target is None:
        oldest = min((at for at, _ in samples), default=now)
        return None, (f"no revision sample is {args.keep_hours} h old yet (oldest is "
                      f"{(now - oldest) / 3600:.2f} h old); run again later")
    return target, f"keep {args.keep_hours} h: revision {target} was current then"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.compact", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("revision", nargs="?", type=int, help="compact to this revision")
    mode.add_argument("--keep-revisions", type=int, metavar="N", help="keep the last N revisions")
    mode.add_argument("--keep-hours", type=float, metavar="T", help="keep the last T hours of history")
    parser.add_argument("--physical", action="store_true", help="wait until the history is deleted")
    parser.add_argument("--endpoints", default=DEFAULT_ENDPOINT, help="comma-separated host:port")
    parser.add_argument("--state-file", help="revision samples for --keep-hours (default: per cluster)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds to wait for the server")
    parser.add_argument("--dry-run", action="store_true", help="say what would be compacted, do nothing")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if args.revision is not None and args.revision <= 0:
        raise ValueError("revision must be positive")
    if args.keep_revisions is not None and args.keep_revisions < 0:
        raise ValueError("--keep-revisions must not be negative")
    if args.keep_hours is not None and not 0 < args.keep_hours <= 24 * 365 * 10:
        raise ValueError("--keep-hours must be positive (and under ten years)")
    if not 0 < args.timeout <= 3600:
        raise ValueError("--timeout must be 0..3600 seconds")


def compact(args: argparse.Namespace) -> int:
    endpoints = [normalise_endpoint(e) for e in args.endpoints.split(",") if e.strip()]
    with Client(endpoints, timeout_s=args.timeout) as client:
        status = client.status()
        current = status["header"]["revision"]
        cluster_id = status["header"].get("cluster_id", 0)
        now = time.time()
        state_file = args.state_file or default_state_file(cluster_id)
        samples = load_samples(state_file) + [(now, current)]
        if not args.dry_run:
            save_samples(state_file, samples)
        target, reason = choose_target(args, current, samples, now)
        if target is None:
            print(f"nothing to compact: {reason}")
            return 0
        if target > current:
            print(f"refused: revision {target} is above the current revision {current}", file=sys.stderr)
            return 1
        if args.dry_run:
            print(f"would compact to revision {target} ({reason}; current revision {current})")
            return 0
        started = time.monotonic()
        try:
            client.compact(target, physical=args.physical)
        except CompactedError:
            print(f"nothing to compact: revision {target} is already compacted ({reason})")
            return 0
        elapsed_s = time.monotonic() - started
    kind = "physically " if args.physical else ""
    print(f"{kind}compacted to revision {target}: history below it removed ({reason}; "
          f"current revision {current}) in {elapsed_s:.2f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        return compact(args)
    except ValueError as error:
        print(f"compact: {error}", file=sys.stderr)
        return 2
    except QuorumError as error:
        print(f"compact: {error.code}: {error.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
