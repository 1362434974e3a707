"""The node agent: `shipyard agent --store etcd://... --node NAME`.

One agent per node. It

1. registers the node: `heartbeats/<node>` attached to a lease of its own (TTL
   `lease_ttl`), then `nodes/<node>` (capacity from `detect_host_capacity`, labels,
   address, hostname, pid, version, a session id) and a `node.joined` event, in one
   transaction;
2. keeps the lease alive (every TTL/3, as state/election.py does for the leader): when
   the agent dies the heartbeat key vanishes within the TTL, and a scheduler
   (agent/scheduler.py) marks the node `lost` and places its instances elsewhere. If a
   renewal finds the lease expired (the agent was paused, or cut off from etcd), it
   registers again with a new lease;
3. follows `assignments/<node>/` (a listing, then a watch from the revision listed;
   listed again whenever the watch breaks) and runs each assignment with a NodeInstance
   (agent/runner.py) on the process runtime; an assignment removed is stopped, one whose
   spec or ports changed is replaced;
4. tells its reaper (agent/reaper.py, a companion process) what runs, so that a killed
   agent's instances die with it instead of running on beside their replacements;
5. on SIGTERM / SIGINT: marks the node `left` (event `node.left`), stops its instances,
   revokes its lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from shipyard import __version__
from shipyard.agent.records import (
    LEFT,
    READY,
    Assignment,
    NodeKeys,
    NodeRecord,
    store_connection,
)
from shipyard.agent.runner import NodeInstance
from shipyard.engine.output import output_event
from shipyard.errors import InputError, StoreError
from shipyard.resources.capacity import HostCapacity, detect_host_capacity
from shipyard.runtime import procscan
from shipyard.runtime.base import Handle
from shipyard.runtime.logpipe import LogPipes, Notice
from shipyard.runtime.process import ProcessRuntime
from shipyard.spec.models import Service
from shipyard.state.base import Event
from shipyard.state.etcd import EtcdStore
from shipyard.state.etcd_conn import put_op
from shipyard.state.etcd_keys import dumps
from shipyard.state.factory import open_store

log = logging.getLogger("shipyard.agent")
_DELETE = 1  # mvccpb.Event.DELETE


class Reaper:
    """The agent's end of the reaper's pipe (see agent/reaper.py)."""

    def __init__(self, cgroup_name: str) -> None:
        env = dict(os.environ, SHIPYARD_CGROUP_NAME=cgroup_name)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shipyard.agent.reaper"], stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL, env=env, start_new_session=True, close_fds=True)

    def tell(self, order: dict[str, object]) -> None:
        stdin = self.proc.stdin
        if stdin is None:
            return
        try:
            stdin.write(json.dumps(order).encode() + b"\n")
            stdin.flush()
        except OSError as exc:
            log.error("the reaper is gone (%s): instances may outlive a killed agent", exc)

    def close(self) -> None:
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Agent:
    """`Agent(store_url, node, home=..., labels=..., lease_ttl=5)`; `await run(stop)`
    until `stop` is set (see the module docs)."""

    def __init__(self, store_url: str, node: str, *, home: Path,
                 labels: Mapping[str, str] | None = None, address: str = "127.0.0.1",
                 lease_ttl: int = 5, capacity: HostCapacity | None = None) -> None:
        store = open_store(store_url)
        if not isinstance(store, EtcdStore):
            raise InputError("nodes need an etcd store",
                             hint="give --store etcd://host:2379[/cluster]")
        if lease_ttl < 1:
            raise InputError("the lease TTL is at least 1 second")
        self.store = store
        self.node = node
        self.home = home
        self.labels = dict(labels or {})
        self.address = address
        self.ttl = lease_ttl
        self.capacity = capacity
        self.keys = NodeKeys(store.keys)
        self.conn = store_connection(store, timeout=max(1.0, min(5.0, lease_ttl)))
        self.instances: dict[bytes, NodeInstance] = {}
        self.session = ""
        self.lease = 0
        self.registered = asyncio.Event()
        self._deadline = 0.0  # monotonic: the lease lives until then at least
        base = os.environ.get("SHIPYARD_CGROUP_NAME") or "shipyard"
        self.cgroup_name = f"{base}-node-{node}"
        self.runtime: ProcessRuntime | None = None
        self.reaper: Reaper | None = None
        self._notices: set[asyncio.Task[None]] = set()

    # -- the whole run ----------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.reaper = Reaper(self.cgroup_name)  # before any thread of the etcd client runs
        # output through the log relay: a full log disk drops output, with an event
        pipes = LogPipes(self.home, on_notice=self._on_log_notice)
        self.runtime = ProcessRuntime(cgroup_name=self.cgroup_name, pipes=pipes)
        tasks: list[asyncio.Task[None]] = []
        try:
            await self.store.open()
            await self.conn.open()
            await self._register()
            tasks = [asyncio.create_task(self._hold(), name="agent-lease"),
                     asyncio.create_task(self._follow(), name="agent-assignments")]
            stopping = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([stopping, *tasks],
                                         return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            for task in done:
                if task is not stopping and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            await self._shutdown()

    def _on_log_notice(self, notice: Notice) -> None:
        event = output_event(notice, self._service_of, node=self.node)
        if event is None:
            return
        task = asyncio.get_running_loop().create_task(self._append(event))
        self._notices.add(task)
        task.add_done_callback(self._notices.discard)

    async def _append(self, event: Event) -> None:
        with contextlib.suppress(StoreError):
            await self.store.append_event(event)

    def _service_of(self, stack: str, instance: str) -> str | None:
        for inst in self.instances.values():
            a = inst.assignment
            if a.stack == stack and a.instance == instance:
                return a.service
        return None

    async def _shutdown(self) -> None:
        if self.registered.is_set():  # (not another agent's record, when refused)
            with contextlib.suppress(StoreError):
                await self._set_state(LEFT, "the agent stopped", "node.left")
        await asyncio.gather(*(i.stop() for i in self.instances.values()),
                             return_exceptions=True)
        self.instances.clear()
        if self.lease:
            with contextlib.suppress(StoreError):
                await self.conn.lease_revoke(self.lease)
        if self.reaper is not None:
            await asyncio.to_thread(self.reaper.close)
        if self.runtime is not None:
            await self.runtime.close()
        with contextlib.suppress(Exception):
            await self.store.close()
        with contextlib.suppress(Exception):
            await self.conn.close()

    # -- registration and lease ------------------------------------------------------------
    def _record(self) -> NodeRecord:
        cap = self.capacity or detect_host_capacity(str(self.home))
        self.capacity = cap
        return NodeRecord(name=self.node, state=READY, cpu=cap.cpu, memory=cap.memory,
                          disk=cap.disk, gpu=cap.gpu, labels=self.labels,
                          address=self.address, hostname=socket.gethostname(),
                          pid=os.getpid(), version=__version__, session=self.session,
                          lease_ttl=self.ttl)

    async def _register(self) -> None:
        """Take the node's heartbeat key under a new lease and record the node as ready.
        Refused while another live agent holds the name."""
        key = self.keys.heartbeat(self.node)
        deadline = time.monotonic() + 2 * self.ttl + 1
        while True:
            resp = await self.conn.get(key, what=f"reading the heartbeat of {self.node}")
            if not resp.kvs or not _other_agent(resp.kvs[0].value, self.session):
                break
            if time.monotonic() > deadline:
                raise InputError(f"node {self.node} is registered by another live agent: "
                                 f"{resp.kvs[0].value.decode(errors='replace')}",
                                 hint="give this agent another --node name")
            await asyncio.sleep(0.2)
        self.session = uuid.uuid4().hex
        lease, granted = await self.conn.lease_grant(self.ttl)
        me = procscan.read_proc(os.getpid())
        beat = dumps({"session": self.session, "pid": os.getpid(),
                      "start": me.start if me is not None else None,
                      "hostname": socket.gethostname(), "ts": time.time()})
        await self.conn.txn([], [put_op(key, beat, lease)], what="registering the node")
        self.lease, self._deadline = lease, time.monotonic() + granted
        record = await asyncio.to_thread(self._record)
        async with self.store.transaction():
            await self.store.put_raw(self.keys.node(self.node), record.encode())
            await self.store.append_event(Event(
                "node.joined", f"node {self.node} joined ({record.cpu:g} CPUs, "
                f"{record.memory / 2**30:.1f}Gi memory, {record.gpu} GPUs; pid "
                f"{record.pid} on {record.hostname})",
                data={"node": self.node, "labels": self.labels, "session": self.session}))
        self.registered.set()
        log.info("node %s registered (lease %x, TTL %ds)", self.node, lease, granted)

    async def _set_state(self, state: str, message: str, event: str) -> None:
        record = self._record()
        record.state, record.message = state, message
        async with self.store.transaction():
            await self.store.put_raw(self.keys.node(self.node), record.encode())
            await self.store.append_event(Event(event, f"node {self.node}: {message}",
                                                data={"node": self.node}))

    async def _hold(self) -> None:
        """Renew the lease every TTL/3; register again when it expired meanwhile."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            sent = time.monotonic()
            try:
                ttl = await self.conn.lease_keepalive(self.lease)
            except StoreError as exc:
                log.warning("node %s: renewing the lease failed: %s", self.node,
                            exc.message)
                continue
            if ttl > 0:
                self._deadline = sent + ttl
                continue
            log.warning("node %s: its lease expired; registering again", self.node)
            while True:
                try:
                    await self._register()
                    break
                except StoreError as exc:
                    log.warning("node %s: registering failed: %s", self.node, exc.message)
                    await asyncio.sleep(min(1.0, self.ttl / 3))

    # -- assignments ------------------------------------------------------------------------
    async def _follow(self) -> None:
        prefix = self.keys.assigned(self.node)
        while True:
            try:
                kvs, revision = await self.conn.range_all(
                    prefix, NodeKeys.end(prefix), what="listing the node's assignments")
                await self._reconcile({kv.key: (kv.value, kv.mod_revision) for kv in kvs})
                await self._watch(prefix, revision + 1)
            except StoreError as exc:
                log.warning("node %s: following assignments failed: %s", self.node,
                            exc.message)
            except Exception as exc:  # the watch stream broke: list again
                log.warning("node %s: the assignments watch ended (%s)", self.node,
                            type(exc).__name__)
            await asyncio.sleep(0.5)

    async def _watch(self, prefix: bytes, start: int) -> None:
        stream = self.conn.watch_prefix(prefix, start)
        try:
            async for resp in stream:
                if resp.canceled or resp.compact_revision:
                    return  # list again
                for change in resp.events:
                    if change.type == _DELETE:
                        await self._removed(change.kv.key)
                    else:
                        await self._assigned(change.kv.key, change.kv.value,
                                             change.kv.mod_revision)
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]

    async def _reconcile(self, wanted: dict[bytes, tuple[bytes, int]]) -> None:
        for key in [k for k in self.instances if k not in wanted]:
            await self._removed(key)
        for key, (value, mod) in wanted.items():
            await self._assigned(key, value, mod)

    async def _assigned(self, key: bytes, value: bytes, mod: int) -> None:
        try:
            assignment = Assignment.decode(value)
        except (ValueError, TypeError) as exc:
            log.error("node %s: malformed assignment %s: %s", self.node, key, exc)
            return
        current = self.instances.get(key)
        if current is not None:
            if current.assignment.same_run(assignment):
                current.assignment = assignment
                current.update_revision(mod)
                return
            await self._removed(key)
        assert self.runtime is not None
        try:
            inst = NodeInstance(self.store, self.runtime, self.node, self.home, assignment,
                                key, mod, on_handle=self._on_handle)
        except ValueError as exc:  # a spec this version cannot read
            log.error("node %s: cannot run %s: %s", self.node, key, exc)
            return
        self.instances[key] = inst
        inst.start()
        log.info("node %s: running %s", self.node, inst.name)

    async def _removed(self, key: bytes) -> None:
        inst = self.instances.pop(key, None)
        if inst is not None:
            log.info("node %s: %s is no longer assigned here; stopping it", self.node,
                     inst.name)
            await inst.stop(record=False)

    def _on_handle(self, name: str, handle: Handle | None, service: Service) -> None:
        if self.reaper is None:
            return
        if handle is None:
            self.reaper.tell({"op": "remove", "key": name})
        else:
            self.reaper.tell({"op": "add", "key": name, "handle": dataclasses.asdict(handle),
                              "signal": service.stop.signal, "timeout": service.stop.timeout})


def _other_agent(value: bytes, session: str) -> bool:
    """Whether a heartbeat belongs to another agent that still lives: one on another host
    (its lease decides), or a live process on this one."""
    try:
        beat = json.loads(value)
    except ValueError:
        return False
    if beat.get("session") == session:
        return False
    if beat.get("hostname") != socket.gethostname():
        return True
    pid, start = beat.get("pid"), beat.get("start")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    info = procscan.read_proc(pid)
    return (info is not None and info.state != "Z"
            and (not isinstance(start, float) or abs(info.start - start) <= 0.01))
