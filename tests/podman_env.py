"""Real podman for the container tests (and bench/bench_container.py): a check that it can
run at all, a tiny busybox image built FROM scratch, and a podman API service."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

from shipyard.runtime.podman import podman_args

BUSYBOX = Path("/bin/busybox")
CONTAINERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
CMD ["/bin/sh"]
"""


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("podman") or "podman"
    return subprocess.run([exe, *podman_args(), *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def why_podman_cannot_run() -> str | None:
    """None when podman can build and run containers here, else why not."""
    if shutil.which("podman") is None:
        return "podman is not installed (apt-get install podman)"
    if not BUSYBOX.is_file():
        return "busybox-static is not installed (/bin/busybox missing)"
    try:
        info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"podman info failed: {exc}"
    if info.returncode != 0:
        return f"podman cannot run: {info.stderr.strip()[-300:]}"
    return None


def busybox_image() -> str:
    """Build (once per busybox binary) localhost/shipyard-test-busybox:<digest>."""
    digest = hashlib.sha256(BUSYBOX.read_bytes() + CONTAINERFILE.encode()).hexdigest()[:12]
    tag = f"localhost/shipyard-test-busybox:{digest}"
    if podman("image", "exists", tag).returncode == 0:
        return tag
    with tempfile.TemporaryDirectory(prefix="shipyard-bb-") as ctx:
        shutil.copy2(BUSYBOX, Path(ctx) / "busybox")
        (Path(ctx) / "Containerfile").write_text(CONTAINERFILE)
        done = podman("build", "-q", "-t", tag, ctx, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"cannot build the busybox image: {done.stderr.strip()[-500:]}")
    return tag


def remove_labelled(label: str) -> None:
    """Remove every container carrying `label` (key=value), running or not."""
    found = podman("ps", "-aq", "--filter", f"label={label}")
    ids = found.stdout.split()
    if ids:
        podman("rm", "-f", "-v", *ids)
