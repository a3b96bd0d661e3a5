"""`python -m tools.grpc_bench`: one load client for etcd and quorumkv, over etcd's v3 gRPC API.

    python -m tools.grpc_bench --endpoints 127.0.0.1:2379 --op put --duration 10
    python -m tools.grpc_bench --endpoints 127.0.0.1:2379 --op get-serializable --clients 1 --total 2000
    python -m tools.grpc_bench --endpoints 127.0.0.1:2379 --op watch --watchers 1000 --streams 10 --write-rate 100

How this works: --processes client processes (spawned) each run an asyncio
loop with --conns grpc.aio channels (spread round-robin over --endpoints)
and their share of --clients coroutines; a coroutine has one request in
flight at a time, so --clients is the number of requests in flight. The
same generated stubs (protocol/etcd) and the same requests go to any server,
so etcd, quorumkv and tools/grpc_null_server.py are measured by one client.
Reads and txn first write every key once (not timed); the parent starts the
timed phase in every process at once, reads server CPU before and after it
and prints progress once a second.

Ops: put (random key of --key-space, --value-bytes random bytes), get
(linearizable range of one key), get-serializable, txn (compare-and-swap:
`if mod_revision(k) == last seen then put k else range k`; each coroutine
owns its keys, so compares succeed and a conflict is an anomaly), watch.

Watch fan-out: --watchers watches over --streams Watch streams (spread over
the processes and channels), watcher i on key i mod --key-space; a writer
in the parent puts at --write-rate puts/s, round-robin over the keys, with
its send time (CLOCK_MONOTONIC, shared by the processes of one machine) in
the value. Each process counts events and the put -> event delay; after the
writer stops it waits (at most --watch-drain-s) for the events still due.

Server CPU: utime + stime of every server process tree (--server-pids, or
found from the processes listening on the endpoints' ports and their
parents up to the server's supervisor), before and after the timed phase,
per 1000 operations answered (per 1000 events delivered for watch).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import queue
import random
import struct
import sys
import threading
import time

from tools import load

OPS = ("put", "get", "get-serializable", "txn", "watch")
KEY_PREFIX = b"bench/"
PROGRESS_INTERVAL_S = 1.0
# Worker -> parent progress counter updates (not per request: a shared counter costs a lock).
WORKER_PROGRESS_EVERY = 64
WORKER_START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 10.0
PRELOAD_CONCURRENCY = 32
WATCH_DRAIN_S = 5.0
WATCH_CREATE_TIMEOUT_S = 60.0
MAX_PROCESSES = 64
MAX_CLIENTS = 65536
MAX_CONNS = 1024
MAX_KEYS = 10_000_000
MAX_VALUE_BYTES = 1024 * 1024
MAX_WATCHERS = 1_000_000
MAX_DURATION_S = 3600.0
MAX_TOTAL = 10**9
# Server processes to follow from one root (a quorumkv node is a handful).
MAX_SERVER_PROCESSES = 256
# Commands that mark a parent as part of the same server (climbing from the listener):
# a quorumkv gateway's parent is its supervisor; the null server's children are its own.
SERVER_MODULES = ("actors.server", "tools.grpc_null_server")
SERVER_COMMANDS = ("quorumkv",)
LATENCY_FRACTIONS = (0.5, 0.9, 0.99, 0.999)
TIMESTAMP = struct.Struct("!q")


def key_bytes(index: int) -> bytes:
    return KEY_PREFIX + b"%010d" % index


def _stubs():
    # Imported late: the parent process needs them only for watch's writer.
    from protocol.etcd.etcdserverpb import rpc_pb2, rpc_pb2_grpc
    return rpc_pb2, rpc_pb2_grpc


# ---- server processes and their CPU ------------------------------------------------


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as handle:
                next(handle)
                for line in handle:
                    fields = line.split()
                    local_port = int(fields[1].rsplit(":", 1)[1], 16)
                    if local_port == port and fields[3] == "0A":  # 0A: LISTEN
                        inodes.add(fields[9])
        except FileNotFoundError:
            continue
    return inodes


def listening_pids(port: int) -> set[int]:
    """Processes that hold a listening TCP socket on `port` (needs access to their /proc/PID/fd)."""
    wanted = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    found = set()
    if not wanted:
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{entry}/fd"):
                if os.readlink(f"/proc/{entry}/fd/{fd}") in wanted:
                    found.add(int(entry))
                    break
        except (FileNotFoundError, PermissionError, ProcessLookupError, NotADirectoryError):
            continue
    return found


def _parent_pid(pid: int) -> int | None:
    fields = load.proc_stat_fields(f"/proc/{pid}/stat")
    return None if fields is None else int(fields[1])


def _is_server_process(pid: int) -> bool:
    """`python -m actors.server|tools.grpc_null_server ...` or the `quorumkv` command; not a
    tool that merely has such a path among its arguments (tools.cluster's /tmp/quorumkv-cluster-*)."""
    argv = load.proc_argv(pid)
    if not argv:
        return False
    if "-m" in argv[:-1] and argv[argv.index("-m") + 1] in SERVER_MODULES:
        return True
    scripts = [os.path.basename(argv[0])] + ([os.path.basename(argv[1])] if len(argv) > 1 else [])
    return any(script in SERVER_COMMANDS for script in scripts)


def server_root(pid: int) -> int:
    """`pid`, or its highest ancestor whose command line is still the same server's."""
    root = pid
    for _ in range(MAX_SERVER_PROCESSES):  # bounded: a process tree is not deeper
        parent = _parent_pid(root)
        if parent is None or parent <= 1 or not _is_server_process(parent):
            return root
        root = parent
    return root


def endpoint_port(endpoint: str) -> int:
    return int(endpoint.rsplit("/", 1)[-1].rsplit(":", 1)[1])


def find_server_pids(endpoints: list[str]) -> list[int]:
    roots = set()
    for endpoint in endpoints:
        for pid in listening_pids(endpoint_port(endpoint)):
            roots.add(server_root(pid))
    return sorted(roots)


def servers_cpu_seconds(pids: list[int]) -> dict[str, float]:
    """CPU seconds so far of every process tree rooted at `pids`, by "PID:process name"."""
    usage = {}
    for pid in pids:
        for name, seconds in load.server_cpu_seconds(pid, MAX_SERVER_PROCESSES).items():
            if not name.endswith("/zmq-io"):  # already inside its process's time
                usage[f"{pid}:{name}"] = seconds
    return usage


# ---- one client process ------------------------------------------------------------


class Histogram:
    """Latency counts in tools.load's log-linear buckets (exact below 1 ms, 0.2% above)."""

    def __init__(self):
        self.counts = [0] * load.HISTOGRAM_SIZE

    def add(self, latency_us: int) -> None:
        self.counts[min(load.HISTOGRAM_SIZE - 1, load.histogram_index(max(0, latency_us)))] += 1


class Worker:
    """The coroutines of one client process and what they measured."""

    def __init__(self, spec: dict, index: int, progress):
        self.spec = spec
        self.index = index
        self.progress = progress
        self.pb, self.pb_grpc = _stubs()
        self.histogram = Histogram()
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.misses = 0
        self.conflicts = 0
        self.unreported = 0
        self.value = os.urandom(spec["value_bytes"])
        self.random = random.Random(index)
        self.remaining = spec["total"] // spec["processes"] + (index < spec["total"] % spec["processes"])
        self.stop_at = 0.0
        self.channels = []
        self.mod_revisions: dict[int, int] = {}
        self.cpu_at_start_s = 0.0

    # -- shared pieces --

    def open_channels(self):
        import grpc.aio
        endpoints = self.spec["endpoints"]
        for conn in range(self.spec["conns"]):
            target = endpoints[(self.index * self.spec["conns"] + conn) % len(endpoints)]
            # A channel option that differs per channel keeps grpc from sharing one TCP connection.
            self.channels.append(grpc.aio.insecure_channel(target, options=[("grpc.channel_id", conn)]))
        return [self.pb_grpc.KVStub(channel) for channel in self.channels]

    def count_error(self, error: Exception) -> None:
        code = getattr(error, "code", None)
        name = code().name if callable(code) else type(error).__name__
        self.errors[name] = self.errors.get(name, 0) + 1

    def tick(self, count: int = 1) -> None:
        self.unreported += count
        if self.unreported >= WORKER_PROGRESS_EVERY:
            with self.progress.get_lock():
                self.progress.value += self.unreported
            self.unreported = 0

    def flush_progress(self) -> None:
        with self.progress.get_lock():
            self.progress.value += self.unreported
        self.unreported = 0

    def my_clients(self) -> list[int]:
        """Global indices of this process's coroutines (client c owns keys k with k % clients == c)."""
        return list(range(self.index, self.spec["clients"], self.spec["processes"]))

    def owned_keys(self, client: int) -> list[int]:
        return list(range(client, self.spec["key_space"], self.spec["clients"]))

    # -- the request loop --

    def request(self, stub, client: int, keys: list[int]):
        pb, op = self.pb, self.spec["op"]
        if op == "put":
            key = self.random.randrange(self.spec["key_space"])
            return stub.Put(pb.PutRequest(key=key_bytes(key), value=self.value), timeout=REQUEST_TIMEOUT_S), None
        if op in ("get", "get-serializable"):
            key = self.random.randrange(self.spec["key_space"])
            return stub.Range(pb.RangeRequest(key=key_bytes(key), serializable=op == "get-serializable"),
                              timeout=REQUEST_TIMEOUT_S), None
        key = keys[self.random.randrange(len(keys))]
        name = key_bytes(key)
        compare = pb.Compare(key=name, target=pb.Compare.MOD, result=pb.Compare.EQUAL,
                             mod_revision=self.mod_revisions[key])
        return stub.Txn(pb.TxnRequest(compare=[compare],
                                      success=[pb.RequestOp(request_put=pb.PutRequest(key=name, value=self.value))],
                                      failure=[pb.RequestOp(request_range=pb.RangeRequest(key=name))]),
                        timeout=REQUEST_TIMEOUT_S), key

    def check(self, response, key: int | None) -> None:
        op = self.spec["op"]
        if op in ("get", "get-serializable"):
            if response.count != 1:
                self.misses += 1
        elif op == "txn":
            if response.succeeded:
                self.mod_revisions[key] = response.header.revision
            else:
                self.conflicts += 1
                kvs = response.responses[0].response_range.kvs
                if kvs:
                    self.mod_revisions[key] = kvs[0].mod_revision

    async def client_loop(self, stub, client: int) -> None:
        keys = self.owned_keys(client) if self.spec["op"] == "txn" else []
        if self.spec["op"] == "txn" and not keys:
            return
        while True:  # bounded by --total or --duration
            if self.spec["duration_s"]:
                if time.monotonic() >= self.stop_at:
                    return
            elif self.remaining <= 0:
                return
            else:
                self.remaining -= 1
            call, key = self.request(stub, client, keys)
            started = time.perf_counter_ns()
            try:
                response = await call
            except Exception as error:  # counted by code; the run goes on
                self.count_error(error)
                continue
            self.histogram.add((time.perf_counter_ns() - started) // 1000)
            self.ok += 1
            self.check(response, key)
            self.tick()

    async def preload(self, stubs) -> None:
        """Write this process's share of the keys once, remembering each key's mod_revision."""
        pending = [key for client in self.my_clients() for key in self.owned_keys(client)]
        pb = self.pb

        async def writer(slot: int) -> None:
            stub = stubs[slot % len(stubs)]
            while pending:  # bounded: each pass takes one key
                key = pending.pop()
                response = await stub.Put(pb.PutRequest(key=key_bytes(key), value=self.value),
                                          timeout=REQUEST_TIMEOUT_S)
                self.mod_revisions[key] = response.header.revision

        await asyncio.gather(*(writer(slot) for slot in range(PRELOAD_CONCURRENCY)))

    async def run_requests(self, start_event, ready) -> None:
        stubs = self.open_channels()
        if self.spec["op"] in ("get", "get-serializable", "txn"):
            await self.preload(stubs)
        ready.put(("ready", self.index))
        await asyncio.get_running_loop().run_in_executor(None, start_event.wait)
        self.cpu_at_start_s = _own_cpu_seconds()
        self.stop_at = time.monotonic() + self.spec["duration_s"]
        clients = self.my_clients()
        await asyncio.gather(*(self.client_loop(stubs[slot % len(stubs)], client)
                               for slot, client in enumerate(clients)))
        self.flush_progress()
        for channel in self.channels:
            await channel.close()

    # -- watch --

    def my_streams(self) -> list[int]:
        return list(range(self.index, self.spec["streams"], self.spec["processes"]))

    def stream_watchers(self, stream: int) -> list[int]:
        return list(range(stream, self.spec["watchers"], self.spec["streams"]))

    async def watch_stream(self, stub, stream: int, created: asyncio.Queue, stop: asyncio.Event) -> None:
        pb = self.pb
        watchers = self.stream_watchers(stream)
        requests: asyncio.Queue = asyncio.Queue()
        for watcher in watchers:
            requests.put_nowait(pb.WatchRequest(create_request=pb.WatchCreateRequest(
                key=key_bytes(watcher % self.spec["key_space"]))))

        first_answer = asyncio.Event()

        async def request_iterator():
            # The rest only once the server has answered the first: a server without Watch
            # then fails the call with its status, not with a send racing that status.
            yield await requests.get()
            await first_answer.wait()
            while True:  # ends when the stream is cancelled
                yield await requests.get()

        call = stub.Watch(request_iterator())
        pending_creates = len(watchers)
        if pending_creates == 0:
            created.put_nowait(stream)
        try:
            async for response in call:
                first_answer.set()
                if response.created:
                    pending_creates -= 1
                    if pending_creates == 0:
                        created.put_nowait(stream)
                now_ns = time.monotonic_ns()
                for event in response.events:
                    value = event.kv.value
                    if len(value) >= TIMESTAMP.size:
                        self.histogram.add((now_ns - TIMESTAMP.unpack_from(value)[0]) // 1000)
                self.ok += len(response.events)
                if response.events:
                    self.tick(len(response.events))
                if response.canceled:
                    self.errors["watch canceled: " + response.cancel_reason] = 1
                    return
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if pending_creates > 0:
                # The stream never got going: fail the run, do not wait. A failed send of the
                # next create request can surface first; the call's own status says why.
                try:
                    code = await asyncio.wait_for(call.code(), timeout=1.0)
                    details = await asyncio.wait_for(call.details(), timeout=1.0)
                    error = RuntimeError(f"{code.name}: {details}")
                except Exception:
                    pass  # keep the error we have
                created.put_nowait(error)
            elif not stop.is_set():
                self.count_error(error)
        finally:
            call.cancel()

    async def run_watch(self, start_event, ready, control) -> None:
        import grpc.aio
        endpoints = self.spec["endpoints"]
        streams = self.my_streams()
        channels = [grpc.aio.insecure_channel(endpoints[(self.index * self.spec["conns"] + conn) % len(endpoints)],
                                              options=[("grpc.channel_id", conn)])
                    for conn in range(max(1, min(self.spec["conns"], len(streams))))]
        self.channels = channels
        stubs = [self.pb_grpc.WatchStub(channel) for channel in channels]
        created: asyncio.Queue = asyncio.Queue()
        stop = asyncio.Event()
        tasks = [asyncio.create_task(self.watch_stream(stubs[slot % len(stubs)], stream, created, stop))
                 for slot, stream in enumerate(streams)]
        deadline = time.monotonic() + WATCH_CREATE_TIMEOUT_S
        for _ in streams:
            outcome = await asyncio.wait_for(created.get(), timeout=max(0.1, deadline - time.monotonic()))
            if isinstance(outcome, Exception):
                raise RuntimeError(f"a Watch stream failed before its watches were created: {outcome}"[:500])
        ready.put(("ready", self.index))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, start_event.wait)
        self.cpu_at_start_s = _own_cpu_seconds()
        # The parent says how many events are due once its writer stops.
        expected = await loop.run_in_executor(None, control.get)
        drain_deadline = time.monotonic() + self.spec["watch_drain_s"]
        while self.ok < expected and time.monotonic() < drain_deadline:
            await asyncio.sleep(0.05)  # polls a counter the stream tasks advance
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.flush_progress()
        for channel in channels:
            await channel.close()

    def result(self, cpu_seconds: float) -> dict:
        return {"ok": self.ok, "errors": self.errors, "misses": self.misses, "conflicts": self.conflicts,
                "histogram": self.histogram.counts, "cpu_s": cpu_seconds}


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def worker_process(spec: dict, index: int, progress, start_event, ready, results, control) -> None:
    try:
        worker = Worker(spec, index, progress)
        if spec["op"] == "watch":
            asyncio.run(worker.run_watch(start_event, ready, control))
        else:
            asyncio.run(worker.run_requests(start_event, ready))
        results.put(("result", index, worker.result(_own_cpu_seconds() - worker.cpu_at_start_s)))
    except BaseException as error:  # the parent reports it; a worker must not hang the run
        ready.put(("failed", index, f"{type(error).__name__}: {error}"))
        results.put(("failed", index, f"{type(error).__name__}: {error}"))


# ---- the watch writer (in the parent) --------------------------------------------


def watch_writer(spec: dict, stop: threading.Event, counts: dict) -> None:
    """Puts at spec['write_rate'] per second, round-robin over the keys, until `stop`."""
    import grpc
    pb, pb_grpc = _stubs()
    channel = grpc.insecure_channel(spec["endpoints"][0])
    stub = pb_grpc.KVStub(channel)
    padding = os.urandom(max(0, spec["value_bytes"] - TIMESTAMP.size))
    interval_s = 1.0 / spec["write_rate"]
    next_at = time.monotonic()
    index = 0
    try:
        while not stop.is_set():  # bounded by the run's duration
            value = TIMESTAMP.pack(time.monotonic_ns()) + padding
            try:
                stub.Put(pb.PutRequest(key=key_bytes(index % spec["key_space"]), value=value),
                         timeout=REQUEST_TIMEOUT_S)
                counts["puts"] += 1
                counts["by_key"][index % spec["key_space"]] = counts["by_key"].get(index % spec["key_space"], 0) + 1
            except grpc.RpcError as error:
                counts["errors"] += 1
                counts["last_error"] = f"{error.code().name}: {error.details()}"
            index += 1
            next_at += interval_s
            delay = next_at - time.monotonic()
            if delay > 0:
                stop.wait(delay)  # the writer's pacing, not a synchronisation
            else:
                next_at = time.monotonic()  # behind: do not burst to catch up
    finally:
        channel.close()


def expected_events(spec: dict, process: int, by_key: dict[int, int]) -> int:
    """Events due to process `process`: for each of its watchers, the puts to its key."""
    total = 0
    for stream in range(process, spec["streams"], spec["processes"]):
        for watcher in range(stream, spec["watchers"], spec["streams"]):
            total += by_key.get(watcher % spec["key_space"], 0)
    return total


# ---- the parent --------------------------------------------------------------------


def _progress_line(op: str, done: int, started: float, previous: tuple[float, int]) -> str:
    now = time.monotonic()
    rate = (done - previous[1]) / max(1e-9, now - previous[0])
    unit = "events" if op == "watch" else "ops"
    return f"\r  {op}: {done:,} {unit}, {rate:,.0f}/s, {now - started:.1f} s "


def run(spec: dict, server_pids: list[int], show_progress: bool = True) -> dict:
    context = multiprocessing.get_context("spawn")
    progress = context.Value("q", 0)
    start_event = context.Event()
    ready, results = context.Queue(), context.Queue()
    controls = [context.Queue() for _ in range(spec["processes"])]
    processes = [context.Process(target=worker_process, name=f"grpc-bench-{index}", daemon=True,
                                 args=(spec, index, progress, start_event, ready, results, controls[index]))
                 for index in range(spec["processes"])]
    for process in processes:
        process.start()
    try:
        return _drive(spec, server_pids, show_progress, processes, progress, start_event, ready, results, controls)
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)


def _drive(spec, server_pids, show_progress, processes, progress, start_event, ready, results, controls) -> dict:
    waiting = set(range(len(processes)))
    deadline = time.monotonic() + WORKER_START_TIMEOUT_S
    while waiting:
        try:
            message = ready.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise RuntimeError(f"client processes {sorted(waiting)} not ready in {WORKER_START_TIMEOUT_S:.0f}s")
        if message[0] == "failed":
            raise RuntimeError(f"client process {message[1]} failed: {message[2]}")
        waiting.discard(message[1])
    load_before = os.getloadavg()
    cpu_before = servers_cpu_seconds(server_pids)
    machine_before = load.machine_cpu_seconds()
    started = time.monotonic()
    start_event.set()
    writer_counts = {"puts": 0, "errors": 0, "by_key": {}, "last_error": None}
    writer_stop = threading.Event()
    writer = None
    if spec["op"] == "watch":
        writer = threading.Thread(target=watch_writer, args=(spec, writer_stop, writer_counts), daemon=True)
        writer.start()
    collected: dict[int, dict] = {}
    previous = (started, 0)
    give_up_at = started + (spec["duration_s"] or MAX_DURATION_S) + WORKER_START_TIMEOUT_S
    while len(collected) < len(processes):
        if writer is not None and writer.is_alive() and time.monotonic() - started >= spec["duration_s"]:
            writer_stop.set()
            writer.join()
            for index, control in enumerate(controls):
                control.put(expected_events(spec, index, writer_counts["by_key"]))
        try:
            message = results.get(timeout=PROGRESS_INTERVAL_S)
            if message[0] == "failed":
                raise RuntimeError(f"client process {message[1]} failed: {message[2]}")
            collected[message[1]] = message[2]
        except queue.Empty:
            pass
        if show_progress:
            done = progress.value
            sys.stderr.write(_progress_line(spec["op"], done, started, previous))
            sys.stderr.flush()
            previous = (time.monotonic(), done)
        if time.monotonic() > give_up_at:
            raise RuntimeError(f"only {len(collected)} of {len(processes)} client processes reported")
    # The last result arrives after the last answer; a few ms late at most, as in tools.load.
    elapsed_s = time.monotonic() - started
    cpu_after = servers_cpu_seconds(server_pids)
    machine_after = load.machine_cpu_seconds()
    load_after = os.getloadavg()
    if show_progress:
        sys.stderr.write("\n")
    by_process = {name: round(seconds - cpu_before.get(name, 0.0), 3) for name, seconds in cpu_after.items()}
    return report(spec, list(collected.values()), elapsed_s, server_pids, by_process,
                  (machine_before, machine_after), (load_before, load_after), writer_counts)


def report(spec: dict, results: list[dict], elapsed_s: float, server_pids: list[int], server_cpu: dict,
           machine: tuple, loads: tuple, writer_counts: dict) -> dict:
    server_cpu_s = sum(server_cpu.values())
    counts = [0] * load.HISTOGRAM_SIZE
    errors: dict[str, int] = {}
    for result in results:
        counts = [a + b for a, b in zip(counts, result["histogram"])]
        for name, count in result["errors"].items():
            errors[name] = errors.get(name, 0) + count
    ok = sum(result["ok"] for result in results)
    percentiles = load.histogram_percentiles(counts, LATENCY_FRACTIONS)
    client_cpu_s = sum(result["cpu_s"] for result in results)
    (busy_before, total_before), (busy_after, total_after) = machine
    busy_s = busy_after - busy_before
    out = {
        "op": spec["op"], "endpoints": spec["endpoints"], "processes": spec["processes"],
        "clients": spec["clients"], "conns": spec["conns"], "key_space": spec["key_space"],
        "value_bytes": spec["value_bytes"], "elapsed_s": round(elapsed_s, 3), "ok": ok,
        "ops_per_s": round(ok / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "errors": errors, "error_count": sum(errors.values()),
        "misses": sum(result["misses"] for result in results),
        "conflicts": sum(result["conflicts"] for result in results),
        "latency_us": {"p50": percentiles[0], "p90": percentiles[1], "p99": percentiles[2],
                       "p999": percentiles[3], "max": _max_latency(counts)},
        "server_pids": server_pids,
        "server_cpu_s": round(server_cpu_s, 3) if server_pids else None,
        "server_cpu_s_per_1000_ops": round(1000 * server_cpu_s / ok, 4) if server_pids and ok else None,
        "server_cpu_by_process_s": server_cpu,
        "client_cpu_s": round(client_cpu_s, 3),
        "machine_cpu": {"cores": os.cpu_count(), "busy_s": round(busy_s, 2),
                        "total_s": round(total_after - total_before, 2),
                        "others_s": round(max(0.0, busy_s - server_cpu_s - client_cpu_s), 2)},
        "loadavg_1m": {"before": round(loads[0][0], 2), "after": round(loads[1][0], 2)},
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if spec["op"] == "watch":
        due = sum(count * _watchers_of_key(spec, key) for key, count in writer_counts["by_key"].items())
        out.update({"watchers": spec["watchers"], "streams": spec["streams"], "write_rate": spec["write_rate"],
                    "puts": writer_counts["puts"], "put_errors": writer_counts["errors"],
                    "put_last_error": writer_counts["last_error"], "events_due": due, "events": ok,
                    "events_per_s": out.pop("ops_per_s")})
        out["server_cpu_s_per_1000_events"] = out.pop("server_cpu_s_per_1000_ops")
    return out


def _watchers_of_key(spec: dict, key: int) -> int:
    watchers, keys = spec["watchers"], spec["key_space"]
    return watchers // keys + (key < watchers % keys)


def _max_latency(counts: list[int]) -> int | None:
    for index in range(len(counts) - 1, -1, -1):
        if counts[index]:
            return load.histogram_value_us(index)
    return None


def _ms(value_us) -> str:
    return "-" if value_us is None else f"{value_us / 1000:.2f} ms"


def format_report(out: dict) -> str:
    lines = []
    latency = out["latency_us"]
    if out["op"] == "watch":
        lines.append(f"watch: {out['watchers']:,} watchers over {out['streams']} streams, "
                     f"{out['puts']:,} puts at {out['write_rate']}/s")
        lines.append(f"  events      {out['events']:,} of {out['events_due']:,} due, "
                     f"{out['events_per_s']:,.0f} events/s over {out['elapsed_s']:.1f} s")
        lines.append(f"  put->event  p50 {_ms(latency['p50'])}  p90 {_ms(latency['p90'])}  "
                     f"p99 {_ms(latency['p99'])}  max {_ms(latency['max'])}")
        per = out["server_cpu_s_per_1000_events"]
    else:
        lines.append(f"{out['op']}: {out['ok']:,} ok in {out['elapsed_s']:.2f} s = {out['ops_per_s']:,.0f} ops/s "
                     f"({out['clients']} in flight, {out['processes']} processes, {out['conns']} conns each)")
        lines.append(f"  latency     p50 {_ms(latency['p50'])}  p90 {_ms(latency['p90'])}  "
                     f"p99 {_ms(latency['p99'])}  max {_ms(latency['max'])}")
        per = out["server_cpu_s_per_1000_ops"]
    if out["server_cpu_s"] is not None:
        unit = "events" if out["op"] == "watch" else "ops"
        lines.append(f"  server CPU  {out['server_cpu_s']:.2f} s = {per:.3f} s per 1000 {unit} "
                     f"(pids {', '.join(map(str, out['server_pids']))})")
    machine = out["machine_cpu"]
    lines.append(f"  client CPU  {out['client_cpu_s']:.2f} s; machine busy {machine['busy_s']:.1f} of "
                 f"{machine['total_s']:.1f} CPU-s, other processes {machine['others_s']:.1f} s; "
                 f"load {out['loadavg_1m']['before']} -> {out['loadavg_1m']['after']}")
    if out["error_count"] or out["misses"] or out["conflicts"]:
        lines.append(f"  errors {out['errors']}  misses {out['misses']}  conflicts {out['conflicts']}")
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------


def _bounded(name: str, low: float, high: float, kind=int):
    def parse(text: str):
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{name} must be {low}..{high}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.grpc_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoints", default="127.0.0.1:2379",
                        help="host:port[,host:port...] (default 127.0.0.1:2379)")
    parser.add_argument("--op", choices=OPS, default="put")
    parser.add_argument("--clients", type=_bounded("--clients", 1, MAX_CLIENTS), default=64,
                        help="requests in flight in total (default 64)")
    parser.add_argument("--conns", type=_bounded("--conns", 1, MAX_CONNS), default=4,
                        help="gRPC channels (TCP connections) per client process (default 4)")
    parser.add_argument("--processes", type=_bounded("--processes", 1, MAX_PROCESSES), default=None,
                        help="client processes (default 2, or 1 with --clients 1)")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--duration", type=_bounded("--duration", 0.1, MAX_DURATION_S, float), default=None,
                        help="seconds of load (default 10 when --total is not given)")
    amount.add_argument("--total", type=_bounded("--total", 1, MAX_TOTAL), default=None, help="requests in all")
    parser.add_argument("--key-space", type=_bounded("--key-space", 1, MAX_KEYS), default=10_000)
    parser.add_argument("--value-bytes", type=_bounded("--value-bytes", 0, MAX_VALUE_BYTES), default=256)
    parser.add_argument("--watchers", type=_bounded("--watchers", 1, MAX_WATCHERS), default=1000,
                        help="watch: watches in all (default 1000)")
    parser.add_argument("--streams", type=_bounded("--streams", 1, MAX_WATCHERS), default=10,
                        help="watch: Watch streams in all (default 10)")
    parser.add_argument("--write-rate", type=_bounded("--write-rate", 0.1, 100_000, float), default=100.0,
                        help="watch: puts per second by the writer (default 100)")
    parser.add_argument("--watch-drain-s", type=_bounded("--watch-drain-s", 0, MAX_DURATION_S, float),
                        default=WATCH_DRAIN_S,
                        help="watch: after the writer stops, wait at most this many seconds for the "
                             f"events due (default {WATCH_DRAIN_S:g})")
    parser.add_argument("--server-pids", default=None,
                        help="pid[,pid...] of the servers (each with its child processes) for CPU per op; "
                             "'auto' (default): the processes listening on the endpoints' ports; 'none' to skip")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    return parser


def make_spec(args: argparse.Namespace) -> dict:
    endpoints = [endpoint.strip().removeprefix("http://") for endpoint in args.endpoints.split(",") if endpoint.strip()]
    if not endpoints:
        raise SystemExit("--endpoints: none given")
    duration_s = args.duration if args.duration is not None else (0.0 if args.total is not None else 10.0)
    if args.op == "watch" and not duration_s:
        raise SystemExit("--op watch runs for --duration, not --total")
    processes = args.processes or (1 if args.clients == 1 else 2)
    if args.op == "watch":
        processes = min(processes, args.streams)
    elif processes > args.clients:
        processes = args.clients
    if args.op == "txn" and args.key_space < args.clients:
        raise SystemExit("--op txn: every client owns keys, so --key-space must be at least --clients")
    return {"op": args.op, "endpoints": endpoints, "clients": args.clients, "conns": args.conns,
            "processes": processes, "duration_s": duration_s, "total": args.total or 0,
            "key_space": args.key_space, "value_bytes": args.value_bytes, "watchers": args.watchers,
            "streams": min(args.streams, args.watchers), "write_rate": args.write_rate,
            "watch_drain_s": args.watch_drain_s}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spec = make_spec(args)
    if args.server_pids in (None, "auto"):
        server_pids = find_server_pids(spec["endpoints"])
    elif args.server_pids == "none":
        server_pids = []
    else:
        server_pids = [int(pid) for pid in args.server_pids.split(",") if pid.strip()]
    try:
        out = run(spec, server_pids, show_progress=not args.quiet)
    except RuntimeError as error:  # a client process failed or never got ready: say why, no traceback
        print(f"\ngrpc_bench: {error}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=1) if args.json else format_report(out))
    return 1 if out["ok"] == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
