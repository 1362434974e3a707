"""The container runtime: every instance is a container, through the Docker-compatible API
(podman's, started by Shipyard when no engine is configured, or Docker's).

- Host network by default, so `PORT` and the probes work as for processes.
- Labels `shipyard.home`, `shipyard.stack`, `shipyard.service`, `shipyard.instance` let a
  restarted control plane find and re-adopt its containers (`discover`).
- Limits (container_spec.limit_options): memory and swap, CPU, cpuset, GPUs (a device
  request), pids, and ulimits no higher than the control plane's own (a container may
  not raise them above the host's).
- Output: one thread per container follows its logs into the instance's log file and,
  when the stream ends, reads the exit status; the container is then removed.
- Exit codes follow the process runtime: 128+N (killed by signal N) is reported as -N.
  OOM: the engine's OOMKilled, else (podman with runc on cgroups v1 does not set it) the
  kernel log's OOM record for the container.

The Docker SDK is synchronous: each call runs in a thread (`asyncio.to_thread`); the loop
never waits on the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import resource
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
import psutil
import requests
from docker.types import Ulimit

from shipyard.errors import RuntimeLaunchError, TransientLaunchError
from shipyard.runtime.base import Handle, LaunchSpec, Runtime
from shipyard.runtime.container_images import ensure_image, explain, mounts_for
from shipyard.runtime.container_spec import container_env, limit_options
from shipyard.runtime.logrelay import Sink
from shipyard.runtime.podman import PodmanService, configured_url, oom_killed_in_kernel_log

log = logging.getLogger(__name__)

OOM_KILLED = "oom-killed"
LABEL_HOME, LABEL_STACK = "shipyard.home", "shipyard.stack"
LABEL_SERVICE, LABEL_INSTANCE = "shipyard.service", "shipyard.instance"
_FINISHED_KEPT = 1000
Result = tuple[int | None, str | None]  # exit code, reason


@dataclass
class _Tracked:
    id: str
    log_path: str
    done: asyncio.Future[Result]
    memory_limit: int = 0
    key: str = ""  # stack/instance, for log notices
    stop_requested: bool = False
    thread: threading.Thread | None = field(default=None, repr=False)


# Caps on what a container asks for: a sandboxed host may refuse even its own limits
# (setrlimit EPERM at container init); nproc counts per user across the host.
_ULIMIT_CAPS = {"nofile": 65536, "nproc": 4096}


def default_ulimits() -> list[Ulimit]:
    """The open-files and processes limits of containers: `$SHIPYARD_CONTAINER_ULIMITS`
    (`nofile=4096:4096,nproc=4096:4096`), else the control plane's own, capped (a
    container asking for more than the host allows does not start)."""
    configured = os.environ.get("SHIPYARD_CONTAINER_ULIMITS")
    if configured:
        limits = []
        for item in configured.split(","):
            name, _, values = item.strip().partition("=")
            soft, _, hard = values.partition(":")
            limits.append(Ulimit(name=name, soft=int(soft), hard=int(hard or soft)))
        return limits
    limits = []
    for name, which in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        soft, hard = resource.getrlimit(which)
        cap = _ULIMIT_CAPS[name]
        soft = cap if soft == resource.RLIM_INFINITY else min(soft, cap)
        hard = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
        limits.append(Ulimit(name=name, soft=min(soft, hard), hard=hard))
    return limits


def exit_code(code: int | None) -> int | None:
    """128+N (the container's main process was killed by signal N) as -N."""
    if code is not None and 128 < code < 128 + signal.NSIG:
        return -(code - 128)
    return code


class ContainerRuntime(Runtime):
    name = "container"

    def __init__(self, home: Path, *, base_url: str | None = None,
                 podman_args: list[str] | None = None, ulimits: list[Ulimit] | None = None,
                 network: str = "host",
                 on_notice: Callable[[dict[str, Any]], None] | None = None) -> None:
        """`on_notice`: told when the output of a container cannot be written to its log
        file (a full disk: it is dropped) and when it can again (runtime/logrelay.py)."""
        self.home = Path(home)
        self.on_notice = on_notice
        self._loop: asyncio.AbstractEventLoop | None = None
        self.volumes_dir = self.home / "volumes"
        self.home_label = hashlib.sha1(str(self.home.resolve()).encode()).hexdigest()[:12]
        self.warning: str | None = None
        self._base_url = base_url
        self._podman_args = podman_args
        self._ulimits = default_ulimits() if ulimits is None else ulimits
        self._network = network
        self._service: PodmanService | None = None
        self._client: docker.DockerClient | None = None
        self._connect_lock = threading.Lock()
        self._tracked: dict[str, _Tracked] = {}
        self._finished: OrderedDict[str, Result] = OrderedDict()
        self._images: dict[str, asyncio.Lock] = {}
        self._ready_images: set[str] = set()
        self._closing = False

    # -- the engine ---------------------------------------------------------------------
    async def client(self) -> docker.DockerClient:
        if self._client is None:
            await asyncio.to_thread(self._connect)
        assert self._client is not None
        return self._client

    def _connect(self) -> None:
        with self._connect_lock:
            if self._client is not None:
                return
            url = self._base_url or configured_url()
            if url is None:
                self._service = PodmanService(self.home, self._podman_args)
                url = self._service.ensure()
            client = docker.DockerClient(base_url=url, timeout=120, max_pool_size=64)
            try:
                client.ping()
            except (docker.errors.DockerException, requests.RequestException) as exc:
                client.close()
                raise TransientLaunchError(f"the container engine at {url} does not "
                                           f"answer: {exc}") from None
            self._client = client

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        client = await self.client()
        return await asyncio.to_thread(fn, client, *args, **kwargs)

    # -- start ----------------------------------------------------------------------------
    def container_name(self, stack: str, instance: str) -> str:
        return f"shipyard-{self.home_label[:6]}-{stack}-{instance}"

    async def start(self, spec: LaunchSpec) -> Handle:
        cs = spec.container
        if cs is None:
            raise RuntimeLaunchError(f"service {spec.service} has no image: the container "
                                     "runtime runs images")
        lock = self._images.setdefault(cs.image, asyncio.Lock())
        async with lock:
            if cs.image not in self._ready_images or cs.pull_policy in ("always", "build"):
                done = await self._call(ensure_image, cs)
                if done != "present":
                    log.info("image %s %s", cs.image, done)
                self._ready_images.add(cs.image)
        name = self.container_name(spec.stack, spec.instance)
        labels = {LABEL_HOME: self.home_label, LABEL_STACK: spec.stack,
                  LABEL_SERVICE: spec.service, LABEL_INSTANCE: spec.instance}
        options: dict[str, Any] = {
            "name": name, "labels": labels, "environment": container_env(spec.env, cs),
            "network_mode": self._network, "ulimits": self._ulimits,
            "stop_signal": spec.stop_signal, "detach": True,
            "mounts": mounts_for(cs, spec.stack, self.volumes_dir),
        }
        if cs.command:
            options["command"] = spec.argv
        if cs.entrypoint is not None:
            options["entrypoint"] = cs.entrypoint
        options.update(limit_options(spec))
        if cs.pids_limit:
            options["pids_limit"] = cs.pids_limit
        Path(spec.log_path).parent.mkdir(parents=True, exist_ok=True)
        attrs = await self._call(_create_and_start, cs.image, options)
        handle = _handle(attrs, spec.instance)
        handle.extra["log_path"] = spec.log_path  # kept with the handle: for re-adoption
        self._track(handle, spec.log_path, since=None, memory_limit=spec.memory_limit)
        return handle

    # -- supervision ------------------------------------------------------------------------
    def _track(self, handle: Handle, log_path: str, since: float | None,
               memory_limit: int = 0) -> _Tracked:
        cid = handle.extra["container"]
        tracked = self._tracked.get(cid)
        if tracked is not None:
            return tracked
        loop = asyncio.get_running_loop()
        self._loop = loop
        key = f"{handle.extra.get(LABEL_STACK, '')}/{handle.instance}"
        tracked = _Tracked(cid, log_path, loop.create_future(), memory_limit, key=key)
        self._tracked[cid] = tracked
        assert self._client is not None
        tracked.thread = threading.Thread(
            target=self._pump, args=(self._client, tracked, since, loop),
            name=f"container-{handle.instance}", daemon=True)
        tracked.thread.start()
        return tracked

    def _pump(self, client: docker.DockerClient, t: _Tracked, since: float | None,
              loop: asyncio.AbstractEventLoop) -> None:
        """Follow the container's output into its log file until it exits; then record
        its exit status, resolve `done`, and remove the container."""
        result: Result = (None, None)
        try:
            sink = Sink("", -1, t.log_path, 0, 0, t.key)  # rotated by the engine
            try:
                sink.open_log()
                result = self._follow(client, t, sink, since)
            finally:
                sink.close()
        except Exception as exc:  # the engine went away: the outcome is unknown
            if self._closing:
                return
            result = (None, f"lost track of the container: {exc}")
        if self._closing and result == (None, None):
            return
        self._finished[t.id] = result
        while len(self._finished) > _FINISHED_KEPT:
            self._finished.popitem(last=False)
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(_resolve, t.done, result)
        with contextlib.suppress(docker.errors.DockerException, requests.RequestException):
            client.api.remove_container(t.id, v=True, force=True)

    def _follow(self, client: docker.DockerClient, t: _Tracked, sink: Sink,
                since: float | None) -> Result:
        while True:
            try:
                kwargs = {"since": int(since)} if since is not None else {}
                for chunk in client.api.logs(t.id, stdout=True, stderr=True, stream=True,
                                             follow=True, **kwargs):
                    for notice in sink.write(chunk):  # a full disk drops, and says so
                        self._notify(notice)
            except docker.errors.NotFound:
                return (None, "the container was removed")
            except (docker.errors.APIError, requests.RequestException):
                if self._closing:
                    return (None, None)
                time.sleep(0.2)
            if self._closing:
                return (None, None)
            try:
                state = client.api.inspect_container(t.id)["State"]
            except docker.errors.NotFound:
                return (None, "the container was removed")
            if not state.get("Running") and state.get("Status") != "paused":
                return self._outcome(t, state)
            since = time.time()  # the stream broke while it runs: follow again

    def _notify(self, notice: dict[str, Any]) -> None:
        """From the output thread: hand a log notice to the engine's loop."""
        loop, handler = self._loop, self.on_notice
        if loop is not None and handler is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                loop.call_soon_threadsafe(handler, notice)

    def _outcome(self, t: _Tracked, state: dict[str, Any]) -> Result:
        code = exit_code(state.get("ExitCode"))
        if state.get("OOMKilled"):
            return code, OOM_KILLED
        if code == -signal.SIGKILL and not t.stop_requested and \
                oom_killed_in_kernel_log(t.id):
            return code, OOM_KILLED
        return code, None

    async def _tracked_for(self, handle: Handle) -> _Tracked | None:
        cid = handle.extra.get("container", "")
        tracked = self._tracked.get(cid)
        if tracked is None and cid not in self._finished:
            await self.client()
            # adopted: follow from now on (what it wrote meanwhile is in the engine's log)
            log_path = handle.extra.get("log_path") or os.devnull
            tracked = self._track(handle, log_path, since=time.time())
        return tracked

    async def wait(self, handle: Handle) -> int | None:
        tracked = await self._tracked_for(handle)
        if tracked is None:
            return self._finished[handle.extra["container"]][0]
        code, _ = await asyncio.shield(tracked.done)
        return code

    def exit_reason(self, handle: Handle) -> str | None:
        return self._finished.get(handle.extra.get("container", ""), (None, None))[1]

    async def stop(self, handle: Handle, signal_name: str, timeout: float) -> None:
        tracked = await self._tracked_for(handle)
        if tracked is None or tracked.done.done():
            return
        tracked.stop_requested = True
        await self._kill(handle, signal_name)
        try:
            await asyncio.wait_for(asyncio.shield(tracked.done), timeout)
        except TimeoutError:
            await self._kill(handle, "SIGKILL")
            await asyncio.shield(tracked.done)

    async def _kill(self, handle: Handle, signal_name: str) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            try:
                await self._call(lambda c: c.api.kill(handle.extra["container"], signal_name))
            except docker.errors.APIError as exc:
                if exc.status_code != 409:  # 409: not running any more
                    raise

    async def send_signal(self, handle: Handle, signal_name: str) -> None:
        """SIGSTOP / SIGCONT pause and resume the whole container (freezer); any other
        signal goes to its main process."""
        cid = handle.extra["container"]
        action: Callable[[docker.DockerClient], Any] = {
            "SIGSTOP": lambda c: c.api.pause(cid), "SIGCONT": lambda c: c.api.unpause(cid),
        }.get(signal_name, lambda c: c.api.kill(cid, signal_name))
        with contextlib.suppress(docker.errors.NotFound):
            await self._call(action)

    def adopt(self, handle: Handle) -> bool:
        """True when the container still runs: checked on /proc (its main process, its
        start time, its cgroup naming the container), so the loop does not wait on the
        engine; where the container's processes are not visible (an engine in a VM), the
        engine is asked."""
        cid = handle.extra.get("container")
        if not cid or handle.extra.get("runtime") != "container":
            return False
        try:
            proc = psutil.Process(handle.pid)
            if abs(proc.create_time() - handle.proc_start) > 1.0:
                return False
            with open(f"/proc/{handle.pid}/cgroup") as f:
                return cid in f.read() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            pass
        except (psutil.Error, OSError):
            return False
        if self._client is None:
            try:
                self._connect()
            except RuntimeLaunchError:
                return False
        assert self._client is not None
        try:
            state = self._client.api.inspect_container(cid)["State"]
        except (docker.errors.DockerException, requests.RequestException):
            return False
        return bool(state.get("Running")) and state.get("Pid") == handle.pid

    async def discover(self, stack: str | None = None, running: bool = True) -> list[Handle]:
        """The containers of this Shipyard home (of one stack), by their labels."""
        filters = [f"{LABEL_HOME}={self.home_label}"] + (
            [f"{LABEL_STACK}={stack}"] if stack else [])

        def find(client: docker.DockerClient) -> list[dict[str, Any]]:
            found = client.api.containers(all=not running, filters={"label": filters})
            return [client.api.inspect_container(c["Id"]) for c in found]

        return [_handle(attrs, attrs["Config"]["Labels"].get(LABEL_INSTANCE, ""))
                for attrs in await self._call(find)]

    async def exec(self, handle: Handle, argv: list[str], timeout: float,
                   env: dict[str, str] | None = None) -> tuple[int | None, bytes]:
        """Run `argv` inside the container; its exit code (None: timed out, then killed)
        and output. Raises RuntimeLaunchError when it cannot run at all."""
        from shipyard.runtime.container_exec import run_exec

        return await run_exec(self, handle.extra["container"], argv, timeout, env)

    async def close(self) -> None:
        self._closing = True
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)
        for tracked in list(self._tracked.values()):
            if tracked.thread is not None:
                await asyncio.to_thread(tracked.thread.join, 2.0)
        if self._service is not None:
            await asyncio.to_thread(self._service.stop)


