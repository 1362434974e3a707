"""The autoscaler: every `interval`, for each service with an `autoscale:` policy, sample
its metrics, ask the plan layer for a count (plan/autoscale.py), and when the count
changes, queue a `scale` operation that starts instances (they join the router once ready)
or drains and stops them. Every change of count is an event that says why, with its
inputs; the latest decision of every service is kept for `shipyard top`.

`shipyard scale SERVICE N` suspends autoscaling of that service until `shipyard autoscale
SERVICE --resume`; both are operations, so a restarted control plane knows from the
operation log which services are suspended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from shipyard.engine.sampling import Sampler, ServiceFigures
from shipyard.plan.autoscale import Decision, PastRecommendation, decide, prune_history
from shipyard.spec.models import Stack
from shipyard.state.base import Event, OperationRecord, OpState

if TYPE_CHECKING:
    from shipyard.engine.engine import Engine, StackState

log = logging.getLogger(__name__)
Key = tuple[str, str]


class Autoscaler:
    def __init__(self, engine: Engine, *, prometheus_url: str | None = None,
                 tick: float = 0.5) -> None:
        self.engine = engine
        self.sampler = Sampler(engine, prometheus_url or os.environ.get(
            "SHIPYARD_PROMETHEUS_URL"))
        self.tick = tick
        self.history: dict[Key, list[PastRecommendation]] = {}
        self.last_run: dict[Key, float] = {}
        self.suspended: set[Key] = set()
        self.decisions: dict[Key, Decision] = {}
        self.figures: dict[Key, ServiceFigures] = {}
        self.sample_seconds = 0.0  # time spent sampling, for the cost benchmark
        self._pending: dict[Key, int] = {}  # scale operations queued, not yet done

    # -- lifecycle -----------------------------------------------------------------------
    async def load(self) -> None:
        """Which services a manual `scale` suspended, from the operation log."""
        latest: dict[Key, str] = {}
        for op in await self.engine.store.list_operations():
            if op.service is None or op.state is not OpState.SUCCEEDED:
                continue
            if op.kind == "scale" and op.payload.get("manual"):
                latest[(op.stack, op.service)] = "suspend"
            elif op.kind == "autoscale-resume":
                latest[(op.stack, op.service)] = "resume"
        self.suspended = {key for key, what in latest.items() if what == "suspend"}

    async def run(self) -> None:
        while True:
            await self._until_due()
            try:
                await self.pass_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad sample stop autoscaling for good
                log.exception("autoscaler pass failed")

    async def close(self) -> None:
        await self.sampler.close()

    async def _until_due(self) -> None:
        """Sleep until the next service is due for a sample (at least `tick`); with no
        autoscaled service at all, until the stacks change (an idle control plane should
        not wake twice a second for nothing)."""
        now = time.monotonic()
        due = [self.last_run.get((state.stack.name, name), -1e9) + svc.autoscale.interval
               for state in list(self.engine.stacks_state.values())
               for name, svc in state.stack.services.items() if svc.autoscale is not None]
        if not due:
            await self.engine.changed(30.0)
            return
        await asyncio.sleep(max(self.tick, min(due) - now))

    # -- one pass ------------------------------------------------------------------------
    async def pass_once(self, *, force: bool = False) -> None:
        now = time.monotonic()
        alive: set[int] = set()
        for state in list(self.engine.stacks_state.values()):
            for sup in state.supervisors.values():
                if sup.record.pid is not None:
                    alive.add(sup.record.pid)
            for service, svc in state.stack.services.items():
                policy = svc.autoscale
                key = (state.stack.name, service)
                if policy is None:
                    continue
                if not force and now - self.last_run.get(key, -1e9) < policy.interval:
                    continue
                self.last_run[key] = now
                await self.evaluate(state, service)
        self.sampler.forget_gone(alive)

    async def evaluate(self, state: StackState, service: str) -> Decision | None:
        """Sample, decide and (unless suspended, busy or unchanged) act, for one service."""
        svc = state.stack.services[service]
        policy = svc.autoscale
        if policy is None:
            return None
        key = (state.stack.name, service)
        started = time.perf_counter()
        figures = await self.sampler.sample(state, service, policy)
        samples = self.sampler.samples(figures, policy, svc.resources.memory)
        self.sample_seconds += time.perf_counter() - started
        self.figures[key] = figures
        current = svc.replicas
        now = time.monotonic()
        history = prune_history(policy, self.history.get(key, []), now)
        decision = decide(policy, current, samples, history, now)
        if decision.recommendation is not None:
            history.append(PastRecommendation(now, decision.recommendation))
        self.history[key] = history
        self.decisions[key] = decision
        if key in self.suspended or decision.desired == current or key in self._pending \
                or state.lock.locked():
            return decision
        await self.engine.record_event(Event(
            "autoscale.decision", f"{decision.reason} ({current} → {decision.desired})",
            stack=key[0], service=service,
            data={"from": current, "to": decision.desired,
                  "inputs": [asdict(i) for i in decision.inputs]}))
        self._pending[key] = decision.desired
        task = asyncio.create_task(self._scale(key, decision.desired, decision.reason))
        task.add_done_callback(lambda _: self._pending.pop(key, None))
        return decision

    async def _scale(self, key: Key, replicas: int, reason: str) -> None:
        with contextlib.suppress(Exception):  # the operation records its own failure
            await self.engine.ops.wait((await self.engine.ops.submit(OperationRecord(
                "scale", key[0], service=key[1], priority=1,
                payload={"replicas": replicas, "manual": False, "reason": reason}))).id or 0)

    # -- what `up` and `top` see ---------------------------------------------------------
    def override(self, stack: Stack) -> Stack:
        """The stack `up` applies: an autoscaled service keeps the count it runs at now
        (within the policy's bounds, unless a manual `scale` suspended autoscaling), so
        that applying the file does not undo the autoscaler."""
        state = self.engine.stacks_state.get(stack.name)
        services = dict(stack.services)
        changed = False
        for name, svc in stack.services.items():
            policy = svc.autoscale
            if policy is None:
                continue
            running = state.stack.services.get(name) if state is not None else None
            count = running.replicas if running is not None else svc.replicas
            if (stack.name, name) not in self.suspended:
                count = min(max(count, policy.min), policy.max)
            if count != svc.replicas:
                services[name] = svc.model_copy(update={"replicas": count})
                changed = True
        return stack.model_copy(update={"services": services}) if changed else stack

    def view(self, stack: str) -> dict[str, Any]:
        """Per service: the latest figures, per instance and from the router, and the
        latest decision with its reason."""
        state = self.engine.stacks_state.get(stack)
        if state is None:
            return {}
        out: dict[str, Any] = {}
        for service, svc in state.stack.services.items():
            key = (stack, service)
            figures = self.figures.get(key)
            decision = self.decisions.get(key)
            out[service] = {
                "replicas": svc.replicas,
                "autoscale": None if svc.autoscale is None else {
                    "min": svc.autoscale.min, "max": svc.autoscale.max,
                    "suspended": key in self.suspended,
                    "decision": None if decision is None else {
                        "desired": decision.desired, "reason": decision.reason}},
                "router": figures.router if figures else {},
                "external": figures.external if figures else {},
                "errors": figures.errors if figures else {},
                "instances": [asdict(u) for u in figures.instances] if figures else [],
            }
        return out

    async def sample_all(self, stack: str) -> None:
        """Fresh figures for every service of `stack` (what `top` shows), autoscaled or
        not; decisions are left to the loop."""
        state = self.engine.stacks_state.get(stack)
        if state is None:
            return
        for service, svc in state.stack.services.items():
            self.figures[(stack, service)] = await self.sampler.sample(state, service,
                                                                       svc.autoscale)
