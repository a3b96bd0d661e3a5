#!/usr/bin/env bash
# The test command: install what the tests need, then run them all.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
# Real etcd 3.4 from Debian (CI runs as root): etcdctl for tests/test_etcdctl.py, the
# server for the tests that compare with it (tests/etcd_server.py starts its own).
missing=()
command -v etcdctl >/dev/null || missing+=(etcd-client)
command -v etcd >/dev/null || missing+=(etcd-server)
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi
# Generate the etcd API stubs once, before test processes race to (protocol/etcd/__init__.py).
python3 -m protocol.etcd
exec python3 -m pytest -q -p no:cacheprovider "$@"
