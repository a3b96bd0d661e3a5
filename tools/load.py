"""`python -m tools.load`: drive a quorumkv node with pipelined, batched requests.

How this works: N client processes (--clients) each connect one ZeroMQ
DEALER to every gateway the node announces (op "hello"), so frames are
spread round-robin over the node's gateway processes. Each client keeps
--pipeline requests in flight, sent in frames of --batch requests, until
--duration seconds or --requests requests have passed. A request's latency
is the time from the send of its frame to the arrival of its answer.

The server's CPU cost is read from /proc: utime + stime of the node's
supervisor (--server-pid) and all its descendants, before and after the
run, per actor and in total. With --spawn the tool starts a node of its own
in a temporary data dir (the tests' `Node` logic) and removes it at the
end, also on Ctrl-C.

Workloads:
  put               put KEY VALUE (--value-bytes, over --keys distinct keys)
  get-serializable  range KEY serializable=true (member-local read)
  get-linearizable  range KEY (read index round, then a local read)
  txn               compare-and-swap: if mod_revision(KEY) == last seen
                    then put KEY VALUE else range KEY (to learn the new
                    mod_revision); a lost race counts as a "conflict".

Every loop is bounded in count and time; only loopback targets are allowed
(this is a load generator, not a tool to point at someone else's server).
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import multiprocessing
import os
import queue
import shutil
import signal
import sys
import tempfile
import time
import urllib.parse

import ormsgpack
import zmq

from protocol import codec

WORKLOADS = ("put", "get-serializable", "get-linearizable", "txn")
DEFAULT_ENDPOINT = "127.0.0.1:2382"
KEY_PREFIX = b"load/"
PROGRESS_INTERVAL_S = 1.0
WORKER_PROGRESS_INTERVAL_S = 0.2
WORKER_START_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5.0
DRAIN_POLL_MS = 50
MAX_DURATION_S = 3600.0
MAX_REQUESTS = 10**9
MAX_CLIENTS = 64
MAX_PIPELINE = 65536
MAX_KEYS = 10_000_000
MAX_VALUE_BYTES = 1024 * 1024
# Messages taken from the socket per poll wake-up (fairness with sending).
RECEIVE_BURST = 64
# Latency histogram: exact below 1024 us, then 512 sub-buckets per power of two (0.2%).
HISTOGRAM_SUB_BITS = 10
HISTOGRAM_SIZE = 40 << HISTOGRAM_SUB_BITS


# ---- latency histogram ------------------------------------------------------------


def histogram_index(latency_us: int) -> int:
    if latency_us < 1024:
        return latency_us
    shift = latency_us.bit_length() - HISTOGRAM_SUB_BITS
    return (shift << HISTOGRAM_SUB_BITS) + (latency_us >> shift)


def histogram_value_us(index: int) -> int:
    shift = index >> HISTOGRAM_SUB_BITS
    if shift == 0:
        return index
    return (index & ((1 << HISTOGRAM_SUB_BITS) - 1)) << shift


def histogram_percentiles(counts: list[int], fractions: tuple[float, ...]) -> list[int | None]:
    total = sum(counts)
    if total == 0:
        return [None for _ in fractions]
    answers = []
    for fraction in fractions:
        rank = max(1, int(fraction * total + 0.999999))
        seen = 0
        for index, count in enumerate(counts):
            seen += count
            if seen >= rank:
                answers.append(histogram_value_us(index))
                break
    return answers


# ---- server CPU from /proc ------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as handle:
                    found.extend(int(child) for child in handle.read().split())
            except (FileNotFoundError, ProcessLookupError):
                continue
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found


def proc_argv(pid: int) -> list[str] | None:
    """A process's command line from /proc, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return [part.decode(errors="replace") for part in handle.read().split(b"\0") if part]
    except (FileNotFoundError, ProcessLookupError):
        return None


def proc_stat_fields(path: str) -> list[str] | None:
    """The fields of a /proc/.../stat file after "pid (comm) " (state first), or None when gone."""
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            text = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2:].split()


