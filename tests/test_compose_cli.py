"""`shipyard import` and `shipyard up -f docker-compose.yml`, through the console script."""

from __future__ import annotations

import shutil
import sys
import urllib.request
from pathlib import Path

from shipyard.spec.loader import load_stack
from tests.conftest import port_range
from tests.test_cli import Shipyard, wait_for

FIXTURES = Path(__file__).parent / "fixtures" / "compose"


def copy_fixture(name: str, into: Path) -> Path:
    shutil.copytree(FIXTURES / name, into, dirs_exist_ok=True)
    return next(p for p in sorted(into.iterdir()) if "compose" in p.name)


def test_import_writes_a_stack_file_and_lists_what_is_dropped(shipyard: Shipyard) -> None:
    compose = copy_fixture("networks", shipyard.cwd)
    done = shipyard("import", compose.name)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert "dropped: service proxy: container_name: containers are named " \
           "shipyard-<stack>-<instance>" in lines
    assert "dropped: service app: user: the image's USER is used" in lines
    assert "dropped: networks: services share the host's network (reach a dependency at " \
           "127.0.0.1 or <DEP>_URL)" in lines
    dropped = [line for line in lines if line.startswith("dropped: ")]
    assert lines[-1] == f"wrote shipyard.yaml: 2 services, {len(dropped)} compose keys not " \
                        "carried over"
    written = (shipyard.cwd / "shipyard.yaml").read_text()
    assert written.startswith("# Converted from docker-compose.yml by `shipyard import`.\n"
                              "# Not carried over:\n")
    assert all(f"#   {line}" in written for line in dropped)
    # the written file says the same as the compose file read directly
    imported = load_stack(shipyard.cwd / "shipyard.yaml", environ={})
    direct = load_stack(compose, environ={})
    assert imported.services == direct.services and imported.name == direct.name

    again = shipyard("import", compose.name)
    assert again.returncode == 2 and "shipyard.yaml exists" in again.stderr
    assert shipyard("import", compose.name, "--force").returncode == 0


def test_import_to_stdout_with_a_profile(shipyard: Shipyard) -> None:
    compose = copy_fixture("profiles", shipyard.cwd)
    done = shipyard("import", compose.name, "-o", "-", "--profile", "debug")
    assert done.returncode == 0, done.stderr
    assert "  mailhog:\n    image: mailhog/mailhog\n" in done.stdout
    assert "    depends_on:\n      db:\n        condition: healthy\n        on_lost: restart\n" \
        in done.stdout
    assert not (shipyard.cwd / "shipyard.yaml").exists()
    plain = shipyard("import", compose.name, "-o", "-")
    assert "mailhog:" not in plain.stdout.split("# Not carried over:")[-1].split("services:")[1]


def test_import_refuses_what_is_not_a_compose_file(shipyard: Shipyard) -> None:
    (shipyard.cwd / "list.yml").write_text("- a\n- b\n")
    done = shipyard("import", "list.yml")
    assert done.returncode == 2 and "not a compose file" in done.stderr
    (shipyard.cwd / "bad.yml").write_text("services: [\n")
    done = shipyard("import", "bad.yml")
    assert done.returncode == 2 and "bad.yml:" in done.stderr and "invalid YAML" in done.stderr


def test_up_with_a_compose_file(shipyard: Shipyard) -> None:
    """Dependencies with compose conditions, a CMD healthcheck and a CMD-SHELL one, run."""
    low = int(port_range().split("-")[0]) + 500
    compose = copy_fixture("runnable", shipyard.cwd)
    shipyard.env |= {"PYTHON": sys.executable, "DB_PORT": str(low), "WEB_PORT": str(low + 1)}
    validate = shipyard("validate", "-f", compose.name)
    assert validate.returncode == 0, validate.stderr
    assert "warning: dropped: service web: labels: containers carry Shipyard's own labels " \
           "only" in validate.stderr
    done = shipyard("up", "-d", "-f", compose.name, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr

    def ready() -> bool:
        states = {(i["service"], i["state"], i.get("ready")) for i in shipyard.instances()}
        return {("db", "ready", True), ("web", "ready", True),
                ("migrate", "completed", False)} <= states

    wait_for(ready, timeout=30, what="db and web ready, migrate completed")
    for port in (low, low + 1):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:
            assert answer.status == 200
    down = shipyard("down", timeout=60)
    assert down.returncode == 0, down.stderr
    assert all(i["state"] in ("stopped", "completed") for i in shipyard.instances())
