"""Applying a stack to a cluster and operating it: apply (in dependency order, waiting for
each rollout), diff, status, scale, rollback, delete.

Rolling services are one Deployment each; blue-green services two (`-blue`/`-green`) and
a Service whose selector switches once the new set is ready; canary services a stable
and a canary Deployment behind one Service, with replica counts in the ratio of the step
weights (`strategies.py` decides, this module carries it out).
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from shipyard.errors import NotFoundError
from shipyard.k8s import objects as o
from shipyard.k8s.cluster import MANAGED_KINDS, Cluster, ClusterError
from shipyard.k8s.render import Manifests, RenderOptions, ServiceManifests, canary_deployment
from shipyard.k8s.render import render_stack as render
from shipyard.k8s.rollout import Progress, progress, revision, rollback_template
from shipyard.k8s.strategies import COLORS, BlueGreenPlan, Color, blue_green_plan, canary_steps
from shipyard.spec.models import Stack
from shipyard.spec.update import UpdateStrategy

Report = Callable[[str], None]


@dataclass
class ApplyOptions:
    dry_run: bool = False  # server-side dry run: nothing is persisted, nothing waited for
    prune: bool = False
    wait: bool = True
    interval: float = 1.0  # seconds between two status reads while waiting
    sleep: Callable[[float], None] = time.sleep
    report: Report = field(default=lambda line: None)


@dataclass(frozen=True)
class Planned:
    """The manifests to apply, with each blue-green service's plan against the cluster."""

    manifests: Manifests
    blue_green: dict[str, BlueGreenPlan]
    options: RenderOptions


def _active_color(cluster: Cluster, sm: ServiceManifests) -> tuple[Color | None, str | None]:
    """The live active colour of a blue-green service and its template hash."""
    color: Color | None = None
    service = cluster.get("Service", sm.name) if sm.of_kind("Service") else None
    if service is not None:
        picked = service.get("spec", {}).get("selector", {}).get(o.LABEL_COLOR)
        color = picked if picked in COLORS else None
    if color is None:
        for candidate in COLORS:
            live = cluster.get("Deployment", f"{sm.name}-{candidate}")
            if live is not None and live.get("spec", {}).get("replicas", 1) > 0:
                color = candidate
                break
    if color is None:
        return None, None
    live = cluster.get("Deployment", f"{sm.name}-{color}")
    if live is None:
        return color, None
    return color, live.get("metadata", {}).get("annotations", {}).get(o.ANNOTATION_HASH)


def plan(cluster: Cluster, stack: Stack, options: RenderOptions) -> Planned:
    """Render, then re-render blue-green services with the colours the cluster calls for."""
    first = render(stack, options)
    plans: dict[str, BlueGreenPlan] = {}
    for name, sm in first.services.items():
        if sm.strategy == UpdateStrategy.BLUE_GREEN and not sm.is_job:
            active, active_hash = _active_color(cluster, sm)
            plans[name] = blue_green_plan(active, active_hash, sm.template_hash)
    if not plans:
        return Planned(first, plans, options)
    options = replace(
        options,
        colors={**options.colors, **{n: p.deploy for n, p in plans.items()}},
        selectors={**options.selectors, **{n: p.selector_before for n, p in plans.items()}})
    return Planned(render(stack, options), plans, options)


