"""Highly available control planes: several `shipyard server` processes (each with its own
home and unix socket) on one etcd; one leads and acts, the others stand by, serve reads
and forward writes. Real servers, real etcd (tests/etcd_cluster.py), real SIGKILL and
SIGSTOP; the election and the store's fence are also tested on their own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shipyard.api.client import Client
from shipyard.errors import Busy
from shipyard.state.base import Event, StackRecord
from shipyard.state.election import Election
from shipyard.state.etcd import EtcdStore
from shipyard.state.etcd_conn import Connection
from shipyard.state.etcd_tx import NotLeader
from shipyard.state.factory import open_store
from tests.etcd_cluster import EtcdCluster, etcd_server, unique_url  # noqa: F401
from tests.test_crash_recovery import processes_of

PY = sys.executable
TTL = 2  # the servers' lease TTL in these tests (seconds)


# -- the election and the fence, in process -------------------------------------------------
async def _store(url: str) -> EtcdStore:
    store = open_store(url)
    assert isinstance(store, EtcdStore)
    await store.open()
    return store


async def _election(store: EtcdStore, name: str, ttl: int = TTL) -> tuple[Election,
                                                                           Connection]:
    conn = Connection(store.endpoints)
    await conn.open()
    return Election(conn, store.keys, name, f"/run/{name}.sock", ttl=ttl), conn


async def test_one_leader_and_a_clean_resign_hands_over_at_once(
        request: pytest.FixtureRequest) -> None:
    store = await _store(unique_url(request.config))
    (a, ca), (b, cb) = await _election(store, "a"), await _election(store, "b")
    try:
        assert (await a.campaign_once())[0] is True
        assert (await b.campaign_once())[0] is False
        assert a.is_leader and not b.is_leader
        assert b.leader is not None and b.leader.member == "a" and b.leader.term == a.term
        holding = asyncio.create_task(a.hold())
        waiting = asyncio.create_task(b.campaign())
        await asyncio.sleep(TTL * 1.5)  # renewals keep a in office past its TTL
        assert a.is_leader and not waiting.done()
        started = time.monotonic()
        await a.resign()
        await asyncio.wait_for(waiting, 2)
        assert time.monotonic() - started < 1.0  # no waiting for the TTL
        assert b.is_leader and b.term > 0 and not a.is_leader
        await asyncio.wait_for(holding, 2)
        await b.resign()
    finally:
        await ca.close()
        await cb.close()
        await store.close()


async def test_fenced_store_refuses_every_write_once_the_term_is_over(
        request: pytest.FixtureRequest) -> None:
    url = unique_url(request.config)
    old, new = await _store(url), await _store(url)
    (a, ca), (b, cb) = await _election(old, "a"), await _election(new, "b")
    try:
        assert (await a.campaign_once())[0]
        old.set_fence(a.fence())
        await old.put_stack(StackRecord("s", {"v": "old"}))  # leads: the write lands
        await old.append_event(Event("x", "while leading"))
        await ca.lease_revoke(a._lease)  # the term ends behind its back (as on expiry)
        assert (await b.campaign_once())[0]
        new.set_fence(b.fence())
        await new.put_stack(StackRecord("s", {"v": "new"}))
        with pytest.raises(NotLeader, match="no longer leads"):
            await old.put_stack(StackRecord("s", {"v": "stale"}))
        with pytest.raises(NotLeader):
            async with old.transaction():
                await old.append_event(Event("x", "stale"))
                await old.delete_stack("s")
        with pytest.raises(NotLeader):
            await old.prune_events(0)
        assert not a.is_leader  # the refused write ended its term at once
        record = await new.get_stack("s")
        assert record is not None and record.spec == {"v": "new"}
        assert [e.message for e in await new.list_events()] == ["while leading"]
        await new.append_event(Event("x", "new leader"))  # the leader's writes still land
    finally:
        await ca.close()
        await cb.close()
        await old.close()
        await new.close()


async def test_a_leader_paused_past_its_lease_knows_it_before_any_answer(
        request: pytest.FixtureRequest) -> None:
    store = await _store(unique_url(request.config))
    a, ca = await _election(store, "a", ttl=1)
    try:
        assert (await a.campaign_once())[0] and a.is_leader
        time.sleep(1.2)  # the whole event loop stalls, as under SIGSTOP
        assert not a.is_leader
        await asyncio.wait_for(a.hold(), 5)  # the next renewal finds the lease gone
        assert a.term == 0
    finally:
        await ca.close()
        await store.close()


# -- real servers -----------------------------------------------------------------------------
def start_server(home: Path, store: str, *, wait: bool = True) -> subprocess.Popen[bytes]:
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SHIPYARD_HOME=str(home))
    with open(home / "server.err", "ab") as err:
        proc = subprocess.Popen([PY, "-m", "shipyard.cli.main", "server", "--store", store,
                                 "--lease-ttl", str(TTL)], env=env,
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    client = Client(home / "shipyard.sock")
    for _ in range(300):
        if proc.poll() is not None:
            raise AssertionError((home / "server.err").read_text())
        if client.is_running():
            return proc
        time.sleep(0.05)
    raise AssertionError((home / "server.err").read_text())


def role(home: Path) -> str:
    with Client(home / "shipyard.sock") as client:
        return str(client.leader()["role"])


def wait_for(check: Any, timeout: float, what: str) -> float:
    """Seconds until `check()` is true; fails after `timeout`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(Exception):
            if check():
                return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"not {what} within {timeout}s")


