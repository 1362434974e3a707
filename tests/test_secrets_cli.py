"""`shipyard secret set|ls|rm` as users run them (the console script), with and without a
server; and the API routes' permissions: only admins manage secrets, and every change is
in the audit trail without the value."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shipyard.api.client import Client
from shipyard.security.errors import PermissionDenied
from shipyard.security.secret_store import SecretStore
from tests.test_security_server import ServerThread

SHIPYARD = str(Path(sys.executable).parent / "shipyard")
VALUE = "cli-secret-Value-9a8b7c"


def run(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"SHIPYARD_HOME": str(home)}
    env.pop("SHIPYARD_URL", None)
    return subprocess.run([SHIPYARD, *args], env=env, text=True, capture_output=True,
                          input=stdin if stdin is not None else "", timeout=30)


def test_cli_without_a_server_uses_the_home_store(home: Path) -> None:
    done = run(home, "secret", "set", "db", stdin=VALUE + "\n")
    assert done.returncode == 0 and "secret db stored" in done.stderr, done.stderr
    assert SecretStore(home).require("db").get_secret_value() == VALUE  # newline removed
    assert run(home, "secret", "set", "db", stdin="other-value\n").stderr.strip() == (
        "secret db replaced")
    listed = run(home, "secret", "ls", "-o", "json")
    assert [s["name"] for s in json.loads(listed.stdout)] == ["db"]
    assert VALUE not in listed.stdout + run(home, "secret", "ls").stdout
    assert run(home, "secret", "rm", "db").returncode == 0
    gone = run(home, "secret", "rm", "db")
    assert gone.returncode == 2 and "no stored secret db" in gone.stderr


def test_cli_never_takes_a_value_from_the_command_line(home: Path) -> None:
    done = run(home, "secret", "set", "db", VALUE)
    assert done.returncode == 2 and "unexpected extra argument" in done.stderr.lower()
    empty = run(home, "secret", "set", "db", stdin="")
    assert empty.returncode == 2 and "must not be empty" in empty.stderr
    bad = run(home, "secret", "set", "Bad Name", stdin=VALUE)
    assert bad.returncode == 2 and "invalid secret name" in bad.stderr
    assert SecretStore(home).list() == []


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    home = tmp_path_factory.mktemp("secrets") / "home"
    with ServerThread(home) as running:
        yield running


def test_only_admins_manage_secrets_and_the_audit_has_no_value(server: ServerThread) -> None:
    for role in ("viewer", "operator"):
        with Client(base_url=server.url, token=server.token(role), ca=server.ca) as client:
            with pytest.raises(PermissionDenied, match="may not"):
                client._json("GET", "/v1/secrets")
            with pytest.raises(PermissionDenied, match="may not"):
                client._json("PUT", "/v1/secrets/db", json={"value": VALUE})
    with Client(base_url=server.url, token=server.token("admin"), ca=server.ca) as admin:
        made = admin._http.put("/v1/secrets/db", json={"value": VALUE})
        assert made.status_code == 201 and made.json() == {"name": "db", "created": True}
        again = admin._http.put("/v1/secrets/db", json={"value": VALUE + "2"})
        assert again.status_code == 200 and again.json()["created"] is False
        assert [s["name"] for s in admin._json("GET", "/v1/secrets")] == ["db"]
        assert admin._http.delete("/v1/secrets/db").status_code == 200
        assert admin._http.delete("/v1/secrets/db").status_code == 404
    with server.unix() as owner:
        trail = owner.audit(limit=10000)
    secret_rows = [e for e in trail if e["action"].startswith("secrets.")]
    assert [(e["action"], e["status"]) for e in secret_rows if e["outcome"] == "ok"] == [
        ("secrets.create", 201), ("secrets.create", 200), ("secrets.delete", 200)]
    assert sum(e["outcome"] == "denied" for e in secret_rows) == 4
    assert any(e["detail"] == "created secret db" and e["target"] == "secret:db"
               for e in secret_rows)
    assert VALUE not in json.dumps(trail)
    assert VALUE.encode() not in (server.home / "audit.db").read_bytes()
