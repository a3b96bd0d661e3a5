"""`python -m tools.watch_bench`: watch fan-out, memory per watcher, write-to-event delay.

It starts a node of its own (tools.load.SpawnedNode) unless --endpoints is
given with --broadcaster-pid, opens `--streams` watch streams (one DEALER
each, in a receiver process) carrying `--watchers` watches in all, then:

1. memory: the broadcaster's RSS before and after the watches are created
   (delta / watchers = memory per watcher);
2. delay: a writer puts `--delay-writes` keys one by one at `--delay-rate`
   writes/s and records when each write was acknowledged; the receiver
   records when each event arrived; the delay of a delivery is arrival -
   acknowledgement (CLOCK_MONOTONIC is machine-wide; negative when the
   event beat the acknowledgement), reported as p50/p99 over deliveries;
3. fan-out: the writer sends `--burst-writes` puts pipelined, and the
   receiver counts events delivered per second from the first to the last.

Watches: with `--prefix-watchers 0` (default) every watch is on one key, and
the keys are spread so each key is watched by streams watchers (one per
stream); a write then means `streams` deliveries. `--prefix-watchers N` makes
N of the watches prefix watches on the whole key space (each write reaches
all N of them too).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time

import zmq

from protocol import codec

KEY_PREFIX = b"wb/"


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def key_of(index: int) -> bytes:
    return KEY_PREFIX + b"k%05d" % index


def receiver(endpoint: str, streams: int, watchers: int, keys: int, prefix_watchers: int, ready, commands,
             results) -> None:
    """Runs in its own process: the watch streams, counting and timing deliveries."""
    context = zmq.Context()
    sockets = []
    for index in range(streams):
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVHWM, 0)
        socket.connect(endpoint)
        sockets.append(socket)
    per_stream = watchers // streams
    created = 0
    watch_number = 0
    for stream_index, socket in enumerate(sockets):
        requests = []
        for local in range(per_stream):
            if watch_number < prefix_watchers:
                body = {"key": KEY_PREFIX, "range_end": KEY_PREFIX[:-1] + bytes([KEY_PREFIX[-1] + 1])}
            else:
                body = {"key": key_of((stream_index * per_stream + local) % keys)}
            requests.append([local + 1, "watch_create", body])
            watch_number += 1
        for start in range(0, len(requests), 256):
            socket.send(codec.encode_request_frame(requests[start:start + 256]))
    poller = zmq.Poller()
    for socket in sockets:
        poller.register(socket, zmq.POLLIN)
    while created < per_stream * streams:
        for socket, _ in poller.poll(10_000):
            for _request_id, _status, body in codec.decode_response_frame(socket.recv()):
                created += 1 if body.get("created") else 0
    ready.set()
    arrivals: dict[int, list[float]] = {}  # revision -> arrival times (one per delivery)
    delivered = 0
    first = last = None
    phase = None
    while True:
        if commands.poll():
            command = commands.recv()
            if command == "stop":
                break
            phase = command
            arrivals, delivered, first, last = {}, 0, None, None
            results.send("ready")  # the writer starts only now, so nothing is counted in the wrong phase
            continue
        for socket, _ in poller.poll(50):
            while True:
                try:
                    frame = socket.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                now = time.monotonic()
                for _request_id, _status, body in codec.decode_response_frame(frame):
                    events = body.get("events") or []
                    if not events:
                        continue
                    delivered += len(events)
                    first = now if first is None else first
                    last = now
                    if phase == "delay":
                        for event in events:
                            arrivals.setdefault(event["kv"]["mod_revision"], []).append(now)
        if phase is not None and commands.poll() is False and last is not None and \
                time.monotonic() - last > 1.5 and phase in ("delay", "burst"):
            results.send({"phase": phase, "delivered": delivered, "first": first, "last": last,
                          "arrivals": arrivals if phase == "delay" else {}})
            phase = None
    context.destroy(linger=0)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run(endpoint: str, broadcaster_pid: int, options) -> dict:
    from protocol.client import Client, ops

    client = Client([endpoint], timeout_s=30.0)
    watch_endpoint = client.hello()["watch"]
    rss_before = rss_bytes(broadcaster_pid)
    ready = multiprocessing.Event()
    commands_parent, commands_child = multiprocessing.Pipe()
    results_parent, results_child = multiprocessing.Pipe()
    process = multiprocessing.Process(target=receiver, args=(
        watch_endpoint, options.streams, options.watchers, options.keys, options.prefix_watchers, ready,
        commands_child, results_child), daemon=True)
    started = time.monotonic()
    process.start()
    if not ready.wait(120):
        raise RuntimeError("watches not created in 120 s")
    create_s = time.monotonic() - started
    time.sleep(1.0)
    rss_after = rss_bytes(broadcaster_pid)
    report = {"streams": options.streams, "watchers": options.watchers, "keys": options.keys,
              "prefix_watchers": options.prefix_watchers, "create_s": round(create_s, 2),
              "broadcaster_rss_before_bytes": rss_before, "broadcaster_rss_after_bytes": rss_after,
              "bytes_per_watcher": round((rss_after - rss_before) / options.watchers, 1)}

    # Delay: one write at a time, paced.
    commands_parent.send("delay")
    assert results_parent.recv() == "ready"
    acked: dict[int, float] = {}
    interval = 1.0 / options.delay_rate
    next_at = time.monotonic()
    for index in range(options.delay_writes):
        next_at += interval
        response = client.put(key_of(index % options.keys), b"x" * options.value_bytes)
        acked[response["header"]["revision"]] = time.monotonic()
        pause = next_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    result = results_parent.recv()
    delays = [arrival - acked[revision] for revision, times in result["arrivals"].items()
              if revision in acked for arrival in times]
    report["delay_writes"] = options.delay_writes
    report["delay_deliveries"] = len(delays)
    report["delay_ms_p50"] = round(percentile(delays, 0.50) * 1000, 2) if delays else None
    report["delay_ms_p99"] = round(percentile(delays, 0.99) * 1000, 2) if delays else None

    # Fan-out: a pipelined burst.
    commands_parent.send("burst")
    assert results_parent.recv() == "ready"
    burst_started = time.monotonic()
    requests = [ops.put(key_of(index % options.keys), b"y" * options.value_bytes)
                for index in range(options.burst_writes)]
    for start in range(0, len(requests), 1024):
        client.request_many(requests[start:start + 1024])
    write_s = time.monotonic() - burst_started
    result = results_parent.recv()
    span = max(result["last"] - result["first"], 1e-9)
    report["burst_writes"] = options.burst_writes
    report["burst_write_s"] = round(write_s, 2)
    report["burst_events_delivered"] = result["delivered"]
    report["fan_out_events_per_s"] = round(result["delivered"] / span)
    report["burst_delivery_s"] = round(span, 2)
    report["broadcaster_rss_end_bytes"] = rss_bytes(broadcaster_pid)
    commands_parent.send("stop")
    process.join(10)
    client.close()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.watch_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--watchers", type=int, default=10_000)
    parser.add_argument("--keys", type=int, default=100, help="distinct keys watched and written (default 100)")
    parser.add_argument("--prefix-watchers", type=int, default=0)
    parser.add_argument("--delay-writes", type=int, default=500)
    parser.add_argument("--delay-rate", type=float, default=100.0, help="writes/s in the delay phase")
    parser.add_argument("--burst-writes", type=int, default=5000)
    parser.add_argument("--value-bytes", type=int, default=64)
    parser.add_argument("--endpoints", help="an existing node (with --broadcaster-pid); default: spawn one")
    parser.add_argument("--broadcaster-pid", type=int)
    parser.add_argument("--gateways", type=int, default=1)
    options = parser.parse_args(argv)
    if options.watchers % options.streams:
        parser.error("--watchers must be a multiple of --streams")
    if options.endpoints:
        if not options.broadcaster_pid:
            parser.error("--endpoints needs --broadcaster-pid")
        report = run(options.endpoints, options.broadcaster_pid, options)
    else:
        from tools.load import SpawnedNode

        with SpawnedNode(options.gateways) as node:
            deadline = time.monotonic() + 30
            while "watch_broadcaster" not in node.actor_pids() and time.monotonic() < deadline:
                time.sleep(0.1)
            report = run(node.zmq_endpoint, node.actor_pids()["watch_broadcaster"], options)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
