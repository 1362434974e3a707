"""The stack model: what a `shipyard.yaml` says, validated and normalised.

Units are parsed here (CPU in cores, sizes in bytes, durations in seconds), so every layer
after this one works with plain numbers. Unknown keys are refused (`extra="forbid"`); the
loader turns pydantic's errors into located, "did you mean" messages.
"""

from __future__ import annotations

import re
import shlex
import signal
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    field_validator,
    model_validator,
)

from shipyard.spec.autoscale import AutoscalePolicy
from shipyard.spec.base import MAX_REPLICAS, NAME_RE, Cpu, Duration, Model, Size
from shipyard.spec.container import Build, Entrypoint, Mount, PullPolicy
from shipyard.spec.placement import PlacementPolicy
from shipyard.spec.secrets import SecretSource, SecretUse, User
from shipyard.spec.update import UpdatePolicy

__all__ = ["NAME_RE", "AutoscalePolicy", "Cpu", "Duration", "Model", "PlacementPolicy", "Size",
           "UpdatePolicy"]


class Condition(StrEnum):
    """What a dependent waits for."""

    STARTED = "started"  # the process is running
    HEALTHY = "healthy"  # every replica passes readiness (or runs, if it has no probe)
    COMPLETED = "completed"  # a run-to-completion service exited 0


class Strategy(StrEnum):
    SEQUENTIAL = "sequential"
    PARALLEL = "parallel"
    HYBRID = "hybrid"


class RestartMode(StrEnum):
    NO = "no"
    ON_FAILURE = "on-failure"
    ALWAYS = "always"


class Dependency(Model):
    """One `depends_on` edge: what the dependent waits for.

    `min_healthy`: how many of the dependency's replicas must be ready for a `healthy`
    wait (default: all of them). `on_lost`: what the dependent does when the dependency,
    after the first start, stops being healthy: nothing (`ignore`), freeze until it is
    back (`pause`), restart once it is back (`restart`), or stop until it is back (`stop`).
    """

    condition: Condition = Condition.HEALTHY
    min_healthy: int | None = Field(None, ge=1)
    on_lost: Literal["ignore", "pause", "restart", "stop"] = "ignore"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        # `db: healthy` is short for `db: {condition: healthy}`
        return {"condition": value} if isinstance(value, str | Condition) else value


