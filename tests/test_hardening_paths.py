"""Paths outside the stack's folder — workdir, env_file, secret files, bind-mount
sources, build contexts — are refused at validation with a located error, unless the
stack file says `allow_outside_paths: true`; the API refuses them too."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shipyard.api.app import stack_from_document
from shipyard.api.client import stack_document
from shipyard.errors import SpecError
from shipyard.spec.loader import load_stack, parse_stack

MESSAGE = ("is outside the stack's folder {base}; set `allow_outside_paths: true` at the "
           "top of the stack file to allow it")


@pytest.fixture
def project(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    (folder / "api").mkdir(parents=True)
    (folder / "local.env").write_text("A=1\n")
    (tmp_path / "outside.env").write_text("STOLEN=1\n")
    (tmp_path / "outside.key").write_text("key-0123456789")
    os.symlink(tmp_path, folder / "link-out")
    return folder


def stack(allow: str = "") -> str:
    return f"""\
name: demo
{allow}secrets:
  inside: {{file: ./local.env}}
  key: {{file: ../outside.key}}
services:
  ok:
    command: [sleep, "1"]
    workdir: ./api
    env_file: [local.env]
  bad:
    command: [sleep, "1"]
    workdir: /etc
    env_file: [local.env, ../outside.env]
  sneaky:
    command: [sleep, "1"]
    workdir: api/../../
    env_file: link-out/outside.env
  box:
    image: localhost/app:1
    build: {{context: ..}}
    volumes: ["./data:/data", "/var/run:/host-run", "cache:/cache"]
"""


def test_outside_paths_are_refused_with_their_line(project: Path) -> None:
    (project / "shipyard.yaml").write_text(stack())
    with pytest.raises(SpecError) as caught:
        load_stack(project / "shipyard.yaml")
    base = os.path.realpath(project)
    rendered = [issue.render() for issue in caught.value.issues]
    file = str(project / "shipyard.yaml")
    assert rendered == [f"{file}:{line}: {path}: {what} {MESSAGE.format(base=base)}"
                        for line, path, what in [
                            (4, "secrets.key.file", "secret file ../outside.key"),
                            (12, "services.bad.workdir", "workdir /etc"),
                            (13, "services.bad.env_file.1", "env file ../outside.env"),
                            (16, "services.sneaky.workdir", "workdir api/../../"),
                            (17, "services.sneaky.env_file", "env file link-out/outside.env"),
                            (20, "services.box.build.context", "build context .."),
                            (21, "services.box.volumes.1", "volume source /var/run"),
                        ]]


def test_an_outside_env_file_is_not_even_read(project: Path) -> None:
    (project / "shipyard.yaml").write_text(stack())
    (project.parent / "outside.env").write_bytes(b"\xff\xfe not utf-8\n")  # if read: error
    with pytest.raises(SpecError) as caught:
        load_stack(project / "shipyard.yaml")
    assert not any("cannot read" in i.message for i in caught.value.issues)
    (project / "shipyard.yaml").write_text(stack("allow_outside_paths: true\n"))
    with pytest.raises(SpecError, match=r"cannot read env file \.\./outside\.env"):
        load_stack(project / "shipyard.yaml")  # the control: allowed, it is read


def test_allow_outside_paths_lets_them_through(project: Path) -> None:
    (project / "shipyard.yaml").write_text(stack("allow_outside_paths: true\n"))
    loaded = load_stack(project / "shipyard.yaml")
    assert loaded.allow_outside_paths and loaded.services["bad"].env["STOLEN"] == "1"
    assert stack_from_document(stack_document(loaded)).services["bad"].workdir == "/etc"


def test_the_api_refuses_what_a_client_did_not_check(project: Path) -> None:
    (project / "shipyard.yaml").write_text(stack("allow_outside_paths: true\n"))
    document = stack_document(load_stack(project / "shipyard.yaml"))
    document["allow_outside_paths"] = False  # as a client that skipped the loader sends
    with pytest.raises(SpecError) as caught:
        stack_from_document(document)
    assert {i.path for i in caught.value.issues} == {
        "secrets.key.file", "services.bad.workdir", "services.bad.env_file.1",
        "services.sneaky.workdir", "services.sneaky.env_file.0", "services.box.build.context",
        "services.box.volumes.1"}


def test_inside_paths_and_relative_names_are_fine(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    text = """\
name: demo
services:
  a:
    command: [sleep, "1"]
    workdir: sub/./
"""
    assert parse_stack(text, base_dir=tmp_path, environ={}).services["a"].workdir == "sub/./"
