"""Goal: a real cluster stays linearizable and loses no acknowledged write while
members are killed, paused and cut off, and while members are added, promoted
and removed (the leader too) and leadership is moved; the harness that says
so would see it if it were not; the local-cluster tool starts and stops a
cluster.

Method: tests/cluster_harness.py starts real members on loopback with the
cluster flags, runs client threads that record every call, and a seeded
nemesis (kill -9 + restart, SIGSTOP/SIGCONT, isolation and partitions through
the peer fault hook, the leader often; membership changes in one test, the
clients following the voters); then heals, reads every key through every
member, and checks the history with tools/linearizability.py, every
acknowledged write on every member at its revision, HashKV on every member,
and that removed members stopped by themselves. A stale read is provoked on
purpose (serializable read from a cut-off member) to show the recorded
history and the checker catch it. The seed is QUORUMKV_NEMESIS_SEED (default
1, plus 1000 / 2000 for the second and third runs, as their reports print);
the long run is `python -m tools.nemesis`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from protocol.client import Client
from tests.cluster_harness import Cluster, Nemesis, NemesisConfig, WorkloadConfig, run_fault_test
from tests.conftest import REPO
from tools import linearizability as lin

SEED = int(os.environ.get("QUORUMKV_NEMESIS_SEED", "1"))


def test_three_members_under_the_nemesis(tmp_path):
    report = run_fault_test(str(tmp_path / "run"), size=3, duration_s=20, seed=SEED,
                            workload=WorkloadConfig(clients=8, keys=3))
    print("\n" + report.summary())
    assert report.ok, report.summary()
    assert report.verdict == lin.LINEARIZABLE
    assert len(report.nemesis_events) >= 6, report.nemesis_events
    assert report.acked_writes >= 100
    assert report.watched_events >= report.acked_writes


def test_five_members_under_the_nemesis(tmp_path):
    # Two members at a time may be down, paused or cut off.
    report = run_fault_test(str(tmp_path / "run"), size=5, duration_s=12, seed=SEED + 1000,
                            workload=WorkloadConfig(clients=8, keys=2),
                            nemesis=NemesisConfig(fault_s=(0.5, 2.0), calm_s=(0.3, 1.0)))
    print("\n" + report.summary())
    assert report.ok, report.summary()
    assert report.acked_writes >= 50


def test_three_members_under_the_nemesis_with_membership_changes(tmp_path):
    """Faults and, about every other step, a membership change (MEMBER_PLAN: a
    learner added then promoted, move-leader, a voter removed, the leader half
    the time, a voter added at once), between 3 and 5 voters; clients follow
    the voters. Removed members stop by themselves; the final checks run on
    the members at the end. The run lasts until the first four changes of
    the plan (one of each kind) are done."""
    report = run_fault_test(str(tmp_path / "run"), size=3, duration_s=40, seed=SEED + 2000,
                            workload=WorkloadConfig(clients=6, keys=3),
                            nemesis=NemesisConfig(kinds=Nemesis.KINDS, member_share=0.5, min_member_steps=4,
                                                  fault_s=(0.5, 2.0), calm_s=(0.3, 1.0)))
    print("\n" + report.summary())
    assert report.ok, report.summary()
    events = "\n".join(report.nemesis_events)
    for change in ("member add", "member promote", "move-leader", "member remove", "stopped by itself"):
        assert change in events, f"no {change!r} in the nemesis log:\n{events}"
    assert report.removed and all(status == 0 for status in report.removed.values()), report.removed
    assert 3 <= len(report.members) <= 5 and not any("learner" in name for name in report.members)
    assert report.acked_writes >= 50
    assert report.watched_events >= report.acked_writes


def test_a_stale_read_from_real_processes_is_caught(tmp_path):
    """The whole pipeline (recording real calls, the checker) sees a real anomaly:
    serializable reads are member-local, so a member cut off from the others
    serves the value it had, after a newer write was acknowledged."""
    with Cluster(str(tmp_path), 3) as cluster:
        cluster.start()
        leader = cluster.wait_for_leader()
        victim = next(name for name in cluster.names if name != leader)
        history = []

        def call(name, kind, key, **fields):
            with Client([cluster.endpoints[name]], timeout_s=5.0, discover_gateways=False) as client:
                start_ns = time.monotonic_ns()
                if kind == lin.PUT:
                    response = client.put(key, fields["value"])
                else:
                    response = client.get(key, serializable=True)
                    kvs = response["kvs"]
                    fields = {"result": kvs[0]["value"] if kvs else None,
                              "mod_revision": kvs[0]["mod_revision"] if kvs else None}
                history.append(lin.Op(client=name, op=kind, key=key, start_ns=start_ns, end_ns=time.monotonic_ns(),
                                      outcome=lin.OK, revision=response["header"]["revision"], **fields))

        call(leader, lin.PUT, b"k", value=b"old")
        cluster.wait_for_revision(cluster.revision(leader))
        cluster.isolate(victim)
        others = [name for name in cluster.names if name != victim]
        cluster.wait_for_leader(among=others)
        # Cut off for real (the hook is re-read every 100 ms): the victim lost its leader.
        deadline = time.monotonic() + 10
        while (cluster.status(victim) or {}).get("leader") != 0:
            assert time.monotonic() < deadline, "the isolated member still follows a leader"
            time.sleep(0.05)  # polling a real process's state
        call(others[0], lin.PUT, b"k", value=b"new")
        call(victim, lin.GET, b"k")
    assert history[-1].result == b"old", "the isolated member did not serve its stale value"
    result = lin.check(history)
    assert result.verdict == lin.NOT_LINEARIZABLE, result.summary()
    assert lin.check(history[:-1]).ok


def test_partition_writes_each_members_fault_file(tmp_path):
    cluster = Cluster(str(tmp_path), 5)
    cluster.partition(["n1", "n2"], ["n3", "n4"])  # n5 in no group: alone

    def cut_off(name):  # the file names members by id
        path = os.path.join(cluster.members[name].data_dir, "peer-faults")
        ids = open(path, encoding="utf-8").read().split() if os.path.exists(path) else []
        return sorted(cluster.names_by_id[int(member_id, 16)] for member_id in ids)

    assert cut_off("n1") == ["n3", "n4", "n5"]
    assert cut_off("n4") == ["n1", "n2", "n5"]
    assert cut_off("n5") == ["n1", "n2", "n3", "n4"]
    cluster.isolate("n2")
    assert cut_off("n2") == ["n1", "n3", "n4", "n5"] and cut_off("n1") == ["n2"]
    cluster.heal()
    assert all(cut_off(name) == [] for name in cluster.names)


def _start_tool(directory: str) -> tuple[subprocess.Popen, list[str], threading.Event]:
    process = subprocess.Popen([sys.executable, "-m", "tools.cluster", "start", "--dir", directory,
                                "--heartbeat-interval", "50", "--election-timeout", "500"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in process.stdout:
            lines.append(line)
            if line.strip() == "ready":
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    return process, lines, ready


def _stop_tool(process: subprocess.Popen, signum: int) -> int:
    process.send_signal(signum)
    return process.wait(timeout=60)


def test_cluster_tool_starts_serves_and_stops(tmp_path):
    """`python -m tools.cluster start`: ready, serves through every member, Ctrl-C
    stops every member, and starting it again on the directory brings back the
    same cluster with its data."""
    directory = str(tmp_path / "local")
    process, lines, ready = _start_tool(directory)
    try:
        assert ready.wait(60), "".join(lines)
        output = "".join(lines)
        assert "quorumctl --endpoints" in output and "(leader)" in output
        with open(os.path.join(directory, "cluster.json"), encoding="utf-8") as handle:
            members = json.load(handle)["members"]
        endpoints = [f"127.0.0.1:{member['zmq_port']}" for member in members.values()]
        assert len(endpoints) == 3
        with Client([endpoints[0]], timeout_s=5.0) as client:
            client.put("greeting", "hello")
        for endpoint in endpoints:
            with Client([endpoint], timeout_s=5.0) as client:
                assert client.get("greeting")["kvs"][0]["value"] == b"hello"
        supervisor_pids = _supervisor_pids(directory)
        assert len(supervisor_pids) == 3
        assert _stop_tool(process, signal.SIGINT) == 0
        assert "n3: stopped" in "".join(lines)
        assert not [pid for pid in supervisor_pids if _running(pid)]
        for name in members:
            assert os.path.getsize(os.path.join(directory, f"{name}.log")) > 0

        process, lines, ready = _start_tool(directory)  # the same directory: the same cluster
        assert ready.wait(60), "".join(lines)
        with Client([endpoints[2]], timeout_s=5.0) as client:
            assert client.get("greeting")["kvs"][0]["value"] == b"hello"
        assert _stop_tool(process, signal.SIGTERM) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        for pid in _supervisor_pids(directory):  # never leave members behind
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _supervisor_pids(directory: str) -> list[int]:
    """Running quorumkv supervisors whose --data-dir is under `directory`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = [part.decode(errors="replace") for part in handle.read().split(b"\0") if part]
        except OSError:
            continue
        if "actors.server" in argv and "--role" not in argv and "--data-dir" in argv:
            if argv[argv.index("--data-dir") + 1].startswith(directory) and _running(int(entry)):
                pids.append(int(entry))
    return pids


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False
