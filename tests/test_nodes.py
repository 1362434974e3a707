"""Nodes (issue 10, docs/nodes.md): real agents (`python -m shipyard.cli.main agent`, each
with its own home and node name) on a real etcd; `shipyard place` places a stack on them;
kill -9 of an agent loses its node within the lease TTL and its instances move to the
other agent. Every pid checked is a real process in /proc."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from shipyard.agent.records import LOST, READY, Assignment, NodeKeys, NodeRecord
from shipyard.agent.scheduler import NodeScheduler
from shipyard.spec.models import Stack
from shipyard.state.base import Event, InstanceRecord, InstanceState
from shipyard.state.etcd import EtcdStore
from shipyard.state.factory import open_store
from tests.conftest import pids_alive, port_range
from tests.etcd_cluster import etcd_server, unique_url  # noqa: F401
from tests.test_crash_recovery import processes_of

PY = sys.executable
TTL = 2  # the agents' heartbeat lease in these tests (seconds)
SVC = str(Path(__file__).parent / "fixtures" / "svc.py")
T = TypeVar("T")

pytestmark = pytest.mark.usefixtures("etcd_server")


# -- helpers ----------------------------------------------------------------------------------
def with_store(url: str, fn: Callable[[EtcdStore], Awaitable[T]]) -> T:
    async def main() -> T:
        store = open_store(url)
        assert isinstance(store, EtcdStore)
        await store.open()
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(main())


def node_records(url: str) -> dict[str, tuple[NodeRecord, bool, list[str]]]:
    async def read(store: EtcdStore) -> dict[str, tuple[NodeRecord, bool, list[str]]]:
        async with NodeScheduler(store) as scheduler:
            return {v.record.name: (v.record, v.alive, v.instances)
                    for v in await scheduler.nodes()}

    return with_store(url, read)


def instances(url: str, stack: str) -> dict[str, InstanceRecord]:
    async def read(store: EtcdStore) -> dict[str, InstanceRecord]:
        return {r.instance: r for r in await store.list_instances(stack=stack)}

    return with_store(url, read)


def events(url: str) -> list[Event]:
    return with_store(url, lambda store: store.list_events(limit=10_000))


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """The first true value of `check()`; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # e.g. a record not there yet
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"not {what} within {timeout}s (last error: {last!r})")


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(item.decode().split("=", 1) for item in f.read().split(b"\0")
                    if b"=" in item)


