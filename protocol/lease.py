"""Lease helpers for the Python client: grant, one keep-alive, and a
background keep-alive that reports loss of the lease.

How this works: `KeepAlive` runs a thread with its own `Client` (a Client is
not thread-safe) connected to the same gateways as the caller's. It renews
at once, then a third of the TTL after each answer (as etcd's clientv3).
The lease is *lost* when a renewal says the lease is not found (TTL 0: it
expired or was revoked), or when no renewal got through before the lease
could have expired: the last successful renewal was sent at T with TTL t,
so the server may expire it from T + t on. Before the first answer the
helper waits, like clientv3, the dial timeout plus one second. On loss the
`lost` event is set, `error` holds a `LeaseLostError`, `on_lost` (if given)
is called once from the helper's thread, and renewals stop. The helper never
revokes the lease; `stop()` just stops renewing.

Usage:

    lease_id = grant(client, 10)
    with KeepAlive(client, lease_id, on_lost=lambda error: print(error)) as keep_alive:
        ...                                  # keep_alive.check() raises once lost
"""

from __future__ import annotations

import threading
import time
from typing import Callable

from protocol.client import Client, LeaseNotFoundError
from protocol.errors import QuorumError

# Between failed renewals: retry this often until the lease could have expired.
RETRY_INTERVAL_S = 0.25
MIN_INTERVAL_S = 0.05


class LeaseLostError(Exception):
    """The lease is gone (not found) or may have expired (unreachable)."""

    def __init__(self, lease_id: int, reason: str, cause: BaseException | None = None):
        self.lease_id = lease_id
        self.reason = reason  # "not found" or "unreachable"
        self.cause = cause
        detail = f": {cause}" if cause is not None else ""
        super().__init__(f"lease {lease_id:016x} lost ({reason}){detail}")


def grant(client: Client, ttl_s: int, lease_id: int = 0) -> int:
    """Grant a lease (the server picks the id when lease_id is 0); its id.
    The server raises a TTL below its minimum to the minimum."""
    return client.lease_grant(ttl_s, lease_id)["ID"]


def keep_alive_once(client: Client, lease_id: int) -> int:
    """Renew once; the granted TTL. Raises LeaseNotFoundError when the lease
    has expired or was revoked (the server's TTL 0), as clientv3's KeepAliveOnce."""
    response = client.lease_keep_alive_once(lease_id)
    if response.get("TTL", 0) <= 0:
        raise LeaseNotFoundError("LeaseNotFound")
    return response["TTL"]


class KeepAlive:
    """Keeps a lease alive from a background thread; see the module doc."""

    def __init__(self, client: Client, lease_id: int, interval_s: float | None = None, *,
                 on_lost: Callable[[LeaseLostError], None] | None = None,
                 on_renewed: Callable[[dict], None] | None = None, start: bool = True):
        assert interval_s is None or interval_s > 0
        self.lease_id = lease_id
        self.interval_s = interval_s
        self.on_lost = on_lost
        self.on_renewed = on_renewed
        self.endpoints = client.gateways
        self.timeout_s = client.timeout_s
        self.first_answer_timeout_s = client.connect_timeout_s + 1.0
        self.lost = threading.Event()
        self.error: LeaseLostError | None = None
        self.ttl_s: int | None = None
        self.renewals = 0
        self._last_failure: QuorumError | None = None
        # Monotonic time from which the server may expire the lease.
        self.expires_by: float | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"keep-alive-{lease_id:016x}", daemon=True)
        if start:
            self.start()

    def start(self) -> "KeepAlive":
        self._thread.start()
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop renewing (the lease then expires after its TTL) and wait for the thread."""
        self._stopping.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    close = stop

    def __enter__(self) -> "KeepAlive":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def alive(self) -> bool:
        return not self.lost.is_set()

    def check(self) -> None:
        """Raise LeaseLostError once the lease is lost."""
        if self.error is not None:
            raise self.error

    def wait_lost(self, timeout_s: float | None = None) -> bool:
        """Wait until the lease is lost (True) or timeout_s passes (False)."""
        return self.lost.wait(timeout_s)

    # ---- the thread -------------------------------------------------------

    def _run(self) -> None:
        client = Client(self.endpoints, timeout_s=self.timeout_s, discover_gateways=False, read_retries=0)
        try:
            self._renew_until_lost(client, time.monotonic() + self.first_answer_timeout_s)
        finally:
            client.close()

    def _renew_until_lost(self, client: Client, give_up_at: float) -> None:
        next_at = time.monotonic()
        while not self._stopping.wait(max(0.0, next_at - time.monotonic())):  # until stopped or lost
            sent_at = time.monotonic()
            if sent_at >= give_up_at:
                self._lose("unreachable", self._last_failure)
                return
            # Never wait for an answer past the time the lease could expire.
            client.timeout_s = client.connect_timeout_s = max(MIN_INTERVAL_S, min(self.timeout_s, give_up_at - sent_at))
            try:
                response = client.lease_keep_alive_once(self.lease_id)
            except QuorumError as error:
                self._last_failure = error
                next_at = min(give_up_at, time.monotonic() + RETRY_INTERVAL_S)
                continue
            ttl_s = response.get("TTL", 0)
            if ttl_s <= 0:
                self._lose("not found", None)
                return
            self.ttl_s = ttl_s
            self.renewals += 1
            self.expires_by = give_up_at = sent_at + ttl_s
            if self.on_renewed is not None:
                self.on_renewed(response)
            interval_s = self.interval_s if self.interval_s is not None else ttl_s / 3.0
            next_at = time.monotonic() + max(MIN_INTERVAL_S, interval_s)

    def _lose(self, reason: str, cause: BaseException | None) -> None:
        self.error = LeaseLostError(self.lease_id, reason, cause)
        self.lost.set()
        if self.on_lost is not None:
            self.on_lost(self.error)
