"""The security layer's parts on their own: roles and their checks, security.yaml, tokens
and their cache, the audit chain, the failure limiter, certificates; and the rule that
every route of the app declares a permission."""

from __future__ import annotations

import asyncio
import sqlite3
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from fastapi import FastAPI

from shipyard import Engine, EngineConfig
from shipyard.api.app import create_app
from shipyard.security.audit import AuditEntry, AuditLog, verify_file
from shipyard.security.config import SecurityConfig
from shipyard.security.errors import AuthenticationError, PermissionDenied, SecurityConfigError
from shipyard.security.guard import FailureLimiter
from shipyard.security.permissions import (
    allow,
    iter_routes,
    permission_of,
    require_declared,
    undeclared,
)
from shipyard.security.roles import BUILTIN, Identity, RoleBook, Rule, authorize
from shipyard.security.tls import (
    client_context,
    create_ca,
    issue_client,
    issue_server,
    server_context,
)
from shipyard.security.tokens import TokenStore, TokenVerifier, split_token

BOOK = RoleBook()


def who(role: str | None, stack: str | None = None) -> Identity:
    return Identity("token", "t1", role, stack)


# -- roles ---------------------------------------------------------------------------------

@pytest.mark.parametrize("role, resource, verb, allowed", [
    ("viewer", "stacks", "read", True), ("viewer", "events", "read", True),
    ("viewer", "stacks", "deploy", False), ("viewer", "services", "restart", False),
    ("viewer", "tokens", "read", False), ("viewer", "audit", "read", False),
    ("viewer", "secrets", "read", False),
    ("operator", "services", "restart", True), ("operator", "stacks", "recover", True),
    ("operator", "services", "rollback", True), ("operator", "services", "scale", True),
    ("operator", "services", "promote", True), ("operator", "operations", "abort", True),
    ("operator", "stacks", "deploy", False), ("operator", "stacks", "delete", False),
    ("operator", "tokens", "create", False), ("operator", "secrets", "read", False),
    ("admin", "tokens", "create", True), ("admin", "secrets", "delete", True),
])
def test_builtin_roles(role: str, resource: str, verb: str, allowed: bool) -> None:
    if allowed:
        grant = authorize(BOOK, who(role), resource, verb, "web")
        assert grant.action == f"{resource}.{verb}" and grant.stack == "web"
    else:
        with pytest.raises(PermissionDenied, match=f"may not {verb} {resource}"):
            authorize(BOOK, who(role), resource, verb, "web")


def test_stack_scopes() -> None:
    scoped = who("operator", stack="web")
    assert authorize(BOOK, scoped, "services", "restart", "web").stack == "web"
    with pytest.raises(PermissionDenied, match="limited to stack web"):
        authorize(BOOK, scoped, "services", "restart", "db")
    with pytest.raises(PermissionDenied, match="across stacks"):
        authorize(BOOK, scoped, "events", "read", None)
    assert authorize(BOOK, scoped, "system", "read", None).stack is None  # health, whoami
    listing = authorize(BOOK, scoped, "stacks", "read", None, listing=True)
    assert listing.sees("web") and not listing.sees("db")
    with pytest.raises(PermissionDenied, match="no role"):
        authorize(BOOK, who(None), "stacks", "read", "web")
    with pytest.raises(PermissionDenied, match="unknown role ghost"):
        authorize(BOOK, who("ghost"), "stacks", "read", "web")


def test_custom_roles_from_security_yaml(tmp_path: Path) -> None:
    (tmp_path / "security.yaml").write_text("""
roles:
  team-a:
    description: deploys team A's stacks
    rules:
      - {resources: [stacks, services], verbs: [read, deploy, restart], stacks: ["team-a-*"]}
      - {resources: [events], verbs: [read]}
unix: {users: {alice: team-a}, default_role: viewer}
limits: {max_body: 1MiB, auth_failures_per_minute: 5, token_cache: 2m}
""")
    config = SecurityConfig.load(tmp_path)
    assert (config.limits.max_body, config.limits.token_cache) == (2**20, 120.0)
    team = config.roles.require("team-a")
    assert team.allows("stacks", "deploy", "team-a-web")
    assert not team.allows("stacks", "deploy", "team-b-web")
    assert not team.allows("stacks", "deploy", None)
    assert team.allows("events", "read", None) and not team.allows("stacks", "delete", "team-a-x")
    listing = authorize(config.roles, who("team-a"), "stacks", "read", None, listing=True)
    assert listing.sees("team-a-1") and not listing.sees("other")
    assert config.tls_files() is None


