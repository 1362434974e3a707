"""Interpolation (`${VAR}`, defaults, `$$`, per-instance variables) and env files."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shipyard.errors import Issue, SpecError
from shipyard.spec.interpolate import InterpolationError, escape, expand, resolve_now
from shipyard.spec.loader import load_stack
from tests.test_spec_loader import SETTINGS, issues_of, parse


def one_issue(
    text: str, environ: dict[str, str] | None = None, base_dir: Path | str = "."
) -> Issue:
    issues = issues_of(text, environ, base_dir)
    assert len(issues) == 1, [i.render() for i in issues]
    return issues[0]


# --- interpolation -------------------------------------------------------------------------


def test_environment_and_dotenv_with_the_environment_winning(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("TAG=from-dotenv\nREGISTRY=localhost\nHOMEISH=${BASE}/x\n")
    (tmp_path / "shipyard.yaml").write_text(
        "allow_outside_paths: true\n"  # /b/x: outside the stack's folder
        "services:\n  api:\n    image: ${REGISTRY}/app:${TAG}\n    workdir: ${HOMEISH}\n"
    )
    stack = load_stack(tmp_path / "shipyard.yaml", environ={"TAG": "from-env", "BASE": "/b"})
    assert stack.services["api"].image == "localhost/app:from-env"
    assert stack.services["api"].workdir == "/b/x"


def test_defaults_and_escapes() -> None:
    stack = parse(
        """
        services:
          api:
            image: "app:${TAG:-latest}"
            version: "${EMPTY:-fallback}-${SET:-no}"
            workdir: "cost$$5/${NOPE:-${ALSO_NOPE:-deep}}"
            command: "run $$HOME ${X} $$${X} $HOME"
            replicas: ${REPLICAS:-3}
        """,
        environ={"EMPTY": "", "SET": "yes", "X": "a$b"},
    )
    api = stack.services["api"]
    assert api.image == "app:latest" and api.version == "fallback-yes"
    assert api.workdir == "cost$5/deep"
    assert api.replicas == 3
    # command is expanded again per instance: still escaped, and expanding yields the text
    assert api.command == ["run", "$HOME", "a$b", "$a$b", "$HOME"]
    assert [expand(a, {}) for a in api.command] == ["run", "$HOME", "a$b", "$a$b", "$HOME"]
    # only where the engine would read syntax is a `$` doubled
    assert parse("services: {a: {command: ['$${X}', '$$$$']}}").services["a"].command == [
        "$${X}",
        "$$$",
    ]


def test_instance_variables_are_left_for_the_engine() -> None:
    stack = parse(
        """
        services:
          user-db: {command: db, ports: {pg: auto}}
          api:
            command: [app, "${PORT}", "${PORT_HTTP}", "${PORT_ADMIN_UI}", "${USER_DB_URL}"]
            ports: {http: auto, admin-ui: auto}
            depends_on: {user-db: healthy}
            env:
              WHO: "${SHIPYARD_STACK}/${SHIPYARD_SERVICE}/${SHIPYARD_INSTANCE}"
              DB: "${USER_DB_HOST}:${USER_DB_PORT:-5432}"
              LEVEL: "${LOG_LEVEL:-info}"
              MSG: "level ${LEVEL}"
            health:
              liveness: {exec: "check ${PORT} ${TOKEN}"}
        """,
        environ={"PORT": "1", "TOKEN": "t", "LEVEL": "ignored: the service env wins"},
    )
    api = stack.services["api"]
    assert api.command == ["app", "${PORT}", "${PORT_HTTP}", "${PORT_ADMIN_UI}", "${USER_DB_URL}"]
    assert api.env == {
        "WHO": "${SHIPYARD_STACK}/${SHIPYARD_SERVICE}/${SHIPYARD_INSTANCE}",
        "DB": "${USER_DB_HOST}:${USER_DB_PORT:-5432}",
        "LEVEL": "info",
        "MSG": "level ${LEVEL}",
    }
    assert api.health.liveness is not None
    assert api.health.liveness.exec == ["check", "${PORT}", "t"]


def test_undefined_variables_are_located_errors() -> None:
    issues = issues_of(
        """\
        services:
          api:
            command: "run ${MISSING}"
            image: "app:${PORT}"
            env: {A: "${DB_URL}"}
          db:
            command: "db ${PORT}"
            workdir: "${ALSO_MISSING}"
        """
    )
    messages = {(i.path, i.line): i.message for i in issues}
    assert messages == {
        ("services.api.command", 3): "undefined variable MISSING; set it in the environment or "
        ".env, or give a default ${MISSING:-value}",
        ("services.api.image", 4): "undefined variable PORT: the service declares no ports "
        "(e.g. ports: {http: auto})",
        ("services.api.env.A", 5): "undefined variable DB_URL: add db to depends_on to get it",
        ("services.db.command", 7): "undefined variable PORT: the service declares no ports "
        "(e.g. ports: {http: auto})",
        ("services.db.workdir", 8): "undefined variable ALSO_MISSING; set it in the environment "
        "or .env, or give a default ${ALSO_MISSING:-value}",
    }


def test_instance_variables_outside_per_instance_fields_are_refused() -> None:
    issue = one_issue(
        "services:\n  api:\n    command: x\n    ports: {http: auto}\n    workdir: /d/${PORT}\n"
    )
    assert issue.path == "services.api.workdir"
    assert issue.message == (
        "${PORT} is set per instance, so it can only be used in command, env, env_file and "
        "health exec"
    )


def test_unknown_port_variable_names_the_ports() -> None:
    issue = one_issue("services:\n  api:\n    command: run ${PORT_HTPP}\n    ports: {http: auto}\n")
    assert (
        issue.message
        == "undefined variable PORT_HTPP: the service has no such port (its ports: http)"
    )


def test_malformed_interpolation_is_located() -> None:
    issue = one_issue("services:\n  api:\n    command: x\n    image: app:${TAG\n")
    assert (issue.path, issue.line) == ("services.api.image", 4)
    assert "invalid interpolation" in issue.message and "$$" in issue.message


def test_failed_interpolation_is_not_reported_twice() -> None:
    issue = one_issue("services:\n  api:\n    command: x\n    replicas: ${N}\n")
    assert issue.message.startswith("undefined variable N")


def test_top_level_values_are_interpolated() -> None:
    stack = parse(
        "name: ${STACK:-shop}\nports: {range: '${LOW}-40000'}\nservices: {a: {command: x}}",
        {"LOW": "39000"},
    )
    assert stack.name == "shop" and stack.ports.range == (39000, 40000)


def test_probe_ports_given_by_variables_become_numbers() -> None:
    stack = parse(
        "services:\n  a:\n    command: x\n    health: {readiness: {tcp: '${P}'}}\n", {"P": "5432"}
    )
    assert stack.services["a"].health.readiness is not None
    assert stack.services["a"].health.readiness.tcp == 5432


def test_expand_for_the_engine() -> None:
    env = {"PORT": "8080", "EMPTY": ""}
    assert expand("--port=${PORT} $$PORT ${EMPTY:-d} ${NONE:-${PORT}} $1 $", env) == (
        "--port=8080 $PORT d 8080 $1 $"
    )
    with pytest.raises(ValueError, match="undefined variable DB_URL") as caught:
        expand("x ${DB_URL}", env)
    assert isinstance(caught.value, InterpolationError) and caught.value.variable == "DB_URL"
    with pytest.raises(ValueError, match="invalid interpolation"):
        expand("${1BAD}", env)


NAMES = ["A", "B", "PORT", "X_1", "_Y"]
names = st.sampled_from(NAMES)
defaults = st.text(alphabet="xy/$", max_size=3).map(lambda t: t.replace("$", "$}"))
pieces = st.one_of(
    st.text(alphabet="ab ${}:-'/", max_size=4).map(escape),
    st.text(alphabet="ab $/", max_size=4),  # lone dollars are literal
    names.map(lambda n: f"${{{n}}}"),
    st.tuples(names, defaults).map(lambda t: f"${{{t[0]}:-{t[1]}}}"),
    st.tuples(names, names).map(lambda t: f"${{{t[0]}:-${{{t[1]}}}}}"),
)
templates = st.lists(pieces, max_size=6).map("".join)
values = st.fixed_dictionaries({n: st.text(alphabet="v${}", max_size=3) for n in NAMES})


@SETTINGS
@given(text=st.text(max_size=40))
def test_escape_then_expand_is_identity(text: str) -> None:
    assert expand(escape(text), {}) == text


@SETTINGS
@given(template=templates, now=values, later=values, keep=st.sets(names))
def test_two_phase_expansion_equals_expanding_once(
    template: str, now: dict[str, str], later: dict[str, str], keep: set[str]
) -> None:
    """What the loader leaves plus what the engine fills in gives the one-pass result."""
    combined = {name: later[name] if name in keep else now[name] for name in now}
    try:
        staged = resolve_now(template, now.get, keep=keep.__contains__, deferred=True)
    except InterpolationError:  # malformed (pieces can join into "${"): refused both ways
        with pytest.raises(InterpolationError, match="invalid interpolation"):
            expand(template, combined)
        return
    assert expand(staged, {name: later[name] for name in keep}) == expand(template, combined)


# --- env files -----------------------------------------------------------------------------


def test_env_files_are_merged_under_env(tmp_path: Path) -> None:
    (tmp_path / "base.env").write_text("A=base\nB=base\nC=base\nSECRET='pa$word'\n")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "local.env").write_text("# comment\nB=local\nD=${TAG}-${PORT}\nE\n")
    (tmp_path / "shipyard.yaml").write_text(
        "services:\n  api:\n    command: [run, '${B}']\n    ports: {http: auto}\n"
        "    env_file: [base.env, conf/local.env]\n    env: {C: explicit}\n"
    )
    api = load_stack(tmp_path / "shipyard.yaml", environ={"TAG": "t"}).services["api"]
    assert api.env == {
        "A": "base",
        "B": "local",
        "C": "explicit",
        "SECRET": "pa$word",
        "D": "t-${PORT}",
        "E": "",
    }
    assert api.env_file == ["base.env", "conf/local.env"]
    assert api.command == ["run", "${B}"]  # an env-file key is the service's own variable
    assert expand(api.env["SECRET"], {}) == "pa$word"


def test_missing_env_file_is_located(tmp_path: Path) -> None:
    (tmp_path / "shipyard.yaml").write_text(
        "services:\n  api:\n    command: x\n    env_file:\n      - a.env\n      - missing.env\n"
    )
    (tmp_path / "a.env").write_text("A=1\n")
    with pytest.raises(SpecError) as caught:
        load_stack(tmp_path / "shipyard.yaml", environ={})
    [issue] = caught.value.issues
    assert (issue.path, issue.line) == ("services.api.env_file.1", 6)
    assert issue.message.startswith("env file missing.env not found")


def test_undefined_variable_in_an_env_file(tmp_path: Path) -> None:
    (tmp_path / "a.env").write_text("URL=${NOWHERE}\n")
    issue = one_issue("services:\n  api:\n    command: x\n    env_file: a.env\n", base_dir=tmp_path)
    assert (issue.path, issue.line) == ("services.api.env_file", 4)
    assert issue.message.startswith("URL: undefined variable NOWHERE")
