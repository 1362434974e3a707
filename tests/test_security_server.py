"""Security over the wire: a real control plane (uvicorn, a real engine) serving its unix
socket and a TCP listener on 127.0.0.1 with real TLS; tokens, client certificates, roles,
the audit trail and the limits, seen from clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from shipyard import Engine, EngineConfig
from shipyard.api.client import Client, ConnectionLost, TLSFailure
from shipyard.api.server import Listeners, serve
from shipyard.security.errors import AuthenticationError, PermissionDenied
from shipyard.security.guard import Security
from shipyard.security.tls import client_context, create_ca, issue_client, issue_server

PY = sys.executable
SHIPYARD = str(Path(sys.executable).parent / "shipyard")
DUMMY = {"name": "web", "service": "api", "op_id": "1", "token_id": "0123456789ab"}


class ServerThread(threading.Thread):
    """A whole control plane (engine + API on the unix socket and TLS on 127.0.0.1) on its
    own event loop, with the `Security` it uses reachable from the test."""

    def __init__(self, home: Path, *, tcp: str | None = "127.0.0.1:0",
                 config: dict[str, Any] | None = None, tls: bool = True) -> None:
        super().__init__(name="test-control-plane", daemon=True)
        self.home = home
        self.tcp = tcp
        home.mkdir(parents=True, exist_ok=True)
        if config is not None:
            (home / "security.yaml").write_text(yaml.safe_dump(config))
        if tls and not (home / "tls" / "server.crt").exists():
            create_ca(home / "tls")
            issue_server(home / "tls")
        self.security = Security.for_home(home)
        self.listeners: Listeners | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()

        def ready(listeners: Listeners) -> None:
            self.listeners = listeners
            self._ready.set()

        config = EngineConfig(home=self.home, stop_on_exit=True)
        async with Engine(config) as engine:
            await serve(engine, socket_path=config.socket_path, tcp=self.tcp,
                        stop=self._stop_event, on_ready=ready, handle_signals=False,
                        security=self.security)

    def __enter__(self) -> ServerThread:
        self.start()
        if not self._ready.wait(30) or self.error is not None:
            raise RuntimeError(f"the server did not start: {self.error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop_event is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop_event.set)
        self.join(20)
        self.security.close()

    @property
    def port(self) -> int:
        assert self.listeners is not None and self.listeners.tcp_address is not None
        return self.listeners.tcp_address[1]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca(self) -> Path:
        return self.home / "tls" / "ca.crt"

    @property
    def socket(self) -> Path:
        return self.home / "shipyard.sock"

    def https(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        """A raw HTTPS client that trusts the home's CA."""
        headers = {"authorization": f"Bearer {token}"} if token else {}
        verify = kwargs.pop("verify", None) or client_context(self.ca)
        return httpx.Client(base_url=self.url, verify=verify, headers=headers, timeout=10,
                            **kwargs)

    def unix(self) -> Client:
        return Client(self.socket)

    def token(self, role: str, **kwargs: Any) -> str:
        """A new token, made by the socket's owner (admin) over the unix socket."""
        with self.unix() as client:
            made = client.create_token(role, **kwargs)
        token: str = made["token"]
        return token


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    home = tmp_path_factory.mktemp("secure") / "home"
    with ServerThread(home, config={"limits": {"auth_failures_per_minute": 100_000},
                                    "roles": {"web-deployer": {"rules": [
            {"resources": ["stacks", "services"], "verbs": ["read", "deploy", "restart"],
             "stacks": ["web"]}]}}}) as running:
        yield running


def routes_of(server: ServerThread) -> list[tuple[str, str]]:
    """(method, path template) of every route in the OpenAPI document, and the document."""
    with server.unix() as client:
        doc = client._json("GET", "/openapi.json")
    found = [(method.upper(), path) for path, item in doc["paths"].items()
             for method in item if method in ("get", "post", "put", "patch", "delete")]
    return [*found, ("GET", "/openapi.json")]


def concrete(path: str) -> str:
    for key, value in DUMMY.items():
        path = path.replace("{" + key + "}", value)
    return path


BODIES: dict[str, Any] = {"/v1/stacks": {"stack": {"name": "web"}},  # invalid: 400, no deploy
                          "/v1/plan": {"stack": {"name": "web"}},
                          "/v1/tokens": {"role": "viewer", "ttl": "1h", "name": "table"}}


