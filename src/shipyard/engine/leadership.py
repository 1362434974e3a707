"""Highly available control planes: several servers on one etcd, one of them acting.

`Leadership(config)` runs one server's engine under the leader election of its etcd
namespace (state/election.py):

* It starts the engine as a *standby* (`Engine(config, standby=True)`): the store is
  open for reads, nothing is recovered, adopted, supervised, autoscaled or run.
* On winning the election it fences the store with the new term (every write compares
  the leader key's create revision, etcd_tx.Fence) and activates the engine: the normal
  start path, whose `_recover()` re-adopts the instances that still run (by pid and
  start time: same machine) and resumes the operations left running.
* When the term ends (lease expired or revoked, a write refused by the fence) it stops
  acting at once: the engine is closed (operations cancelled, supervisors detached,
  processes left running, routers closed) and replaced by a fresh standby engine, which
  campaigns again. The runtime is guarded too (`GuardedRuntime`): a former leader that
  was paused past its lease can neither start nor signal an instance, even before its
  first refused write tells it.
* `close()` on a clean shutdown closes the engine first (it still leads while it detaches)
  and then resigns, so a standby takes over at once instead of after the TTL.

The runtime object lives as long as the server (engines come and go around it): the
children a former leader started stay known to it, and it reaps them when they exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shipyard.errors import InputError, NotFoundError
from shipyard.runtime.base import Handle, LaunchSpec, Runtime
from shipyard.state.base import Event, InstanceRecord, StateStore
from shipyard.state.election import Election, LeaderInfo, NotLeader, default_member
from shipyard.state.etcd_conn import Connection

if TYPE_CHECKING:
    from shipyard.engine.config import EngineConfig
    from shipyard.engine.engine import Engine

log = logging.getLogger("shipyard.leadership")

CLOSE_TIMEOUT = 20.0  # seconds a former leader's engine gets to stop acting


async def stored_instances(store: StateStore, stack: str | None,
                           service: str | None) -> list[InstanceRecord]:
    """The instances as the store has them (what a standby shows): the leader records
    every change of state, so these are at most one write behind its memory."""
    if stack is not None and await store.get_stack(stack) is None:
        names = sorted(r.name for r in await store.list_stacks())
        raise NotFoundError(f"no stack named {stack}",
                            hint=f"known: {', '.join(names) or 'none'}")
    return await store.list_instances(stack=stack, service=service)


class GuardedRuntime(Runtime):
    """The runtime as an engine of a `Leadership` sees it: what acts on instances (start,
    stop, signals, emptying cgroups) is refused unless this control plane leads now;
    waiting, adopting and reading pass through. `close()` leaves the runtime open: the
    `Leadership` closes it when the server ends."""

    def __init__(self, inner: Runtime, leads: Callable[[], bool]) -> None:
        self.inner = inner
        self.name = inner.name
        self._leads = leads

    def _check(self, what: str) -> None:
        if not self._leads():
            raise NotLeader(f"refused to {what}: this control plane does not lead")

    async def start(self, spec: LaunchSpec) -> Handle:
        self._check(f"start {spec.instance}")
        return await self.inner.start(spec)

    async def wait(self, handle: Handle) -> int | None:
        return await self.inner.wait(handle)

    async def stop(self, handle: Handle, signal_name: str, timeout: float) -> None:
        self._check(f"stop {handle.instance}")
        await self.inner.stop(handle, signal_name, timeout)

    def adopt(self, handle: Handle) -> bool:
        return self.inner.adopt(handle)

    def exit_reason(self, handle: Handle) -> str | None:
        return self.inner.exit_reason(handle)

    async def kill_cgroup(self, path: str) -> None:
        self._check(f"empty the cgroup {path}")
        await self.inner.kill_cgroup(path)

    async def send_signal(self, handle: Handle, signal_name: str) -> None:
        self._check(f"send {signal_name} to {handle.instance}")
        await self.inner.send_signal(handle, signal_name)

    async def close(self) -> None:
        return None

    def __getattr__(self, name: str) -> Any:  # what else the engine asks (warning, ...)
        return getattr(self.inner, name)


class Leadership:
    """One server's engine under the election (see the module docs). `engine` is the
    current one; `on_engine` is told when a former leader's engine is replaced."""

    def __init__(self, config: EngineConfig, *, ttl: int = 5, member: str | None = None,
                 address: str | None = None) -> None:
        self.config = config
        self.ttl = ttl
        self.member = member or default_member()
        self.address = address or str(config.socket_path)
        self.on_engine: Callable[[Engine], None] | None = None
        self.ready = asyncio.Event()  # set while this one leads and its engine acts
        self.terms = 0  # terms won by this server
        self._engine: Engine | None = None
        self._runtime: Runtime | None = None
        self._election: Election | None = None
        self._conn: Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._settled = asyncio.Event()  # a take-over was tried (it may have failed)
        self._nodes: asyncio.Task[None] | None = None  # the leader's node scheduler
        self._nodes_stop = asyncio.Event()

    @property
    def engine(self) -> Engine:
        assert self._engine is not None, "Leadership.start() first"
        return self._engine

    @property
    def election(self) -> Election:
        assert self._election is not None, "Leadership.start() first"
        return self._election

    @property
    def leading(self) -> bool:
        return self._election is not None and self._election.is_leader

    @property
    def leader(self) -> LeaderInfo | None:
        return self._election.leader if self._election is not None else None

    def role(self) -> str:
        if self.ready.is_set() and self.leading:
            return "leader"
        return "taking-over" if self.leading else "standby"

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> Engine:
        """Open a standby engine and campaign once: when nobody leads, this one leads (and
        acts) before this returns; otherwise it campaigns in the background."""
        from shipyard.engine.engine import Engine
        from shipyard.state.etcd import EtcdStore

        engine = Engine(self.config, standby=True)
        store = engine.store
        if not isinstance(store, EtcdStore):
            raise InputError(f"high availability needs an etcd store, not {store!r}",
                             hint="run the servers with --store etcd://host:2379,...")
        self._runtime = engine.runtime
        engine.runtime = GuardedRuntime(self._runtime, lambda: self.leading)
        await engine.start()
        self._engine = engine
        self._conn = Connection(store.endpoints, timeout=store._conn.timeout)
        await self._conn.open()
        self._election = Election(self._conn, store.keys, self.member, self.address,
                                  ttl=self.ttl)
        won, _ = await self._election.campaign_once()
        self._task = asyncio.create_task(self._run(), name="leadership")
        if won:  # act before serving: the first server up answers writes itself
            await self._settled.wait()
        return engine

    async def close(self) -> None:
        """Stop acting, then resign so that a standby takes over at once."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.ready.clear()
        await self._stop_nodes()
        if self._engine is not None:
            await self._close_engine(self._engine)
        if self._election is not None:
            await self._election.resign()
        if self._conn is not None:
            await self._conn.close()
        if self._runtime is not None:
            await self._runtime.close()

    # -- the loop -------------------------------------------------------------------------
    async def _run(self) -> None:
        election = self.election
        failures = 0  # take-overs that failed in a row
        while True:
            if election.term <= 0:
                await election.campaign()
            holding = asyncio.create_task(election.hold(), name="lease")
            try:
                took = await self._take_over()  # while the lease is renewed
                self._settled.set()
                await asyncio.shield(holding)
            finally:
                if not holding.done():
                    holding.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await holding
            await self._step_down()
            failures = 0 if took else failures + 1
            if failures:  # e.g. a paused former leader still holds a router's port
                await asyncio.sleep(min(0.25 * 2 ** failures, self.ttl))

    async def _take_over(self) -> bool:
        """Fence the store with the new term and start acting; False if that failed."""
        election, engine = self.election, self.engine
        self.terms += 1
        store: Any = engine.store
        store.set_fence(election.fence())
        try:
            await engine.activate()
            await engine.record_event(Event(
                "control.leader", f"{self.member} leads (term {election.term}); "
                f"{sum(len(s.supervisors) for s in engine.stacks_state.values())} instances "
                "recovered", data={"member": self.member, "term": election.term,
                                   "address": self.address}))
        except Exception as exc:  # lost the term meanwhile, or etcd failed: start over
            log.warning("%s: taking over failed: %s", self.member, exc)
            election.lose()
            return False
        self.ready.set()
        log.info("%s: leading, engine active", self.member)
        self._start_nodes()
        return True

    def _start_nodes(self) -> None:
        """The leader also schedules onto the registered nodes (agent/scheduler.py): a lost
        node's instances are placed elsewhere without anyone watching `place --follow`.
        Its writes go through the fenced store: a former leader places nothing."""
        from shipyard.agent.scheduler import NodeScheduler

        async def schedule() -> None:
            scheduler = NodeScheduler(self.engine.store)  # type: ignore[arg-type]
            await scheduler.open()
            try:
                await scheduler.run(self._nodes_stop)
            finally:
                await scheduler.close()

        self._nodes_stop = asyncio.Event()
        self._nodes = asyncio.create_task(schedule(), name="node-scheduler")

    async def _stop_nodes(self) -> None:
        task, self._nodes = self._nodes, None
        if task is None:
            return
        self._nodes_stop.set()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await task
        except (Exception, asyncio.CancelledError) as exc:  # etcd away, or fenced
            task.cancel()
            log.info("%s: node scheduler stopped: %r", self.member, exc)

    async def _step_down(self) -> None:
        """Stop acting at once; go on as a standby with a fresh engine."""
        from shipyard.engine.engine import Engine

        self.ready.clear()
        await self._stop_nodes()
        old = self.engine
        if not old.standby:
            log.warning("%s: no longer the leader; stopping to act", self.member)
        await self._close_engine(old)
        # Requests waiting here for an operation's end would wait forever: the operation
        # stays in the store, where the next leader resumes (or fails) it.
        for waiter in list(getattr(old.ops, "_done", {}).values()):
            if not waiter.done():
                waiter.set_exception(NotLeader(
                    f"{self.member} stopped leading while the operation ran; the next "
                    "leader resumes it", hint="see `shipyard operations` for its outcome"))
        assert self._runtime is not None
        while True:
            new = Engine(self.config, standby=True,
                         runtime=GuardedRuntime(self._runtime, lambda: self.leading))
            try:
                await new.start()
                break
            except Exception as exc:
                log.warning("%s: opening the store again failed: %s", self.member, exc)
                with contextlib.suppress(Exception):
                    await new.close()
                await asyncio.sleep(min(1.0, self.ttl / 3))
        self._engine = new
        if self.on_engine is not None:
            self.on_engine(new)

    async def _close_engine(self, engine: Engine) -> None:
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await engine.close()
        except Exception as exc:  # a fenced store refuses what close() still writes
            log.info("%s: closing the engine: %s", self.member, exc)

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until this server leads and acts; False after `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self.ready.wait()
        except TimeoutError:
            return False
        return True

    def status(self) -> dict[str, Any]:
        """What `GET /v1/leader` and `/healthz` say."""
        leader = self.leader
        return {"role": self.role(), "member": self.member, "address": self.address,
                "lease_ttl": self.ttl, "term": self.election.term if self._election else 0,
                "leader": leader.as_dict() if leader is not None else None}
