"""`user:` of a service: a root control plane runs its instances as that user (groups,
gid and uid set in the child before its exec, for good), and hands the user its secret
files. Root only; no system user is created: `nobody` (uid 65534) is used."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from shipyard import Engine, EngineConfig
from shipyard.errors import RuntimeLaunchError
from shipyard.runtime.users import resolve_user
from shipyard.spec.loader import parse_stack

NOBODY = 65534
REPORT = """\
import json, os, sys
key = open(os.environ["KEY_FILE"]).read()
try:
    open(sys.argv[2], "w")  # in a folder only root may write to
    wrote_root = True
except OSError:
    wrote_root = False
try:
    os.setuid(0)
    regained = True
except OSError:
    regained = False
json.dump({"ids": os.getresuid() + os.getresgid(), "groups": os.getgroups(),
           "key": key, "pw": os.environ["PW"], "home": os.environ.get("HOME"),
           "wrote_root": wrote_root, "regained": regained}, open(sys.argv[1], "w"))
"""

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="running as another user "
                                "needs a control plane running as root")


def system_python() -> str:
    """An interpreter `nobody` may run (the venv's may live under /root, 0700)."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"):
        if os.path.exists(candidate) and all(
                os.stat(d).st_mode & 0o001 for d in _parents(os.path.realpath(candidate))):
            return candidate
    pytest.skip("no python3 that the user nobody may run")


def _parents(path: str) -> list[str]:
    out = []
    while path != "/":
        path = os.path.dirname(path)
        out.append(path)
    return out


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A folder `nobody` may traverse (pytest's tmp_path is 0700 root)."""
    path = Path(tempfile.mkdtemp(prefix="shipyard-user-"))
    os.chmod(path, 0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_user_names_and_ids_resolve() -> None:
    nobody = pwd.getpwuid(NOBODY)
    assert resolve_user("nobody").uid == NOBODY
    by_id = resolve_user(f"{NOBODY}:{NOBODY}")
    assert (by_id.uid, by_id.gid, by_id.name) == (NOBODY, NOBODY, nobody.pw_name)
    assert resolve_user("424242").gid == 424242  # no passwd entry: gid = uid
    with pytest.raises(RuntimeLaunchError, match="user 'no-such-user-x' does not exist"):
        resolve_user("no-such-user-x")


async def test_service_runs_as_nobody_with_its_secret_file(public_tmp: Path) -> None:
    project = public_tmp / "project"
    project.mkdir()
    (project / "report.py").write_text(REPORT)
    (project / "tls.key").write_text("key-material-for-nobody")
    root_only = public_tmp / "root-only"
    root_only.mkdir(mode=0o700)
    results = public_tmp / "results"
    results.mkdir(mode=0o777)
    os.chmod(results, 0o777)
    home = public_tmp / "home"
    home.mkdir()
    os.chmod(home, 0o711)  # as docs/security.md says: searchable, not listable
    text = yaml.safe_dump({
        "name": "users",
        "secrets": {"key": {"file": "./tls.key"}, "pw": {"env": "TEST_USER_PW"}},
        "services": {"report": {
            "command": [system_python(), "report.py", str(results / "report.json"),
                        str(root_only / "written")],
            "user": "nobody", "restart": {"policy": "no"},
            "secrets": [{"name": "key", "file": "/run/secrets/key", "path_env": "KEY_FILE"},
                        {"name": "pw", "env": "PW"}]}}})
    stack = parse_stack(text, base_dir=project, environ={})
    os.environ["TEST_USER_PW"] = "pw-for-nobody-123"
    try:
        async with Engine(EngineConfig(home=home, stop_on_exit=True)) as engine:
            assert (await engine.apply(stack)).ok
            for _ in range(200):
                if (results / "report.json").exists():
                    break
                await asyncio.sleep(0.05)
            report = json.loads((results / "report.json").read_text())
            secret = home / "run" / "users" / "report-1" / "secrets" / "key"
            for _ in range(100):  # the instance completed: its secret files go with it
                if not secret.exists():
                    break
                await asyncio.sleep(0.05)
            assert not secret.exists()
    finally:
        del os.environ["TEST_USER_PW"]
    assert report["ids"] == [NOBODY] * 3 + [NOBODY] * 3  # real, effective, saved
    assert 0 not in report["groups"]
    assert report["key"] == "key-material-for-nobody" and report["pw"] == "pw-for-nobody-123"
    assert report["home"] == pwd.getpwuid(NOBODY).pw_dir  # not root's HOME
    assert not report["wrote_root"] and not report["regained"]
    assert not (root_only / "written").exists()


async def test_unreachable_secret_files_fail_the_launch_clearly(tmp_path: Path) -> None:
    """pytest's tmp_path is 0700: nobody cannot reach a home there; say so."""
    (tmp_path / "tls.key").write_text("key-material")
    text = yaml.safe_dump({
        "name": "users", "secrets": {"key": {"file": "./tls.key"}},
        "services": {"s": {"command": ["sleep", "30"], "user": "nobody",
                           "restart": {"policy": "no"}, "secrets": ["key"]}}})
    stack = parse_stack(text, base_dir=tmp_path, environ={})
    async with Engine(EngineConfig(home=tmp_path / "home", stop_on_exit=True)) as engine:
        result = await engine.apply(stack)
        assert not result.ok
        record = (await engine.instances("users", "s"))[0] if not result.rolled_back else None
        events = [e.message for e in await engine.store.list_events(stack="users")]
    assert any("cannot reach its secret files" in m and "is not searchable" in m
               for m in events), events
    assert record is None or record.state.value == "failed"
    home_run = tmp_path / "home" / "run"
    assert stat.S_IMODE(home_run.stat().st_mode) == 0o711