@pytest.mark.parametrize("text, message", [
    ("roles: {x: {rules: [{resources: [stack], verbs: [read]}]}}", "unknown resource 'stack'"),
    ("roles: {x: {rules: [{resources: [stacks], verbs: [reed]}]}}", "unknown verb 'reed'"),
    ("roles: {admin: {rules: [{resources: ['*'], verbs: ['*']}]}}", "built in"),
    ("roles: {x: {rules: []}}", "roles.x.rules"),
    ("unix: {users: {bob: chief}}", "no role named chief"),
    ("limits: {max_body: lots}", "limits.max_body"),
    ("tls: {cert: nope.crt, key: nope.key}", "no file"),
    ("surprise: 1", "surprise"),
    ("roles: [", "cannot read"),
])
def test_bad_security_yaml(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "security.yaml").write_text(text)
    with pytest.raises(SecurityConfigError, match=message) as info:
        SecurityConfig.load(tmp_path).tls_files()
    assert info.value.exit_code == 2 and "\n" not in info.value.message


def test_a_role_covers_another() -> None:
    admin, operator, viewer = BUILTIN["admin"], BUILTIN["operator"], BUILTIN["viewer"]
    assert admin.covers(operator, None) and operator.covers(viewer, None)
    assert not viewer.covers(operator, None) and not operator.covers(admin, None)
    web_only = RoleBook().roles["viewer"].__class__(
        "web-admin", (Rule.of(["*"], ["*"], ["web"]),))
    assert web_only.covers(operator, "web") and not web_only.covers(operator, None)
    assert not web_only.covers(operator, "db")


def test_routes_declare_known_permissions() -> None:
    with pytest.raises(SecurityConfigError, match="unknown verb 'launch'"):
        allow("stacks", "launch")
    with pytest.raises(ValueError):
        allow("*", "read")


# -- every route declares a permission -----------------------------------------------------

@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Engine]:
    async with Engine(EngineConfig(home=tmp_path / "h", stop_on_exit=True)) as eng:
        yield eng


async def test_every_route_declares_a_permission(engine: Engine) -> None:
    app = create_app(engine)
    assert undeclared(app) == []
    declared = {(sorted(r.methods)[0], path): permission_of(r)
                for path, r in iter_routes(app.routes)}
    assert declared[("POST", "/v1/stacks/{name}/services/{service}/restart")].action == (
        "services.restart")
    assert declared[("GET", "/openapi.json")].action == "system.read"
    assert len(declared) >= 22

    @app.post("/v1/forgotten")
    async def forgotten() -> None:
        return None

    assert undeclared(app) == ["POST /v1/forgotten"]
    with pytest.raises(RuntimeError, match="POST /v1/forgotten declares no permission"):
        require_declared(app)
    bare = FastAPI()  # FastAPI's own routes (/docs, /openapi.json) declare none either
    assert "GET,HEAD /openapi.json" in undeclared(bare)


# -- tokens --------------------------------------------------------------------------------

