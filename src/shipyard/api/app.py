"""The control plane's REST API: a thin HTTP face over one `Engine`.

Routes are versioned under `/v1`; `/healthz`, `/metrics` (Prometheus) and `/openapi.json`
sit at the root. Every `ShipyardError` becomes a JSON body `{"error", "hint", "exit_code",
"kind"}` with a status that says whose fault it is; nothing ever answers with a traceback.

Every request is authenticated by `SecurityMiddleware`, and every route declares the
permission it needs with `dependencies=[allow(RESOURCE, VERB)]` (see
`shipyard.security.permissions`); a route without one fails the test suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from shipyard import __version__
from shipyard.api import ha, streams
from shipyard.api.day2_routes import day2_router
from shipyard.api.models import (
    ApplyRequest,
    ErrorBody,
    PlanRequest,
    RestartRequest,
    RollbackRequest,
    StackDetail,
    StackSummary,
    Submitted,
    error_body,
    error_status,
    event_view,
    instance_view,
    operation_view,
)
from shipyard.api.security_routes import security_router
from shipyard.engine.results import DeployResult, PlanReport
from shipyard.errors import Issue, NotFoundError, ShipyardError, SpecError
from shipyard.security.guard import Security
from shipyard.security.middleware import SecurityMiddleware
from shipyard.security.permissions import allow, grant_of, require_declared
from shipyard.security.redact import redact, redact_any
from shipyard.spec.hardening import outside_paths
from shipyard.spec.models import Stack
from shipyard.state.base import InstanceRecord, OpState

if TYPE_CHECKING:
    from shipyard.engine.engine import Engine

log = logging.getLogger("shipyard.api")

NDJSON = "application/x-ndjson"
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "invalid input (exit code 2)"},
    401: {"model": ErrorBody, "description": "not authenticated"},
    403: {"model": ErrorBody, "description": "not allowed for this identity's role"},
    404: {"model": ErrorBody, "description": "no such stack, service or instance"},
    409: {"model": ErrorBody, "description": "the operation failed"},
    422: {"model": ErrorBody, "description": "malformed request body or parameters, with "
                                             "`details` (exit code 2)"},
    503: {"model": ErrorBody, "description": "busy: retry later"},
}


class ApiState:
    """What the routes share besides the engine: the shutdown signal for endless streams,
    and the deploy each stack last submitted (so its result outlives a rollback that makes
    the engine forget the stack)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.closing = asyncio.Event()
        self.deploys: dict[str, asyncio.Task[DeployResult]] = {}


def _api(request: Request) -> ApiState:
    state: ApiState = request.app.state.api
    return state


Api = Annotated[ApiState, Depends(_api)]


def stack_from_document(document: dict[str, Any]) -> Stack:
    """Rebuild the stack a client sent; a malformed document is a `SpecError`, and so
    is a path outside the stack's folder (the client need not have used the loader)."""
    source = document.get("source") if isinstance(document, dict) else None
    file = source if isinstance(source, str) else None
    try:
        stack = Stack.model_validate(document)
    except ValidationError as exc:
        raise SpecError([
            Issue(path=".".join(str(p) for p in err["loc"]), message=err["msg"], file=file)
            for err in exc.errors()
        ]) from None
    outside = outside_paths(stack)
    if outside:
        raise SpecError([Issue(".".join(str(p) for p in path), message, file)
                         for path, message in outside])
    return stack


