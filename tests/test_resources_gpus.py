"""GPU discovery and allocation.

This host has no GPU, so discovery is fed recorded-style output of `nvidia-smi
--query-gpu=index,uuid,name,memory.total --format=csv,noheader` (through the injectable
runner, or a stand-in `nvidia-smi` script printing it), and NVML through a stand-in
`pynvml` module with the calls nvidia-ml-py provides."""

from __future__ import annotations

import os
import subprocess
import sys
import types
from dataclasses import replace
from pathlib import Path

import pytest

from shipyard.errors import ResourceError
from shipyard.resources.capacity import HostCapacity, check_fit
from shipyard.resources.gpus import (
    QUERY,
    GpuAllocator,
    GpuDevice,
    Runner,
    discover_gpus,
    gpu_env,
    parse_query_output,
)
from shipyard.runtime.base import LaunchSpec
from shipyard.runtime.container_spec import ContainerSpec, limit_options
from shipyard.spec.models import Stack

# Stand-ins for recorded output, because no GPU exists on this host: the lines nvidia-smi
# prints for this query (`index, uuid, name, memory.total` with `MiB`, "[N/A]" where the
# driver cannot say), with made-up UUIDs: a 4 x A100 server, then a laptop whose GPU
# name holds a comma, listed out of order, and a trailing driver complaint.
RECORDED_A100 = """\
0, GPU-4f6c0f33-7a53-3bd4-8d3b-0c7c1d4b3e1a, NVIDIA A100-SXM4-40GB, 40960 MiB
1, GPU-9d2b7c51-1e2f-bb4a-77f0-6a8d3c2e9b10, NVIDIA A100-SXM4-40GB, 40960 MiB
2, GPU-0c1e5a7d-3b9f-4e2a-a6c8-2f4d1b7e8c33, NVIDIA A100-SXM4-40GB, 40960 MiB
3, GPU-7e8f9a0b-1c2d-3e4f-5a6b-7c8d9e0f1a2b, NVIDIA A100-SXM4-40GB, 40960 MiB
"""
RECORDED_ODD = """\
1, GPU-bbbbbbbb-0000-0000-0000-000000000001, Quadro RTX 4000, Max-Q, [N/A]
0, GPU-aaaaaaaa-0000-0000-0000-000000000000, NVIDIA GeForce RTX 3060, 12288 MiB
No devices were found on bus 0000:65:00.0
"""


def recorded(text: str, calls: list[list[str]] | None = None) -> Runner:
    def run(argv: list[str], timeout: float) -> str:
        if calls is not None:
            calls.append(argv)
        return text
    return run


def test_parse_recorded_output() -> None:
    devices = parse_query_output(RECORDED_A100)
    assert [d.index for d in devices] == [0, 1, 2, 3]
    assert devices[1] == GpuDevice(1, "GPU-9d2b7c51-1e2f-bb4a-77f0-6a8d3c2e9b10",
                                   "NVIDIA A100-SXM4-40GB", 40960 * 2**20)
    odd = parse_query_output(RECORDED_ODD)
    assert [(d.index, d.name, d.memory) for d in odd] == [
        (0, "NVIDIA GeForce RTX 3060", 12288 * 2**20), (1, "Quadro RTX 4000, Max-Q", 0)]


def test_discover_through_nvidia_smi_runner() -> None:
    calls: list[list[str]] = []
    inv = discover_gpus(runner=recorded(RECORDED_A100, calls), tool="/usr/bin/nvidia-smi")
    assert calls == [["/usr/bin/nvidia-smi", *QUERY]]
    assert inv.source == "nvidia-smi" and len(inv.devices) == 4
    assert inv.describe().startswith("GPU 0 (NVIDIA A100-SXM4-40GB, GPU-4f6c0f33-")
    empty = discover_gpus(runner=recorded("No devices were found\n"), tool="nvidia-smi")
    assert empty.devices == () and empty.describe() == "no GPU was found (nvidia-smi lists no GPU)"

    def failing(argv: list[str], timeout: float) -> str:
        raise subprocess.TimeoutExpired(argv, timeout)
    slow = discover_gpus(runner=failing, tool="nvidia-smi", timeout=0.5)
    assert slow.devices == () and slow.problem == "nvidia-smi did not answer within 0.5s"


def test_discover_runs_a_real_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in nvidia-smi printing the recorded output, found on PATH and run for real."""
    tool = tmp_path / "nvidia-smi"
    tool.write_text(f"#!{sys.executable}\nimport sys\n"
                    f"assert sys.argv[1:] == {QUERY!r}, sys.argv\n"
                    f"sys.stdout.write({RECORDED_A100!r})\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setitem(sys.modules, "pynvml", None)  # as when nvidia-ml-py is absent
    inv = discover_gpus()
    assert inv.source == "nvidia-smi" and [d.index for d in inv.devices] == [0, 1, 2, 3]
    tool.write_text(f"#!{sys.executable}\nraise SystemExit(9)\n")
    failed = discover_gpus()
    assert failed.devices == () and failed.problem and "nvidia-smi failed" in failed.problem
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    assert discover_gpus().problem == "nvidia-smi is not installed"


def test_discover_prefers_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in pynvml with nvidia-ml-py's calls (bytes names, as older releases give)."""
    fake = types.ModuleType("pynvml")
    state = {"shutdown": 0}
    fake.nvmlInit = lambda: None  # type: ignore[attr-defined]
    fake.nvmlShutdown = lambda: state.__setitem__("shutdown", 1)  # type: ignore[attr-defined]
    fake.nvmlDeviceGetCount = lambda: 2  # type: ignore[attr-defined]
    fake.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    fake.nvmlDeviceGetUUID = lambda h: f"GPU-{h}".encode()  # type: ignore[attr-defined]
    fake.nvmlDeviceGetName = lambda h: "Tesla T4"  # type: ignore[attr-defined]
    fake.nvmlDeviceGetMemoryInfo = (  # type: ignore[attr-defined]
        lambda h: types.SimpleNamespace(total=16 * 2**30))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    inv = discover_gpus()
    assert inv.source == "nvml" and state["shutdown"] == 1
    assert inv.devices == (GpuDevice(0, "GPU-0", "Tesla T4", 16 * 2**30),
                           GpuDevice(1, "GPU-1", "Tesla T4", 16 * 2**30))

    def no_driver() -> None:
        raise RuntimeError("NVML Shared Library Not Found")
    fake.nvmlInit = no_driver  # type: ignore[attr-defined]
    monkeypatch.setenv("PATH", "/nonexistent")
    assert discover_gpus().problem == "nvidia-smi is not installed"  # fell through


