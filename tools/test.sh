#!/usr/bin/env bash
# The test command: install what the tests need, then run them all.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
# The real etcdctl 3.4 for tests/test_etcdctl.py (CI runs as root).
command -v etcdctl >/dev/null || (apt-get update && apt-get install -y etcd-client)
# Generate the etcd API stubs once, before test processes race to (protocol/etcd/__init__.py).
python3 -m protocol.etcd
exec python3 -m pytest -q -p no:cacheprovider "$@"