def call(client: httpx.Client, method: str, path: str) -> httpx.Response:
    body = BODIES.get(path, {}) if method in ("POST", "PUT", "PATCH") else None
    return client.request(method, concrete(path), json=body)


# -- authentication ------------------------------------------------------------------------

def test_every_route_refuses_the_unknown_over_tcp(server: ServerThread) -> None:
    routes = routes_of(server)
    assert len(routes) >= 20 and ("POST", "/v1/tokens") in routes
    bad_token = "shy_0123456789ab_" + "x" * 43
    for headers in ({}, {"authorization": f"Bearer {bad_token}"},
                    {"authorization": "Basic dXNlcjpwdw=="}):
        with server.https() as client:
            client.headers.update(headers)
            for method, path in [*routes, ("GET", "/v1/no-such-route")]:
                response = call(client, method, path)
                assert response.status_code == 401, (method, path, response.text)
                body = response.json()
                assert body["kind"] == "AuthenticationError" and body["exit_code"] == 2
                assert response.headers["www-authenticate"].startswith("Bearer")
                assert response.headers["x-request-id"]
    with server.https() as client, server.unix() as admin:
        refused = [e for e in admin.audit(limit=10000) if e["outcome"] == "unauthenticated"]
        assert refused and refused[-1]["source"].startswith("tcp:127.0.0.1:")
        assert any(e["actor"] == "token:0123456789ab" for e in refused)


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_tls_is_required_and_verified(server: ServerThread) -> None:
    assert server.listeners is not None and server.listeners.tcp is not None
    assert server.listeners.tcp.proto == socket.IPPROTO_TCP  # so asyncio sets TCP_NODELAY
    plain = httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=5)
    with plain, pytest.raises(httpx.TransportError):
        plain.get("/healthz")  # no cleartext HTTP on the TLS port
    with pytest.raises(TLSFailure, match="CERTIFICATE_VERIFY_FAILED"):
        Client(base_url=server.url).health()  # the home's CA is not a system CA
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with contextlib.suppress(ValueError, ssl.SSLError):
        old.minimum_version = ssl.TLSVersion.TLSv1
    with httpx.Client(base_url=server.url, verify=old, timeout=5) as legacy, pytest.raises(
            httpx.TransportError):
        legacy.get("/healthz")
    token = server.token("viewer")
    with Client(base_url=server.url, token=token, insecure=True) as insecure:
        assert insecure.health()["status"] == "ok"
    with Client(base_url=server.url, token=token, ca=server.ca) as verified:
        assert verified.whoami()["actor"].startswith("token:")


def test_token_verification_is_cached(server: ServerThread) -> None:
    token = server.token("viewer", name="cache")
    before = server.security.verifier.hashes
    with server.https(token) as client:
        started = time.perf_counter()
        assert client.get("/v1/stacks").status_code == 200
        first = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(20):
            assert client.get("/v1/stacks").status_code == 200
        rest = (time.perf_counter() - started) / 20
    assert server.security.verifier.hashes == before + 1  # one slow hash for 21 requests
    assert rest < first


def test_expired_and_revoked_tokens_are_refused(server: ServerThread) -> None:
    with server.unix() as admin:
        made = admin.create_token("viewer", ttl="2s")
    short, expires_at = made["token"], made["expires_at"]
    revoked = server.token("operator")
    with server.https(short) as client:
        assert client.get("/v1/whoami").status_code == 200  # verified and cached
        time.sleep(max(0.0, expires_at - time.time()) + 0.1)
        late = client.get("/v1/whoami")
        assert late.status_code == 401 and "expired" in late.json()["error"]
    with server.https(revoked) as client:
        assert client.get("/v1/whoami").status_code == 200
        token_id = client.get("/v1/whoami").json()["name"]
        with server.unix() as admin:
            assert admin.revoke_token(token_id)["state"] == "revoked"
            listed = {t["id"]: t["state"] for t in admin.tokens()}
            assert listed[token_id] == "revoked"
        again = client.get("/v1/whoami")
        assert again.status_code == 401 and "revoked" in again.json()["error"]
    with Client(base_url=server.url, token=revoked, ca=server.ca) as cli, pytest.raises(
            AuthenticationError, match="revoked"):
        cli.stacks()


# -- roles ---------------------------------------------------------------------------------

