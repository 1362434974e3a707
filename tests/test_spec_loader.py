"""Loading stack files: defaults, interpolation, env files, located errors, cross checks."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shipyard.errors import Issue, SpecError
from shipyard.spec.issues import field_names
from shipyard.spec.loader import default_name, load_stack, parse_stack
from shipyard.spec.models import Condition, RestartMode, Stack

SETTINGS = settings(deadline=None, max_examples=100)


def parse(text: str, environ: dict[str, str] | None = None, base_dir: Path | str = ".") -> Stack:
    return parse_stack(textwrap.dedent(text), environ=environ or {}, base_dir=base_dir)


def issues_of(
    text: str, environ: dict[str, str] | None = None, base_dir: Path | str = "."
) -> list[Issue]:
    with pytest.raises(SpecError) as caught:
        parse(text, environ, base_dir)
    return caught.value.issues


def where(issues: list[Issue]) -> set[tuple[str, int | None]]:
    return {(i.path, i.line) for i in issues}


def one_issue(
    text: str, environ: dict[str, str] | None = None, base_dir: Path | str = "."
) -> Issue:
    issues = issues_of(text, environ, base_dir)
    assert len(issues) == 1, [i.render() for i in issues]
    return issues[0]


# --- loading and defaults ------------------------------------------------------------------


def test_load_stack_sets_name_source_and_base_dir(tmp_path: Path) -> None:
    folder = tmp_path / "My Shop.v2"
    folder.mkdir()
    file = folder / "shipyard.yaml"
    file.write_text("services:\n  web: {command: [python, -m, http.server]}\n")
    stack = load_stack(file, environ={})
    assert stack.name == "my-shop-v2"
    assert stack.source == str(file)
    assert stack.base_dir == str(folder)
    assert stack.services["web"].command == ["python", "-m", "http.server"]


def test_an_explicit_name_wins_over_the_folder(tmp_path: Path) -> None:
    (tmp_path / "shipyard.yaml").write_text("name: shop\nservices: {web: {command: x}}\n")
    assert load_stack(tmp_path / "shipyard.yaml", environ={}).name == "shop"


@pytest.mark.parametrize(
    ("folder", "name"),
    [
        ("demo", "demo"),
        ("My App", "my-app"),
        ("__x__", "x"),
        ("---", "stack"),
        ("a" * 80, "a" * 63),
    ],
)
def test_default_name_is_normalised(folder: str, name: str) -> None:
    assert default_name(Path("/somewhere") / folder) == name


@SETTINGS
@given(folder=st.text(min_size=1, max_size=100).filter(lambda s: "/" not in s and "\0" not in s))
def test_default_name_is_always_a_valid_stack_name(folder: str) -> None:
    name = default_name(folder)
    Stack(name=name, services={"a": {"command": ["x"]}})  # must not raise


def test_missing_file_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read the stack file"):
        load_stack(tmp_path / "nope.yaml")


def test_defaults_of_a_minimal_service() -> None:
    stack = parse("services: {api: {command: ./run}}", base_dir="/srv/demo")
    api = stack.services["api"]
    assert stack.name == "demo" and stack.source is None and stack.base_dir == "/srv/demo"
    assert api.replicas == 1 and api.env == {} and api.ports == {} and api.depends_on == {}
    assert api.restart.policy == RestartMode.ON_FAILURE and api.stop.signal == "SIGTERM"
    assert stack.deploy.timeout == 300 and stack.ports.range == (30000, 32767)


def test_compose_style_shorthands() -> None:
    stack = parse(
        """
        services:
          db: {command: "postgres -D 'my data'", restart: always}
          api:
            command: [sleep, 10]
            env: [A=1, B=x=y, C]
            depends_on: [db]
            restart: no
            health: {readiness: {exec: "pg_isready -q", interval: 500ms}}
        """
    )
    api, db = stack.services["api"], stack.services["db"]
    assert db.command == ["postgres", "-D", "my data"] and db.restart.policy == RestartMode.ALWAYS
    assert api.command == ["sleep", "10"]
    assert api.env == {"A": "1", "B": "x=y", "C": ""}
    assert api.conditions == {"db": Condition.HEALTHY}
    assert api.restart.policy == RestartMode.NO  # YAML reads `no` as false
    assert api.health.readiness is not None and api.health.readiness.exec == ["pg_isready", "-q"]
    assert api.health.readiness.interval == 0.5


def test_yaml_anchors_and_merge_keys() -> None:
    stack = parse(
        """
        services:
          a: &base {command: [run], replicas: 2, env: {A: "1"}}
          b: {<<: *base, replicas: 3}
        """
    )
    a, b = stack.services["a"], stack.services["b"]
    assert (a.replicas, b.replicas) == (2, 3)
    assert b.command == ["run"] and b.env == {"A": "1"}


# --- error collection with lines -----------------------------------------------------------

BROKEN = """\
name: demo
deploy:
  strategy: hybird
