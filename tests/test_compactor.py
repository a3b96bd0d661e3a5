"""Goal: auto-compaction picks etcd's revisions at etcd's times. Method: drive
the pure AutoCompactor with a hand-made clock."""

import pytest

from actors.compactor import HOUR_MS, AutoCompactor, parse_retention_ms


def test_retention_parsing():
    assert parse_retention_ms("1") == HOUR_MS
    assert parse_retention_ms("30m") == 30 * 60_000
    assert parse_retention_ms("1h30m") == 90 * 60_000
    assert parse_retention_ms("2s") == 2000
    for bad in ("", "abc", "5x", "-1"):
        with pytest.raises(ValueError):
            parse_retention_ms(bad)


def test_disabled_by_zero():
    compactor = AutoCompactor("periodic", "0")
    assert not compactor.enabled
    assert compactor.observe(0, 100) is None


def test_periodic_keeps_the_retention_window():
    compactor = AutoCompactor("periodic", "10s")
    revision_at = {}
    decisions = []
    for second in range(0, 41):
        now_ms = second * 1000
        revision = 1 + second * 5  # five writes a second
        revision_at[now_ms] = revision
        target = compactor.observe(now_ms, revision)
        if target is not None:
            decisions.append((now_ms, target))
    assert decisions, "a 10s retention over 40s must compact"
    for now_ms, target in decisions:
        # Never compacts anything younger than the retention...
        assert target <= revision_at[now_ms - 10_000]
        # ...and keeps at most about one sample interval more than it.
        assert target >= revision_at.get(now_ms - 11_000, 1)
    times = [now_ms for now_ms, _ in decisions]
    assert all(b - a == 10_000 for a, b in zip(times, times[1:]))


def test_revision_mode_every_five_minutes():
    compactor = AutoCompactor("revision", "100")
    assert compactor.observe(0, 50) is None
    assert compactor.observe(299_000, 1000) is None
    assert compactor.observe(300_000, 1000) == 900
    assert compactor.observe(301_000, 1200) is None
    assert compactor.observe(600_000, 1050) == 950
    assert compactor.observe(900_000, 1050) is None  # nothing new to compact


def test_bad_modes_and_retentions():
    with pytest.raises(ValueError):
        AutoCompactor("weekly", "1")
    with pytest.raises(ValueError):
        AutoCompactor("revision", "1h")