# Who may call what, for the routes whose answer is not simply "viewer reads, the rest is
# admin's" (the rule applied to any route not listed here).
ROLE_TABLE: dict[tuple[str, str], set[str]] = {
    ("GET", "/v1/tokens"): {"admin"},
    ("POST", "/v1/tokens"): {"admin"},
    ("DELETE", "/v1/tokens/{token_id}"): {"admin"},
    ("GET", "/v1/audit"): {"admin"},
    ("GET", "/v1/secrets"): {"admin"},  # even names: only who manages them
    ("GET", "/v1/audit/verify"): {"admin"},
    ("POST", "/v1/plan"): {"operator", "admin"},
    ("POST", "/v1/stacks/{name}/services/{service}/restart"): {"operator", "admin"},
    ("POST", "/v1/stacks/{name}/services/{service}/rollback"): {"operator", "admin"},
    ("POST", "/v1/stacks/{name}/recover"): {"operator", "admin"},
    ("POST", "/v1/stacks/{name}/services/{service}/promote"): {"operator", "admin"},
    ("POST", "/v1/stacks/{name}/services/{service}/abort"): {"operator", "admin"},
    ("POST", "/v1/stacks/{name}/services/{service}/scale"): {"operator", "admin"},
    ("POST", "/v1/stacks/{name}/services/{service}/autoscale/resume"): {"operator", "admin"},
    ("POST", "/v1/stacks"): {"admin"},
    ("DELETE", "/v1/stacks/{name}"): {"admin"},
}


def expected_roles(method: str, path: str) -> set[str]:
    if (method, path) in ROLE_TABLE:
        return ROLE_TABLE[(method, path)]
    return {"viewer", "operator", "admin"} if method == "GET" else {"admin"}


def test_role_by_route_table(server: ServerThread) -> None:
    routes = routes_of(server)
    tokens = {role: server.token(role) for role in ("viewer", "operator", "admin")}
    for role, token in tokens.items():
        with server.https(token) as client:
            for method, path in routes:
                response = call(client, method, path)
                allowed = role in expected_roles(method, path)
                if allowed:
                    assert response.status_code not in (401, 403), (role, method, path,
                                                                   response.text)
                else:
                    assert response.status_code == 403, (role, method, path, response.text)
                    assert response.json()["kind"] == "PermissionDenied"
    with server.unix() as admin:
        denied = [e for e in admin.audit(limit=10000) if e["status"] == 403]
    assert any(e["action"] == "tokens.create" and e["role"] == "viewer" for e in denied)


def test_operator_restarts_but_cannot_create_tokens(server: ServerThread) -> None:
    with Client(base_url=server.url, token=server.token("operator"), ca=server.ca) as op:
        assert op.whoami()["role"] == "operator"
        with pytest.raises(PermissionDenied, match="may not create tokens"):
            op.create_token("viewer")
        with pytest.raises(PermissionDenied, match="may not deploy stacks"):
            op._json("POST", "/v1/stacks", json={"stack": {"name": "web"}})
        restarted = op._http.post("/v1/stacks/web/services/api/restart", json={})
        assert restarted.status_code == 404  # allowed; there is no such stack


def test_stack_scoped_tokens(server: ServerThread) -> None:
    scoped = server.token("operator", stack="web")
    with server.https(scoped) as client:
        assert client.post("/v1/stacks/web/services/api/restart", json={}).status_code == 404
        other = client.post("/v1/stacks/other/services/api/restart", json={})
        assert other.status_code == 403 and "limited to stack web" in other.json()["error"]
        assert client.get("/v1/stacks/other").status_code == 403
        assert client.get("/v1/instances", params={"stack": "other"}).status_code == 403
        assert client.get("/v1/instances", params={"stack": "web"}).status_code == 404
        assert client.get("/v1/events").status_code == 403  # across stacks
        assert client.get("/v1/events", params={"stack": "web"}).status_code == 200
        assert client.get("/v1/stacks").json() == []  # listing: filtered, not refused
    custom = server.token("web-deployer")
    with server.https(custom) as client:
        assert client.post("/v1/stacks", json={"stack": {"name": "web"}}).status_code == 400
        assert client.post("/v1/stacks", json={"stack": {"name": "db"}}).status_code == 403
        assert client.get("/v1/stacks/db").status_code == 403
        assert client.get("/v1/stacks/web").status_code == 404


