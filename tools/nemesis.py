"""`python -m tools.nemesis`: a long fault run against a real local cluster.

    python -m tools.nemesis --duration 600 --size 5 --seed 7 --dir /tmp/nemesis-run

The same run as the CI test (tests/test_cluster_faults.py, through
tests/cluster_harness.py), for as long as asked: a cluster of --size members
on loopback, --clients threads doing gets, puts and CAS txns with unique
values on --keys keys through random voters, and a seeded nemesis that
kills -9 and restarts, pauses (SIGSTOP/SIGCONT) and cuts off members (the
leader often), and changes the membership (a learner added then promoted, a
voter added, a voter removed, the leader too, move-leader; between --size
and --size + 2 voters; a re-added member is a new member: new name, data
dir and peer URL), one step at a time. Then everything is healed and
checked: the history is linearizable (tools/linearizability.py), every
acknowledged write is on every member at its revision, HashKV agrees on
every member, removed members stopped by themselves, and a watch through
every member saw every write in order with no gap (during the run it asks
for progress notifications every --watch-progress-seconds).

Exit status 0 when every check passed, 1 otherwise. The directory keeps the
members' logs, the history (`history.jsonl`, re-check it with `python -m
tools.linearizability D/history.jsonl`), the nemesis' schedule and
membership changes (`nemesis.log`), each watch's events
(`watch-<name>.jsonl`) and `report.json`. With --seed the fault schedule
and the clients' choices replay (timings, and so outcomes, do not; nor
does which member leads when a step targets "the leader").

Run it from a checkout of the repository (it uses the tests' launcher).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

MAX_DURATION_S = 24 * 3600


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.nemesis", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of faults under load (default 60)")
    parser.add_argument("--size", type=int, default=3, help="members: 3 or 5 (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clients", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--keys", type=int, default=3, help="keys the clients share (default 3)")
    parser.add_argument("--faults", default="kill,pause,isolate,partition,member",
                        help="comma-separated fault kinds (default: all of kill,pause,isolate,partition,member)")
    parser.add_argument("--member-share", type=float, default=None,
                        help="with member among --faults: the chance a step is a membership change "
                             "(default: as likely as each other kind)")
    parser.add_argument("--fault-seconds", type=float, nargs=2, default=(0.5, 2.5), metavar=("MIN", "MAX"))
    parser.add_argument("--calm-seconds", type=float, nargs=2, default=(0.5, 2.0), metavar=("MIN", "MAX"))
    parser.add_argument("--max-check-steps", type=int, default=None,
                        help="checker search steps per key (default: the checker's, by history size)")
    parser.add_argument("--serializable-reads", action="store_true",
                        help="a negative control: member-local reads, which may be stale; expect FAIL under partitions")
    parser.add_argument("--watch-progress-seconds", type=float, default=1.0,
                        help="watchers ask for progress notifications this often during the run (default 1; "
                             "0: only at the end)")
    parser.add_argument("--no-watch", action="store_true", help="no watch through every member")
    parser.add_argument("--dir", help="where members, logs and the history go (default: a new directory under /tmp)")
    args = parser.parse_args(argv)
    if not 0 < args.duration <= MAX_DURATION_S:
        parser.error(f"--duration must be in (0, {MAX_DURATION_S}]")
    if args.size not in (1, 3, 5, 7):
        parser.error("--size must be 1, 3, 5 or 7")
    from tests.cluster_harness import Nemesis, NemesisConfig, WorkloadConfig, run_fault_test

    kinds = tuple(kind.strip() for kind in args.faults.split(",") if kind.strip())
    unknown = set(kinds) - set(Nemesis.KINDS)
    if unknown or not kinds:
        parser.error(f"--faults: unknown kinds {sorted(unknown)}; choose from {', '.join(Nemesis.KINDS)}")
    if args.member_share is not None and not 0 <= args.member_share <= 1:
        parser.error("--member-share must be in [0, 1]")
    directory = os.path.abspath(args.dir) if args.dir else tempfile.mkdtemp(prefix="quorumkv-nemesis-")
    if os.path.exists(os.path.join(directory, "n1.qkv")):
        parser.error(f"{directory} holds a previous run; give a new --dir")
    print(f"nemesis run in {directory}", flush=True)
    report = run_fault_test(
        directory, size=args.size, duration_s=args.duration, seed=args.seed,
        workload=WorkloadConfig(clients=args.clients, keys=args.keys, serializable_reads=args.serializable_reads),
        nemesis=NemesisConfig(kinds=kinds, fault_s=tuple(args.fault_seconds), calm_s=tuple(args.calm_seconds),
                              max_steps=10**6, member_share=args.member_share),
        max_check_steps=args.max_check_steps, watches=not args.no_watch,
        watch_progress_s=args.watch_progress_seconds or None, log=lambda line: print(line, flush=True))
    print(report.summary(), flush=True)
    print("PASS" if report.ok else "FAIL", flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