def reapers_of(nodes: list[str]) -> list[int]:
    """The live reapers of these agents (their cgroup name ends with the node name)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"shipyard.agent.reaper" not in f.read():
                    continue
            name = environ(int(entry)).get("SHIPYARD_CGROUP_NAME", "")
        except OSError:
            continue
        if any(name.endswith(f"-node-{n}") for n in nodes) and pids_alive([int(entry)]):
            found.append(int(entry))
    return found


class Cluster:
    """Agents (and a `place --follow`) on one etcd namespace; all killed at the end."""

    def __init__(self, tmp_path: Path, url: str) -> None:
        self.tmp = tmp_path
        self.url = url
        self.tag = uuid.uuid4().hex[:6]
        self.stack = f"nodes{self.tag}"
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.procs: list[subprocess.Popen[bytes]] = []

    def name(self, short: str) -> str:
        return f"{short}{self.tag}"

    def start_agent(self, short: str, *labels: str) -> subprocess.Popen[bytes]:
        node = self.name(short)
        home = self.tmp / f"home-{short}"
        argv = [PY, "-m", "shipyard.cli.main", "agent", "--store", self.url, "--node", node,
                "--home", str(home), "--lease-ttl", str(TTL)]
        for label in labels:
            argv += ["--label", label]
        with open(self.tmp / f"agent-{short}.err", "ab") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, start_new_session=True)
        self.agents[short] = proc
        self.procs.append(proc)
        return proc

    def wait_registered(self, short: str, timeout: float = 20.0) -> NodeRecord:
        proc = self.agents[short]

        def check() -> NodeRecord | None:
            if proc.poll() is not None:
                raise AssertionError(f"agent {short} exited {proc.returncode}: "
                                     f"{self.log(short)}")
            found = node_records(self.url).get(self.name(short))
            if found and found[1] and found[0].pid == proc.pid and found[0].state == READY:
                return found[0]
            return None

        return wait_for(check, timeout, f"node {short} registered")

    def log(self, short: str) -> str:
        path = self.tmp / f"agent-{short}.err"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stack_file(self, services: dict[str, Any]) -> Path:
        path = self.tmp / "stack.yaml"
        path.write_text(json.dumps({"name": self.stack, "ports": {"range": port_range()},
                                    "services": services}))  # JSON is YAML
        return path

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        nodes = [self.name(s) for s in ("a", "b", "c")]
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not reapers_of(nodes), 10, "reapers gone")
        for pid in [*processes_of(self.stack), *reapers_of(nodes)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    nodes = Cluster(tmp_path, unique_url(request.config))
    try:
        yield nodes
    finally:
        nodes.stop()


# -- the scheduler on its own -----------------------------------------------------------------
async def test_a_node_without_heartbeat_is_marked_lost_once_and_nothing_fits_no_nodes(
        request: pytest.FixtureRequest) -> None:
    store = open_store(unique_url(request.config))
    assert isinstance(store, EtcdStore)
    await store.open()
    keys = NodeKeys(store.keys)
    try:
        async with NodeScheduler(store) as one, NodeScheduler(store) as two:
            stack = Stack.model_validate({"name": "s", "base_dir": "/tmp", "services": {
                "w": {"command": ["/bin/sleep", "60"], "replicas": 2}}})
            report = await one.place_stack(stack)
            assert report.placed == {} and set(report.unplaced) == {"w-1", "w-2"}
            assert report.unplaced["w-1"] == "no nodes"
            records = {r.instance: r for r in await store.list_instances(stack="s")}
            assert records["w-1"].state is InstanceState.PENDING
            assert records["w-1"].message == "unplaced: no nodes"
            # a node record whose agent never kept a heartbeat: lost, recorded once
            await store.put_raw(keys.node("n1"), NodeRecord("n1", cpu=2, memory=2**30,
                                                             lease_ttl=2).encode())
            marked = await asyncio.gather(one.check_nodes(), two.check_nodes())
            assert sorted(marked) == [[], ["n1"]]
            views = await one.nodes()
            assert [(v.record.name, v.record.state, v.alive) for v in views] == [
                ("n1", LOST, False)]
            lost = [e for e in await store.list_events() if e.kind == "node.lost"]
            assert [e.data["node"] for e in lost] == ["n1"]
            assert await one.mark_lost("n1") is False
    finally:
        await store.close()


# -- real agents ------------------------------------------------------------------------------
def test_two_agents_register_and_a_second_agent_cannot_take_a_live_name(
        cluster: Cluster) -> None:
    a = cluster.start_agent("a", "zone=z1", "disk=ssd")
    b = cluster.start_agent("b", "zone=z2")
    ra, rb = cluster.wait_registered("a"), cluster.wait_registered("b")
    assert (ra.labels, rb.labels) == ({"zone": "z1", "disk": "ssd"}, {"zone": "z2"})
    for record, proc in ((ra, a), (rb, b)):
        assert record.cpu >= 1 and record.memory > 2**20 and record.disk > 0
        assert record.pid == proc.pid and record.version and record.hostname
        assert record.session and record.lease_ttl == TTL
    joined = [e.data["node"] for e in events(cluster.url) if e.kind == "node.joined"]
    assert sorted(joined) == sorted([cluster.name("a"), cluster.name("b")])
    out = subprocess.run([PY, "-m", "shipyard.cli.main", "nodes", "--store", cluster.url,
                          "-o", "json"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    listed = {n["name"]: n for n in json.loads(out.stdout)}
    assert {n: (v["state"], v["alive"]) for n, v in listed.items()} == {
        cluster.name("a"): ("ready", True), cluster.name("b"): ("ready", True)}
    table = subprocess.run([PY, "-m", "shipyard.cli.main", "nodes", "--store", cluster.url],
                           capture_output=True, text=True, timeout=30)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["NODE", "STATE", "CPU", "MEMORY", "DISK", "GPU", "LABELS",
                                "ADDRESS", "INSTANCES"]
    assert lines[1].split()[:2] == [cluster.name("a"), "ready"]
    assert lines[1].split()[6:] == ["disk=ssd,zone=z1", "127.0.0.1", "-"]
    # the same name again, while its agent lives: refused (after waiting out a lease)
    dup = subprocess.run([PY, "-m", "shipyard.cli.main", "agent", "--store", cluster.url,
                          "--node", cluster.name("a"), "--home", str(cluster.tmp / "dup"),
                          "--lease-ttl", str(TTL)], capture_output=True, text=True,
                         timeout=60)
    assert dup.returncode != 0
    assert "registered by another live agent" in dup.stderr
    record, alive, _ = node_records(cluster.url)[cluster.name("a")]
    assert alive and record.pid == a.pid and record.state == READY
    # a clean stop: the node has left (its record says so), at once
    b.send_signal(signal.SIGTERM)
    assert b.wait(20) == 0
    record, alive, _ = node_records(cluster.url)[cluster.name("b")]
    assert record.state == "left" and not alive
    assert any(e.kind == "node.left" for e in events(cluster.url))


def test_place_on_two_agents_then_kill_9_moves_the_instances(cluster: Cluster) -> None:
    a = cluster.start_agent("a", "zone=z1")
    cluster.start_agent("b", "zone=z2")
    cluster.wait_registered("a")
    cluster.wait_registered("b")
    na, nb = cluster.name("a"), cluster.name("b")
    stack = cluster.stack_file({
        # two replicas on distinct nodes when possible; each with a port of its own
        "web": {"command": [PY, SVC, "--port", "${PORT}"], "ports": {"http": "auto"},
                "replicas": 2, "stop": {"timeout": "2s"},
                "placement": {"anti_affinity": "preferred", "strategy": "spread"}},
        # never two on one node
        "solo": {"command": ["/bin/sleep", "600"], "replicas": 2,
                 "placement": {"anti_affinity": "required"}},
        # only where zone=z2
        "pinned": {"command": ["/bin/sleep", "600"],
                   "placement": {"constraints": {"zone": "z2"}}},
    })
    out = cluster.tmp / "place.out"
    with open(out, "wb") as fd, open(cluster.tmp / "place.err", "wb") as err:
        place = subprocess.Popen(
            [PY, "-m", "shipyard.cli.main", "place", "-f", str(stack), "--store", cluster.url,
             "--timeout", "30", "--follow", "--interval", "1"],
            stdin=subprocess.DEVNULL, stdout=fd, stderr=err, start_new_session=True)
    cluster.procs.append(place)

    def printed() -> str | None:
        if place.poll() is not None:
            raise AssertionError((cluster.tmp / "place.err").read_text())
        text = out.read_text()
        return text if text.count("\n") >= 6 else None

    table = wait_for(printed, 40, "placed")
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
    assert set(rows) == {"web-1", "web-2", "solo-1", "solo-2", "pinned-1"}
    records = instances(cluster.url, cluster.stack)
    where = {name: r.runtime["node"] for name, r in records.items()}
    assert {name: row[1] for name, row in rows.items()} == where
    assert {where["web-1"], where["web-2"]} == {na, nb}
    assert {where["solo-1"], where["solo-2"]} == {na, nb}
    assert where["pinned-1"] == nb
    for name, rec in records.items():  # real processes, started by the agent of their node
        assert rec.state in (InstanceState.RUNNING, InstanceState.READY), rec
        assert rec.pid is not None and pids_alive([rec.pid]) == [rec.pid], name
        env = environ(rec.pid)
        assert env["SHIPYARD_NODE"] == where[name] and env["SHIPYARD_INSTANCE"] == name
        # its output goes through the agent's log relay (a full disk drops, not fails)
        assert os.readlink(f"/proc/{rec.pid}/fd/1") == rec.runtime["log_fifo"]
    ports = [records[w].ports["http"] for w in ("web-1", "web-2")]
    assert len(set(ports)) == 2
    on_a = sorted(n for n, node in where.items() if node == na)
    old_pids = {n: records[n].pid for n in on_a}

    killed_at = time.time()
    a.send_signal(signal.SIGKILL)
    a.wait(10)
    lost = wait_for(lambda: (r := node_records(cluster.url)[na][0]).state == LOST and r,
                    TTL + 5, "node a lost")
    assert lost.lost_at is not None and lost.lost_at - killed_at <= TTL + 1.5
    lost_events = [e for e in events(cluster.url) if e.kind == "node.lost"]
    assert [e.data["node"] for e in lost_events] == [na]
    # the killed agent's instances died with it (its reaper stopped them)
    wait_for(lambda: not pids_alive(list(old_pids.values())), 10, "a's instances gone")
    wait_for(lambda: not reapers_of([na]), 10, "a's reaper gone")

    # the web replica moves to b; solo cannot (b runs one already): unplaced, with why
    def moved() -> dict[str, InstanceRecord] | None:
        recs = instances(cluster.url, cluster.stack)
        web = [recs[n] for n in on_a if n.startswith("web")]
        ok = all(r.runtime.get("node") == nb and r.state in (InstanceState.RUNNING,
                                                             InstanceState.READY)
                 and r.pid is not None for r in web)
        return recs if ok else None

    recs = wait_for(moved, 20, "a's web replica running on b")
    for name in on_a:
        if name.startswith("web"):
            pid = recs[name].pid
            assert pid is not None and pids_alive([pid]) == [pid]
            assert pid != old_pids[name] and environ(pid)["SHIPYARD_NODE"] == nb
        else:
            assert recs[name].state is InstanceState.PENDING
            assert "already runs a replica" in recs[name].message
    assert any(e.kind == "instance.rescheduled" and e.data["from"] == na
               for e in events(cluster.url))
    views = node_records(cluster.url)
    assert not any(i.startswith(f"{cluster.stack}/") for i in views[na][2])
    # what still runs of the stack is exactly what b's records say
    running = {r.pid for r in recs.values() if r.pid is not None
               and r.state in (InstanceState.RUNNING, InstanceState.READY)}
    assert set(processes_of(cluster.stack)) == running

    # a comes back (same name, same home): it rejoins and gets the unplaced replica
    cluster.start_agent("a", "zone=z1")
    cluster.wait_registered("a")
    solo = next(n for n in on_a if n.startswith("solo"))
    wait_for(lambda: (r := instances(cluster.url, cluster.stack)[solo]).runtime.get("node")
             == na and r.state in (InstanceState.RUNNING, InstanceState.READY)
             and r.pid is not None and pids_alive([r.pid]), 20, "solo back on a")

    # taken off the nodes: every instance stops, nothing is placed again
    gone = subprocess.run([PY, "-m", "shipyard.cli.main", "place", "-f", str(stack),
                           "--store", cluster.url, "--remove"], capture_output=True,
                          text=True, timeout=60)
    assert gone.returncode == 0, gone.stderr
    assert "taken off the nodes (5 instances)" in gone.stdout
    wait_for(lambda: not processes_of(cluster.stack), 15, "the stack's processes gone")
    time.sleep(1.5)  # a pass of the following scheduler (--interval 1) places nothing
    views = node_records(cluster.url)
    assert views[na][2] == [] and views[nb][2] == []
    assert instances(cluster.url, cluster.stack) == {} and not processes_of(cluster.stack)


def test_an_assignment_removed_is_stopped_and_a_changed_one_replaced(
        cluster: Cluster) -> None:
    cluster.start_agent("c")
    cluster.wait_registered("c")
    node = cluster.name("c")

    async def assign(store: EtcdStore, args: str = "600", instance: str = "s-1",
                     spec: dict[str, Any] | None = None) -> bytes:
        from shipyard.state.base import StackRecord

        keys = NodeKeys(store.keys)
        await store.put_stack(StackRecord(cluster.stack, {}, status="placed"))
        a = Assignment(stack=cluster.stack, service="s", instance=instance, index=1,
                       node=node, revision=1,
                       spec=spec or {"command": ["/bin/sleep", args]},
                       spec_hash=args, base_dir=str(cluster.tmp))
        key = keys.assignment(node, cluster.stack, instance)
        await store.put_raw(key, a.encode())
        return key

    key = with_store(cluster.url, assign)
    first = wait_for(lambda: (r := instances(cluster.url, cluster.stack).get("s-1"))
                     and r.pid and r.state is InstanceState.READY and r, 15, "s-1 running")
    assert environ(first.pid)["SHIPYARD_NODE"] == node
    with_store(cluster.url, lambda store: assign(store, args="601"))  # a new spec
    second = wait_for(lambda: (r := instances(cluster.url, cluster.stack)["s-1"]).pid
                      not in (None, first.pid) and r.state is InstanceState.READY and r,
                      15, "s-1 replaced")
    wait_for(lambda: not pids_alive([first.pid]), 10, "the old run gone")
    assert Path(f"/proc/{second.pid}/cmdline").read_bytes().split(b"\0")[1] == b"601"
    with_store(cluster.url, lambda store: store.put_raw(key, None))  # unassigned
    wait_for(lambda: not pids_alive([second.pid]), 15, "s-1 stopped")
    assert not processes_of(cluster.stack)
    # its restart policy, as the engine's: restarted twice, then failed with the reason
    with_store(cluster.url, lambda store: assign(store, args="x", instance="f-1", spec={
        "command": ["/bin/sh", "-c", "exit 3"],
        "restart": {"policy": "on-failure", "max_restarts": 2, "initial": "0.1s"}}))
    failed = wait_for(lambda: (r := instances(cluster.url, cluster.stack)["f-1"]).state
                      is InstanceState.FAILED and r, 15, "f-1 failed")
    assert failed.exit_code == 3 and failed.restarts == 2
    assert failed.message == "exited 3; gave up after 2 restarts"


def test_the_leading_control_plane_reschedules_a_lost_nodes_instances(
        cluster: Cluster) -> None:
    """No `place --follow` runs: the HA leader's own node scheduler moves the instances
    of a node killed with -9 to the other node."""
    from tests.test_ha import start_server

    server = start_server(cluster.tmp / "server-home", cluster.url)
    cluster.procs.append(server)
    a = cluster.start_agent("a")
    cluster.start_agent("b")
    cluster.wait_registered("a")
    cluster.wait_registered("b")
    na, nb = cluster.name("a"), cluster.name("b")
    stack = cluster.stack_file({
        "web": {"command": ["/bin/sleep", "600"], "replicas": 2, "stop": {"timeout": "2s"},
                "placement": {"anti_affinity": "preferred", "strategy": "spread"}}})
    placed = subprocess.run([PY, "-m", "shipyard.cli.main", "place", "-f", str(stack),
                             "--store", cluster.url, "--timeout", "30"],
                            capture_output=True, text=True, timeout=60)
    assert placed.returncode == 0, placed.stderr
    where = {n: r.runtime["node"] for n, r in instances(cluster.url, cluster.stack).items()}
    assert sorted(where.values()) == sorted([na, nb])
    on_a = next(n for n, node in where.items() if node == na)
    a.send_signal(signal.SIGKILL)
    a.wait(10)

    def moved() -> bool:
        rec = instances(cluster.url, cluster.stack)[on_a]
        return (rec.runtime.get("node") == nb and rec.pid is not None
                and rec.state in (InstanceState.RUNNING, InstanceState.READY)
                and pids_alive([rec.pid]) == [rec.pid])

    wait_for(moved, TTL + 20, f"{on_a} running on b, moved by the leader")
    assert any(e.kind == "instance.rescheduled" and e.data["from"] == na
               for e in events(cluster.url))
    gone = subprocess.run([PY, "-m", "shipyard.cli.main", "place", "-f", str(stack),
                           "--store", cluster.url, "--remove"], capture_output=True,
                          text=True, timeout=60)
    assert gone.returncode == 0, gone.stderr
    wait_for(lambda: not processes_of(cluster.stack), 15, "the stack's processes gone")