def test_tokens_cannot_grant_more_than_their_creator(server: ServerThread) -> None:
    with server.unix() as admin:
        with pytest.raises(Exception, match="no role named root"):
            admin.create_token("root")
        made = admin.create_token("viewer", stack="web", ttl="never", name="ci")
        assert made["expires_at"] is None and made["token"].startswith("shy_")
        assert "token" not in next(t for t in admin.tokens() if t["id"] == made["id"])


def test_client_certificates(server: ServerThread, tmp_path: Path) -> None:
    ours = issue_client(server.home / "tls", "deploy-bot", "operator", tmp_path)
    with Client(base_url=server.url, ca=server.ca, cert=ours.cert, key=ours.key) as bot:
        me = bot.whoami()
        assert (me["actor"], me["role"]) == ("cert:deploy-bot", "operator")
        assert me["detail"].startswith("sha256:")
        with pytest.raises(PermissionDenied):
            bot.create_token("viewer")
    foreign_ca = tmp_path / "foreign"
    create_ca(foreign_ca)
    theirs = issue_client(foreign_ca, "intruder", "admin", tmp_path / "out")
    with Client(base_url=server.url, ca=server.ca, cert=theirs.cert,
                key=theirs.key) as intruder, pytest.raises((TLSFailure, ConnectionLost)):
        intruder.whoami()
    unknown_role = issue_client(server.home / "tls", "odd", "superuser", tmp_path)
    with Client(base_url=server.url, ca=server.ca, cert=unknown_role.cert,
                key=unknown_role.key) as odd, pytest.raises(PermissionDenied,
                                                            match="unknown role superuser"):
        odd.stacks()


# -- the unix socket -----------------------------------------------------------------------

def test_unix_peer_identity_in_the_audit(server: ServerThread) -> None:
    with server.unix() as client:
        me = client.whoami()
        user = pwd.getpwuid(os.getuid()).pw_name
        assert (me["actor"], me["role"], me["detail"]) == (f"user:{user}", "admin",
                                                           f"uid {os.getuid()}")
        response = client._http.delete("/v1/stacks/ghost", headers={"x-request-id": "rq-42"})
        assert response.status_code == 404 and response.headers["x-request-id"] == "rq-42"
        [row] = [e for e in client.audit(limit=10000) if e["request_id"] == "rq-42"]
    assert row["actor"] == f"user:{user}" and row["role"] == "admin"
    assert row["source"] == f"unix:pid={os.getpid()},uid={os.getuid()}"
    assert (row["method"], row["path"], row["action"]) == ("DELETE", "/v1/stacks/ghost",
                                                          "stacks.delete")
    assert (row["target"], row["status"], row["outcome"]) == ("stack:ghost", 404, "failed")
    assert "no stack named ghost" in row["detail"] and row["hash"] and row["prev_hash"]
    assert stat.S_IMODE(os.stat(server.socket).st_mode) == 0o600


# Run by another user, with the system's python (the venv's may be out of its reach).
RAW_CLIENT = """
import json, socket, sys
def request(method, path):
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(sys.argv[1])
    sock.sendall(f"{method} {path} HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n"
                 "Content-Length: 0\\r\\n\\r\\n".encode())
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\\r\\n\\r\\n")
    return int(head.split()[1]), body
status, body = request("GET", "/v1/whoami")
me = json.loads(body)
print(me["actor"], me["role"], request("DELETE", "/v1/stacks/x")[0])
"""
SYSTEM_PY = "/usr/bin/python3"


@pytest.mark.skipif(os.getuid() != 0 or not os.path.exists(SYSTEM_PY),
                    reason="needs root (to connect as another user) and /usr/bin/python3")
