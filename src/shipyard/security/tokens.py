"""Bearer tokens: `shy_<id>_<secret>`, shown once, stored as an Argon2id hash.

The id (12 hex digits) is public: it names the token in `token ls`, `token revoke` and the
audit trail, and finds the one stored hash to check, so a verification costs one slow hash
whatever the number of tokens. A token verified once is remembered (by the SHA-256 of the
whole token) for `cache_seconds`, so the slow hash is paid once per token and period, not on
every request; revoking a token forgets it at once, and expiry is checked on every request.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from shipyard.security.errors import AuthenticationError, SecurityConfigError
from shipyard.security.private_db import open_private_db

PREFIX = "shy_"
ID_LENGTH = 12
_HASHER = PasswordHasher()  # Argon2id, the library's recommended parameters (RFC 9106)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    role TEXT NOT NULL,
    stack TEXT,
    name TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    created_by TEXT NOT NULL DEFAULT '',
    expires_at REAL,
    revoked_at REAL
);
"""


@dataclass(frozen=True)
class TokenRecord:
    id: str
    role: str
    stack: str | None
    name: str
    created_at: float
    created_by: str
    expires_at: float | None
    revoked_at: float | None

    def state(self, now: float | None = None) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and (now or time.time()) >= self.expires_at:
            return "expired"
        return "active"

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "role": self.role, "stack": self.stack, "name": self.name,
                "created_at": self.created_at, "created_by": self.created_by,
                "expires_at": self.expires_at, "revoked_at": self.revoked_at,
                "state": self.state()}


def split_token(token: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed token, else None."""
    if not token.startswith(PREFIX):
        return None
    ident, sep, secret = token[len(PREFIX):].partition("_")
    if len(ident) != ID_LENGTH or not sep or len(secret) < 32 or not all(
            c in "0123456789abcdef" for c in ident):
        return None
    return ident, secret


class TokenStore:
    """The tokens of one home, in their own SQLite file (mode 0600)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db, self._lock = open_private_db(self.path, _SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def create(self, role: str, *, stack: str | None = None, ttl: float | None = None,
               name: str = "", created_by: str = "") -> tuple[str, TokenRecord]:
        """A new token: (the token itself, shown once; its record)."""
        if ttl is not None and ttl <= 0:
            raise SecurityConfigError("a token's lifetime must be positive")
        ident, secret = secrets.token_hex(ID_LENGTH // 2), secrets.token_urlsafe(32)
        token = f"{PREFIX}{ident}_{secret}"
        now = time.time()
        record = TokenRecord(ident, role, stack, name, now, created_by,
                             now + ttl if ttl is not None else None, None)
        digest = _HASHER.hash(secret)
        with self._lock:
            self._db.execute(
                "INSERT INTO tokens (id, hash, role, stack, name, created_at, created_by, "
                "expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (ident, digest, role, stack, name, now, created_by, record.expires_at))
        return token, record

    def get(self, ident: str) -> tuple[TokenRecord, str] | None:
        """A record and its stored hash."""
        with self._lock:
            row = self._db.execute(
                "SELECT id, role, stack, name, created_at, created_by, expires_at, "
                "revoked_at, hash FROM tokens WHERE id = ?", (ident,)).fetchone()
        if row is None:
            return None
        return TokenRecord(*row[:8]), row[8]

    def list(self) -> list[TokenRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, role, stack, name, created_at, created_by, expires_at, "
                "revoked_at FROM tokens ORDER BY created_at, id").fetchall()
        return [TokenRecord(*row) for row in rows]

    def revoke(self, ident: str) -> TokenRecord | None:
        with self._lock:
            self._db.execute("UPDATE tokens SET revoked_at = ? WHERE id = ? AND "
                             "revoked_at IS NULL", (time.time(), ident))
        found = self.get(ident)
        return found[0] if found else None


class TokenVerifier:
    """Checks bearer tokens against a `TokenStore`, remembering the good ones a while."""

    def __init__(self, store: TokenStore, cache_seconds: float = 60.0,
                 max_entries: int = 10_000) -> None:
        self.store = store
        self.cache_seconds = cache_seconds
        self.max_entries = max_entries
        self._cache: OrderedDict[str, tuple[TokenRecord, float]] = OrderedDict()
        self._pending: dict[str, asyncio.Future[TokenRecord]] = {}
        self._revoked: set[str] = set()  # revoked while a verification was under way
        self.hashes = 0  # slow hashes computed (for tests and the benchmark)

    async def verify(self, token: str) -> TokenRecord:
        """The token's record, or `AuthenticationError`."""
        key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[1] > now:
            return self._usable(hit[0])
        if hit is not None:
            del self._cache[key]
        pending = self._pending.get(key)
        if pending is not None:  # the same token is being hashed for another request
            return self._usable(await asyncio.shield(pending))
        future: asyncio.Future[TokenRecord] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            record = await asyncio.to_thread(self._check, token)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning if nobody waits
            raise
        else:
            future.set_result(record)
        finally:
            self._pending.pop(key, None)
        self._cache[key] = (record, time.monotonic() + self.cache_seconds)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return self._usable(record)

    def _check(self, token: str) -> TokenRecord:
        parts = split_token(token)
        if parts is None:
            raise AuthenticationError("invalid token: not a Shipyard token",
                                      hint="tokens look like shy_<id>_<secret>")
        ident, secret = parts
        found = self.store.get(ident)
        if found is None:
            raise AuthenticationError(f"invalid token {ident}: no such token")
        record, digest = found
        self.hashes += 1
        try:
            _HASHER.verify(digest, secret)
        except (VerificationError, InvalidHashError):
            raise AuthenticationError(f"invalid token {ident}: wrong secret") from None
        return record

    def forget(self, ident: str) -> None:
        """Drop every cached verification of token `ident` (it was revoked)."""
        for key in [k for k, (rec, _) in self._cache.items() if rec.id == ident]:
            del self._cache[key]

    def revoke(self, ident: str) -> TokenRecord | None:
        record = self.store.revoke(ident)
        if record is not None:
            self._revoked.add(ident)
        self.forget(ident)
        return record

    def _usable(self, record: TokenRecord) -> TokenRecord:
        if record.id in self._revoked:
            raise AuthenticationError(f"token {record.id} is revoked",
                                      hint="ask an admin for a new one")
        return _usable(record)


def _usable(record: TokenRecord) -> TokenRecord:
    state = record.state()
    if state != "active":
        raise AuthenticationError(f"token {record.id} is {state}",
                                  hint="ask an admin for a new one")
    return record
