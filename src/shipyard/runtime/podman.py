"""Finding a Docker-compatible API: a configured one, a Docker engine, or a podman API
service that Shipyard starts itself (`podman system service --time=0 unix://PATH`).

Which one, in order: the `base_url` given to the runtime; `$SHIPYARD_CONTAINER_HOST`;
`$DOCKER_HOST`; a Docker engine answering on /var/run/docker.sock; else podman, started
with the socket in the Shipyard home. Podman's global flags come from
`$SHIPYARD_PODMAN_ARGS`, else from the host: `--runtime runc` where crun cannot run
(cgroups v1 or hybrid), `--cgroup-manager cgroupfs --events-backend file` without systemd.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path

from shipyard.errors import RuntimeLaunchError

DOCKER_SOCKET = "/var/run/docker.sock"
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes


def podman_args() -> list[str]:
    """Podman's global flags for this host."""
    configured = os.environ.get("SHIPYARD_PODMAN_ARGS")
    if configured is not None:
        return shlex.split(configured)
    args: list[str] = []
    pure_v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    if not pure_v2 and shutil.which("runc"):
        args += ["--runtime", "runc"]
    if not Path("/run/systemd/system").is_dir():
        args += ["--cgroup-manager", "cgroupfs", "--events-backend", "file"]
    return args


def socket_answers(path: str | os.PathLike[str], timeout: float = 0.5) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except OSError:
            return False
    return True


def configured_url() -> str | None:
    """An API the environment names, or a Docker engine that answers; None: use podman."""
    for name in ("SHIPYARD_CONTAINER_HOST", "DOCKER_HOST"):
        value = os.environ.get(name)
        if value:
            return value
    if socket_answers(DOCKER_SOCKET):
        return f"unix://{DOCKER_SOCKET}"
    return None


class PodmanService:
    """A `podman system service` of our own, listening on a unix socket."""

    def __init__(self, home: Path, args: list[str] | None = None) -> None:
        self.home = home
        self.args = podman_args() if args is None else args
        path = home / "podman.sock"
        if len(str(path)) > _MAX_SOCKET_PATH:
            digest = hashlib.sha1(str(home).encode()).hexdigest()[:12]
            path = Path("/tmp") / f"shipyard-podman-{digest}.sock"
        self.socket = path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def ensure(self, timeout: float = 15.0) -> str:
        """Start the service unless one answers on the socket already; its URL."""
        if socket_answers(self.socket):
            return self.url  # left by an earlier control plane of this home: reuse it
        podman = shutil.which("podman")
        if podman is None:
            raise RuntimeLaunchError("no container engine: podman is not installed and no "
                                     "Docker engine answers",
                                     hint="install podman, or set DOCKER_HOST")
        self.home.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        log = open(self.home / "podman-service.log", "ab")  # noqa: SIM115 - given to the child
        try:
            self.process = subprocess.Popen(
                [podman, *self.args, "system", "service", "--time=0", self.url],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                close_fds=True, cwd=self.home)  # conmon may leave files in its cwd
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if socket_answers(self.socket):
                return self.url
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeLaunchError("the podman API service did not start",
                                 hint=f"see {self.home / 'podman-service.log'}")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the service if we started it (the containers keep running: conmon holds
        them, not the service)."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()


def oom_killed_in_kernel_log(container_id: str) -> bool | None:
    """Whether the kernel log records an OOM kill in the container's cgroup: True, False,
    or None when the log cannot be read. Podman on cgroups v1 (runc) does not always set
    OOMKilled, while the kernel says `oom-kill:... task_memcg=.../libpod-<id>`."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    found = False
    try:
        while True:
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                break
            except OSError:  # EPIPE: a record was overwritten while reading; go on
                continue
            if not record:
                break
            if b"oom-kill" in record and container_id.encode() in record:
                found = True
    finally:
        os.close(fd)
    return found