async def test_tokens_are_hashed_and_verified_once(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.db")
    verifier = TokenVerifier(store, cache_seconds=60)
    token, record = store.create("operator", stack="web", ttl=3600, name="ci",
                                 created_by="user:root")
    ident, secret = split_token(token) or ("", "")
    assert ident == record.id and len(secret) >= 40
    raw = (tmp_path / "tokens.db").read_bytes() + (tmp_path / "tokens.db-wal").read_bytes()
    assert secret.encode() not in raw and b"$argon2id$" in raw
    assert (tmp_path / "tokens.db").stat().st_mode & 0o077 == 0
    results = await asyncio.gather(*(verifier.verify(token) for _ in range(5)))
    assert {r.id for r in results} == {ident} and verifier.hashes == 1  # shared, then cached
    started = time.perf_counter()
    for _ in range(100):
        await verifier.verify(token)
    assert verifier.hashes == 1 and time.perf_counter() - started < 0.05
    with pytest.raises(AuthenticationError, match="wrong secret"):
        await verifier.verify(f"shy_{ident}_" + "A" * 43)
    with pytest.raises(AuthenticationError, match="no such token"):
        await verifier.verify("shy_" + "f" * 12 + "_" + "A" * 43)
    with pytest.raises(AuthenticationError, match="not a Shipyard token"):
        await verifier.verify("hunter2")
    assert verifier.revoke(ident) is not None
    with pytest.raises(AuthenticationError, match="revoked"):
        await verifier.verify(token)
    assert verifier.revoke("0" * 12) is None
    store.close()


async def test_expiry_is_checked_on_cached_tokens(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.db")
    verifier = TokenVerifier(store, cache_seconds=60)
    token, _ = store.create("viewer", ttl=1.0)
    await verifier.verify(token)
    await asyncio.sleep(1.1)
    with pytest.raises(AuthenticationError, match="expired"):
        await verifier.verify(token)
    assert verifier.hashes == 1
    short = TokenVerifier(store, cache_seconds=0)
    forever, _ = store.create("viewer")
    await short.verify(forever)
    await short.verify(forever)
    assert short.hashes == 2  # no cache: hashed every time
    with pytest.raises(SecurityConfigError):
        store.create("viewer", ttl=-1)
    store.close()


# -- audit ---------------------------------------------------------------------------------

def entry(n: int) -> AuditEntry:
    return AuditEntry(ts=1000.0 + n, request_id=f"r{n}", actor="user:root",
                      source="unix:pid=1,uid=0", method="POST", path=f"/v1/x/{n}",
                      action="stacks.deploy", status=200, outcome="ok", role="admin",
                      target=f"stack:s{n}")


def test_the_audit_chain(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.db")
    rows = [log.append(entry(n)) for n in range(1, 7)]
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0].prev_hash == "0" * 64 and rows[1].prev_hash == rows[0].hash
    assert [e.request_id for e in log.entries(after=4)] == ["r5", "r6"]
    assert log.verify().ok and verify_file(tmp_path / "audit.db").rows == 6
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        log._db.execute("DELETE FROM audit WHERE seq = 3")
    log.close()

    db = sqlite3.connect(tmp_path / "audit.db")
    db.executescript("DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;")
    db.execute("UPDATE audit SET actor = 'user:mallory' WHERE seq = 2")
    db.commit()
    report = verify_file(tmp_path / "audit.db")
    assert not report.ok and report.first_bad_seq == 2
    assert report.problems == ["row 2: altered (its content no longer matches its hash)"]
    db.execute("UPDATE audit SET actor = 'user:root' WHERE seq = 2")
    db.execute("DELETE FROM audit WHERE seq IN (3, 4)")
    db.commit()
    report = verify_file(tmp_path / "audit.db")
    assert report.first_bad_seq == 3 and report.problems[0].startswith("rows 3-4 deleted")
    db.execute("DELETE FROM audit WHERE seq >= 5")  # the tail, 5 and 6
    db.commit()
    report = verify_file(tmp_path / "audit.db")
    assert not report.ok and "ends at row 2 but its head says row 6" in report.problems[0]
    db.close()


# -- limiter -------------------------------------------------------------------------------

def test_failure_limiter() -> None:
    limiter = FailureLimiter(limit=3, window=0.3)
    assert [limiter.failure("ip:a") for _ in range(3)] == [False, False, True]
    assert limiter.retry_after("ip:a") >= 1 and limiter.retry_after("ip:b") == 0
    time.sleep(0.35)
    assert limiter.retry_after("ip:a") == 0
    small = FailureLimiter(limit=2, max_sources=2)
    for key in ("a", "b", "c"):
        small.failure(key)
    assert len(small._failures) == 2


# -- certificates --------------------------------------------------------------------------

def test_certificates(tmp_path: Path) -> None:
    ca = create_ca(tmp_path)
    with pytest.raises(SecurityConfigError, match="already exists"):
        create_ca(tmp_path)
    server = issue_server(tmp_path, ["127.0.0.1", "localhost"])
    client = issue_client(tmp_path, "bot", "viewer", tmp_path / "clients")
    assert ca.key.stat().st_mode & 0o077 == 0 and client.key.stat().st_mode & 0o077 == 0
    cert = x509.load_pem_x509_certificate(client.cert.read_bytes())
    ou = cert.subject.get_attributes_for_oid(x509.oid.NameOID.ORGANIZATIONAL_UNIT_NAME)
    assert ou[0].value == "viewer"
    sans = x509.load_pem_x509_certificate(server.cert.read_bytes()).extensions \
        .get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    ctx = server_context(server.cert, server.key, ca.cert)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_OPTIONAL
    assert server_context(server.cert, server.key, ca.cert, True).verify_mode == (
        ssl.CERT_REQUIRED)
    assert client_context(ca.cert).verify_mode == ssl.CERT_REQUIRED
    assert client_context(insecure=True).verify_mode == ssl.CERT_NONE
    home = tmp_path / "home"
    home.mkdir()
    (home / "security.yaml").write_text(f"tls: {{cert: {server.cert}, key: {server.key}, "
                                        f"client_ca: {ca.cert}, require_client_cert: true}}")
    files = SecurityConfig.load(home).tls_files()
    assert files is not None and (files.cert, files.key, files.client_ca) == (
        server.cert, server.key, ca.cert) and files.require_client_cert
    with pytest.raises(SecurityConfigError, match="no CA"):
        issue_client(tmp_path / "nowhere", "x", "viewer", tmp_path)
    with pytest.raises(SecurityConfigError, match="invalid certificate name"):
        issue_client(tmp_path, "../x", "viewer", tmp_path)
