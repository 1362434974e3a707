"""Blue-green and canary rollouts: two revisions side by side behind the service's router.

Blue-green starts the full new set beside the old one (which alone takes traffic), checks
it (readiness, `verify`, and after the swap an optional analysis window), swaps the router
to it in one step, and keeps the old set running, out of the router, for `keep_previous`:
a rollback in that time finds the old spec still running and is a swap back.

Canary sends a growing share of new connections to the new revision, step by step, and
judges each step on the router's own figures for both revisions (plan/rollout.py); a step
that fails sends every connection back to the stable revision and removes the canary.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import TYPE_CHECKING, Any

from shipyard.engine.rollout import RolloutFailed, template_hashes
from shipyard.health.probes import run_probe
from shipyard.plan.diff import template_hash
from shipyard.plan.rollout import Window, analyse, canary_replicas, window_of
from shipyard.spec.models import Probe
from shipyard.spec.update import Analysis
from shipyard.state.base import Event

if TYPE_CHECKING:
    from shipyard.engine.engine import Engine, StackState
    from shipyard.engine.instance import InstanceSupervisor
    from shipyard.engine.rollout import Rollout


def _names(sups: list[InstanceSupervisor]) -> frozenset[str]:
    return frozenset(s.name for s in sups)


def _serving(ro: Rollout) -> list[InstanceSupervisor]:
    """The old instances that take traffic now (a kept previous set does not)."""
    pin = ro.engine.routers.pins.get((ro.stack.name, ro.service))
    old = ro._old()
    return [s for s in old if s.name in pin] or old if pin is not None else old


async def _nothing_to_replace(ro: Rollout) -> bool:
    """No instance of another spec runs (a rollback to a set still running, or a resumed
    rollout that had finished): make sure the set is complete and serves, and be done."""
    if ro._old():
        return False
    _cancel_retirement(ro.engine, ro.stack.name, ro.service)
    await _wait_available(ro, ro.spec.replicas)
    ro.engine.routers.steer(ro.stack.name, ro.service)
    return True


async def _wait_available(ro: Rollout, count: int) -> None:
    """Start new instances up to `count` and wait until `count` of them are available."""
    ro.deadline = time.monotonic() + ro.policy.progress_deadline
    for _ in range(count - len(ro._new())):
        ro.launch(ro.free_index(), {})
    while len(ro.available(ro._new())) < count:
        ro._check()
        await ro.wait()


async def _wait_promotion(ro: Rollout, phase: str) -> None:
    ro.control.phase = phase
    await ro._event("rollout.paused", f"{phase}: `shipyard promote {ro.service}` goes on, "
                                      f"`shipyard abort {ro.service}` rolls back")
    while not ro.control.promoted.is_set():
        if ro.control.aborted.is_set():
            raise RolloutFailed("aborted by the operator")
        await ro.engine.changed(1.0)


async def _verify(ro: Rollout) -> None:
    verify = ro.policy.verify
    if verify is None:
        return
    ro.control.phase = "verifying"
    new = ro._new()
    for sup in new:
        for path in verify.http:
            probe = Probe(http=path, port=verify.port, timeout=verify.timeout)
            result = await run_probe(probe, sup.record.ports)
            if not result.ok:
                raise RolloutFailed(f"verification of {sup.name} failed: GET {path}: "
                                    f"{result.message}")
    if verify.exec:
        addresses = ",".join(f"127.0.0.1:{next(iter(s.record.ports.values()))}"
                             for s in new if s.record.ports)
        env = dict(os.environ, SHIPYARD_STACK=ro.stack.name, SHIPYARD_SERVICE=ro.service,
                   SHIPYARD_REVISION=str(ro.revision), SHIPYARD_NEW_INSTANCES=addresses)
        probe = Probe(exec=verify.exec, timeout=verify.timeout)
        result = await run_probe(probe, {}, env=env, cwd=ro.stack.base_dir)
        if not result.ok:
            raise RolloutFailed(f"verification command failed: {result.message}")
    await ro._event("rollout.verified", f"{len(new)} new instance(s) passed verification")


def _revision_stats(ro: Rollout) -> dict[str, Any]:
    router = ro.engine.routers.router(ro.stack.name, ro.service)
    if router is None:
        return {}
    return {rev: stats.snapshot() for rev, stats in router.revision_stats().items()}


def _merged(windows: list[Window]) -> Window | None:
    if not windows:
        return None
    buckets: dict[float, int] = {}
    for w in windows:
        for bound, count in w.buckets:
            buckets[bound] = buckets.get(bound, 0) + count
    return Window(sum(w.requests for w in windows), sum(w.errors for w in windows),
                  tuple(sorted(buckets.items())))


async def _analyse(ro: Rollout, hold: float, stable: set[str], what: str) -> None:
    """Judge the new revision's traffic every `interval` for `hold` seconds; raise at the
    first failing verdict. Returns early when promoted."""
    analysis = ro.policy.analysis or Analysis()
    new_rev = str(ro.revision)
    start = _revision_stats(ro)
    began = time.monotonic()
    extended = False
    while True:
        await ro.engine.changed(min(analysis.interval, hold))
        if ro.control.promoted.is_set():
            return
        ro.deadline = time.monotonic() + ro.policy.progress_deadline  # holding is progress
        ro._check()
        now = _revision_stats(ro)
        new = window_of(start.get(new_rev), now.get(new_rev))
        base = _merged([window_of(start.get(r), now.get(r)) for r in stable if r in now])
        verdict = analyse(new, base, max_error_rate=analysis.max_error_rate,
                          max_latency_p99=analysis.max_latency_p99,
                          max_relative=analysis.max_relative,
                          min_requests=analysis.min_requests)
        if verdict.outcome == "fail":
            raise RolloutFailed(f"analysis {what} failed: {verdict.reason}")
        if time.monotonic() - began < hold:
            continue
        if verdict.outcome == "inconclusive" and not extended:
            extended = True
            hold *= 2
            await ro._event("rollout.analysis", f"{what}: {verdict.reason}; window extended")
            continue
        note = "" if verdict.outcome == "pass" else " (inconclusive; passed on readiness)"
        await ro._event("rollout.analysis", f"{what}: {verdict.reason}{note}")
        return


async def _undo(ro: Rollout, serving: frozenset[str]) -> None:
    """Every connection back to the old instances; the new ones drained and removed."""
    routers = ro.engine.routers
    routers.steer(ro.stack.name, ro.service, pin=serving)
    await ro.retire(ro._new(), keep_slots=False)
    routers.steer(ro.stack.name, ro.service)


async def blue_green(ro: Rollout) -> None:
    eng, stack, routers = ro.engine, ro.stack.name, ro.engine.routers
    if await _nothing_to_replace(ro):
        return
    _cancel_retirement(eng, stack, ro.service)
    serving = _names(_serving(ro))
    routers.steer(stack, ro.service, pin=serving)
    ro.control.phase = "starting the new set"
    try:
        await _wait_available(ro, ro.spec.replicas)
        await _verify(ro)
        if ro.policy.promotion == "manual":
            await _wait_promotion(ro, "new set ready, waiting for promotion")
        new = _names(ro._new())
        routers.steer(stack, ro.service, pin=new)  # the swap: one synchronous call
        await ro._event("rollout.swapped",
                        f"traffic swapped to revision {ro.revision} ({len(new)} instances)")
        if ro.policy.analysis is not None:
            ro.control.promoted.clear()
            ro.control.phase = "analysing after the swap"
            await _analyse(ro, ro.policy.analysis.window, set(), "after the swap")
    except (RolloutFailed, asyncio.CancelledError):
        await _undo(ro, serving)
        raise
    previous = ro._old()
    if previous:
        await ro._event("rollout.keeping", f"keeping {len(previous)} previous instance(s) "
                                           f"for {ro.policy.keep_previous:g}s")
        schedule_retirement(eng, ro.state, ro.service, ro.policy.keep_previous)
    else:
        routers.steer(stack, ro.service)


async def canary(ro: Rollout) -> None:
    eng, stack, routers = ro.engine, ro.stack.name, ro.engine.routers
    if await _nothing_to_replace(ro):
        return
    _cancel_retirement(eng, stack, ro.service)
    stable = _serving(ro)
    serving = _names(stable)
    stable_revs = {str(s.record.revision) for s in stable}
    new_rev = str(ro.revision)
    routers.steer(stack, ro.service, pin=serving)
    try:
        for number, step in enumerate(ro.policy.steps, 1):
            if step.weight >= 100 or ro.control.promoted.is_set():
                break
            count = canary_replicas(ro.spec.replicas, step.weight)
            ro.control.phase = f"step {number}: starting {count} canary instance(s)"
            await _wait_available(ro, count)
            share = {rev: max(1, (100 - step.weight) // len(stable_revs))
                     for rev in stable_revs}
            routers.steer(stack, ro.service, pin=serving | _names(ro._new()),
                          weights={**share, new_rev: step.weight} if share else None)
            ro.control.phase = f"step {number}: {step.weight}%"
            await ro._event("rollout.step", f"canary at {step.weight}% of new connections "
                                            f"({count} instance(s))")
            hold = step.pause if step.pause is not None else \
                (ro.policy.analysis or Analysis()).window
            await _analyse(ro, hold, stable_revs, f"at {step.weight}%")
        if ro.policy.promotion == "manual" and not ro.control.promoted.is_set():
            await _wait_promotion(ro, "canary steps passed, waiting for promotion")
        ro.control.phase = "promoting"
        await _wait_available(ro, ro.spec.replicas)
        routers.steer(stack, ro.service, pin=_names(ro._new()))
        await ro._event("rollout.promoted", f"revision {ro.revision} takes all traffic")
    except (RolloutFailed, asyncio.CancelledError) as exc:
        await _undo(ro, serving)
        if isinstance(exc, RolloutFailed):
            await ro._event("rollout.aborted", f"canary removed, all traffic back on the "
                                               f"stable revision: {exc}")
        raise
    await ro.retire(ro._old(), keep_slots=False)
    routers.steer(stack, ro.service)


# -- the previous set of a blue-green rollout -----------------------------------------


def _cancel_retirement(engine: Engine, stack: str, service: str) -> None:
    task = engine.retirements.pop((stack, service), None)
    if task is not None:
        task.cancel()


def schedule_retirement(engine: Engine, state: StackState, service: str,
                         delay: float) -> None:
    key = (state.stack.name, service)
    _cancel_retirement(engine, *key)
    task = asyncio.create_task(_retire_later(engine, state, service, delay),
                               name=f"retire:{service}")
    engine.retirements[key] = task
    task.add_done_callback(lambda t: engine.retirements.pop(key, None)
                           if engine.retirements.get(key) is t else None)


async def _retire_later(engine: Engine, state: StackState, service: str,
                        delay: float) -> None:
    await asyncio.sleep(delay)
    async with state.lock:
        await retire_outdated(engine, state, service)


async def retire_outdated(engine: Engine, state: StackState, service: str) -> None:
    """Stop the instances of `service` whose spec is not the current one (drained first),
    and let the router serve every remaining instance again."""
    spec = state.stack.services.get(service)
    if spec is None:
        return
    target = template_hash(spec)
    hashes = await template_hashes(engine, state.stack.name, service)
    outdated = [s for s in state.instances_of(service)
                if hashes.get(s.record.revision) != target]
    stack = state.stack.name
    if outdated:
        names = [s.name for s in outdated]
        await engine.routers.drain(stack, service, names, spec.stop.timeout)
        await asyncio.gather(*(s.stop() for s in outdated))
        for sup in outdated:
            engine.release_instance(state, sup)
            with contextlib.suppress(Exception):
                await engine.store.delete_instance(stack, sup.name)
        engine.routers.forget(stack, names)
        await engine.record_event(Event("rollout.retired",
                                        f"retired {len(names)} previous instance(s): "
                                        + ", ".join(names), stack=stack, service=service))
    engine.routers.steer(stack, service)
    engine.notify()
