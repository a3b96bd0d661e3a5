"""`python -m tools.grpc_null_server`: a do-nothing etcd KV server, the floor of grpcio's own cost.

    python -m tools.grpc_null_server --listen 127.0.0.1:23790 --processes 2
    python -m tools.grpc_null_server --listen 127.0.0.1:23790 --aio   # grpc.aio, no thread pool

How this works: every process runs a grpcio server built exactly as a
quorumkv gateway builds its gRPC front (actors/grpc_front.py: the same
WORKER_THREADS thread pool, CONCURRENT_RPCS_MAX, message size options and
SO_REUSEPORT, so --processes N shares one port as N gateways do). Its KV
methods answer at once with an empty response carrying a response header
(a Range answers one key-value, so a load client's hit check passes), and
Maintenance.Status answers too, so etcdctl can talk to it. What a load
client measures against it is the cost of grpcio and protobuf on both
sides; quorumkv's gRPC path can only add to that.

With --aio the same services run on grpcio's asyncio server instead (one
thread, no pool, no hand-off to a worker thread): what a gRPC front built on
grpc.aio could at best cost.

The first process is the parent of the others: give its pid to
`tools.grpc_bench --server-pids` (or let the bench find it by the port).
SIGTERM or Ctrl-C stops them all.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import multiprocessing
import os
import signal
import sys
import threading

import grpc
import grpc.aio

from actors.grpc_front import CONCURRENT_RPCS_MAX, WORKER_THREADS, server_options
from protocol.etcd.etcdserverpb import rpc_pb2 as pb, rpc_pb2_grpc as pb_grpc
from protocol.etcd.mvccpb import kv_pb2
from protocol.limits import DEFAULT_LIMITS

MAX_PROCESSES = 64
NULL_CLUSTER_ID = 1
NULL_MEMBER_ID = 1
NULL_REVISION = 1


def header() -> pb.ResponseHeader:
    return pb.ResponseHeader(cluster_id=NULL_CLUSTER_ID, member_id=NULL_MEMBER_ID, revision=NULL_REVISION,
                             raft_term=1)


class NullKV(pb_grpc.KVServicer):
    def Range(self, request, context):
        # One key-value echoing the key: a reader's "did the key exist" check passes.
        return pb.RangeResponse(header=header(), kvs=[kv_pb2.KeyValue(key=request.key, mod_revision=NULL_REVISION)],
                                count=1)

    def Put(self, request, context):
        return pb.PutResponse(header=header())

    def DeleteRange(self, request, context):
        return pb.DeleteRangeResponse(header=header())

    def Txn(self, request, context):
        return pb.TxnResponse(header=header(), succeeded=True)

    def Compact(self, request, context):
        return pb.CompactionResponse(header=header())


class NullMaintenance(pb_grpc.MaintenanceServicer):
    def Status(self, request, context):
        return pb.StatusResponse(header=header(), version="3.4.0", leader=NULL_MEMBER_ID, raftIndex=1, raftTerm=1)


class AioNullKV(pb_grpc.KVServicer):
    async def Range(self, request, context):
        return NullKV.Range(self, request, context)

    async def Put(self, request, context):
        return pb.PutResponse(header=header())

    async def DeleteRange(self, request, context):
        return pb.DeleteRangeResponse(header=header())

    async def Txn(self, request, context):
        return pb.TxnResponse(header=header(), succeeded=True)

    async def Compact(self, request, context):
        return pb.CompactionResponse(header=header())


class AioNullMaintenance(pb_grpc.MaintenanceServicer):
    async def Status(self, request, context):
        return NullMaintenance.Status(self, request, context)


async def serve_aio(address: str, stop: threading.Event, ready=None) -> None:
    server = grpc.aio.server(maximum_concurrent_rpcs=CONCURRENT_RPCS_MAX, options=server_options(DEFAULT_LIMITS))
    pb_grpc.add_KVServicer_to_server(AioNullKV(), server)
    pb_grpc.add_MaintenanceServicer_to_server(AioNullMaintenance(), server)
    server.add_insecure_port(address)  # raises when the port cannot be bound
    await server.start()
    if ready is not None:
        ready.set()
    await asyncio.get_running_loop().run_in_executor(None, stop.wait)
    await server.stop(0.5)


def build_server(address: str) -> grpc.Server:
    """A grpcio server configured as actors/grpc_front.py's, with the null services."""
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="grpc"),
        maximum_concurrent_rpcs=CONCURRENT_RPCS_MAX, options=server_options(DEFAULT_LIMITS))
    pb_grpc.add_KVServicer_to_server(NullKV(), server)
    pb_grpc.add_MaintenanceServicer_to_server(NullMaintenance(), server)
    server.add_insecure_port(address)  # raises when the port cannot be bound
    return server


def serve(address: str, aio: bool, stop: threading.Event, ready=None) -> None:
    """Serve until `stop` is set (by SIGTERM/SIGINT)."""
    if aio:
        asyncio.run(serve_aio(address, stop, ready))
        return
    server = build_server(address)
    server.start()
    if ready is not None:
        ready.set()
    stop.wait()  # the server's lifetime: until a signal
    server.stop(grace=0.5).wait(5.0)


def serve_child(address: str, aio: bool, ready) -> None:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    serve(address, aio, stop, ready)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.grpc_null_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:23790", help="host:port (default 127.0.0.1:23790)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="server processes sharing the port, as quorumkv's --gateways (default: cores)")
    parser.add_argument("--aio", action="store_true", help="grpcio's asyncio server instead of the thread pool")
    args = parser.parse_args(argv)
    if not 1 <= args.processes <= MAX_PROCESSES:
        parser.error(f"--processes must be 1..{MAX_PROCESSES}")
    address = args.listen.removeprefix("http://")
    context = multiprocessing.get_context("spawn")
    children = []
    for _ in range(args.processes - 1):
        ready = context.Event()
        child = context.Process(target=serve_child, args=(address, args.aio, ready), daemon=True)
        child.start()
        children.append((child, ready))
    for child, ready in children:
        if not ready.wait(30):
            raise SystemExit("a server process did not start")
    stop = threading.Event()

    def on_signal(*_):
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    print(f"null gRPC server on {address}, {args.processes} processes{' (aio)' if args.aio else ''}, "
          f"pid {os.getpid()}", flush=True)
    serve(address, args.aio, stop)
    for child, _ in children:
        child.terminate()
        child.join(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
