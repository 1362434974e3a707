"""What each route declares: the one verb on the one resource it needs.

    @router.post("/stacks/{name}/services/{service}/promote",
                 dependencies=[allow("services", "promote")])

The check runs before the route, as a FastAPI dependency: it takes the identity the
middleware authenticated, finds the stack the request is about (the `{name}` path
parameter, else the `stack` query parameter, else the `stack` of a JSON body), and allows
the request or answers 403. `tests/test_security_routes.py` fails for any route of the app
that declares no permission.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Depends, Request
from fastapi.routing import APIRoute

from shipyard.security.errors import AuthenticationError
from shipyard.security.roles import ANY, Grant, Identity, Rule, authorize

ATTRIBUTE = "__shipyard_permission__"


@dataclass(frozen=True)
class Permission:
    resource: str
    verb: str
    listing: bool = False  # lists several stacks, filtering with Grant.sees

    @property
    def action(self) -> str:
        return f"{self.resource}.{self.verb}"


def allow(resource: str, verb: str, *, listing: bool = False) -> Any:
    """The dependency a route declares: `dependencies=[allow("stacks", "read")]`."""
    if ANY in (resource, verb):
        raise ValueError("a route declares one resource and one verb, not *")
    Rule.of([resource], [verb], where=f"allow({resource!r}, {verb!r})")  # known names
    permission = Permission(resource, verb, listing)

    async def check(request: Request) -> Grant:
        return await authorize_request(request, permission)

    check.__name__ = f"allow_{resource}_{verb}"
    setattr(check, ATTRIBUTE, permission)
    return Depends(check)


def identity_of(request: Request) -> Identity:
    identity = getattr(request.state, "identity", None)
    if not isinstance(identity, Identity):  # only if the middleware is missing
        raise AuthenticationError("authentication required")
    return identity


def grant_of(request: Request) -> Grant:
    """The grant `allow` gave this request (for routes that filter a listing)."""
    grant = getattr(request.state, "grant", None)
    if not isinstance(grant, Grant):
        raise AuthenticationError("this route declares no permission")
    return grant


async def authorize_request(request: Request, permission: Permission) -> Grant:
    security = request.app.state.security
    grant = authorize(security.roles, identity_of(request), permission.resource,
                      permission.verb, await stack_of(request), listing=permission.listing)
    request.state.grant = grant
    return grant


async def stack_of(request: Request) -> str | None:
    """The stack a request is about, if it names one."""
    name = request.path_params.get("name")
    if name:
        return str(name)
    if request.query_params.get("stack"):
        return request.query_params["stack"]
    if request.method in ("POST", "PUT", "PATCH") and request.headers.get(
            "content-type", "").startswith("application/json"):
        try:
            body = await request.json()  # FastAPI has read and cached it already
        except ValueError:
            return None
        stack = body.get("stack") if isinstance(body, dict) else None
        if isinstance(stack, dict) and isinstance(stack.get("name"), str):
            return str(stack["name"])
        if isinstance(stack, str) and stack:
            return stack
    return None


def permission_of(route: Any) -> Permission | None:
    """The permission a route declares, or None."""
    if not isinstance(route, APIRoute):
        return None
    pending = list(route.dependant.dependencies)
    while pending:
        dep = pending.pop()
        found = getattr(dep.call, ATTRIBUTE, None)
        if isinstance(found, Permission):
            return found
        pending.extend(dep.dependencies)
    return None


def iter_routes(routes: Any, prefix: str = "") -> Any:
    """(path, route) of every route under `routes`, included routers flattened (FastAPI
    includes them lazily since 0.16x, as wrappers of the original router)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            context = getattr(route, "include_context", None)
            yield from iter_routes(included.routes, prefix + getattr(context, "prefix", ""))
        else:
            yield prefix + str(getattr(route, "path", route)), route


def undeclared(app: Any) -> list[str]:
    """`METHOD PATH` of every route of `app` that declares no permission."""
    missing = []
    for path, route in iter_routes(app.routes):
        if permission_of(route) is None:
            methods = ",".join(sorted(getattr(route, "methods", None) or ["*"]))
            missing.append(f"{methods} {path}")
    return missing


def require_declared(app: Any) -> None:
    """Refuse to build an app with a route that declares no permission: deny by default."""
    missing = undeclared(app)
    if missing:
        raise RuntimeError(f"route {missing[0]} declares no permission: add "
                           "dependencies=[allow(RESOURCE, VERB)] to it "
                           "(see shipyard.security.permissions)")