class Deployer:
    def __init__(self, cluster: Cluster, stack: Stack, apply: ApplyOptions) -> None:
        self.cluster = cluster
        self.stack = stack
        self.opts = apply
        self.report = apply.report

    # -- waiting -----------------------------------------------------------------------

    def wait(self, targets: list[tuple[str, str]], timeout: float) -> None:
        """Until every (kind, name) is rolled out / completed; reports each change of
        state as a line; a failure or the timeout is a ClusterError."""
        if self.opts.dry_run or not self.opts.wait:
            return
        last: dict[tuple[str, str], str] = {}
        deadline = time.monotonic() + timeout
        pending = list(targets)
        while pending:
            for target in list(pending):
                obj = self.cluster.get(*target)
                state = progress(obj) if obj else Progress("waiting", "not created yet")
                if last.get(target) != state.message:
                    last[target] = state.message
                    self.report(f"  {target[0]}/{target[1]}: {state.message}")
                if state.state == "failed":
                    raise ClusterError(f"{target[0]}/{target[1]} {state.message}")
                if state.state == "done":
                    pending.remove(target)
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(f"{k}/{n}" for k, n in pending)
                raise ClusterError(f"timed out after {timeout:.0f}s waiting for {names}")
            self.opts.sleep(self.opts.interval)

    def _timeout(self, sm: ServiceManifests) -> float:
        svc = self.stack.services[sm.service]
        if sm.is_job:
            return self.stack.deploy.timeout
        return svc.update.progress_deadline + 30.0

    # -- apply -------------------------------------------------------------------------

    def apply(self, planned: Planned) -> list[str]:
        """Apply phase by phase; returns a line per object applied (and pruned)."""
        self.cluster.version()
        done: list[str] = []
        manifests = planned.manifests
        for index, phase in enumerate(manifests.phases, 1):
            self.report(f"phase {index}: {', '.join(phase)}")
            waits: list[tuple[str, str]] = []
            timeout = 0.0
            canaries: list[ServiceManifests] = []
            for name in phase:
                sm = manifests.services[name]
                if sm.strategy == UpdateStrategy.CANARY and not sm.is_job \
                        and self._canary_needed(sm):
                    canaries.append(sm)
                    continue
                for obj in sm.objects:
                    self.cluster.apply(obj, dry_run=self.opts.dry_run)
                    done.append(f"{obj['kind']}/{obj['metadata']['name']}")
                waits.append((sm.workload["kind"], sm.workload["metadata"]["name"]))
                timeout = max(timeout, self._timeout(sm))
            try:
                self.wait(waits, timeout)
            except ClusterError:
                self._auto_rollback(phase, manifests)
                raise
            for name in phase:
                if name in planned.blue_green and not self.opts.dry_run:
                    self._switch(name, planned)
            for sm in canaries:
                done += self._canary(sm)
        if self.opts.prune:
            done += [f"pruned {line}" for line in self.prune(planned)]
        return done

    def _auto_rollback(self, phase: list[str], manifests: Manifests) -> None:
        for name in phase:
            sm = manifests.services[name]
            svc = self.stack.services[name]
            if sm.is_job or not svc.update.auto_rollback or self.opts.dry_run:
                continue
            dep = sm.workload["metadata"]["name"]
            live = self.cluster.get("Deployment", dep)
            if live is None or progress(live).state != "failed":
                continue
            try:
                rev = rollback_deployment(self.cluster, dep, None)
            except (LookupError, ClusterError) as exc:
                self.report(f"  {name}: could not roll back: {exc}")
                continue
            self.report(f"  {name}: rolled back to revision {rev}")

    def _switch(self, name: str, planned: Planned) -> None:
        bg = planned.blue_green[name]
        if not bg.switches:
            return
        options = replace(planned.options,
                          selectors={**planned.options.selectors, name: bg.selector_after})
        service = render(self.stack, options).services[name].of_kind("Service")
        if service is not None:
            self.cluster.apply(service)
        self.report(f"  {name}: traffic switched from {bg.selector_before} to "
                    f"{bg.selector_after}")
        if bg.retire is not None:
            old = f"{planned.manifests.services[name].name}-{bg.retire}"
            if self.cluster.get("Deployment", old) is not None:
                self.cluster.scale(old, 0)
                self.report(f"  {name}: {old} scaled to 0 (kept for a switch back)")

    # -- canary ------------------------------------------------------------------------

    def _canary_needed(self, sm: ServiceManifests) -> bool:
        live = self.cluster.get("Deployment", sm.name)
        if live is None:
            return False
        return live.get("metadata", {}).get("annotations", {}).get(o.ANNOTATION_HASH) \
            != sm.template_hash

    def _canary(self, sm: ServiceManifests) -> list[str]:
        svc = self.stack.services[sm.service]
        live = self.cluster.get("Deployment", sm.name) or {}
        total = int(sm.workload["spec"].get("replicas", live.get("spec", {}).get("replicas", 1)))
        steps = svc.update.steps
        plan_ = canary_steps(total, [step.weight for step in steps])
        done: list[str] = []
        for obj in sm.objects:  # config first: the canary's pods read it
            if obj["kind"] not in ("Deployment", "HorizontalPodAutoscaler"):
                self.cluster.apply(obj, dry_run=self.opts.dry_run)
                done.append(f"{obj['kind']}/{obj['metadata']['name']}")
        canary_name = f"{sm.name}-canary"
        timeout = self._timeout(sm)
        try:
            for step, (stable_n, canary_n) in zip(steps, plan_, strict=False):
                self.cluster.apply(canary_deployment(sm.workload, canary_n),
                                   dry_run=self.opts.dry_run)
                if not self.opts.dry_run:
                    self.cluster.scale(sm.name, stable_n)
                self.wait([("Deployment", canary_name), ("Deployment", sm.name)], timeout)
                self.report(f"  {sm.service}: canary at {step.weight}% "
                            f"({canary_n} canary, {stable_n} stable)")
                if step.pause and not self.opts.dry_run:
                    self.opts.sleep(step.pause)
            for obj in sm.objects:
                if obj["kind"] in ("Deployment", "HorizontalPodAutoscaler"):
                    self.cluster.apply(obj, dry_run=self.opts.dry_run)
                    done.append(f"{obj['kind']}/{obj['metadata']['name']}")
            self.wait([("Deployment", sm.name)], timeout)
        except ClusterError:
            if svc.update.auto_rollback and not self.opts.dry_run:
                self.cluster.delete("Deployment", canary_name)
                self.cluster.scale(sm.name, total)
                self.report(f"  {sm.service}: canary failed: removed, stable back to {total}")
            raise
        if not self.opts.dry_run:
            self.cluster.delete("Deployment", canary_name)
        self.report(f"  {sm.service}: canary promoted")
        return done

    # -- prune -------------------------------------------------------------------------

    def prune(self, planned: Planned) -> list[str]:
        """Delete what carries this stack's labels but the stack no longer declares."""
        keep = _declared(planned.manifests)
        pruned = []
        for kind, name in live_objects(self.cluster, self.stack.name):
            if (kind, name) in keep:
                continue
            if not self.opts.dry_run:
                self.cluster.delete(kind, name)
            pruned.append(f"{kind}/{name}")
            self.report(f"  pruned {kind}/{name}")
        return pruned


