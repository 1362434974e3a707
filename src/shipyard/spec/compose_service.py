"""One compose service into a stack-file service (see `spec/compose.py` for what maps
where)."""

from __future__ import annotations

import re
import shlex
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from shipyard.spec.base import NAME_RE
from shipyard.spec.compose_keys import DROP_REASONS, SHELL_SAFE_RE
from shipyard.spec.yamldoc import Path


@dataclass(frozen=True)
class ComposeNote:
    """A compose key not carried over (`dropped`), or carried over with a change of meaning."""

    service: str | None  # None: a top-level key
    key: str  # dotted, relative to the service (or the document)
    message: str
    dropped: bool = True

    def render(self) -> str:
        where = f"service {self.service}: {self.key}" if self.service else self.key
        return f"{'dropped' if self.dropped else 'note'}: {where}: {self.message}"


@dataclass
class Conversion:
    data: dict[str, Any]
    notes: list[ComposeNote] = field(default_factory=list)
    # where each converted path came from, for located errors (unchanged paths omitted)
    origins: dict[Path, Path] = field(default_factory=dict)


_CONDITIONS = {
    "service_started": "started",
    "service_healthy": "healthy",
    "service_completed_successfully": "completed",
}


class ServiceConverter:
    """Converts one compose service into a stack-file service."""

    def __init__(self, name: str, where: Path, out: Conversion, fields: Collection[str],
                 project: str, names: dict[str, str], kept: set[str]) -> None:
        self.name = name
        self.where = where
        self.out = out
        self.fields = fields
        self.project = project
        self.names = names
        self.kept = kept
        self.data: dict[str, Any] = {}
        # (port name, host port, container port, index in ports) of each published port
        self.published: list[tuple[str, int | str, int | str, int]] = []

    def note(self, key: str, message: str, dropped: bool = True) -> None:
        self.out.notes.append(ComposeNote(self.name, key, message, dropped))

    def drop(self, key: str, why: str | None = None) -> None:
        self.note(key, why or DROP_REASONS.get(key.split(".")[-1], "not supported"))

    def put(self, target: str | tuple[str, ...], value: Any, source: str | tuple[str | int, ...]
            ) -> None:
        """Set `target` (a dotted path in the shipyard service) from compose `source`."""
        path = (target,) if isinstance(target, str) else target
        node = self.data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
        src = (source,) if isinstance(source, str) else source
        self.out.origins[("services", self.name, *path)] = (*self.where, *src)

    def container_field(self, key: str, value: Any, source: str) -> None:
        if key in self.fields:
            self.put(key, value, source)
        else:
            self.drop(source, f"this version's stack model has no `{key}` field")

    def convert(self, raw: dict[str, Any]) -> dict[str, Any]:
        handlers = {
            "image": lambda v: self.put("image", v, "image"),
            "command": lambda v: v is not None and self.put("command", v, "command"),
            "entrypoint": lambda v: v is not None and self.container_field("entrypoint", v,
                                                                           "entrypoint"),
            "pull_policy": lambda v: self.container_field("pull_policy", v, "pull_policy"),
            "pids_limit": lambda v: self.container_field("pids_limit", v, "pids_limit"),
            "build": self.build,
            "environment": self.environment,
            "env_file": self.env_file,
            "ports": self.ports,
            "expose": self.expose,
            "depends_on": self.depends_on,
            "healthcheck": self.healthcheck,
            "restart": lambda v: self.restart(v, "restart"),
            "deploy": self.deploy,
            "scale": lambda v: "replicas" not in self.data and self.put("replicas", v, "scale"),
            "mem_limit": lambda v: self.put(("resources", "memory"), _size(v), "mem_limit"),
            "cpus": lambda v: self.put(("resources", "cpu"), v, "cpus"),
            "stop_signal": lambda v: self.put(("stop", "signal"), v, "stop_signal"),
            "stop_grace_period": lambda v: self.put(("stop", "timeout"), v, "stop_grace_period"),
            "volumes": self.volumes,
            "network_mode": self.network_mode,
            "profiles": lambda v: None,
        }
        # deploy first: `scale` and the legacy limits yield to it, as in compose
        for key in sorted(raw, key=lambda k: k != "deploy"):
            value = raw[key]
            if str(key).startswith("x-"):
                continue
            handler = handlers.get(str(key))
            if handler is None:
                self.drop(str(key))
            else:
                handler(value)
        if "build" in raw and "image" not in raw:
            self.put("image", f"localhost/{self.project}-{self.name}:latest", "build")
        replicas = self.data.get("replicas", 1)
        if isinstance(replicas, int) and replicas > 1:
            self._share_ports()
        self._expose(replicated=isinstance(replicas, int) and replicas > 1)
        self._shorthands()
        return self.data

    def _shorthands(self) -> None:
        """`restart: always` and `db: healthy` where nothing else is set: as one writes."""
        restart = self.data.get("restart")
        if isinstance(restart, dict) and list(restart) == ["policy"]:
            self.data["restart"] = restart["policy"]
        deps = self.data.get("depends_on")
        if isinstance(deps, dict):
            for dep, entry in deps.items():
                if isinstance(entry, dict) and list(entry) == ["condition"]:
                    deps[dep] = entry["condition"]

    # -- keys ---------------------------------------------------------------------------
    def build(self, value: Any) -> None:
        if isinstance(value, dict):
            known = {"context", "dockerfile", "args", "target", "labels"}
            for key in value:
                if key not in known:
                    self.drop(f"build.{key}", "build option not supported")
            value = {k: v for k, v in value.items() if k in known}
        self.container_field("build", value, "build")

    def environment(self, value: Any) -> None:
        listed = isinstance(value, list)
        if isinstance(value, list):
            pairs = [[*str(item).split("=", 1), None][:2] for item in value]
            value = dict(pairs)
        if not isinstance(value, dict):
            self.put("env", value, "environment")
            return
        env: dict[str, Any] = {}
        for index, (key, item) in enumerate(value.items()):
            # `- KEY` alone: the host's value, if it has one (expanded per instance)
            env[str(key)] = "${" + str(key) + ":-}" if item is None else item
            self.out.origins[("services", self.name, "env", str(key))] = (
                *self.where, "environment", index if listed else key)
        self.put("env", env, "environment")

    def env_file(self, value: Any) -> None:
        items = value if isinstance(value, list) else [value]
        files: list[Any] = []
        for i, item in enumerate(items):
            if isinstance(item, dict):
                if item.get("required") is False:
                    self.note(f"env_file.{i}.required",
                              "required: false is not supported: the file must exist", False)
                if "format" in item:
                    self.drop(f"env_file.{i}.format", "env files are read as dotenv")
                item = item.get("path")
            files.append(item)
        self.put("env_file", files, "env_file")

    def ports(self, value: Any) -> None:
        if not isinstance(value, list):
            self.put("ports", value, "ports")  # the model explains
            return
        for i, item in enumerate(value):
            try:
                mappings, name, note = _parse_port(item)
            except ValueError as exc:
                self.drop(f"ports.{i}", str(exc))
                continue
            if note:
                self.note(f"ports.{i}", note, False)
            for host, container in mappings:
                port_name = name or f"p{container}"
                self.put(("ports", port_name), container, ("ports", i))
                if host is not None:
                    self.published.append((port_name, host, container, i))

    def expose(self, value: Any) -> None:
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            text = str(item).split("/")[0]
            if not text.isdigit():
                self.drop(f"expose.{i}", f"expected a port number, got {item!r}")
                continue
            self.data.setdefault("ports", {})
            if int(text) not in self.data["ports"].values():
                self.put(("ports", f"p{text}"), int(text), ("expose", i))

    def depends_on(self, value: Any) -> None:
        deps: dict[str, Any] = {}
        items = value.items() if isinstance(value, dict) else ((d, None) for d in value or [])
        for raw_dep, spec in items:
            dep = self.names.get(str(raw_dep), service_name(str(raw_dep)))
            if dep not in self.kept and str(raw_dep) in self.names:
                self.drop(f"depends_on.{raw_dep}", "that service is left out (profiles)")
                continue
            entry: dict[str, Any] = {"condition": "started"}
            if isinstance(spec, dict):
                condition = str(spec.get("condition", "service_started"))
                entry["condition"] = _CONDITIONS.get(condition, condition)
                if spec.get("restart") is True:
                    entry["on_lost"] = "restart"
                if spec.get("required") is False:
                    self.note(f"depends_on.{raw_dep}.required",
                              "required: false is not supported: the dependency must exist",
                              False)
            deps[dep] = entry
            self.out.origins[("services", self.name, "depends_on", dep)] = (
                *self.where, "depends_on", raw_dep if isinstance(value, dict) else
                list(value).index(raw_dep))
        self.put("depends_on", deps, "depends_on")

    def healthcheck(self, value: Any) -> None:
        if not isinstance(value, dict) or value.get("disable") is True:
            return
        test = value.get("test")
        if test is None or test == ["NONE"] or test == "NONE":
            return
        probe: dict[str, Any] = {}
        if isinstance(test, list) and test and test[0] == "CMD":
            probe["exec"] = [str(t) for t in test[1:]]
        elif isinstance(test, list) and test and test[0] == "CMD-SHELL":
            probe["exec"] = self._shell(" ".join(str(t) for t in test[1:]))
        elif isinstance(test, str):
            probe["exec"] = self._shell(test)
        else:
            self.drop("healthcheck.test", f"expected CMD, CMD-SHELL or a string, got {test!r}")
            return
        renames = {"interval": "interval", "timeout": "timeout", "retries": "failure_threshold",
                   "start_period": "initial_delay"}
        for key, item in value.items():
            if key in renames:
                probe[renames[key]] = item
            elif key not in ("test", "disable"):
                self.drop(f"healthcheck.{key}", "no such probe setting")
        self.put(("health", "readiness"), probe, "healthcheck")
        here = ("services", self.name, "health", "readiness")
        self.out.origins[(*here, "exec")] = (*self.where, "healthcheck", "test")
        for key in value:
            if key in renames:
                self.out.origins[(*here, renames[key])] = (*self.where, "healthcheck", key)

    def _shell(self, command: str) -> list[str]:
        """A CMD-SHELL test as argv: split when no shell feature is needed, else sh -c."""
        if SHELL_SAFE_RE.fullmatch(command):
            try:
                argv = shlex.split(command)
            except ValueError:
                argv = []
            if argv:
                return argv
        self.note("healthcheck.test", f"runs through a shell: [sh, -c, {command!r}] (it "
                  "uses shell syntax; the image needs /bin/sh)", False)
        return ["sh", "-c", command]

    def restart(self, value: Any, source: str) -> None:
        text = "no" if value is False else str(value)
        policy, _, count = text.partition(":")
        mapped = {"no": "no", "always": "always", "unless-stopped": "always",
                  "on-failure": "on-failure", "none": "no", "any": "always"}.get(policy)
        if mapped is None:
            self.drop(source, f"unknown restart policy {value!r}")
            return
        restart: dict[str, Any] = {"policy": mapped}
        if count.strip().isdigit():
            restart["max_restarts"] = int(count)
        self.put("restart", restart, source)

    def deploy(self, value: Any) -> None:
        if not isinstance(value, dict):
            self.drop("deploy", f"expected a mapping, got {value!r}")
            return
        for key, item in value.items():
            if key == "replicas":
                self.put("replicas", item, ("deploy", "replicas"))
            elif key == "resources" and isinstance(item, dict):
                self._resources(item)
            elif key == "restart_policy" and isinstance(item, dict):
                self._restart_policy(item)
            elif key == "mode" and item == "replicated":
                continue
            else:
                self.drop(f"deploy.{key}")

    def _resources(self, value: dict[str, Any]) -> None:
        for kind, spec in value.items():
            if not isinstance(spec, dict):
                self.drop(f"deploy.resources.{kind}", "expected a mapping")
                continue
            for key, item in spec.items():
                at = ("deploy", "resources", kind, key)
                if kind == "limits" and key == "cpus":
                    self.put(("resources", "cpu"), item, at)
                elif kind == "limits" and key == "memory":
                    self.put(("resources", "memory"), _size(item), at)
                elif kind == "limits" and key == "pids":
                    self.container_field("pids_limit", item, ".".join(at[1:]))
                elif kind == "reservations" and key == "devices" and isinstance(item, list):
                    self._gpus(item)
                else:
                    self.drop(".".join(at), "only limits (cpus, memory, pids) and GPU "
                              "reservations are enforced")

    def _gpus(self, devices: list[Any]) -> None:
        for i, device in enumerate(devices):
            caps = device.get("capabilities", []) if isinstance(device, dict) else []
            if "gpu" not in caps:
                self.drop(f"deploy.resources.reservations.devices.{i}", "only GPUs")
                continue
            count = device.get("count", len(device.get("device_ids", [])) or "all")
            if isinstance(count, int):
                self.put(("resources", "gpu"), count,
                         ("deploy", "resources", "reservations", "devices", i))
            else:
                self.drop(f"deploy.resources.reservations.devices.{i}.count",
                          f"count {count!r}: give a number of GPUs")

    def _restart_policy(self, value: dict[str, Any]) -> None:
        self.restart(value.get("condition", "any"), "deploy.restart_policy")
        if "restart" not in self.data:
            return
        at = ("deploy", "restart_policy")
        for key, item in value.items():
            if key == "max_attempts":
                self.put(("restart", "max_restarts"), item, (*at, key))
            elif key == "delay":
                self.put(("restart", "initial"), item, (*at, key))
                self.put(("restart", "backoff"), "fixed", (*at, key))
            elif key == "window":
                self.put(("restart", "min_uptime"), item, (*at, key))
            elif key != "condition":
                self.drop(f"deploy.restart_policy.{key}")

    def volumes(self, value: Any) -> None:
        if not isinstance(value, list):
            self.container_field("volumes", value, "volumes")
            return
        mounts: list[Any] = []
        for i, item in enumerate(value):
            if isinstance(item, dict):
                known = {"type", "source", "target", "read_only"}
                for key in item:
                    if key not in known:
                        self.drop(f"volumes.{i}.{key}", "volume option not supported")
                if item.get("type", "volume") not in ("bind", "volume", "tmpfs"):
                    self.drop(f"volumes.{i}", f"volume type {item.get('type')!r}")
                    continue
                item = {k: v for k, v in item.items() if k in known}
            mounts.append(item)
        self.container_field("volumes", mounts, "volumes")

    def network_mode(self, value: Any) -> None:
        if value != "host":
            self.drop("network_mode", f"{value!r}: services share the host's network")

    def _expose(self, replicated: bool) -> None:
        """A published host port other than the one the service listens on (or any, for
        replicas on ports of their own) becomes the service's stable address."""
        for port_name, host, container, i in self.published:
            if host == container and not replicated:
                continue
            if "expose" not in self.data:
                self.put("expose", host, ("ports", i))
            elif self.data["expose"] != host:
                self.drop(f"ports.{i}", f"host port {host}: a service has one stable address "
                          f"(expose: {self.data['expose']}); {port_name} listens on "
                          f"{self.data['ports'].get(port_name)}")

    def _share_ports(self) -> None:
        """Replicas cannot share a fixed port on the host's network: each gets its own."""
        ports = self.data.get("ports")
        if not isinstance(ports, dict):
            return
        for port_name, number in list(ports.items()):
            if isinstance(number, int):
                ports[port_name] = "auto"
                self.note(f"ports.{port_name}", f"replicas share the host's network: port "
                          f"{number} became auto; the service must listen on $PORT", False)


