"""The JSON Schema for editors agrees with the loader on what a stack file may say."""

from __future__ import annotations

import textwrap
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from shipyard.errors import SpecError
from shipyard.spec.loader import parse_stack
from shipyard.spec.schema import DRAFT, stack_json_schema

SETTINGS = settings(deadline=None, max_examples=100)
SCHEMA = stack_json_schema()
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
ENV = {"TAG": "1.4", "REPLICAS": "2"}


def schema_errors(doc: Any) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in VALIDATOR.iter_errors(doc)]


def loads(doc: Any) -> bool:
    try:
        parse_stack(yaml.safe_dump(doc), environ=ENV, base_dir="/srv/demo")
    except SpecError:
        return False
    return True


EXAMPLES = {
    "minimal": """
        services:
          web: {command: python -m http.server}
    """,
    "full": """
        name: demo
        deploy: {strategy: hybrid, max_parallel: 10, timeout: 5m, rollback_on_failure: true}
        ports: {range: 30000-32767}
        capacity:
          cpu: 2
          memory: 8Gi
          disk: 100G
          gpu: 0
          overcommit: {cpu: 1.5, memory: 1.2, disk: 1.1}
        services:
          db:
            image: localhost/postgres:16
            ports: {pg: 5432}
            resources: {cpu: 1, memory: 1Gi}
            health:
              readiness: {exec: [pg_isready, -q], interval: 1s, failure_threshold: 5}
            stop: {signal: SIGINT, timeout: 30s}
          migrate:
            command: [python, -m, app.migrate]
            depends_on: {db: healthy}
            restart: {policy: no}
          api:
            command: [python, -m, app, --port, "${PORT}"]
            version: "1.4.2"
            workdir: ./api
            env: {LOG_LEVEL: info, WORKERS: 4, DEBUG: false, DB: "${DB_URL}"}
            replicas: 2
            depends_on: {db: healthy, migrate: completed}
            ports: {http: auto, metrics: auto}
            resources: {cpu: 500m, memory: 256Mi, disk: 1Gi, gpu: 0}
            health:
              readiness: {http: /ready, port: http, interval: 2s, timeout: 1s, failure_threshold: 3}
              liveness: {tcp: http, interval: 5s, initial_delay: 1m30s}
            restart: {policy: on-failure, backoff: exponential, initial: 1s, max: 60s,
                      max_restarts: 10, jitter: 0.1}
            stop: {signal: 15, timeout: 10s}
    """,
    "compose_style": """
        services:
          cache: {command: "redis-server --port 6380", restart: always}
          worker:
            command: celery worker
            env: [QUEUE=default, VERBOSE]
            depends_on: [cache]
            restart: no
            shell: true
    """,
    "interpolated": """
        name: shop
        services:
          api:
            image: "app:${TAG}"
            replicas: ${REPLICAS}
            resources: {memory: "${MEMORY:-512Mi}"}
            health: {readiness: {tcp: "${PROBE_PORT:-8080}", interval: "${EVERY:-2s}"}}
            stop: {timeout: "${GRACE:-10}"}
    """,
}


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    assert SCHEMA["$schema"] == DRAFT
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert "source" not in SCHEMA["properties"] and "base_dir" not in SCHEMA["properties"]
    assert SCHEMA["required"] == ["services"]


def test_stack_json_schema_returns_a_fresh_dict() -> None:
    stack_json_schema()["properties"].clear()
    assert stack_json_schema()["properties"]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_are_valid_for_the_schema_and_the_loader(name: str) -> None:
    doc = yaml.safe_load(textwrap.dedent(EXAMPLES[name]))
    assert schema_errors(doc) == []
    parse_stack(textwrap.dedent(EXAMPLES[name]), environ=ENV, base_dir="/srv/demo")


BAD = [
    ({"services": {"api": {"comand": "x"}}}, ["services", "api"]),
    ({"services": {"api": {"command": "x", "resources": {"cpu": "lots"}}}}, ["cpu"]),
    ({"services": {"api": {"command": "x", "resources": {"memory": "1Zi"}}}}, ["memory"]),
    ({"services": {"api": {"command": "x", "stop": {"timeout": "fast"}}}}, ["timeout"]),
    ({"services": {"api": {"command": "x", "restart": "sometimes"}}}, ["restart"]),
    ({"services": {"api": {"command": 5}}}, ["command"]),
    ({"services": {"api": {"command": "x", "depends_on": {"db": "healty"}}}}, ["depends_on"]),
    ({"services": {"api": {"command": "x", "ports": {"http": 70000}}}}, ["http"]),
    ({"services": {"api": {"command": "x", "ports": {"HTTP": "auto"}}}}, ["ports"]),
    ({"services": {"api": {"command": "x", "env": "A=1"}}}, ["env"]),
    ({"services": {"api": {"command": "x", "version": 1.4}}}, ["version"]),
    ({"services": {"Bad Name": {"command": "x"}}}, ["services"]),
    ({"services": {}}, ["services"]),
    ({"name": "Not Valid", "services": {"a": {"command": "x"}}}, ["name"]),
    ({"deploy": {"strategy": "yolo"}, "services": {"a": {"command": "x"}}}, ["strategy"]),
    ({"ports": {"range": "high"}, "services": {"a": {"command": "x"}}}, ["range"]),
    ({"source": "/etc/passwd", "services": {"a": {"command": "x"}}}, []),
    ({}, []),
]


@pytest.mark.parametrize(("doc", "where"), BAD)
def test_bad_documents_are_refused_by_schema_and_loader(doc: dict, where: list[str]) -> None:
    errors = schema_errors(doc)
    assert errors, doc
    assert any(all(w in e.split(":")[0] for w in where) for e in errors), errors
    assert not loads(doc)


