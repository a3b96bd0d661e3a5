"""`python -m tools.snapshot`: save a live node's store to a file, or restore one.

  python -m tools.snapshot save FILE [--endpoints HOST:PORT]
      Streams a consistent copy of the node's MVCC store (LMDB's compacting
      copy, taken by the gateway that answers) into FILE. FILE appears only
      when complete (written to FILE.part, fsynced, renamed). Progress on
      stderr; then the file's revision, key count and hash.

  python -m tools.snapshot restore FILE --data-dir DIR [--name N]
          [--initial-cluster ...] [--initial-cluster-token T] [--initial-advertise-peer-urls U]
      Offline: makes DIR a data dir for a new member started with
      --data-dir DIR and the same --name/cluster flags: its store is the
      snapshot (MvccStore.restore) and its raft WAL starts at the snapshot's
      applied index (actors.restore, as etcd's restore writes a WAL).
      Refuses a DIR that exists and is not empty, and a FILE that is not a
      readable store snapshot.

  python -m tools.snapshot status FILE
      The snapshot's revision, key count, size and hash, as etcdctl's
      `snapshot status`.

Exit status: 0 done, 1 failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import lmdb

from protocol.errors import QuorumError

DEFAULT_ENDPOINT = "127.0.0.1:2382"
DEFAULT_TIMEOUT_S = 60.0
PROGRESS_INTERVAL_S = 0.5


def human_bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{count} B"
        size /= 1024
    return f"{count} B"


def snapshot_status(path: str) -> dict:
    from actors.mvcc import MvccStore  # the offline commands need the store code, save does not

    return MvccStore.snapshot_status(path)


def print_status(path: str) -> None:
    status = snapshot_status(path)
    print(f"{path}: revision {status['revision']}, {status['total_key']} entries, "
          f"{human_bytes(status['total_size'])}, hash {status['hash']:#010x}")


def save(args: argparse.Namespace) -> int:
    from protocol.client import Client, normalise_endpoint

    endpoint = normalise_endpoint(args.endpoints.split(",")[0])
    interactive = sys.stderr.isatty()
    next_report = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now >= next_report[0] or done >= total:
            next_report[0] = now + PROGRESS_INTERVAL_S
            end = "\r" if interactive and done < total else "\n"
            sys.stderr.write(f"downloading snapshot: {human_bytes(done)} / {human_bytes(total)}{end}")
            sys.stderr.flush()

    started = time.monotonic()
    # One gateway only: the snapshot's chunks all come from the one that took the request.
    with Client([endpoint], timeout_s=args.timeout, discover_gateways=False) as client:
        size = client.snapshot(args.file, progress=progress)
    print(f"saved {human_bytes(size)} from {endpoint} to {args.file} in {time.monotonic() - started:.2f} s")
    print_status(args.file)
    return 0


def restore(args: argparse.Namespace) -> int:
    from actors.config import NodeConfig
    from actors.restore import restore_data_dir

    if not os.path.isfile(args.file):
        raise ValueError(f"{args.file} is not a file")
    if os.path.exists(args.data_dir) and (not os.path.isdir(args.data_dir) or os.listdir(args.data_dir)):
        raise ValueError(f"--data-dir {args.data_dir} exists and is not empty; restore needs a fresh one")
    snapshot_status(args.file)  # refuses a file that is not a store snapshot, before touching DIR
    # The member the data dir is for: the WAL it gets names the cluster's voters.
    config = NodeConfig(name=args.name, data_dir=args.data_dir, initial_cluster=args.initial_cluster,
                        initial_cluster_token=args.initial_cluster_token,
                        initial_advertise_peer_urls=tuple(args.initial_advertise_peer_urls.split(",")))
    config.cluster_members()  # a bad --initial-cluster fails here, before anything is written
    status = restore_data_dir(args.file, config)
    print(f"restored {args.file} (revision {status['revision']}, {status['total_key']} entries, "
          f"hash {status['hash']:#010x}, raft index {status['raft_index']}, term {status['raft_term']}) "
          f"into {args.data_dir}")
    print(f"start the member on it with: python -m actors.server --name {args.name} --data-dir {args.data_dir} ...")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.snapshot", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    save_parser = commands.add_parser("save", help="save a live node's store to FILE")
    save_parser.add_argument("file", metavar="FILE")
    save_parser.add_argument("--endpoints", default=DEFAULT_ENDPOINT, help="host:port of the node (first one used)")
    save_parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per chunk wait")
    restore_parser = commands.add_parser("restore", help="make a fresh data dir from FILE")
    restore_parser.add_argument("file", metavar="FILE")
    restore_parser.add_argument("--data-dir", required=True, metavar="DIR")
    # As etcdctl snapshot restore: which member the restored data dir is for.
    restore_parser.add_argument("--name", default="default", help="the member's name (default: default)")
    restore_parser.add_argument("--initial-cluster", default="", help="name=peer-url,... (default: this member)")
    restore_parser.add_argument("--initial-cluster-token", default="etcd-cluster")
    restore_parser.add_argument("--initial-advertise-peer-urls", default="http://localhost:2380")
    status_parser = commands.add_parser("status", help="describe a snapshot file")
    status_parser.add_argument("file", metavar="FILE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "save":
            return save(args)
        if args.command == "restore":
            return restore(args)
        print_status(args.file)
        return 0
    except ValueError as error:
        print(f"snapshot: {error}", file=sys.stderr)
        return 2
    except QuorumError as error:
        print(f"snapshot: {error.code}: {error.message}", file=sys.stderr)
        return 1
    except (OSError, lmdb.Error) as error:  # a bad file, a missing one, a full disk
        print(f"snapshot: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
