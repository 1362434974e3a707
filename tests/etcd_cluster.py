"""Real etcd servers for the tests: one member or a cluster, on 127.0.0.1.

    with EtcdCluster(3) as cluster:         # 3 members, started and healthy
        url = cluster.url("mytest")         # etcd://127.0.0.1:p1,...:p3/mytest
        cluster.kill(cluster.leader())      # SIGKILL the leading member (start_member(i)
                                            # brings it back with its data)

Each member gets a temporary data dir (in /dev/shm when there is one and `base_dir` is
not given: the tests measure Shipyard, not the disk) and two ports from a band of its own
for each xdist worker, checked free before use; everything is killed and removed on
stop(). Members die with the test process that started them (PR_SET_PDEATHSIG, through
setpriv), even if it is killed.

`shared_etcd()` is one single-member server per test process, started on first use and
stopped when pytest ends: the store suite gives each test a namespace of its own
(`etcd://.../<unique cluster name>`) instead of a server of its own.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ETCD = shutil.which("etcd")
_BAND = 60  # ports per xdist worker
_BASE = 21000  # below the kernel's ephemeral range (32768+), apart from conftest.port_range
_next_port = 0


def worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker[2:]) if worker[2:].isdigit() else 0


def _free_port() -> int:
    """The next port of this worker's band that nothing listens on."""
    global _next_port
    low = _BASE + worker_index() * _BAND
    for _ in range(_BAND):
        port = low + _next_port % _BAND
        _next_port += 1
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{low + _BAND - 1}")


# Members die with the process that started them: `setpriv --pdeathsig` (util-linux) sets
# PR_SET_PDEATHSIG and execs etcd. Not a preexec_fn: Python code between fork and exec in
# a process whose gRPC threads are running can crash the child.
_SETPRIV = shutil.which("setpriv")


def require_etcd() -> str:
    """The etcd binary; skips the test when it is missing (fails in CI)."""
    if ETCD is None:
        if os.environ.get("CI"):
            pytest.fail("etcd is not on PATH (.ci/run installs Debian's etcd-server)")
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    return ETCD


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


class EtcdCluster:
    """`size` etcd members on 127.0.0.1 (see the module docs)."""

    def __init__(self, size: int = 1, *, token: str | None = None,
                 base_dir: Path | None = None) -> None:
        self.etcd = require_etcd()
        shm = Path("/dev/shm")
        if base_dir is None and shm.is_dir() and os.access(shm, os.W_OK):
            base_dir = shm
        self.dir = Path(tempfile.mkdtemp(prefix="shipyard-etcd-", dir=base_dir))
        self.token = token or f"shipyard-{uuid.uuid4().hex[:8]}"
        self.members = [Member(f"m{i}", _free_port(), _free_port(), self.dir / f"m{i}")
                        for i in range(size)]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def url(self, cluster: str = "default") -> str:
        return f"etcd://{','.join(self.endpoints)}/{cluster}"

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 20.0) -> None:
        """Start every member and wait until the cluster has a leader."""
        try:
            for i in range(len(self.members)):
                self.start_member(i, wait=False)
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise

    def start_member(self, i: int, *, wait: bool = True, timeout: float = 20.0) -> None:
        m = self.members[i]
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        cmd = [
            *([_SETPRIV, "--pdeathsig", "KILL", "--"] if _SETPRIV else []),
            self.etcd, "--name", m.name, "--data-dir", str(m.data_dir),
            "--listen-client-urls", f"http://{m.endpoint}",
            "--advertise-client-urls", f"http://{m.endpoint}",
            "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial, "--initial-cluster-token", self.token,
            "--initial-cluster-state", "new",
            "--heartbeat-interval", "50", "--election-timeout", "500",
            "--logger", "zap", "--log-level", "error", "--log-outputs", "stderr",
        ]
        log = open(self.dir / f"{m.name}.log", "ab")  # noqa: SIM115 (kept by the child)
        try:
            m.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        finally:
            log.close()
        if wait:
            self.wait_healthy(timeout, members=[i])

    def wait_healthy(self, timeout: float = 20.0, members: list[int] | None = None) -> None:
        """Until every listed member (default: all running) answers /health with a leader."""
        deadline = time.monotonic() + timeout
        todo = [i for i in (members if members is not None else range(len(self.members)))
                if self.members[i].proc is not None]
        while todo:
            i = todo[0]
            m = self.members[i]
            assert m.proc is not None
            if m.proc.poll() is not None:
                raise RuntimeError(f"etcd {m.name} exited with {m.proc.returncode}: "
                                   f"{self.log(i)[-2000:]}")
            if _healthy(m.endpoint):
                todo.pop(0)
                continue
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd {m.name} not healthy after {timeout}s: "
                                   f"{self.log(i)[-2000:]}")
            time.sleep(0.05)

    def log(self, i: int) -> str:
        path = self.dir / f"{self.members[i].name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def leader(self) -> int:
        """The index of the member that leads (asked of the running members)."""
        status = {i: _status(m.endpoint) for i, m in enumerate(self.members)
                  if m.proc is not None and m.proc.poll() is None}
        ids = {i: s["header"]["member_id"] for i, s in status.items() if s}
        for s in status.values():
            if s and s.get("leader") in ids.values():
                return next(i for i, mid in ids.items() if mid == s["leader"])
        raise RuntimeError("no etcd member knows a leader")

    def kill(self, i: int) -> None:
        """SIGKILL member `i` (its data dir stays: start_member(i) brings it back)."""
        proc = self.members[i].proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        self.members[i].proc = None

    def stop(self) -> None:
        """Kill every member and remove the data dirs."""
        for i in range(len(self.members)):
            with contextlib.suppress(Exception):
                self.kill(i)
        shutil.rmtree(self.dir, ignore_errors=True)


def _healthy(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{endpoint}/health", timeout=1) as resp:
            return b'"true"' in resp.read()
    except OSError:
        return False


def _status(endpoint: str) -> dict[str, Any] | None:
    """etcd's maintenance status through its JSON gateway, None if it does not answer."""
    req = urllib.request.Request(f"http://{endpoint}/v3/maintenance/status", data=b"{}",
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=1) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except (OSError, ValueError):
        return None


_shared: EtcdCluster | None = None


def shared_etcd(config: pytest.Config | None = None) -> EtcdCluster:
    """This test process's single-member etcd, started on first use; stopped when pytest
    ends (`config.add_cleanup`) or, at the latest, with this process."""
    global _shared
    if _shared is None:
        cluster = EtcdCluster(1)
        cluster.start()
        _shared = cluster
        atexit.register(_stop_shared)
    if config is not None and not getattr(config, "_shipyard_etcd_cleanup", False):
        config._shipyard_etcd_cleanup = True  # type: ignore[attr-defined]
        config.add_cleanup(_stop_shared)
    return _shared


def _stop_shared() -> None:
    global _shared
    if _shared is not None:
        _shared.stop()
        _shared = None


def unique_url(config: pytest.Config | None = None) -> str:
    """A fresh namespace on the shared etcd: a test's own empty store."""
    return shared_etcd(config).url(f"t{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def etcd_server(request: pytest.FixtureRequest) -> EtcdCluster:
    """The shared single-member etcd of this xdist worker."""
    return shared_etcd(request.config)
