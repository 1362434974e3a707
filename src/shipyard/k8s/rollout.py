"""Where a rollout stands, read from a Deployment's or a Job's status. Pure.

The same reading as `kubectl rollout status`: the controller must have observed the
latest generation; all replicas updated; no old replica left; all updated ones
available; a `Progressing` condition with reason `ProgressDeadlineExceeded` is a failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

REVISION = "deployment.kubernetes.io/revision"

State = Literal["done", "waiting", "failed"]


@dataclass(frozen=True)
class Progress:
    state: State
    message: str
    ready: int = 0
    desired: int = 0


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in obj.get("status", {}).get("conditions") or []:
        if cond.get("type") == kind:
            return cond
    return None


def deployment_progress(dep: dict[str, Any]) -> Progress:
    spec, status = dep.get("spec", {}), dep.get("status") or {}
    desired = int(spec.get("replicas", 1))
    updated = int(status.get("updatedReplicas") or 0)
    current = int(status.get("replicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    generation = int(dep.get("metadata", {}).get("generation") or 0)
    observed = int(status.get("observedGeneration") or 0)
    if generation > observed:
        return Progress("waiting", "waiting for the controller to see the new spec",
                        available, desired)
    progressing = _condition(dep, "Progressing")
    if progressing and progressing.get("reason") == "ProgressDeadlineExceeded":
        return Progress("failed", f"exceeded its progress deadline "
                        f"({updated} of {desired} updated, {available} available)",
                        available, desired)
    if updated < desired:
        return Progress("waiting", f"{updated} of {desired} updated, {available} available",
                        available, desired)
    if current > updated:
        return Progress("waiting", f"{current - updated} old replicas terminating",
                        available, desired)
    if available < updated:
        return Progress("waiting", f"{available} of {updated} available", available, desired)
    return Progress("done", f"{available} of {desired} available", available, desired)


def job_progress(job: dict[str, Any]) -> Progress:
    status = job.get("status") or {}
    want = int(job.get("spec", {}).get("completions") or 1)
    succeeded = int(status.get("succeeded") or 0)
    failed = _condition(job, "Failed")
    if failed and failed.get("status") == "True":
        return Progress("failed", f"failed: {failed.get('message') or failed.get('reason')}",
                        succeeded, want)
    complete = _condition(job, "Complete")
    if (complete and complete.get("status") == "True") or succeeded >= want:
        return Progress("done", "completed", succeeded, want)
    active = int(status.get("active") or 0)
    return Progress("waiting", f"{succeeded} of {want} completed, {active} running",
                    succeeded, want)


def progress(obj: dict[str, Any]) -> Progress:
    return job_progress(obj) if obj.get("kind") == "Job" else deployment_progress(obj)


def revision(obj: dict[str, Any]) -> int:
    """The revision number the Deployment controller wrote on a Deployment/ReplicaSet."""
    value = obj.get("metadata", {}).get("annotations", {}).get(REVISION)
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


def rollback_template(replica_sets: list[dict[str, Any]], current: int,
                      to: int | None) -> tuple[int, dict[str, Any]]:
    """The revision to go back to and its pod template (without the controller's
    `pod-template-hash` label): `to`, or the newest revision before `current`."""
    by_revision = {revision(rs): rs for rs in replica_sets if revision(rs)}
    if to is None:
        older = [rev for rev in by_revision if rev < current]
        if not older:
            raise LookupError(f"no revision before {current} is kept")
        to = max(older)
    if to not in by_revision:
        kept = ", ".join(str(r) for r in sorted(by_revision)) or "none"
        raise LookupError(f"revision {to} is not kept (kept: {kept})")
    template = by_revision[to]["spec"]["template"]
    labels = dict(template.get("metadata", {}).get("labels", {}))
    labels.pop("pod-template-hash", None)
    template = {**template, "metadata": {**template.get("metadata", {}), "labels": labels}}
    return to, template
