"""Server configuration: etcd's flags, a YAML-or-JSON config file, ETCD_* / QUORUMKV_* env vars.

Precedence, as etcd: a config file (--config-file) replaces flags and env
entirely; otherwise a flag beats an environment variable beats the default.
Environment variables use etcd's names (ETCD_DATA_DIR for --data-dir) and
quorumkv's own prefix too (QUORUMKV_DATA_DIR); QUORUMKV_ wins if both are set.

Ports: --listen-client-urls names the etcd gRPC port (2379 by default).
The ZeroMQ client port is --listen-zmq-urls; when that flag is not given it is
derived from the first client URL's port + ZMQ_PORT_OFFSET (2379 -> 2382), so
several nodes started with etcd's flags alone get distinct ZeroMQ ports.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import urllib.parse

from actors.compactor import AutoCompactor
from protocol.limits import DEFAULT_LIMITS, Limits

ZMQ_PORT_OFFSET = 3
DEFAULT_CLIENT_URL = "http://localhost:2379"
DEFAULT_PEER_URL = "http://localhost:2380"


@dataclasses.dataclass(frozen=True, kw_only=True)
class NodeConfig:
    name: str = "default"
    data_dir: str = "default.qkv"
    listen_client_urls: tuple[str, ...] = (DEFAULT_CLIENT_URL,)
    advertise_client_urls: tuple[str, ...] = (DEFAULT_CLIENT_URL,)
    listen_peer_urls: tuple[str, ...] = (DEFAULT_PEER_URL,)
    initial_advertise_peer_urls: tuple[str, ...] = (DEFAULT_PEER_URL,)
    initial_cluster: str = ""
    initial_cluster_state: str = "new"
    initial_cluster_token: str = "etcd-cluster"
    listen_zmq_urls: tuple[str, ...] = ()
    listen_client_http_urls: tuple[str, ...] = ()  # etcd's JSON gateway; off unless given
    heartbeat_interval_ms: int = 100
    election_timeout_ms: int = 1000
    snapshot_count: int = 100_000
    snapshot_catchup_entries: int = DEFAULT_LIMITS.snapshot_catchup_entries
    quota_backend_bytes: int = 0  # 0 = Limits.default_quota_backend_bytes, as etcd
    max_request_bytes: int = DEFAULT_LIMITS.max_request_bytes
    max_txn_ops: int = DEFAULT_LIMITS.max_txn_ops
    auto_compaction_mode: str = "periodic"
    auto_compaction_retention: str = "0"
    gateways: int = 0  # 0 = number of cores
    log_level: str = "info"
    seed: int = 0  # the Raft core's RNG seed; 0 = derive from the member id
    watch_progress_notify_interval_ms: int = 600_000  # etcd's default, 10m

    # Derived, not flags.
    def limits(self) -> Limits:
        return Limits(max_request_bytes=self.max_request_bytes, max_txn_ops=self.max_txn_ops,
                      snapshot_catchup_entries=self.snapshot_catchup_entries)

    def effective_quota_bytes(self) -> int:
        return self.quota_backend_bytes or DEFAULT_LIMITS.default_quota_backend_bytes

    def gateway_count(self) -> int:
        return self.gateways or (os.cpu_count() or 1)

    def cluster_members(self) -> dict[str, tuple[str, ...]]:
        """name -> peer URLs, from --initial-cluster (or just this node)."""
        if not self.initial_cluster:
            return {self.name: self.initial_advertise_peer_urls}
        members: dict[str, list[str]] = {}
        for item in self.initial_cluster.split(","):
            name, _, url = item.strip().partition("=")
            if not name or not url:
                raise ValueError(f"--initial-cluster: bad entry {item!r} (want name=url)")
            members.setdefault(name, []).append(url)
        return {name: tuple(urls) for name, urls in sorted(members.items())}

    def member_id(self) -> int:
        return member_id_for(self.initial_advertise_peer_urls, self.initial_cluster_token)

    def cluster_id(self) -> int:
        # From the cluster token alone (etcd: from the initial members' IDs), so
        # a member that joins later (--initial-cluster-state existing, with an
        # --initial-cluster that lists itself) computes the same cluster ID.
        digest = hashlib.sha1(b"quorumkv-cluster-id:" + self.initial_cluster_token.encode()).digest()
        return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1) or 1

    def zmq_url(self) -> tuple[str, int]:
        """(host, port) the first gateway binds for the ZeroMQ client protocol."""
        if self.listen_zmq_urls:
            return parse_url(self.listen_zmq_urls[0])
        host, port = parse_url(self.listen_client_urls[0])
        return host, port + ZMQ_PORT_OFFSET

    def validate(self) -> None:
        self.limits().validate()
        if self.heartbeat_interval_ms <= 0:
            raise ValueError("--heartbeat-interval must be positive")
        if self.election_timeout_ms < 5 * self.heartbeat_interval_ms:
            raise ValueError("--election-timeout must be at least 5 times --heartbeat-interval (as etcd)")
        if self.snapshot_count <= 0:
            raise ValueError("--snapshot-count must be positive")
        if self.quota_backend_bytes < 0 or self.quota_backend_bytes > DEFAULT_LIMITS.max_quota_backend_bytes:
            raise ValueError(f"--quota-backend-bytes must be between 0 and {DEFAULT_LIMITS.max_quota_backend_bytes}")
        if self.initial_cluster_state not in ("new", "existing"):
            raise ValueError("--initial-cluster-state must be 'new' or 'existing'")
        if self.auto_compaction_mode not in ("periodic", "revision"):
            raise ValueError("--auto-compaction-mode must be 'periodic' or 'revision'")
        AutoCompactor(self.auto_compaction_mode, self.auto_compaction_retention)
        if self.gateways < 0:
            raise ValueError("--gateways must not be negative")
        members = self.cluster_members()
        if self.initial_cluster and self.member_id() not in {
                member_id_for(urls, self.initial_cluster_token) for urls in members.values()}:
            raise ValueError("--initial-cluster must list this member's --initial-advertise-peer-urls "
                             f"(as {self.name}={','.join(self.initial_advertise_peer_urls)})")
        self.zmq_url()
        for url in self.listen_client_urls + self.listen_peer_urls + self.listen_client_http_urls:
            parse_url(url)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "NodeConfig":
        raw = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


# The membership a data dir was created with (see with_stored_cluster).
CLUSTER_FILE = "cluster.json"
_CLUSTER_FIELDS = ("initial_cluster", "initial_cluster_token", "initial_advertise_peer_urls", "initial_cluster_state")


def with_stored_cluster(config: NodeConfig, log=None) -> NodeConfig:
    """As etcd: once a data dir exists, the initial-cluster flags are ignored.

    The first start writes them to <data-dir>/cluster.json (atomically); every
    later start takes the member id, cluster id and members from there, so a
    member restarted with the same (or a different) command line rejoins as
    the same member of the same cluster. A data dir from before this file
    existed gets one from the current flags."""
    path = os.path.join(config.data_dir, CLUSTER_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            stored = json.load(handle)
    except FileNotFoundError:
        stored = None
    if stored is not None:
        # A file from before a field was kept: the flag's value for it.
        stored = {name: stored.get(name, getattr(config, name)) for name in _CLUSTER_FIELDS}
        fields = {name: tuple(stored[name]) if isinstance(stored[name], list) else stored[name]
                  for name in _CLUSTER_FIELDS}
        restored = dataclasses.replace(config, **fields)
        if log is not None and any(getattr(config, name) != fields[name] for name in _CLUSTER_FIELDS):
            log.warning("data dir exists: initial-cluster flags ignored, using the stored membership",
                        member_id=f"{restored.member_id():x}")
        return restored
    write_cluster_file(config)
    return config


def write_cluster_file(config: NodeConfig) -> None:
    os.makedirs(config.data_dir, exist_ok=True)
    path = os.path.join(config.data_dir, CLUSTER_FILE)
    record = {name: getattr(config, name) for name in _CLUSTER_FIELDS}
    record.update(member_id=f"{config.member_id():x}", cluster_id=f"{config.cluster_id():x}",
                  members={name: list(urls) for name, urls in config.cluster_members().items()})
    # Actors started together by supervisord may all write it at once (the same
    # record): each through a temporary file of its own.
    temporary = f"{path}.tmp.{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(config.data_dir, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def member_id_for(peer_urls: tuple[str, ...], token: str) -> int:
    # As etcd: a hash of the sorted peer URLs and the cluster token.
    digest = hashlib.sha1(("".join(sorted(peer_urls)) + token).encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1) or 1


def parse_url(url: str) -> tuple[str, int]:
    """`http://host:port`, `tcp://host:port` or `host:port` -> (host, port)."""
    if "://" not in url:
        url = "tcp://" + url
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https", "tcp", "unix", "unixs"):
        raise ValueError(f"unsupported URL scheme in {url!r}")
    if not parsed.hostname or parsed.port is None:
        raise ValueError(f"URL {url!r} must name a host and a port")
    return parsed.hostname, parsed.port


# flag name -> (NodeConfig field, parser)
def _urls(text: str) -> tuple[str, ...]:
    return tuple(u.strip() for u in text.split(",") if u.strip())


FLAGS: dict[str, tuple[str, object, str]] = {
    "name": ("name", str, "human-readable name for this member"),
    "data-dir": ("data_dir", str, "path to the data directory"),
    "listen-client-urls": ("listen_client_urls", _urls, "URLs to listen on for etcd gRPC client traffic"),
    "listen-client-http-urls": ("listen_client_http_urls", _urls,
                                "URLs to serve etcd's JSON gateway (/v3/... over HTTP) on (default: none)"),
    "advertise-client-urls": ("advertise_client_urls", _urls, "client URLs to advertise to the cluster"),
    "listen-peer-urls": ("listen_peer_urls", _urls, "URLs to listen on for peer traffic"),
    "initial-advertise-peer-urls": ("initial_advertise_peer_urls", _urls, "peer URLs to advertise"),
    "initial-cluster": ("initial_cluster", str, "initial cluster configuration, name=url,..."),
    "initial-cluster-state": ("initial_cluster_state", str, "'new' or 'existing'"),
    "initial-cluster-token": ("initial_cluster_token", str, "initial cluster token"),
    "listen-zmq-urls": ("listen_zmq_urls", _urls, "URL for the ZeroMQ client protocol (default: client port + 3)"),
    "heartbeat-interval": ("heartbeat_interval_ms", int, "time (ms) of a heartbeat interval"),
    "election-timeout": ("election_timeout_ms", int, "time (ms) for an election to timeout"),
    "snapshot-count": ("snapshot_count", int, "number of committed entries that trigger a snapshot"),
    "experimental-snapshot-catchup-entries": ("snapshot_catchup_entries", int,
                                              "entries kept after a snapshot for slow followers to catch up"),
    "quota-backend-bytes": ("quota_backend_bytes", int, "raise an alarm when the backend size exceeds this"),
    "max-request-bytes": ("max_request_bytes", int, "maximum client request size in bytes"),
    "max-txn-ops": ("max_txn_ops", int, "maximum number of operations in a txn"),
    "auto-compaction-mode": ("auto_compaction_mode", str, "'periodic' or 'revision'"),
    "auto-compaction-retention": ("auto_compaction_retention", str,
                                  "auto compaction retention: hours or a duration (periodic), revisions (revision); 0 disables"),
    "gateways": ("gateways", int, "number of gateway processes (default: number of cores)"),
    "watch-progress-notify-interval": ("watch_progress_notify_interval_ms", lambda text: parse_duration_ms(text),
                                       "duration of periodic watch progress notifications (Go duration, default 10m)"),
    "experimental-watch-progress-notify-interval": ("watch_progress_notify_interval_ms",
                                                    lambda text: parse_duration_ms(text),
                                                    "etcd 3.4's name of --watch-progress-notify-interval"),
    "log-level": ("log_level", str, "debug, info, warn or error"),
}


_GO_DURATION_UNITS_MS = {"ns": 1e-6, "us": 1e-3, "\u00b5s": 1e-3, "ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}


def parse_duration_ms(text: object) -> int:
    """A Go duration ("100ms", "10s", "1m30s") in whole milliseconds (at least 1)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    spec = str(text).strip()
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|\u00b5s|ms|s|m|h)", spec)
    if not spec or "".join(number + unit for number, unit in parts) != spec:
        raise ValueError(f"invalid duration {text!r} (want a Go duration like 100ms, 10s, 10m)")
    total = sum(float(number) * _GO_DURATION_UNITS_MS[unit] for number, unit in parts)
    if total <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    return max(1, int(total))


