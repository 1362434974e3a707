"""Shared fixtures. Layer-specific fixtures live in the test modules that use them."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
# The interpreter of the project's venv: children spawned by tests start fast from it.
PYTHON = sys.executable


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh $SHIPYARD_HOME for the test."""
    path = tmp_path / "shipyard-home"
    path.mkdir()
    monkeypatch.setenv("SHIPYARD_HOME", str(path))
    return path


@pytest.fixture
def shipyard(home: Path, tmp_path: Path) -> Iterator[Any]:
    """The installed console script, run in tmp_path/project against `home`
    (tests/test_cli.py's `Shipyard`); its server and instances are stopped at the end."""
    from tests.test_cli import Shipyard

    project = tmp_path / "project"
    project.mkdir()
    runner = Shipyard(home, project)
    try:
        yield runner
    finally:
        runner.cleanup()


# Runtimes made without a cgroup name share one top cgroup; pruning the empty cgroups of
# one test must not race another xdist worker's stack that is being created there.
os.environ.setdefault("SHIPYARD_CGROUP_NAME",
                      f"shipyard-test-{os.environ.get('PYTEST_XDIST_WORKER', 'gw0')}")


def port_range(size: int = 1000) -> str:
    """A port range of its own for each xdist worker: two control planes in two test
    processes would otherwise both see a port free and hand it out at the same time.

    The ranges lie below Linux's ephemeral range (32768-60999): there, the source port of
    any outgoing connection on the machine (a probe, a client) can take the port an
    instance is about to bind, and the instance exits with "address already in use"."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    n = int(worker[2:]) if worker[2:].isdigit() else 0
    low = 20000 + (n % 12) * size
    return f"{low}-{low + size - 1}"


def pids_alive(pids: list[int]) -> list[int]:
    """The pids from `pids` that still exist in /proc (zombies excluded)."""
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


os.environ.setdefault("SHIPYARD_TEST", "1")


@pytest.fixture(scope="session")
def api_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One podman API service (`podman system service`) for the session's container
    tests (test_container_*.py skip themselves when podman cannot run)."""
    from shipyard.runtime.podman import PodmanService

    service = PodmanService(tmp_path_factory.mktemp("podman"))
    url = service.ensure()
    try:
        yield url
    finally:
        service.stop()


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[Any]:
    """An engine of its own for the test, in tmp_path/home; it stops every instance when
    the test ends."""
    from shipyard import Engine, EngineConfig

    eng = Engine(EngineConfig(home=tmp_path / "home", stop_on_exit=True))
    async with eng:
        yield eng
