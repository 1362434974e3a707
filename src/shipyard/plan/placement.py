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
    limits: tuple[float, float, float, float]  # cpu, memory, disk, gpu, with overcommit
    used: list[float]  # same order
    ports: set[int]
    services: dict[str, int]  # service → instances here

    @classmethod
    def of(cls, node: NodeInfo) -> _Load:
        return cls(node, tuple(node.limit(k) for k in _KINDS),  # type: ignore[arg-type]
                   [0.0, 0.0, 0.0, 0.0], set(), {})


def _needs(item: Request | Placed) -> tuple[float, float, float, float]:
    return (float(item.cpu), float(item.memory), float(item.disk), float(item.gpu))


def _fmt(kind: str, value: float) -> str:
    if kind in ("memory", "disk"):
        return f"{value / 2**20:.0f}Mi"
    return f"{value:g}"


def _why_not(load: _Load, req: Request) -> str | None:
    """Why `req` cannot go on this node (None: it can). The slow path, for messages."""
    node = load.node
    for key, want in req.constraints.items():
        have = node.labels.get(key)
        if have != want:
            return f"label {key}={want} " + ("missing" if have is None else f"is {have}")
    for i, (kind, need) in enumerate(zip(_KINDS, _needs(req), strict=True)):
        if need and load.used[i] + need > load.limits[i] + 1e-9:
            return (f"{kind} {_fmt(kind, load.used[i])} of {_fmt(kind, load.limits[i])} "
                    f"used, {_fmt(kind, need)} more asked")
    clash = sorted(req.ports & load.ports)
    if clash:
        return f"port {clash[0]} taken"
    if req.anti_affinity == "required" and load.services.get(req.service):
        return f"already runs a replica of {req.service}"
    return None


def _add(load: _Load, item: Request | Placed) -> None:
    for i, need in enumerate(_needs(item)):
        load.used[i] += need
    load.ports |= item.ports
    load.services[item.service] = load.services.get(item.service, 0) + 1


def place(requests: Iterable[Request], nodes: Sequence[NodeInfo],
          existing: Iterable[Placed] = ()) -> PlacementResult:
    """Place `requests` on `nodes`, around what `existing` already placed."""
    loads = [_Load.of(n) for n in sorted(nodes, key=lambda n: n.name)]
    by_name = {load.node.name: load for load in loads}
    for item in existing:
        if item.node in by_name:
            _add(by_name[item.node], item)
    result = PlacementResult()
    order = sorted(requests, key=lambda r: (-r.cpu, -r.memory, -r.gpu, -r.disk, r.instance))
    # Nodes only fill up during one call: a request shaped like one that found no node
    # finds none either (the reason is the same).
    failed: dict[tuple[object, ...], str] = {}
    for req in order:
        need = _needs(req)
        constraints = tuple(req.constraints.items())
        shape = (need, constraints, req.ports, req.anti_affinity, req.service)
        if shape in failed:
            result.unplaced[req.instance] = failed[shape]
            continue
        required = req.anti_affinity == "required"
        preferred = req.anti_affinity == "preferred"
        binpack = req.strategy == "binpack"
        best_key: tuple[float, float] | None = None
        best: _Load | None = None
        for load in loads:  # the hot loop: no strings, no attribute lookups it can avoid
            labels = load.node.labels
            if constraints and any(labels.get(k) != v for k, v in constraints):
                continue
            used, limits = load.used, load.limits
            fullness = 0.0
            fits = True
            for i in range(4):
                after = used[i] + need[i]
                if need[i] and after > limits[i] + 1e-9:
                    fits = False
                    break
                if limits[i] > 0:
                    share = after / limits[i]
                    if share > fullness:
                        fullness = share
            if not fits or (req.ports and not req.ports.isdisjoint(load.ports)):
                continue
            here = load.services.get(req.service, 0)
            if required and here:
                continue
            key = (1.0 if preferred and here else 0.0, -fullness if binpack else fullness)
            if best_key is None or key < best_key:
                best_key, best = key, load
        if best is None:
            reasons = {load.node.name: why for load in loads
                       if (why := _why_not(load, req)) is not None}
            result.unplaced[req.instance] = failed[shape] = (
                _summary(reasons) if reasons else "no nodes")
            continue
        _add(best, req)
        result.placed[req.instance] = best.node.name
    return result


def _summary(reasons: Mapping[str, str], shown: int = 3) -> str:
    items = sorted(reasons.items())
    text = "; ".join(f"{node}: {why}" for node, why in items[:shown])
    if len(items) > shown:
        text += f"; and {len(items) - shown} more node(s)"
    return f"no node fits ({text})"
