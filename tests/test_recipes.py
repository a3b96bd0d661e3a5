"""Recipes on real nodes: mutex, leader election, service discovery, quorumctl lock/elect.

Every wait is bounded; where a test waits for the store to reach a state it
polls a read with a deadline (never a bare sleep that hopes for the best).
Leases here are short (2 s) so expiry shows within the test's budget.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("protocol.watch", reason="the recipes need the watch client")
pytest.importorskip("protocol.lease", reason="the recipes need the lease keep-alive")

from protocol.client import Compare, ops  # noqa: E402
from protocol.recipes import (  # noqa: E402
    Election, ElectionNoLeaderError, ElectionNotLeaderError, LockedError, Mutex, ServiceRegistry,
    Session, SessionExpiredError, WaitTimeoutError, observe_election,
)
from tests.conftest import REPO  # noqa: E402

SHORT_TTL_S = 2
LONG_TTL_S = 30
# A lease may live up to its TTL after its last renewal, plus the leader's expiry check.
EXPIRY_SLACK_S = 4.0
WAIT_S = 20.0


def wait_for(predicate, timeout_s: float, what: str):
    """Poll predicate() until it returns something truthy; fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


def queued(client, prefix: str) -> int:
    return client.get(prefix + "/", prefix=True, count_only=True)["count"]


class Background:
    """Run fn in a thread; `join()` returns its result or raises its exception."""

    def __init__(self, fn, *args):
        self.result = None
        self.error: BaseException | None = None
        self.finished_at = 0.0
        self._thread = threading.Thread(target=self._run, args=(fn, *args), daemon=True)
        self._thread.start()

    def _run(self, fn, *args):
        try:
            self.result = fn(*args)
        except BaseException as error:
            self.error = error
        self.finished_at = time.monotonic()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout_s: float = WAIT_S):
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"still running after {timeout_s}s"
        if self.error is not None:
            raise self.error
        return self.result


# ---------------------------------------------------------------------------
# Mutex.


def test_mutex_contention_one_holder_at_a_time_in_fifo_order(node):
    """Goal: under contention at most one holder at a time, as the store's revisions
    show, and the lock is granted in the order of the lock keys' create revisions.
    Method: 5 threads, each with its own client and session, take and release the
    lock 4 times. Inside, each writes a marker key (revision R_in), reads it back,
    then rewrites it only if nobody else wrote it since (txn on mod_revision ==
    R_in; revision R_out). Two holders at once would make a txn fail or two
    [R_in, R_out] intervals overlap."""
    workers, rounds, marker = 5, 4, "locks-marker"
    records, lock = [], threading.Lock()

    def contender(worker: int):
        with node.client() as client, Session(client, ttl=LONG_TTL_S) as session:
            mutex = Mutex(session, "locks/contended")
            for round_number in range(rounds):
                mutex.lock(timeout=WAIT_S)
                me = f"{worker}/{round_number}".encode()
                inside = client.put(marker, me)["header"]["revision"]
                assert client.get(marker)["kvs"][0]["value"] == me
                leaving = client.txn([Compare.mod(marker) == inside], [ops.put(marker, b"free")])
                with lock:
                    records.append((inside, leaving["header"]["revision"], leaving["succeeded"], mutex.revision,
                                    mutex.header["revision"] > mutex.revision))
                mutex.unlock()

    threads = [Background(contender, worker) for worker in range(workers)]
    for thread in threads:
        thread.join(60)
    assert len(records) == workers * rounds
    assert all(record[2] for record in records), "another holder wrote inside a critical section"
    waited = sum(record[4] for record in records)
    assert waited >= len(records) // 2, f"only {waited} of {len(records)} acquisitions had to wait: no contention"
    records.sort()
    for before, after in zip(records, records[1:]):
        assert after[0] > before[1], f"critical sections overlap: {before} and {after}"
        assert after[3] > before[3], f"not FIFO: lock key created at {after[3]} granted after {before[3]}"
    with node.client() as client:
        assert queued(client, "locks/contended") == 0