# --- the schema never refuses what the loader accepts --------------------------------------


def mostly(good: st.SearchStrategy, bad: st.SearchStrategy) -> st.SearchStrategy:
    """`good` nearly always: most documents load, a few are refused somewhere."""
    return st.sampled_from([True] * 29 + [False]).flatmap(lambda ok: good if ok else bad)


num = st.integers(min_value=0, max_value=5000)
durations = mostly(
    st.one_of(
        num,
        st.floats(min_value=0, max_value=1e6),
        st.lists(
            st.tuples(num, st.sampled_from(["ms", "s", "m", "h", "d"])), min_size=1, max_size=3
        ).map(lambda parts: "".join(f"{n}{u}" for n, u in parts)),
        st.just("${WAIT:-5s}"),
    ),
    st.sampled_from(["soon", -1, "5 sec"]),
)
sizes = mostly(
    st.one_of(
        num,
        st.tuples(num, st.sampled_from(["", "k", "Ki", "MiB", "M", "G", "Gi", "TB", "b"])).map(
            lambda t: f"{t[0]}{t[1]}"
        ),
    ),
    st.sampled_from(["huge", "1Zi"]),
)
cpus = mostly(
    st.one_of(num, st.floats(min_value=0, max_value=64), num.map(lambda n: f"{n}m")),
    st.sampled_from(["x", -2]),
)
ports = mostly(st.just("auto"), st.sampled_from([0, 8080, 70000, "any"]))
probes = st.fixed_dictionaries(
    {"tcp": mostly(st.sampled_from(["http", 5432]), st.just("nope"))},
    optional={
        "interval": durations,
        "timeout": durations,
        "failure_threshold": mostly(st.integers(1, 5), st.just(0)),
        "host": st.just("localhost"),
    },
)
services = st.fixed_dictionaries(
    {
        "command": mostly(st.sampled_from(["run it", ["run", "it"], ["sleep", 5]]), st.just([])),
        "ports": mostly(
            st.fixed_dictionaries({"http": ports}),
            st.dictionaries(st.sampled_from(["admin", "Bad"]), ports, max_size=1),
        ),
    },
    optional={
        "image": st.just("app:1"),
        "shell": st.booleans(),
        "version": mostly(st.just("1.0"), st.just(2.5)),
        "env": mostly(
            st.one_of(
                st.dictionaries(st.sampled_from(["A", "B"]), st.one_of(st.text(max_size=3), num)),
                st.lists(st.sampled_from(["A=1", "B"]), max_size=2),
            ),
            st.just("A=1"),
        ),
        "replicas": mostly(st.integers(0, 3), st.just(-1)),
        "depends_on": mostly(
            st.one_of(st.just({"a": "started"}), st.just(["a"]), st.just({"a": "completed"})),
            st.one_of(st.just({"zz": "healthy"}), st.just({"a": "done"})),
        ),
        "resources": st.fixed_dictionaries(
            {}, optional={"cpu": cpus, "memory": sizes, "disk": sizes, "gpu": st.integers(0, 2)}
        ),
        "health": st.fixed_dictionaries({}, optional={"readiness": probes, "liveness": probes}),
        "restart": mostly(
            st.one_of(
                st.sampled_from(["always", "no", "on-failure", False]),
                st.fixed_dictionaries(
                    {}, optional={"policy": st.sampled_from(["always", False]), "max": durations}
                ),
            ),
            st.just("sometimes"),
        ),
        "stop": st.fixed_dictionaries(
            {},
            optional={
                "signal": mostly(st.sampled_from(["SIGTERM", "INT", 9]), st.just("NOPE")),
                "timeout": durations,
            },
        ),
    },
)
stacks = st.fixed_dictionaries(
    {
        "services": st.one_of(
            st.fixed_dictionaries({"a": services}),
            st.fixed_dictionaries({"a": services, "b": services}),
        )
    },
    optional={
        "name": mostly(st.just("demo"), st.just("Bad Name")),
        "deploy": st.fixed_dictionaries(
            {},
            optional={
                "timeout": durations,
                "max_parallel": mostly(st.integers(1, 3), st.just(0)),
                "strategy": mostly(st.just("parallel"), st.just("random")),
            },
        ),
        "ports": st.fixed_dictionaries(
            {},
            optional={
                "range": mostly(st.sampled_from(["30000-32767", [1000, 2000]]), st.just("9-1"))
            },
        ),
        "capacity": st.fixed_dictionaries({}, optional={"cpu": cpus, "memory": sizes}),
    },
)


@SETTINGS
@given(doc=stacks)
def test_whatever_the_loader_accepts_the_schema_accepts(doc: dict) -> None:
    if loads(doc):
        assert schema_errors(doc) == []


@SETTINGS
@given(value=durations, kind=st.sampled_from(["duration", "size", "cpu"]))
def test_unit_patterns_accept_what_the_parsers_accept(value: object, kind: str) -> None:
    from shipyard.spec.units import parse_cpu, parse_duration, parse_size

    parser = {"duration": parse_duration, "size": parse_size, "cpu": parse_cpu}[kind]
    try:
        parser(value)
    except ValueError:
        return
    field = {
        "duration": ("stop", "timeout"),
        "size": ("resources", "memory"),
        "cpu": ("resources", "cpu"),
    }[kind]
    doc = {"services": {"a": {"command": "x", field[0]: {field[1]: value}}}}
    assert schema_errors(doc) == []
