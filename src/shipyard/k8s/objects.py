"""Building blocks of the manifests: names, labels, quantities, probes, env, ports.

Pure functions of spec values. Anything the Kubernetes target cannot express is refused
with a `RenderError` that names the service and the field, one line.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from shipyard.errors import InputError
from shipyard.spec.interpolate import InterpolationError, parse
from shipyard.spec.models import Probe, Service

MANAGED_BY = "shipyard"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_VERSION = "app.kubernetes.io/version"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_COLOR = "shipyard.dev/color"  # blue-green: which set a pod belongs to
LABEL_TRACK = "shipyard.dev/track"  # canary: stable | canary
ANNOTATION_HASH = "shipyard.dev/template-hash"
ANNOTATION_METRICS = "shipyard.dev/external-metrics"
ANNOTATION_SERVICE = "shipyard.dev/service"  # the stack's service an object belongs to

_DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_IANA_SVC = re.compile(r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


class RenderError(InputError):
    """The stack cannot be expressed on Kubernetes (exit code 2)."""


def k8s_name(service: str) -> str:
    """A service's object name: `user_db` → `user-db`, refused unless it is a DNS label
    that starts with a letter (what a Kubernetes Service name must be)."""
    name = service.replace("_", "-")
    if not _DNS_1035.match(name):
        raise RenderError(
            f"service {service}: its name cannot be a Kubernetes Service name "
            "(lowercase letters, digits and -, starting with a letter, at most 63)"
        )
    return name


def port_name(service: str, port: str) -> str:
    """A port's name as a container/Service port name (IANA service name: at most 15)."""
    name = port.replace("_", "-")
    if not _IANA_SVC.match(name) or "--" in name or not re.search("[a-z]", name):
        raise RenderError(
            f"service {service}: port name {port!r} cannot be a Kubernetes port name "
            "(at most 15 lowercase letters, digits and single dashes, with a letter)"
        )
    return name


def env_name(name: str) -> str:
    """`user-db` → `USER_DB` (as the local runtime names dependency variables)."""
    return name.upper().replace("-", "_")


def label_value(text: str) -> str | None:
    """`text` as a label value, or None when it cannot be one (kept out, not mangled)."""
    text = text[:63].rstrip("-_.")
    return text if text and _LABEL_VALUE.match(text) else None


def version_of(service: Service) -> str | None:
    if service.version:
        return label_value(service.version)
    if service.image and "@" not in service.image:
        tail = service.image.rsplit("/", 1)[-1]
        if ":" in tail:
            return label_value(tail.split(":", 1)[1])
    return None


def labels(stack: str, service: str, svc: Service | None = None) -> dict[str, str]:
    out = {
        LABEL_NAME: k8s_name(service),
        LABEL_PART_OF: stack,
        LABEL_MANAGED_BY: MANAGED_BY,
    }
    if svc is not None and (version := version_of(svc)):
        out[LABEL_VERSION] = version
    return out


def selector(stack: str, service: str) -> dict[str, str]:
    """The labels that pick a service's pods (never the version: it changes)."""
    return {LABEL_NAME: k8s_name(service), LABEL_PART_OF: stack}


def stack_selector(stack: str) -> str:
    """A label selector for every object Shipyard manages for `stack`."""
    return f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_PART_OF}={stack}"


