"""The vocabulary of compose files: which keys exist, and why the ones Shipyard does not
carry over are dropped."""

from __future__ import annotations

import re

# docker-compose.yml, compose.yaml, docker-compose.override.yml, compose.prod.yaml, ...
COMPOSE_FILE_RE = re.compile(r"(docker-)?compose(\.[A-Za-z0-9_-]+)?\.ya?ml")

TOP_KEYS = {"version", "name", "services", "networks", "volumes", "secrets", "configs",
            "include"}
# `secrets` is a stack-file key too: only compose's own secret sources are evidence
COMPOSE_ONLY_TOP = TOP_KEYS - {"name", "services", "secrets"}
STACK_SECRET_SOURCES = {"env", "file", "stored"}

SERVICE_KEYS = {
    "annotations", "attach", "blkio_config", "build", "cap_add", "cap_drop", "cgroup",
    "cgroup_parent", "command", "configs", "container_name", "cpu_count", "cpu_percent",
    "cpu_period", "cpu_quota", "cpu_rt_period", "cpu_rt_runtime", "cpu_shares", "cpus",
    "cpuset", "credential_spec", "depends_on", "deploy", "develop", "device_cgroup_rules",
    "devices", "dns", "dns_opt", "dns_search", "domainname", "entrypoint", "env_file",
    "environment", "expose", "extends", "external_links", "extra_hosts", "group_add",
    "healthcheck", "hostname", "image", "init", "ipc", "isolation", "labels", "links",
    "logging", "mac_address", "mem_limit", "mem_reservation", "mem_swappiness",
    "memswap_limit", "network_mode", "networks", "oom_kill_disable", "oom_score_adj", "pid",
    "pids_limit", "platform", "ports", "privileged", "profiles", "pull_policy", "read_only",
    "restart", "runtime", "scale", "secrets", "security_opt", "shm_size", "stdin_open",
    "stop_grace_period", "stop_signal", "storage_opt", "sysctls", "tmpfs", "tty", "ulimits",
    "user", "userns_mode", "uts", "volumes", "volumes_from", "working_dir",
}

# A CMD-SHELL health test made only of words, quotes and these characters needs no shell.
SHELL_SAFE_RE = re.compile(r"""[A-Za-z0-9_\-+=.,:/@%^\s'"]*""")

_NETWORK = "services share the host's network (reach a dependency at 127.0.0.1 or <DEP>_URL)"
DROP_REASONS: dict[str, str] = {
    "networks": _NETWORK,
    "links": _NETWORK,
    "external_links": _NETWORK,
    "hostname": _NETWORK,
    "domainname": _NETWORK,
    "dns": _NETWORK,
    "dns_search": _NETWORK,
    "dns_opt": _NETWORK,
    "extra_hosts": _NETWORK,
    "mac_address": _NETWORK,
    "container_name": "containers are named shipyard-<stack>-<instance>",
    "labels": "containers carry Shipyard's own labels only",
    "logging": "output goes to the instance log (shipyard logs SERVICE)",
    "secrets": "secrets are not supported: pass them with env or env_file",
    "configs": "configs are not supported: mount a file with volumes",
    "volume": "volume driver options are not supported: volumes are folders under "
              "$SHIPYARD_HOME/volumes",
    "include": "included files are not read: merge them into this file",
    "extends": "extends is not followed: merge the base service into this one",
    "working_dir": "the image's WORKDIR is used",
    "user": "the image's USER is used",
    "mem_reservation": "only limits are enforced (deploy.resources.limits)",
    "memswap_limit": "only the memory limit is enforced",
    "cpu_shares": "only a CPU limit is enforced (cpus)",
    "cpu_quota": "only a CPU limit is enforced (cpus)",
    "cpu_period": "only a CPU limit is enforced (cpus)",
    "cpuset": "CPU sets are not supported",
    "placement": "a single host: no placement",
    "update_config": "rollouts are set with the service's update: block",
    "rollback_config": "rollouts are set with the service's update: block",
    "endpoint_mode": _NETWORK,
    "mode": "only replicated services",
    "restart_policy": "expected a mapping",
    "resources": "expected a mapping",
    "develop": "compose watch is not supported",
    "tty": "instances run without a terminal",
    "stdin_open": "instances run without stdin",
    "volumes_from": "name the volumes in this service instead",
    "tmpfs": "use a volume of type tmpfs",
}
