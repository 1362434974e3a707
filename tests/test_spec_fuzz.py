"""Never a traceback: any input gives a Stack or a SpecError with located issues."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from shipyard.errors import SpecError
from shipyard.spec.issues import field_names
from shipyard.spec.loader import parse_stack
from shipyard.spec.models import Stack

SETTINGS = settings(deadline=None, max_examples=100)


# --- robustness: never a traceback ---------------------------------------------------------

MAPPINGS = [
    (),
    ("deploy",),
    ("ports",),
    ("capacity",),
    ("services", "a"),
    ("services", "a", "health", "readiness"),
    ("services", "a", "restart"),
    ("services", "a", "resources"),
    ("services", "a", "stop"),
]
FIELD_WORDS = sorted({w for path in MAPPINGS for w in field_names(path)} | {"a", "b", "http"})
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(
        [
            "5s",
            "500m",
            "256Mi",
            "auto",
            "healthy",
            "/ready",
            "${X}",
            "${PORT}",
            "$$",
            "${A:-1}",
            "${",
            "always",
            "no",
            "SIGTERM",
            "30000-32767",
            "a",
            "b",
        ]
    ),
)
keys = st.one_of(st.sampled_from(FIELD_WORDS), st.text(max_size=8))
documents = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=30,
)


def _check_outcome(text: str, tmp_path: Path | str = "/nonexistent-base") -> None:
    try:
        stack = parse_stack(text, environ={"X": "1"}, base_dir=tmp_path)
    except SpecError as exc:
        assert exc.issues
        for issue in exc.issues:
            assert isinstance(issue.message, str) and issue.message
            assert issue.line is None or issue.line >= 1
    else:
        assert isinstance(stack, Stack)


@SETTINGS
@given(doc=documents)
def test_random_documents_give_a_stack_or_a_spec_error(doc: object) -> None:
    _check_outcome(yaml.safe_dump(doc))


@SETTINGS
@given(
    services=st.dictionaries(keys, st.dictionaries(keys, documents, max_size=6), max_size=3),
    top=st.dictionaries(keys, documents, max_size=3),
)
def test_random_services_give_a_stack_or_a_spec_error(services: dict, top: dict) -> None:
    _check_outcome(yaml.safe_dump({**top, "services": services}))


@SETTINGS
@given(text=st.text(alphabet=" \n\t-:[]{}&*!|>'\"#%@`,?abc${}01<", max_size=60))
def test_random_text_gives_a_stack_or_a_spec_error(text: str) -> None:
    _check_outcome(text)


BILLION_LAUGHS = "l0: &l0 [a, a, a, a, a, a, a, a, a]\n" + "".join(
    f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)
)


@pytest.mark.parametrize(
    "text",
    [
        "a: &a [*a]\n",
        "services: &s {x: *s}\n",
        "x: !!python/object:os.system [ls]\n",
        "services: {a: {command: !!int nope}}\n",
        "services: {a: {command: x, ports: {http: 99999999999999999999999999}}}\n",
        "services: {a: {command: x, resources: {memory: " + "9" * 400 + "Pi}}}\n",
        "services: {a: {command: x, env: [1, {b: 2}], depends_on: [{c: 1}]}}\n",
        "services: {a: {command: x, env_file: [1, null]}}\n",
        "? [a, b]\n: c\nservices: {}\n",
        "services: {a: {command: 'unbalanced \"quote'}}\n",
        "\x00",
        "[" * 2000,
        BILLION_LAUGHS,
    ],
)
def test_nasty_inputs_give_a_spec_error(text: str) -> None:
    with pytest.raises(SpecError):
        parse_stack(text, environ={})


RICH = yaml.safe_load(
    """
    name: demo
    deploy: {strategy: parallel, timeout: 5m}
    ports: {range: 30000-32767}
    capacity: {cpu: 2, memory: 8Gi, overcommit: {cpu: 1.5}}
    services:
      db:
        command: [postgres, -p, "${PORT}"]
        ports: {pg: auto}
        env_file: []
        health: {readiness: {exec: "pg_isready -p ${PORT}", interval: 1s}}
      api:
        command: run --db ${DB_URL} $${LITERAL}
        depends_on: {db: healthy}
        env: {A: "${X}", B: "${A}"}
        ports: {http: auto}
        resources: {cpu: 500m, memory: 256Mi}
        health: {readiness: {http: /ready, port: http}, liveness: {tcp: http}}
        restart: {policy: always, initial: 1s}
        stop: {signal: SIGINT, timeout: 10s}
    """
)


def _paths(node: object, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


RICH_PATHS = _paths(RICH)[1:]


def test_the_rich_document_is_valid() -> None:
    _check_outcome(yaml.safe_dump(RICH))
    assert parse_stack(yaml.safe_dump(RICH), environ={"X": "1"}).services["api"].env["A"] == "1"


@SETTINGS
@given(data=st.data())
def test_mutated_documents_give_a_stack_or_a_spec_error(data: st.DataObject) -> None:
    doc = copy.deepcopy(RICH)
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        path = data.draw(st.sampled_from(RICH_PATHS))
        parent = doc
        try:
            for part in path[:-1]:
                parent = parent[part]
            parent[path[-1]] = data.draw(documents)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation replaced this branch
    _check_outcome(yaml.safe_dump(doc))
