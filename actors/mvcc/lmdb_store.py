"""The LMDB backend for the MVCC core, and `MvccStore`, the class the actors use.

Layout on disk: ``<store_dir>/CURRENT`` holds the generation number (written
atomically: temp file, fsync, rename, fsync dir) and ``<store_dir>/gen-<N>/``
is the LMDB environment (data.mdb + lock.mdb). Defragmenting copies the env
compacted into gen-N+1, switches CURRENT and reopens; readers in other
processes reopen when told the new generation (`reopen_if_stale`). The
writer removes generation dirs other than CURRENT when it opens and after
each defragment.

A new store's gen-1 (with all its tables) is created and closed before
CURRENT is written, so whoever finds CURRENT finds a complete env; CURRENT's
temp file is per process, so several actors may create the store at once.
A reader opens whatever CURRENT names, retrying a few times when a
defragment removes that generation under it.

One LMDB write transaction per `apply()` call; the applied raft index is
written in it. The env runs with metasync off (MDB_NOMETASYNC): one fsync
per commit instead of two; a machine crash may undo the last commit(s) but
never breaks the env (ACI kept), and the raft log re-applies what the
applied index says is missing. That halves-or-better the commit cost. Readers open the env read-only and begin one read
transaction per call, so every read sees the latest committed state.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from typing import Iterator

import lmdb

from actors.mvcc.core import (
    DEFAULT_INLINE_KEY_BYTES, META_APPLIED_INDEX, META_APPLIED_TERM, TABLES,
    KeyEncoding, MvccReader, MvccWriter,
)
from protocol.limits import DEFAULT_LIMITS, Limits

CURRENT_FILE = "CURRENT"
LMDB_META_PAGES = 2
# Pages an apply writes per byte of its requests, at most (values, their
# revision records, the key index, B-tree splits): bounds a transaction's growth.
WRITE_AMPLIFICATION_MAX = 4
# Opening the generation CURRENT names can fail when back-to-back defragments
# remove it meanwhile: read CURRENT again, this many times in all.
OPEN_ATTEMPTS = 20
OPEN_RETRY_SLEEP_S = 0.01


class LmdbTxn:
    """The core's BackendTxn over one lmdb.Transaction."""

    __slots__ = ("txn", "dbs", "_cursors", "size_bound_bytes")

    def __init__(self, txn: lmdb.Transaction, dbs: dict, size_bound_bytes: int | None = None):
        self.txn = txn
        self.dbs = dbs
        self._cursors: dict = {}
        # An upper bound of size_in_use() (a write transaction's: see MvccStore._writer).
        self.size_bound_bytes = size_bound_bytes

    def get(self, table: str, key: bytes) -> bytes | None:
        return self.txn.get(key, db=self.dbs[table])

    def put(self, table: str, key: bytes, value: bytes) -> None:
        self.txn.put(key, value, db=self.dbs[table])

    def delete(self, table: str, key: bytes) -> bool:
        return self.txn.delete(key, db=self.dbs[table])

    def iterate(self, table: str, start: bytes) -> Iterator[tuple[bytes, bytes]]:
        cursor = self.txn.cursor(db=self.dbs[table])
        if not cursor.set_range(start):
            return iter(())
        return cursor.iternext()

    def last_below(self, table: str, key: bytes) -> tuple[bytes, bytes] | None:
        cursor = self._cursors.get(table)
        if cursor is None:
            cursor = self._cursors[table] = self.txn.cursor(db=self.dbs[table])
        if cursor.set_range(key):
            return cursor.item() if cursor.prev() else None
        return cursor.item() if cursor.last() else None

    def size_in_use(self) -> int:
        return pages_in_use(self.txn, self.dbs)

    def size_over(self, limit_bytes: int) -> bool:
        # The exact count stats every table; far below the limit the bound says enough.
        if self.size_bound_bytes is not None and self.size_bound_bytes <= limit_bytes:
            return False
        return self.size_in_use() > limit_bytes


def pages_in_use(txn: lmdb.Transaction, dbs: dict) -> int:
    total = 0
    psize = 4096
    for db in dbs.values():
        stat = txn.stat(db)
        psize = stat["psize"]
        total += stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
    return (total + LMDB_META_PAGES) * psize