def _env_value(flag: str, environ: dict[str, str]) -> str | None:
    suffix = flag.upper().replace("-", "_")
    for prefix in ("QUORUMKV_", "ETCD_"):
        if prefix + suffix in environ:
            return environ[prefix + suffix]
    return None


def _load_config_file(path: str) -> dict[str, object]:
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError:
        raw = _parse_simple_yaml(text)
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path}: expected a mapping")
    return raw


def _parse_simple_yaml(text: str) -> dict[str, object]:
    # etcd's config files are flat `key: value` YAML; that subset is all we read.
    out: dict[str, object] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split(" #", 1)[0].rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"config file line {number}: expected 'key: value'")
        value = value.strip().strip("'\"")
        out[key.strip()] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quorumkv", description="quorumkv server (accepts etcd's flags)")
    parser.add_argument("--config-file", help="path to a YAML or JSON config file (replaces flags and env)")
    for flag, (_field, _kind, help_text) in FLAGS.items():
        parser.add_argument(f"--{flag}", dest=flag.replace("-", "_"), help=help_text)
    return parser


def parse(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> NodeConfig:
    environ = dict(os.environ) if environ is None else environ
    args = build_parser().parse_args(argv)
    values: dict[str, object] = {}
    if args.config_file:
        raw = _load_config_file(args.config_file)
        for key, value in raw.items():
            flag = key.replace("_", "-")
            if flag not in FLAGS:
                raise ValueError(f"config file: unknown setting {key!r}")
            values[flag] = value
    else:
        for flag in FLAGS:
            given = getattr(args, flag.replace("-", "_"))
            if given is None:
                given = _env_value(flag, environ)
            if given is not None:
                values[flag] = given
    fields: dict[str, object] = {}
    for flag, value in values.items():
        field, kind, _help = FLAGS[flag]
        if kind is _urls and isinstance(value, list):
            value = ",".join(value)
        try:
            fields[field] = kind(value) if not (kind is int and isinstance(value, int)) else value
        except ValueError:
            raise ValueError(f"--{flag}: invalid value {value!r}") from None
    # As etcd: advertised URLs default to what is listened on when only that is given.
    if "listen_client_urls" in fields and "advertise_client_urls" not in fields:
        fields["advertise_client_urls"] = fields["listen_client_urls"]
    if "listen_peer_urls" in fields and "initial_advertise_peer_urls" not in fields:
        fields["initial_advertise_peer_urls"] = fields["listen_peer_urls"]
    config = NodeConfig(**fields)
    config.validate()
    return config