def test_other_local_users_by_peer_credentials() -> None:
    home = Path(tempfile.mkdtemp(prefix="shy-", dir="/tmp")) / "h"
    home.mkdir()
    os.chmod(home.parent, 0o711)
    os.chmod(home, 0o711)
    script = RAW_CLIENT
    try:
        with ServerThread(home, tcp=None, tls=False, config={
                "unix": {"group": "nogroup", "users": {"nobody": "viewer"}}}):
            mode = os.stat(home / "shipyard.sock")
            assert stat.S_IMODE(mode.st_mode) == 0o660 and mode.st_gid == 65534
            done = subprocess.run([SYSTEM_PY, "-I", "-c", script, str(home / "shipyard.sock")],
                                  user=65534, group=65534, capture_output=True, text=True,
                                  timeout=30, cwd="/")
            assert done.returncode == 0, done.stderr
            assert done.stdout.split() == ["user:nobody", "viewer", "403"]
            with Client(home / "shipyard.sock") as admin:
                rows = admin.audit()
            assert [(e["actor"], e["status"]) for e in rows] == [("user:nobody", 403)]
            assert rows[0]["source"].endswith(",uid=65534")
    finally:
        subprocess.run(["rm", "-rf", str(home.parent)], check=False)


# -- limits --------------------------------------------------------------------------------

def test_authentication_failures_are_rate_limited(tmp_path: Path) -> None:
    with ServerThread(tmp_path / "h", config={"limits": {"auth_failures_per_minute": 3}}
                      ) as srv:
        good = srv.token("viewer")
        with srv.https("shy_0123456789ab_" + "y" * 43) as bad:
            assert [bad.get("/v1/stacks").status_code for _ in range(3)] == [401] * 3
            blocked = bad.get("/v1/stacks")
            assert blocked.status_code == 429 and int(blocked.headers["retry-after"]) > 0
            assert blocked.json()["kind"] == "RateLimited"
        with srv.https(good) as client:  # the source is blocked, whatever it sends
            assert client.get("/v1/stacks").status_code == 429
        with srv.unix() as admin:  # another source (the local owner) is not
            outcomes = [e["outcome"] for e in admin.audit()]
            assert admin.stacks() == []
    assert outcomes.count("unauthenticated") == 3 and outcomes.count("rate-limited") == 1


def test_request_body_limit(tmp_path: Path) -> None:
    with ServerThread(tmp_path / "h", config={"limits": {"max_body": "1KiB"}}) as srv:
        with srv.https(srv.token("admin")) as client:
            big = {"stack": {"name": "web", "pad": "x" * 2000}}
            response = client.post("/v1/plan", json=big)
            assert response.status_code == 413 and response.json()["kind"] == "PayloadTooLarge"

            def chunks() -> Iterator[bytes]:
                yield json.dumps(big).encode()

            chunked = client.post("/v1/plan", content=chunks(),
                                  headers={"content-type": "application/json"})
            assert chunked.status_code == 413
            small = client.post("/v1/plan", json={"stack": {"name": "web"}})
            assert small.status_code == 400  # under the limit: an invalid stack
        with srv.unix() as admin:
            statuses = [e["status"] for e in admin.audit()]
    assert statuses.count(413) == 2


# -- the audit trail -----------------------------------------------------------------------

def test_audit_verification_catches_tampering(tmp_path: Path) -> None:
    home = tmp_path / "h"
    with ServerThread(home, tcp=None, tls=False) as srv, srv.unix() as admin:
        for n in range(5):
            admin._http.delete(f"/v1/stacks/s{n}")
        assert admin.audit_verify()["ok"] and admin.audit_verify()["rows"] == 5
    env = os.environ | {"SHIPYARD_HOME": str(home)}

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run([SHIPYARD, "audit", "verify"], env=env, capture_output=True,
                              text=True, timeout=30)

    done = verify()
    assert done.returncode == 0 and "5 rows, intact" in done.stdout
    db = sqlite3.connect(home / "audit.db")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE audit SET status = 200 WHERE seq = 2")
    db.execute("DROP TRIGGER audit_no_update")
    db.execute("UPDATE audit SET status = 200 WHERE seq = 2")
    db.commit()
    done = verify()
    assert done.returncode == 1
    assert "row 2: altered" in done.stdout and "not intact from row 2" in done.stderr
    db.execute("UPDATE audit SET status = 404 WHERE seq = 2")  # put back
    db.execute("DROP TRIGGER audit_no_delete")
    db.execute("DELETE FROM audit WHERE seq = 4")
    db.commit()
    done = verify()
    assert done.returncode == 1 and "row 4 deleted" in done.stdout
    assert "row 5: its link to the previous row is broken" in done.stdout
    db.close()


# -- the command line ----------------------------------------------------------------------

