"""`quorumkv`: start a node (the supervisor and its actors), or one actor with --role.

With no flags it serves on etcd's defaults with its data in ./default.qkv;
see actors/config.py for the flags, config file and environment variables.
`--role raft_log|applier|gateway|watch_broadcaster [--index I]` runs a single actor in the
foreground, which is how the supervisor, supervisord and systemd start them.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import sys

from actors import config as node_config
from actors import ipc, logs
from actors.loop import die_with_parent
from actors.supervisor import CONFIG_ENV, Supervisor

# gc.set_threshold for the actors: allocations between young collections, and
# how many of each generation's collections trigger the next one.
GC_THRESHOLDS = (50_000, 20, 100)

ROLES = {
    "raft_log": "actors.raft_log",
    "applier": "actors.applier",
    "gateway": "actors.gateway",
    "watch_broadcaster": "actors.watch_broadcaster",
}


def prepare_data_dir(config: node_config.NodeConfig) -> None:
    """Create the data dir and an empty store so every actor finds one."""
    from actors.applier import open_writer

    os.makedirs(config.data_dir, exist_ok=True)
    os.makedirs(ipc.run_dir(config.data_dir), exist_ok=True)
    open_writer(config).close()


def run_role(config: node_config.NodeConfig, role: str, index: int) -> int:
    name = f"{role}-{index}" if role == "gateway" else role
    log = logs.configure(config.name, name, config.log_level)
    if os.environ.get(CONFIG_ENV):
        die_with_parent()
    else:
        # Started by supervisord or systemd, not our supervisor: whichever
        # actor comes first makes the data dir for the others.
        config = node_config.with_stored_cluster(config, log)
        if not os.path.exists(os.path.join(config.data_dir, "store", "CURRENT")):
            prepare_data_dir(config)
    module = importlib.import_module(ROLES[role])
    # What is loaded by now (modules, protobuf descriptors) lives as long as
    # the process: out of the collector's sight, and collections rarer. An
    # actor allocates a few dicts and lists per request, nearly all freed by
    # reference counting; the default thresholds ran a collection every few
    # requests (3% of a gRPC put's CPU, measured).
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    module.run(config, index, log)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    role_parser = argparse.ArgumentParser(add_help=False)
    role_parser.add_argument("--role", choices=sorted(ROLES))
    role_parser.add_argument("--index", type=int, default=0)
    role_args, rest = role_parser.parse_known_args(argv)
    try:
        if role_args.role and os.environ.get(CONFIG_ENV):
            config = node_config.NodeConfig.from_json(os.environ[CONFIG_ENV])
        else:
            config = node_config.parse(rest)
    except ValueError as error:
        print(f"quorumkv: {error}", file=sys.stderr)
        return 2
    if role_args.role:
        return run_role(config, role_args.role, role_args.index)
    log = logs.configure(config.name, "supervisor", config.log_level)
    os.makedirs(config.data_dir, exist_ok=True)
    config = node_config.with_stored_cluster(config, log)
    if os.path.exists(os.path.join(config.data_dir, "removed")):
        log.error("the member has been permanently removed from the cluster; not starting "
                  "(start a new member with an empty data dir)", data_dir=os.path.abspath(config.data_dir))
        return 1
    prepare_data_dir(config)
    host, port = config.zmq_url()
    log.info("starting node", data_dir=os.path.abspath(config.data_dir), zmq=f"tcp://{host}:{port}",
             gateways=config.gateway_count(), member_id=f"{config.member_id():x}",
             cluster_id=f"{config.cluster_id():x}", members=len(config.cluster_members()),
             initial_cluster_state=config.initial_cluster_state)
    return Supervisor(config, log).run()


if __name__ == "__main__":
    sys.exit(main())
