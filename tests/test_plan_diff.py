"""Desired stack versus recorded specs: what is added, changed, removed, unchanged."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shipyard.plan.diff import Change, diff_stack, spec_hash
from shipyard.spec.models import Service, Stack


def stack(**services: dict[str, Any]) -> Stack:
    return Stack.model_validate({"name": "demo", "services": services})


BASE = {
    "db": {"command": "postgres", "env": {"LOG_LEVEL": "info"}},
    "api": {"command": ["python", "-m", "app"], "depends_on": {"db": "healthy"},
            "ports": {"http": "auto"}},
}


def recorded(s: Stack) -> dict[str, dict[str, Any]]:
    return {name: svc.model_dump(mode="json") for name, svc in s.services.items()}


def test_spec_hash_is_stable_and_sensitive() -> None:
    a = Service.model_validate({"command": "x", "env": {"A": "1", "B": "2"}})
    b = Service.model_validate({"command": "x", "env": {"B": "2", "A": "1"}})
    c = Service.model_validate({"command": "x", "env": {"A": "1", "B": "3"}})
    assert spec_hash(a) == spec_hash(b)
    assert spec_hash(a) != spec_hash(c)
    assert len(spec_hash(a)) == 64
    assert int(spec_hash(a), 16) >= 0


def test_spec_hash_survives_a_json_round_trip() -> None:
    svc = Service.model_validate({"command": "x", "resources": {"cpu": "500m"},
                                  "restart": "always", "stop": {"signal": 15}})
    again = Service.model_validate(svc.model_dump(mode="json"))
    assert spec_hash(again) == spec_hash(svc)


def test_first_deploy_adds_everything() -> None:
    assert diff_stack(stack(**BASE), {}) == [Change("api", "add"), Change("db", "add")]


def test_same_stack_is_unchanged() -> None:
    s = stack(**BASE)
    assert diff_stack(s, recorded(s)) == [Change("api", "unchanged"), Change("db", "unchanged")]


@pytest.mark.parametrize(
    ("edit", "fields"),
    [
        ({"env": {"LOG_LEVEL": "debug"}}, ("env.LOG_LEVEL",)),
        ({"env": {"LOG_LEVEL": "info", "NEW": "1"}}, ("env.NEW",)),
        ({"env": {}}, ("env.LOG_LEVEL",)),
        ({"replicas": 3}, ("replicas",)),
        ({"command": "postgres -F"}, ("command",)),
        ({"resources": {"memory": "256Mi"}}, ("resources.memory",)),
        ({"restart": "always"}, ("restart.policy",)),
        ({"health": {"readiness": {"tcp": 5432}}}, ("health.readiness",)),
        ({"version": "2", "replicas": 2}, ("replicas", "version")),
    ],
)
def test_changed_fields_are_dotted_paths(edit: dict[str, Any], fields: tuple[str, ...]) -> None:
    before = stack(**BASE)
    after = stack(**(BASE | {"db": BASE["db"] | edit}))
    assert diff_stack(after, recorded(before)) == [
        Change("api", "unchanged"), Change("db", "change", fields),
    ]


def test_nested_change_inside_a_probe() -> None:
    with_probe = {"command": "x", "health": {"readiness": {"http": "/ready", "interval": "2s"}}}
    before = stack(web=with_probe)
    after = stack(web=with_probe | {"health": {"readiness": {"http": "/ready",
                                                              "interval": "5s"}}})
    assert diff_stack(after, recorded(before)) == [
        Change("web", "change", ("health.readiness.interval",)),
    ]


def test_removed_and_added_services() -> None:
    before = stack(**BASE)
    after = stack(db=BASE["db"], web={"command": "web"})
    assert diff_stack(after, recorded(before)) == [
        Change("api", "remove"), Change("db", "unchanged"), Change("web", "add"),
    ]


def test_a_recorded_spec_missing_a_defaulted_field_is_unchanged() -> None:
    """A field added to Shipyard after a spec was recorded is not a change."""
    s = stack(**BASE)
    old = recorded(s)
    del old["db"]["stop"]
    del old["api"]["restart"]["jitter"]
    assert [c.action for c in diff_stack(s, old)] == ["unchanged", "unchanged"]


def test_a_recorded_spec_that_no_longer_validates_is_compared_as_is() -> None:
    s = stack(**BASE)
    old = recorded(s)
    old["db"]["retired_field"] = 1
    assert diff_stack(s, old)[1] == Change("db", "change", ("retired_field",))


_env = st.dictionaries(st.sampled_from(["A", "B", "C"]), st.sampled_from(["0", "1"]), max_size=3)
_services = st.fixed_dictionaries({
    "command": st.sampled_from(["a", "b c"]),
    "env": _env,
    "replicas": st.integers(0, 3),
})


@given(st.dictionaries(st.sampled_from(["x", "y", "z"]), _services, min_size=1),
       st.dictionaries(st.sampled_from(["x", "y", "z"]), _services, min_size=1))
@settings(max_examples=100, deadline=None)
def test_diff_agrees_with_hashes(old: dict[str, Any], new: dict[str, Any]) -> None:
    before, after = stack(**old), stack(**new)
    changes = diff_stack(after, recorded(before))
    assert [c.service for c in changes] == sorted(set(old) | set(new))
    for change in changes:
        name = change.service
        if change.action in ("change", "unchanged"):
            same = spec_hash(after.services[name]) == spec_hash(before.services[name])
            assert (change.action == "unchanged") == same
            assert bool(change.fields) == (not same)
        else:
            assert change.fields == ()
            assert (change.action == "add") == (name not in old)
