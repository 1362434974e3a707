"""The control plane's side of nodes: which nodes live, and which node runs each instance.

`NodeScheduler(store)` works on an open EtcdStore (its cluster namespace is the store's):

* `nodes()` — every registered node: its record, whether its heartbeat lives, the
  instances assigned to it.
* `place_stack(stack)` — records the stack (status `placed`: the engine's recovery leaves
  such stacks to the agents) and its services' revisions, then `converge(stack)`.
* `converge(stack)` — the level-triggered step, idempotent: assignments that are still
  valid (node ready and alive, current spec) stay where they are; the others are
  removed; instances without a valid assignment are placed with `plan.placement.place`
  (pure) on the ready nodes, around everything already assigned (all stacks), and
  written, one transaction per instance: the assignment, the instance record (`pending`,
  `runtime.node`) and an `instance.placed` event, conditioned on the instance record
  being unchanged since it was read (two schedulers never place one instance twice).
  Auto ports are handed out from the stack's port range, unique across the cluster
  (nodes may share a host, as in the tests).
* `check_nodes()` — marks `lost` (event `node.lost`) every `ready` node whose heartbeat
  is gone, with a compare-and-swap on its record: several schedulers may watch, one
  records it.
* `run(stop)` — the loop: `check_nodes()` and `converge()` of every placed stack at
  start, then again whenever a heartbeat or node record changes (etcd watches), and
  every `interval` seconds anyway.
* `wait_running(stack, timeout)` — until every instance of the stack is running on the
  node it is assigned to (as the agents record it).
* `remove_stack(name)` — takes a placed stack off the nodes (`shipyard place --remove`).

How the engine should drive it (not wired yet, docs/nodes.md): a leader whose store is
etcd and which has registered nodes runs `run()` as one more task next to its
reconcile loop (its fenced store then fences these writes too: a former leader cannot
place anything), and its apply path calls `place_stack()` then `wait_running()` instead
of starting local supervisors, with the deploy ordering, health gates and rollouts on
top, as for local instances.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from shipyard.agent.records import (
    LOST,
    READY,
    Assignment,
    NodeKeys,
    NodeRecord,
    store_connection,
)
from shipyard.errors import NotFoundError, ShipyardError, StoreError
from shipyard.plan.diff import spec_hash
from shipyard.plan.placement import NodeInfo, Placed, Request, place
from shipyard.spec.models import Stack
from shipyard.state import etcd_keys as k
from shipyard.state.base import Event, InstanceRecord, InstanceState, StackRecord
from shipyard.state.etcd import EtcdStore

log = logging.getLogger("shipyard.scheduler")
PLACED = "placed"  # StackRecord.status of a stack run by agents
_DELETE = 1


@dataclass
class NodeView:
    record: NodeRecord
    alive: bool  # its heartbeat key exists
    mod_revision: int
    instances: list[str] = field(default_factory=list)  # "stack/instance"

    @property
    def ready(self) -> bool:
        return self.alive and self.record.state == READY


@dataclass
class PlaceReport:
    stack: str
    placed: dict[str, str] = field(default_factory=dict)  # newly placed: instance → node
    kept: dict[str, str] = field(default_factory=dict)  # already there
    unplaced: dict[str, str] = field(default_factory=dict)  # instance → why

    @property
    def where(self) -> dict[str, str]:
        return {**self.kept, **self.placed}


@dataclass
class _Current:
    key: bytes
    mod: int
    assignment: Assignment


class NodeScheduler:
    """See the module docs. `interval`: seconds between level-triggered passes."""

    def __init__(self, store: EtcdStore, *, interval: float = 5.0) -> None:
        self.store = store
        self.keys = NodeKeys(store.keys)
        self.interval = interval
        self.conn = store_connection(store)
        self._lock = asyncio.Lock()  # one converge at a time in this process

    async def open(self) -> None:
        await self.conn.open()

    async def close(self) -> None:
        await self.conn.close()

    async def __aenter__(self) -> NodeScheduler:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- reading ----------------------------------------------------------------------------
    async def _range(self, prefix: bytes, what: str) -> list[tuple[bytes, bytes, int]]:
        kvs, _ = await self.conn.range_all(prefix, NodeKeys.end(prefix), what=what)
        return [(kv.key, kv.value, kv.mod_revision) for kv in kvs]

    async def assignments(self) -> list[_Current]:
        out = []
        for key, value, mod in await self._range(self.keys.assigned(), "listing assignments"):
            with contextlib.suppress(ValueError, TypeError):
                out.append(_Current(key, mod, Assignment.decode(value)))
        return out

    async def nodes(self) -> list[NodeView]:
        beats = {k.Keys.last_name(key) for key, _, _ in
                 await self._range(self.keys.heartbeats, "listing heartbeats")}
        views: dict[str, NodeView] = {}
        for _, value, mod in await self._range(self.keys.nodes, "listing nodes"):
            with contextlib.suppress(ValueError, TypeError):
                record = NodeRecord.decode(value)
                views[record.name] = NodeView(record, record.name in beats, mod)
        for cur in await self.assignments():
            view = views.get(cur.assignment.node)
            if view is not None:
                view.instances.append(f"{cur.assignment.stack}/{cur.assignment.instance}")
        return sorted(views.values(), key=lambda v: v.record.name)

    # -- node losses ------------------------------------------------------------------------
    async def check_nodes(self) -> list[str]:
        """Mark lost every ready node without a heartbeat; the names marked."""
        marked = []
        for view in await self.nodes():
            if view.record.state == READY and not view.alive and await self.mark_lost(
                    view.record.name):
                marked.append(view.record.name)
        return marked

    async def mark_lost(self, name: str) -> bool:
        """Record node `name` as lost (and `node.lost`) if it is ready and has no
        heartbeat; False when it is not, or another scheduler recorded it first."""
        key = self.keys.node(name)
        for _ in range(3):
            resp = await self.conn.get(key, what=f"reading node {name}")
            beat = await self.conn.get(self.keys.heartbeat(name), what="reading a heartbeat")
            if not resp.kvs or beat.kvs:
                return False
            record = NodeRecord.decode(resp.kvs[0].value)
            if record.state != READY:
                return False
            record.state, record.lost_at = LOST, time.time()
            record.message = (f"no heartbeat: its lease ({record.lease_ttl}s) expired")
            try:
                async with self.store.transaction():
                    await self.store.put_raw(key, record.encode(),
                                             mod_revision=resp.kvs[0].mod_revision)
                    await self.store.append_event(Event(
                        "node.lost", f"node {name} lost: {record.message}",
                        data={"node": name, "session": record.session,
                              "pid": record.pid, "hostname": record.hostname}))
            except StoreError as exc:
                log.info("marking node %s lost: %s; reading it again", name, exc.message)
                continue
            log.warning("node %s lost", name)
            return True
        return False

    # -- placing ----------------------------------------------------------------------------
    async def place_stack(self, stack: Stack) -> PlaceReport:
        """Record `stack` as run by the nodes, then converge it."""
        async with self.store.transaction():
            document = stack.model_dump(mode="json") | {"source": stack.source,
                                                        "base_dir": stack.base_dir}
            await self.store.put_stack(StackRecord(stack.name, document, status=PLACED))
            for name, svc in stack.services.items():
                await self.store.record_revision(stack.name, name,
                                                 svc.model_dump(mode="json"), spec_hash(svc))
            await self.store.append_event(Event(
                "place.started", f"placing {sum(s.replicas for s in stack.services.values())}"
                " instances on the nodes", stack=stack.name))
        return await self.converge(stack)

    async def converge(self, stack: Stack) -> PlaceReport:
        async with self._lock:
            return await self._converge(stack)

    async def _converge(self, stack: Stack) -> PlaceReport:
        report = PlaceReport(stack.name)
        views = {v.record.name: v for v in await self.nodes()}
        revisions = {s.name: s.revision for s in await self.store.list_services(stack.name)}
        wanted = {f"{name}-{i}": (name, i) for name, svc in stack.services.items()
                  for i in range(1, svc.replicas + 1)}
        hashes = {name: spec_hash(svc) for name, svc in stack.services.items()}
        current = await self.assignments()
        keep: list[_Current] = []  # every stack's valid assignments
        drop: dict[str, _Current] = {}  # this stack's others, by instance
        for cur in current:
            a = cur.assignment
            view = views.get(a.node)
            valid = view is not None and view.ready
            if a.stack == stack.name:
                valid = (valid and a.instance in wanted and a.instance not in report.kept
                         and a.spec_hash == hashes.get(a.service))
                if valid:
                    report.kept[a.instance] = a.node
                else:
                    drop.setdefault(a.instance, cur)
                    continue
            if valid:
                keep.append(cur)
        for name, cur in list(drop.items()):
            if name not in wanted:  # no longer wanted anywhere
                await self._unassign(stack.name, cur, delete_record=True)
            elif name in report.kept:  # a duplicate of a valid assignment
                await self._unassign(stack.name, cur, delete_record=False)
                del drop[name]
        missing = sorted(set(wanted) - set(report.kept), key=lambda n: (wanted[n], n))
        if not missing:
            return report
        nodes = [self._node_info(v.record, stack) for v in views.values() if v.ready]
        requests = [self._request(stack, wanted[n][0], n) for n in missing]
        result = place(requests, nodes, [_placed(c.assignment) for c in keep])
        placed = {n.split("/", 1)[1]: node for n, node in result.placed.items()}
        why = {n.split("/", 1)[1]: reason for n, reason in result.unplaced.items()}
        report.unplaced.update(why)
        used_ports = {p for c in current for p in c.assignment.ports.values()}
        records = {key: (value, mod) for key, value, mod in await self._range(
            self.store.keys.instances(stack.name), "listing instances")}
        for name in missing:
            node = placed.get(name)
            service, index = wanted[name]
            if node is None:
                await self._unplaced(stack, service, index, name,
                                     why.get(name, "not placed"),
                                     drop.get(name), records)
                continue
            ports = self._ports(stack, service, used_ports)
            if ports is None:
                report.unplaced[name] = "no free port in the stack's port range"
                continue
            assignment = Assignment(
                stack=stack.name, service=service, instance=name, index=index, node=node,
                revision=revisions.get(service, 1),
                spec=stack.services[service].model_dump(mode="json"),
                spec_hash=hashes[service], base_dir=stack.base_dir, ports=ports)
            if await self._assign(assignment, drop.get(name), records):
                report.placed[name] = node
            else:
                report.unplaced[name] = "changed meanwhile (another scheduler?); next pass"
        return report

    def _node_info(self, record: NodeRecord, stack: Stack) -> NodeInfo:
        over = stack.capacity.overcommit
        info = record.info()
        return NodeInfo(info.name, info.cpu, info.memory, info.disk, info.gpu, info.labels,
                        {"cpu": over.cpu, "memory": over.memory, "disk": over.disk,
                         "gpu": over.gpu})

    @staticmethod
    def _request(stack: Stack, service: str, instance: str) -> Request:
        svc = stack.services[service]
        res, pol = svc.resources, svc.placement
        fixed = frozenset(p for p in svc.ports.values() if isinstance(p, int))
        return Request(instance=f"{stack.name}/{instance}", service=f"{stack.name}/{service}",
                       cpu=float(res.cpu),
                       memory=int(res.memory), disk=int(res.disk), gpu=int(res.gpu),
                       ports=fixed, constraints=dict(pol.constraints),
                       anti_affinity=pol.anti_affinity, strategy=pol.strategy)

    @staticmethod
    def _ports(stack: Stack, service: str, used: set[int]) -> dict[str, int] | None:
        """The instance's ports: fixed ones as given, auto ones the lowest free of the
        stack's range (added to `used`)."""
        low, high = stack.ports.range
        out: dict[str, int] = {}
        candidate = low
        for name, port in stack.services[service].ports.items():
            if isinstance(port, int):
                out[name] = port
                continue
            while candidate <= high and candidate in used:
                candidate += 1
            if candidate > high:
                return None
            out[name] = candidate
            used.add(candidate)
        return out

    async def _assign(self, a: Assignment, old: _Current | None,
                      records: dict[bytes, tuple[bytes, int]]) -> bool:
        """Write one placement (see the module docs); False if a compared key moved."""
        rec_key = self.store.keys.instance(a.stack, a.instance)
        moved = old is not None and old.assignment.node != a.node
        message = (f"re-placed from node {old.assignment.node} on node {a.node}" if moved
                   else f"placed on node {a.node}")
        record = InstanceRecord(stack=a.stack, service=a.service, instance=a.instance,
                                index=a.index, revision=a.revision, ports=dict(a.ports),
                                message=message, runtime={"node": a.node})
        try:
            async with self.store.transaction():
                self.store.check_raw(rec_key, records.get(rec_key, (b"", 0))[1])
                if old is not None and old.key != self.keys.assignment(a.node, a.stack,
                                                                       a.instance):
                    await self.store.put_raw(old.key, None, mod_revision=old.mod)
                await self.store.put_raw(self.keys.assignment(a.node, a.stack, a.instance),
                                         a.encode())
                await self.store.put_instance(record)
                await self.store.append_event(Event(
                    "instance.rescheduled" if moved else "instance.placed", message,
                    stack=a.stack, service=a.service, instance=a.instance,
                    data={"node": a.node, "from": old.assignment.node if moved else None,
                          "ports": a.ports}))
        except (StoreError, NotFoundError) as exc:  # (NotFoundError: the stack went)
            log.info("placing %s/%s: %s", a.stack, a.instance, exc.message)
            return False
        return True

    async def _unassign(self, stack: str, cur: _Current, *, delete_record: bool) -> None:
        try:
            async with self.store.transaction():
                await self.store.put_raw(cur.key, None, mod_revision=cur.mod)
                if delete_record:
                    await self.store.delete_instance(stack, cur.assignment.instance)
        except (StoreError, NotFoundError) as exc:
            log.info("removing assignment %s: %s", cur.key, exc.message)

    async def _unplaced(self, stack: Stack, service: str, index: int, name: str, why: str,
                        old: _Current | None,
                        records: dict[bytes, tuple[bytes, int]]) -> None:
        """No node takes it: its old assignment (on a node that went) goes, and its record
        says why it waits (written once, not at every pass)."""
        rec_key = self.store.keys.instance(stack.name, name)
        record = InstanceRecord(stack=stack.name, service=service, instance=name,
                                index=index, revision=0, state=InstanceState.PENDING,
                                message=f"unplaced: {why}")
        value, mod = records.get(rec_key, (b"", 0))
        if old is None and value:
            known = k.instance_record(value)
            if (known.state, known.message) == (record.state, record.message):
                return
        try:
            async with self.store.transaction():
                self.store.check_raw(rec_key, mod)
                if old is not None:
                    await self.store.put_raw(old.key, None, mod_revision=old.mod)
                await self.store.put_instance(record)
                await self.store.append_event(Event(
                    "instance.unplaced", record.message, stack=stack.name, service=service,
                    instance=name))
        except (StoreError, NotFoundError) as exc:
            log.info("recording %s/%s unplaced: %s", stack.name, name, exc.message)

    async def remove_stack(self, name: str) -> int:
        """Take a placed stack off the nodes: its records go first (no scheduler places it
        again), then its assignments (each agent stops those instances); how many
        assignments were removed."""
        record = await self.store.get_stack(name)
        if record is None or record.status != PLACED:
            raise NotFoundError(f"no stack {name!r} is placed on the nodes")
        async with self.store.transaction():
            await self.store.delete_stack(name)
            await self.store.append_event(Event("place.removed", "taken off the nodes",
                                                stack=name))
        removed = 0
        for cur in await self.assignments():
            if cur.assignment.stack == name:
                await self.store.put_raw(cur.key, None)
                removed += 1
        return removed

    # -- the loop ---------------------------------------------------------------------------
    async def placed_stacks(self) -> list[Stack]:
        return [Stack.model_validate(r.spec) for r in await self.store.list_stacks()
                if r.status == PLACED]

    async def reconcile(self) -> dict[str, PlaceReport]:
        """One level-triggered pass: node losses, then every placed stack converged."""
        await self.check_nodes()
        return {s.name: await self.converge(s) for s in await self.placed_stacks()}

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Reconcile at start, on every change of a node or heartbeat, and every
        `interval` seconds, until `stop` is set."""
        stop = stop or asyncio.Event()
        wake = asyncio.Event()
        watchers = [asyncio.create_task(self._watch(p, wake))
                    for p in (self.keys.nodes, self.keys.heartbeats)]
        try:
            while not stop.is_set():
                wake.clear()
                try:
                    await self.reconcile()
                except ShipyardError as exc:  # etcd away, a stack removed meanwhile...
                    log.warning("scheduling pass failed: %s", exc.message)
                waits = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stop.wait())]
                await asyncio.wait(waits, timeout=self.interval,
                                   return_when=asyncio.FIRST_COMPLETED)
                for w in waits:
                    w.cancel()
        finally:
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)

    async def _watch(self, prefix: bytes, wake: asyncio.Event) -> None:
        while True:
            try:
                resp = await self.conn.range(prefix, NodeKeys.end(prefix), what="watching",
                                             count_only=True)
                stream = self.conn.watch_prefix(prefix, resp.header.revision + 1)
                try:
                    async for change in stream:
                        if change.events or change.canceled:
                            wake.set()
                        if change.canceled:
                            break
                finally:
                    with contextlib.suppress(Exception):
                        await stream.aclose()  # type: ignore[attr-defined]
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broken stream, etcd away: start again
                log.info("watching %s: %s", prefix, exc)
            wake.set()
            await asyncio.sleep(0.5)

    # -- waiting ----------------------------------------------------------------------------
    async def wait_running(self, stack: str, timeout: float, *,
                           instances: Iterable[str] | None = None) -> list[InstanceRecord]:
        """The stack's instance records once each is running (or ready) with a pid on the
        node it is assigned to; TimeoutError after `timeout` seconds."""
        names = set(instances) if instances is not None else None
        deadline = time.monotonic() + timeout
        while True:
            where = {c.assignment.instance: c.assignment.node for c in await self.assignments()
                     if c.assignment.stack == stack}
            records = [r for r in await self.store.list_instances(stack=stack)
                       if names is None or r.instance in names]
            if records and all(
                    r.instance in where and r.runtime.get("node") == where[r.instance]
                    and r.pid is not None
                    and r.state in (InstanceState.RUNNING, InstanceState.READY)
                    for r in records):
                return records
            if time.monotonic() >= deadline:
                raise TimeoutError(f"stack {stack}: not every instance runs after {timeout}s")
            await asyncio.sleep(0.2)


def _placed(a: Assignment) -> Placed:
    res = a.spec.get("resources") or {}
    ports = frozenset(p for p in a.ports.values() if isinstance(p, int))
    return Placed(instance=f"{a.stack}/{a.instance}", service=f"{a.stack}/{a.service}",
                  node=a.node, cpu=float(res.get("cpu") or 0.0),
                  memory=int(res.get("memory") or 0), disk=int(res.get("disk") or 0),
                  gpu=int(res.get("gpu") or 0), ports=ports)