class Probe(Model):
    """A readiness or liveness check. Exactly one of http, tcp, exec."""

    http: str | None = None  # path, e.g. /ready
    tcp: str | int | None = None  # a port name of the service or a port number
    exec: list[str] | None = None  # argv, exit 0 = success
    port: str | int | None = None  # for http: port name or number (default: first port)
    host: str = "127.0.0.1"
    scheme: Literal["http", "https"] = "http"
    # more than 0: an interval of 0 probes back to back, a timeout of 0 fails every probe
    interval: Duration = Field(2.0, gt=0)
    timeout: Duration = Field(1.0, gt=0)
    failure_threshold: int = Field(3, ge=1)
    success_threshold: int = Field(1, ge=1)
    initial_delay: Duration = 0.0

    @field_validator("exec", mode="before")
    @classmethod
    def _split_exec(cls, value: Any) -> Any:
        return _split(value) if isinstance(value, str) else _argv_items(value)

    @field_validator("tcp", "port", mode="before")
    @classmethod
    def _port_number(cls, value: Any) -> Any:
        # `port: ${DB_PORT}` arrives as the string "5432" after interpolation
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return _port_range(value)
        return value

    @field_validator("http")
    @classmethod
    def _http_path(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError(f"http probe path must start with '/', got {value!r}")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> Probe:
        kinds = [k for k in ("http", "tcp", "exec") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                "a probe needs exactly one of http, tcp, exec"
                + (f" (got {', '.join(kinds)})" if kinds else "")
            )
        if self.exec is not None and not self.exec:
            raise ValueError("exec probe needs a command")
        return self

    @property
    def kind(self) -> str:
        return "http" if self.http is not None else "tcp" if self.tcp is not None else "exec"


class Health(Model):
    readiness: Probe | None = None
    liveness: Probe | None = None


class Resources(Model):
    """Requests of one instance; docs/resources.md says what is enforced where."""

    cpu: Cpu = 0.0
    memory: Size = 0
    disk: Size = 0
    gpu: int = Field(0, ge=0)
    # None: not pinned; "auto": whole cores of one NUMA node, sized from `cpu`; or an
    # explicit CPU list like "0-3,6" (checked against the host's online CPUs at deploy).
    cpuset: str | None = Field(None, json_schema_extra={"anyOf": [
        {"type": "string",
         "pattern": r"^\s*(auto|\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*)\s*$"},
        {"type": "integer", "minimum": 0}, {"type": "null"}]})
    gpu_shared: bool = False  # the GPUs may also be given to other gpu_shared instances
    swap: Size | None = None  # swap beyond `memory`; 0: none; unset: unlimited
    disk_action: Literal["warn", "stop"] = "warn"  # when `disk` is exceeded

    @field_validator("cpuset", mode="before")
    @classmethod
    def _cpuset(cls, value: Any) -> Any:
        from shipyard.resources.topology import format_cpulist, parse_cpulist

        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            value = str(value)
        if not isinstance(value, str):
            raise ValueError(f"cpuset must be auto or a CPU list like 0-3,6, not {value!r}")
        if value.strip() == "auto":
            return "auto"
        try:
            cpus = parse_cpulist(value)
        except ValueError as exc:
            raise ValueError(f"{exc}, or auto") from None
        if not cpus:
            raise ValueError("cpuset names no CPU: give a list like 0-3,6, or auto")
        return format_cpulist(cpus)

    @model_validator(mode="after")
    def _swap_needs_memory(self) -> Resources:
        if self.swap is not None and self.memory <= 0:
            raise ValueError("resources.swap limits swap beyond resources.memory: "
                             "set memory too")
        return self


class RestartPolicy(Model):
    policy: RestartMode = RestartMode.ON_FAILURE
    # the retry shapes of reliability/retry.py: fixed, linear (initial * (1 + n)),
    # exponential (initial * 2**n), exponential_jitter (uniform(0, initial * 2**n): "full
    # jitter", so that instances crashing together do not restart together)
    backoff: Literal["exponential", "fixed", "linear", "exponential_jitter"] = "exponential"
    initial: Duration = 1.0
    max: Duration = 60.0
    max_restarts: int | None = Field(10, ge=0)  # None = unlimited
    jitter: float = Field(0.2, ge=0, le=1)  # fraction of the delay drawn at random
    # A run that stayed up this long was a good one: its exit starts backoff and
    # max_restarts over, and is not a failure for the circuit breaker.
    min_uptime: Duration = 10.0
    # After giving up (max_restarts, or an open circuit), try again every `max` anyway:
    # a restart policy never gives up silently, nor for good, unless told to.
    keep_trying: bool = True

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        # `restart: always` is short for `restart: {policy: always}`
        if isinstance(value, str) or value is False:
            return {"policy": "no" if value is False else value}
        return value

    @field_validator("policy", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `no` as false
        return "no" if value is False else value


class CircuitBreakerSpec(Model):
    """When a crash-looping service stops being restarted: its circuit opens after
    `consecutive_failures` crashes in a row, or when `failure_rate` of the last `window`
    runs (at least `minimum_calls`) failed; after `recovery_timeout` one trial run may
    start; reaching ready closes the circuit again."""

    failure_rate: float = Field(0.5, gt=0, le=1)
    window: int = Field(20, ge=0)  # 0: no failure-rate rule
    minimum_calls: int = Field(5, ge=1)
    consecutive_failures: int = Field(5, ge=0)  # 0: no consecutive rule
    recovery_timeout: Duration = 30.0
    half_open_max_calls: int = Field(1, ge=1)
    enabled: bool = True


def _parse_signal(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return signal.Signals(value).name
        except ValueError:
            pass
    elif isinstance(value, str):
        name = value.strip().upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
        if name in signal.Signals.__members__:
            return name
    raise ValueError(f"expected a signal name like SIGTERM or SIGINT, got {value!r}")


class StopPolicy(Model):
    signal: Annotated[str, BeforeValidator(_parse_signal)] = "SIGTERM"
    timeout: Duration = 10.0


def _port_range(port: int) -> int:
    if not 1 <= port <= 65535:
        raise ValueError(f"a port must be between 1 and 65535, got {port}")
    return port


PortNumber = Annotated[int, AfterValidator(_port_range)]  # checked per port: located errors


class Service(Model):
    command: list[str] | None = None
    shell: bool = False
    image: str | None = None
    # containers (a service with `image`): how to get the image, and what it mounts
    build: Build | None = None
    pull_policy: PullPolicy = PullPolicy.MISSING
    entrypoint: Entrypoint = None
    volumes: list[Mount] = Field(default_factory=list)
    pids_limit: int = Field(0, ge=0)
    version: str | None = None
    workdir: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    env_file: list[str] = Field(default_factory=list)
    replicas: int = Field(1, ge=0, le=MAX_REPLICAS)
    depends_on: dict[str, Dependency] = Field(default_factory=dict)
    ports: dict[str, PortNumber | Literal["auto"]] = Field(default_factory=dict)
    resources: Resources = Field(default_factory=Resources)
    health: Health = Field(default_factory=Health)
    restart: RestartPolicy = Field(default_factory=RestartPolicy)
    circuit_breaker: CircuitBreakerSpec = Field(default_factory=CircuitBreakerSpec)
    # A stable address 127.0.0.1:PORT, balanced over the ready instances by the router;
    # dependents' <DEP>_URL point there.
    expose: int | None = Field(None, ge=1, le=65535)
    stop: StopPolicy = Field(default_factory=StopPolicy)
    # How a changed spec replaces the running instances (rolling, blue-green, canary).
    update: UpdatePolicy = Field(default_factory=UpdatePolicy)
    autoscale: AutoscalePolicy | None = None
    placement: PlacementPolicy = Field(default_factory=PlacementPolicy)  # across nodes
    # run as this user: name, uid, name:group or uid:gid (a root control plane only)
    user: User | None = None
    # secrets of the stack this service receives, as a variable or a file
    secrets: list[SecretUse] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _normalise(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        command = data.get("command")
        if isinstance(command, str):
            data["command"] = [command] if _truthy(data.get("shell")) else _split(command)
        elif isinstance(command, list):
            data["command"] = _argv_items(command)
        env = data.get("env")
        # compose style: ["KEY=value", ...]; anything else is left for the type error
        if isinstance(env, list) and all(isinstance(item, str) for item in env):
            data["env"] = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
        if isinstance(data.get("env"), dict):
            data["env"] = {k: _env_value(v) for k, v in data["env"].items()}
        if isinstance(data.get("env_file"), str):
            data["env_file"] = [data["env_file"]]
        deps = data.get("depends_on")
        # compose style: a list means "wait until healthy"
        if isinstance(deps, list) and all(isinstance(name, str) for name in deps):
            data["depends_on"] = {name: Condition.HEALTHY for name in deps}
        return data

    @field_validator("ports")
    @classmethod
    def _port_names(cls, ports: dict[str, int | str]) -> dict[str, int | str]:
        for name in ports:
            if not NAME_RE.match(name):
                raise ValueError(f"port name {name!r} must be lowercase letters, digits, - or _")
        return ports

    @model_validator(mode="after")
    def _command_or_image(self) -> Service:
        if self.command is None and self.image is None:
            raise ValueError("a service needs a command (or an image)")
        if self.command is not None and not self.command:
            raise ValueError("command must not be empty")
        return self

    @property
    def conditions(self) -> dict[str, Condition]:
        """Each dependency's condition (the edges of the dependency graph)."""
        return {name: dep.condition for name, dep in self.depends_on.items()}

    @property
    def one_shot(self) -> bool:
        """A service meant to run to completion (exit 0 is success, not a crash)."""
        return self.restart.policy != RestartMode.ALWAYS


def _split(command: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError as exc:
        raise ValueError(f"cannot split command {command!r}: {exc}") from exc


def _truthy(value: Any) -> bool:
    """What pydantic will read as true for a bool field (so `shell: "yes"` agrees)."""
    if isinstance(value, str):
        return value.strip().lower() in {"1", "on", "t", "true", "y", "yes"}
    return value is True or (type(value) is int and value == 1)


def _argv_items(value: Any) -> Any:
    """`[sleep, 10]`: YAML reads the 10 as a number; an argv item is always a string."""
    if isinstance(value, list):
        return [
            str(item) if isinstance(item, int | float) and not isinstance(item, bool) else item
            for item in value
        ]
    return value


def _env_value(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if value is None:
        return ""
    return value


class DeployConfig(Model):
    strategy: Strategy = Strategy.HYBRID
    max_parallel: int = Field(10, ge=1)
    timeout: Duration = 300.0
    rollback_on_failure: bool = True
    revision_history_limit: int = Field(10, ge=1)  # revisions kept per service


def _parse_range(value: Any) -> Any:
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", value)
        if not match:
            raise ValueError(f"expected a port range like 30000-32767, got {value!r}")
        return (int(match.group(1)), int(match.group(2)))
    return value


class PortsConfig(Model):
    range: Annotated[tuple[int, int], BeforeValidator(_parse_range)] = (30000, 32767)

    @field_validator("range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        low, high = value
        if not (1 <= low <= high <= 65535):
            raise ValueError(f"port range must satisfy 1 <= low <= high <= 65535, got {low}-{high}")
        return value


class Overcommit(Model):
    cpu: float = Field(1.5, ge=1.0)
    memory: float = Field(1.2, ge=1.0)
    disk: float = Field(1.1, ge=1.0)
    gpu: float = Field(1.0, ge=1.0)


class Capacity(Model):
    """What the host offers; None means detected from the host."""

    cpu: Cpu | None = None
    memory: Size | None = None
    disk: Size | None = None
    gpu: int | None = Field(None, ge=0)
    overcommit: Overcommit = Field(default_factory=Overcommit)


class Stack(Model):
    name: str
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    ports: PortsConfig = Field(default_factory=PortsConfig)
    capacity: Capacity = Field(default_factory=Capacity)
    services: dict[str, Service]
    # name -> where its value comes from ({env: VAR}, {file: ./path}, {stored: NAME});
    # only these references are stored, never a value
    secrets: dict[str, SecretSource] = Field(default_factory=dict)
    # workdir, env_file, bind-mount sources, build contexts and secret files may lie
    # outside the stack file's folder only when this is true
    allow_outside_paths: bool = False
    # Where the file was read from; relative workdir/env_file resolve against base_dir.
    source: str | None = Field(None, exclude=True)
    base_dir: str = Field(".", exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(
                f"stack name {value!r} must be lowercase letters, digits, - or _ (at most 63)"
            )
        return value

    @field_validator("services")
    @classmethod
    def _service_names(cls, services: dict[str, Service]) -> dict[str, Service]:
        if not services:
            raise ValueError("a stack needs at least one service")
        for name in services:
            if not NAME_RE.match(name):
                raise ValueError(
                    f"service name {name!r} must be lowercase letters, digits, - or _"
                )
        return services
