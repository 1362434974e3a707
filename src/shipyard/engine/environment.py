"""What an instance sees: its environment and its resolved command line.

Every instance gets `PORT`, `PORT_<NAME>`, `SHIPYARD_STACK`, `SHIPYARD_SERVICE`,
`SHIPYARD_INSTANCE`, and for each dependency `<DEP>_HOST`, `<DEP>_PORT`, `<DEP>_URL`.
`${VAR}` left in the command and env by the loader are expanded here, per instance.

Secrets (`secrets:` of a service) are added by the supervisor after this, so that they are
never expanded into a command line or another variable; what an instance inherits from the
control plane's environment leaves out the variables secrets come from, and any variable
whose value is a known secret.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from shipyard.errors import RuntimeLaunchError
from shipyard.security import redact
from shipyard.security.secret_values import env_sources
from shipyard.spec.interpolate import expand
from shipyard.spec.models import Service, Stack


def env_name(name: str) -> str:
    """`user-db` → `USER_DB`: the form a name takes inside an environment variable."""
    return name.upper().replace("-", "_")


def dependency_vars(dep: str, port: int | None, host: str = "127.0.0.1") -> dict[str, str]:
    key = env_name(dep)
    out = {f"{key}_HOST": host}
    if port is not None:
        out[f"{key}_PORT"] = str(port)
        out[f"{key}_URL"] = f"http://{host}:{port}"
    return out


def instance_environment(
    stack: Stack,
    service_name: str,
    instance: str,
    ports: Mapping[str, int],
    dependency_ports: Mapping[str, int | None],
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The complete environment of one instance: the control plane's environment, the
    injected variables, then the service's own `env` (expanded against the rest)."""
    service = stack.services[service_name]
    injected: dict[str, str] = {
        "SHIPYARD_STACK": stack.name,
        "SHIPYARD_SERVICE": service_name,
        "SHIPYARD_INSTANCE": instance,
    }
    if ports:
        injected["PORT"] = str(next(iter(ports.values())))
    for name, port in ports.items():
        injected[f"PORT_{env_name(name)}"] = str(port)
    for dep, port in dependency_ports.items():
        injected.update(dependency_vars(dep, port))
    env = _inherited(os.environ if base is None else base, env_sources(stack))
    env.update(injected)
    for key, value in service.env.items():
        try:
            env[key] = expand(value, env)
        except ValueError as exc:
            raise RuntimeLaunchError(f"service {service_name}: env {key}: {exc}") from exc
    return env


def _inherited(base: Mapping[str, str], hidden: set[str]) -> dict[str, str]:
    """The control plane's environment minus the sources of secrets and known values."""
    if not hidden and not redact.known():
        return dict(base)
    return {k: v for k, v in base.items() if k not in hidden and not redact.is_value(v)}


def instance_argv(service_name: str, service: Service, env: Mapping[str, str]) -> list[str]:
    """The argv to exec: expanded; with `shell: true` the one string goes to /bin/sh -c."""
    assert service.command is not None
    try:
        argv = [expand(arg, env) for arg in service.command]
    except ValueError as exc:
        raise RuntimeLaunchError(f"service {service_name}: command: {exc}") from exc
    if service.shell:
        return ["/bin/sh", "-c", " ".join(argv)]
    return argv


def instance_workdir(stack: Stack, service: Service) -> str:
    base = Path(stack.base_dir)
    if service.workdir is None:
        return str(base.resolve())
    return str((base / service.workdir).resolve())
