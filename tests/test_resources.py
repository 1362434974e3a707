"""Ports and capacity: allocation against the real host, fit checks, the ledger."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shipyard.errors import ResourceError
from shipyard.resources.capacity import (
    HostCapacity,
    ResourceLedger,
    Shortfall,
    check_fit,
    detect_gpus,
    detect_host_capacity,
    effective_capacity,
)
from shipyard.resources.ports import PortAllocator, find_port_holder, port_is_free
from shipyard.spec.models import Capacity, Resources, Stack

GI = 2**30
MI = 2**20


def listener(host: str = "127.0.0.1", port: int = 0, *, listen: bool = True) -> socket.socket:
    sock = socket.socket()
    sock.bind((host, port))
    if listen:
        sock.listen()
    return sock


@pytest.fixture
def held() -> Iterator[int]:
    """A port this test process listens on, on 127.0.0.1."""
    sock = listener()
    yield sock.getsockname()[1]
    sock.close()


def _range_around(port: int, width: int = 8) -> tuple[int, int]:
    return max(1024, port - width // 2), min(65535, port + width // 2)


# -- ports --------------------------------------------------------------------------------


def test_port_is_free_sees_listeners_and_bound_sockets(held: int) -> None:
    assert not port_is_free(held)
    bound = listener(listen=False)  # bound without SO_REUSEADDR, not listening
    try:
        assert not port_is_free(bound.getsockname()[1])
    finally:
        bound.close()
    wildcard = listener("0.0.0.0")
    try:
        assert not port_is_free(wildcard.getsockname()[1])
    finally:
        wildcard.close()


def test_port_is_free_sees_a_port_held_on_ipv6_only() -> None:
    try:
        v6 = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        v6.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        v6.listen()
        port = v6.getsockname()[1]
        assert not port_is_free(port)
    finally:
        v6.close()


def test_allocate_distinct_ports_in_range() -> None:
    alloc = PortAllocator(23100, 23139)
    ports = [alloc.allocate(f"svc-{i}") for i in range(20)]
    assert len(set(ports)) == 20
    assert all(23100 <= p <= 23139 for p in ports)
    assert ports == sorted(ports)  # the cursor moves forward
    assert alloc.owner_of(ports[3]) == "svc-3"
    assert alloc.ports_of("svc-3") == [ports[3]]
    assert len(alloc) == 20


def test_round_robin_does_not_reuse_a_released_port_at_once() -> None:
    alloc = PortAllocator(23200, 23219)
    first = alloc.allocate("a")
    assert alloc.release("a") == [first]
    assert alloc.owner_of(first) is None
    assert alloc.allocate("b") != first


def test_wraps_around_and_reuses_released_ports_eventually() -> None:
    alloc = PortAllocator(23300, 23303)
    got = [alloc.allocate(f"o{i}") for i in range(4)] if all(
        port_is_free(p) for p in range(23300, 23304)) else None
    if got is None:
        pytest.skip("someone holds a port of 23300-23303")
    alloc.release("o1")
    assert alloc.allocate("again") == got[1]


def test_allocation_skips_reserved_ports() -> None:
    alloc = PortAllocator(23400, 23409)
    alloc.reserve(23400, "fixed")
    alloc.reserve(23401, "fixed")
    assert alloc.allocate("x") not in (23400, 23401)
    assert alloc.release("fixed") == [23400, 23401]


def test_allocation_skips_a_port_someone_listens_on(held: int) -> None:
    alloc = PortAllocator(held, held)
    with pytest.raises(ResourceError, match=rf"no free port in {held}-{held} for api-1"):
        alloc.allocate("api-1")
    low, high = _range_around(held)
    alloc = PortAllocator(low, high)
    alloc._cursor = held  # start exactly at the held port
    assert alloc.allocate("api-1") != held


def test_exhausted_range_is_named() -> None:
    alloc = PortAllocator(23500, 23502)
    for port in range(23500, 23503):
        alloc.reserve(port, "other")
    with pytest.raises(ResourceError) as err:
        alloc.allocate("web-1")
    assert "no free port in 23500-23502 for web-1: 3 allocated by shipyard" in err.value.message


def test_claim_fixed(held: int) -> None:
    alloc = PortAllocator(30000, 30010)
    free = listener()
    port = free.getsockname()[1]
    free.close()
    alloc.claim_fixed(port, "api")
    alloc.claim_fixed(port, "api")  # idempotent for its owner
    assert alloc.owner_of(port) == "api"
    with pytest.raises(ResourceError, match=f"port {port} for web is already in use by api"):
        alloc.claim_fixed(port, "web")


def test_claim_fixed_names_the_holding_process(held: int) -> None:
    alloc = PortAllocator(30000, 30010)
    with pytest.raises(ResourceError) as err:
        alloc.claim_fixed(held, "api")
    me = psutil.Process().name()
    assert err.value.message == (
        f"port {held} for api is already in use by {me} (pid {os.getpid()})")
    assert alloc.owner_of(held) is None


def test_find_port_holder(held: int) -> None:
    assert find_port_holder(held) is not None
    assert f"pid {os.getpid()}" in (find_port_holder(held) or "")
    sock = listener(listen=False)
    port = sock.getsockname()[1]
    sock.close()
    assert find_port_holder(port) is None


def test_reserve_moves_a_port_between_owners() -> None:
    alloc = PortAllocator(23600, 23610)
    alloc.reserve(23600, "a")
    alloc.reserve(23600, "b")
    assert alloc.owner_of(23600) == "b"
    assert alloc.release("a") == []
    assert alloc.owner_of(23600) == "b"


def test_invalid_range() -> None:
    with pytest.raises(ValueError):
        PortAllocator(10, 5)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["alloc", "release"]), st.integers(0, 5)),
                max_size=40))
def test_allocator_never_double_books(held: int, ops: list[tuple[str, int]]) -> None:
    low, high = _range_around(held, 10)
    alloc = PortAllocator(low, high)
    model: dict[int, str] = {}
    for op, n in ops:
        owner = f"o{n}"
        if op == "alloc":
            try:
                port = alloc.allocate(owner)
            except ResourceError:
                assert all(p in model or not port_is_free(p) for p in range(low, high + 1))
                continue
            assert port != held, "handed out a port someone listens on"
            assert port not in model, "handed out a port twice"
            assert low <= port <= high
            model[port] = owner
        else:
            released = alloc.release(owner)
            assert released == sorted(p for p, o in model.items() if o == owner)
            model = {p: o for p, o in model.items() if o != owner}
        assert {p: alloc.owner_of(p) for p in model} == model


# -- capacity -----------------------------------------------------------------------------


def test_detect_host_capacity() -> None:
    host = detect_host_capacity()
    assert host.cpu >= 1 or 0 < host.cpu < 1  # a cgroup quota may be fractional
    assert host.memory > 0 and host.disk >= 0 and host.gpu >= 0


def _fake_tool(dirpath: Path, body: str) -> None:
    tool = dirpath / "nvidia-smi"
    tool.write_text(f"#!{sys.executable}\n{body}\n")
    tool.chmod(0o755)


def test_detect_gpus_counts_nvidia_smi_lines(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_tool(tmp_path, "print('GPU 0: A100 (UUID: x)')\nprint('GPU 1: A100 (UUID: y)')")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert detect_gpus() == 2


def test_detect_gpus_times_out_and_fails_soft(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_tool(tmp_path, "import time; time.sleep(10)")
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    start = time.perf_counter()
    assert detect_gpus(timeout=0.3) == 0
    assert time.perf_counter() - start < 3
    _fake_tool(tmp_path, "raise SystemExit(9)")
    assert detect_gpus() == 0
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert detect_gpus() == 0


HOST = HostCapacity(cpu=8, memory=16 * GI, disk=100 * GI, gpu=1)


def test_effective_capacity_overrides_then_overcommits() -> None:
    eff = effective_capacity(Capacity(cpu=2, memory="8Gi"), HOST)
    assert eff.cpu == pytest.approx(3.0)
    assert eff.memory == int(8 * GI * 1.2)
    assert eff.disk == int(100 * GI * 1.1)
    assert eff.gpu == 1
    assert eff.explain("cpu") == "3 (2 \u00d7 overcommit 1.5)"
    assert eff.explain("gpu") == "1"
    exact = effective_capacity(Capacity(cpu=4, overcommit={"cpu": 1, "gpu": 2}), HOST)
    assert exact.cpu == 4 and exact.gpu == 2 and exact.explain("cpu") == "4"


def _stack(capacity: dict[str, object] | None = None, **services: dict[str, object]) -> Stack:
    return Stack.model_validate({
        "name": "demo", "capacity": capacity or {},
        "services": {name: {"command": ["true"], **svc} for name, svc in services.items()},
    })


def test_check_fit_fits() -> None:
    stack = _stack({"cpu": 2}, api={"replicas": 2, "resources": {"cpu": "500m"}},
                   worker={"replicas": 2, "resources": {"cpu": 1}})
    assert check_fit(stack, HOST) == []  # 3 of 3


def test_check_fit_reports_each_short_resource() -> None:
    stack = _stack({"cpu": 2, "memory": "1Gi"},
                   api={"replicas": 2, "resources": {"cpu": "500m", "memory": "512Mi"}},
                   worker={"replicas": 3, "resources": {"cpu": 1}})
    shortfalls = check_fit(stack, HOST)
    assert [s.resource for s in shortfalls] == ["cpu"]  # 1Gi fits in 1Gi x 1.2
    cpu = shortfalls[0]
    assert (cpu.requested, cpu.available) == (pytest.approx(4.0), pytest.approx(3.0))
    assert cpu.services == [("worker", 3.0), ("api", 1.0)]
    assert cpu.describe() == ("cpu: the stack requests 4 (worker 3, api 1) but only "
                              "3 (2 \u00d7 overcommit 1.5) is available")
    assert str(cpu).startswith("not enough cpu:")


def test_check_fit_counts_what_is_already_there() -> None:
    stack = _stack({"cpu": 2}, api={"replicas": 2, "resources": {"cpu": "500m"}})
    assert check_fit(stack, HOST, already={"x/a-1": Resources(cpu=2)}) == []
    short = check_fit(stack, HOST, already={"x/a-1": Resources(cpu=2.5)})
    assert short[0].describe() == ("cpu: the stack requests 1 (api 1) but only "
                                   "500m of 3 (2 \u00d7 overcommit 1.5) is available")
    other = _stack({"cpu": 2}, big={"resources": {"cpu": 2.5}}).model_copy(
        update={"name": "other"})
    assert check_fit(stack, HOST, others=[other])[0].available == pytest.approx(0.5)
    # a stack of the same name is the one being replaced: not counted twice
    assert check_fit(stack, HOST, others=[stack]) == []


def test_check_fit_gpu_and_memory_units() -> None:
    stack = _stack(None, train={"replicas": 2, "resources": {"gpu": 1, "memory": "10Gi"}})
    shortfalls = {s.resource: s for s in check_fit(stack, HOST)}
    assert set(shortfalls) == {"gpu", "memory"}
    assert shortfalls["gpu"].describe() == ("gpu: the stack requests 2 (train 2) but only "
                                            "1 is available")
    assert "requests 20Gi (train 20Gi) but only 19.2Gi (16Gi \u00d7 overcommit 1.2)" in (
        shortfalls["memory"].describe())


def test_shortfall_without_capacity() -> None:
    s = Shortfall("memory", 2 * GI, GI, [("db", 2 * GI)])
    assert s.describe() == "memory: the stack requests 2Gi (db 2Gi) but only 1Gi is available"


# -- ledger -------------------------------------------------------------------------------


def test_ledger_message_names_the_shortfall() -> None:
    ledger = ResourceLedger(effective_capacity(Capacity(cpu=2), HOST))
    ledger.allocate("api-1", cpu=2.8)
    with pytest.raises(ResourceError) as err:
        ledger.allocate("api-2", cpu=0.5)
    assert err.value.message == (
        "api-2 needs 500m cpu but only 200m of 3 (2 \u00d7 overcommit 1.5) is free")
    assert ledger.allocation("api-2") is None
    with pytest.raises(ResourceError) as err:
        ledger.allocate("api-2", cpu=0.5, memory=20 * GI)
    assert err.value.message == (
        "api-2 needs 500m cpu but only 200m of 3 (2 \u00d7 overcommit 1.5) is free; "
        "and 20Gi memory but only 19.2Gi of 19.2Gi (16Gi \u00d7 overcommit 1.2) is free")


def test_ledger_allocate_replace_release() -> None:
    ledger = ResourceLedger(HostCapacity(cpu=1, memory=GI, disk=GI, gpu=1))
    ledger.allocate("a", cpu=0.3, memory=256 * MI, gpu=1)
    assert ledger.used == HostCapacity(cpu=0.3, memory=256 * MI, disk=0, gpu=1)
    ledger.allocate("a", cpu=1.0, memory=GI)  # a resize: its own share counts as free
    assert ledger.free == HostCapacity(cpu=0, memory=0, disk=GI, gpu=1)
    with pytest.raises(ResourceError, match="b needs 2 gpu but only 1 of 1 is free"):
        ledger.allocate("b", gpu=2)
    assert ledger.owners == ["a"]
    assert ledger.release("a") and not ledger.release("a")
    assert ledger.free == HostCapacity(cpu=1, memory=GI, disk=GI, gpu=1)
    with pytest.raises(ValueError):
        ledger.allocate("c", cpu=-1)


def test_ledger_cpu_sums_are_exact() -> None:
    ledger = ResourceLedger(HostCapacity(cpu=0.3, memory=0, disk=0, gpu=0))
    for i in range(3):
        ledger.allocate(f"p{i}", cpu=0.1)  # 0.1 + 0.1 + 0.1 > 0.3 in floats
    assert ledger.free.cpu == 0


amounts = st.tuples(st.integers(0, 4000).map(lambda m: m / 1000), st.integers(0, 4 * GI),
                    st.integers(0, 8 * GI), st.integers(0, 2))


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(0, 7), st.none() | amounts), max_size=60))
def test_ledger_never_over_capacity_and_release_restores(
        ops: list[tuple[int, tuple[float, int, int, int] | None]]) -> None:
    cap = HostCapacity(cpu=4.5, memory=6 * GI, disk=10 * GI, gpu=2)
    ledger = ResourceLedger(cap)
    model: dict[str, tuple[float, int, int, int]] = {}
    for n, request in ops:
        owner = f"i{n}"
        if request is None:
            assert ledger.release(owner) == (owner in model)
            model.pop(owner, None)
        else:
            others = [v for k, v in model.items() if k != owner]
            fits = all(
                round(sum(v[i] for v in others) * 1000) + round(request[i] * 1000)
                <= round((cap.cpu, cap.memory, cap.disk, cap.gpu)[i] * 1000)
                for i in range(4))
            try:
                ledger.allocate(owner, *request)
                assert fits
                model[owner] = request
            except ResourceError:
                assert not fits
        used = ledger.used
        assert used.cpu <= cap.cpu and used.memory <= cap.memory
        assert used.disk <= cap.disk and used.gpu <= cap.gpu
        assert used.memory == sum(v[1] for v in model.values())
        assert used.cpu == pytest.approx(sum(v[0] for v in model.values()), abs=1e-9)
    for owner in list(model):
        ledger.release(owner)
    assert ledger.used == HostCapacity(0, 0, 0, 0)
    assert ledger.free == cap
