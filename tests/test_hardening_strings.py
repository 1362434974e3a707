"""Hostile strings in every field that reaches a command — command args, env values,
env-file values, probe exec args, verify exec, workdir — go through a real engine and
real processes verbatim: no shell ever runs them (no file `pwned` appears), unless the
service says `shell: true` (which the last test shows the check would catch)."""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from shipyard import Engine, EngineConfig
from shipyard.spec.loader import parse_stack
from tests.conftest import port_range

PY = sys.executable
HOSTILE = [
    "; rm -rf /",
    "$(touch pwned)",
    "`touch pwned`",
    "a\ntouch pwned\n",
    "x && touch pwned",
    "' ; touch pwned ; '",
    '" ; touch pwned ; "',
    "| touch pwned",
    "> pwned",
    "$HOME ${NOT_A_VAR:-x} $$",  # `${...}` is Shipyard's (a default here), `$$` is `$`
]
EXPANDED = [*HOSTILE[:-1], "$HOME x $"]  # what the last one becomes after interpolation
# written as `$$`-escaped where Shipyard would interpolate, so that they arrive verbatim
DUMP = """\
import json, os, sys, time
out = sys.argv[1]
record = {"argv": sys.argv[2:], "cwd": os.getcwd(),
          "env": {k: v for k, v in os.environ.items() if k.startswith("HOSTILE_")}}
name = os.environ.get("SHIPYARD_INSTANCE", "none")
with open(f"{out}.{name}.json", "w") as f:
    json.dump(record, f)
if out.endswith("/cmd"):  # the service itself; probes and verify return at once
    time.sleep(3600)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_file_line(key: str, value: str) -> str:
    """A dotenv line whose value python-dotenv reads back exactly as `value`."""
    if "'" not in value and "\n" not in value:
        return f"{key}='{value}'"
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'{key}="{escaped}"'


def no_pwned(*roots: Path) -> None:
    for root in roots:
        found = [p for p in root.rglob("*") if p.name == "pwned"]
        assert found == [], found


def records(folder: Path, prefix: str) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob(f"{prefix}.*.json"))]


@pytest.fixture
async def engine(tmp_path: Path):
    eng = Engine(EngineConfig(home=tmp_path / "home", stop_on_exit=True))
    async with eng:
        yield eng


def hostile_stack(tmp_path: Path, version: str, port: int) -> str:
    out = tmp_path / "out"
    workdir = "w " + "".join(h.replace("/", "_") for h in HOSTILE[:6])  # no '/' in a name
    (tmp_path / workdir).mkdir(exist_ok=True)
    (tmp_path / "dump.py").write_text(DUMP)
    (tmp_path / "hostile.env").write_text("\n".join(
        env_file_line(f"HOSTILE_FILE_{i}", h) for i, h in enumerate(HOSTILE[:-1])) + "\n")
    dump = str(tmp_path / "dump.py")
    service = {
        "version": version,
        "command": [PY, dump, str(out / "cmd"), *HOSTILE],
        "workdir": workdir,
        "env": {f"HOSTILE_ENV_{i}": h for i, h in enumerate(HOSTILE)},
        "env_file": "hostile.env",
        "ports": {"http": "auto"},
        "expose": port,
        "health": {"readiness": {"exec": [PY, dump, str(out / "probe"), *HOSTILE],
                                 "interval": "100ms", "timeout": "5s"}},
        "stop": {"timeout": "3s"},
        "update": {"strategy": "blue-green", "keep_previous": "0s",
                   "verify": {"exec": [PY, dump, str(out / "verify"), *HOSTILE],
                              "timeout": "10s"}},
    }
    return yaml.safe_dump({"name": "hostile", "ports": {"range": port_range()},
                           "deploy": {"timeout": "60s"}, "services": {"api": service}})


async def test_hostile_strings_reach_processes_verbatim(engine: Engine, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    cwd = Path.cwd()
    v1 = parse_stack(hostile_stack(tmp_path, "1", port), base_dir=tmp_path, environ={})
    assert (await engine.apply(v1)).ok
    v2 = parse_stack(hostile_stack(tmp_path, "2", port), base_dir=tmp_path, environ={})
    result = await engine.apply(v2)  # blue-green: the verify exec runs before the swap
    assert result.ok, result
    workdir = os.path.realpath(tmp_path / v1.services["api"].workdir)  # type: ignore[operator]
    commands = records(out, "cmd")
    assert len(commands) == 2  # one instance per version
    for record in commands:
        assert record["argv"] == EXPANDED
        assert record["cwd"] == workdir
        env = record["env"]
        assert [env[f"HOSTILE_ENV_{i}"] for i in range(len(HOSTILE))] == EXPANDED
        assert [env[f"HOSTILE_FILE_{i}"] for i in range(len(HOSTILE) - 1)] == HOSTILE[:-1]
    probes, verify = records(out, "probe"), records(out, "verify")
    assert probes and verify
    for record in probes + verify:
        assert record["argv"] == EXPANDED
    no_pwned(tmp_path, cwd)


async def test_a_string_command_is_split_never_run_by_a_shell(engine: Engine,
                                                              tmp_path: Path) -> None:
    (tmp_path / "dump.py").write_text(DUMP)
    words = [h for h in HOSTILE[:-1] if "\n" not in h]
    command = " ".join([shlex.quote(PY), "dump.py", "out", *map(shlex.quote, words)])
    text = yaml.safe_dump({"name": "split", "services": {"one": {
        "command": command, "restart": {"policy": "no"}}}})
    stack = parse_stack(text, base_dir=tmp_path, environ={})
    assert stack.services["one"].command == [PY, "dump.py", "out", *words]
    assert (await engine.apply(stack)).ok
    for _ in range(100):
        if records(tmp_path, "out"):
            break
        await __import__("asyncio").sleep(0.05)
    assert [r["argv"] for r in records(tmp_path, "out")] == [words]
    no_pwned(tmp_path)


async def test_shell_true_does_run_a_shell(engine: Engine, tmp_path: Path) -> None:
    """The control: with `shell: true` the same string is a shell's, and the check above
    would see the file it makes."""
    text = yaml.safe_dump({"name": "shell", "services": {"one": {
        "command": "echo $(touch pwned)", "shell": True, "restart": {"policy": "no"}}}})
    stack = parse_stack(text, base_dir=tmp_path, environ={})
    assert (await engine.apply(stack)).ok
    for _ in range(100):
        if (tmp_path / "pwned").exists():
            break
        await __import__("asyncio").sleep(0.05)
    with pytest.raises(AssertionError):
        no_pwned(tmp_path)
