"""quorumctl lock and elect: etcdctl 3.4's commands, on protocol.recipes.

    quorumctl lock NAME [--ttl 10]            prints the lock key, holds it until Ctrl-C / SIGTERM
    quorumctl lock NAME -- COMMAND ARGS...    runs COMMAND holding the lock (ETCD_LOCK_KEY, ETCD_LOCK_REV)
    quorumctl elect NAME PROPOSAL             campaigns, prints the leader key and value once elected, holds
    quorumctl elect -l NAME                   prints each leader as it changes

As etcdctl: a signal while holding releases (resigns) and exits 0; a signal
while still waiting fails with "context canceled"; a lost session fails with
"session expired" ("elect: session expired"). The session's lease is revoked
on the way out (etcdctl leaves it to expire; the keys are removed either way).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading

from protocol.recipes import DEFAULT_SESSION_TTL_S, Election, Mutex, RecipeError, Session, observe_election
from tools.ctl_args import EXIT_BAD_ARGS, EXIT_ERROR, CtlError


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM raises KeyboardInterrupt too (etcdctl treats both alike), while inside."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _positional(ctx) -> list[str]:
    return list(getattr(ctx.options, "args", []) or [])


def _go_exec_error(argv: list[str], error: OSError | None) -> str:
    """Go's exec error text for a command that could not start."""
    if error is None:
        return f'exec: "{argv[0]}": executable file not found in $PATH'
    reason = (error.strerror or str(error)).lower()
    return f"fork/exec {argv[0]}: {reason}"


def _go_exit_error(returncode: int) -> str:
    """Go's *exec.ExitError text: "exit status N" or "signal: killed"."""
    if returncode < 0:
        name = signal.strsignal(-returncode) or f"signal {-returncode}"
        return f"signal: {name.lower()}"
    return f"exit status {returncode}"


def _run_locked(ctx, mutex: Mutex, argv: list[str]) -> str | None:
    """Run argv with the lock held; the error text if it failed, None if it exited 0."""
    env = dict(os.environ)
    env["ETCD_LOCK_KEY"] = mutex.key.decode("utf-8", "surrogateescape")
    env["ETCD_LOCK_REV"] = str(mutex.header["revision"] if mutex.header else 0)
    path = argv[0] if "/" in argv[0] else shutil.which(argv[0])
    if path is None:
        return _go_exec_error(argv, None)
    ctx.stdout.flush()
    ctx.stderr.flush()
    try:
        child = subprocess.Popen([path, *argv[1:]], executable=path, env=env,
                                 stdout=_fd_or_pipe(ctx.stdout), stderr=_fd_or_pipe(ctx.stderr))
    except OSError as error:
        return _go_exec_error(argv, error)
    # As etcdctl: a signal now does not stop the command; the lock is released after it.
    while True:
        try:
            output, errors = child.communicate()
            break
        except KeyboardInterrupt:
            continue
    if output:
        ctx.stdout.write(output)
        ctx.stdout.flush()
    if errors:
        ctx.stderr.write(errors)
        ctx.stderr.flush()
    return None if child.returncode == 0 else _go_exit_error(child.returncode)


def _fd_or_pipe(stream):
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return subprocess.PIPE


def _wait_for_signal(session: Session) -> bool:
    """Hold until a signal (True) or until the session is lost (False)."""
    try:
        session.done.wait()
    except KeyboardInterrupt:
        return True
    return False


def cmd_lock(ctx) -> int:
    args = _positional(ctx)
    if not args:
        raise CtlError(EXIT_BAD_ARGS, "lock takes a lock name argument and an optional command to execute")
    name, command = args[0], args[1:]
    client = ctx.client()
    with _terminate_as_interrupt():
        # As etcd's concurrency.WithTTL: a TTL <= 0 keeps the default.
        session = Session(client, ttl=ctx.options.ttl if ctx.options.ttl > 0 else DEFAULT_SESSION_TTL_S)
        try:
            return _lock_and_hold(ctx, client, session, name, command)
        finally:
            _close_quietly(session)


def _lock_and_hold(ctx, client, session: Session, name: str, command: list[str]) -> int:
    mutex = Mutex(session, name)
    try:
        mutex.lock()
    except KeyboardInterrupt:
        raise CtlError(EXIT_ERROR, "context canceled") from None
    except RecipeError as error:
        raise CtlError(EXIT_ERROR, str(error)) from None
    if command:
        failure = _run_locked(ctx, mutex, command)
        mutex.unlock()
        if failure is not None:
            raise CtlError(EXIT_ERROR, failure)
        return 0
    try:
        response = client.get(mutex.key)
        if not response.get("kvs"):
            raise CtlError(EXIT_ERROR, "lock lost on init")
        ctx.emit("get", response)
    except KeyboardInterrupt:
        mutex.unlock()
        return 0
    if _wait_for_signal(session):
        mutex.unlock()
        return 0
    raise CtlError(EXIT_ERROR, "session expired")


def cmd_elect(ctx) -> int:
    args = _positional(ctx)
    if len(args) not in (1, 2):
        raise CtlError(EXIT_BAD_ARGS, "elect takes one election name argument and an optional proposal argument")
    if len(args) == 1 and not ctx.options.listen:
        raise CtlError(EXIT_BAD_ARGS, "no proposal argument but -l not set")
    if len(args) == 2 and ctx.options.listen:
        raise CtlError(EXIT_BAD_ARGS, "proposal given but -l is set")
    client = ctx.client()
    with _terminate_as_interrupt():
        if len(args) == 1:
            return _observe(ctx, client, args[0])
        session = Session(client)
        try:
            return _campaign(ctx, client, session, args[0], args[1])
        finally:
            _close_quietly(session)


def _observe(ctx, client, name: str) -> int:
    observer = observe_election(client, name)
    try:
        for response in observer:
            ctx.emit("get", response)
    except KeyboardInterrupt:
        return 0
    except RecipeError:
        raise CtlError(EXIT_ERROR, "elect: observer lost") from None
    finally:
        observer.close()
    raise CtlError(EXIT_ERROR, "elect: observer lost")


def _campaign(ctx, client, session: Session, name: str, proposal: str) -> int:
    election = Election(session, name)
    try:
        election.campaign(proposal.encode("utf-8", "surrogateescape"))
    except KeyboardInterrupt:
        raise CtlError(EXIT_ERROR, "context canceled") from None
    except RecipeError as error:
        raise CtlError(EXIT_ERROR, str(error)) from None
    try:
        ctx.emit("get", client.get(election.key))
    except KeyboardInterrupt:
        election.resign()
        return 0
    if _wait_for_signal(session):
        election.resign()
        return 0
    raise CtlError(EXIT_ERROR, "elect: session expired")


def _close_quietly(session: Session) -> None:
    try:
        session.close()
    except (Exception, KeyboardInterrupt):  # the lease expires by itself; nothing to report on the way out
        pass
