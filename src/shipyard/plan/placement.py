"""Placement: which node runs each instance. Pure and deterministic: the same requests,
nodes and existing placements always give the same answer.

Two stages per instance, as Nomad's and Kubernetes' schedulers do:

1. feasibility: the node carries every label the service asks for, has room for the
   instance's CPU, memory, disk and GPUs within its capacity times its overcommit, has the
   instance's fixed ports free, and (with `anti_affinity: required`) runs no other replica
   of the service;
2. ranking among the feasible nodes: `binpack` (default) prefers the node that ends up
   fullest, so that whole nodes stay free for large instances; `spread` the emptiest.
   With `anti_affinity: preferred` (the default) a node already running a replica of the
   service ranks below every node that does not. Ties go to the node name.

Instances are placed largest first (first-fit decreasing), which packs better than the
order they were asked in. An instance no node can take is left unplaced, with the reason
each node gave, so the caller can say exactly why.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["NodeInfo", "Placed", "PlacementResult", "Request", "place"]

Strategy = Literal["binpack", "spread"]
AntiAffinity = Literal["none", "preferred", "required"]
_KINDS = ("cpu", "memory", "disk", "gpu")


@dataclass(frozen=True)
class NodeInfo:
    name: str
    cpu: float  # cores
    memory: int  # bytes
    disk: int = 0  # bytes
    gpu: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    overcommit: Mapping[str, float] = field(default_factory=dict)  # kind → ratio (>= 1)

    def limit(self, kind: str) -> float:
        return float(getattr(self, kind)) * self.overcommit.get(kind, 1.0)


@dataclass(frozen=True)
class Request:
    instance: str
    service: str
    cpu: float = 0.0
    memory: int = 0
    disk: int = 0
    gpu: int = 0
    ports: frozenset[int] = frozenset()  # fixed host ports
    constraints: Mapping[str, str] = field(default_factory=dict)  # node labels required
    anti_affinity: AntiAffinity = "preferred"
    strategy: Strategy = "binpack"


@dataclass(frozen=True)
class Placed:
    instance: str
    service: str
    node: str
    cpu: float = 0.0
    memory: int = 0
    disk: int = 0
    gpu: int = 0
    ports: frozenset[int] = frozenset()


@dataclass
class PlacementResult:
    placed: dict[str, str] = field(default_factory=dict)  # instance → node
    unplaced: dict[str, str] = field(default_factory=dict)  # instance → why

    @property
    def ok(self) -> bool:
        return not self.unplaced


@dataclass
class _Load:
    node: NodeInfo
    used: dict[str, float]
    ports: set[int]
    services: dict[str, int]  # service → instances here


def _fmt(kind: str, value: float) -> str:
    if kind in ("memory", "disk"):
        return f"{value / 2**20:.0f}Mi"
    return f"{value:g}"


def _why_not(load: _Load, req: Request) -> str | None:
    node = load.node
    for key, want in req.constraints.items():
        have = node.labels.get(key)
        if have != want:
            return f"label {key}={want} " + ("missing" if have is None else f"is {have}")
    for kind in _KINDS:
        need = float(getattr(req, kind))
        if need and load.used[kind] + need > node.limit(kind) + 1e-9:
            return (f"{kind} {_fmt(kind, load.used[kind])} of {_fmt(kind, node.limit(kind))} "
                    f"used, {_fmt(kind, need)} more asked")
    clash = sorted(req.ports & load.ports)
    if clash:
        return f"port {clash[0]} taken"
    if req.anti_affinity == "required" and load.services.get(req.service):
        return f"already runs a replica of {req.service}"
    return None


def _fullness(load: _Load, req: Request) -> float:
    """How full the node would be with `req` on it: the largest share of any resource."""
    shares = []
    for kind in _KINDS:
        limit = load.node.limit(kind)
        if limit > 0:
            shares.append((load.used[kind] + float(getattr(req, kind))) / limit)
    return max(shares, default=0.0)


def _add(load: _Load, req: Request | Placed) -> None:
    for kind in _KINDS:
        load.used[kind] += float(getattr(req, kind))
    load.ports |= req.ports
    load.services[req.service] = load.services.get(req.service, 0) + 1


def place(requests: Iterable[Request], nodes: Sequence[NodeInfo],
          existing: Iterable[Placed] = ()) -> PlacementResult:
    """Place `requests` on `nodes`, around what `existing` already placed."""
    loads = {n.name: _Load(n, dict.fromkeys(_KINDS, 0.0), set(), {})
             for n in sorted(nodes, key=lambda n: n.name)}
    for item in existing:
        if item.node in loads:
            _add(loads[item.node], item)
    result = PlacementResult()
    order = sorted(requests, key=lambda r: (-r.cpu, -r.memory, -r.gpu, -r.disk, r.instance))
    for req in order:
        best: tuple[tuple[float, ...], str] | None = None
        reasons: dict[str, str] = {}
        for name, load in loads.items():
            why = _why_not(load, req)
            if why is not None:
                reasons[name] = why
                continue
            fullness = _fullness(load, req)
            crowded = 1.0 if (req.anti_affinity == "preferred"
                              and load.services.get(req.service)) else 0.0
            rank = -fullness if req.strategy == "binpack" else fullness
            key = (crowded, rank)
            if best is None or key < best[0]:
                best = (key, name)
        if best is None:
            result.unplaced[req.instance] = _summary(reasons) if reasons else "no nodes"
            continue
        _add(loads[best[1]], req)
        result.placed[req.instance] = best[1]
    return result


def _summary(reasons: Mapping[str, str], shown: int = 3) -> str:
    items = sorted(reasons.items())
    text = "; ".join(f"{node}: {why}" for node, why in items[:shown])
    if len(items) > shown:
        text += f"; and {len(items) - shown} more node(s)"
    return f"no node fits ({text})"
