"""Benchmark: container start-to-ready with the container runtime, against `podman run`
alone, on the same podman and the same busybox image (built FROM scratch, as in the tests).

Ready = an HTTP server in the container (busybox httpd on the host network) answers a TCP
connect on 127.0.0.1. Each round starts one container each way, sequentially, waits until
its port answers, then removes it; the figure is the median over the rounds and the ratio
runtime / podman-run (1.0 = no overhead; below 1: the API path is faster than the CLI,
which pays podman's own start-up each time).

    .venv/bin/python bench/bench_container.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.podman_env import busybox_image, remove_labelled, why_podman_cannot_run

from shipyard.runtime.base import LaunchSpec
from shipyard.runtime.container import ContainerRuntime
from shipyard.runtime.container_spec import ContainerSpec
from shipyard.runtime.podman import PodmanService, podman_args

SERVE = "mkdir -p /www && exec httpd -f -p 127.0.0.1:{port} -h /www"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def until_ready(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not answers(port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"port {port} never answered")
        await asyncio.sleep(0.005)


async def with_runtime(rt: ContainerRuntime, image: str, home: Path) -> float:
    port = free_port()
    name = f"bench-{uuid.uuid4().hex[:6]}"
    spec = LaunchSpec(stack="bench", service="web", instance=name,
                      argv=["sh", "-c", SERVE.format(port=port)], env={}, workdir="/",
                      log_path=str(home / f"{name}.log"), container=ContainerSpec(image))
    begin = time.perf_counter()
    handle = await rt.start(spec)
    await until_ready(port)
    took = time.perf_counter() - begin
    await rt.stop(handle, "SIGKILL", 5)
    return took


async def with_podman_run(image: str, ulimits: list[str]) -> float:
    port = free_port()
    name = f"shipyard-bench-cli-{uuid.uuid4().hex[:6]}"
    podman = shutil.which("podman") or "podman"
    begin = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        podman, *podman_args(), "run", "-d", "--name", name, "--network", "host", *ulimits,
        "--label", "shipyard.bench=1", image, "sh", "-c", SERVE.format(port=port),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"podman run failed: {err.decode()}")
    await until_ready(port)
    took = time.perf_counter() - begin
    subprocess.run([podman, *podman_args(), "rm", "-f", name], capture_output=True, check=False)
    return took


async def main(rounds: int) -> None:
    reason = why_podman_cannot_run()
    if reason:
        raise SystemExit(f"podman cannot run: {reason}")
    image = busybox_image()
    with tempfile.TemporaryDirectory(prefix="shipyard-bench-") as tmp:
        home = Path(tmp)
        service = PodmanService(home / "svc")
        url = service.ensure()
        rt = ContainerRuntime(home / "home", base_url=url)
        ulimits = [f"--ulimit={u.name}={u.soft}:{u.hard}" for u in rt._ulimits]
        try:
            await with_runtime(rt, image, home)  # warm up: connection, image lookup
            await with_podman_run(image, ulimits)
            ours, cli = [], []
            for _ in range(rounds):
                ours.append(await with_runtime(rt, image, home))
                cli.append(await with_podman_run(image, ulimits))
        finally:
            await rt.close()
            remove_labelled(f"shipyard.home={rt.home_label}")
            remove_labelled("shipyard.bench=1")
            service.stop()
    med_ours, med_cli = statistics.median(ours), statistics.median(cli)
    print(f"container start-to-ready, median of {rounds} (busybox httpd, host network)")
    print(f"  shipyard container runtime: {med_ours * 1000:7.1f} ms "
          f"(min {min(ours) * 1000:.1f}, max {max(ours) * 1000:.1f})")
    print(f"  podman run -d alone:        {med_cli * 1000:7.1f} ms "
          f"(min {min(cli) * 1000:.1f}, max {max(cli) * 1000:.1f})")
    print(f"  ratio runtime / podman run: {med_ours / med_cli:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    asyncio.run(main(parser.parse_args().rounds))
