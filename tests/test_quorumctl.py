"""quorumctl end to end against a real quorumkv node.

Goal: the commands work over the wire and print etcdctl's formats.
Method: the `node` fixture starts a real node; `node.ctl(...)` runs
`python -m tools.quorumctl --endpoints <node> ...` as a user would. Exact
formatting is checked without a server in test_quorumctl_format.py; here the
shapes and the data are checked.
"""

from __future__ import annotations

import base64
import json
import os



def ok(result) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def test_put_get_del_simple(node):
    assert ok(node.ctl("put", "foo", "bar")) == "OK\n"
    assert ok(node.ctl("put", "foo", "baz", "--prev-kv")) == "OK\nfoo\nbar\n"
    assert ok(node.ctl("get", "foo")) == "foo\nbaz\n"
    assert ok(node.ctl("get", "foo", "--print-value-only")) == "baz\n"
    assert ok(node.ctl("get", "foo", "--hex")) == "\\x66\\x6f\\x6f\n\\x62\\x61\\x7a\n"
    assert ok(node.ctl("put", "fromstdin", input="piped value\n")) == "OK\n"
    assert ok(node.ctl("get", "fromstdin", "--print-value-only")) == "piped value\n\n"
    assert ok(node.ctl("del", "foo", "--prev-kv")) == "1\nfoo\nbaz\n"
    assert ok(node.ctl("del", "nosuch")) == "0\n"
    assert ok(node.ctl("get", "foo")) == ""


def test_get_ranges(node):
    for name in ("a1", "a2", "a3", "b1"):
        ok(node.ctl("put", name, name.upper()))
    assert ok(node.ctl("get", "a", "--prefix", "--keys-only")) == "a1\n\na2\n\na3\n\n"
    assert ok(node.ctl("get", "a2", "--from-key", "--limit", "2")) == "a2\nA2\na3\nA3\n"
    assert ok(node.ctl("get", "a1", "a3")) == "a1\nA1\na2\nA2\n"
    assert ok(node.ctl("get", "a", "--prefix", "--order=DESCEND", "--print-value-only")) == "A3\nA2\nA1\n"
    assert ok(node.ctl("get", "a", "--prefix", "--consistency=s", "--print-value-only")) == "A1\nA2\nA3\n"
    fields = ok(node.ctl("get", "a", "--prefix", "--count-only", "-w", "fields"))
    assert fields.endswith('"More" : false\n"Count" : 3\n') and '"Key"' not in fields


def test_json_and_fields(node):
    ok(node.ctl("put", "j", "value"))
    body = json.loads(ok(node.ctl("get", "j", "-w", "json")))
    assert set(body["header"]) == {"cluster_id", "member_id", "revision", "raft_term"}
    (kv,) = body["kvs"]
    assert base64.b64decode(kv["key"]) == b"j" and base64.b64decode(kv["value"]) == b"value"
    assert body["count"] == 1 and "more" not in body and "lease" not in kv
    fields = ok(node.ctl("get", "j", "-w", "fields")).splitlines()
    assert fields[0].startswith('"ClusterID" : ') and '"Key" : "j"' in fields and '"Value" : "value"' in fields
    put = json.loads(ok(node.ctl("put", "j", "v2", "-w", "json")))
    assert put["header"]["revision"] == body["header"]["revision"] + 1


def test_txn_from_stdin(node):
    ok(node.ctl("put", "x", "1"))
    script = 'value("x") = "1"\n\nput x 2\nget x\n\nput x 3\n\n'
    assert ok(node.ctl("txn", input=script)) == "SUCCESS\n\nOK\n\nx\n2\n"
    assert ok(node.ctl("txn", input=script)) == "FAILURE\n\nOK\n"
    assert ok(node.ctl("get", "x", "--print-value-only")) == "3\n"
    interactive = ok(node.ctl("txn", "-i", input='mod("x") > "0"\n\n\n\n'))
    assert interactive == ("compares:\nsuccess requests (get, put, del):\nfailure requests (get, put, del):\n"
                           "SUCCESS\n")
    as_json = json.loads(ok(node.ctl("txn", "-w", "json", input='version("x") = "999"\n\n\nget x\n\n')))
    assert "succeeded" not in as_json
    assert "ResponseRange" in as_json["responses"][0]["Response"]


def test_compaction_and_errors(node):
    first = json.loads(ok(node.ctl("put", "c", "1", "-w", "json")))["header"]["revision"]
    latest = json.loads(ok(node.ctl("put", "c", "2", "-w", "json")))["header"]["revision"]
    assert ok(node.ctl("compaction", str(latest))) == f"compacted revision {latest}\n"
    old = node.ctl("get", "c", "--rev", str(first))
    assert (old.returncode, old.stdout, old.stderr) == (
        1, "", "Error: etcdserver: mvcc: required revision has been compacted\n")
    empty = node.ctl("put", "", "v")
    assert (empty.returncode, empty.stderr) == (1, "Error: etcdserver: key is not provided\n")