def test_try_lock_and_reentrant_session(node):
    """Goal: try_lock fails fast without leaving a key; a session re-locking reuses its key."""
    with node.client() as client_a, node.client() as client_b, \
            Session(client_a, ttl=LONG_TTL_S) as session_a, Session(client_b, ttl=LONG_TTL_S) as session_b:
        mutex_a = Mutex(session_a, "locks/try")
        mutex_a.try_lock()
        with pytest.raises(LockedError):
            Mutex(session_b, "locks/try").try_lock()
        assert queued(client_a, "locks/try") == 1
        again = Mutex(session_a, "locks/try")
        again.lock(timeout=5)  # same session: same key, held already
        assert again.key == mutex_a.key and again.revision == mutex_a.revision
        kv = client_a.get(mutex_a.key)["kvs"][0]
        assert kv["lease"] == session_a.lease_id and kv["key"] == b"locks/try/%x" % session_a.lease_id
        # A fenced write succeeds only while holding.
        assert client_a.txn([mutex_a.is_owner()], [ops.put("fenced", "1")])["succeeded"]
        mutex_a.unlock()
        assert not client_a.txn([mutex_a.is_owner()], [ops.put("fenced", "2")])["succeeded"]
        Mutex(session_b, "locks/try").try_lock()
        # A lock() that times out leaves no key behind.
        blocked = Mutex(session_a, "locks/try")
        with pytest.raises(WaitTimeoutError):
            blocked.lock(timeout=0.3)
        assert blocked.key == b"" and queued(client_a, "locks/try") == 1


def test_holder_whose_lease_expires_loses_the_lock_to_the_next(node):
    """Goal: a holder whose keep-alive stops loses the lock when its lease expires (not
    before, not never), the next contender then acquires, and the dead holder's
    lock() never reports success afterwards.
    Method: A (TTL 2 s) holds, B waits; A's keep-alive stops without A's session
    knowing; B must acquire within A's TTL + slack, at a revision where A's key
    is gone and A's lease is expired; then A's lock() must raise
    SessionExpiredError (the server refuses A's dead lease)."""
    with node.client() as client_a, node.client() as client_b, node.client() as reader:
        session_a = Session(client_a, ttl=SHORT_TTL_S)
        mutex_a = Mutex(session_a, "locks/expiry")
        mutex_a.lock(timeout=5)
        key_a = mutex_a.key
        with Session(client_b, ttl=LONG_TTL_S) as session_b:
            mutex_b = Mutex(session_b, "locks/expiry")
            waiter = Background(mutex_b.lock, WAIT_S)
            wait_for(lambda: queued(reader, "locks/expiry") == 2, 5, "B to queue")
            stopped_at = time.monotonic()
            # The keep-alive dies silently (a paused or cut-off process): A's
            # session is not told, only the server knows.
            session_a.keep_alive.stop()
            waiter.join(session_a.ttl + EXPIRY_SLACK_S + 5)
            waited = waiter.finished_at - stopped_at
            assert waited <= session_a.ttl + EXPIRY_SLACK_S, f"B acquired {waited:.1f}s after A's keep-alive stopped"
            acquired_at = mutex_b.header["revision"]
            assert reader.get(key_a, revision=acquired_at)["kvs"] == [], "B acquired while A's key existed"
            assert reader.lease_time_to_live(session_a.lease_id)["TTL"] == -1
            with pytest.raises(SessionExpiredError):
                mutex_a.lock(timeout=5)
            with pytest.raises(SessionExpiredError):
                Mutex(session_a, "locks/expiry").lock(timeout=5)
            assert reader.get("locks/expiry/", prefix=True)["kvs"][0]["key"] == mutex_b.key
            mutex_b.unlock()


def test_waiter_whose_lease_is_gone_never_acquires(node):
    """Goal: a contender whose lease disappears on the server while it waits (its
    client not told) never reports the lock as taken, and the one behind it is
    not blocked by it.
    Method: H holds, W and T queue behind it; W's lease is revoked by another
    client; H unlocks. W's lock() must raise SessionExpiredError; T acquires
    after H's unlock. Then a session whose lease is gone cannot lock at all."""
    with node.client() as client_h, node.client() as client_w, node.client() as client_t, \
            node.client() as reader:
        with Session(client_h, ttl=LONG_TTL_S) as session_h, Session(client_w, ttl=LONG_TTL_S) as session_w, \
                Session(client_t, ttl=LONG_TTL_S) as session_t:
            holder = Mutex(session_h, "locks/gone")
            holder.lock(timeout=5)
            waiter = Mutex(session_w, "locks/gone")
            waiting = Background(waiter.lock, WAIT_S)
            wait_for(lambda: queued(reader, "locks/gone") == 2, 5, "W to queue")
            third = Mutex(session_t, "locks/gone")
            third_waiting = Background(third.lock, WAIT_S)
            wait_for(lambda: queued(reader, "locks/gone") == 3, 5, "T to queue")
            reader.lease_revoke(session_w.lease_id)
            wait_for(lambda: queued(reader, "locks/gone") == 2, 5, "W's key to go with its lease")
            assert waiting.alive() and third_waiting.alive()
            released_at = client_h.delete(holder.key)["header"]["revision"]
            third_waiting.join()
            assert third.header["revision"] >= released_at
            with pytest.raises(SessionExpiredError):
                waiting.join()
            assert waiter.key == b""
            with pytest.raises(SessionExpiredError):
                Mutex(session_w, "locks/gone").lock(timeout=5)
            assert [kv["key"] for kv in reader.get("locks/gone/", prefix=True)["kvs"]] == [third.key]


