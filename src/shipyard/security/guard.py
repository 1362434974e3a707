"""`Security`: everything the API needs to know who asks and whether they may — the
configuration, the roles, the tokens, the audit trail and the failure limiter of a home.

Authentication, in order: a bearer token (on any listener); else, on the unix socket, the
peer's uid (the socket's owner and root are admin, other users get the role security.yaml
gives them); else, on TCP, a verified client certificate (its OU is its role). Anything
else is a 401. A connection the server did not describe (the app called in-process, without
a server) is the process itself, admin, only when the app was built for that.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path

from shipyard.security.audit import AuditLog
from shipyard.security.config import SecurityConfig
from shipyard.security.errors import AuthenticationError, RateLimited
from shipyard.security.peercred import Connection
from shipyard.security.roles import Identity, RoleBook
from shipyard.security.tokens import TokenStore, TokenVerifier

TOKENS_FILE = "tokens.db"
AUDIT_FILE = "audit.db"
WINDOW = 60.0  # seconds over which authentication failures are counted


class FailureLimiter:
    """At most `limit` authentication failures per source in `window` seconds; past that,
    the source is refused (429) without being checked until its failures age out."""

    def __init__(self, limit: int, window: float = WINDOW, max_sources: int = 10_000) -> None:
        self.limit = limit
        self.window = window
        self.max_sources = max_sources
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, key: str, now: float) -> deque[float] | None:
        found = self._failures.get(key)
        if found is None:
            return None
        while found and found[0] <= now - self.window:
            found.popleft()
        if not found:
            del self._failures[key]
            return None
        return found

    def retry_after(self, key: str) -> int:
        """0 if `key` may try, else the seconds until it may."""
        now = time.monotonic()
        recent = self._recent(key, now)
        if recent is None or len(recent) < self.limit:
            return 0
        return max(1, math.ceil(recent[0] + self.window - now))

    def failure(self, key: str) -> bool:
        """Count a failure; True if it is the one that blocks the source."""
        now = time.monotonic()
        recent = self._recent(key, now)
        if recent is None:
            if len(self._failures) >= self.max_sources:  # forget the oldest source
                self._failures.pop(next(iter(self._failures)))
            recent = self._failures[key] = deque()
        recent.append(now)
        return len(recent) == self.limit


class Security:
    def __init__(self, config: SecurityConfig, *, trust_in_process: bool = False,
                 owner_uid: int | None = None) -> None:
        self.config = config
        self.home = config.home
        self.roles: RoleBook = config.roles
        self.tokens = TokenStore(self.home / TOKENS_FILE)
        self.verifier = TokenVerifier(self.tokens, cache_seconds=config.limits.token_cache)
        self.audit = AuditLog(self.home / AUDIT_FILE)
        self.limiter = FailureLimiter(config.limits.auth_failures_per_minute)
        self.trust_in_process = trust_in_process
        self.owner_uid = os.getuid() if owner_uid is None else owner_uid
        self.max_body = config.limits.max_body

    @classmethod
    def for_home(cls, home: Path, *, trust_in_process: bool = False) -> Security:
        return cls(SecurityConfig.load(Path(home)), trust_in_process=trust_in_process)

    def close(self) -> None:
        self.tokens.close()
        self.audit.close()

    def check_rate(self, key: str) -> None:
        wait = self.limiter.retry_after(key)
        if wait:
            raise RateLimited("too many authentication failures from this source",
                              hint=f"retry in {wait}s", retry_after=wait)

    async def authenticate(self, connection: Connection | None,
                           headers: Mapping[str, str]) -> Identity:
        authorization = headers.get("authorization")
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthenticationError("unsupported Authorization header",
                                          hint="send `Authorization: Bearer <token>`")
            record = await self.verifier.verify(token.strip())
            return Identity("token", record.id, record.role, record.stack,
                            detail=record.name)
        if connection is None:
            if self.trust_in_process:
                return Identity("local", "in-process", "admin")
            raise AuthenticationError("authentication required: unknown connection")
        if connection.transport == "unix":
            return self._unix_user(connection)
        if connection.cert is not None:
            return Identity("cert", connection.cert.name, connection.cert.role,
                            detail=f"sha256:{connection.cert.fingerprint}")
        raise AuthenticationError("authentication required",
                                  hint="pass a token (--token or SHIPYARD_TOKEN) or a client "
                                       "certificate (--cert/--key)")

    def _unix_user(self, connection: Connection) -> Identity:
        creds = connection.creds
        if creds is None:
            raise AuthenticationError("cannot tell who is connected to the unix socket "
                                      "(no peer credentials on this system)",
                                      hint="use a token")
        user = creds.user
        detail = f"uid {creds.uid}"
        if creds.uid in (self.owner_uid, 0):
            return Identity("user", user, "admin", detail=detail)
        users = self.config.unix.users
        role = users.get(user, users.get(str(creds.uid), self.config.unix.default_role))
        return Identity("user", user, role, detail=detail)
