"""Client-facing socket set-up shared by the gateways and the watch broadcaster.

Each binds a ROUTER and announces its endpoint in a file of the run
directory, where `hello` finds it for clients. A restarted actor takes its
previous port back when it can, so clients connected to it simply
reconnect; the port of a killed process may take a moment to come free, so
the previous endpoint is tried a few times before a new port is taken.
"""

from __future__ import annotations

import os
import time

import zmq

from protocol.limits import Limits

REBIND_ATTEMPTS = 10
REBIND_RETRY_S = 0.05


def client_router(context: zmq.Context, limits: Limits, send_high_water_mark: int) -> zmq.Socket:
    socket = context.socket(zmq.ROUTER)
    # Sending to a client that is gone raises instead of dropping silently.
    socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
    socket.setsockopt(zmq.SNDHWM, send_high_water_mark)
    socket.setsockopt(zmq.RCVHWM, limits.socket_high_water_mark)
    socket.setsockopt(zmq.MAXMSGSIZE, limits.max_frame_bytes)
    socket.setsockopt(zmq.LINGER, 0)
    return socket


def read_endpoint(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip() or None
    except OSError:
        return None


def dialable(endpoint: str) -> str:
    """An announced endpoint made connectable: a wildcard bind address becomes loopback."""
    return endpoint.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://[::1]:")


def bind_announced(socket: zmq.Socket, host: str, endpoint_path: str, port: int | None = None) -> str:
    """Bind `port` if given, else the previous endpoint or a new port; announce it."""
    if port is not None:
        socket.bind(f"tcp://{host}:{port}")
    else:
        _bind_previous_or_new(socket, host, read_endpoint(endpoint_path))
    endpoint = socket.getsockopt_string(zmq.LAST_ENDPOINT)
    temporary = f"{endpoint_path}.tmp.{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(endpoint)
    os.replace(temporary, endpoint_path)
    return endpoint


def _bind_previous_or_new(socket: zmq.Socket, host: str, previous: str | None) -> None:
    for _attempt in range(REBIND_ATTEMPTS if previous else 0):
        try:
            socket.bind(previous)
            return
        except zmq.ZMQError:
            time.sleep(REBIND_RETRY_S)  # start-up only, before the actor's loop runs
    socket.bind(f"tcp://{host}:*")