def test_endpoint_commands(node):
    table = ok(node.ctl("endpoint", "status", "-w", "table")).splitlines()
    assert table[1].split("|")[1].strip() == "ENDPOINT" and len(table) == 5
    assert table[3].split("|")[1].strip() == node.zmq_endpoint
    assert table[3].split("|")[5].strip() == "true"  # a single node leads
    simple = ok(node.ctl("endpoint", "status"))
    assert simple.startswith(node.zmq_endpoint + ", ") and simple.endswith(", \n")
    status = json.loads(ok(node.ctl("endpoint", "status", "-w", "json")))
    assert status[0]["Endpoint"] == node.zmq_endpoint and status[0]["Status"]["dbSize"] > 0
    health = node.ctl("endpoint", "health")
    assert health.returncode == 0 and health.stdout == ""
    assert health.stderr.startswith(f"{node.zmq_endpoint} is healthy: successfully committed proposal: took = ")
    assert json.loads(ok(node.ctl("endpoint", "health", "-w", "json")))[0]["health"] is True
    hashkv = ok(node.ctl("endpoint", "hashkv")).strip().split(", ")
    assert hashkv[0] == node.zmq_endpoint and hashkv[1].isdigit()


def test_maintenance_commands(node):
    assert ok(node.ctl("alarm", "list")) == ""
    ok(node.ctl("alarm", "disarm"))
    assert ok(node.ctl("defrag")) == f"Finished defragmenting etcd member[{node.zmq_endpoint}]\n"
    assert ok(node.ctl("version")).endswith("API version: 3.4\n")


def test_lease_commands(node):
    granted = ok(node.ctl("lease", "grant", "100"))
    assert granted.startswith("lease ") and granted.endswith(" granted with TTL(100s)\n")
    lease_hex = granted.split()[1]
    assert ok(node.ctl("put", "lk", "lv", f"--lease={lease_hex}")) == "OK\n"
    ttl = ok(node.ctl("lease", "timetolive", lease_hex, "--keys"))
    assert ttl.startswith(f"lease {lease_hex} granted with TTL(100s), remaining(") and ttl.endswith("attached keys([lk])\n")
    listed = ok(node.ctl("lease", "list"))
    assert listed.startswith("found ") and f"{lease_hex}\n" in listed
    assert ok(node.ctl("lease", "revoke", lease_hex)) == f"lease {lease_hex} revoked\n"
    again = node.ctl("lease", "revoke", lease_hex)
    assert (again.returncode, again.stderr) == (1, "Error: failed to revoke lease (etcdserver: requested lease not found)\n")
    assert ok(node.ctl("lease", "timetolive", lease_hex)) == f"lease {lease_hex} already expired\n"


def test_snapshot_save_status_restore(node, tmp_path):
    for i in range(20):
        ok(node.ctl("put", f"snap/{i}", "v"))
    path = str(tmp_path / "backup.db")
    saved = node.ctl("snapshot", "save", path)
    assert (saved.returncode, saved.stdout) == (0, f"Snapshot saved at {path}\n"), saved.stderr
    assert os.path.getsize(path) > 0
    status = ok(node.ctl("snapshot", "status", path, "-w", "json"))
    assert json.loads(status)["totalKey"] > 0
    table = ok(node.ctl("snapshot", "status", path, "-w", "table")).splitlines()
    assert "TOTAL KEYS" in table[1]
    restored = str(tmp_path / "restored.qkv")
    ok(node.ctl("snapshot", "restore", path, "--data-dir", restored))
    assert os.listdir(restored)
    exists = node.ctl("snapshot", "restore", path, "--data-dir", restored)
    assert (exists.returncode, exists.stderr) == (1, f'Error: data-dir "{restored}" exists\n')


def test_restored_data_dir_boots_and_serves_the_snapshot(node, node_factory, tmp_path):
    """Goal: `snapshot restore` makes a data dir a node boots from, with the
    saved keys and revision, and that takes new writes after them."""
    for i in range(20):
        ok(node.ctl("put", f"restore/{i}", f"v{i}"))
    saved_revision = node.client().status()["header"]["revision"]
    path = str(tmp_path / "restore.db")
    ok(node.ctl("snapshot", "save", path))
    restored = node_factory("restored", start=False)
    ok(node.ctl("snapshot", "restore", path, "--data-dir", restored.data_dir))
    restored.start()
    with restored.client() as client:
        kvs = client.get("restore/", prefix=True)["kvs"]
        assert [kv["value"] for kv in kvs] == [f"v{i}".encode() for i in sorted(range(20), key=str)]
        assert client.put("restore/new", "after")["header"]["revision"] == saved_revision + 1
