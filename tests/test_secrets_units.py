"""Secrets piece by piece: the stack file's `secrets:` (located errors), the encrypted
store, reading and delivering values, redaction, and the Kubernetes Secret objects."""

from __future__ import annotations

import base64
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from shipyard.engine.environment import instance_environment
from shipyard.errors import InputError, SpecError
from shipyard.k8s.objects import RenderError
from shipyard.k8s.render import RenderOptions, render_stack
from shipyard.security import redact
from shipyard.security.errors import SecurityConfigError
from shipyard.security.secret_store import SecretStore
from shipyard.security.secret_values import InstanceSecrets, SecretUnavailable, resolve
from shipyard.spec.loader import parse_stack
from shipyard.state.base import Event

VALUE = "s3cr3t-Value-7f1d2c"


@pytest.fixture(autouse=True)
def _fresh_registry() -> Iterator[None]:
    redact.forget_all()
    yield
    redact.forget_all()


def stack_text(extra_service: str = "", top: str = "") -> str:
    return f"""\
name: demo
{top}secrets:
  db_password: {{env: TEST_DB_PASSWORD}}
  tls_key: {{file: ./tls.key}}
  api_token: {{stored: api-token}}
services:
  api:
    command: [sleep, "60"]
    secrets:
      - {{name: db_password, env: DB_PASSWORD}}
      - {{name: tls_key, file: /run/secrets/tls_key}}
      - {{name: api_token, env: API_TOKEN}}
{extra_service}"""


def issues_of(text: str, base: Path, **env: str) -> list[str]:
    with pytest.raises(SpecError) as caught:
        parse_stack(text, file="shipyard.yaml", base_dir=base, environ=env)
    return [issue.render() for issue in caught.value.issues]


# -- the stack file ----------------------------------------------------------------------

def test_the_stack_keeps_references_only(tmp_path: Path) -> None:
    stack = parse_stack(stack_text(), base_dir=tmp_path, environ={"TEST_DB_PASSWORD": VALUE})
    assert stack.secrets["db_password"].describe() == "env TEST_DB_PASSWORD"
    uses = stack.services["api"].secrets
    assert [u.variable for u in uses] == ["DB_PASSWORD", "TLS_KEY_FILE", "API_TOKEN"]
    assert uses[1].file_name == "tls_key"
    dumped = str(stack.model_dump(mode="json"))
    assert VALUE not in dumped and "TEST_DB_PASSWORD" in dumped


def test_shorthand_use_is_a_file_under_run_secrets(tmp_path: Path) -> None:
    text = stack_text().replace("      - {name: api_token, env: API_TOKEN}\n",
                                "      - api_token\n")
    use = parse_stack(text, base_dir=tmp_path, environ={}).services["api"].secrets[2]
    assert (use.file, use.path_variable) == ("/run/secrets/api_token", "API_TOKEN_FILE")


def test_bad_secrets_are_located(tmp_path: Path) -> None:
    text = """\
name: demo
secrets:
  one: {env: A, file: ./x}
  Two: {stored: two}
services:
  api:
    command: [sleep, "1"]
    env: {DB: x}
    secrets:
      - {name: onee, env: X}
      - {name: one}
      - {name: one, env: DB}
      - {name: one, env: X}
"""
    found = issues_of(text, tmp_path)
    assert any(line.startswith("shipyard.yaml:3: secrets.one:") and "exactly one of env, "
               "file, stored (got env, file)" in line for line in found), found
    assert any(line.startswith("shipyard.yaml:4: secrets.Two:") for line in found), found
    assert any(line.startswith("shipyard.yaml:10: services.api.secrets.0.name:")
               and "did you mean 'one'" in line for line in found), found
    assert any(line.startswith("shipyard.yaml:11: services.api.secrets.1:")
               and "exactly one of env" in line for line in found), found
    assert any(line.startswith("shipyard.yaml:12: services.api.secrets.2:")
               and "also set by the service's env" in line for line in found), found
    assert any(line.startswith("shipyard.yaml:13: services.api.secrets.3:")
               and "already set by secret #0" in line for line in found), found


def test_a_secret_variable_is_never_expanded_into_a_command(tmp_path: Path) -> None:
    text = stack_text().replace('command: [sleep, "60"]',
                                'command: [app, --password, "${DB_PASSWORD}"]')
    found = issues_of(text, tmp_path, DB_PASSWORD=VALUE)  # even when the CLI has it set
    assert found == [
        "shipyard.yaml:8: services.api.command.2: ${DB_PASSWORD} is a secret: it reaches "
        "the instance as its own variable DB_PASSWORD only, never expanded into a command "
        "or another variable (a command line is visible in ps)"]