def _process_name(pid: int) -> str:
    """The actor's role (raft_log, applier, gateway-1, ...) from its argv, else its command."""
    argv = proc_argv(pid)
    if argv is None:
        return f"pid-{pid}"
    if "--role" in argv and argv.index("--role") + 1 < len(argv):
        role = argv[argv.index("--role") + 1]
        if role == "gateway" and "--index" in argv:
            return f"gateway-{argv[argv.index('--index') + 1]}"
        return role
    return os.path.basename(argv[0]) if argv else f"pid-{pid}"


def _cpu_ticks(pid: int) -> int | None:
    """utime + stime + cutime + cstime in clock ticks (reaped children count too)."""
    fields = proc_stat_fields(f"/proc/{pid}/stat")
    if fields is None:
        return None
    # After "pid (comm) ", field 3 (state) is fields[0]; utime is field 14.
    return int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])


def _zmq_thread_ticks(pid: int) -> int:
    """utime + stime of the process's ZeroMQ background threads (comm "ZMQbg/...")."""
    total = 0
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat", encoding="ascii", errors="replace") as handle:
                text = handle.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if text[text.index("(") + 1:].startswith("ZMQbg"):
            fields = text[text.rindex(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])
    return total


def server_cpu_seconds(root_pid: int, max_processes: int = 1024) -> dict[str, float]:
    """CPU seconds so far of root_pid and every descendant, by process name.

    Also "NAME/zmq-io": the part of NAME's time spent in its ZeroMQ I/O
    threads, which a Python profiler does not see.
    """
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    usage: dict[str, float] = {}
    pending, seen = [root_pid], set()
    while pending and len(seen) < max_processes:
        pid = pending.pop()
        if pid in seen:
            continue
        seen.add(pid)
        ticks = _cpu_ticks(pid)
        if ticks is None:
            continue
        name = "supervisor" if pid == root_pid else _process_name(pid)
        while name in usage:
            name += "'"
        usage[name] = ticks / ticks_per_second
        usage[f"{name}/zmq-io"] = _zmq_thread_ticks(pid) / ticks_per_second
        pending.extend(_children(pid))
    return usage


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [int(value) for value in handle.readline().split()[1:]]
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal (guest time is inside user already).
    total = sum(fields[:8])
    idle = fields[3] + fields[4]
    return (total - idle) / ticks_per_second, total / ticks_per_second


# ---- targets ----------------------------------------------------------------------


def loopback_endpoint(endpoint: str) -> str:
    """'host:port' or 'tcp://host:port' -> 'tcp://host:port'; refuse anything not loopback."""
    url = endpoint if "://" in endpoint else f"tcp://{endpoint}"
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme != "tcp" or parsed.hostname is None or parsed.port is None:
        raise ValueError(f"endpoint {endpoint!r} is not tcp://host:port")
    host = parsed.hostname
    if host != "localhost":
        try:
            if not ipaddress.ip_address(host).is_loopback:
                raise ValueError(f"endpoint {endpoint!r} is not a loopback address")
        except ValueError as error:
            raise ValueError(f"endpoint {endpoint!r}: only loopback targets are allowed ({error})") from None
    return f"tcp://{host}:{parsed.port}" if ":" not in host else f"tcp://[{host}]:{parsed.port}"


def request(endpoint: str, op: str, body: dict, timeout_s: float = 5.0) -> tuple[int, dict]:
    """One request on its own DEALER; raises TimeoutError if no answer."""
    context = zmq.Context.instance()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    try:
        dealer.connect(endpoint)
        dealer.send(codec.encode_request_frame([[1, op, body]]))
        if not dealer.poll(int(timeout_s * 1000)):
            raise TimeoutError(f"no answer to {op!r} from {endpoint} in {timeout_s}s")
        (_request_id, status, response), = codec.decode_response_frame(dealer.recv())
        return status, response
    finally:
        dealer.close()


def discover_gateways(endpoints: list[str]) -> list[str]:
    """Every gateway endpoint the node announces via hello (all loopback-checked)."""
    found: list[str] = []
    for endpoint in endpoints:
        status, body = request(loopback_endpoint(endpoint), "hello", {})
        if status != codec.STATUS_OK:
            raise RuntimeError(f"hello to {endpoint} failed: {body}")
        for gateway in body.get("gateways") or [endpoint]:
            gateway = loopback_endpoint(gateway)
            if gateway not in found:
                found.append(gateway)
    return found