def _write_current(store_dir: str, generation: int) -> None:
    path = os.path.join(store_dir, CURRENT_FILE)
    # Per process: actors creating the store at once must not share a temp file.
    temporary = f"{path}.tmp.{os.getpid()}"
    with open(temporary, "w") as handle:
        handle.write(f"{generation}\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(temporary, path)
    directory = os.open(store_dir, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _read_current(store_dir: str) -> int:
    path = os.path.join(store_dir, CURRENT_FILE)
    try:
        with open(path) as handle:
            return int(handle.read().strip())
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"no MVCC store in {store_dir} (no {CURRENT_FILE} file; "
                                "the applier creates the store)", path) from None


def _fsync_path(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _generation_dir(store_dir: str, generation: int) -> str:
    return os.path.join(store_dir, f"gen-{generation}")


class MvccStore:
    def __init__(self, store_dir: str, *, writer: bool, map_size_bytes: int, quota_backend_bytes: int,
                 limits: Limits, member_id: int, inline_key_bytes: int, sync: bool):
        self.store_dir = store_dir
        self.writer = writer
        self.map_size_bytes = map_size_bytes
        self.quota_backend_bytes = quota_backend_bytes
        self.limits = limits
        self.member_id = member_id
        self.encoding = KeyEncoding(inline_key_bytes)
        self.sync = sync
        self.generation = 0
        self.env: lmdb.Environment | None = None
        self.dbs: dict = {}

    @classmethod
    def open(cls, store_dir: str, *, writer: bool, map_size_bytes: int = 4 * 1024 ** 3,
             quota_backend_bytes: int = DEFAULT_LIMITS.default_quota_backend_bytes,
             limits: Limits = DEFAULT_LIMITS, member_id: int = 0,
             inline_key_bytes: int = DEFAULT_INLINE_KEY_BYTES, sync: bool = True) -> "MvccStore":
        assert map_size_bytes > quota_backend_bytes, "the LMDB map must exceed the quota"
        store = cls(store_dir, writer=writer, map_size_bytes=map_size_bytes,
                    quota_backend_bytes=quota_backend_bytes, limits=limits, member_id=member_id,
                    inline_key_bytes=inline_key_bytes, sync=sync)
        if writer:
            os.makedirs(store_dir, exist_ok=True)
            if not os.path.exists(os.path.join(store_dir, CURRENT_FILE)):
                # Tables first, CURRENT last: a reader that finds CURRENT finds the tables.
                os.makedirs(_generation_dir(store_dir, 1), exist_ok=True)
                store._open_env(1)
                store.close()
                _write_current(store_dir, 1)
        store._open_current()
        if writer:
            store._remove_stale_generations()
        return store

    def _open_current(self, newer_than: int = 0) -> bool:
        """Open the generation CURRENT names if it is > newer_than; True if it opened one.

        CURRENT may move (and the generation it named vanish) while we open it,
        so a failed open reads CURRENT again, OPEN_ATTEMPTS times in all. The
        env already open (if any) is closed only once the new one is open.
        """
        for attempt in range(OPEN_ATTEMPTS):
            generation = _read_current(self.store_dir)
            if generation <= newer_than:
                return False
            try:
                env, dbs = self._open_generation(generation)
            except (lmdb.Error, FileNotFoundError):
                if attempt + 1 == OPEN_ATTEMPTS:
                    raise
                time.sleep(OPEN_RETRY_SLEEP_S)
                continue
            self.close()
            self.env, self.dbs, self.generation = env, dbs, generation
            return True
        raise AssertionError("unreachable")

    def _open_env(self, generation: int) -> None:
        self.env, self.dbs = self._open_generation(generation)
        self.generation = generation

    def _open_generation(self, generation: int) -> tuple[lmdb.Environment, dict]:
        path = _generation_dir(self.store_dir, generation)
        env = lmdb.open(path, map_size=self.map_size_bytes, max_dbs=len(TABLES) + 1,
                        readonly=not self.writer, sync=self.sync, metasync=False,
                        readahead=False, max_readers=1024, subdir=True, create=self.writer)
        try:
            if self.writer:
                with env.begin(write=True) as txn:
                    dbs = {name: env.open_db(name.encode(), txn=txn, create=True) for name in TABLES}
            else:
                # Read-only: open_db without a txn uses (and commits) its own read txn,
                # which is what keeps the handles valid after it ends.
                dbs = {name: env.open_db(name.encode(), create=False) for name in TABLES}
        except BaseException:
            env.close()
            raise
        return env, dbs

    def _remove_stale_generations(self) -> None:
        for name in os.listdir(self.store_dir):
            if name.startswith("gen-") and name != f"gen-{self.generation}":
                shutil.rmtree(os.path.join(self.store_dir, name), ignore_errors=True)

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None

    def reopen_if_stale(self, generation: int | None = None) -> bool:
        """Reopen on the latest generation when told of (or, with None, CURRENT names)
        a newer one than ours; True if it reopened.

        An older or equal `generation` (an old APPLIED message) is ignored. A newer
        one is only a hint: by now it may be removed by a later defragment, so the
        generation opened is the one CURRENT names.
        """
        if generation is not None and generation <= self.generation:
            return False
        return self._open_current(newer_than=self.generation)

    # -- transactions -----------------------------------------------------

    def _read_txn(self) -> lmdb.Transaction:
        try:
            return self.env.begin(buffers=False)
        except lmdb.MapResizedError:
            self.env.set_mapsize(0)
            return self.env.begin(buffers=False)

    def _reader(self, txn) -> MvccReader:
        return MvccReader(LmdbTxn(txn, self.dbs), self.encoding)

    def _writer(self, txn) -> MvccWriter:
        # The file's high-water mark as last committed, plus what one apply
        # can add at most, bounds the pages in use at the end of this transaction.
        size_bound_bytes = ((self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]
                            + self.limits.max_apply_inflight_batches * self.limits.max_apply_batch_bytes
                            * WRITE_AMPLIFICATION_MAX)
        return MvccWriter(LmdbTxn(txn, self.dbs, size_bound_bytes), self.encoding, member_id=self.member_id,
                          quota_backend_bytes=self.quota_backend_bytes)

    # -- writes (the applier) ---------------------------------------------

    def apply(self, entries: list) -> list:
        """Apply in one transaction; afterwards `written_revision` is the store's
        revision (the writer knows it without a read transaction)."""
        assert self.writer, "apply on a read-only store"
        with self.env.begin(write=True) as txn:
            writer = self._writer(txn)
            results = writer.apply(entries)
        self.written_revision = writer.revision
        return results

    def compact_step(self) -> bool:
        assert self.writer
        with self.env.begin(write=True) as txn:
            return self._writer(txn).compact_step(self.limits.compaction_batch_revisions)

    def compaction_pending(self) -> bool:
        with self._read_txn() as txn:
            return self._writer_view(txn).compaction_pending()

    def _writer_view(self, txn) -> MvccWriter:
        return MvccWriter(LmdbTxn(txn, self.dbs), self.encoding)

    def defragment(self) -> int:
        assert self.writer
        new_generation = self.generation + 1
        path = _generation_dir(self.store_dir, new_generation)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        # copyfd into our own file, not env.copy(path): LMDB writes a path copy
        # with O_DIRECT, which leaves the new generation out of the page cache
        # (the next reads and defragments then fault it in page by page, ~10x
        # slower) and never fsyncs it. The copy is on disk before CURRENT names it.
        with open(os.path.join(path, "data.mdb"), "xb") as handle:
            self.env.copyfd(handle.fileno(), compact=True)
            handle.flush()
            os.fsync(handle.fileno())
        _fsync_path(path)
        _write_current(self.store_dir, new_generation)
        self.close()
        self._open_env(new_generation)
        # Every other generation, not only the one we left: a lagging reader may
        # have re-created a lock.mdb in an older one while it was being removed.
        self._remove_stale_generations()
        return new_generation

    # -- reads (any process) ----------------------------------------------

    def range(self, body: dict) -> dict:
        with self._read_txn() as txn:
            return self._reader(txn).range(body)

    def get(self, key: bytes, revision: int = 0) -> dict | None:
        with self._read_txn() as txn:
            return self._reader(txn).get_one(key, revision)

    def events(self, start_revision: int, end_revision: int, limit: int, prev_kv: bool = False) -> list:
        with self._read_txn() as txn:
            return self._reader(txn).events(start_revision, end_revision, limit, prev_kv)

    def hash_kv(self, revision: int = 0) -> dict:
        with self._read_txn() as txn:
            return self._reader(txn).hash_kv(revision)

    def hash_all(self) -> dict:
        with self._read_txn() as txn:
            return self._reader(txn).hash_all()

    def member_table(self) -> dict | None:
        with self._read_txn() as txn:
            return self._reader(txn).member_table()

    def revision(self) -> int:
        with self._read_txn() as txn:
            return self._reader(txn).revision

    def compact_revision(self) -> int:
        with self._read_txn() as txn:
            return self._reader(txn).compact_revision

    def applied_index(self) -> int:
        with self._read_txn() as txn:
            return self._reader(txn).meta_int(META_APPLIED_INDEX)

    def status(self) -> dict:
        with self._read_txn() as txn:
            reader = self._reader(txn)
            return {
                # Not a stat of data.mdb by path: a defragment may have removed
                # this generation before this reader heard of the new one.
                "db_size": (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"],
                "db_size_in_use": pages_in_use(txn, self.dbs),
                "revision": reader.revision,
                "raft_applied_index": reader.meta_int(META_APPLIED_INDEX),
                "raft_term": reader.meta_int(META_APPLIED_TERM),
                "compact_revision": reader.compact_revision,
            }

    def alarms(self) -> list[dict]:
        with self._read_txn() as txn:
            return self._reader(txn).alarms()

    def lease_time_to_live(self, body: dict) -> dict:
        with self._read_txn() as txn:
            return self._reader(txn).lease_time_to_live(body)

    def lease_leases(self) -> dict:
        with self._read_txn() as txn:
            return self._reader(txn).lease_leases()

    def lease_ttls(self) -> list[tuple[int, int]]:
        with self._read_txn() as txn:
            return self._reader(txn).lease_ttls()

    # -- snapshots --------------------------------------------------------

    def copy_to(self, path: str) -> None:
        """A consistent, compacted copy of the env as one file (LMDB format)."""
        with open(path, "wb") as handle:
            self.env.copyfd(handle.fileno(), compact=True)
            handle.flush()
            os.fsync(handle.fileno())

    def install(self, snapshot_file: str, applied_index: int) -> int:
        """Replace the store by a `copy_to` file of another member (a snapshot
        transfer) as a new generation; returns it. The file is moved, not
        copied (same file system), and must hold `applied_index`.

        Crash safety: CURRENT names the new generation only once its data is
        in place and checked; before that the new dir is a stale generation
        (removed by the next writer open), after it the new store is whole.
        """
        assert self.writer
        new_generation = self.generation + 1
        path = _generation_dir(self.store_dir, new_generation)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        os.rename(snapshot_file, os.path.join(path, "data.mdb"))
        _fsync_path(path)
        env, dbs = self._open_generation(new_generation)
        try:
            with env.begin() as txn:
                found = MvccReader(LmdbTxn(txn, dbs), self.encoding).meta_int(META_APPLIED_INDEX)
        finally:
            env.close()
        if found != applied_index:
            shutil.rmtree(path, ignore_errors=True)
            raise ValueError(f"snapshot holds applied index {found}, expected {applied_index}")
        _write_current(self.store_dir, new_generation)
        self.close()
        self._open_env(new_generation)
        self._remove_stale_generations()
        return new_generation

    @staticmethod
    def snapshot_position(snapshot_file: str, inline_key_bytes: int = DEFAULT_INLINE_KEY_BYTES) -> tuple[int, int]:
        """(applied raft index, its term) of a `copy_to` file."""
        env = lmdb.open(snapshot_file, subdir=False, readonly=True, lock=False, max_dbs=len(TABLES) + 1)
        try:
            dbs = {name: env.open_db(name.encode(), create=False) for name in TABLES}
            with env.begin() as txn:
                reader = MvccReader(LmdbTxn(txn, dbs), KeyEncoding(inline_key_bytes))
                return reader.meta_int(META_APPLIED_INDEX), reader.meta_int(META_APPLIED_TERM)
        finally:
            env.close()

    @staticmethod
    def restore(snapshot_file: str, store_dir: str) -> None:
        """Offline: a fresh store dir (generation 1) from a `copy_to` file."""
        if os.path.exists(os.path.join(store_dir, CURRENT_FILE)):
            raise FileExistsError(f"{store_dir} already holds a store")
        path = _generation_dir(store_dir, 1)
        os.makedirs(path, exist_ok=True)
        shutil.copyfile(snapshot_file, os.path.join(path, "data.mdb"))
        with open(os.path.join(path, "data.mdb"), "rb+") as handle:
            os.fsync(handle.fileno())
        _write_current(store_dir, 1)

    @staticmethod
    def snapshot_status(snapshot_file: str, inline_key_bytes: int = DEFAULT_INLINE_KEY_BYTES) -> dict:
        env = lmdb.open(snapshot_file, subdir=False, readonly=True, lock=False, max_dbs=len(TABLES) + 1)
        try:
            dbs = {name: env.open_db(name.encode(), create=False) for name in TABLES}
            with env.begin() as txn:
                reader = MvccReader(LmdbTxn(txn, dbs), KeyEncoding(inline_key_bytes))
                total_key = sum(txn.stat(db)["entries"] for db in dbs.values())
                return {"hash": reader.hash_kv(0)["hash"], "revision": reader.revision,
                        "total_key": total_key, "total_size": os.path.getsize(snapshot_file)}
        finally:
            env.close()