def _declared(manifests: Manifests) -> set[tuple[str, str]]:
    keep = {(obj["kind"], obj["metadata"]["name"]) for obj in manifests.objects()}
    for sm in manifests.services.values():
        if sm.strategy == UpdateStrategy.BLUE_GREEN and not sm.is_job:
            keep |= {("Deployment", f"{sm.name}-{color}") for color in COLORS}
        if sm.strategy == UpdateStrategy.CANARY:
            keep.add(("Deployment", f"{sm.name}-canary"))
    return keep


def live_objects(cluster: Cluster, stack: str) -> list[tuple[str, str]]:
    return [(kind, item["metadata"]["name"]) for kind in MANAGED_KINDS
            for item in cluster.list(kind, o.stack_selector(stack))]


# -- diff --------------------------------------------------------------------------------


def _project(live: Any, want: Any) -> Any:
    """`live` cut down to the shape of `want`: fields the server adds are not changes."""
    if isinstance(want, dict) and isinstance(live, dict):
        return {k: _project(live[k], v) for k, v in want.items() if k in live}
    if isinstance(want, list) and isinstance(live, list) and len(want) == len(live):
        return [_project(a, b) for a, b in zip(live, want, strict=True)]
    return live


def _masked(secret: Any, other: Any) -> Any:
    """A Secret with its values replaced by "(hidden)", or "(hidden, changed)" where
    `other` (the live object; None for the live side itself) has another value for the
    key: safe to print, and a changed value still shows as a changed line."""
    if not isinstance(secret, dict):
        return secret
    out = dict(secret)
    for part in ("data", "stringData"):
        values = secret.get(part)
        if isinstance(values, dict):
            theirs = (other or {}).get(part) or {}
            out[part] = {key: "(hidden)" if other is None or theirs.get(key) == value
                          else "(hidden, changed)" for key, value in values.items()}
    return out