# ---- one client process ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClientSpec:
    workload: str
    gateways: tuple[str, ...]
    pipeline: int
    batch: int
    duration_s: float
    requests: int
    keys: int
    value_bytes: int
    timeout_s: float
    clients: int


def key_bytes(index: int) -> bytes:
    return KEY_PREFIX + b"%010d" % index


def connect_dealer(context: zmq.Context, gateways: tuple[str, ...], high_water_mark: int) -> zmq.Socket:
    """A DEALER connected to every gateway, returned once all handshakes are done."""
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.SNDHWM, high_water_mark)
    dealer.setsockopt(zmq.RCVHWM, high_water_mark)
    monitor = dealer.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    for gateway in gateways:
        dealer.connect(gateway)
    # Frames go round-robin only over completed connections; wait for all.
    connected, deadline = 0, time.monotonic() + CONNECT_TIMEOUT_S
    while connected < len(gateways) and time.monotonic() < deadline:
        if monitor.poll(100):
            monitor.recv_multipart()
            connected += 1
    dealer.disable_monitor()
    monitor.close(linger=0)
    return dealer


class Client:
    """The request loop of one client process (state kept in the object, the loop bounded)."""

    def __init__(self, spec: ClientSpec, index: int, mod_revisions: dict[int, int]):
        self.spec = spec
        self.index = index
        self.value = os.urandom(spec.value_bytes)
        # Keys owned by this client: index, index + clients, ... (txn CAS needs no sharing).
        self.own_keys = list(range(index, spec.keys, spec.clients)) or [index % spec.keys]
        self.key_cursor = 0
        self.mod_revisions = mod_revisions
        # The preload records each key's mod_revision for the txn workload.
        self.record_revisions = False
        self.inflight: dict[int, int] = {}
        self.inflight_keys: dict[int, int] = {}
        self.next_request_id = 1
        self.sent = 0
        self.completed = 0
        self.errors: dict[str, int] = {}
        self.misses = 0
        self.conflicts = 0
        self.histogram = [0] * HISTOGRAM_SIZE
        self.first_send = None
        self.last_receive = None
        self.finished = None
        self.frames_sent = 0
        self.frames_received = 0

    def make_body(self, key_index: int) -> tuple[str, dict]:
        key = key_bytes(key_index)
        workload = self.spec.workload
        if workload == "put":
            return "put", {"key": key, "value": self.value}
        if workload == "get-serializable":
            return "range", {"key": key, "serializable": True}
        if workload == "get-linearizable":
            return "range", {"key": key}
        return "txn", {
            "compare": [{"result": 0, "target": 2, "key": key, "mod_revision": self.mod_revisions.get(key_index, 0)}],
            "success": [{"request_put": {"key": key, "value": self.value}}],
            "failure": [{"request_range": {"key": key}}],
        }

    def send_frame(self, dealer: zmq.Socket, count: int) -> None:
        items = []
        own_keys, keys_total = self.own_keys, len(self.own_keys)
        for _ in range(count):
            request_id = self.next_request_id
            self.next_request_id += 1
            key_index = own_keys[self.key_cursor % keys_total]
            self.key_cursor += 1
            op, body = self.make_body(key_index)
            items.append([request_id, op, body])
            self.inflight_keys[request_id] = key_index
        frame = codec.encode_request_frame(items)
        now = time.perf_counter_ns()
        dealer.send(frame, copy=False)
        for item in items:
            self.inflight[item[0]] = now
        self.sent += count
        self.frames_sent += 1
        if self.first_send is None:
            self.first_send = now

    def take_frame(self, frame: bytes, now: int) -> None:
        try:
            items = ormsgpack.unpackb(frame)[1]
        except (ormsgpack.MsgpackDecodeError, ValueError, TypeError, IndexError):
            self.count_error("MalformedResponse")
            return
        inflight, histogram = self.inflight, self.histogram
        self.frames_received += 1
        for request_id, status, body in items:
            sent_at = inflight.pop(request_id, None)
            if sent_at is None:
                if status == codec.STATUS_ERROR:
                    self.count_error(body.get("code", "Unknown") if isinstance(body, dict) else "Unknown")
                continue  # a frame-level error, or an answer after its client-side timeout
            key_index = self.inflight_keys.pop(request_id, None)
            latency_us = (now - sent_at) // 1000
            if latency_us < 1024:
                histogram[latency_us] += 1
            else:
                shift = latency_us.bit_length() - HISTOGRAM_SUB_BITS
                histogram[(shift << HISTOGRAM_SUB_BITS) + (latency_us >> shift)] += 1
            self.completed += 1
            if status == codec.STATUS_ERROR:
                self.count_error(body.get("code", "Unknown") if isinstance(body, dict) else "Unknown")
            elif status == codec.STATUS_OK:
                self.check_answer(key_index, body)
        self.last_receive = now

    def check_answer(self, key_index: int | None, body: dict) -> None:
        workload = self.spec.workload
        if workload == "txn":
            if body.get("succeeded"):
                self.mod_revisions[key_index] = body["header"]["revision"]
                return
            self.conflicts += 1
            try:
                kvs = body["responses"][0]["response_range"]["kvs"]
                self.mod_revisions[key_index] = kvs[0]["mod_revision"] if kvs else 0
            except (KeyError, IndexError, TypeError):
                self.count_error("UnexpectedTxnResponse")
        elif workload == "put":
            if self.record_revisions:
                self.mod_revisions[key_index] = body["header"]["revision"]
        elif not body.get("kvs"):
            self.misses += 1

    def count_error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def expire(self, now: int) -> None:
        """Give up on requests older than the timeout (oldest first: dicts keep send order)."""
        limit = now - int(self.spec.timeout_s * 1e9)
        expired = []
        for request_id, sent_at in self.inflight.items():
            if sent_at > limit:
                break
            expired.append(request_id)
        for request_id in expired:
            del self.inflight[request_id]
            self.inflight_keys.pop(request_id, None)
            self.completed += 1
            self.count_error("ClientTimeout")

    def run(self, dealer: zmq.Socket, progress, start_at: float, stop=None) -> None:
        spec = self.spec
        deadline = start_at + spec.duration_s
        give_up_at = deadline + spec.timeout_s
        next_progress = time.monotonic()
        # The run's one loop, bounded by the request quota, the deadline and give_up_at.
        while True:
            now_s = time.monotonic()
            sending = self.sent < spec.requests and now_s < deadline
            while sending and len(self.inflight) + spec.batch <= spec.pipeline:
                self.send_frame(dealer, min(spec.batch, spec.requests - self.sent))
                sending = self.sent < spec.requests
            if not self.inflight and not sending:
                break
            if now_s >= give_up_at:
                self.expire(time.perf_counter_ns() + int(spec.timeout_s * 1e9))
                break
            if dealer.poll(DRAIN_POLL_MS, zmq.POLLIN):
                for _ in range(RECEIVE_BURST):
                    try:
                        frame = dealer.recv(zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    self.take_frame(frame, time.perf_counter_ns())
            else:
                self.expire(time.perf_counter_ns())
            if now_s >= next_progress:
                self.expire(time.perf_counter_ns())  # also under traffic: a lost request frees its slot
                progress[2 * self.index] = self.completed
                progress[2 * self.index + 1] = sum(self.errors.values())
                next_progress = now_s + WORKER_PROGRESS_INTERVAL_S
                if stop is not None and stop.is_set():
                    deadline = give_up_at = now_s  # interrupted: stop sending and waiting
        progress[2 * self.index] = self.completed
        progress[2 * self.index + 1] = sum(self.errors.values())
        self.finished = time.perf_counter_ns()

    def result(self, cpu_seconds: float) -> dict:
        return {
            "completed": self.completed,
            "errors": self.errors,
            "misses": self.misses,
            "conflicts": self.conflicts,
            "histogram": {index: count for index, count in enumerate(self.histogram) if count},
            "first_send_ns": self.first_send,
            "last_receive_ns": self.last_receive,
            "finished_ns": self.finished,
            "client_cpu_s": cpu_seconds,
            "frames_sent": self.frames_sent,
            "frames_received": self.frames_received,
        }


def client_process(spec: ClientSpec, index: int, mod_revisions: dict[int, int], progress,
                   ready, start, stop, results) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    context = zmq.Context()
    try:
        dealer = connect_dealer(context, spec.gateways, 4 * spec.pipeline)
        client = Client(spec, index, mod_revisions)
        ready.put(index)
        if not start.wait(WORKER_START_TIMEOUT_S):
            return
        times_before = os.times()
        client.run(dealer, progress, time.monotonic(), stop)
        times_after = os.times()
        cpu_seconds = (times_after.user - times_before.user) + (times_after.system - times_before.system)
        results.put((index, client.result(cpu_seconds)))
    finally:
        context.destroy(linger=0)


# ---- the run: preload, clients, CPU, results --------------------------------------


def preload(spec: ClientSpec, log=None) -> dict[int, int]:
    """Put every key once (so reads hit and txns know mod_revisions); key -> mod_revision."""
    preload_spec = dataclasses.replace(spec, workload="put", pipeline=max(spec.pipeline, 1024),
                                       batch=min(256, max(spec.batch, 64)), requests=spec.keys,
                                       duration_s=max(60.0, spec.keys / 500), clients=1)
    context = zmq.Context()
    try:
        dealer = connect_dealer(context, spec.gateways, 4 * preload_spec.pipeline)
        client = Client(preload_spec, 0, {})
        client.record_revisions = True
        started = time.monotonic()
        client.run(dealer, [0, 0], started)
    finally:
        context.destroy(linger=0)
    if client.errors or len(client.mod_revisions) != spec.keys:
        raise RuntimeError(f"preload of {spec.keys} keys failed: errors {client.errors}, "
                           f"{len(client.mod_revisions)} keys written")
    if log:
        log(f"preloaded {spec.keys} keys in {time.monotonic() - started:.1f}s")
    return client.mod_revisions


def client_specs(spec: ClientSpec) -> list[ClientSpec]:
    share, extra = divmod(spec.requests, spec.clients)
    return [dataclasses.replace(spec, requests=share + (1 if index < extra else 0)) for index in range(spec.clients)]


def merge_results(results: list[dict]) -> dict:
    histogram = [0] * HISTOGRAM_SIZE
    errors: dict[str, int] = {}
    for result in results:
        for index, count in result["histogram"].items():
            histogram[int(index)] += count
        for code, count in result["errors"].items():
            errors[code] = errors.get(code, 0) + count
    first = [r["first_send_ns"] for r in results if r["first_send_ns"] is not None]
    # Until the last client finished: answers, or the timeouts of the unanswered.
    last = [r["finished_ns"] for r in results if r["first_send_ns"] is not None]
    elapsed_s = (max(last) - min(first)) / 1e9 if first and last else 0.0
    completed = sum(r["completed"] for r in results)
    error_count = sum(errors.values())
    ok = completed - error_count
    p50, p99, p999 = histogram_percentiles(histogram, (0.50, 0.99, 0.999))
    nonzero = [index for index, count in enumerate(histogram) if count]
    return {
        "elapsed_s": round(elapsed_s, 3),
        "requests_completed": completed,
        "requests_ok": ok,
        "errors": errors,
        "error_count": error_count,
        "misses": sum(r["misses"] for r in results),
        "conflicts": sum(r["conflicts"] for r in results),
        "ops_per_s": round(ok / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "latency_us": {"p50": p50, "p99": p99, "p99.9": p999,
                       "max": histogram_value_us(nonzero[-1]) if nonzero else None},
        "client_cpu_s": round(sum(r["client_cpu_s"] for r in results), 3),
        # How well requests and answers were batched into frames (answers per frame is the server's).
        "requests_per_frame_sent": round(completed / max(1, sum(r["frames_sent"] for r in results)), 2),
        "answers_per_frame_received": round(completed / max(1, sum(r["frames_received"] for r in results)), 2),
    }


def cpu_delta(before: dict[str, float], after: dict[str, float], ok: int) -> dict:
    delta = {name: round(after[name] - before.get(name, 0.0), 3) for name in sorted(after)}
    by_process = {name: seconds for name, seconds in delta.items() if not name.endswith("/zmq-io")}
    zmq_io = {name.removesuffix("/zmq-io"): seconds for name, seconds in delta.items() if name.endswith("/zmq-io")}
    total_s = sum(by_process.values())
    return {
        "total_s": round(total_s, 3),
        "per_1000_ops_s": round(total_s / ok * 1000, 5) if ok else None,
        "per_op_us": round(total_s / ok * 1e6, 2) if ok else None,
        "by_process_s": by_process,
        "zmq_io_thread_s": zmq_io,
    }


def _progress_line(progress, started: float, clients: int) -> str:
    completed = sum(progress[2 * i] for i in range(clients))
    errors = sum(progress[2 * i + 1] for i in range(clients))
    elapsed = max(1e-9, time.monotonic() - started)
    start = "\r" if sys.stderr.isatty() else ""
    return f"{start}[{elapsed:6.1f}s] {completed:>12,} answered {completed / elapsed:>10,.0f}/s  errors {errors:,}  "


def run_clients(spec: ClientSpec, mod_revisions: dict[int, int], server_pid: int | None,
                show_progress: bool) -> tuple[list[dict], tuple, dict]:
    context = multiprocessing.get_context("spawn")
    progress = context.Array("q", 2 * spec.clients, lock=False)
    ready, results = context.Queue(), context.Queue()
    start, stop = context.Event(), context.Event()
    processes = []
    for index, client_spec in enumerate(client_specs(spec)):
        owned = {key: revision for key, revision in mod_revisions.items() if key % spec.clients == index}
        process = context.Process(target=client_process, name=f"load-client-{index}", daemon=True,
                                  args=(client_spec, index, owned, progress, ready, start, stop, results))
        process.start()
        processes.append(process)
    try:
        for _ in processes:
            try:
                ready.get(timeout=WORKER_START_TIMEOUT_S)
            except queue.Empty:
                raise RuntimeError(f"a client did not start in {WORKER_START_TIMEOUT_S}s") from None
        cpu_before = server_cpu_seconds(server_pid) if server_pid else None
        machine_before = machine_cpu_seconds()
        started = time.monotonic()
        start.set()
        collected: dict[int, dict] = {}
        give_up_at = started + spec.duration_s + spec.timeout_s + 30
        next_progress = started + PROGRESS_INTERVAL_S
        while len(collected) < len(processes) and time.monotonic() < give_up_at:
            try:
                index, result = results.get(timeout=0.1)
                collected[index] = result
            except queue.Empty:
                if not any(p.is_alive() for p in processes) and results.empty():
                    break
            if show_progress and time.monotonic() >= next_progress:
                end = "" if sys.stderr.isatty() else "\n"
                sys.stderr.write(_progress_line(progress, started, spec.clients) + end)
                sys.stderr.flush()
                next_progress += PROGRESS_INTERVAL_S
        cpu_after = server_cpu_seconds(server_pid) if server_pid else None
        machine_after = machine_cpu_seconds()
        if show_progress and sys.stderr.isatty():
            sys.stderr.write(_progress_line(progress, started, spec.clients) + "\n")
        if len(collected) < len(processes):
            raise RuntimeError(f"only {len(collected)} of {len(processes)} clients reported")
        machine = {"busy_s": round(machine_after[0] - machine_before[0], 2),
                   "capacity_s": round(machine_after[1] - machine_before[1], 2), "cores": os.cpu_count()}
        return [collected[i] for i in sorted(collected)], (cpu_before, cpu_after), machine
    finally:
        stop.set()
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)


def run_load(spec: ClientSpec, server_pid: int | None = None, show_progress: bool = True, log=None) -> dict:
    """Preload if needed, run the clients, and return the report as a dict."""
    mod_revisions = preload(spec, log) if spec.workload != "put" else {}
    results, (cpu_before, cpu_after), machine = run_clients(spec, mod_revisions, server_pid, show_progress)
    report = {
        "workload": spec.workload,
        "gateways": list(spec.gateways),
        "clients": spec.clients,
        "pipeline": spec.pipeline,
        "batch": spec.batch,
        "keys": spec.keys,
        "value_bytes": spec.value_bytes,
        **merge_results(results),
    }
    if cpu_before is not None and cpu_after is not None:
        report["server_cpu"] = cpu_delta(cpu_before, cpu_after, report["requests_ok"])
    # CPU that neither the node nor our clients used: other load that skews the numbers.
    server_s = report.get("server_cpu", {}).get("total_s", 0.0)
    machine["others_s"] = round(max(0.0, machine["busy_s"] - server_s - report["client_cpu_s"]), 2)
    report["machine_cpu"] = machine
    return report


# ---- output ---------------------------------------------------------------------


def _us(value) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:,.2f} ms" if value >= 1000 else f"{value} us"