# ---------------------------------------------------------------------------
# Election.


def test_election_campaign_proclaim_resign_observe_failover(node):
    """Goal: one leader at a time with three candidates; proclaim, resign, leader and
    observe behave as etcd's; when the leader's session dies the next candidate
    takes over within the lease TTL.
    Method: candidate 1 campaigns and proclaims; 2 and 3 campaign in threads; an
    observer follows. 1 resigns -> 2 leads; 2's keep-alive stops -> 3 leads
    after expiry; 3 resigns -> no leader; 1 campaigns again."""
    prefix = "elections/e"
    with node.client() as client_1, node.client() as client_2, node.client() as client_3, \
            node.client() as client_0:
        session_1 = Session(client_1, ttl=LONG_TTL_S)
        session_2 = Session(client_2, ttl=SHORT_TTL_S)
        session_3 = Session(client_3, ttl=LONG_TTL_S)
        session_0 = Session(client_0, ttl=LONG_TTL_S)
        try:
            bystander = Election(session_0, prefix)
            with pytest.raises(ElectionNoLeaderError):
                bystander.leader()
            observer = observe_election(client_0, prefix)
            one = Election(session_1, prefix)
            one.campaign("one", timeout=5)
            assert one.is_leader
            assert observer.next(5)["kvs"][0]["value"] == b"one"
            one.proclaim("one-b")
            assert observer.next(5)["kvs"][0]["value"] == b"one-b"
            assert bystander.leader()["value"] == b"one-b"
            with pytest.raises(ElectionNotLeaderError):
                bystander.proclaim("usurper")

            two, three = Election(session_2, prefix), Election(session_3, prefix)
            campaign_2 = Background(two.campaign, "two", WAIT_S)
            wait_for(lambda: queued(client_0, prefix) == 2, 5, "2 to queue")
            campaign_3 = Background(three.campaign, "three", WAIT_S)
            wait_for(lambda: queued(client_0, prefix) == 3, 5, "3 to queue")
            assert campaign_2.alive() and campaign_3.alive()
            assert bystander.leader()["value"] == b"one-b"

            one.resign()
            campaign_2.join()
            assert observer.next(5)["kvs"][0]["value"] == b"two"
            assert bystander.leader()["key"] == two.key
            two.proclaim("two-b")
            assert observer.next(5)["kvs"][0]["value"] == b"two-b"
            assert campaign_3.alive()

            stopped_at = time.monotonic()
            session_2.orphan()
            campaign_3.join(session_2.ttl + EXPIRY_SLACK_S + 5)
            assert campaign_3.finished_at - stopped_at <= session_2.ttl + EXPIRY_SLACK_S
            assert observer.next(5)["kvs"][0]["value"] == b"three"
            assert bystander.leader()["value"] == b"three"
            with pytest.raises(ElectionNotLeaderError):
                two.proclaim("too late")

            three.resign()
            with pytest.raises(ElectionNoLeaderError):
                bystander.leader()
            with pytest.raises(WaitTimeoutError):
                observer.next(0.3)
            one.campaign("one-again", timeout=5)
            assert observer.next(5)["kvs"][0]["value"] == b"one-again"
            observer.close()
        finally:
            for session in (session_1, session_2, session_3, session_0):
                session.close()


def test_campaign_again_on_the_same_session_keeps_its_place_and_takes_the_new_value(node):
    """Goal: as etcd, a session campaigning again reuses its key (same create
    revision, so the same place in line) and proclaims the new value."""
    with node.client() as client, Session(client, ttl=LONG_TTL_S) as session:
        first = Election(session, "elections/again")
        first.campaign("a", timeout=5)
        second = Election(session, "elections/again")
        second.campaign("b", timeout=5)
        assert (second.key, second.revision) == (first.key, first.revision)
        assert first.leader()["value"] == b"b"
        second.resign()
        with pytest.raises(ElectionNoLeaderError):
            first.leader()


