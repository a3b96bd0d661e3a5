"""The MVCC store: etcd v3 semantics (core.py, pure) on LMDB (lmdb_store.py)."""

from actors.mvcc.core import DEFAULT_INLINE_KEY_BYTES, KeyEncoding, MvccReader, MvccWriter
from actors.mvcc.lmdb_store import MvccStore

__all__ = ["DEFAULT_INLINE_KEY_BYTES", "KeyEncoding", "MvccReader", "MvccWriter", "MvccStore"]
