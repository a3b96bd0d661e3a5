"""`python -m protocol.etcd [--force]`: generate the etcd API stubs now (if stale, or always)."""

import sys

from protocol.etcd import generate

if "--force" in sys.argv[1:]:
    generate()
print("etcd API stubs up to date in protocol/etcd/")
