"""Gaps found by an audit of the foundation issue, each pinned by a test.

- Units: the parsers took what the JSON Schema refuses (`1_000`, `1e3` seconds, `1 0s`,
  digits of other scripts) and refused what it allows (`1PB`, `1PiB`).
- `env`: a variable naming itself (`LEVEL: ${LEVEL}`, compose's way to pass a value
  through) was left for the engine, which expanded it against the control plane's
  environment when the instance started: a variable set in the user's shell or `.env`
  was an error there, or silently took the server's value. A value referring to a
  variable defined below it, and variables referring to each other in a cycle, passed
  `validate` and failed when the instance started.
- `shipyard logs` had no `-o json`, which every read command has.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shipyard.engine.environment import instance_environment
from shipyard.spec.loader import load_stack
from shipyard.spec.schema import stack_json_schema
from shipyard.spec.units import parse_cpu, parse_duration, parse_size
from tests.test_cli import PY, Shipyard, wait_for
from tests.test_spec_loader import issues_of, parse

SETTINGS = settings(deadline=None, max_examples=300)


# --- units ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("1PB", 10**15), ("1pb", 10**15), ("1PiB", 2**50), ("2pib", 2**51), ("1Pi", 2**50)],
)
def test_peta_sizes_are_read_as_the_schema_allows(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("parser", "text"),
    [
        (parse_duration, "1 0s"),  # was 10s: spaces were dropped everywhere
        (parse_duration, "1_000"),
        (parse_duration, "1e3"),
        (parse_duration, "5\ts"),
        (parse_duration, "\u0661s"),  # ARABIC-INDIC DIGIT ONE
        (parse_cpu, "1_000"),
        (parse_cpu, "\u0661"),
        (parse_cpu, "1e999"),
        (parse_size, "\u0661Mi"),
        (parse_size, "1_0Mi"),
    ],
)
def test_number_forms_outside_the_schema_are_refused(parser: object, text: str) -> None:
    with pytest.raises(ValueError, match="expected"):
        parser(text)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1m 30s", 90.0), ("5 s", 5.0), (" 2m ", 120.0), ("\t5s\n", 5.0), ("1h 2m 3s", 3723.0)],
)
def test_durations_with_spaces_between_parts(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def _string_pattern(prop: dict) -> re.Pattern[str]:
    [pattern] = [a["pattern"] for a in prop["anyOf"]
                 if a.get("type") == "string" and a.get("pattern") != r"\$\{"]
    return re.compile(pattern, re.ASCII)  # ECMA-262: \d and \s are ASCII in JSON Schema


_DEFS = stack_json_schema()["$defs"]
UNIT_PATTERNS = [
    (parse_cpu, _string_pattern(_DEFS["Resources"]["properties"]["cpu"])),
    (parse_size, _string_pattern(_DEFS["Resources"]["properties"]["memory"])),
    (parse_duration, _string_pattern(_DEFS["Probe"]["properties"]["interval"])),
]


@SETTINGS
@given(text=st.one_of(
    st.text(alphabet="0123456789.msdhkKMGTPiIbBeE+-_ \t", max_size=9),
    st.text(max_size=6),
))
@example(text="0\x85")  # U+0085 is whitespace to Python's str.strip, not to the schema
def test_parsers_take_exactly_what_the_schema_allows(text: str) -> None:
    for parser, pattern in UNIT_PATTERNS:
        try:
            parser(text)
            parsed = True
        except ValueError:
            parsed = False
        allowed = pattern.search(text) is not None
        if allowed and not parsed:  # beyond a float: no pattern can say so
            number = re.search(r"[0-9.]+(?:[eE][+-]?[0-9]+)?", text)
            assert number is not None and math.isinf(float(number.group()) * 86400), text
        else:
            assert parsed == allowed, (parser.__name__, text)


# --- env: a variable naming itself, order, cycles ------------------------------------------


def test_a_variable_naming_itself_takes_the_environment_or_dotenv_value(
    tmp_path: Path,
) -> None:
    (tmp_path / ".env").write_text("GREETING=from-dotenv\nLEVEL=warn\n")
    (tmp_path / "shipyard.yaml").write_text(
        "services:\n"
        "  api:\n"
        "    command: [run]\n"
        "    env:\n"
        "      GREETING: ${GREETING}\n"
        "      LEVEL: ${LEVEL:-info}\n"
        "      PATH: /opt/bin:${PATH}\n"
        "  worker:\n"
        "    command: [run]\n"
        "    env: [\"GREETING=${GREETING}!\"]\n"
    )
    stack = load_stack(tmp_path / "shipyard.yaml", environ={"PATH": "/usr/bin"})
    assert stack.services["api"].env == {
        "GREETING": "from-dotenv", "LEVEL": "warn", "PATH": "/opt/bin:/usr/bin"}
    assert stack.services["worker"].env == {"GREETING": "from-dotenv!"}
    # what the instance gets does not depend on the control plane's environment
    env = instance_environment(stack, "api", "api-1", {}, {},
                               base={"GREETING": "the server's", "PATH": "/srv"})
    assert (env["GREETING"], env["PATH"]) == ("from-dotenv", "/opt/bin:/usr/bin")


def test_a_variable_naming_itself_without_a_value_is_a_located_error() -> None:
    issues = issues_of(
        """\
        services:
          api:
            command: [run]
            env:
              TOKEN: ${TOKEN}
          worker:
            command: [run]
            env: ["MODE=${MODE}"]
        """,
        environ={},
    )
    found = {(i.path, i.line): i.message for i in issues}
    assert found == {
        ("services.api.env.TOKEN", 5): "undefined variable TOKEN; set it in the environment "
        "or .env, or give a default ${TOKEN:-value}",
        ("services.worker.env.0", 8): "undefined variable MODE; set it in the environment "
        "or .env, or give a default ${MODE:-value}",
    }


def test_per_instance_variables_naming_themselves_stay_for_the_engine() -> None:
    stack = parse(
        """
        services:
          api:
            command: [run]
            ports: {http: auto}
            env: {PORT: "${PORT}", SHIPYARD_SERVICE: "${SHIPYARD_SERVICE}"}
        """,
        environ={"PORT": "1"},
    )
    assert stack.services["api"].env == {
        "PORT": "${PORT}", "SHIPYARD_SERVICE": "${SHIPYARD_SERVICE}"}
    env = instance_environment(stack, "api", "api-1", {"http": 12345}, {}, base={})
    assert (env["PORT"], env["SHIPYARD_SERVICE"]) == ("12345", "api")


def test_a_value_may_refer_to_a_variable_defined_below_it() -> None:
    stack = parse(
        """
        services:
          api:
            command: [run, "${MSG}"]
            ports: {http: auto}
            env:
              MSG: "level ${LEVEL} at ${URL}"
              URL: "http://127.0.0.1:${PORT}/${LEVEL}"
              OTHER: x
              LEVEL: debug
        """,
        environ={"LEVEL": "ignored: the service env wins"},
    )
    env_spec = stack.services["api"].env
    assert list(env_spec) == ["LEVEL", "URL", "MSG", "OTHER"]
    env = instance_environment(stack, "api", "api-1", {"http": 12345}, {}, base={})
    assert env["MSG"] == "level debug at http://127.0.0.1:12345/debug"


def test_an_order_that_works_is_kept() -> None:
    text = """
        services:
          api:
            command: [run]
            env: {Z: z, A: "${Z}", M: "${A}${Z}", B: b}
        """
    assert list(parse(text).services["api"].env) == ["Z", "A", "M", "B"]


def test_env_file_variables_are_ordered_with_the_rest(tmp_path: Path) -> None:
    (tmp_path / "app.env").write_text("BASE=${ROOT}/base\n")
    (tmp_path / "shipyard.yaml").write_text(
        "services:\n  api:\n    command: [run]\n    env_file: app.env\n"
        "    env: {ROOT: /srv}\n"
    )
    stack = load_stack(tmp_path / "shipyard.yaml", environ={})
    env = instance_environment(stack, "api", "api-1", {}, {}, base={})
    assert env["BASE"] == "/srv/base"


def test_variables_referring_to_each_other_in_a_cycle_are_a_located_error() -> None:
    issues = issues_of(
        """\
        services:
          api:
            command: [run]
            env:
              A: "${B}"
              B: "x${C}"
              C: "${A}"
              D: "${D:-fine}"
        """,
        environ={},
    )
    assert [(i.path, i.line, i.message) for i in issues] == [
        ("services.api.env.A", 5, "variables of env refer to each other in a cycle: "
         "A → B → C → A"),
    ]


def test_validate_reports_an_env_cycle_through_the_console_script(
    shipyard: Shipyard,
) -> None:
    (shipyard.cwd / "shipyard.yaml").write_text(
        "name: cyc\nservices:\n  a:\n    command: [run]\n    env: {A: '${B}', B: '${A}'}\n"
    )
    done = shipyard("validate")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"error: {shipyard.cwd / 'shipyard.yaml'}:5: services.a.env.A: variables of env "
        "refer to each other in a cycle: A → B → A"
    )


# --- shipyard logs -o json -----------------------------------------------------------------


def test_logs_as_json_lines(shipyard: Shipyard) -> None:
    (shipyard.cwd / ".env").write_text("WHO=from-dotenv\n")
    (shipyard.cwd / "shipyard.yaml").write_text(
        "name: jl\n"
        "deploy: {timeout: 20s}\n"
        "services:\n"
        "  say:\n"
        f"    command: [{PY}, -c, \"import os; print('hello', os.environ['WHO'], flush=True)"
        "; import time; time.sleep(60)\"]\n"
        "    env: {WHO: '${WHO}'}\n"
        "    replicas: 2\n"
        "    stop: {timeout: 2s}\n"
    )
    # a value naming itself comes from .env, not from the background server's environment
    up = shipyard("up", "-d", timeout=60)
    assert up.returncode == 0, up.stderr
    shipyard.instances()

    def lines() -> list[dict[str, object]]:
        done = shipyard("logs", "-o", "json")
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]

    wait_for(lambda: len(lines()) == 2, what="a line from each instance")
    assert sorted(lines(), key=lambda r: str(r["instance"])) == [
        {"stack": "jl", "service": "say", "instance": "say-1", "line": "hello from-dotenv"},
        {"stack": "jl", "service": "say", "instance": "say-2", "line": "hello from-dotenv"},
    ]
    text = shipyard("logs", "say", "--tail", "1")
    assert sorted(text.stdout.splitlines()) == [
        "say-1 | hello from-dotenv", "say-2 | hello from-dotenv"]
    assert shipyard("down", timeout=60).returncode == 0


def test_no_hint_to_depend_on_itself() -> None:
    issues = issues_of(
        """\
        services:
          db:
            command: [run, "${DB_PORT}"]
        """,
        environ={},
    )
    assert [(i.path, i.message) for i in issues] == [
        ("services.db.command.1", "undefined variable DB_PORT; set it in the environment or "
         ".env, or give a default ${DB_PORT:-value}"),
    ]


# --- bounds the model lacked ---------------------------------------------------------------


def test_probe_timing_and_port_numbers_are_bounded() -> None:
    issues = issues_of(
        """\
        services:
          a:
            command: [run]
            ports: {http: auto}
            health:
              readiness: {http: /ready, port: 99999, interval: 0, timeout: 0s}
              liveness: {tcp: -5, interval: 1s}
        """
    )
    assert {(i.path, i.line, i.message) for i in issues} == {
        ("services.a.health.readiness.port", 6, "a port must be between 1 and 65535, "
         "got 99999"),
        ("services.a.health.readiness.interval", 6, "must be more than 0, got 0"),
        ("services.a.health.readiness.timeout", 6, "must be more than 0, got '0s'"),
        ("services.a.health.liveness.tcp", 7, "a port must be between 1 and 65535, got -5"),
    }
    probe = parse(
        "services: {a: {command: x, health: {readiness: {tcp: '${P}', interval: 10ms}}}}",
        environ={"P": "5432"},
    ).services["a"].health.readiness
    assert probe is not None and (probe.tcp, probe.interval) == (5432, 0.01)


def test_replicas_are_bounded() -> None:
    issues = issues_of(
        """\
        services:
          a: {command: x, replicas: 99999999999999999999999}
          b:
            command: x
            autoscale: {min: 1, max: 1000000, metrics: [{cpu: 70%}]}
        """
    )
    assert {(i.path, i.message) for i in issues} == {
        ("services.a.replicas", "must be at most 100000, got 99999999999999999999999"),
        ("services.b.autoscale.max", "must be at most 100000, got 1000000"),
    }
    assert parse("services: {a: {command: x, replicas: 100000}}").services["a"].replicas == (
        100_000)


def test_scale_refuses_an_absurd_count_before_asking_the_server(shipyard: Shipyard) -> None:
    done = shipyard("scale", "api", "100001")
    assert done.returncode == 2
    assert "100001 is not in the range 0<=x<=100000" in done.stderr