services:
  api:
    comand: [python, app.py]
    command: [python, app.py]
    version: 1.10
    replicas: two
    ports: {http: auto, admin: 70000}
    depends_on: [dbb]
    health:
      readiness:
        http: /ready
        port: htp
        interval: fast
    restart: sometimes
  db:
    command: sleep 1
    depends_on: {db: healthy}
    resources: {memory: lots, cpu: 500m}
"""


def test_every_error_of_a_file_is_reported_with_its_line() -> None:
    issues = issues_of(BROKEN)
    assert where(issues) == {
        ("deploy.strategy", 3),
        ("services.api.comand", 6),
        ("services.api.version", 8),
        ("services.api.replicas", 9),
        ("services.api.ports.admin", 10),
        ("services.api.depends_on.0", 11),
        ("services.api.health.readiness.port", 15),
        ("services.api.health.readiness.interval", 16),
        ("services.api.restart", 17),
        ("services.db.depends_on.db", 20),
        ("services.db.resources.memory", 21),
    }
    assert [i.line for i in issues] == sorted(i.line or 0 for i in issues)
    assert all(i.file == "<stack>" for i in issues)


def test_messages_say_what_was_expected() -> None:
    messages = {i.path: i.message for i in issues_of(BROKEN)}
    assert messages["deploy.strategy"] == (
        "expected sequential, parallel or hybrid, got 'hybird' (did you mean 'hybrid'?)"
    )
    assert messages["services.api.comand"] == "unknown field 'comand' (did you mean 'command'?)"
    assert (
        messages["services.api.version"] == 'expected a string, got 1.10; put it in quotes: "1.10"'
    )
    assert messages["services.api.replicas"] == "expected a whole number, got 'two'"
    assert "between 1 and 65535" in messages["services.api.ports.admin"]
    assert messages["services.api.depends_on.0"] == (
        "'dbb' is not a service in this stack (did you mean 'db'?)"
    )
    assert "did you mean 'http'?" in messages["services.api.health.readiness.port"]
    assert messages["services.api.health.readiness.interval"] == (
        "expected a duration like 200ms, 5s or 2m, got 'fast'"
    )
    assert messages["services.api.restart"] == "expected no, on-failure or always, got 'sometimes'"
    assert messages["services.db.depends_on.db"] == "service 'db' cannot depend on itself"
    assert messages["services.db.resources.memory"].startswith("expected a size like 256Mi")


def test_rendered_errors_carry_file_line_and_field(tmp_path: Path) -> None:
    file = tmp_path / "shipyard.yaml"
    file.write_text("services:\n  api:\n    command: x\n    replicas: -1\n")
    with pytest.raises(SpecError) as caught:
        load_stack(file, environ={})
    assert str(caught.value) == f"{file}:4: services.api.replicas: must be at least 0, got -1"
    assert caught.value.exit_code == 2


def test_yaml_syntax_error_is_one_issue_with_its_line() -> None:
    issue = one_issue("services:\n  api:\n    command: [a, b\n    replicas: 2\n")
    assert issue.message.startswith("invalid YAML")
    assert issue.line == 4


def test_tabs_and_several_documents_are_yaml_errors() -> None:
    assert one_issue("services:\n\tapi: {}\n").line == 2
    assert "single document" in one_issue("services: {}\n---\nservices: {}\n").message


@pytest.mark.parametrize(
    ("text", "got"),
    [
        ("", "an empty file"),
        ("# only a comment\n", "an empty file"),
        ("- a\n- b\n", "a list"),
        ("hello\n", "a single value ('hello')"),
        ("42\n", "a single value (42)"),
    ],
)
def test_the_top_level_must_be_a_mapping(text: str, got: str) -> None:
    issue = one_issue(text)
    assert issue.message.startswith("expected a mapping at the top level")
    assert issue.message.endswith(got)


def test_missing_services_and_unknown_top_level_key() -> None:
    issues = issues_of("name: x\nservice:\n  api: {command: x}\n")
    messages = {i.path: (i.message, i.line) for i in issues}
    assert messages["service"] == ("unknown field 'service' (did you mean 'services'?)", 2)
    assert messages["services"][0] == "required field 'services' is missing"


def test_duplicate_keys_are_reported() -> None:
    issue = one_issue("services:\n  api: {command: x}\n  api: {command: y}\n")
    assert issue.message == "duplicate key 'api' (first at line 2)" and issue.line == 3


def test_loader_fields_cannot_be_set_from_the_file() -> None:
    issue = one_issue("base_dir: /etc\nservices: {api: {command: x}}\n")
    assert issue.path == "base_dir" and issue.message.startswith("unknown field 'base_dir'")


def test_a_service_without_command_or_image() -> None:
    issue = one_issue("services:\n  api:\n    replicas: 2\n")
    assert (issue.path, issue.line) == ("services.api", 2)
    assert "needs a command" in issue.message


def test_an_empty_service_says_so() -> None:
    issue = one_issue("services:\n  api:\n")
    assert issue.path == "services.api" and "got nothing" in issue.message


def test_union_errors_become_one_message() -> None:
    issue = one_issue("services:\n  api: {command: x, ports: {http: autox}}\n")
    assert issue.path == "services.api.ports.http"
    assert issue.message == "expected a whole number or 'auto', got 'autox'"
    issue = one_issue("services:\n  api: {command: x, health: {liveness: {tcp: [1]}}}\n")
    assert issue.message == "expected a port name or number, got a list"


@pytest.mark.parametrize(
    ("typo", "where_", "suggestion"),
    [
        ("servics", "", "services"),
        ("replica", "  api:\n    ", "replicas"),
        ("depend_on", "  api:\n    ", "depends_on"),
        ("environment", "  api:\n    ", "env"),
        ("working_dir", "  api:\n    ", "workdir"),
        ("healthcheck", "  api:\n    ", "health"),
    ],
)
def test_did_you_mean_for_unknown_fields(typo: str, where_: str, suggestion: str) -> None:
    if where_:
        text = f"services:\n{where_}command: x\n    {typo}: 1\n"
    else:
        text = f"services: {{api: {{command: x}}}}\n{typo}: 1\n"
    messages = [i.message for i in issues_of(text)]
    assert f"unknown field '{typo}' (did you mean '{suggestion}'?)" in messages


PROBE_FIELDS = field_names(("services", "api", "health", "readiness"))
SERVICE_FIELDS = field_names(("services", "api"))


@SETTINGS
@given(data=st.data())
def test_a_one_letter_deletion_suggests_the_field(data: st.DataObject) -> None:
    field = data.draw(st.sampled_from([f for f in SERVICE_FIELDS + PROBE_FIELDS if len(f) >= 5]))
    at = data.draw(st.integers(min_value=0, max_value=len(field) - 1))
    typo = field[:at] + field[at + 1 :]
    if field in PROBE_FIELDS:
        probe = f"    health:\n      readiness:\n        http: /\n        {typo}: 1\n"
        text = "services:\n  api:\n    command: x\n" + probe
        line = 7
    else:
        text = f"services:\n  api:\n    command: x\n    {typo}: 1\n"
        line = 4
    unknown = [i for i in issues_of(text) if i.message.startswith("unknown field")]
    assert [(i.message, i.line) for i in unknown] == [
        (f"unknown field '{typo}' (did you mean '{field}'?)", line)
    ]


# --- cross-field checks --------------------------------------------------------------------


def test_cross_field_checks() -> None:
    issues = issues_of(
        """\
        services:
          web:
            command: x
            ports: {http: 8080}
            replicas: 2
            health:
              readiness: {http: /ready}
              liveness: {tcp: admin}
          api:
            command: x
            ports: {main: 8080}
            depends_on: {web: healthy, job: completed}
            health: {readiness: {http: /, port: main}}
          job:
            command: x
            restart: always
            depends_on: [api]
          bare:
            command: x
            health: {readiness: {http: /}}
        """
    )
    messages = {(i.path, i.line): i.message for i in issues}
    assert messages == {
        ("services.web.ports.http", 4): "2 replicas cannot all listen on fixed port 8080; use auto",
        ("services.web.health.liveness.tcp", 8): "port 'admin' is not one of the service's ports "
        "(http)",
        ("services.api.ports.main", 11): "port 8080 is already used by services.web.ports.http",
        ("services.api.depends_on.job", 12): "waits for 'job' to complete, but 'job' has restart: "
        "always and never completes (use healthy or started, or change its restart policy)",
        ("services.job.depends_on.0", 17): "dependency cycle: api → job → api",
        ("services.bare.health.readiness", 20): "an http probe needs a port: declare one under "
        "the service's ports or set port to a number",
    }


def test_fixed_ports_outside_the_range_are_allowed() -> None:
    stack = parse("ports: {range: 30000-30010}\nservices: {a: {command: x, ports: {http: 80}}}")
    assert stack.services["a"].ports == {"http": 80}


def test_cross_checks_run_even_when_other_fields_are_broken() -> None:
    issues = issues_of(
        "services:\n  a:\n    command: x\n    replicas: many\n    depends_on: [nope]\n"
    )
    assert where(issues) == {("services.a.replicas", 4), ("services.a.depends_on.0", 5)}