def sleepers(name: str, replicas: int = 2) -> dict[str, Any]:
    return {"name": name, "base_dir": "/tmp",
            "services": {"w": {"command": [PY, "-c", "import time; time.sleep(600)"],
                               "replicas": replicas, "stop": {"timeout": "2s"}}}}


class Pair:
    """Two servers on one etcd namespace; everything they started dies with the test."""

    def __init__(self, tmp_path: Path, store: str, stack: str) -> None:
        self.store = store
        self.stack = stack
        self.homes = [tmp_path / "a", tmp_path / "b"]
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        for home in self.homes:  # a first: it wins the election
            self.procs.append(start_server(home, self.store))

    def client(self, i: int) -> Client:
        return Client(self.homes[i] / "shipyard.sock")

    def logs(self) -> str:
        return "\n".join(f"--- {h.name}\n{(h / 'server.err').read_text()[-3000:]}"
                         for h in self.homes if (h / "server.err").exists())

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in processes_of(self.stack):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def pair(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Pair]:
    servers = Pair(tmp_path, unique_url(request.config), f"ha{os.getpid()}x{time.time_ns()}")
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


def pids(client: Client, stack: str) -> dict[str, int]:
    return {i["instance"]: i["pid"] for i in client.instances(stack=stack)}


def view(instances: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(i["instance"], i["pid"], i["state"], i["ready"]) for i in instances]


def test_two_servers_one_leader_and_a_write_to_the_standby_lands_on_the_leader(
        pair: Pair) -> None:
    assert [role(h) for h in pair.homes] == ["leader", "standby"]
    with pair.client(0) as a, pair.client(1) as b:
        assert a.leader()["leader"] == b.leader()["leader"]
        assert b.leader()["leader"]["address"] == str(pair.homes[0] / "shipyard.sock")
        assert b.health()["role"] == "standby"
        result = b.apply(sleepers(pair.stack))  # sent to the standby
        assert result.ok, result
        on_leader = pids(a, pair.stack)
        assert len(on_leader) == 2
        assert sorted(processes_of(pair.stack)) == sorted(on_leader.values())
        # the standby answers reads from the store: the same instances, the same events
        assert pids(b, pair.stack) == on_leader
        assert [s["name"] for s in b.stacks()] == [pair.stack]
        assert b.events(stack=pair.stack) == a.events(stack=pair.stack)
        ops = b.operations(stack=pair.stack)
        assert [(o["kind"], o["state"]) for o in ops] == [("apply", "succeeded")]
        # leader-only reads are forwarded too
        assert [r["revision"] for r in b.history(pair.stack, "w")] == [1]
        assert b.scale(pair.stack, "w", 3)["replicas"] == 3
        assert len(pids(a, pair.stack)) == 3


def test_kill_9_of_the_leader_the_standby_takes_over_and_adopts(pair: Pair) -> None:
    with pair.client(0) as a:
        assert a.apply(sleepers(pair.stack)).ok
        before = pids(a, pair.stack)
    pair.procs[0].send_signal(signal.SIGKILL)
    pair.procs[0].wait()
    took = wait_for(lambda: role(pair.homes[1]) == "leader", TTL + 1, "leading")
    with pair.client(1) as b:
        assert pids(b, pair.stack) == before, "instances were restarted"
        assert sorted(processes_of(pair.stack)) == sorted(before.values())
        assert b.scale(pair.stack, "w", 3)["replicas"] == 3
        after = pids(b, pair.stack)
        assert {k: after[k] for k in before} == before and len(after) == 3
        kinds = [e["kind"] for e in b.events(stack=pair.stack)]
        assert kinds.count("instance.adopted") == 2
    assert took <= TTL + 1


def test_write_during_failover_waits_for_the_next_leader(pair: Pair) -> None:
    """A write sent to a standby while the leader is dead but its lease still runs is
    held until the standby itself leads, then applied."""
    with pair.client(0) as a:
        assert a.apply(sleepers(pair.stack, 1)).ok
    pair.procs[0].send_signal(signal.SIGKILL)
    pair.procs[0].wait()
    started = time.monotonic()
    with pair.client(1) as b:
        assert b.scale(pair.stack, "w", 2)["replicas"] == 2
        assert time.monotonic() - started < TTL * 2 + 1
        assert role(pair.homes[1]) == "leader" and len(pids(b, pair.stack)) == 2