def test_this_host_without_gpus() -> None:
    inv = discover_gpus()
    if inv.devices:
        pytest.skip("this host has GPUs")
    assert inv.source in ("none", "nvidia-smi") and inv.problem


DEVICES = parse_query_output(RECORDED_A100)


def test_exclusive_devices_are_never_shared() -> None:
    alloc = GpuAllocator(DEVICES[:2])
    assert [d.index for d in alloc.allocate("train-1", 1)] == [0]
    assert [d.index for d in alloc.allocate("train-2", 1)] == [1]
    with pytest.raises(ResourceError) as info:
        alloc.allocate("train-3", 1)
    message = info.value.message
    assert message.startswith("train-3 needs 1 GPU but only 0 of 2 are available; ")
    assert "GPU 0 (NVIDIA A100-SXM4-40GB, GPU-4f6c0f33-7a53-3bd4-8d3b-0c7c1d4b3e1a): held " \
           "by train-1" in message
    assert "GPU 1 (" in message and "held by train-2" in message
    # a shared instance does not get an exclusive one's device either
    with pytest.raises(ResourceError, match="needs 1 shared GPU"):
        alloc.allocate("infer-1", 1, shared=True)
    assert [d.index for d in alloc.release("train-1")] == [0]
    assert [d.index for d in alloc.allocate("train-3", 1)] == [0]


def test_shared_devices_go_to_shared_instances_only() -> None:
    alloc = GpuAllocator(DEVICES[:2])
    assert [d.index for d in alloc.allocate("infer-1", 1, shared=True)] == [0]
    assert [d.index for d in alloc.allocate("infer-2", 1, shared=True)] == [1]  # least shared
    assert [d.index for d in alloc.allocate("infer-3", 2, shared=True)] == [0, 1]
    assert alloc.holders(0) == ["infer-1", "infer-3"]
    with pytest.raises(ResourceError) as info:
        alloc.allocate("train-1", 1)  # exclusive: every device is in use
    assert "shared by infer-1, infer-3" in info.value.message
    assert alloc.devices_of("train-1") == []


def test_no_gpu_host_refuses_clearly() -> None:
    with pytest.raises(ResourceError, match="train-1 needs 2 GPUs but this host has none"):
        GpuAllocator([]).allocate("train-1", 2)


def test_environment_and_container_device_request() -> None:
    env = gpu_env(DEVICES[1:3])
    assert env == {"CUDA_VISIBLE_DEVICES": "1,2", "NVIDIA_VISIBLE_DEVICES": "1,2",
                   "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert gpu_env([])["CUDA_VISIBLE_DEVICES"] == "" and gpu_env([])[
        "NVIDIA_VISIBLE_DEVICES"] == "void"
    spec = LaunchSpec(stack="s", service="train", instance="train-1", argv=["x"], env={},
                      workdir="/", log_path="/tmp/x.log",
                      container=ContainerSpec(image="app:1", gpus=["1", "2"]))
    request = limit_options(spec)["device_requests"][0]
    assert request["DeviceIDs"] == ["1", "2"] and request["Capabilities"] == [["gpu"]]
    assert "device_requests" not in limit_options(replace(spec, container=None))


def test_preflight_names_the_devices() -> None:
    stack = Stack.model_validate({"name": "ml", "services": {
        "train": {"command": "x", "replicas": 3, "resources": {"gpu": 1}},
        "infer": {"command": "x", "replicas": 4, "resources": {"gpu": 1, "gpu_shared": True}},
    }})
    inv = discover_gpus(runner=recorded(RECORDED_A100), tool="nvidia-smi")
    host = HostCapacity(cpu=8, memory=2**34, disk=2**40, gpu=3,
                        gpu_devices=", ".join(d.describe() for d in inv.devices[:3]))
    [shortfall] = check_fit(stack, host)
    # train needs 3 devices; infer's 4 replicas share 1: 4 wanted, 3 exist
    assert shortfall.describe() == (
        "gpu: the stack requests 4 (train 3, infer 1) but only 3 is available; this host "
        "has: GPU 0 (NVIDIA A100-SXM4-40GB, GPU-4f6c0f33-7a53-3bd4-8d3b-0c7c1d4b3e1a), "
        "GPU 1 (NVIDIA A100-SXM4-40GB, GPU-9d2b7c51-1e2f-bb4a-77f0-6a8d3c2e9b10), "
        "GPU 2 (NVIDIA A100-SXM4-40GB, GPU-0c1e5a7d-3b9f-4e2a-a6c8-2f4d1b7e8c33)")
    none = HostCapacity(cpu=8, memory=2**34, disk=2**40, gpu=0,
                        gpu_devices="no GPU was found (nvidia-smi is not installed)")
    [short] = check_fit(stack, none)
    assert short.describe().endswith("but only 0 is available; this host has: no GPU was "
                                     "found (nvidia-smi is not installed)")
