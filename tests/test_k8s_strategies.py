"""The pure parts of the Kubernetes target: canary replica ratios, the blue-green
selector switch, reading a rollout's status, picking a rollback's template."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shipyard.k8s.rollout import (
    REVISION,
    deployment_progress,
    job_progress,
    rollback_template,
)
from shipyard.k8s.strategies import (
    blue_green_plan,
    canary_split,
    canary_steps,
    effective_weight,
    other_color,
)


@pytest.mark.parametrize(("total", "weight", "expected"), [
    (10, 10, (9, 1)), (10, 50, (5, 5)), (10, 25, (8, 2)), (4, 10, (3, 1)),
    (2, 50, (1, 1)), (2, 90, (1, 1)), (1, 10, (1, 1)), (0, 10, (0, 0)),
    (10, 100, (0, 10)), (10, 0, (10, 0)), (3, 100, (0, 3)),
])
def test_canary_split_examples(total: int, weight: int, expected: tuple[int, int]) -> None:
    assert canary_split(total, weight) == expected


@given(st.integers(2, 500), st.integers(1, 99))
def test_canary_split_properties(total: int, weight: int) -> None:
    stable, canary = canary_split(total, weight)
    assert stable + canary == total
    assert stable >= 1 and canary >= 1
    # as close to the weight as whole pods allow (within one pod), unless clamped
    ideal = total * weight / 100
    if 1 <= round(ideal) <= total - 1:
        assert abs(canary - ideal) <= 0.5
        assert abs(effective_weight(stable, canary) - weight) <= 50 / total + 1e-9


@given(st.integers(0, 100), st.lists(st.integers(1, 99), min_size=1, max_size=5,
                                    unique=True).map(sorted))
def test_canary_steps_grow_and_end_promoted(total: int, weights: list[int]) -> None:
    steps = canary_steps(total, weights)
    assert steps[-1] == (total, 0)
    canaries = [canary for _, canary in steps[:-1]]
    assert canaries == sorted(canaries)


def test_canary_split_refuses_nonsense() -> None:
    with pytest.raises(ValueError):
        canary_split(-1, 10)
    with pytest.raises(ValueError):
        canary_split(3, 101)


def test_blue_green_plan() -> None:
    first = blue_green_plan(None, None, "h1")
    assert (first.deploy, first.selector_before, first.selector_after, first.retire) \
        == ("blue", "blue", "blue", None)
    assert not first.switches
    same = blue_green_plan("green", "h1", "h1")
    assert (same.deploy, same.selector_after, same.retire) == ("green", "green", None)
    new = blue_green_plan("blue", "h1", "h2")
    assert (new.deploy, new.selector_before, new.selector_after, new.retire) \
        == ("green", "blue", "green", "blue")
    assert new.switches
    back = blue_green_plan("green", None, "h2")  # hash unknown: treat as changed
    assert back.deploy == "blue" and back.switches
    assert other_color("blue") == "green" and other_color("green") == "blue"


def dep(generation: int = 2, observed: int = 2, replicas: int = 3, updated: int = 3,
        current: int = 3, available: int = 3, reason: str | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"observedGeneration": observed, "updatedReplicas": updated,
                              "replicas": current, "availableReplicas": available}
    if reason:
        status["conditions"] = [{"type": "Progressing", "status": "False", "reason": reason}]
    return {"kind": "Deployment", "metadata": {"generation": generation},
            "spec": {"replicas": replicas}, "status": status}


def test_deployment_progress_reads_like_kubectl() -> None:
    assert deployment_progress(dep(observed=1)).message.startswith("waiting for the controller")
    assert deployment_progress(dep(updated=1, available=1)).message \
        == "1 of 3 updated, 1 available"
    assert deployment_progress(dep(current=5)).message == "2 old replicas terminating"
    assert deployment_progress(dep(available=2)).message == "2 of 3 available"
    done = deployment_progress(dep())
    assert done.state == "done" and (done.ready, done.desired) == (3, 3)
    failed = deployment_progress(dep(updated=1, reason="ProgressDeadlineExceeded"))
    assert failed.state == "failed" and "progress deadline" in failed.message
    assert deployment_progress({"kind": "Deployment", "metadata": {"generation": 1},
                                "spec": {"replicas": 1}}).state == "waiting"


def test_job_progress() -> None:
    job: dict[str, Any] = {"kind": "Job", "spec": {"completions": 2},
                           "status": {"succeeded": 1, "active": 1}}
    assert job_progress(job).message == "1 of 2 completed, 1 running"
    job["status"]["conditions"] = [{"type": "Complete", "status": "True"}]
    assert job_progress(job).state == "done"
    job["status"]["conditions"] = [{"type": "Failed", "status": "True",
                                    "reason": "BackoffLimitExceeded"}]
    assert job_progress(job).message == "failed: BackoffLimitExceeded"


def rs(rev: int, image: str) -> dict[str, Any]:
    return {"metadata": {"annotations": {REVISION: str(rev)}},
            "spec": {"template": {"metadata": {"labels": {"a": "b",
                                                          "pod-template-hash": "x"}},
                                  "spec": {"containers": [{"image": image}]}}}}


def test_rollback_template_picks_the_previous_or_the_asked_revision() -> None:
    sets = [rs(1, "v1"), rs(2, "v2"), rs(4, "v4"), {"metadata": {}}]
    rev, template = rollback_template(sets, 4, None)
    assert rev == 2 and template["spec"]["containers"][0]["image"] == "v2"
    assert template["metadata"]["labels"] == {"a": "b"}
    assert rollback_template(sets, 4, 1)[0] == 1
    with pytest.raises(LookupError, match=r"revision 3 is not kept \(kept: 1, 2, 4\)"):
        rollback_template(sets, 4, 3)
    with pytest.raises(LookupError, match="no revision before 1"):
        rollback_template([rs(1, "v1")], 1, None)
