"""What travels over the API, shared by the server (`app.py`) and the client (`client.py`).

The engine's results are plain dataclasses; the few shapes that exist only on the wire (a
submitted deploy, a stack summary, an error body) are defined here, and errors are turned
into JSON and back so that a client raises the same exception type the engine raised.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field

from shipyard import errors
from shipyard.engine.operations import PRIORITY_NAMES
from shipyard.engine.results import DeployResult, PlanReport, ServiceChange
from shipyard.security import errors as security_errors
from shipyard.state.base import Event, InstanceRecord, InstanceState, OperationRecord, OpState

Priority = Literal["critical", "high", "normal", "low"]


class ApplyRequest(BaseModel):
    """Body of `POST /v1/stacks`: the stack document and whether to wait for the deploy."""

    stack: dict[str, Any] = Field(description="Stack.model_dump(mode='json') plus source, "
                                              "base_dir")
    wait: bool = Field(False, description="wait until the deploy is over (200 DeployResult) "
                                          "instead of returning the plan at once (202)")
    priority: Priority = Field("normal", description="the operation's priority")


class RollbackRequest(BaseModel):
    """Body of `POST /v1/stacks/{name}/services/{service}/rollback`."""

    to: int | None = Field(None, ge=1, description="the revision (default: the previous "
                                                   "deployed one)")
    priority: Priority = "high"


class RestartRequest(BaseModel):
    """Body of `POST /v1/stacks/{name}/services/{service}/restart`."""

    rolling: bool = Field(False, description="one instance at a time, the next once the "
                                             "previous is ready again")
    priority: Priority = "normal"


class PlanRequest(BaseModel):
    stack: dict[str, Any]


class ErrorBody(BaseModel):
    error: str
    hint: str | None = None
    exit_code: int = 1
    kind: str = "ShipyardError"
    issues: list[dict[str, Any]] = Field(default_factory=list)


@dataclass
class Submitted(PlanReport):
    """The plan of a deploy that now runs in the background; `events_after` is the event
    sequence number to follow the deploy's events from."""

    events_after: int = 0


@dataclass
class StackSummary:
    name: str
    status: str
    services: list[str]
    instances: int
    ready: int
    created_at: float
    updated_at: float


@dataclass
class StackDetail(StackSummary):
    spec: dict[str, Any] = field(default_factory=dict)
    instance_records: list[InstanceRecord] = field(default_factory=list)


def instance_view(record: InstanceRecord, now: float | None = None) -> dict[str, Any]:
    """An instance as JSON, with its uptime (seconds since it started, while it runs)."""
    out = asdict(record)
    out["state"] = InstanceState(record.state).value
    alive = InstanceState(record.state).alive
    now = time.time() if now is None else now
    out["uptime"] = (max(0.0, now - record.started_at)
                     if alive and record.started_at is not None else None)
    return out


def operation_view(op: OperationRecord) -> dict[str, Any]:
    """An operation as JSON; its payload (a whole stack, for an apply) is left out."""
    out = asdict(op)
    out.pop("payload")
    out["state"] = OpState(op.state).value
    out["priority"] = PRIORITY_NAMES.get(op.priority, str(op.priority))
    return out


def event_view(event: Event) -> dict[str, Any]:
    return asdict(event)


def plan_from_dict(data: dict[str, Any]) -> PlanReport:
    return PlanReport(
        stack=data["stack"], strategy=data["strategy"], max_parallel=data["max_parallel"],
        phases=[list(p) for p in data["phases"]],
        changes=[ServiceChange(c["service"], c["action"], list(c.get("fields", [])))
                 for c in data["changes"]],
    )


def submitted_from_dict(data: dict[str, Any]) -> Submitted:
    plan = plan_from_dict(data)
    return Submitted(**asdict(plan) | {"changes": plan.changes},
                     events_after=int(data.get("events_after", 0)))


def deploy_from_dict(data: dict[str, Any]) -> DeployResult:
    names = {f for f in DeployResult.__dataclass_fields__}
    return DeployResult(**{k: v for k, v in data.items() if k in names})


# -- errors ------------------------------------------------------------------------------

_ERROR_TYPES: dict[str, type[errors.ShipyardError]] = {
    cls.__name__: cls for cls in (
        errors.ShipyardError, errors.InputError, errors.SpecError, errors.PlanError,
        errors.ResourceError, errors.RuntimeLaunchError, errors.StoreError,
        errors.NotFoundError, errors.Busy,
        security_errors.AuthenticationError, security_errors.PermissionDenied,
        security_errors.RateLimited, security_errors.PayloadTooLarge,
        security_errors.SecurityConfigError,
    )
}


def error_status(exc: errors.ShipyardError) -> int:
    """The HTTP status of an error: 404 unknown name, 400 bad input, 500 store trouble,
    409 any other operation that failed; the security errors carry their own (401, 403,
    413, 429)."""
    if isinstance(exc, security_errors.SecurityError):
        return exc.http_status
    if isinstance(exc, errors.NotFoundError):
        return 404
    if isinstance(exc, errors.Busy):
        return 503
    if isinstance(exc, errors.InputError):
        return 400
    if isinstance(exc, errors.StoreError):
        return 500
    return 409


def error_body(exc: errors.ShipyardError) -> dict[str, Any]:
    body = ErrorBody(error=exc.message, hint=exc.hint, exit_code=exc.exit_code,
                     kind=_kind_of(exc))
    if isinstance(exc, errors.SpecError):
        body.issues = [asdict(issue) for issue in exc.issues]
    return body.model_dump()


def _kind_of(exc: errors.ShipyardError) -> str:
    for cls in type(exc).__mro__:
        if cls.__name__ in _ERROR_TYPES and _ERROR_TYPES[cls.__name__] is cls:
            return cls.__name__
    return "InputError" if exc.exit_code == 2 else "ShipyardError"


def error_from_body(body: dict[str, Any], status: int) -> errors.ShipyardError:
    """Rebuild the exception a server reported, keeping its type, hint and exit code."""
    kind = str(body.get("kind") or "")
    message = str(body.get("error") or f"the server answered HTTP {status}")
    hint = body.get("hint")
    if kind == "SpecError" and body.get("issues"):
        issues = [errors.Issue(path=str(i.get("path", "")), message=str(i.get("message", "")),
                               file=i.get("file"), line=i.get("line"))
                  for i in body["issues"]]
        return errors.SpecError(issues)
    cls = _ERROR_TYPES.get(kind)
    if cls is None or cls is errors.SpecError:
        if status == 404:
            cls = errors.NotFoundError
        elif body.get("exit_code") == 2 or (400 <= status < 500 and status != 409):
            cls = errors.InputError
        else:
            cls = errors.ShipyardError
    return cls(message, hint=hint)