def content_hash(value: Any) -> str:
    """A short stable hash of a JSON-able value (a pod template, a job spec)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def seconds(value: float, *, minimum: int = 0) -> int:
    return max(minimum, math.ceil(value - 1e-9))


def cpu_quantity(cores: float) -> str:
    millis = max(1, round(cores * 1000))
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"


def size_quantity(size: int) -> str:
    for suffix, unit in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def number_quantity(value: float) -> str:
    """A plain number as a quantity: 100 → "100", 0.2 → "200m", 12.5 → "12500m"."""
    if float(value).is_integer():
        return str(int(value))
    return f"{max(1, round(value * 1000))}m"


def probe(service: str, kind: str, spec: Probe, ports: Mapping[str, str | int]) -> dict[str, Any]:
    """A readiness/liveness probe. `ports` maps the stack's port names to container port
    names; a number stays a number."""

    def port_ref(value: str | int | None) -> str | int:
        if value is None:
            if not ports:
                raise RenderError(f"service {service}: health.{kind} needs a port, "
                                  "and the service has none")
            return next(iter(ports.values()))
        if isinstance(value, int):
            return value
        if value not in ports:
            raise RenderError(f"service {service}: health.{kind} names port {value!r}, "
                              f"which is not one of its ports ({', '.join(ports) or 'none'})")
        return ports[value]

    out: dict[str, Any]
    if spec.http is not None:
        out = {"httpGet": {"path": spec.http, "port": port_ref(spec.port),
                           "scheme": spec.scheme.upper()}}
        if spec.host not in ("127.0.0.1", "localhost", "::1"):
            out["httpGet"]["host"] = spec.host
    elif spec.tcp is not None:
        out = {"tcpSocket": {"port": port_ref(spec.tcp)}}
    else:
        out = {"exec": {"command": list(spec.exec or [])}}
    out.update(
        periodSeconds=seconds(spec.interval, minimum=1),
        timeoutSeconds=seconds(spec.timeout, minimum=1),
        failureThreshold=spec.failure_threshold,
        # Kubernetes requires 1 for liveness
        successThreshold=spec.success_threshold if kind == "readiness" else 1,
        initialDelaySeconds=seconds(spec.initial_delay),
    )
    return out


def resources(service: Service) -> dict[str, Any]:
    """Requests from `resources`; memory is also the limit (the local runtime's meaning
    of `memory`), CPU is not limited (throttling is not what `cpu` asks for), GPUs are
    `nvidia.com/gpu` (an extended resource: requests equal limits)."""
    spec = service.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if spec.cpu > 0:
        requests["cpu"] = cpu_quantity(spec.cpu)
    if spec.memory > 0:
        requests["memory"] = limits["memory"] = size_quantity(spec.memory)
    if spec.gpu > 0:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(spec.gpu)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def assign_ports(ports: Mapping[str, int | str], base: int = 8080) -> dict[str, int]:
    """Container port numbers: fixed ones as written; each `auto` port takes the next
    free number from `base` up (8080, 8081, ...), in the order the ports are written."""
    used = {p for p in ports.values() if isinstance(p, int)}
    out: dict[str, int] = {}
    candidate = base
    for name, value in ports.items():
        if isinstance(value, int):
            out[name] = value
            continue
        while candidate in used:
            candidate += 1
        out[name] = candidate
        used.add(candidate)
    return out


def to_k8s_vars(service: str, field: str, text: str, known: Iterable[str]) -> str:
    """A stack string with per-instance `${VAR}`s left in it, in Kubernetes' own
    `$(VAR)` syntax (expanded by the kubelet from the container's env). A literal `$(`
    is escaped as `$$(`. A variable the container does not define takes its default, or
    is refused."""
    names = set(known)
    try:
        parts = parse(text)
    except InterpolationError as exc:
        raise RenderError(f"service {service}: {field}: {exc}") from exc
    return _render_parts(service, field, parts, names)


def _render_parts(service: str, field: str, parts: list[Any], names: set[str]) -> str:
    out: list[str] = []
    for part in parts:
        if isinstance(part, str):
            out.append(part.replace("$(", "$$("))
        elif part.name in names:
            out.append(f"$({part.name})")
        elif part.default is not None:
            out.append(_render_parts(service, field, part.default, names))
        else:
            raise RenderError(f"service {service}: {field}: ${{{part.name}}} is not defined "
                              "for its containers on Kubernetes")
    return "".join(out)


def has_vars(text: str) -> bool:
    try:
        return any(not isinstance(part, str) for part in parse(text))
    except InterpolationError:
        return True


def check_env_name(service: str, name: str) -> None:
    if not _ENV_NAME.match(name):
        raise RenderError(f"service {service}: env name {name!r} is not allowed on Kubernetes")
