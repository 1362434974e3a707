"""Day-2 routes beside a running stack: rollouts in progress (promote, abort), instance
counts (scale, resume autoscaling) and live figures (top)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from shipyard.security.permissions import allow
from shipyard.spec.base import MAX_REPLICAS

if TYPE_CHECKING:
    from shipyard.engine.engine import Engine


class ScaleRequest(BaseModel):
    """Body of `POST /v1/stacks/{name}/services/{service}/scale`."""

    replicas: int = Field(ge=0, le=MAX_REPLICAS,
                          description="instances to run; suspends autoscaling of the "
                                      "service until resumed")


def _engine(request: Request) -> Engine:
    return request.app.state.api.engine  # type: ignore[no-any-return]


def day2_router() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["day-2"])

    @router.post("/stacks/{name}/services/{service}/promote",
                 dependencies=[allow("services", "promote")])
    async def promote(name: str, service: str, request: Request) -> dict[str, Any]:
        """Promote the rollout in progress: a blue-green or canary waiting for promotion
        goes on; a canary skips its remaining steps. 404 when none is in progress."""
        return {"promoted": True, "phase": _engine(request).promote(name, service)}

    @router.post("/stacks/{name}/services/{service}/abort",
                 dependencies=[allow("services", "abort")])
    async def abort(name: str, service: str, request: Request) -> dict[str, Any]:
        """Abort the rollout in progress: it stops and rolls the service back."""
        return {"aborted": True, "phase": _engine(request).abort(name, service)}

    @router.post("/stacks/{name}/services/{service}/scale",
                 dependencies=[allow("services", "scale")])
    async def scale(name: str, service: str, body: ScaleRequest,
                    request: Request) -> dict[str, Any]:
        """Run `replicas` instances, as an operation (new ones join the router once ready,
        removed ones are drained first); answers once it is done."""
        return await _engine(request).scale(name, service, body.replicas)

    @router.post("/stacks/{name}/services/{service}/autoscale/resume",
                 dependencies=[allow("services", "resume")])
    async def resume(name: str, service: str, request: Request) -> dict[str, Any]:
        """Let the autoscaler decide the count again after a manual scale."""
        return await _engine(request).resume_autoscale(name, service)

    @router.get("/stacks/{name}/top", dependencies=[allow("services", "read")])
    async def top(name: str, request: Request) -> dict[str, Any]:
        """Live figures per service and instance: CPU % and memory per instance, the
        router's request rate, error rate, latency and connections, and the autoscaler's
        latest decision with its reason."""
        return await _engine(request).top(name)

    return router