def test_file_secrets_of_containers_are_bind_mounted_from_the_delivered_file(
        tmp_path: Path) -> None:
    text = stack_text().replace('command: [sleep, "60"]', "image: localhost/app:1")
    stack = parse_stack(text, base_dir=tmp_path, environ={})
    (tmp_path / "tls.key").write_text(VALUE)
    SecretStore(tmp_path / "home").set("api-token", VALUE + "-token")
    secrets = InstanceSecrets(tmp_path / "home", stack, "api", "api-1")
    variables = secrets.deliver({"TEST_DB_PASSWORD": VALUE + "-db"})
    # inside the container the file is where the use says; on the host it is 0600
    assert variables["TLS_KEY_FILE"] == "/run/secrets/tls_key"
    [(host, target)] = secrets.bind_mounts()
    assert target == "/run/secrets/tls_key" and Path(host).read_text() == VALUE
    assert stat.S_IMODE(Path(host).stat().st_mode) == 0o600
    assert variables["DB_PASSWORD"] == VALUE + "-db"


# -- the store ---------------------------------------------------------------------------

def test_store_encrypts_at_rest_with_an_owner_only_key(tmp_path: Path) -> None:
    store = SecretStore(tmp_path)
    assert store.get("api-token") is None and store.list() == []
    assert store.set("api-token", VALUE) is True
    assert store.set("api-token", VALUE + "2") is False  # replaced
    assert store.require("api-token").get_secret_value() == VALUE + "2"
    assert [s.name for s in store.list()] == ["api-token"]
    for name in ("secrets.key", "secrets.db"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    for path in tmp_path.iterdir():  # the db, its journal: never the value in clear
        assert VALUE.encode() not in path.read_bytes(), path
    assert store.delete("api-token") and not store.delete("api-token")
    assert store.get("api-token") is None


def test_store_refuses_a_readable_key_and_detects_tampering(tmp_path: Path) -> None:
    import sqlite3

    store = SecretStore(tmp_path)
    store.set("one", VALUE)
    store.set("two", "another-value")
    os.chmod(tmp_path / "secrets.key", 0o644)
    with pytest.raises(SecurityConfigError, match="has mode 0644: others may read it"):
        store.get("one")
    os.chmod(tmp_path / "secrets.key", 0o600)
    with sqlite3.connect(tmp_path / "secrets.db") as db:  # one's ciphertext under two
        row = db.execute("SELECT nonce, ciphertext FROM secrets WHERE name='one'").fetchone()
        db.execute("UPDATE secrets SET nonce=?, ciphertext=? WHERE name='two'", row)
    with pytest.raises(SecurityConfigError, match="stored secret two cannot be decrypted"):
        store.get("two")
    assert store.require("one").get_secret_value() == VALUE


@pytest.mark.parametrize(("name", "value", "error"), [
    ("Bad Name", "x" * 8, "invalid secret name"),
    ("ok", "", "must not be empty"),
    ("ok", "a\0b", "NUL"),
    ("ok", "x" * (64 * 1024 + 1), "at most 65536 bytes"),
])
def test_store_refuses_bad_names_and_values(tmp_path: Path, name: str, value: str,
                                            error: str) -> None:
    with pytest.raises(InputError, match=error) as caught:
        SecretStore(tmp_path).set(name, value)
    assert value[:8] not in caught.value.message or not value


# -- reading values, delivering them ----------------------------------------------------

def test_resolve_each_source_and_say_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "tls.key").write_text("-----KEY-----\nline-of-the-key-0123456789\n")
    stack = parse_stack(stack_text(), base_dir=tmp_path, environ={})
    home = tmp_path / "home"
    with pytest.raises(SecretUnavailable, match="environment has no variable TEST_DB_PASS"):
        resolve(stack, "db_password", home, environ={})
    with pytest.raises(SecretUnavailable, match="no stored secret api-token"):
        resolve(stack, "api_token", home, environ={})
    SecretStore(home).set("api-token", VALUE)
    assert resolve(stack, "api_token", home).get_secret_value() == VALUE
    assert resolve(stack, "db_password", home, environ={"TEST_DB_PASSWORD": "pw-12345"}
                   ).get_secret_value() == "pw-12345"
    assert resolve(stack, "tls_key", home).get_secret_value().startswith("-----KEY-----\n")
    assert redact.redact(f"x {VALUE} y pw-12345") == (
        "x <secret:api_token> y <secret:db_password>")


def test_instance_secrets_are_delivered_0600_and_removed(tmp_path: Path) -> None:
    (tmp_path / "tls.key").write_text("key-material-0123456789")
    stack = parse_stack(stack_text(), base_dir=tmp_path, environ={})
    home = tmp_path / "home"
    SecretStore(home).set("api-token", VALUE)
    secrets = InstanceSecrets(home, stack, "api", "api-1")
    env = secrets.deliver({"TEST_DB_PASSWORD": "pw-12345"})
    path = Path(env["TLS_KEY_FILE"])
    assert path == home / "run" / "demo" / "api-1" / "secrets" / "tls_key"
    assert path.read_text() == "key-material-0123456789"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert {k: v for k, v in env.items() if k != "TLS_KEY_FILE"} == {
        "DB_PASSWORD": "pw-12345", "API_TOKEN": VALUE}
    adopted = InstanceSecrets(home, stack, "api", "api-1")  # a later control plane
    assert adopted.recall({"TEST_DB_PASSWORD": "pw-12345"}) == env
    secrets.remove()
    assert not path.parent.exists()


