"""A consistent copy of the node's store, streamed to a client in chunks.

Both client front ends (ZeroMQ and etcd's gRPC) stream snapshots the same
way: copy the store to a temporary file in the run directory, read it back
chunk by chunk as the client keeps up, and remove it at the end.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

from actors import ipc


class SnapshotFile:
    def __init__(self, store, data_dir: str, origin):
        self.origin = origin
        handle, self.path = tempfile.mkstemp(prefix="snapshot-", dir=ipc.run_dir(data_dir))
        os.close(handle)
        store.copy_to(self.path)
        self.size = os.path.getsize(self.path)
        self.remaining = self.size
        self.file = open(self.path, "rb")
        # etcd's gRPC stream ends with the SHA-256 of what was sent.
        self.digest = hashlib.sha256()

    def read_chunk(self, chunk_bytes: int) -> bytes:
        blob = self.file.read(chunk_bytes)
        self.remaining = max(0, self.remaining - len(blob))
        self.digest.update(blob)
        return blob

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def close(self) -> None:
        self.file.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
