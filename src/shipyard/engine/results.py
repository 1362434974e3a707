"""Plain results the engine returns to its callers (CLI, API, Python users)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ServiceChange:
    service: str
    action: str  # add | change | remove | unchanged
    fields: list[str] = field(default_factory=list)
    how: str = ""  # how the change is carried out: strategy, scale in place, start, stop


@dataclass
class PlanReport:
    """What `apply` would do: the phases of the dependency graph and the changes against the
    recorded state."""

    stack: str
    strategy: str
    max_parallel: int
    phases: list[list[str]]
    changes: list[ServiceChange]
    operation: int | None = None  # the queued deploy's operation id (submit)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DeployResult:
    stack: str
    ok: bool
    duration: float
    started: list[str] = field(default_factory=list)  # services deployed (new or changed)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # service -> reason
    skipped: list[str] = field(default_factory=list)  # not started: a dependency failed
    rolled_back: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
