"""An in-memory, sorted backend for the MVCC core (tests and the reference checks).

Each table is a dict plus a sorted key list (bisect); no transactions:
writes are visible at once and never rolled back, which is all the core's
unit tests need.
"""

from __future__ import annotations

import bisect
from typing import Iterator

from actors.mvcc.core import TABLES


class MemoryBackend:
    def __init__(self):
        self.tables: dict[str, dict[bytes, bytes]] = {name: {} for name in TABLES}
        self.sorted_keys: dict[str, list[bytes]] = {name: [] for name in TABLES}

    def get(self, table: str, key: bytes) -> bytes | None:
        return self.tables[table].get(key)

    def put(self, table: str, key: bytes, value: bytes) -> None:
        data = self.tables[table]
        if key not in data:
            bisect.insort(self.sorted_keys[table], key)
        data[key] = bytes(value)

    def delete(self, table: str, key: bytes) -> bool:
        data = self.tables[table]
        if key not in data:
            return False
        del data[key]
        keys = self.sorted_keys[table]
        del keys[bisect.bisect_left(keys, key)]
        return True

    def iterate(self, table: str, start: bytes) -> Iterator[tuple[bytes, bytes]]:
        keys = self.sorted_keys[table]
        data = self.tables[table]
        position = bisect.bisect_left(keys, start)
        # Snapshot the tail so writes during iteration cannot confuse the walk.
        for key in keys[position:]:
            value = data.get(key)
            if value is not None:
                yield key, value

    def last_below(self, table: str, key: bytes) -> tuple[bytes, bytes] | None:
        keys = self.sorted_keys[table]
        position = bisect.bisect_left(keys, key)
        if position == 0:
            return None
        found = keys[position - 1]
        return found, self.tables[table][found]

    def size_in_use(self) -> int:
        return sum(len(k) + len(v) for data in self.tables.values() for k, v in data.items())

    def size_over(self, limit_bytes: int) -> bool:
        return self.size_in_use() > limit_bytes
