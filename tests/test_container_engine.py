"""The engine with a stack that mixes a container (real podman, a busybox image built FROM
scratch) and a process: health-gated in dependency order, an exec probe that runs inside
the container, the container behind the router, and `down` removing it."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import pytest

from shipyard import Engine, EngineConfig
from shipyard.spec.models import Stack
from tests.conftest import port_range
from tests.podman_env import busybox_image, podman, why_podman_cannot_run
from tests.test_engine import svc
from tests.test_rollout import free_port

REASON = why_podman_cannot_run()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"podman cannot run: {REASON}")

HTTPD = ("mkdir -p /www && echo \"hello from $SHIPYARD_INSTANCE\" > /www/index.html && "
         "trap 'exit 0' TERM; httpd -f -p 127.0.0.1:$PORT -h /www & wait")


async def test_mixed_stack_of_a_container_and_a_process(
        tmp_path: Path, api_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHIPYARD_CONTAINER_HOST", api_url)
    expose = free_port()
    stack = Stack.model_validate({
        "name": "mix", "ports": {"range": port_range()}, "deploy": {"timeout": "60s"},
        "services": {
            "web": {"image": busybox_image(), "command": ["sh", "-c", HTTPD],
                    "ports": {"http": "auto"}, "expose": expose, "replicas": 2,
                    "stop": {"timeout": "3s"},
                    "health": {"readiness": {"exec": ["test", "-s", "/www/index.html"],
                                             "interval": "200ms"}}},
            "client": svc("--env-out", str(tmp_path / "client.env"),
                          depends_on={"web": "healthy"}),
        },
        "base_dir": str(tmp_path)})
    async with Engine(EngineConfig(home=tmp_path / "home", stop_on_exit=True)) as engine:
        result = await engine.apply(stack)
        assert result.ok, result
        web = await engine.instances("mix", "web")
        assert all(i.ready and i.runtime.get("runtime") == "container" for i in web), web
        env = json.loads((tmp_path / "client.env").read_text())
        assert env["WEB_URL"] == f"http://127.0.0.1:{expose}"
        def get() -> str:  # in a thread: the router runs in this event loop
            with urllib.request.urlopen(env["WEB_URL"] + "/", timeout=5) as answer:
                return str(answer.read().decode().strip())

        seen = {await asyncio.to_thread(get) for _ in range(6)}
        assert seen == {"hello from web-1", "hello from web-2"}
        await engine.down("mix")
    left = podman("ps", "-a", "--filter", "label=shipyard.stack=mix", "--format", "{{.ID}}",
                  "--url", api_url)
    assert left.stdout.strip() == ""


async def test_secrets_reach_a_container_as_a_variable_and_a_read_only_file(
        tmp_path: Path, api_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHIPYARD_CONTAINER_HOST", api_url)
    monkeypatch.setenv("TEST_DB_PASSWORD", "s3cret-value-for-the-container")
    show = ("mkdir -p /www && { cat /run/secrets/db; echo; echo \"$DB_PASSWORD\"; "
            "echo \"$DB_FILE\"; touch /run/secrets/db 2>/dev/null && echo writable "
            "|| echo read-only; } > /www/index.html && "
            "trap 'exit 0' TERM; httpd -f -p 127.0.0.1:$PORT -h /www & wait")
    stack = Stack.model_validate({
        "name": "sec", "ports": {"range": port_range()}, "deploy": {"timeout": "60s"},
        "secrets": {"db": {"env": "TEST_DB_PASSWORD"}},
        "services": {"web": {
            "image": busybox_image(), "command": ["sh", "-c", show],
            "ports": {"http": "auto"}, "stop": {"timeout": "3s"},
            "secrets": [{"name": "db", "file": "/run/secrets/db", "path_env": "DB_FILE"},
                        {"name": "db", "env": "DB_PASSWORD"}],
            "health": {"readiness": {"http": "/", "interval": "200ms"}}}},
        "base_dir": str(tmp_path)})
    async with Engine(EngineConfig(home=tmp_path / "home", stop_on_exit=True)) as engine:
        result = await engine.apply(stack)
        assert result.ok, result
        port = (await engine.instances("sec", "web"))[0].ports["http"]

        def get() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:
                return str(answer.read().decode())

        lines = (await asyncio.to_thread(get)).splitlines()
        assert lines == ["s3cret-value-for-the-container", "s3cret-value-for-the-container",
                         "/run/secrets/db", "read-only"], lines
        await engine.down("sec")
