"""The API's front door, one pure ASGI middleware around every route: request id, rate
limit of authentication failures, authentication, body size limit, audit.

Authorization itself is per route (`permissions.allow`), because only the route knows what
it does; the middleware makes sure nobody reaches a route unauthenticated, and records the
outcome of every mutating or refused request in the audit trail.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from typing import Any

from shipyard.security.audit import AuditEntry
from shipyard.security.errors import (
    AuthenticationError,
    PayloadTooLarge,
    RateLimited,
    SecurityError,
)
from shipyard.security.guard import Security
from shipyard.security.peercred import ASGIApp, Receive, Scope, Send, connection_of
from shipyard.security.permissions import permission_of
from shipyard.security.roles import Grant, Identity
from shipyard.security.tokens import split_token

log = logging.getLogger("shipyard.security")

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
REFUSED = frozenset({401, 403, 413, 429})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_DETAIL_BYTES = 2048


class _Reply:
    """The response side: adds X-Request-Id, notes the status, keeps the start of an error
    body for the audit, and can swallow what the app sends (after a too-large body)."""

    def __init__(self, send: Send, request_id: str) -> None:
        self._send = send
        self.request_id = request_id
        self.status: int | None = None
        self.error_text = b""
        self.swallow = False

    async def send(self, message: Any) -> None:
        if self.swallow:
            return
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            headers = list(message.get("headers") or [])
            headers.append((b"x-request-id", self.request_id.encode()))
            message = {**message, "headers": headers}
        elif (message["type"] == "http.response.body" and self.status is not None
              and self.status >= 400 and len(self.error_text) < _DETAIL_BYTES):
            self.error_text += bytes(message.get("body", b""))[:_DETAIL_BYTES]
        await self._send(message)

    async def error(self, exc: SecurityError, headers: dict[str, str] | None = None) -> None:
        body = json.dumps({"error": exc.message, "hint": exc.hint, "exit_code": exc.exit_code,
                           "kind": type(exc).__name__, "issues": []}).encode()
        raw = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
        raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        self.swallow = False
        self.error_text = body
        await self.send({"type": "http.response.start", "status": exc.http_status,
                         "headers": raw})
        await self.send({"type": "http.response.body", "body": body})

    def detail(self) -> str:
        try:
            return str(json.loads(self.error_text).get("error", ""))[:500]
        except (ValueError, AttributeError):
            return self.error_text[:200].decode(errors="replace")


class SecurityMiddleware:
    def __init__(self, app: ASGIApp, security: Security) -> None:
        self.app = app
        self.security = security

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # no route speaks it; never unauthenticated
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sec = self.security
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers") or []}
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex[:16]
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        connection = connection_of(scope)
        source = connection.source if connection else "in-process"
        key = connection.rate_key if connection else "in-process"
        reply = _Reply(send, request_id)
        started = time.time()
        try:
            sec.check_rate(key)
            identity = await sec.authenticate(connection, headers)
        except RateLimited as exc:
            await reply.error(exc, {"retry-after": str(exc.retry_after)})
            return
        except AuthenticationError as exc:
            actor = _claimed(headers.get("authorization", ""))
            self._record(scope, reply, started, actor=actor, source=source,
                         status=401, outcome="unauthenticated", detail=exc.message,
                         action="authenticate")
            if sec.limiter.failure(key):
                self._record(scope, reply, started, actor=actor, source=source, status=429,
                             outcome="rate-limited", action="authenticate",
                             detail=f"{sec.limiter.limit} authentication failures within "
                                    f"{sec.limiter.window:.0f}s: source blocked")
            await reply.error(exc, {"www-authenticate": 'Bearer realm="shipyard"'})
            return
        state["identity"] = identity
        try:
            length = int(headers.get("content-length", "0") or 0)
        except ValueError:
            length = 0
        too_large = length > sec.max_body
        received = 0

        async def limited() -> Any:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > sec.max_body:  # a chunked body without a Content-Length
                    too_large = reply.swallow = True
                    return {"type": "http.disconnect"}
            return message

        try:
            if not too_large:
                await self.app(scope, limited, reply.send)
        except Exception:
            if not too_large:
                reply.status = reply.status or 500
                raise
        finally:
            if too_large and reply.status is None:
                await reply.error(PayloadTooLarge(
                    f"the request body is over the limit of {sec.max_body} bytes"))
            if scope["method"] in MUTATING or (reply.status or 500) in REFUSED:
                self._audit_request(scope, reply, started, identity, source)

    def _audit_request(self, scope: Scope, reply: _Reply, started: float,
                       identity: Identity, source: str) -> None:
        status = reply.status or 500
        outcome = ("ok" if status < 400 else "denied" if status in REFUSED
                   else "error" if status >= 500 else "failed")
        state = scope.get("state") or {}
        detail = str(state.get("audit_detail") or "") if status < 400 else reply.detail()
        self._record(scope, reply, started, actor=identity.actor, role=identity.role,
                     source=source, status=status, outcome=outcome, detail=detail)

    def _record(self, scope: Scope, reply: _Reply, started: float, *, actor: str,
                source: str, status: int, outcome: str, detail: str,
                role: str | None = None, action: str | None = None) -> None:
        state = scope.get("state") or {}
        grant: Grant | None = state.get("grant")
        params = scope.get("path_params") or {}
        route = scope.get("route")
        permission = permission_of(route)
        if action is None:
            action = (grant.action if grant else permission.action if permission
                      else f"{scope['method']} {getattr(route, 'path', scope['path'])}")
        entry = AuditEntry(
            ts=started, request_id=reply.request_id, actor=actor, role=role, source=source,
            method=scope["method"], path=scope["path"], action=action,
            target=_target(params, grant), status=status, outcome=outcome, detail=detail)
        try:
            self.security.audit.append(entry)
        except Exception as exc:  # the answer is given already: say it loudly, go on
            log.error("could not write the audit trail (%s): %s %s by %s -> %s",
                      exc, entry.method, entry.path, entry.actor, entry.status)


def _target(params: dict[str, Any], grant: Grant | None) -> str | None:
    stack = params.get("name") or (grant.stack if grant else None)
    parts = [f"stack:{stack}"] if stack else []
    if params.get("service"):
        parts.append(f"service:{params['service']}")
    for key in ("token_id", "op_id", "secret"):
        if params.get(key) is not None:
            parts.append(f"{key.removesuffix('_id')}:{params[key]}")
    return " ".join(parts) or None


def _claimed(authorization: str) -> str:
    """Who a refused request claimed to be, for the audit (never the secret)."""
    _, _, token = authorization.partition(" ")
    parts = split_token(token.strip())
    return f"token:{parts[0]}" if parts else "anonymous"
