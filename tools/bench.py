"""`python -m tools.bench`: the benchmark set of BENCHMARKS.md, one fresh node per workload.

For each workload (put, get-serializable, get-linearizable, txn by default)
it starts a node in a temporary data dir, runs tools.load against it and
prints one markdown table row (plus the full JSON reports with --json).

With --profile DIR it also samples every actor of the node with py-spy
(`pip install py-spy`) while the load runs, writes DIR/WORKLOAD-ACTOR.txt
(collapsed stacks, loadable in speedscope or flamegraph.pl) and prints, per
actor, the functions with the most samples: "self" is time in the function
itself (C calls it makes included: LMDB, zmq, msgpack), "total" includes
what it calls.

Caveat for reading profiles: py-spy counts a thread as busy when it is not
blocked in a system call it recognises as waiting, so on a machine with
more runnable threads than cores a thread that is preempted right after a
syscall that woke another process (a zmq send) is counted in that call. The
CPU seconds per actor that tools.load reads from /proc are the ground truth;
the profile says where inside an actor the time goes.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

from tools import load

DEFAULT_WORKLOADS = ",".join(load.WORKLOADS)
PROFILE_RATE_HZ = 200
# Skip this long at the start of a run before sampling (preload and warm-up).
PROFILE_WARMUP_S = 2.0
PROFILE_TOP_FUNCTIONS = 12
_LINE_NUMBER = re.compile(r":\d+\)$")
_WRAPPER_FRAMES = ("<frozen runpy>", "<module> (", "main (actors/server.py", "run_role (", "ActorLoop.run (",
                   "run (actors/")


# ---- profiles -------------------------------------------------------------------


def start_profilers(node, directory: str, workload: str, duration_s: float) -> list[subprocess.Popen]:
    """py-spy record on every actor of the node, for duration_s, after PROFILE_WARMUP_S."""
    if shutil.which("py-spy") is None:
        raise RuntimeError("--profile needs py-spy: pip install py-spy")
    time.sleep(PROFILE_WARMUP_S)
    profilers = []
    for actor, pid in sorted(node.actor_pids().items()):
        output = os.path.join(directory, f"{workload}-{actor}.txt")
        profilers.append(subprocess.Popen(
            ["py-spy", "record", "--pid", str(pid), "--duration", str(max(1, int(duration_s))),
             "--rate", str(PROFILE_RATE_HZ), "--format", "raw", "--nonblocking", "--output", output],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return profilers


def summarise_profile(path: str, top: int = PROFILE_TOP_FUNCTIONS) -> dict:
    """Samples per function (line numbers dropped): self and total, as fractions of all samples."""
    self_samples: collections.Counter = collections.Counter()
    total_samples: collections.Counter = collections.Counter()
    all_samples = 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            stack, _, count_text = line.rstrip("\n").rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [_LINE_NUMBER.sub(")", frame) for frame in stack.split(";")]
            all_samples += count
            self_samples[frames[-1]] += count
            for frame in set(frames):
                if not any(wrapper in frame for wrapper in _WRAPPER_FRAMES):
                    total_samples[frame] += count
    def shares(counter: collections.Counter) -> list:
        return [(name, round(count / all_samples, 3)) for name, count in counter.most_common(top)] if all_samples else []

    return {"samples": all_samples, "self": shares(self_samples), "total": shares(total_samples)}


def format_profile(actor: str, summary: dict) -> str:
    lines = [f"  {actor}: {summary['samples']} samples"]
    for kind in ("self", "total"):
        for name, fraction in summary[kind]:
            lines.append(f"    {kind:<5} {fraction * 100:5.1f}%  {name}")
    return "\n".join(lines)


# ---- runs -----------------------------------------------------------------------


def run_one(args: argparse.Namespace, workload: str) -> dict:
    with load.SpawnedNode(args.gateways) as node:
        gateways = load.discover_gateways([f"tcp://{node.zmq_endpoint}"])
        spec = load.ClientSpec(workload=workload, gateways=tuple(gateways), pipeline=args.pipeline,
                               batch=args.batch, duration_s=args.duration, requests=load.MAX_REQUESTS,
                               keys=args.keys, value_bytes=args.value_bytes, timeout_s=10.0, clients=args.clients)
        profilers: list[subprocess.Popen] = []
        starter = None
        if args.profile:
            os.makedirs(args.profile, exist_ok=True)

            def start() -> None:
                profilers.extend(start_profilers(node, args.profile, workload,
                                                 args.duration - PROFILE_WARMUP_S - 1))

            starter = threading.Thread(target=start, daemon=True)
            starter.start()
        report = load.run_load(spec, node.process.pid, show_progress=not args.quiet)
        if starter is not None:
            starter.join(timeout=30)
            for profiler in profilers:
                profiler.wait(timeout=60)
            report["profile"] = {}
            for actor in sorted(node.actor_pids()):
                path = os.path.join(args.profile, f"{workload}-{actor}.txt")
                if os.path.exists(path):
                    report["profile"][actor] = summarise_profile(path)
    return report


def table_header() -> str:
    return ("| workload | ops/s | p50 | p99 | max | server CPU µs/op | server CPU s by actor (zmq I/O threads) "
            "| client CPU µs/op | other load on the machine |\n|---|---|---|---|---|---|---|---|---|")


def table_row(report: dict) -> str:
    latency = report["latency_us"]
    cpu = report["server_cpu"]
    actors = ", ".join(f"{name} {seconds:.2f} ({cpu['zmq_io_thread_s'].get(name, 0):.2f})"
                       for name, seconds in cpu["by_process_s"].items() if name != "supervisor")
    ok = max(1, report["requests_ok"])
    machine = report["machine_cpu"]
    other = f"{machine['others_s']:.1f} of {machine['capacity_s']:.1f} CPU-s"
    return (f"| {report['workload']} | {report['ops_per_s']:,.0f} | {load._us(latency['p50'])} "
            f"| {load._us(latency['p99'])} | {load._us(latency['max'])} | {cpu['per_op_us']} | {actors} "
            f"| {report['client_cpu_s'] / ok * 1e6:.1f} | {other} |")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=DEFAULT_WORKLOADS, help=f"comma-separated (default {DEFAULT_WORKLOADS})")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=1, help="runs per workload (each on a fresh node)")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--pipeline", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--value-bytes", type=int, default=256)
    parser.add_argument("--gateways", type=int, default=2)
    parser.add_argument("--profile", metavar="DIR", help="py-spy every actor; collapsed stacks into DIR")
    parser.add_argument("--json", metavar="FILE", help="write every report to FILE (JSON lines)")
    parser.add_argument("--quiet", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(workloads) - set(load.WORKLOADS))
    if unknown or not 1 <= args.repeat <= 20 or not 3 <= args.duration <= 600:
        print(f"bench: bad arguments (unknown workloads {unknown}, --repeat 1..20, --duration 3..600)",
              file=sys.stderr)
        return 2
    rows = []
    try:
        for workload in workloads:
            for _ in range(args.repeat):
                report = run_one(args, workload)
                rows.append(table_row(report))
                print(rows[-1], file=sys.stderr)
                for actor, summary in report.get("profile", {}).items():
                    print(format_profile(f"{workload} {actor}", summary), file=sys.stderr)
                if args.json:
                    with open(args.json, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(report) + "\n")
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    print(f"clients {args.clients} x pipeline {args.pipeline}, batch {args.batch}, {args.gateways} gateways, "
          f"{args.duration:g} s per run, {args.keys} keys, {args.value_bytes} B values")
    print(table_header())
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