def test_revoked_lease_the_running_leader_stops_acting(pair: Pair) -> None:
    with pair.client(0) as a:
        assert a.apply(sleepers(pair.stack)).ok
        before = pids(a, pair.stack)
        term = a.leader()["term"]

    async def revoke() -> None:
        store = await _store(pair.store)
        conn = Connection(store.endpoints)
        await conn.open()
        try:
            resp = await conn.get(store.keys.root + b"leader", what="reading")
            await conn.lease_revoke(resp.kvs[0].lease)
        finally:
            await conn.close()
            await store.close()

    asyncio.run(revoke())
    wait_for(lambda: role(pair.homes[1]) == "leader", TTL + 1, "the standby leading")
    wait_for(lambda: role(pair.homes[0]) == "standby", TTL + 1, "the old leader standing by")
    with pair.client(0) as a, pair.client(1) as b:
        assert b.leader()["term"] > term
        assert pids(b, pair.stack) == before
        assert sorted(processes_of(pair.stack)) == sorted(before.values())
        assert a.scale(pair.stack, "w", 1)["replicas"] == 1  # forwarded to b now
        assert list(pids(b, pair.stack)) == ["w-1"]
        assert view(a.instances(stack=pair.stack)) == view(b.instances(stack=pair.stack))


def test_leader_paused_past_its_lease_comes_back_as_a_standby(pair: Pair) -> None:
    """SIGSTOP the leader past its TTL, let the standby take over and write, SIGCONT the
    old one: it acts no more (no instance restarted or killed, nothing of the new leader's
    overwritten) and turns standby."""
    with pair.client(0) as a:
        assert a.apply(sleepers(pair.stack)).ok
        before = pids(a, pair.stack)
    pair.procs[0].send_signal(signal.SIGSTOP)
    wait_for(lambda: role(pair.homes[1]) == "leader", TTL + 2, "the standby leading")
    with pair.client(1) as b:
        assert b.scale(pair.stack, "w", 3)["replicas"] == 3
        state = b.instances(stack=pair.stack)
    pair.procs[0].send_signal(signal.SIGCONT)
    wait_for(lambda: role(pair.homes[0]) == "standby", TTL + 2, "the old leader standing by")
    time.sleep(1.0)  # give a stale leader time to do damage, if it would
    with pair.client(0) as a, pair.client(1) as b:
        assert role(pair.homes[1]) == "leader"
        now = b.instances(stack=pair.stack)
        assert view(now) == view(state)
        assert {k: v for k, v in pids(b, pair.stack).items() if k in before} == before
        assert sorted(processes_of(pair.stack)) == sorted(i["pid"] for i in now)
        assert view(a.instances(stack=pair.stack)) == view(now)  # it reads the new state
    assert "no longer the leader" in (pair.homes[0] / "server.err").read_text()


def test_a_forwarded_request_is_not_forwarded_again(pair: Pair) -> None:
    import httpx

    transport = httpx.HTTPTransport(uds=str(pair.homes[1] / "shipyard.sock"))
    with httpx.Client(transport=transport, base_url="http://shipyard") as raw:
        answer = raw.post("/v1/stacks/x/recover", headers={"x-shipyard-forwarded": "other"})
    assert answer.status_code == 503 and answer.json()["kind"] == "Busy"


def test_standby_without_a_reachable_leader_says_busy(tmp_path: Path,
                                                      request: pytest.FixtureRequest) -> None:
    """A leader that is stopped (not dead): its lease still runs for TTL; a standby that
    cannot reach it answers 503 once it has waited its limit, not an internal error."""
    servers = Pair(tmp_path, unique_url(request.config), f"ha{os.getpid()}y")
    try:
        servers.start()
        with servers.client(0) as a:
            assert a.apply(sleepers(servers.stack, 1)).ok
        os.unlink(servers.homes[0] / "shipyard.sock")  # the leader lives, unreachable
        with servers.client(1) as b:
            started = time.monotonic()
            with pytest.raises(Busy, match="no control plane leads"):
                b.recover(servers.stack)
            assert time.monotonic() - started >= TTL * 2
            assert b.instances(stack=servers.stack)[0]["state"] == "ready"  # reads work
    finally:
        servers.stop()


def test_losing_an_etcd_member_the_control_plane_carries_on(tmp_path: Path) -> None:
    with EtcdCluster(3) as cluster:
        servers = Pair(tmp_path, cluster.url("ha3") + "?timeout=2", f"ha{os.getpid()}z")
        try:
            servers.start()
            with servers.client(1) as b:
                assert b.apply(sleepers(servers.stack, 1)).ok
                cluster.kill(cluster.leader())  # the etcd leader: etcd elects another
                # A write in flight while etcd elects may time out (as with the store
                # alone); the control plane goes on with 2 of 3 members.
                wait_for(lambda: b.scale(servers.stack, "w", 2)["replicas"] == 2, 30,
                         "scaled with 2 etcd members")
                time.sleep(TTL * 1.5)  # leases are renewed through the other members
                roles = sorted(role(h) for h in servers.homes)
                assert roles == ["leader", "standby"], servers.logs()
                assert b.scale(servers.stack, "w", 3)["replicas"] == 3
                assert len(b.instances(stack=servers.stack)) == 3
                assert sorted(processes_of(servers.stack)) == \
                    sorted(i["pid"] for i in b.instances(stack=servers.stack))
        finally:
            servers.stop()