def diff(cluster: Cluster, stack: Stack, planned: Planned) -> list[str]:
    """Lines: `+ Kind/name` new, `~ Kind/name` and a unified diff, `- Kind/name` pruned."""
    cluster.version()
    lines: list[str] = []
    for obj in planned.manifests.objects():
        ref = f"{obj['kind']}/{obj['metadata']['name']}"
        live = cluster.get(obj["kind"], obj["metadata"]["name"])
        if live is None:
            lines.append(f"+ {ref}")
            continue
        projected = _project(live, obj)
        if obj["kind"] == "Secret":  # a diff shows which keys changed, never a value
            projected, obj = _masked(projected, None), _masked(obj, projected)
        old = yaml.safe_dump(projected, sort_keys=True).splitlines()
        new = yaml.safe_dump(obj, sort_keys=True).splitlines()
        if old != new:
            lines.append(f"~ {ref}")
            lines += [f"    {line}" for line in difflib.unified_diff(
                old, new, "live", "stack", n=2, lineterm="")][2:]
    keep = _declared(planned.manifests)
    for kind, name in live_objects(cluster, stack.name):
        if (kind, name) not in keep:
            lines.append(f"- {kind}/{name} (not in the stack: `apply --prune` deletes it)")
    return lines


# -- day 2 -------------------------------------------------------------------------------


def workload_name(cluster: Cluster, stack: Stack, service: str) -> str:
    """The Deployment that runs `service` now: `<name>`, or the active colour's."""
    if service not in stack.services:
        raise NotFoundError(f"no service {service} in stack {stack.name}")
    name = o.k8s_name(service)
    if stack.services[service].update.strategy == UpdateStrategy.BLUE_GREEN:
        live_svc = cluster.get("Service", name)
        color = (live_svc or {}).get("spec", {}).get("selector", {}).get(o.LABEL_COLOR)
        candidates = [f"{name}-{color}"] if color else [f"{name}-{c}" for c in COLORS]
    else:
        candidates = [name]
    for candidate in candidates:
        if cluster.get("Deployment", candidate) is not None:
            return candidate
    raise NotFoundError(f"service {service} has no Deployment in namespace "
                        f"{cluster.namespace}", hint="apply the stack first")


def rollback_deployment(cluster: Cluster, name: str, to: int | None) -> int:
    dep = cluster.get("Deployment", name)
    if dep is None:
        raise NotFoundError(f"no Deployment {name} in namespace {cluster.namespace}")
    match = dep["spec"]["selector"]["matchLabels"]
    selector = ",".join(f"{k}={v}" for k, v in sorted(match.items()))
    owned = [rs for rs in cluster.list("ReplicaSet", selector)
             if any(ref.get("kind") == "Deployment" and ref.get("name") == name
                    for ref in rs.get("metadata", {}).get("ownerReferences") or [])]
    rev, template = rollback_template(owned, revision(dep), to)
    cluster.replace_template(name, template)
    return rev


def status(cluster: Cluster, stack: Stack) -> list[dict[str, Any]]:
    """One row per workload of the stack in the cluster."""
    cluster.version()
    rows = []
    for kind in ("Deployment", "Job"):
        for obj in cluster.list(kind, o.stack_selector(stack.name)):
            meta = obj.get("metadata", {})
            state = progress(obj)
            containers = obj.get("spec", {}).get("template", {}).get("spec", {}) \
                .get("containers") or [{}]
            st = obj.get("status") or {}
            rows.append({
                "service": meta.get("annotations", {}).get(o.ANNOTATION_SERVICE, "?"),
                "kind": kind, "name": meta.get("name"),
                "desired": state.desired, "ready": int(st.get("readyReplicas") or 0)
                if kind == "Deployment" else state.ready,
                "updated": int(st.get("updatedReplicas") or 0),
                "available": int(st.get("availableReplicas") or 0),
                "revision": revision(obj), "image": containers[0].get("image"),
                "state": state.state, "message": state.message,
            })
    return sorted(rows, key=lambda r: (r["service"], r["name"]))


def scale(cluster: Cluster, stack: Stack, service: str, replicas: int,
          report: Report) -> str:
    cluster.version()
    name = workload_name(cluster, stack, service)
    if cluster.get("HorizontalPodAutoscaler", o.k8s_name(service)) is not None:
        report(f"warning: {service} has a HorizontalPodAutoscaler, which may change the "
               "count again")
    cluster.scale(name, replicas)
    return name


def delete(cluster: Cluster, stack: Stack, *, keep_data: bool, report: Report) -> list[str]:
    cluster.version()
    deleted = []
    for kind, name in live_objects(cluster, stack.name):
        if keep_data and kind == "PersistentVolumeClaim":
            continue
        if cluster.delete(kind, name):
            deleted.append(f"{kind}/{name}")
            report(f"deleted {kind}/{name}")
    return deleted