def format_table(report: dict) -> str:
    latency = report["latency_us"]
    lines = [
        f"workload            {report['workload']}  ({report['keys']:,} keys, {report['value_bytes']} B values)",
        f"target              {len(report['gateways'])} gateway(s): {', '.join(report['gateways'])}",
        f"clients             {report['clients']} x pipeline {report['pipeline']}, batch {report['batch']}/frame",
        f"elapsed             {report['elapsed_s']:.2f} s",
        f"requests            {report['requests_ok']:,} ok, {report['error_count']:,} errors",
        f"frames              {report['requests_per_frame_sent']} requests/frame sent, "
        f"{report['answers_per_frame_received']} answers/frame received",
        f"throughput          {report['ops_per_s']:,.0f} ops/s",
        f"latency             p50 {_us(latency['p50'])}   p99 {_us(latency['p99'])}   "
        f"p99.9 {_us(latency['p99.9'])}   max {_us(latency['max'])}",
    ]
    if report["workload"].startswith("get"):
        lines.append(f"misses              {report['misses']:,} (reads that found no key)")
    if report["workload"] == "txn":
        lines.append(f"cas conflicts       {report['conflicts']:,} (txn answered, compare failed)")
    for code, count in sorted(report["errors"].items()):
        lines.append(f"  error {code:<20} {count:,}")
    cpu = report.get("server_cpu")
    if cpu:
        lines.append(f"server cpu          {cpu['total_s']:.2f} s = {cpu['per_1000_ops_s']} s per 1000 ops "
                     f"({cpu['per_op_us']} us/op)")
        lines.append("  by process        " + ", ".join(f"{name} {s:.2f}s" for name, s in cpu["by_process_s"].items()))
        lines.append("  of which zmq I/O  " + ", ".join(f"{name} {s:.2f}s" for name, s in cpu["zmq_io_thread_s"].items()
                                                        if name != "supervisor"))
    else:
        lines.append("server cpu          n/a (pass --server-pid or --spawn)")
    ok = max(1, report["requests_ok"])
    lines.append(f"client cpu          {report['client_cpu_s']:.2f} s ({report['client_cpu_s'] / ok * 1e6:.1f} us/op)")
    machine = report["machine_cpu"]
    lines.append(f"machine cpu         {machine['busy_s']:.2f} s busy of {machine['capacity_s']:.2f} s "
                 f"({machine['cores']} cores); other processes {machine['others_s']:.2f} s")
    return "\n".join(lines)