def create_app(engine: Engine, security: Security | None = None) -> FastAPI:
    """The API of `engine`. `security` is what the server built for its home; without
    one the app is for in-process use (an ASGI transport, no server): a request that did
    not come through the server's listeners is then the process itself, admin."""
    if security is None:
        security = Security.for_home(engine.config.home, trust_in_process=True)
    app = FastAPI(title="Shipyard", version=__version__, openapi_url=None, docs_url=None,
                  redoc_url=None, description="The Shipyard control plane.",
                  dependencies=[Depends(ha.leader_gate)])  # a standby forwards (api/ha.py)
    app.state.api = ApiState(engine)
    app.state.security = security
    app.add_middleware(SecurityMiddleware, security=security)
    _install_error_handlers(app)

    @app.get("/healthz", tags=["meta"], dependencies=[allow("system", "read")])
    async def healthz(request: Request) -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "pid": os.getpid(),
                **ha.status_of(request.app)}

    @app.get("/metrics", tags=["meta"], response_class=Response,
             dependencies=[allow("system", "read")])
    async def metrics(api: Api) -> Response:
        return Response(generate_latest(api.engine.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/openapi.json", include_in_schema=False, dependencies=[allow("system", "read")])
    async def openapi() -> JSONResponse:
        if app.openapi_schema is None:
            app.openapi_schema = get_openapi(title=app.title, version=app.version,
                                             description=app.description, routes=app.routes)
        return JSONResponse(app.openapi_schema)

    app.include_router(_router())
    app.include_router(security_router(), responses=ERRORS)
    app.include_router(day2_router(), responses=ERRORS)
    ha.install(app)
    require_declared(app)
    return app


def close_streams(app: FastAPI) -> None:
    """End every open stream (event and log follows): the server is shutting down."""
    app.state.api.closing.set()


def _router() -> APIRouter:
    router = APIRouter(prefix="/v1", responses=ERRORS)

    @router.get("/stacks", tags=["stacks"], dependencies=[allow("stacks", "read", listing=True)])
    async def list_stacks(api: Api, request: Request) -> list[StackSummary]:
        grant = grant_of(request)
        records = [r for r in await api.engine.stacks() if grant.sees(r.name)]
        counts = await _instance_counts(api.engine)
        return [StackSummary(name=r.name, status=r.status,
                             services=sorted(r.spec.get("services", {})),
                             instances=counts.get(r.name, (0, 0))[0],
                             ready=counts.get(r.name, (0, 0))[1],
                             created_at=r.created_at, updated_at=r.updated_at)
                for r in sorted(records, key=lambda r: r.name)]

    @router.post("/stacks", tags=["stacks"], status_code=200,
                 dependencies=[allow("stacks", "deploy")],
                 responses={200: {"model": DeployResult, "description": "deployed (wait)"},
                            202: {"model": Submitted, "description": "deploying (no wait)"}})
    async def apply_stack(body: ApplyRequest, api: Api) -> JSONResponse:
        stack = stack_from_document(body.stack)
        after = await streams.latest_seq(api.engine.store)
        report = await api.engine.submit(stack, priority=body.priority)
        task = asyncio.create_task(api.engine.wait_deploy(stack.name),
                                   name=f"api-wait:{stack.name}")
        task.add_done_callback(_consume)
        api.deploys[stack.name] = task
        if not body.wait:
            submitted = Submitted(**vars(report), events_after=after)
            return JSONResponse(submitted.as_dict(), status_code=202)
        result = await _result_of(task, stack.name)
        return JSONResponse(result.as_dict(), status_code=200)

    @router.post("/plan", tags=["stacks"], dependencies=[allow("stacks", "plan")])
    async def plan(body: PlanRequest, api: Api) -> PlanReport:
        return await api.engine.plan(stack_from_document(body.stack))

    @router.get("/stacks/{name}", tags=["stacks"], dependencies=[allow("stacks", "read")])
    async def get_stack(name: str, api: Api) -> StackDetail:
        record = await api.engine.store.get_stack(name)
        if record is None:
            raise await _unknown_stack(api.engine, name)
        instances: list[InstanceRecord] = []
        with contextlib.suppress(NotFoundError):
            instances = await api.engine.instances(stack=name)
        return StackDetail(name=record.name, status=record.status,
                           services=sorted(record.spec.get("services", {})),
                           instances=len(instances), ready=sum(i.ready for i in instances),
                           created_at=record.created_at, updated_at=record.updated_at,
                           spec=record.spec, instance_records=instances)

    @router.get("/stacks/{name}/deploy", tags=["stacks"],
                dependencies=[allow("stacks", "read")])
    async def wait_deploy(name: str, api: Api) -> DeployResult:
        """The result of the stack's running deploy (waiting for it) or of its last one."""
        task = api.deploys.get(name)
        if task is not None:
            return await _result_of(task, name)
        return await api.engine.wait_deploy(name)

    @router.delete("/stacks/{name}", tags=["stacks"], dependencies=[allow("stacks", "delete")])
    async def down(name: str, api: Api) -> dict[str, str]:
        await api.engine.down(name)
        api.deploys.pop(name, None)
        return {"stack": name, "status": "down"}

    @router.get("/instances", tags=["instances"], dependencies=[allow("services", "read")])
    async def instances(api: Api, stack: str | None = None,
                        service: str | None = None) -> list[dict[str, Any]]:
        if service is not None and stack is None:
            stack = await _only_stack(api.engine)
        records = await api.engine.instances(stack=stack, service=service)
        return [instance_view(r) for r in records]

    @router.get("/events", tags=["events"], dependencies=[allow("events", "read")],
                responses={200: {"content": {NDJSON: {}},
                                 "description": "a JSON list, or NDJSON when following"}})
    async def events(api: Api, after: Annotated[int, Query(ge=0)] = 0,
                     limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
                     stack: str | None = None, service: str | None = None,
                     follow: bool = False) -> Response:
        store = api.engine.store
        if follow:
            lines = streams.event_lines(store, after=after, stack=stack, service=service,
                                        closing=api.closing)
            return StreamingResponse(lines, media_type=NDJSON)
        found = await store.list_events(after=after, limit=limit, stack=stack,
                                        service=service)
        return JSONResponse([event_view(e) for e in found])

    @router.get("/operations", tags=["operations"],
                dependencies=[allow("operations", "read")])
    async def operations(api: Api, stack: str | None = None,
                         state: Annotated[list[OpState] | None, Query()] = None,
                         limit: Annotated[int, Query(ge=1, le=10000)] = 100,
                         ) -> list[dict[str, Any]]:
        """Operations, oldest first: queued, running and (the newest `limit`) finished."""
        found = await api.engine.store.list_operations(
            states=tuple(state) if state else None, stack=stack, limit=limit)
        return [operation_view(op) for op in found]

    @router.get("/operations/{op_id}", tags=["operations"],
                dependencies=[allow("operations", "read", listing=True)])
    async def operation(op_id: int, api: Api, request: Request) -> dict[str, Any]:
        op = await api.engine.store.get_operation(op_id)
        if op is None or not grant_of(request).sees(op.stack):
            raise NotFoundError(f"no operation {op_id}")
        return operation_view(op)

    @router.post("/stacks/{name}/services/{service}/restart", tags=["operations"],
                 dependencies=[allow("services", "restart")],
                 responses={**ERRORS, 503: {"model": ErrorBody, "description": "busy"}})
    async def restart(name: str, service: str, body: RestartRequest,
                      api: Api) -> dict[str, Any]:
        """Restart a service's instances (all at once, or one at a time with `rolling`),
        as an operation; answers once it is done."""
        return await api.engine.restart(name, service, rolling=body.rolling,
                                        priority=body.priority)

    @router.get("/stacks/{name}/services/{service}/revisions", tags=["revisions"],
                dependencies=[allow("services", "read")])
    async def revisions(name: str, service: str, api: Api) -> list[dict[str, Any]]:
        """The service's revisions, oldest first: when, what changed, outcome, current."""
        return await api.engine.history(name, service)

    @router.post("/stacks/{name}/services/{service}/rollback", tags=["revisions"],
                 dependencies=[allow("services", "rollback")],
                 responses={**ERRORS, 503: {"model": ErrorBody, "description": "busy"}})
    async def rollback(name: str, service: str, body: RollbackRequest,
                       api: Api) -> DeployResult:
        """Deploy an earlier revision of the service again (default: the previous deployed
        one), as an operation; answers with the deploy's result."""
        return await api.engine.rollback(name, service, to=body.to, priority=body.priority)

    @router.post("/stacks/{name}/recover", tags=["operations"],
                 dependencies=[allow("stacks", "recover")],
                 responses={**ERRORS, 503: {"model": ErrorBody, "description": "busy"}})
    async def recover(name: str, api: Api) -> dict[str, Any]:
        """Partial recovery, as an operation: restart only the failed services and their
        dependents; answers once it is done."""
        return await api.engine.recover(name)

    @router.get("/events/latest", tags=["events"], dependencies=[allow("events", "read")])
    async def latest_event(api: Api) -> dict[str, int]:
        """The sequence number of the newest event, to follow from "now"."""
        return {"seq": await streams.latest_seq(api.engine.store)}

    @router.get("/stacks/{name}/logs", tags=["logs"], dependencies=[allow("services", "read")],
                responses={200: {"content": {"text/plain": {}},
                                 "description": "lines prefixed with 'instance | '"}})
    async def logs(name: str, api: Api, service: str | None = None,
                   tail: Annotated[int | None, Query(ge=0)] = None,
                   follow: bool = False) -> Response:
        files = api.engine.log_files(name, service)
        if follow:
            lines = streams.log_lines(files, tail=tail, closing=api.closing)
            return StreamingResponse(lines, media_type="text/plain; charset=utf-8")
        text = await asyncio.to_thread(streams.tail_text, files, tail)
        return Response("".join(text), media_type="text/plain; charset=utf-8")

    return router


async def _result_of(task: asyncio.Task[DeployResult], stack: str) -> DeployResult:
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if task.cancelled():  # the deploy itself was cancelled, not this request
            raise ShipyardError(f"the deploy of {stack} was cancelled",
                                hint="the stack was stopped while it deployed") from None
        raise


def _consume(task: asyncio.Task[DeployResult]) -> None:
    """A deploy awaited by nobody must not log "exception was never retrieved"."""
    if not task.cancelled():
        task.exception()


async def _instance_counts(engine: Engine) -> dict[str, tuple[int, int]]:
    counts: dict[str, tuple[int, int]] = {}
    for rec in await engine.instances():
        total, ready = counts.get(rec.stack, (0, 0))
        counts[rec.stack] = (total + 1, ready + int(rec.ready))
    return counts


async def _unknown_stack(engine: Engine, name: str) -> NotFoundError:
    names = sorted(r.name for r in await engine.stacks())
    return NotFoundError(f"no stack named {name}", hint=f"known: {', '.join(names) or 'none'}")


async def _only_stack(engine: Engine) -> str:
    names = sorted(r.name for r in await engine.stacks())
    if len(names) == 1:
        return names[0]
    raise NotFoundError("a service filter needs a stack", hint=f"known stacks: "
                        f"{', '.join(names) or 'none'}")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ShipyardError)
    async def shipyard_error(request: Request, exc: ShipyardError) -> JSONResponse:
        # every error answer goes through the one redaction function (secrets.md)
        return JSONResponse(redact_any(error_body(exc)), status_code=error_status(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}"
            for err in exc.errors())
        body = ErrorBody(error=f"invalid request: {problems}", exit_code=2, kind="InputError")
        details = jsonable_encoder(exc.errors(), custom_encoder={Exception: str})
        return JSONResponse(redact_any(body.model_dump() | {"details": details}),
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = ErrorBody(error=redact(str(exc.detail)),
                         exit_code=2 if exc.status_code < 500 else 1,
                         kind="NotFoundError" if exc.status_code == 404 else "ShipyardError")
        return JSONResponse(body.model_dump(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path,
                  exc_info=exc)
        body = ErrorBody(error=redact(f"internal error: {type(exc).__name__}: {exc}"),
                         exit_code=1, kind="ShipyardError", hint="see the server log")
        return JSONResponse(body.model_dump(), status_code=500)
