"""Goal: the pure cores stay pure. Method: parse each core module's imports
(not import it, so a lazy import inside a function is caught too) and refuse
any I/O, clock or global-randomness module."""

from __future__ import annotations

import ast
import glob
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FORBIDDEN = {"zmq", "lmdb", "socket", "time", "random", "os", "subprocess", "threading", "asyncio", "select"}

# The Raft state machine, the MVCC logic, the codec, schemas, limits and errors.
PURE_MODULES = [
    "protocol/codec.py",
    "protocol/messages.py",
    "protocol/limits.py",
    "protocol/errors.py",
    "actors/mvcc/core.py",
    "actors/lessor.py",
    "actors/members.py",
    "actors/compactor.py",
    "actors/watch/core.py",
    "actors/snapshot_transfer.py",
    *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "actors/raft/*.py"))),
]


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of nodes under `if TYPE_CHECKING:`: annotations only, never run."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.body:
                skipped.update(id(inner) for inner in ast.walk(child))
    return skipped


def imported_modules(path: str, root: str = REPO) -> set[str]:
    with open(os.path.join(root, path), encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), path)
    skipped = _type_checking_only(tree)
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_pure_cores_import_no_io():
    assert "actors/raft/__init__.py" in PURE_MODULES or not os.path.isdir(os.path.join(REPO, "actors/raft")), \
        "the Raft core package is expected under actors/raft"
    offenders = {}
    for path in PURE_MODULES:
        assert os.path.exists(os.path.join(REPO, path)), f"pure core module {path} is missing"
        bad = imported_modules(path) & FORBIDDEN
        if bad:
            offenders[path] = sorted(bad)
    assert offenders == {}


def test_the_check_sees_lazy_imports_and_skips_type_checking_ones(tmp_path):
    module = tmp_path / "sample.py"
    module.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import random\n"
                      "def f():\n    import time\n")
    assert imported_modules("sample.py", str(tmp_path)) == {"typing", "time"}