# ---------------------------------------------------------------------------
# Service discovery.


def test_service_discovery_live_view(node):
    """Goal: a live view lists the registered instances, drops one whose keep-alive
    stops within its TTL (+ slack) while the kept-alive ones stay past their TTL,
    and shows new ones. Method: three instances with 2 s leases; stop one's
    keep-alive; register a fourth; deregister a second."""
    prefix = "services/web"
    with node.client() as client:
        registry = ServiceRegistry(client)
        registrations = [registry.register(prefix, f"i{n}", f"10.0.0.{n}:80", ttl=SHORT_TTL_S) for n in (1, 2, 3)]
        try:
            with registry.live_view(prefix) as view:
                assert view.wait_until(lambda seen: len(seen) == 3, 5)
                assert registry.instances(prefix) == {"i1": b"10.0.0.1:80", "i2": b"10.0.0.2:80",
                                                      "i3": b"10.0.0.3:80"}
                stopped_at = time.monotonic()
                registrations[0].session.orphan()
                assert view.wait_until(lambda seen: "i1" not in seen, SHORT_TTL_S + EXPIRY_SLACK_S), \
                    "an instance whose keep-alive stopped is still listed"
                gone_after = time.monotonic() - stopped_at
                assert gone_after <= SHORT_TTL_S + EXPIRY_SLACK_S
                # The others were kept alive past their TTL.
                assert set(view.instances()) == {"i2", "i3"}
                registrations.append(registry.register(prefix, "i4", "10.0.0.4:80", ttl=SHORT_TTL_S))
                assert view.wait_until(lambda seen: seen.get("i4") == b"10.0.0.4:80", 5)
                registrations[1].close()
                assert view.wait_until(lambda seen: set(seen) == {"i3", "i4"}, 5)
                assert registry.instances(prefix) == view.instances()
        finally:
            for registration in registrations:
                registration.close()


# ---------------------------------------------------------------------------
# quorumctl lock / elect.


class Output:
    """Lines a child process prints, read with a deadline."""

    def __init__(self, stream):
        self.fd = stream.fileno()
        self.buffer = b""

    def line(self, timeout_s: float = WAIT_S) -> str:
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no line within {timeout_s}s (have {self.buffer!r})"
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                chunk = os.read(self.fd, 4096)
                assert chunk, f"stream closed (have {self.buffer!r})"
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()


