"""Images and volumes for the container runtime: pull or build per the pull policy, and
the mounts of a container (named volumes are folders under $SHIPYARD_HOME/volumes).

Every function here is synchronous (the Docker SDK is): the runtime calls them in a thread.
"""

from __future__ import annotations

import os
from pathlib import Path

import docker
import docker.errors
from docker.types import Mount
from docker.utils import parse_repository_tag

from shipyard.errors import RuntimeLaunchError
from shipyard.runtime.container_spec import BuildSpec, ContainerSpec


def image_present(client: docker.DockerClient, image: str) -> bool:
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        return False
    except docker.errors.APIError as exc:
        if exc.status_code == 404:
            return False
        raise
    return True


def ensure_image(client: docker.DockerClient, spec: ContainerSpec) -> str:
    """Make `spec.image` present per its pull policy; what was done: present, pulled,
    built. Raises RuntimeLaunchError with the engine's explanation."""
    policy = spec.pull_policy
    present = image_present(client, spec.image)
    if policy == "build" or (spec.build is not None and not present and policy != "never"):
        if spec.build is None:
            raise RuntimeLaunchError(f"image {spec.image}: pull_policy build needs a build:")
        build_image(client, spec.image, spec.build)
        return "built"
    if policy == "always" or (policy == "missing" and not present):
        pull_image(client, spec.image)
        return "pulled"
    if not present:
        raise RuntimeLaunchError(f"image {spec.image} is not present locally and its "
                                 "pull_policy is never", hint="build or load it first")
    return "present"


def pull_image(client: docker.DockerClient, image: str) -> None:
    repository, tag = parse_repository_tag(image)
    try:
        client.images.pull(repository, tag=tag or "latest")
    except docker.errors.APIError as exc:
        raise RuntimeLaunchError(f"cannot pull image {image}: {_explain(exc)}") from None


def build_image(client: docker.DockerClient, image: str, build: BuildSpec) -> None:
    context = Path(build.context)
    if not context.is_dir():
        raise RuntimeLaunchError(f"image {image}: build context {context} is not a folder")
    dockerfile = build.dockerfile
    if dockerfile is None:
        found = [n for n in ("Containerfile", "Dockerfile") if (context / n).is_file()]
        if not found:
            raise RuntimeLaunchError(f"image {image}: no Containerfile or Dockerfile in "
                                     f"{context}")
        dockerfile = found[0]
    elif not (context / dockerfile).is_file():
        raise RuntimeLaunchError(f"image {image}: {dockerfile} not found in {context}")
    try:
        client.images.build(path=str(context), dockerfile=dockerfile, tag=image,
                            buildargs=build.args or None, target=build.target,
                            labels=build.labels or None, rm=True, forcerm=True)
    except docker.errors.BuildError as exc:
        lines = [str(item.get("stream") or item.get("error") or "").strip()
                 for item in exc.build_log if isinstance(item, dict)]
        tail = "; ".join(line for line in lines if line)[-400:]
        raise RuntimeLaunchError(f"building image {image} failed: {exc.msg}"
                                 + (f" ({tail})" if tail else "")) from None
    except docker.errors.APIError as exc:
        raise RuntimeLaunchError(f"building image {image} failed: {_explain(exc)}") from None


def mounts_for(spec: ContainerSpec, stack: str, volumes_dir: Path) -> list[Mount]:
    """Docker mounts; a named volume is the folder volumes_dir/STACK/NAME (created)."""
    mounts = []
    for m in spec.mounts:
        if m.type == "bind":
            assert m.source is not None
            if not os.path.exists(m.source):
                raise RuntimeLaunchError(f"bind mount source {m.source} does not exist")
            mounts.append(Mount(m.target, m.source, type="bind", read_only=m.read_only))
        elif m.type == "volume" and m.source:
            folder = volumes_dir / stack / m.source
            folder.mkdir(parents=True, exist_ok=True, mode=0o755)
            mounts.append(Mount(m.target, str(folder), type="bind", read_only=m.read_only))
        elif m.type == "volume":  # anonymous: the engine's, removed with the container
            mounts.append(Mount(m.target, None, type="volume", read_only=m.read_only))
        else:
            mounts.append(Mount(m.target, None, type="tmpfs"))
    return mounts


def _explain(exc: docker.errors.APIError) -> str:
    explanation = exc.explanation
    if isinstance(explanation, bytes):
        explanation = explanation.decode(errors="replace")
    return str(explanation or exc).strip()


explain = _explain
