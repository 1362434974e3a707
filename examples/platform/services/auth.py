"""auth: issues and validates HMAC-signed tokens.

    POST /token      body {"user", "password"} → {"token", "user", "roles", "expires_at"}
                     or 401
    GET  /validate   Authorization: Bearer <token> (or ?token=) → {"user", "roles",
                     "expires_at"} or 401

A token is `<payload>.<signature>`, both base64url: the payload is JSON {sub, roles, iat,
exp, iss}, the signature HMAC-SHA256 of the payload part. Users (name, roles, salted
password hash) are read from db under `users/<name>` (seeded by migrate). The signing
secret is $AUTH_SECRET, else the db key `auth/secret`, created once (if absent) by
whichever replica needs it first, so every replica signs alike. The token lifetime is
`auth.token_ttl` from config, re-read every 10 s (default 3600 s).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))

from common import App, HttpError, Request, Unavailable, Upstream, arguments, quote

CONFIG_REFRESH = 10.0


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    def __init__(self, db: Upstream, app: App) -> None:
        self.db = db
        self.app = app
        self.lock = threading.Lock()
        self.key: bytes | None = os.environ.get("AUTH_SECRET", "").encode() or None

    def secret(self) -> bytes:
        with self.lock:
            if self.key is None:
                candidate = secrets.token_hex(32)
                status, body = self.db.put("/kv/auth/secret",
                                           {"value": candidate, "if_absent": True})
                if status not in (200, 409):
                    raise HttpError(503, f"cannot read the signing secret: db → {status}")
                self.key = body["value"].encode()
                self.app.log("signing secret " + ("created" if status == 200 else "loaded"))
            return self.key

    def sign(self, claims: dict[str, Any]) -> str:
        payload = b64(json.dumps(claims, separators=(",", ":")).encode())
        mac = hmac.new(self.secret(), payload.encode(), hashlib.sha256).digest()
        return f"{payload}.{b64(mac)}"

    def verify(self, token: str) -> dict[str, Any]:
        payload, _, signature = token.partition(".")
        try:
            expected = hmac.new(self.secret(), payload.encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(expected, unb64(signature)):
                raise HttpError(401, "bad signature")
            claims = json.loads(unb64(payload))
        except (ValueError, TypeError):
            raise HttpError(401, "malformed token") from None
        if not isinstance(claims, dict) or claims.get("exp", 0) <= time.time():
            raise HttpError(401, "token expired")
        return claims


def main() -> int:
    parser = arguments("auth: HMAC tokens")
    args = parser.parse_args()
    app = App("auth", args.port, args.host)
    db = Upstream("db")
    config = Upstream("config")
    signer = Signer(db, app)
    settings: dict[str, Any] = {"token_ttl": 3600.0, "issuer": "platform-auth", "at": 0.0}

    def auth_settings() -> dict[str, Any]:
        if config.configured and time.monotonic() - settings["at"] > CONFIG_REFRESH:
            settings["at"] = time.monotonic()
            try:
                status, body = config.get("/config/auth", attempts=1, timeout=0.5)
                if status == 200 and isinstance(body, dict):
                    settings.update({k: body[k] for k in ("token_ttl", "issuer") if k in body})
            except Unavailable as exc:
                app.log(f"config unavailable, keeping token_ttl={settings['token_ttl']}: {exc}")
        return settings

    def secret_ready() -> tuple[bool, str]:
        try:
            signer.secret()
        except (Unavailable, HttpError) as exc:
            return False, str(exc)
        return True, "signing secret loaded"

    app.ready_when_up(db)
    if config.configured:
        app.ready_when_up(config)
    app.ready_when("secret", secret_ready)

    @app.route("POST", "/token")
    def token(request: Request) -> Any:
        body = request.json({})
        if not isinstance(body, dict) or not isinstance(body.get("user"), str):
            raise HttpError(400, 'body must be {"user": ..., "password": ...}')
        try:
            status, found = db.get(f"/kv/users/{quote(body['user'])}")
        except Unavailable as exc:
            raise HttpError(503, f"db unavailable: {exc}") from None
        if status != 200:
            app.metrics.inc("platform_auth_denied_total")
            raise HttpError(401, "unknown user or wrong password")
        user = found["value"]
        given = hashlib.sha256((user["salt"] + str(body.get("password", ""))).encode())
        if not hmac.compare_digest(given.hexdigest(), user["password_sha256"]):
            app.metrics.inc("platform_auth_denied_total")
            raise HttpError(401, "unknown user or wrong password")
        conf = auth_settings()
        now = time.time()
        claims = {"sub": user["name"], "roles": user.get("roles", []), "iat": int(now),
                  "exp": int(now + float(conf["token_ttl"])), "iss": conf["issuer"]}
        app.metrics.inc("platform_auth_issued_total")
        return {"token": signer.sign(claims), "user": claims["sub"], "roles": claims["roles"],
                "expires_at": claims["exp"]}

    @app.route("GET", "/validate")
    def validate(request: Request) -> Any:
        raw = request.bearer()
        if not raw:
            raise HttpError(401, "no token: send Authorization: Bearer <token>")
        try:
            claims = signer.verify(raw)
        except Unavailable as exc:
            raise HttpError(503, f"db unavailable: {exc}") from None
        app.metrics.inc("platform_auth_validated_total")
        return {"user": claims["sub"], "roles": claims.get("roles", []),
                "expires_at": claims["exp"]}

    app.metrics.describe("platform_auth_issued_total", "counter", "Tokens issued")
    app.metrics.describe("platform_auth_validated_total", "counter", "Tokens found valid")
    app.metrics.describe("platform_auth_denied_total", "counter", "Logins refused")
    return app.run()


if __name__ == "__main__":
    sys.exit(main())