@pytest.fixture
def ctl_process(node):
    """Start quorumctl in the background: (process, its stdout lines). Killed at teardown."""
    processes = []

    def start(*args: str) -> tuple[subprocess.Popen, Output]:
        process = subprocess.Popen([sys.executable, "-m", "tools.quorumctl", "--endpoints", node.zmq_endpoint, *args],
                                   cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        processes.append(process)
        return process, Output(process.stdout)

    try:
        yield start
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.communicate()


def finish(process: subprocess.Popen, timeout_s: float = WAIT_S) -> tuple[int, str]:
    try:
        _, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return process.returncode, stderr.decode()


CHILD = """
import os, sys
from protocol.client import Client
with Client([sys.argv[1]]) as client:
    held = client.get(os.environ["ETCD_LOCK_KEY"])["kvs"]
print(os.environ["ETCD_LOCK_KEY"]); print(os.environ["ETCD_LOCK_REV"]); print(len(held))
"""


def test_quorumctl_lock_runs_a_command_holding_the_lock(node):
    """Goal: `lock NAME -- command` runs the command while the lock is held, with
    etcdctl's ETCD_LOCK_KEY / ETCD_LOCK_REV, releases after, and reports a failed
    command as etcdctl does ("Error: exit status 3", exit 1)."""
    done = node.ctl("lock", "--ttl", "5", "cli-lock", "--", sys.executable, "-c", CHILD, node.zmq_endpoint)
    assert done.returncode == 0, done.stderr
    key, revision, held = done.stdout.splitlines()
    assert re.fullmatch(r"cli-lock/[0-9a-f]+", key)
    assert int(revision) > 0 and held == "1"
    with node.client() as client:
        assert queued(client, "cli-lock") == 0
    failed = node.ctl("lock", "cli-lock", "--", sys.executable, "-c", "raise SystemExit(3)")
    assert (failed.returncode, failed.stderr) == (1, "Error: exit status 3\n")
    missing = node.ctl("lock", "cli-lock", "no-such-command-here")
    assert missing.returncode == 1
    assert missing.stderr == 'Error: exec: "no-such-command-here": executable file not found in $PATH\n'
    usage = node.ctl("lock")
    assert (usage.returncode, usage.stderr) == (
        128, "Error: lock takes a lock name argument and an optional command to execute\n")
    with node.client() as client:
        assert queued(client, "cli-lock") == 0


def test_quorumctl_lock_holds_until_signal_and_a_killed_holder_expires(node, ctl_process):
    """Goal: `lock NAME` prints the key as etcdctl ("KEY\\n\\n"), holds until SIGTERM
    (exit 0, released), and a holder killed with SIGKILL loses the lock when its
    lease (--ttl) expires. Method: in-process waiters behind the CLI holders."""
    # The waiter's thread owns `client`; this thread reads through `reader`.
    with node.client() as client, node.client() as reader, Session(client, ttl=LONG_TTL_S) as session:
        holder, output = ctl_process("lock", "cli-hold", "--ttl", "2")
        key = output.line()
        assert re.fullmatch(r"cli-hold/[0-9a-f]+", key) and output.line() == ""
        mutex = Mutex(session, "cli-hold")
        waiting = Background(mutex.lock, WAIT_S)
        wait_for(lambda: queued(reader, "cli-hold") == 2, 5, "the waiter to queue")
        holder.send_signal(signal.SIGTERM)
        assert finish(holder) == (0, "")
        waiting.join(5)
        mutex.unlock()

        holder, output = ctl_process("lock", "--ttl", str(SHORT_TTL_S), "cli-hold")
        key = output.line()
        assert output.line() == ""
        waiting = Background(mutex.lock, WAIT_S)
        wait_for(lambda: queued(reader, "cli-hold") == 2, 5, "the waiter to queue")
        killed_at = time.monotonic()
        holder.kill()
        holder.wait(5)
        waiting.join(SHORT_TTL_S + EXPIRY_SLACK_S + 5)
        assert waiting.finished_at - killed_at <= SHORT_TTL_S + EXPIRY_SLACK_S
        assert reader.get(key)["kvs"] == []

        # Interrupted while still waiting: etcdctl's "context canceled", no key left.
        waiter, _ = ctl_process("lock", "cli-hold")
        wait_for(lambda: queued(reader, "cli-hold") == 2, 5, "the CLI waiter to queue")
        waiter.send_signal(signal.SIGINT)
        assert finish(waiter) == (1, "Error: context canceled\n")
        assert queued(reader, "cli-hold") == 1
        mutex.unlock()

        # The holder's lease vanishes: it says so and exits 1.
        holder, output = ctl_process("lock", "--ttl", "3", "cli-hold")
        key = output.line()
        client.lease_revoke(int(key.rsplit("/", 1)[1], 16))
        assert finish(holder, 10) == (1, "Error: session expired\n")


def test_quorumctl_elect_and_listen(node, ctl_process):
    """Goal: `elect NAME PROPOSAL` prints the leader key and value once elected (as
    etcdctl), `elect -l NAME` prints each new leader, and a signalled leader
    resigns (exit 0) so the next candidate leads. Also etcdctl's argument errors."""
    listener, heard = ctl_process("elect", "-l", "cli-elect")
    first, first_output = ctl_process("elect", "cli-elect", "p1")
    first_key = first_output.line()
    assert re.fullmatch(r"cli-elect/[0-9a-f]+", first_key) and first_output.line() == "p1"
    assert (heard.line(), heard.line()) == (first_key, "p1")
    second, second_output = ctl_process("elect", "cli-elect", "p2")
    with node.client() as client:
        wait_for(lambda: queued(client, "cli-elect") == 2, 5, "the second candidate to queue")
    first.send_signal(signal.SIGINT)
    assert finish(first) == (0, "")
    second_key = second_output.line()
    assert second_key != first_key and second_output.line() == "p2"
    assert (heard.line(), heard.line()) == (second_key, "p2")
    second.send_signal(signal.SIGTERM)
    assert finish(second) == (0, "")
    listener.send_signal(signal.SIGINT)
    assert finish(listener) == (0, "")
    with node.client() as client:
        assert queued(client, "cli-elect") == 0
    for args, message in ((("elect", "x"), "no proposal argument but -l not set"),
                          (("elect", "-l", "x", "y"), "proposal given but -l is set"),
                          (("elect",), "elect takes one election name argument and an optional proposal argument")):
        result = node.ctl(*args)
        assert (result.returncode, result.stderr) == (128, f"Error: {message}\n")