def shipyard(home: Path, *args: str, env: dict[str, str] | None = None,
             ) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([SHIPYARD, *args], env=os.environ | {"SHIPYARD_HOME": str(home)}
                          | (env or {}), capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def test_cli_tokens_and_remote_use(server: ServerThread) -> None:
    made = shipyard(server.home, "token", "create", "--role", "operator", "--stack", "web",
                    "--ttl", "2h", "--name", "from-cli")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert token.startswith("shy_") and "shown only this once" in made.stderr
    token_id = token[4:16]
    listed = json.loads(shipyard(server.home, "token", "ls", "-o", "json").stdout)
    assert {t["id"]: t["name"] for t in listed}[token_id] == "from-cli"
    remote = {"SHIPYARD_URL": server.url, "SHIPYARD_TOKEN": token, "SHIPYARD_CA": str(server.ca)}
    me = shipyard(server.home, "whoami", env=remote)
    assert me.returncode == 0, me.stderr
    assert me.stdout.strip() == f"token:{token_id} (role operator, limited to stack web)"
    allowed = shipyard(server.home, "ps", "--stack", "web", env=remote)
    assert allowed.returncode == 2 and "no stack named web" in allowed.stderr  # allowed
    other = shipyard(server.home, "ps", "--stack", "other", env=remote)
    assert other.returncode == 2 and "limited to stack web" in other.stderr
    denied = shipyard(server.home, "token", "ls", env=remote)
    assert denied.returncode == 2 and "may not read tokens" in denied.stderr
    unverified = shipyard(server.home, "--url", server.url, "--token", token, "whoami")
    assert unverified.returncode == 1 and "pass its CA with --ca" in unverified.stderr
    insecure = shipyard(server.home, "--url", server.url, "--token", token, "--insecure",
                        "whoami")
    assert insecure.returncode == 0
    assert shipyard(server.home, "token", "revoke", token_id).returncode == 0
    gone = shipyard(server.home, "whoami", env=remote)
    assert gone.returncode == 2 and f"token {token_id} is revoked" in gone.stderr
    audit = shipyard(server.home, "audit", "-o", "json")
    rows = [json.loads(line) for line in audit.stdout.splitlines()]
    assert any(r["action"] == "tokens.delete" and r["target"] == f"token:{token_id}"
               for r in rows)
    assert shipyard(server.home, "audit", "verify").returncode == 0


def test_cli_usage_errors(tmp_path: Path) -> None:
    home = tmp_path / "h"
    home.mkdir()
    no_tls = shipyard(home, "server", "--listen", "127.0.0.1:0")
    assert no_tls.returncode == 2 and "without TLS" in no_tls.stderr
    assert "shipyard tls init" in no_tls.stderr and not (home / "shipyard.sock").exists()
    assert shipyard(home, "--ca", "x.crt", "ps").returncode == 2  # --ca needs --url
    assert shipyard(home, "audit", "verify").returncode == 2  # no trail yet
    (home / "security.yaml").write_text("roles: {x: {rules: [{resources: [stacks], "
                                        "verbs: [fly]}]}}")
    bad = shipyard(home, "server")
    assert bad.returncode == 2 and "unknown verb 'fly'" in bad.stderr
    (home / "security.yaml").unlink()
    assert shipyard(home, "tls", "init").returncode == 0
    again = shipyard(home, "tls", "init")
    assert again.returncode == 2 and "already exists" in again.stderr
    client = shipyard(home, "tls", "client", "bot", "--role", "nobody", "--out", str(tmp_path))
    assert client.returncode == 2 and "no role named nobody" in client.stderr


def test_cli_audit_follow(server: ServerThread) -> None:
    with server.unix() as admin:
        after = admin.audit(limit=10000)[-1]["seq"] if admin.audit(limit=10000) else 0
    follower = subprocess.Popen(
        [SHIPYARD, "audit", "-f", "-o", "json", "--after", str(after)],
        env=os.environ | {"SHIPYARD_HOME": str(server.home)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)  # it is polling now: the row below is a new one
        with server.unix() as admin:
            admin._http.post("/v1/stacks/followed/recover", headers={"x-request-id": "fol-1"})
        assert follower.stdout is not None
        row = json.loads(follower.stdout.readline())
        assert (row["request_id"], row["action"], row["status"]) == ("fol-1", "stacks.recover",
                                                                     404)
        assert row["seq"] == after + 1
    finally:
        follower.terminate()
        follower.wait(10)
