"""Auto-compaction (--auto-compaction-mode / --auto-compaction-retention), as etcd.

How this works: the leader's gateway 0 calls `observe(now_ms, revision)`
every CHECK_INTERVAL_MS; it returns a revision to compact to, or None.

- periodic: retention is a duration ("1" = 1 hour as etcd, or "30m",
  "1h30m", "10s"). Revisions are sampled as time passes; once per period
  (the retention itself when under an hour, else an hour, as etcd 3.4) it
  compacts to the newest sample that is at least the retention old.
- revision: retention is a count of revisions; every 5 minutes it compacts
  to current revision - retention.

Pure: time is passed in; no clock is read here.
"""

from __future__ import annotations

import collections
import re

CHECK_INTERVAL_MS = 1000
HOUR_MS = 3_600_000
REVISION_MODE_PERIOD_MS = 5 * 60_000
# Samples kept in periodic mode: enough for ten per period.
MAX_SAMPLES = 64

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": HOUR_MS}


def parse_retention_ms(text: str) -> int:
    """etcd's periodic retention: a bare number is hours, else a Go duration."""
    text = text.strip()
    if re.fullmatch(r"\d+", text):
        return int(text) * HOUR_MS
    if not text or not re.fullmatch(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h))+", text):
        raise ValueError(f"invalid --auto-compaction-retention {text!r} (hours, or a duration like 30m)")
    return int(sum(float(number) * _UNIT_MS[unit] for number, unit in _DURATION_PART.findall(text)))


class AutoCompactor:
    def __init__(self, mode: str, retention: str):
        if mode not in ("periodic", "revision"):
            raise ValueError(f"unknown auto-compaction mode {mode!r}")
        self.mode = mode
        if mode == "revision":
            if not re.fullmatch(r"\d+", retention.strip()):
                raise ValueError(f"revision retention must be a number of revisions, got {retention!r}")
            self.retention = int(retention)
            self.period_ms = REVISION_MODE_PERIOD_MS
        else:
            self.retention = parse_retention_ms(retention)
            self.period_ms = min(self.retention, HOUR_MS) if self.retention else 0
        self.samples: collections.deque[tuple[int, int]] = collections.deque(maxlen=MAX_SAMPLES)
        self.next_sample_ms: int | None = None
        self.next_compaction_ms: int | None = None
        self.last_compacted = 0

    @property
    def enabled(self) -> bool:
        return self.retention > 0

    def observe(self, now_ms: int, revision: int) -> int | None:
        if not self.enabled:
            return None
        if self.next_compaction_ms is None:
            self.next_compaction_ms = now_ms + self.period_ms
            self.next_sample_ms = now_ms
        if self.mode == "periodic" and now_ms >= self.next_sample_ms:
            self.samples.append((now_ms, revision))
            self.next_sample_ms = now_ms + max(1, self.period_ms // 10)
        if now_ms < self.next_compaction_ms:
            return None
        self.next_compaction_ms = now_ms + self.period_ms
        target = self._target(now_ms, revision)
        if target is None or target <= self.last_compacted:
            return None
        self.last_compacted = target
        return target

    def _target(self, now_ms: int, revision: int) -> int | None:
        if self.mode == "revision":
            target = revision - self.retention
            return target if target > 0 else None
        old_enough = [rev for at_ms, rev in self.samples if now_ms - at_ms >= self.retention]
        return old_enough[-1] if old_enough else None