# ---- a node of our own ------------------------------------------------------------


class SpawnedNode:
    """A node in a temporary data dir, removed on exit (also on Ctrl-C)."""

    def __init__(self, gateways: int, keep_data: bool = False):
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if repo not in sys.path:
            sys.path.insert(0, repo)
        from tests.conftest import Node  # the tests' node launcher, one copy of that logic

        self.directory = tempfile.mkdtemp(prefix="quorumkv-load-")
        self.keep_data = keep_data
        self.node = Node(os.path.join(self.directory, "data"), os.path.join(self.directory, "node.log"), gateways)

    def __enter__(self):
        try:
            self.node.start()
        except BaseException:
            sys.stderr.write(self.node.log_tail())
            self.__exit__(None, None, None)
            raise
        return self.node

    def __exit__(self, *_exc) -> None:
        self.node.stop()
        if self.keep_data:
            sys.stderr.write(f"node data and log kept in {self.directory}\n")
        else:
            shutil.rmtree(self.directory, ignore_errors=True)


# ---- command line -----------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.load", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=WORKLOADS, default="put")
    parser.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    parser.add_argument("--pipeline", type=int, default=256, help="requests in flight per client (default 256)")
    parser.add_argument("--batch", type=int, default=16, help="requests per frame (default 16)")
    parser.add_argument("--duration", type=float, help="seconds to send for (default 10 unless --requests)")
    parser.add_argument("--requests", type=int, help="total requests over all clients")
    parser.add_argument("--keys", type=int, default=10_000, help="distinct keys (default 10000)")
    parser.add_argument("--value-bytes", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before a request counts as lost")
    parser.add_argument("--endpoints", default=DEFAULT_ENDPOINT, help="comma-separated host:port (loopback only)")
    parser.add_argument("--spawn", action="store_true", help="start a node in a temporary data dir")
    parser.add_argument("--gateways", type=int, default=2, help="gateway processes of a --spawn node")
    parser.add_argument("--keep-data", action="store_true", help="keep a --spawn node's data dir and log")
    parser.add_argument("--server-pid", type=int, help="the node's supervisor pid, for server CPU")
    parser.add_argument("--json", action="store_true", help="JSON report on stdout (the table goes to stderr)")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    return parser


def spec_from_args(args: argparse.Namespace, gateways: list[str]) -> ClientSpec:
    from protocol.limits import DEFAULT_LIMITS

    checks = [
        (1 <= args.clients <= MAX_CLIENTS, f"--clients must be 1..{MAX_CLIENTS}"),
        (1 <= args.batch <= DEFAULT_LIMITS.max_requests_per_frame,
         f"--batch must be 1..{DEFAULT_LIMITS.max_requests_per_frame}"),
        (args.batch <= args.pipeline <= MAX_PIPELINE, f"--pipeline must be --batch..{MAX_PIPELINE}"),
        (1 <= args.keys <= MAX_KEYS, f"--keys must be 1..{MAX_KEYS}"),
        (0 <= args.value_bytes <= MAX_VALUE_BYTES, f"--value-bytes must be 0..{MAX_VALUE_BYTES}"),
        (args.duration is None or 0 < args.duration <= MAX_DURATION_S, f"--duration must be 0..{MAX_DURATION_S}"),
        (args.requests is None or 1 <= args.requests <= MAX_REQUESTS, f"--requests must be 1..{MAX_REQUESTS}"),
        (0 < args.timeout <= 600, "--timeout must be 0..600"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    duration_s = args.duration if args.duration is not None else (10.0 if args.requests is None else MAX_DURATION_S)
    return ClientSpec(workload=args.workload, gateways=tuple(gateways), pipeline=args.pipeline, batch=args.batch,
                      duration_s=duration_s, requests=args.requests or MAX_REQUESTS, keys=args.keys,
                      value_bytes=args.value_bytes, timeout_s=args.timeout, clients=args.clients)


def run_against(args: argparse.Namespace, endpoints: list[str], server_pid: int | None) -> dict:
    gateways = discover_gateways(endpoints)
    spec = spec_from_args(args, gateways)

    def log(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr)

    log(f"{spec.workload}: {spec.clients} clients x {spec.pipeline} in flight, {spec.batch}/frame, "
        f"{len(gateways)} gateway(s)")
    return run_load(spec, server_pid, show_progress=not args.quiet, log=log)


def _raise_interrupt(*_args) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    try:
        endpoints = [loopback_endpoint(e.strip()) for e in args.endpoints.split(",") if e.strip()]
        if args.spawn:
            with SpawnedNode(args.gateways, args.keep_data) as node:
                report = run_against(args, [f"tcp://{node.zmq_endpoint}"], node.process.pid)
        else:
            report = run_against(args, endpoints, args.server_pid)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, TimeoutError) as error:
        print(f"load: {error}", file=sys.stderr)
        return 2
    table = format_table(report)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps(report, indent=2))
    else:
        print(table)
    return 1 if report["error_count"] else 0


if __name__ == "__main__":
    # Run as tools.load (not __main__) so the spawned client processes find our functions.
    from tools.load import main as _main

    sys.exit(_main())
