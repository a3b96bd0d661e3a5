"""etcd's v3 API as protobuf: our .proto files and the stubs generated from them.

How this works: the `.proto` files in this package's sub-packages
(`etcdserverpb/rpc.proto`, `mvccpb/kv.proto`, `authpb/auth.proto`,
`v3lockpb/v3lock.proto`, `v3electionpb/v3election.proto`) are in the
repository; the Python stubs (`*_pb2.py`, `*_pb2_grpc.py` beside each file)
are not (.gitignore). The first import of this package generates them with
`python -m grpc_tools.protoc` when they are missing or stale: a stamp file
records a hash of every .proto and the grpcio-tools version, and a file lock
makes the gateway processes that start together generate once. Generate by
hand with `python -m protocol.etcd`.

The .proto imports are rooted at the repository (`protocol/etcd/mvccpb/kv.proto`),
so the generated modules import each other as `protocol.etcd.<package>.<file>_pb2`.
Package, service, message and field names and numbers are etcd's, which is
all the wire sees.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# The directory the .proto imports are rooted at (the one holding `protocol/`).
ROOT_DIR = os.path.dirname(os.path.dirname(PACKAGE_DIR))
STAMP_PATH = os.path.join(PACKAGE_DIR, ".generated")
LOCK_PATH = os.path.join(PACKAGE_DIR, ".generate.lock")


def proto_files() -> list[str]:
    return sorted(glob.glob(os.path.join(PACKAGE_DIR, "*", "*.proto")))


def source_fingerprint() -> str:
    import grpc_tools

    digest = hashlib.sha256()
    digest.update(getattr(grpc_tools, "__version__", "").encode())
    try:
        from importlib.metadata import version

        digest.update(version("grpcio-tools").encode())
        digest.update(version("protobuf").encode())
    except Exception:  # metadata missing: the proto sources alone decide
        pass
    for path in proto_files():
        digest.update(os.path.relpath(path, PACKAGE_DIR).encode())
        with open(path, "rb") as handle:
            digest.update(handle.read())
    return digest.hexdigest()


def _stamp() -> str:
    try:
        with open(STAMP_PATH, encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def generate() -> None:
    """Run protoc over every .proto into the package (beside the sources)."""
    from grpc_tools import protoc

    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    sources = [os.path.relpath(path, ROOT_DIR) for path in proto_files()]
    assert sources, f"no .proto files under {PACKAGE_DIR}"
    arguments = ["grpc_tools.protoc", f"--proto_path={ROOT_DIR}", f"--proto_path={include}",
                 f"--python_out={ROOT_DIR}", f"--grpc_python_out={ROOT_DIR}", *sources]
    if protoc.main(arguments) != 0:
        raise RuntimeError(f"protoc failed on {sources}")
    for directory in {os.path.dirname(path) for path in proto_files()}:
        marker = os.path.join(directory, "__init__.py")
        if not os.path.exists(marker):
            with open(marker, "w", encoding="ascii") as handle:
                handle.write('"""Generated from the .proto beside it; see protocol/etcd/__init__.py."""\n')


def ensure_generated() -> None:
    """Generate the stubs unless the stamp says they match the sources."""
    fingerprint = source_fingerprint()
    if _stamp() == fingerprint:
        return
    with open(LOCK_PATH, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _stamp() == fingerprint:  # another process generated them meanwhile
            return
        generate()
        temporary = f"{STAMP_PATH}.{os.getpid()}"
        with open(temporary, "w", encoding="ascii") as handle:
            handle.write(fingerprint + "\n")
        os.replace(temporary, STAMP_PATH)


ensure_generated()
