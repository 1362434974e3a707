"""What the container runtime needs beyond a `LaunchSpec`: the image and how to get it,
entrypoint, volumes, pids limit, and which variables of the instance's environment are
its own (the control plane's own environment stays outside the container).

`container_spec(stack, service_name)` builds it from the stack; the engine passes it as
`LaunchSpec(container=...)` for a service with an `image`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shipyard.runtime.base import LaunchSpec
    from shipyard.spec.models import Stack

INJECTED_PREFIXES = ("SHIPYARD_", "PORT")
# memswap_limit for "no swap limit": Docker reads -1 so, but podman's compat API reads -1
# (and 0) as its default, twice the memory; 4 EiB is beyond any host's memory + swap.
UNLIMITED_MEMSWAP = 2**62


@dataclass(frozen=True)
class BuildSpec:
    context: str  # absolute
    dockerfile: str | None = None  # relative to the context; None: Containerfile, Dockerfile
    args: dict[str, str] = field(default_factory=dict)
    target: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MountSpec:
    type: str  # bind | volume | tmpfs
    source: str | None  # bind: absolute host path; volume: a name (None: anonymous)
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class ContainerSpec:
    image: str
    build: BuildSpec | None = None
    pull_policy: str = "missing"  # always | missing | never | build
    entrypoint: list[str] | None = None
    command: bool = True  # LaunchSpec.argv replaces the image's CMD (False: the image's)
    mounts: list[MountSpec] = field(default_factory=list)
    pids_limit: int = 0
    env_keys: frozenset[str] = frozenset()  # passed into the container besides the injected
    gpus: list[str] = field(default_factory=list)  # host GPU indices given to the container


def container_spec(stack: Stack, service_name: str) -> ContainerSpec | None:
    """The container part of an instance of `service_name`, or None for a service without
    an image (it runs as a process)."""
    service = stack.services[service_name]
    if service.image is None:
        return None
    base = Path(stack.base_dir)
    build = _opt(service, "build")
    mounts = [_mount(m, base) for m in _opt(service, "volumes") or []]
    keys = set(service.env)
    keys.update(use.variable for use in service.secrets)  # env secrets, by name
    for dep in service.depends_on:
        prefix = dep.upper().replace("-", "_")
        keys.update(f"{prefix}_{suffix}" for suffix in ("HOST", "PORT", "URL"))
    return ContainerSpec(
        image=service.image,
        build=None if build is None else BuildSpec(
            context=str((base / Path(build.context).expanduser()).resolve()),
            dockerfile=build.dockerfile, args=dict(build.args), target=build.target,
            labels=dict(build.labels)),
        pull_policy=str(getattr(_opt(service, "pull_policy"), "value", None) or "missing"),
        entrypoint=_opt(service, "entrypoint"),
        command=service.command is not None,
        mounts=mounts,
        pids_limit=int(_opt(service, "pids_limit") or 0),
        env_keys=frozenset(keys),
    )


def limit_options(spec: LaunchSpec) -> dict[str, Any]:
    """The resource options of `containers.create` for an instance: memory with its swap
    (`memswap_limit` is memory + swap), CPU quota and cpuset, and a device request for its
    GPUs (it sees them numbered from 0)."""
    options: dict[str, Any] = {}
    if spec.memory_limit:
        options["mem_limit"] = spec.memory_limit
        options["memswap_limit"] = (UNLIMITED_MEMSWAP if spec.swap_limit is None
                                    else spec.memory_limit + spec.swap_limit)
    if spec.cpu_limit:
        options["nano_cpus"] = int(spec.cpu_limit * 1e9)
    if spec.cpuset:
        options["cpuset_cpus"] = spec.cpuset
        if spec.mems:
            options["cpuset_mems"] = spec.mems
    if spec.container is not None and spec.container.gpus:
        from docker.types import DeviceRequest

        options["device_requests"] = [DeviceRequest(device_ids=list(spec.container.gpus),
                                                    capabilities=[["gpu"]])]
    return options


def container_env(env: dict[str, str], spec: ContainerSpec) -> dict[str, str]:
    """The part of an instance's environment that belongs in its container: the injected
    variables (PORT*, SHIPYARD_*, <DEP>_HOST/_PORT/_URL) and the service's own."""
    return {k: v for k, v in env.items() if k in spec.env_keys or k.startswith(INJECTED_PREFIXES)}


def _opt(service: Any, name: str) -> Any:
    """A container field of the service; None while the stack model lacks it."""
    return getattr(service, name, None)


def _mount(mount: Any, base: Path) -> MountSpec:
    source = mount.source
    if mount.type == "bind" and source is not None:
        source = str((base / Path(source).expanduser()).resolve())
    return MountSpec(mount.type, source, mount.target, bool(mount.read_only))
