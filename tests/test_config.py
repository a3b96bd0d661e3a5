"""Goal: quorumkv accepts etcd's flags, env vars and config files with etcd's meaning.
Method: parse argument lists and environments directly (no processes)."""

from __future__ import annotations

import pytest

from actors import config as node_config


def test_defaults_are_etcds_with_our_data_dir():
    config = node_config.parse([], environ={})
    assert config.name == "default"
    assert config.data_dir == "default.qkv"
    assert config.listen_client_urls == ("http://localhost:2379",)
    assert config.zmq_url() == ("localhost", 2382)
    assert config.heartbeat_interval_ms == 100 and config.election_timeout_ms == 1000
    assert config.snapshot_count == 100_000
    assert config.max_request_bytes == 1572864 and config.max_txn_ops == 128


def test_zmq_port_derives_from_client_port_so_local_clusters_do_not_collide():
    ports = set()
    for client_port in (2379, 22379, 32379):
        config = node_config.parse(["--listen-client-urls", f"http://127.0.0.1:{client_port}"], environ={})
        ports.add(config.zmq_url()[1])
        assert config.advertise_client_urls == (f"http://127.0.0.1:{client_port}",)
    assert ports == {2382, 22382, 32382}


def test_explicit_zmq_url_wins():
    config = node_config.parse(["--listen-zmq-urls", "tcp://127.0.0.1:9999"], environ={})
    assert config.zmq_url() == ("127.0.0.1", 9999)


def test_env_vars_with_etcd_and_quorumkv_prefixes():
    environ = {"ETCD_NAME": "from-etcd", "ETCD_SNAPSHOT_COUNT": "5", "QUORUMKV_SNAPSHOT_COUNT": "7"}
    config = node_config.parse([], environ=environ)
    assert config.name == "from-etcd"
    assert config.snapshot_count == 7
    # A flag beats the environment.
    assert node_config.parse(["--name", "flag"], environ=environ).name == "flag"


def test_config_file_yaml_and_json(tmp_path):
    yaml_file = tmp_path / "etcd.yaml"
    yaml_file.write_text("name: 'n1'\ndata-dir: /tmp/n1  # comment\nsnapshot-count: 10\n")
    config = node_config.parse(["--config-file", str(yaml_file)], environ={"ETCD_NAME": "ignored"})
    assert (config.name, config.data_dir, config.snapshot_count) == ("n1", "/tmp/n1", 10)
    json_file = tmp_path / "etcd.json"
    json_file.write_text('{"name": "n2", "listen-client-urls": "http://127.0.0.1:5000"}')
    config = node_config.parse(["--config-file", str(json_file)], environ={})
    assert config.name == "n2" and config.zmq_url() == ("127.0.0.1", 5003)


@pytest.mark.parametrize("argv, message", [
    (["--election-timeout", "100", "--heartbeat-interval", "100"], "election-timeout"),
    (["--listen-client-urls", "http://nohost"], "must name a host and a port"),
    (["--initial-cluster-state", "weird"], "initial-cluster-state"),
    (["--snapshot-count", "abc"], "snapshot-count"),
    (["--initial-cluster", "broken"], "initial-cluster"),
])
def test_bad_flags_are_clear_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        node_config.parse(argv, environ={})


def test_member_and_cluster_ids_are_stable_and_distinct():
    a = node_config.parse(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"], environ={})
    b = node_config.parse(["--initial-advertise-peer-urls", "http://127.0.0.1:12380"], environ={})
    assert a.member_id() != b.member_id()
    assert a.member_id() == node_config.parse(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"],
                                              environ={}).member_id()
    assert node_config.NodeConfig.from_json(a.to_json()) == a


def _write_cluster_files(data_dir: str, rounds: int) -> None:
    config = node_config.NodeConfig(data_dir=data_dir)
    for _ in range(rounds):
        node_config.write_cluster_file(config)


def test_concurrent_first_starts_write_the_cluster_file_safely(tmp_path):
    """Goal: actors started together (supervisord) may all write cluster.json
    at once without failing. Method: several processes write it in a loop."""
    import json
    import multiprocessing

    data_dir = str(tmp_path / "node.qkv")
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=_write_cluster_files, args=(data_dir, 200)) for _ in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=60)
    assert [writer.exitcode for writer in writers] == [0, 0, 0, 0]
    with open(tmp_path / "node.qkv" / "cluster.json", encoding="utf-8") as handle:
        assert json.load(handle)["member_id"] == f"{node_config.NodeConfig().member_id():x}"
