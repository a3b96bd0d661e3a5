"""Offline restore: a fresh data dir from a snapshot file, ready to boot.

The snapshot is the node's LMDB store (see `MvccStore.copy_to`); its meta
table says which raft index and term it holds. As etcd's restore writes a
WAL that starts at the snapshot, this writes a WAL whose snapshot marker and
hard state sit at that index and term, so the raft log starts right after
it and the applier, already at that index, misses nothing.
"""

from __future__ import annotations

import os

from actors.config import NodeConfig, member_id_for, write_cluster_file
from actors.gateway import open_store, store_dir
from actors.mvcc import MvccStore
from actors.wal import Wal


def restore_data_dir(snapshot_file: str, config: NodeConfig) -> dict:
    """Restore into config.data_dir, which must not exist or be empty."""
    if os.path.exists(config.data_dir) and os.listdir(config.data_dir):
        raise FileExistsError(f"data dir {config.data_dir} exists and is not empty")
    status = MvccStore.snapshot_status(snapshot_file)
    MvccStore.restore(snapshot_file, store_dir(config))
    store = open_store(config)
    try:
        applied_index, raft_term = store.applied_index(), store.status()["raft_term"]
    finally:
        store.close()
    voters = sorted(member_id_for(urls, config.initial_cluster_token) for urls in config.cluster_members().values())
    wal, _recovery = Wal.open(os.path.join(config.data_dir, "wal"), config.limits().wal_segment_bytes)
    try:
        wal.save_snapshot(applied_index, raft_term, {"voters": voters})
        wal.set_hard_state(raft_term, 0, applied_index)
        wal.sync()
    finally:
        wal.close()
    write_cluster_file(config)
    return {**status, "raft_index": applied_index, "raft_term": raft_term}