def _resolve(future: asyncio.Future[Result], result: Result) -> None:
    if not future.done():
        future.set_result(result)


def _create_and_start(client: docker.DockerClient, image: str,
                      options: dict[str, Any]) -> dict[str, Any]:
    """Create and start a container (replacing a leftover of the same name); its attrs."""
    with contextlib.suppress(docker.errors.NotFound):
        client.api.remove_container(options["name"], v=True, force=True)
    try:
        container = client.containers.create(image, **options)
    except docker.errors.APIError as exc:
        raise RuntimeLaunchError(f"cannot create the container: {explain(exc)}") from None
    try:
        container.start()
        container.reload()
    except docker.errors.APIError as exc:
        with contextlib.suppress(docker.errors.DockerException):
            container.remove(v=True, force=True)
        raise RuntimeLaunchError(f"cannot start the container: {explain(exc)}") from None
    return dict(container.attrs)


def _handle(attrs: dict[str, Any], instance: str) -> Handle:
    state = attrs["State"]
    pid = int(state.get("Pid") or 0)
    try:
        started = psutil.Process(pid).create_time() if pid else 0.0
    except psutil.Error:  # not on this kernel (an engine in a VM)
        started = _timestamp(state.get("StartedAt", ""))
    labels = attrs.get("Config", {}).get("Labels") or {}
    extra = {"runtime": "container", "container": attrs["Id"], "name": attrs["Name"].lstrip("/")}
    extra.update({k: labels[k] for k in (LABEL_STACK, LABEL_SERVICE) if k in labels})
    return Handle(instance=instance, pid=pid, pgid=pid, proc_start=started, extra=extra)


def _timestamp(text: str) -> float:
    """Docker's RFC 3339 time with nanoseconds, as seconds since the epoch."""
    head, _, rest = text.partition(".")
    zone = rest.lstrip("0123456789") or "Z"
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(head + zone.replace("Z", "+00:00")).timestamp()
    return 0.0
