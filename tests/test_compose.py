"""Compose import: the pure conversion on realistic compose files, detection, and the
loader reading a compose file directly (located errors included)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import Field

from shipyard.errors import SpecError
from shipyard.spec.compose import (
    ComposeNote,
    convert,
    convert_compose,
    looks_like_compose,
)
from shipyard.spec.container import Build, Entrypoint, Mount, PullPolicy
from shipyard.spec.loader import load_stack, parse_stack
from shipyard.spec.models import Condition, RestartMode, Service, Stack

FIXTURES = Path(__file__).parent / "fixtures" / "compose"
ALL_FIELDS = set(Service.model_fields) | {"build", "entrypoint", "volumes", "pull_policy",
                                          "pids_limit"}


class ContainerService(Service):
    """Service with the fields proposed for spec/models.py (the one-line additions)."""

    build: Build | None = None
    pull_policy: PullPolicy = PullPolicy.MISSING
    entrypoint: Entrypoint = None
    volumes: list[Mount] = Field(default_factory=list)
    pids_limit: int = Field(0, ge=0)


def fixture(name: str) -> tuple[dict[str, Any], Path]:
    folder = FIXTURES / name
    path = next(p for p in sorted(folder.iterdir()) if "compose" in p.name)
    return yaml.safe_load(path.read_text()), path


def converted(name: str, **kwargs: Any) -> tuple[dict[str, Any], list[ComposeNote]]:
    data, _ = fixture(name)
    return convert_compose(data, service_fields=ALL_FIELDS, **kwargs)


def rendered(notes: list[ComposeNote]) -> list[str]:
    return [note.render() for note in notes]


def validate_all(data: dict[str, Any]) -> dict[str, ContainerService]:
    """Every converted service validates with the proposed fields added."""
    return {name: ContainerService.model_validate(svc) for name, svc in data["services"].items()}


# --- the conversion, fixture by fixture -----------------------------------------------------


def test_web_db_redis() -> None:
    data, notes = converted("web_db_redis")
    web, db, redis = (data["services"][n] for n in ("web", "db", "redis"))
    assert web["depends_on"] == {"db": "healthy", "redis": "started", "migrate": "completed"}
    assert web["env"]["DEBUG"] == "${DEBUG:-}"  # pass-through from the host
    assert web["ports"] == {"p8000": 8000} and "expose" not in web
    assert web["restart"] == "always"  # unless-stopped
    assert web["build"] == "." and web["image"] == "myapp/web:${TAG:-latest}"
    assert web["volumes"] == ["./static:/app/static:ro", "media:/app/media"]
    assert db["health"]["readiness"] == {"exec": ["pg_isready", "-U", "postgres"],
                                         "interval": "5s", "timeout": "5s",
                                         "failure_threshold": 5}
    assert redis["health"]["readiness"]["exec"] == ["redis-cli", "ping"]
    assert redis["ports"] == {"p6379": 6379}
    assert data["services"]["worker"]["restart"] == {"policy": "on-failure", "max_restarts": 5}
    assert data["services"]["worker"]["depends_on"] == {"redis": "started", "db": "started"}
    assert data["services"]["migrate"]["restart"] == "no"
    assert rendered(notes) == ["dropped: version: obsolete in compose; ignored"]
    services = validate_all(data)
    assert services["web"].volumes[1] == Mount(type="volume", source="media", target="/app/media")
    assert services["web"].volumes[0].read_only and services["web"].volumes[0].type == "bind"


def test_healthchecks() -> None:
    data, notes = converted("healthchecks")
    svc = data["services"]
    api = svc["api"]["health"]["readiness"]
    assert api["exec"] == ["sh", "-c", "curl -f http://localhost:3000/health || exit 1"]
    assert (api["interval"], api["timeout"], api["failure_threshold"], api["initial_delay"]) \
        == ("30s", "10s", 3, "40s")
    assert svc["search"]["health"]["readiness"]["exec"] == [
        "curl", "--silent", "--fail", "localhost:9200/_cluster/health"]
    assert svc["search"]["ports"] == {"p9200": 9200, "p9300": 9300}  # from expose
    # $$ stays escaped: the probe gets a literal $, as compose's exec form does
    assert svc["mysql"]["health"]["readiness"]["exec"][-1] == "-p$$MYSQL_ROOT_PASSWORD"
    assert svc["quoted"]["health"]["readiness"]["exec"] == [
        "wget", "-q", "-O", "/dev/null", "http://localhost:8080/a b"]
    assert svc["globbing"]["health"]["readiness"]["exec"][:2] == ["sh", "-c"]
    assert "health" not in svc["quiet"] and "health" not in svc["none"]
    lines = rendered(notes)
    assert "dropped: service api: healthcheck.start_interval: no such probe setting" in lines
    shell_notes = [n for n in notes if n.key == "healthcheck.test"]
    assert [(n.service, n.dropped) for n in shell_notes] == [("api", False), ("globbing", False)]
    services = validate_all(data)
    assert services["api"].health.readiness is not None
    assert services["api"].health.readiness.initial_delay == 40.0
    assert services["search"].health.readiness is not None
    assert services["search"].health.readiness.interval == 90.0


def test_build_contexts() -> None:
    data, notes = converted("build")
    assert data["name"] == "shop-front"
    svc = data["services"]
    assert set(svc) == {"frontend", "backend", "tools-cli"}
    assert svc["frontend"]["image"] == "localhost/shop-front-frontend:latest"
    assert svc["frontend"]["build"] == "./frontend" and svc["frontend"]["pull_policy"] == "build"
    assert svc["frontend"]["ports"] == {"p80": 80} and svc["frontend"]["expose"] == 8080
    assert svc["backend"]["build"] == {"context": "./backend", "dockerfile": "Dockerfile.prod",
                                       "target": "runtime",
                                       "args": ["PYTHON_VERSION=3.11", "COMMIT"]}
    assert svc["backend"]["ports"] == {"api": 5000} and "expose" not in svc["backend"]
    assert svc["backend"]["entrypoint"] == "/docker-entrypoint.sh"
    assert svc["tools-cli"]["entrypoint"] == ["python", "-m", "tools"]
    lines = rendered(notes)
    assert "dropped: service backend: build.cache_from: build option not supported" in lines
    assert "dropped: service backend: build.network: build option not supported" in lines
    assert "note: service tools-cli: name: service 'Tools.CLI' became 'tools-cli'" in lines
    services = validate_all(data)
    backend = services["backend"].build
    assert backend is not None and backend.args == {"PYTHON_VERSION": "3.11", "COMMIT": ""}
    assert services["tools-cli"].build == Build(context=".", args={"VERSION": "2"})
    assert services["backend"].entrypoint == ["/docker-entrypoint.sh"]
    assert services["frontend"].pull_policy is PullPolicy.BUILD


def test_env_files_and_variables() -> None:
    data, notes = converted("envfiles")
    app = data["services"]["app"]
    assert app["image"] == "node:${NODE_VERSION:-20}-alpine"
    assert app["command"] == "npm run start -- --port ${APP_PORT}"  # $VAR → ${VAR}
    assert app["env"] == {"NODE_ENV": "production", "LOG_LEVEL": "${LOG_LEVEL:-info}",
                          "API_KEY": "${API_KEY}", "RETRIES": 3, "VERBOSE": False,
                          "HOME_DIR": "${HOME_DIR:-}"}
    assert app["env_file"] == ["common.env", "./local.env"]
    assert app["ports"] == {"app_port": "${APP_PORT}"}
    assert [n.key for n in notes] == ["env_file.1.required"]


def test_profiles_leave_services_out() -> None:
    data, notes = converted("profiles")
    assert set(data["services"]) == {"app", "db"}
    assert data["services"]["app"]["depends_on"] == {
        "db": {"condition": "healthy", "on_lost": "restart"}}
    assert "dropped: service app: depends_on.mailhog: that service is left out (profiles)" \
        in rendered(notes)
    data, notes = converted("profiles", profiles=["debug"])
    assert set(data["services"]) == {"app", "db", "mailhog", "adminer"}
    assert data["services"]["app"]["depends_on"]["mailhog"] == "started"
    assert data["services"]["adminer"]["expose"] == 8081
    assert any(n.key == "depends_on.mailhog.required" and not n.dropped for n in notes)


def test_networks_and_host_settings_are_listed() -> None:
    data, notes = converted("networks")
    proxy = data["services"]["proxy"]
    assert proxy["ports"] == {"p80": 80, "p443": 443, "p9000": 9000, "p53": 53}
    assert proxy["expose"] == 8443
    assert proxy["volumes"] == [
        {"type": "bind", "source": "./nginx.conf", "target": "/etc/nginx/nginx.conf",
         "read_only": True},
        {"type": "tmpfs", "target": "/var/cache/nginx"}]
    dropped = {(n.service, n.key) for n in notes if n.dropped}
    assert {(None, "networks"), (None, "secrets"), (None, "volumes.certs"), (None, "version"),
            ("proxy", "container_name"), ("proxy", "hostname"), ("proxy", "networks"),
            ("proxy", "labels"), ("proxy", "logging"), ("proxy", "extra_hosts"),
            ("proxy", "secrets"), ("proxy", "volumes.0.bind"), ("proxy", "ports.4"),
            ("app", "networks"), ("app", "user"), ("app", "working_dir"),
            ("app", "cap_add")} == dropped
    # network_mode: host is what Shipyard does anyway: nothing to report
    assert not any(n.key == "network_mode" for n in notes)
    validate_all(data)


def test_deploy_settings() -> None:
    data, notes = converted("deploy")
    api, trainer, legacy = (data["services"][n] for n in ("api", "trainer", "legacy"))
    assert api["replicas"] == 3 and api["ports"] == {"p8000": "auto"} and api["expose"] == 8000
    assert api["resources"] == {"cpu": "0.50", "memory": "512Mi"} and api["pids_limit"] == 200
    assert api["restart"] == {"policy": "on-failure", "initial": "5s", "backoff": "fixed",
                              "max_restarts": 3, "min_uptime": "120s"}
    assert api["stop"] == {"timeout": "1m30s", "signal": "SIGINT"}
    assert trainer["resources"] == {"gpu": 2}
    assert legacy["replicas"] == 2 and legacy["restart"] == "always"
    assert legacy["resources"] == {"memory": "1Gi", "cpu": 1.5} and legacy["pids_limit"] == 100
    dropped = {(n.service, n.key) for n in notes if n.dropped}
    assert dropped == {("api", "deploy.resources.reservations.cpus"),
                       ("api", "deploy.resources.reservations.memory"),
                       ("api", "deploy.update_config"), ("api", "deploy.placement")}
    services = validate_all(data)
    assert services["api"].resources.memory == 512 * 2**20
    assert services["api"].resources.cpu == 0.5
    assert services["api"].restart.max_restarts == 3 and services["api"].stop.timeout == 90
    assert services["legacy"].resources.memory == 2**30


def test_anchors_and_merge_keys_through_the_loader() -> None:
    _, path = fixture("anchors")
    stack = load_stack(path, environ={})
    assert set(stack.services) == {"queue", "emails", "reports"}
    assert stack.services["emails"].image == "acme/jobs:stable"
    assert stack.services["emails"].env == {"TZ": "UTC", "LOG_FORMAT": "json"}
    assert stack.services["reports"].env == {"TZ": "UTC", "LOG_FORMAT": "text"}
    assert stack.services["reports"].conditions == {"queue": Condition.STARTED}
    assert stack.services["queue"].restart.policy == RestartMode.ALWAYS


# --- units of the conversion ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("port", "ports", "expose"),
    [
        ("3000", {"p3000": 3000}, None),
        (3000, {"p3000": 3000}, None),
        ("8080:80", {"p80": 80}, 8080),
        ("127.0.0.1:5432:5432", {"p5432": 5432}, None),
        ("127.0.0.1::5432", {"p5432": 5432}, None),
        ("9000-9001:9000-9001", {"p9000": 9000, "p9001": 9001}, None),
        ("[::1]:8443:443/tcp", {"p443": 443}, 8443),
        ("${HTTP:-8080}:80", {"p80": 80}, "${HTTP:-8080}"),
        ({"target": 80, "published": "8081", "name": "web"}, {"web": 80}, 8081),
    ],
)
def test_port_forms(port: Any, ports: dict[str, Any], expose: Any) -> None:
    data, notes = convert_compose({"services": {"s": {"image": "x", "ports": [port]}}})
    service = data["services"]["s"]
    assert service["ports"] == ports and service.get("expose") == expose
    assert not [n for n in notes if n.dropped]


@pytest.mark.parametrize("port", ["80:80:80:80", "http", "8000-8002:9000", "a:b"])
def test_unreadable_ports_are_listed(port: str) -> None:
    data, notes = convert_compose({"services": {"s": {"image": "x", "ports": [port]}}})
    assert "ports" not in data["services"]["s"]
    assert [(n.service, n.key, n.dropped) for n in notes] == [("s", "ports.0", True)]


@pytest.mark.parametrize(
    ("test", "argv", "shell"),
    [
        (["CMD", "pg_isready", "-q"], ["pg_isready", "-q"], False),
        (["CMD-SHELL", "pg_isready -q"], ["pg_isready", "-q"], False),
        ("redis-cli -h 127.0.0.1 ping", ["redis-cli", "-h", "127.0.0.1", "ping"], False),
        ("echo 'a b'", ["echo", "a b"], False),
        ("curl -f localhost || exit 1", ["sh", "-c", "curl -f localhost || exit 1"], True),
        ("redis-cli ping | grep PONG", ["sh", "-c", "redis-cli ping | grep PONG"], True),
        ("test $(cat /x) = 1", ["sh", "-c", "test $(cat /x) = 1"], True),
        ("cat /x > /dev/null", ["sh", "-c", "cat /x > /dev/null"], True),
        ("echo 'unclosed", ["sh", "-c", "echo 'unclosed"], True),
        (["CMD-SHELL", "a; b"], ["sh", "-c", "a; b"], True),
    ],
)
def test_healthcheck_shell_is_split_only_when_safe(test: Any, argv: list[str],
                                                     shell: bool) -> None:
    data, notes = convert_compose({"services": {"s": {"image": "x",
                                                      "healthcheck": {"test": test}}}})
    assert data["services"]["s"]["health"]["readiness"]["exec"] == argv
    assert bool(notes) is shell
    if shell:
        assert notes[0].render().startswith("note: service s: healthcheck.test: runs through "
                                            "a shell")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("${A}", "${A}"),
        ("$A/bin", "${A}/bin"),
        ("${A-x}", "${A:-x}"),
        ("${A:-${B-y}}", "${A:-${B:-y}}"),
        ("${A:?must be set}", "${A}"),
        ("$$HOME", "$$HOME"),
        ("cost: 5$", "cost: 5$"),
    ],
)
def test_interpolation_forms(text: str, expected: str) -> None:
    data, _ = convert_compose({"services": {"s": {"image": "x", "command": text}}})
    assert data["services"]["s"]["command"] == expected


def test_restart_and_dependency_forms() -> None:
    data, notes = convert_compose({"services": {
        "a": {"image": "x", "restart": False, "depends_on": ["b"]},
        "b": {"image": "x", "restart": "on-failure:3"},
        "c": {"image": "x", "restart": "sometimes"},
    }})
    assert data["services"]["a"]["restart"] == "no"
    assert data["services"]["a"]["depends_on"] == {"b": "started"}  # compose: a list = started
    assert data["services"]["b"]["restart"] == {"policy": "on-failure", "max_restarts": 3}
    assert "restart" not in data["services"]["c"]
    assert rendered(notes) == ["dropped: service c: restart: unknown restart policy 'sometimes'"]


def test_missing_fields_are_reported_not_emitted() -> None:
    """Against a stack model without the container fields, they are listed as dropped."""
    fields = set(Service.model_fields) - {"build", "volumes", "entrypoint"}
    data, notes = convert_compose(
        {"services": {"s": {"build": ".", "volumes": ["/a:/b"], "entrypoint": "x"}}},
        service_fields=fields)
    assert data["services"]["s"] == {"image": "localhost/compose-s:latest"}
    assert {n.key for n in notes} == {"build", "volumes", "entrypoint"}
    assert all("no `" in n.message for n in notes)


def test_origins_point_at_the_compose_keys() -> None:
    result = convert({"services": {"Web": {"image": "x", "environment": {"A": 1},
                                           "healthcheck": {"test": "true"}}}})
    assert result.origins[("services", "web")] == ("services", "Web")
    assert result.origins[("services", "web", "env")] == ("services", "Web", "environment")
    assert result.origins[("services", "web", "health", "readiness")] == (
        "services", "Web", "healthcheck")


# --- detection and the loader -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.yaml", "compose.yml",
                                  "compose.yaml", "docker-compose.override.yml",
                                  "compose.prod.yaml"])
def test_detected_by_file_name(name: str) -> None:
    assert looks_like_compose({"services": {"a": {"command": "x"}}}, f"/tmp/{name}")


@pytest.mark.parametrize(
    ("data", "compose"),
    [
        ({"version": "3", "services": {"a": {"image": "x"}}}, True),
        ({"services": {"a": {"image": "x", "ports": ["80:80"]}}}, True),
        ({"services": {"a": {"image": "x", "healthcheck": {"test": "true"}}}}, True),
        ({"services": {"a": {"image": "x"}}, "networks": {"n": None}}, True),
        ({"services": {"a": {"build": "."}}}, True),
        # stack files, and stack files with mistakes the stack loader must explain
        ({"services": {"a": {"command": "x", "ports": {"http": "auto"}}}}, False),
        ({"services": {"a": {"command": "x", "healthcheck": 1}}}, False),
        ({"services": {"a": {"command": "x", "environment": 1}}}, False),
        ({"services": {"a": {"image": "x", "health": {}, "ports": ["80"]}}}, False),
        ({"deploy": {}, "services": {"a": {"image": "x", "ports": ["80"]}}}, False),
        ({"services": {"a": {"image": "x"}}}, False),
    ],
)
def test_detected_by_content(data: dict[str, Any], compose: bool) -> None:
    assert looks_like_compose(data, "/tmp/stack.yaml") is compose


def test_loader_reads_a_compose_file_with_env_files(caplog: pytest.LogCaptureFixture) -> None:
    _, path = fixture("envfiles")
    with caplog.at_level(logging.WARNING, logger="shipyard.spec.compose"):
        stack = load_stack(path, environ={"API_KEY": "k1"})
    app = stack.services["app"]
    assert app.image == "node:18-alpine"  # NODE_VERSION from .env
    assert app.command == ["npm", "run", "start", "--", "--port", "4100"]
    assert app.ports == {"app_port": 4100}
    assert app.env["SHARED"] == "from-common" and app.env["LOCAL"] == "yes"
    # a variable naming itself (compose's pass-through) takes the value of the environment
    # or .env when the file is read, as compose does: not the control plane's environment
    # when the instance starts (tests/test_audit_spec.py)
    assert app.env["LOG_LEVEL"] == "info" and app.env["API_KEY"] == "k1"
    assert app.env["RETRIES"] == "3"
    assert app.env["VERBOSE"] == "false"
    assert "env_file.1.required" in caplog.text


def test_loader_errors_are_located_in_the_compose_file(tmp_path: Path) -> None:
    path = tmp_path / "docker-compose.yml"
    path.write_text(
        "services:\n"
        "  web:\n"
        "    image: x\n"
        "    healthcheck:\n"
        "      test: [CMD, check]\n"
        "      interval: often\n"
        "    depends_on:\n"
        "      - nowhere\n"
        "    deploy:\n"
        "      resources:\n"
        "        limits: {memory: lots}\n"
    )
    with pytest.raises(SpecError) as caught:
        load_stack(path, environ={})
    found = {(i.path, i.line) for i in caught.value.issues}
    assert ("services.web.health.readiness.interval", 6) in found
    assert ("services.web.resources.memory", 11) in found
    assert any(i.line == 8 and "nowhere" in i.message for i in caught.value.issues)


def test_compose_only_keys_in_any_file_name(tmp_path: Path) -> None:
    stack = parse_stack("version: '3'\nservices:\n  a: {image: x, command: sleep 1}\n",
                        file=str(tmp_path / "stack.yml"), base_dir=tmp_path, environ={})
    assert isinstance(stack, Stack) and stack.services["a"].command == ["sleep", "1"]


def test_compose_profiles_from_the_environment() -> None:
    _, path = fixture("profiles")
    assert set(load_stack(path, environ={}).services) == {"app", "db"}
    stack = load_stack(path, environ={"COMPOSE_PROFILES": "tools"})
    assert set(stack.services) == {"app", "db", "adminer"}