def _size(value: Any) -> Any:
    """compose sizes (`512m`, `1g`, `1gb`) are binary; ours are decimal without an `i`."""
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt])b?\s*", value, re.IGNORECASE)
        if match:
            return f"{match.group(1)}{match.group(2).upper()}i"
    return value


def _parse_port(
    item: Any,
) -> tuple[list[tuple[int | str | None, int | str]], str | None, str | None]:
    """A compose port as (host or None, container) pairs, its name, and a note."""
    if isinstance(item, int) and not isinstance(item, bool):
        return [(None, item)], None, None
    if isinstance(item, dict):
        target = item.get("target")
        if not isinstance(target, int):
            raise ValueError(f"a long-syntax port needs a numeric target, got {target!r}")
        published = item.get("published")
        host = int(published) if str(published).isdigit() else None
        name = item.get("name")
        name = name if isinstance(name, str) and NAME_RE.match(name) else None
        proto = item.get("protocol", "tcp")
        note = f"protocol {proto}: ports carry no protocol here" if proto != "tcp" else None
        return [(host, target)], name, note
    # a `${VAR}` (even `${VAR:-8080}`) stands for one number: hide its colons while splitting
    variables: list[str] = []

    def hide(match: re.Match[str]) -> str:
        variables.append(match.group(0))
        return f"\0{len(variables) - 1}\0"

    text, _, proto = re.sub(r"\$\{[^}]*\}", hide, str(item)).partition("/")
    ip = ""
    if text.startswith("["):  # [::1]:8080:80
        ip, _, text = text[1:].partition("]")
        text = text.removeprefix(":")
    parts = text.split(":")
    if len(parts) == 3 and not ip:
        ip = parts.pop(0)
    token = r"\d+(-\d+)?|\0\d+\0"
    if len(parts) > 2 or not all(re.fullmatch(token, p) for p in parts if p) or not parts[-1]:
        raise ValueError(f"cannot read port {item!r} (expected [HOST:]CONTAINER[/PROTOCOL])")
    notes = []
    if ip not in ("", "127.0.0.1", "0.0.0.0", "::", "::1", "localhost"):
        notes.append(f"host address {ip} not kept: the service binds where it listens")
    if (proto or "tcp") != "tcp":
        notes.append(f"protocol {proto}: ports carry no protocol here")
    containers = _range(parts[-1], variables)
    hosts: list[int | str | None] = (
        list(_range(parts[0], variables)) if len(parts) == 2 and parts[0]
        else [None] * len(containers)
    )
    if len(hosts) != len(containers):
        raise ValueError(f"port range {item!r}: host and container ranges differ in size")
    name = None
    if len(containers) == 1 and isinstance(containers[0], str):  # p${PORT} is no name
        match = re.match(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", containers[0])
        name = service_name(match.group(1)) if match else None
    return list(zip(hosts, containers, strict=True)), name, "; ".join(notes) or None


def _range(text: str, variables: list[str]) -> list[int | str]:
    if text.startswith("\0"):
        return [variables[int(text.strip("\0"))]]
    low, _, high = text.partition("-")
    return list(range(int(low), int(high or low) + 1))


def service_name(text: str) -> str:
    """A valid stack or service name for a compose one: lowercase; `.` and others → `-`."""
    name = re.sub(r"[^a-z0-9_-]", "-", text.lower()).strip("-_")[:63].strip("-_")
    return name or "compose"