def test_instances_do_not_inherit_secret_sources(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    stack = parse_stack(stack_text(), base_dir=tmp_path, environ={})
    base = {"TEST_DB_PASSWORD": "pw-12345", "COPY": VALUE, "PATH": "/bin"}
    env = instance_environment(stack, "api", "api-1", {}, {}, base=base)
    assert "TEST_DB_PASSWORD" not in env and env["COPY"] == VALUE
    redact.register("api_token", VALUE)  # a known value, under any name: not inherited
    env = instance_environment(stack, "api", "api-1", {}, {}, base=base)
    assert "COPY" not in env and env["PATH"] == "/bin"


# -- redaction ----------------------------------------------------------------------------

def test_redaction_of_log_records_and_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    redact.register("db_password", VALUE)
    redact.register("short", "abc")  # too short to redact without mangling words
    redact.register("pem", "-----BEGIN KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC\n-----END-----")
    log = logging.getLogger("shipyard.test")
    with caplog.at_level(logging.INFO, logger="shipyard.test"):
        log.info("connecting with %s", VALUE)
        try:
            raise RuntimeError(f"bad password {VALUE!r}; line MIIEvQIBADANBgkqhkiG9w0BAQEFAASC")
        except RuntimeError:
            log.exception("failed")
    text = caplog.text + "".join(r.exc_text or "" for r in caplog.records)
    assert VALUE not in text and "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC" not in text
    assert "connecting with <secret:db_password>" in text
    assert "RuntimeError: bad password '<secret:db_password>'; line <secret:pem>" in text
    assert redact.redact("abc abcd") == "abc abcd"
    assert redact.redact_any({"a": [VALUE, 1]}) == {"a": ["<secret:db_password>", 1]}
    event = Event("x", f"boom {VALUE}", data={"why": VALUE, "n": 1})
    assert redact.redact_event(event) == Event("x", "boom <secret:db_password>",
                                               data={"why": "<secret:db_password>", "n": 1},
                                               ts=event.ts)
    clean = Event("x", "nothing here")
    assert redact.redact_event(clean) is clean


# -- Kubernetes ----------------------------------------------------------------------------

def test_kubernetes_renders_secrets_as_secret_objects_only(tmp_path: Path) -> None:
    stack = parse_stack(stack_text().replace('command: [sleep, "60"]',
                                             "image: localhost/app:1\n    command: [app]")
                        .replace("      - {name: tls_key, file: /run/secrets/tls_key}\n", ""),
                        base_dir=tmp_path, environ={})
    with pytest.raises(RenderError, match="secret db_password has no value"):
        render_stack(stack)
    values = {"db_password": SecretStr("pw-12345"), "api_token": SecretStr(VALUE)}
    objects = render_stack(stack, RenderOptions(secrets=values)).objects()
    secrets = [o for o in objects if o["kind"] == "Secret"]
    assert len(secrets) == 1
    assert {k: base64.b64decode(v).decode() for k, v in secrets[0]["data"].items()} == {
        "DB_PASSWORD": "pw-12345", "API_TOKEN": VALUE}
    others = str([o for o in objects if o["kind"] != "Secret"])
    assert VALUE not in others and "pw-12345" not in others
    assert base64.b64encode(VALUE.encode()).decode() not in others


def test_kubernetes_file_secrets_are_mounted_from_their_own_secret(tmp_path: Path) -> None:
    text = """\
name: demo
secrets: {tls_key: {file: ./tls.key}}
services:
  api:
    image: localhost/app:1
    secrets: [{name: tls_key, file: /run/secrets/tls_key}]
"""
    stack = parse_stack(text, base_dir=tmp_path, environ={})
    objects = render_stack(stack, RenderOptions(secrets={"tls_key": SecretStr(VALUE)})
                           ).objects()
    files = next(o for o in objects if o["metadata"]["name"] == "api-secret-files")
    assert base64.b64decode(files["data"]["tls_key"]).decode() == VALUE
    pod = next(o for o in objects if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "shipyard-secrets", "secret": {
        "secretName": "api-secret-files", "defaultMode": 0o400}}]
    container = pod["containers"][0]
    assert container["volumeMounts"] == [{"name": "shipyard-secrets",
                                          "mountPath": "/run/secrets/tls_key",
                                          "subPath": "tls_key", "readOnly": True}]
    assert {"name": "TLS_KEY_FILE", "value": "/run/secrets/tls_key"} in container["env"]
