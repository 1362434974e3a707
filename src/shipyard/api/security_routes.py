"""The API's own security routes: who am I, tokens, stored secrets, the audit trail."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from shipyard.errors import InputError, NotFoundError
from shipyard.security import redact
from shipyard.security.errors import PermissionDenied, SecurityConfigError
from shipyard.security.guard import Security
from shipyard.security.permissions import allow, grant_of, identity_of
from shipyard.security.secret_store import SecretStore, check_name
from shipyard.spec.units import parse_duration

_STACK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


class TokenRequest(BaseModel):
    """Body of `POST /v1/tokens`."""

    role: str = Field(description="viewer, operator, admin or a role of security.yaml")
    stack: str | None = Field(None, description="limit the token to this stack")
    ttl: str | None = Field("30d", description="lifetime (30d, 12h...), or 'never'")
    name: str = Field("", max_length=200, description="a note: who or what it is for")


def parse_ttl(text: str | None) -> float | None:
    if text is None or text.strip().lower() in ("never", "none", ""):
        return None
    try:
        ttl = parse_duration(text)
    except ValueError as exc:
        raise SecurityConfigError(f"invalid token lifetime: {exc}") from None
    if ttl <= 0:
        raise SecurityConfigError("a token's lifetime must be positive",
                                  hint="e.g. 30d, or 'never'")
    return ttl


def _security(request: Request) -> Security:
    security: Security = request.app.state.security
    return security


def _secret_store(request: Request) -> SecretStore:
    return SecretStore(request.app.state.api.engine.config.home)


def _secret_value(body: bytes) -> str:
    """The `value` of a `{"value": "..."}` body; errors never quote the body."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InputError("the body must be a JSON object {\"value\": \"...\"}") from None
    value = document.get("value") if isinstance(document, dict) else None
    if not isinstance(value, str):
        raise InputError("the body must be a JSON object with a string \"value\"")
    if set(document) != {"value"}:
        raise InputError("the body takes only \"value\"")
    return value


def security_router() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["security"])

    @router.get("/whoami", dependencies=[allow("system", "read")])
    async def whoami(request: Request) -> dict[str, Any]:
        """The identity this request was authenticated as, and its role."""
        identity = identity_of(request)
        role = _security(request).roles.get(identity.role)
        return identity.view() | {"role_description": role.description if role else None}

    @router.get("/tokens", dependencies=[allow("tokens", "read")])
    async def list_tokens(request: Request) -> list[dict[str, Any]]:
        """Every token (never its secret): role, stack, expiry, state."""
        return [t.view() for t in _security(request).tokens.list()]

    @router.post("/tokens", status_code=201, dependencies=[allow("tokens", "create")])
    async def create_token(body: TokenRequest, request: Request) -> JSONResponse:
        """A new token; its secret is in this answer only."""
        security = _security(request)
        grant = grant_of(request)
        role = security.roles.require(body.role)
        if body.stack is not None and not _STACK_NAME.match(body.stack):
            raise SecurityConfigError(f"invalid stack name {body.stack!r}")
        creator = grant.identity
        if creator.stack is not None and body.stack != creator.stack:
            raise PermissionDenied(f"{creator.actor} may only create tokens limited to "
                                   f"stack {creator.stack}")
        if not grant.role.covers(role, body.stack):
            raise PermissionDenied(f"{creator.actor} (role {grant.role.name}) may not create "
                                   f"a token with more rights than its own (role {role.name})")
        ttl = parse_ttl(body.ttl)
        token, record = await asyncio.to_thread(
            security.tokens.create, role.name, stack=body.stack, ttl=ttl, name=body.name,
            created_by=creator.actor)
        request.state.audit_detail = (f"created token {record.id} (role {role.name}"
                                      + (f", stack {body.stack}" if body.stack else "") + ")")
        return JSONResponse(record.view() | {"token": token}, status_code=201)

    @router.delete("/tokens/{token_id}", dependencies=[allow("tokens", "delete")])
    async def revoke_token(token_id: str, request: Request) -> dict[str, Any]:
        """Revoke a token: refused from the next request on."""
        record = _security(request).verifier.revoke(token_id)
        if record is None:
            raise NotFoundError(f"no token {token_id}", hint="see `shipyard token ls`")
        request.state.audit_detail = f"revoked token {token_id}"
        return record.view()

    @router.get("/secrets", dependencies=[allow("secrets", "read")])
    async def list_secrets(request: Request) -> list[dict[str, Any]]:
        """The stored secrets' names and times; a value is never answered."""
        found = await asyncio.to_thread(_secret_store(request).list)
        return [s.view() for s in found]

    @router.put("/secrets/{secret}", dependencies=[allow("secrets", "create")],
                responses={201: {"description": "created"}, 200: {"description": "replaced"}},
                openapi_extra={"requestBody": {"required": True, "content": {
                    "application/json": {"schema": {
                        "type": "object", "required": ["value"],
                        "properties": {"value": {"type": "string", "writeOnly": True}}}}}}})
    async def set_secret(secret: str, request: Request) -> JSONResponse:
        """Store a secret's value (encrypted at rest). The body is read here, not by a
        model: a malformed body is refused without being quoted back."""
        check_name(secret)
        value = _secret_value(await request.body())
        created = await asyncio.to_thread(_secret_store(request).set, secret, value)
        redact.register(secret, value)  # known to this process from now on: redacted
        request.state.audit_detail = f"{'created' if created else 'replaced'} secret {secret}"
        return JSONResponse({"name": secret, "created": created},
                            status_code=201 if created else 200)

    @router.delete("/secrets/{secret}", dependencies=[allow("secrets", "delete")])
    async def delete_secret(secret: str, request: Request) -> dict[str, Any]:
        """Forget a stored secret (instances that run with it keep their copy)."""
        if not await asyncio.to_thread(_secret_store(request).delete, secret):
            raise NotFoundError(f"no stored secret {secret}", hint="see `shipyard secret ls`")
        request.state.audit_detail = f"deleted secret {secret}"
        return {"name": secret, "deleted": True}

    @router.get("/audit", dependencies=[allow("audit", "read")])
    async def audit(request: Request, after: Annotated[int, Query(ge=0)] = 0,
                    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
                    ) -> list[dict[str, Any]]:
        """Audit rows after `after`, oldest first."""
        return [e.view() for e in _security(request).audit.entries(after=after, limit=limit)]

    @router.get("/audit/verify", dependencies=[allow("audit", "read")])
    async def verify_audit(request: Request) -> dict[str, Any]:
        """Recompute the hash chain of the audit trail."""
        report = await asyncio.to_thread(_security(request).audit.verify)
        return report.view()

    return router
