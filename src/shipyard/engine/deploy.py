"""A deploy: carry a checked stack out, service by service, in the order the scheduler
decides (sequential, parallel phases, or hybrid), gating each service on the milestones its
dependents need, within the deploy timeout; roll back on failure when asked to."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from shipyard.engine.instance import TERMINAL, InstanceSupervisor
from shipyard.engine.results import DeployResult
from shipyard.engine.rollout import (
    Rollout,
    RolloutFailed,
    new_instance,
    scale_in_place,
    template_hashes,
)
from shipyard.plan.diff import spec_hash, template_hash
from shipyard.plan.schedule import DeployScheduler, Milestone
from shipyard.spec.models import Condition, Stack
from shipyard.spec.update import UpdateStrategy
from shipyard.state.base import Event, InstanceState, StackRecord

if TYPE_CHECKING:
    from shipyard.engine.engine import Engine, StackState
    from shipyard.engine.preflight import Checked

ALIVE_OK = (InstanceState.RUNNING, InstanceState.READY, InstanceState.COMPLETED)


def service_milestones(sups: list[InstanceSupervisor], replicas: int,
                       min_healthy: int | None = None) -> set[Milestone]:
    """Which milestones a service has reached, from its instances. HEALTHY needs
    `min_healthy` ready replicas (default: all)."""
    if len(sups) < replicas:
        return set()
    if any(s.state is InstanceState.FAILED for s in sups):
        return {Milestone.FAILED}
    reached: set[Milestone] = set()
    if all(s.ever_started or s.state in ALIVE_OK for s in sups):
        reached.add(Milestone.STARTED)
    ready = sum(s.state in (InstanceState.READY, InstanceState.COMPLETED) for s in sups)
    if ready >= min(replicas, min_healthy or replicas):
        reached |= {Milestone.STARTED, Milestone.HEALTHY}
    if all(s.state is InstanceState.COMPLETED for s in sups):
        reached |= {Milestone.STARTED, Milestone.HEALTHY, Milestone.COMPLETED}
    return reached


def _healthy_needs(stack: Stack) -> dict[str, int | None]:
    """How many ready replicas make each service `healthy` for its dependents: the most
    any dependent asks for (None: all replicas)."""
    needs: dict[str, int | None] = {}
    for svc in stack.services.values():
        for dep, edge in svc.depends_on.items():
            want = edge.min_healthy
            if dep not in needs:
                needs[dep] = want
            elif needs[dep] is not None:
                needs[dep] = None if want is None else max(want, needs[dep] or 0)
    return needs


def _settles_on(stack: Stack) -> dict[str, Milestone]:
    """A service that some dependent waits on with `completed` settles when it completes;
    any other once it is healthy."""
    out = {name: Milestone.HEALTHY for name in stack.services}
    for svc in stack.services.values():
        for dep, cond in svc.conditions.items():
            if cond is Condition.COMPLETED:
                out[dep] = Milestone.COMPLETED
    return out


class Deployer:
    def __init__(self, engine: Engine, state: StackState, checked: Checked, *,
                 rollback: bool = True, force: set[str] | None = None) -> None:
        self.rollback = rollback  # False for the deploy that is itself a rollback
        self.force = force or set()  # services (re)deployed even if unchanged
        self.engine = engine
        self.state = state
        self.checked = checked
        self.stack = checked.stack
        # services being rolled out (their milestones count once the rollout is done)
        self.rollouts: dict[str, asyncio.Task[None]] = {}
        self.rolled_back: set[str] = set()

    async def run(self) -> DeployResult:
        async with self.state.lock:
            return await self._run()

    async def _run(self) -> DeployResult:
        eng, stack, state = self.engine, self.stack, self.state
        t0 = time.monotonic()
        changes = {c.service: c for c in self.checked.changes}
        to_deploy = {name for name, c in changes.items() if c.action in ("add", "change")}
        to_deploy |= self.force & set(stack.services)
        # An unchanged service is deployed again when its instances are not all alive, or
        # run an older revision than the recorded one (a deploy interrupted by a crash
        # recorded the new revision but had not replaced them yet).
        current = {r.name: r.revision for r in await eng.store.list_services(stack.name)}
        for name, svc in stack.services.items():
            sups = state.instances_of(name)
            if name not in to_deploy and (
                    len(sups) != svc.replicas
                    or any(s.state in (InstanceState.FAILED, InstanceState.STOPPED)
                           or s.record.revision != current.get(name, s.record.revision)
                           for s in sups)):
                to_deploy.add(name)
        removed = sorted(name for name, c in changes.items() if c.action == "remove")
        result = DeployResult(stack=stack.name, ok=True, duration=0.0,
                              unchanged=sorted(set(stack.services) - to_deploy),
                              removed=removed)

        async with eng.store.transaction():
            await eng.store.put_stack(StackRecord(stack.name, stack_document(stack),
                                                  status="deploying"))
            for name in sorted(to_deploy):
                await eng.store.record_revision(stack.name, name,
                                                stack.services[name].model_dump(mode="json"),
                                                _hash(stack, name))
            for name in removed:
                await eng.store.delete_service(stack.name, name)
            await eng.record_event(Event(
                "deploy.started",
                f"deploying {len(to_deploy)} of {len(stack.services)} services "
                f"({stack.deploy.strategy.value}, max {stack.deploy.max_parallel} at once)",
                stack=stack.name,
                data={"deploy": sorted(to_deploy), "remove": removed}))
        if removed:
            await eng.stop_services(state, removed)
        state.stack, state.graph = stack, self.checked.graph
        await eng.routers.ensure(stack)

        try:
            ok = await self._deploy(to_deploy, result)
        finally:
            for task in self.rollouts.values():
                task.cancel()
            for task in self.rollouts.values():
                with contextlib.suppress(BaseException):
                    await task
        duration = time.monotonic() - t0
        result.duration = duration
        outcome = "deployed" if ok else "failed"
        for name in result.started:
            rev = state.instances_of(name)
            if name in self.rolled_back:  # its outcomes were set by the rollback
                continue
            if rev:
                await eng.store.set_revision_outcome(stack.name, name, rev[0].record.revision,
                                                     outcome)
            await eng.store.prune_revisions(stack.name, name,
                                            stack.deploy.revision_history_limit)
        if ok:
            await eng.store.put_stack(StackRecord(stack.name, stack_document(stack),
                                                  status="applied"))
            await eng.record_event(Event("deploy.finished",
                                         f"deployed in {duration:.2f}s", stack=stack.name,
                                         data={"duration": duration}))
        else:
            result.ok = False
            reasons = "; ".join(f"{k}: {v}" for k, v in sorted(result.failed.items()))
            await eng.record_event(Event("deploy.failed", f"deploy failed: {reasons}",
                                         stack=stack.name, data=result.as_dict()))
            if self.rollback and stack.deploy.rollback_on_failure:
                await self._rollback(result)
            else:
                await eng.store.put_stack(StackRecord(stack.name,
                                                      stack_document(state.stack),
                                                      status="degraded"))
        eng.metrics.deploy_duration.labels(stack.name, "ok" if ok else "failed").observe(
            duration)
        eng.notify()
        return result

    async def _deploy(self, to_deploy: set[str], result: DeployResult) -> bool:
        eng, stack, state = self.engine, self.stack, self.state
        graph = self.checked.graph
        sched = DeployScheduler(graph, stack.deploy.strategy, stack.deploy.max_parallel,
                                settles_on=_settles_on(stack))
        deadline = time.monotonic() + stack.deploy.timeout
        needs = _healthy_needs(stack)
        in_flight: set[str] = set()
        phases = graph.phases()
        phase_done = 0
        while not sched.done:
            for name in sched.next_to_start():
                # Every service goes through the scheduler, so that its dependents are
                # gated on it; an unchanged one is watched, not restarted (after a crash,
                # its adopted instances may still be on their way to ready).
                sched.mark_launched(name)
                in_flight.add(name)
                if name in to_deploy:
                    await self._start_service(name)
                    result.started.append(name)
            for name in sorted(in_flight):
                task = self.rollouts.get(name)
                if task is not None and not task.done():
                    continue
                if task is not None and task.exception() is not None:
                    in_flight.discard(name)
                    result.failed[name] = str(task.exception())
                    skipped = sched.mark_failed(name)
                    for other in sorted(skipped):
                        await self._service_event("service.skipped", other,
                                                  f"not started: {name} failed")
                    continue
                reached = service_milestones(state.instances_of(name),
                                             stack.services[name].replicas, needs.get(name))
                if Milestone.FAILED in reached:
                    in_flight.discard(name)
                    result.failed[name] = self._failure_reason(name)
                    skipped = sched.mark_failed(name)
                    await self._service_event("service.failed", name, result.failed[name])
                    for other in sorted(skipped):
                        await self._service_event("service.skipped", other,
                                                  f"not started: {name} failed")
                    continue
                for milestone in (Milestone.STARTED, Milestone.HEALTHY, Milestone.COMPLETED):
                    if milestone in reached:
                        sched.mark(name, milestone)
                if name in sched.settled:
                    in_flight.discard(name)
                    if name in to_deploy:
                        settled = ", ".join(sorted(m.value for m in reached))
                        await self._service_event("service.ready", name, f"settled: {settled}")
            while phase_done < len(phases) and all(
                    s in sched.settled for s in phases[phase_done]):
                phase_done += 1
                await eng.record_event(Event(
                    "deploy.phase", f"phase {phase_done}/{len(phases)} done: "
                    + ", ".join(phases[phase_done - 1]), stack=stack.name))
            if sched.done:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for name in sorted(in_flight):
                    result.failed[name] = (f"not ready within the deploy timeout "
                                           f"({stack.deploy.timeout:g}s)")
                    sched.mark_failed(name)
                    await self._service_event("service.failed", name, result.failed[name])
                break
            if not sched.next_to_start():
                await eng.changed(min(remaining, 1.0))
        result.skipped = sorted(sched.skipped)
        if not result.failed:
            await self._wait_all_ready(result, deadline)
        return not result.failed

    async def _wait_all_ready(self, result: DeployResult, deadline: float) -> None:
        """Dependents may have started on part of a service's replicas (`min_healthy`); the
        deploy itself is done only when every replica is ready or completed."""
        stack, state = self.stack, self.state
        while True:
            pending = [name for name in stack.services
                       if Milestone.HEALTHY not in service_milestones(
                           state.instances_of(name), stack.services[name].replicas)]
            failed = [n for n in pending if Milestone.FAILED in service_milestones(
                state.instances_of(n), stack.services[n].replicas)]
            for name in failed:
                result.failed[name] = self._failure_reason(name)
                await self._service_event("service.failed", name, result.failed[name])
            if failed or not pending:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                for name in pending:
                    result.failed[name] = (f"not all replicas ready within the deploy timeout "
                                           f"({stack.deploy.timeout:g}s)")
                    await self._service_event("service.failed", name, result.failed[name])
                return
            await self.engine.changed(min(remaining, 1.0))

    async def _start_service(self, name: str) -> None:
        """Bring `name` to the stack's current revision: by its update strategy when
        instances of another spec are running; by adding or removing instances when only
        their count changed; else by (re)creating its instances. Names and auto ports are
        kept so dependents keep their address."""
        eng, stack, state = self.engine, self.stack, self.state
        svc = stack.services[name]
        hashes = await template_hashes(eng, stack.name, name)
        revision = next((r.revision for r in await eng.store.list_services(stack.name)
                         if r.name == name), 1)
        target = template_hash(svc)
        current = state.instances_of(name)
        outdated = [s for s in current if s.state not in TERMINAL
                    and hashes.get(s.record.revision) != target]
        if outdated and svc.update.strategy is not UpdateStrategy.RECREATE:
            control = eng.rollout_control(stack.name, name, create=True)
            task = asyncio.create_task(self._rollout(name, revision, control),
                                       name=f"rollout:{name}")
            task.add_done_callback(lambda _: eng.notify())  # wake the deploy loop
            self.rollouts[name] = task
            return
        if current and not outdated and name not in self.force \
                and not any(s.state in (InstanceState.FAILED, InstanceState.STOPPED)
                            for s in current):
            added, removed = await scale_in_place(eng, state, stack, name, revision)
            if added or removed:
                await self._service_event(
                    "service.scaled", name, f"scaled to {svc.replicas} instance(s): "
                    f"{added} added, {removed} removed, the others kept")
            return
        old = {s.record.index: s for s in state.instances_of(name)}
        await eng.stop_services(state, [name])
        await self._service_event("service.deploying", name,
                                  f"starting {svc.replicas} instance(s) at revision {revision}")
        for index in range(1, svc.replicas + 1):
            previous = old[index].record.ports if index in old else {}
            sup = new_instance(eng, state, stack, name, index, revision, previous)
            await eng.store.put_instance(sup.record)
            sup.start()
        eng.notify()

    async def _rollout(self, name: str, revision: int, control: Any) -> None:
        """Roll `name` out; when that fails and `auto_rollback` says so, roll the service
        back to the spec its old instances ran, then fail with both reasons."""
        eng, stack = self.engine, self.stack
        old_revisions = sorted({s.record.revision for s in self.state.instances_of(name)
                                if s.record.revision != revision})
        try:
            await Rollout(eng, self.state, stack, name, revision, control).run()
            return
        except RolloutFailed as exc:
            reason = str(exc)
        finally:
            eng.rollout_control(stack.name, name, drop=True)
        await eng.store.set_revision_outcome(stack.name, name, revision, "failed")
        await self._service_event("rollout.failed", name, f"revision {revision}: {reason}")
        previous = None
        for rev in reversed(old_revisions):
            previous = await eng.store.get_revision(stack.name, name, rev)
            if previous is not None:
                break
        if not stack.services[name].update.auto_rollback or previous is None:
            raise RolloutFailed(reason)
        from shipyard.spec.models import Service

        services = dict(stack.services)
        services[name] = Service.model_validate(previous.spec)
        back = stack.model_copy(update={"services": services})
        record = await eng.store.record_revision(stack.name, name, previous.spec,
                                                 previous.spec_hash)
        await self._service_event("rollout.rollback",
                                  name, f"rolling back to the spec of revision "
                                        f"{previous.revision} (as revision {record.revision})")
        self.rolled_back.add(name)
        try:
            await Rollout(eng, self.state, back, name, record.revision,
                          eng.rollout_control(stack.name, name, create=True)).run()
        except RolloutFailed as exc:
            await eng.store.set_revision_outcome(stack.name, name, record.revision, "failed")
            raise RolloutFailed(f"{reason}; the rollback failed too: {exc}") from None
        finally:
            eng.rollout_control(stack.name, name, drop=True)
        await eng.store.set_revision_outcome(stack.name, name, record.revision, "rolled-back")
        # the stack as it runs now: this service back at its old spec
        services = dict(self.state.stack.services)
        services[name] = back.services[name]
        self.state.stack = self.state.stack.model_copy(update={"services": services})
        raise RolloutFailed(f"{reason}; rolled back to the spec of revision "
                            f"{previous.revision}")

    def _failure_reason(self, name: str) -> str:
        for sup in self.state.instances_of(name):
            if sup.state is InstanceState.FAILED:
                return f"{sup.name}: {sup.record.message}"
        return "failed"

    async def _rollback(self, result: DeployResult) -> None:
        """Undo a failed deploy: back to the stack as it was applied before, or, for a
        first deploy, stop everything it started and forget the stack."""
        eng, stack, state = self.engine, self.stack, self.state
        previous = self.checked.previous
        result.rolled_back = True
        if previous is None:
            await eng.record_event(Event("deploy.rollback",
                                         "rolling back: stopping what this deploy started",
                                         stack=stack.name))
            await eng.stop_services(state, list(state.graph.services))
            await eng.routers.close(stack.name)
            await eng.store.delete_stack(stack.name)
            eng.stacks_state.pop(stack.name, None)
            await eng.record_event(Event("deploy.rolled-back",
                                         "rolled back: nothing of the stack runs",
                                         stack=stack.name))
            return
        await eng.record_event(Event("deploy.rollback",
                                     "rolling back to the previously applied stack",
                                     stack=stack.name))
        from shipyard.engine.preflight import preflight

        sub = await Deployer(eng, state, await preflight(eng, previous), rollback=False)._run()
        await eng.record_event(Event(
            "deploy.rolled-back" if sub.ok else "deploy.rollback-failed",
            "rolled back to the previous stack" if sub.ok
            else f"rollback failed: {sub.failed}", stack=stack.name))

    async def _service_event(self, kind: str, service: str, message: str) -> None:
        await self.engine.record_event(Event(kind, message, stack=self.stack.name,
                                             service=service))


def stack_document(stack: Stack) -> dict[str, Any]:
    """The stack as stored and sent over the API (with where it came from)."""
    return stack.model_dump(mode="json") | {"source": stack.source, "base_dir": stack.base_dir}


def _hash(stack: Stack, name: str) -> str:
    return spec_hash(stack.services[name])
