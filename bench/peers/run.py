"""Side by side with supervisord, circus and pm2 (issue 7): one command that installs the
peers in a scratch folder and runs the same workloads through each of them, through
Shipyard and through a bare asyncio spawner (the physical-limit baseline), alternating the
tools in every repetition.

    .venv/bin/python bench/peers/run.py [--scratch DIR] [--reps N] [--quick]
                                        [--quiet-wait S] [--json FILE]

Installs (once, reused when present): supervisor and circus from PyPI into DIR/venv, pm2
from the npm registry with the machine's node/npm into DIR/npm. Nothing is installed into
the project's venv, nothing is written into the repository.

How each tool is driven (every status is polled every 10 ms through the tool's own status
interface; every daemon listens on unix sockets only):
- Shipyard: the in-process `Engine` (library API: `engine.apply`, `engine.instances`,
  `engine.down`) in a process of its own (agent_shipyard.py), so that its RSS and CPU are
  measured like a daemon's. Default configuration (durable SQLite state, a log file per
  instance, per-instance cgroups where the host allows); also a variant with cgroups off.
- supervisord: `supervisord -c` (nodaemon), XML-RPC on its unix socket from this script.
- circus: `circusd` on ipc:// endpoints, its client library (agent_circus.py, scratch venv).
- pm2: its God daemon through pm2's programmatic API (agent_pm2.js; `pm2 jlist` is the
  same call as `pm2.list`).
- baseline: agent_bare.py, subprocess.Popen + pidfd exit watching on an asyncio loop.

Workloads: cold start of N = 100 and 300 long-running children (a venv Python child,
child.py, and /bin/sleep) until the tool reports all running (and every child has exec'd);
for Shipyard and the baseline also until all are ready by a tcp probe; crash-restart
latency (kill -9 a child, time until the tool reports a new pid running), 20 kills; the
control plane's RSS and CPU time with 100 idle children over 30 s (all tools side by side);
time to stop 100 (and 300) children gracefully. `--quick`: N = 20, 1 repetition, 5 kills,
5 s idle.

At the end every daemon, agent and child is gone, checked by scanning the process table for
anything whose command line names the scratch folder, an agent or the sleep child; the
script exits 1 if anything is left (or a tool failed), 0 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import math
import os
import random
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PY = sys.executable  # the project's venv interpreter: Shipyard, the baseline, the child
SLEEP_ARG = "7654321"  # /bin/sleep's argument: marks the sleep children in the process table
POLL = 0.01  # status polling period, every tool
SETTLE = 3.0  # seconds between starting the idle children and measuring
CRASH_SETTLE = 0.2  # seconds at least between one restart being reported and the next kill
# ... plus a random delay up to the tool's own timer period, so that kills do not phase-lock
# with it: circus notices deaths only every check_delay (ini default 5 s); supervisord's
# loop wakes at least every 1 s; the others have no such timer.
TIMER = {"circus": 5.0, "circus-fast": 0.1, "supervisord": 1.0}
OTHER_TIMER = 0.3
FAST_CHECK_DELAY = 0.1  # the tuned circus variant's check_delay
DASH, TIMES = "\u2013", "\u00d7"  # for the markdown table


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- installing the peers ------------------------------------------------------------------
@dataclass
class Peers:
    scratch: Path
    venv_python: Path
    pm2_module: Path
    node: str
    versions: dict[str, str] = field(default_factory=dict)


def install(scratch: Path) -> Peers:
    venv = scratch / "venv"
    vpy = venv / "bin" / "python"
    if not vpy.exists():
        log(f"creating {venv}")
        subprocess.run([PY, "-m", "venv", str(venv)], check=True)
    probe = subprocess.run([str(vpy), "-c", "import supervisor, circus"],
                           capture_output=True)
    if probe.returncode != 0:
        log("installing supervisor and circus from PyPI into the scratch venv")
        subprocess.run([str(vpy), "-m", "pip", "install", "-q", "supervisor", "circus"],
                       check=True)
    node = shutil.which("node")
    npm = shutil.which("npm")
    if node is None or npm is None:
        raise SystemExit("node and npm are needed for pm2")
    npm_dir = scratch / "npm"
    module = npm_dir / "node_modules" / "pm2"
    if not (module / "package.json").exists():
        log("installing pm2 from the npm registry into the scratch folder")
        npm_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([npm, "install", "--prefix", str(npm_dir), "--no-audit", "--no-fund",
                        "--loglevel=error", "pm2"], check=True)
    peers = Peers(scratch, vpy, module, node)
    peers.versions = versions(peers)
    return peers


def _out(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True).stdout.strip()


def src_digest() -> str:
    """A digest of Shipyard's source as it is on disk: every agent imports it afresh, so a
    change during the run (the working tree is shared) shows as a different digest."""
    h = hashlib.sha1()
    for path in sorted((REPO / "src").rglob("*.py")):
        h.update(str(path.relative_to(REPO)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:10]


def versions(peers: Peers) -> dict[str, str]:
    vbin = peers.venv_python.parent
    pm2 = json.loads((peers.pm2_module / "package.json").read_text())["version"]
    import shipyard

    commit = _out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _out(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no",
                  "src"])
    return {
        "shipyard": f"{shipyard.__version__} ({commit}{', src/ modified' if dirty else ''};"
                    f" source digest {src_digest()})",
        "supervisor": _out([str(vbin / "supervisord"), "--version"]),
        "circus": _out([str(vbin / "circusd"), "--version"]),
        "pm2": pm2,
        "node": _out([peers.node, "--version"]),
        "python (Shipyard, baseline, child)": sys.version.split()[0],
        "python (supervisor, circus)": _out([str(peers.venv_python), "-c",
                                             "import sys; print(sys.version.split()[0])"]),
        "psutil": psutil.__version__,
        "host": f"{os.cpu_count()} cpus, Linux {os.uname().release}",
    }


# -- driving a tool ----------------------------------------------------------------------
@dataclass
class Workload:
    key: str
    label: str
    argv: list[str]
    n: int
    ready: bool = False


class ToolError(RuntimeError):
    pass


class Driver:
    """One tool for one run: its control plane started fresh in `run_dir`."""

    name = "?"

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.control_pids: list[int] = []

    def setup(self, wl: Workload, port_low: int) -> None:
        raise NotImplementedError

    def start(self) -> None:
        """Start the workload; return when the tool reports all of it running (ready)."""
        raise NotImplementedError

    def pids(self) -> dict[str, int]:
        raise NotImplementedError

    def wait_new(self, name: str, old: int, timeout: float) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def quit(self) -> dict[str, Any]:
        raise NotImplementedError

    def own_pids(self) -> list[int]:
        """Processes of the tool itself (control plane, agent) for the leak check."""
        return list(self.control_pids)


class AgentDriver(Driver):
    """A tool driven through an agent process speaking JSON lines on stdin/stdout."""

    def __init__(self, run_dir: Path, name: str, argv: list[str], env: dict[str, str],
                 extra: dict[str, Any] | None = None) -> None:
        super().__init__(run_dir)
        self.name = name
        self.argv = argv
        self.env = env
        self.extra = extra or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self._buf = b""

    def call(self, op: str, wait: float = 300.0, **kw: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        self.proc.stdin.flush()
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + wait
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ToolError(f"{self.name}: no answer to {op} within {wait:g} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise ToolError(f"{self.name}: agent exited during {op} (see "
                                    f"{self.run_dir / 'agent.log'})")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        reply: dict[str, Any] = json.loads(line)
        if not reply.pop("ok", False):
            raise ToolError(f"{self.name}: {op} failed: {reply.get('error')}")
        return reply

    def setup(self, wl: Workload, port_low: int) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "agent.log", "ab") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err, env=self.env,
                                         cwd=self.run_dir, start_new_session=True)
        reply = self.call("setup", wait=60, argv=wl.argv, n=wl.n, ready=wl.ready,
                          port_low=port_low, run_dir=str(self.run_dir), poll=POLL,
                          **self.extra)
        self.control_pids = reply["control_pids"]

    def start(self) -> None:
        reply = self.call("start")
        if reply.get("control_pids"):  # processes the control plane started meanwhile
            self.control_pids = reply["control_pids"]

    def pids(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.call("pids")["pids"].items()}

    def wait_new(self, name: str, old: int, timeout: float) -> int:
        return int(self.call("wait_new", wait=timeout + 5, name=name, old=old,
                             timeout=timeout)["pid"] or 0)

    def stop(self) -> None:
        self.call("stop")

    def quit(self) -> dict[str, Any]:
        if self.proc is None:
            return {}
        reply: dict[str, Any] = {}
        try:
            if self.proc.poll() is None:
                reply = self.call("quit", wait=60)
        except (ToolError, OSError) as exc:
            reply = {"error": str(exc)}
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        return reply

    def own_pids(self) -> list[int]:
        return [*self.control_pids, *([self.proc.pid] if self.proc else [])]


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._socket_path)
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__()
        self._socket_path = socket_path
        self._timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        if self._connection[1] is not None and self._connection[0] == host:
            return self._connection[1]
        conn = _UnixConnection(self._socket_path, self._timeout)
        self._connection = host, conn
        return conn


class SupervisorDriver(Driver):
    """supervisord in the foreground (nodaemon), its XML-RPC interface on a unix socket.

    Program `g`: numprocs copies; autostart off (the start is timed from
    `startProcessGroup`); startsecs=0 (else RUNNING is reported only after 1 s);
    autorestart on; stopsignal TERM, stopwaitsecs 10; output to its default AUTO log files.
    """

    name = "supervisord"

    def __init__(self, run_dir: Path, peers: Peers) -> None:
        super().__init__(run_dir)
        self.peers = peers
        self.proc: subprocess.Popen[bytes] | None = None
        self.rpc: Any = None

    def setup(self, wl: Workload, port_low: int) -> None:
        run = self.run_dir
        (run / "logs").mkdir(parents=True, exist_ok=True)
        sock = run / "supervisor.sock"
        conf = run / "supervisord.conf"
        conf.write_text("\n".join([
            "[unix_http_server]", f"file = {sock}", "chmod = 0700", "",
            "[supervisord]", "nodaemon = true", f"logfile = {run / 'supervisord.log'}",
            f"pidfile = {run / 'supervisord.pid'}", f"childlogdir = {run / 'logs'}",
            "minfds = 4096", "", "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "", "[program:g]", f"command = {shlex.join(wl.argv)}", f"numprocs = {wl.n}",
            "process_name = %(program_name)s_%(process_num)03d", "autostart = false",
            "autorestart = true", "startsecs = 0", "startretries = 100",
            "stopsignal = TERM", "stopwaitsecs = 10", f"directory = {run}", "",
        ]))
        daemon = self.peers.venv_python.parent / "supervisord"
        with open(run / "supervisord.out", "ab") as out:
            self.proc = subprocess.Popen([str(daemon), "-c", str(conf)], stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=out, env=clean_env(),
                                         cwd=run, start_new_session=True)
        self.control_pids = [self.proc.pid]
        self.rpc = xmlrpc.client.ServerProxy("http://localhost",
                                             transport=_UnixTransport(str(sock), 300.0))
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.rpc.supervisor.getState()["statename"] == "RUNNING":
                    return
            except (OSError, xmlrpc.client.Error, http.client.HTTPException):
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise ToolError("supervisord did not come up")
            time.sleep(0.05)

    def _infos(self) -> list[dict[str, Any]]:
        infos: list[dict[str, Any]] = self.rpc.supervisor.getAllProcessInfo()
        return infos

    def start(self) -> None:
        self.rpc.supervisor.startProcessGroup("g", False)  # then poll, as for every tool
        while True:
            infos = self._infos()
            if all(i["statename"] == "RUNNING" for i in infos):
                return
            time.sleep(POLL)

    def pids(self) -> dict[str, int]:
        return {i["name"]: i["pid"] for i in self._infos() if i["statename"] == "RUNNING"}

    def wait_new(self, name: str, old: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.rpc.supervisor.getProcessInfo(f"g:{name}")
            if info["statename"] == "RUNNING" and info["pid"] not in (0, old):
                return int(info["pid"])
            time.sleep(POLL)
        raise ToolError(f"supervisord: no new pid for {name}")

    def stop(self) -> None:
        self.rpc.supervisor.stopProcessGroup("g", False)
        while any(i["statename"] not in ("STOPPED", "EXITED", "FATAL") for i in self._infos()):
            time.sleep(POLL)

    def quit(self) -> dict[str, Any]:
        if self.proc is None:
            return {}
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, xmlrpc.client.Error, http.client.HTTPException):
                self.rpc.supervisor.shutdown()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return {}


def clean_env(**extra: str) -> dict[str, str]:
    """What every tool and agent is started with: no PORT, no pm2/keymetrics keys."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
           "LANG": "C.UTF-8"}
    env.update(extra)
    return env


# -- the tools ---------------------------------------------------------------------------
BASELINE = "baseline"
SHIPYARD = "shipyard"
SHIPYARD_NOCG = "shipyard-nocg"
PEERS = ("supervisord", "circus", "circus-fast", "pm2")
LABELS = {
    BASELINE: "bare asyncio (baseline)",
    SHIPYARD: "Shipyard",
    SHIPYARD_NOCG: "Shipyard, cgroups off",
    "supervisord": "supervisord",
    "circus": "circus",
    "circus-fast": f"circus, check_delay {FAST_CHECK_DELAY:g} s",
    "pm2": "pm2",
}


def make_driver(tool: str, run_dir: Path, peers: Peers) -> Driver:
    agent = str(HERE / "agent_shipyard.py")
    if tool == BASELINE:
        return AgentDriver(run_dir, tool, [PY, str(HERE / "agent_bare.py")], clean_env())
    if tool == SHIPYARD:
        return AgentDriver(run_dir, tool, [PY, agent], clean_env())
    if tool == SHIPYARD_NOCG:
        return AgentDriver(run_dir, tool, [PY, agent], clean_env(), {"cgroups": "off"})
    if tool == "supervisord":
        return SupervisorDriver(run_dir, peers)
    if tool in ("circus", "circus-fast"):
        extra = {"check_delay": FAST_CHECK_DELAY} if tool == "circus-fast" else {}
        return AgentDriver(run_dir, tool, [str(peers.venv_python), str(HERE / "agent_circus.py")],
                           clean_env(), extra)
    if tool == "pm2":
        env = clean_env(PM2_HOME=str(run_dir / "pm2home"), PM2_MODULE=str(peers.pm2_module))
        return AgentDriver(run_dir, tool, [peers.node, str(HERE / "agent_pm2.js")], env)
    raise ValueError(tool)


# -- checks ------------------------------------------------------------------------------
LOOPBACK = ("127.", "::1", "::ffff:127.")


def outside_loopback(pids: list[int]) -> list[str]:
    """Inet sockets of these processes bound or connected beyond 127.0.0.1."""
    found = []
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="inet")
        except psutil.Error:
            continue
        for c in conns:
            addrs = [a for a in (c.laddr, c.raddr) if a]
            if any(not a.ip.startswith(LOOPBACK) for a in addrs):
                found.append(f"pid {pid}: {c.laddr} -> {c.raddr} ({c.status})")
    return found


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            pass
    return out


def execd(pids: list[int], argv: list[str], timeout: float) -> bool:
    """Wait (up to `timeout` s) until every process runs `argv` (has exec'd it)."""
    deadline = time.monotonic() + timeout
    pending = list(pids)
    while pending:
        left = []
        for pid in pending:
            try:
                if psutil.Process(pid).cmdline() != argv:
                    left.append(pid)
            except psutil.Error:
                pass
        pending = left
        if pending:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
    return True


def leftovers(markers: list[str]) -> list[psutil.Process]:
    """Live processes (not us, not our ancestors) whose command line names a marker."""
    me = psutil.Process()
    skip = {me.pid, *(p.pid for p in me.parents())}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.pid in skip or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        cmd = " ".join(proc.info["cmdline"] or [])
        if any(m in cmd for m in markers):
            found.append(proc)
    return found


def kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=5)


# -- the measurements --------------------------------------------------------------------
@dataclass
class Results:
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, row: str, tool: str, value: float) -> None:
        self.samples.setdefault(row, {}).setdefault(tool, []).append(value)


class Bench:
    def __init__(self, peers: Peers, args: argparse.Namespace) -> None:
        self.peers = peers
        self.args = args
        self.res = Results()
        self.run_root = peers.scratch / "run"
        self.child = peers.scratch / "child.py"
        self.counter = 0
        self.live: list[Driver] = []
        self.rng = random.Random(7)
        self.session_argv: list[str] = []
        self.busy: list[float] = []
        self.waited = 0.0

    def quiet(self, limit: float) -> None:
        """Before a block of alternating runs: wait a little for the machine to be quiet
        (it may be shared); the readings go into the notes."""
        waited, busy = wait_quiet(limit)
        self.busy.append(busy)
        self.waited += waited
        if busy >= QUIET:
            log(f"  (machine still {busy:.0f}% busy after {waited:.0f} s)")

    def new_driver(self, tool: str, tag: str) -> Driver:
        self.counter += 1
        run_dir = self.run_root / f"{self.counter:03d}-{tag}-{tool}"
        run_dir.mkdir(parents=True)
        driver = make_driver(tool, run_dir, self.peers)
        self.live.append(driver)
        return driver

    def port_low(self) -> int:
        return 30000 + (self.counter % 2) * 1000  # Shipyard's default range, two halves

    def finish(self, driver: Driver, children: list[int]) -> None:
        """Quit the tool; anything of it left running is a leak: reported, then killed."""
        reply = driver.quit()
        if reply.get("error"):
            self.res.problems.append(f"{driver.name}: quit: {reply['error']}")
        if reply.get("cgroups_left"):
            self.res.problems.append(f"{driver.name}: instance cgroups left after close: "
                                     f"{reply['cgroups_left']}")
        if reply.get("cgroup_dirs_left") and not any(
                "empty top cgroup" in n for n in self.res.notes):
            self.res.notes.append(
                "Shipyard leaves its empty top cgroup directories (shipyard-<hash of home>, "
                "one per hierarchy) after Engine.close(); the harness removes them")
        deadline = time.monotonic() + 5
        left = alive([*children, *driver.own_pids()])
        while left and time.monotonic() < deadline:
            time.sleep(0.05)
            left = alive(left)
        if left:
            self.res.problems.append(f"{driver.name}: {len(left)} process(es) still running "
                                     f"after the tool was shut down: {left[:10]}")
            kill_all([psutil.Process(p) for p in left if psutil.pid_exists(p)])
        with contextlib.suppress(ValueError):
            self.live.remove(driver)

    def net_check(self, driver: Driver) -> None:
        for problem in outside_loopback(driver.own_pids()):
            self.res.problems.append(f"{driver.name}: socket beyond 127.0.0.1: {problem}")

    # cold start (+ graceful stop of what was started)
    def cold(self, tool: str, wl: Workload) -> None:
        driver = self.new_driver(tool, wl.key)
        children: list[int] = []
        try:
            driver.setup(wl, self.port_low())
            t0 = time.perf_counter()
            driver.start()
            reported = time.perf_counter() - t0
            pids = driver.pids()
            children = list(pids.values())
            if len(pids) != wl.n or len(alive(children)) != wl.n:
                raise ToolError(f"{tool}: {len(pids)} reported, {len(alive(children))} alive,"
                                f" {wl.n} wanted")
            # Running means running the program: supervisord (startsecs=0) reports RUNNING
            # right after its fork, before the exec. The figure is the later of the report
            # and every child having exec'd (checked after the report, so as not to load
            # the machine while the tool works).
            started = reported
            if not execd(children, wl.argv, 0.0):
                if not execd(children, wl.argv, 10.0):
                    raise ToolError(f"{tool}: children not running their program after 10 s")
                started = time.perf_counter() - t0
            self.res.add(f"reported:{wl.key}", tool, reported)
            self.net_check(driver)
            # (a SIGTERM that reached a supervisord fork before its exec would be swallowed
            # by the inherited Python handler: the stop would then wait stopwaitsecs)
            time.sleep(0.2)
            t0 = time.perf_counter()
            driver.stop()
            while alive(children):  # the tool said stopped: the processes must be gone too
                time.sleep(0.001)
            stopped = time.perf_counter() - t0
            self.res.add(f"start:{wl.key}", tool, started)
            self.res.add(f"stop:{wl.key}", tool, stopped)
            log(f"  {tool:14s} {wl.label}: start {started * 1000:7.0f} ms, "
                f"stop {stopped * 1000:6.0f} ms")
        except (ToolError, OSError, xmlrpc.client.Error, http.client.HTTPException) as exc:
            self.res.problems.append(f"{tool} {wl.label}: {exc}")
            log(f"  {tool} {wl.label}: FAILED {exc}")
        finally:
            self.finish(driver, children)

    # idle, crash-restart: all tools with 100 idle children each, side by side
    def session(self, tools: list[str], wl: Workload, idle_s: float, kills: int) -> None:
        drivers: dict[str, Driver] = {}
        children: dict[str, list[int]] = {}
        self.session_argv = wl.argv
        try:
            for tool in tools:
                d = self.new_driver(tool, "session")
                try:
                    d.setup(wl, self.port_low())
                    d.start()
                except (ToolError, OSError, xmlrpc.client.Error,
                        http.client.HTTPException) as exc:
                    self.res.problems.append(f"{tool} session start: {exc}")
                    self.finish(d, [])
                    continue
                drivers[tool] = d
                children[tool] = list(d.pids().values())
            time.sleep(SETTLE)
            self.idle(drivers, idle_s)
            for tool, d in drivers.items():
                self.crash(tool, d, kills)
                children[tool] = list(set(children[tool]) | set(d.pids().values()))
                self.net_check(d)
        finally:
            for tool, d in drivers.items():
                with contextlib.suppress(ToolError, OSError, xmlrpc.client.Error,
                                         http.client.HTTPException):
                    children[tool] = list(set(children[tool]) | set(d.pids().values()))
                self.finish(d, children.get(tool, []))

    def idle(self, drivers: dict[str, Driver], idle_s: float) -> None:
        procs = {tool: [psutil.Process(p) for p in d.control_pids] for tool, d in drivers.items()}
        cpu0 = {tool: sum(_cpu(p) for p in ps) for tool, ps in procs.items()}
        rss_peak = dict.fromkeys(procs, 0)
        load0 = psutil.cpu_times()
        end = time.monotonic() + idle_s
        while True:
            for tool, ps in procs.items():
                rss_peak[tool] = max(rss_peak[tool], sum(_rss(p) for p in ps))
            if time.monotonic() >= end:
                break
            time.sleep(min(1.0, max(0.0, end - time.monotonic())))
        load1 = psutil.cpu_times()
        busy = ((load1.user + load1.system) - (load0.user + load0.system)) / idle_s
        self.res.notes.append(f"idle window: the whole machine was busy {busy * 100:.0f}% of "
                              "one core (processes other than the idle control planes)")
        for tool, ps in procs.items():
            cpu = sum(_cpu(p) for p in ps) - cpu0[tool]
            self.res.add("idle:rss", tool, rss_peak[tool] / 2**20)
            self.res.add("idle:cpu", tool, cpu)
            log(f"  {tool:14s} idle {idle_s:g} s: RSS {rss_peak[tool] / 2**20:6.1f} MiB, "
                f"CPU {cpu * 1000:.1f} ms")

    def crash(self, tool: str, d: Driver, kills: int) -> None:
        latencies: list[float] = []
        try:
            names = sorted(d.pids())
            targets = [names[(i * len(names)) // kills] for i in range(kills)]
            for name in targets:
                time.sleep(self.rng.uniform(0, TIMER.get(tool, OTHER_TIMER)))
                old = d.pids()[name]
                t0 = time.perf_counter()
                os.kill(old, signal.SIGKILL)
                new = d.wait_new(name, old, timeout=30.0)
                latency = time.perf_counter() - t0
                if new and not execd([new], self.session_argv, 0.0):  # reported before its exec
                    execd([new], self.session_argv, 10.0)
                    latency = time.perf_counter() - t0
                latencies.append(latency)
                time.sleep(CRASH_SETTLE)
        except (ToolError, OSError, KeyError, xmlrpc.client.Error,
                http.client.HTTPException) as exc:
            self.res.problems.append(f"{tool} crash-restart: {exc!r}")
        if latencies:
            self.res.add("crash:p50", tool, pct(latencies, 50))
            self.res.add("crash:p95", tool, pct(latencies, 95))
            log(f"  {tool:14s} crash-restart x{len(latencies)}: p50 "
                f"{pct(latencies, 50) * 1000:6.1f} ms, p95 {pct(latencies, 95) * 1000:6.1f} ms")


def _cpu(p: psutil.Process) -> float:
    """CPU seconds of the process so far, to the nanosecond: the sum of its threads'
    schedstat run times (psutil's cpu_times counts 10 ms clock ticks)."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{p.pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError), \
                    open(f"/proc/{p.pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    except OSError:
        return 0.0
    return total / 1e9


def _rss(p: psutil.Process) -> int:
    try:
        return int(p.memory_info().rss)
    except psutil.Error:
        return 0


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


QUIET = 10.0  # percent of the machine


def wait_quiet(limit: float) -> tuple[float, float]:
    """Wait (up to `limit` seconds) until the machine is under QUIET percent busy over
    1 s; returns how long we waited and the last reading."""
    t0 = time.monotonic()
    while True:
        busy = psutil.cpu_percent(interval=1.0)
        if busy < QUIET or time.monotonic() - t0 >= limit:
            return time.monotonic() - t0, busy


def rotated(items: list[str], k: int) -> list[str]:
    k %= len(items)
    return items[k:] + items[:k]


# -- the report --------------------------------------------------------------------------
@dataclass
class Row:
    key: str
    label: str
    unit: str  # "ms", "MiB", "s"


def fmt(values: list[float] | None, unit: str) -> str:
    if not values:
        return "—"
    scale = 1000.0 if unit == "ms" else 1.0
    digits = 0 if unit == "ms" else (1 if unit == "MiB" else 2)
    if unit == "ms" and statistics.median(values) * scale < 10:
        digits = 1
    med, lo, hi = (statistics.median(values) * scale, min(values) * scale,
                   max(values) * scale)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} [{lo:.{digits}f}{DASH}{hi:.{digits}f}]"


def report(res: Results, rows: list[Row], tools: list[str]) -> str:
    head = ["", *(LABELS[t] for t in tools), "Shipyard ÷ best peer", "Shipyard ÷ baseline"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        data = res.samples.get(row.key, {})
        if not data:
            continue
        cells = [f"{row.label} ({row.unit})", *(fmt(data.get(t), row.unit) for t in tools)]
        sy = data.get(SHIPYARD)
        peer_meds = {t: statistics.median(data[t]) for t in PEERS if data.get(t)}
        base = data.get(BASELINE)
        if sy and peer_meds:
            best = min(peer_meds, key=lambda t: peer_meds[t])
            ratio = _ratio(statistics.median(sy), peer_meds[best])
            cells.append(f"{ratio} ({LABELS[best]})")
        else:
            cells.append("—")
        cells.append(_ratio(statistics.median(sy), statistics.median(base))
                     if sy and base else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    if b <= 0:
        return "—"
    return f"{a / b:.2f}{TIMES}"


# -- main --------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/shipyard-peers"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: N=20, 1 repetition, 5 kills, 5 s idle")
    parser.add_argument("--quiet-wait", type=float, default=10.0,
                        help="before each block of runs, wait up to this many seconds for "
                             "the machine to be under 10%% busy (default 10)")
    parser.add_argument("--json", type=Path, default=None,
                        help="write the raw samples here (default: SCRATCH/results.json)")
    args = parser.parse_args()
    scratch: Path = args.scratch.expanduser().resolve()
    if scratch == REPO or REPO in scratch.parents:
        parser.error("--scratch must be outside the repository")
    scratch.mkdir(parents=True, exist_ok=True)
    reps, sizes, kills, idle_s = args.reps, (100, 300), 20, 30.0
    if args.quick:
        reps, sizes, kills, idle_s = 1, (20,), 5, 5.0

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    t_begin = time.monotonic()
    peers = install(scratch)
    run_root = scratch / "run"
    markers = [str(scratch), str(HERE / "agent_"), f"/bin/sleep {SLEEP_ARG}"]
    stale = leftovers(markers)
    if stale:
        log(f"killing {len(stale)} process(es) left by an earlier run")
        kill_all(stale)
    shutil.rmtree(run_root, ignore_errors=True)
    run_root.mkdir()
    shutil.copy(HERE / "child.py", scratch / "child.py")
    child = [PY, str(scratch / "child.py")]
    sleeper = ["/bin/sleep", SLEEP_ARG]

    bench = Bench(peers, args)
    cold_tools = [BASELINE, SHIPYARD, SHIPYARD_NOCG, "supervisord", "circus", "pm2"]
    ready_tools = [BASELINE, SHIPYARD, SHIPYARD_NOCG]
    session_tools = [BASELINE, SHIPYARD, "supervisord", "circus", "circus-fast", "pm2"]
    workloads: list[Workload] = []
    for n in sizes:
        workloads += [Workload(f"py{n}", f"{n} x venv python", child, n),
                      Workload(f"sleep{n}", f"{n} x /bin/sleep", sleeper, n),
                      Workload(f"ready{n}", f"{n} x venv python, until ready (tcp probe)",
                               child, n, ready=True)]
    session_wl = Workload("idle", "100 idle venv python", child, 20 if args.quick else 100)
    code = 0
    try:
        for rep in range(reps):
            log(f"repetition {rep + 1}/{reps}")
            for wl in workloads:
                bench.quiet(args.quiet_wait)
                tools = ready_tools if wl.ready else cold_tools
                if wl.n != sizes[0]:  # the cgroup-less variant: at the first size only
                    tools = [t for t in tools if t != SHIPYARD_NOCG]
                for tool in rotated(tools, rep):
                    bench.cold(tool, wl)
            bench.quiet(args.quiet_wait)
            log(f" side by side, {session_wl.n} idle children each: idle {idle_s:g} s, "
                f"{kills} kills")
            bench.session(rotated(session_tools, rep), session_wl, idle_s, kills)
    except KeyboardInterrupt as exc:
        bench.res.problems.append(f"interrupted: {exc}")
        code = 1
    finally:
        for d in list(bench.live):
            bench.finish(d, [])
        left = leftovers(markers)
        if left:
            bench.res.problems.append(
                f"{len(left)} process(es) left at the end, killed: "
                + "; ".join(f"{p.pid} {' '.join(p.info['cmdline'] or [])[:100]}"
                            for p in left[:10]))
            kill_all(left)
        still = leftovers(markers)
        if still:
            bench.res.problems.append(f"{len(still)} process(es) survive SIGKILL: "
                                      f"{[p.pid for p in still]}")
    if bench.busy:
        bench.res.notes.append(
            f"before each block of runs the machine was {statistics.median(bench.busy):.0f}% "
            f"busy (median; max {max(bench.busy):.0f}%) of {os.cpu_count()} cores; "
            f"{bench.waited:.0f} s were spent waiting for quiet")
    if src_digest() not in peers.versions["shipyard"]:
        bench.res.notes.append(f"WARNING: Shipyard's source changed during the run (digest "
                               f"now {src_digest()}): its figures may mix two versions")
    n = sizes
    rows = []
    for size in n:
        rows += [Row(f"start:py{size}", f"cold start, {size} {TIMES} venv python, until running",
                     "ms"),
                 Row(f"start:sleep{size}", f"cold start, {size} {TIMES} /bin/sleep, until running",
                     "ms"),
                 Row(f"start:ready{size}", f"cold start, {size} {TIMES} venv python, until ready "
                     "(tcp probe every 50 ms)", "ms")]
    rows += [Row("crash:p50", f"crash-restart p50, {kills} kills", "ms"),
             Row("crash:p95", f"crash-restart p95, {kills} kills", "ms"),
             Row("idle:rss", f"control plane RSS, {session_wl.n} idle children", "MiB"),
             Row("idle:cpu", f"control plane CPU over {idle_s:g} s idle", "ms")]
    for size in n:
        rows += [Row(f"stop:py{size}", f"graceful stop, {size} {TIMES} venv python", "ms"),
                 Row(f"stop:sleep{size}", f"graceful stop, {size} {TIMES} /bin/sleep", "ms"),
                 Row(f"stop:ready{size}", f"graceful stop, {size} {TIMES} venv python (probed)",
                     "ms")]
    tools = [BASELINE, SHIPYARD, SHIPYARD_NOCG, "supervisord", "circus", "circus-fast", "pm2"]
    table = report(bench.res, rows, tools)
    reported = report(bench.res, [Row(r.key.replace("start:", "reported:"), r.label, r.unit)
                                  for r in rows if r.key.startswith("start:")], tools)
    elapsed = time.monotonic() - t_begin
    print(f"# Side by side: {reps} repetition(s), median [min{DASH}max]; {elapsed:.0f} s in all\n")
    print(table)
    print("\nCold start as the tools report it (before checking that every child has exec'd):"
          "\n")
    print(reported)
    print("\nversions: " + "; ".join(f"{k} {v}" for k, v in peers.versions.items()))
    for note in dict.fromkeys(bench.res.notes):
        print(f"note: {note}")
    for problem in bench.res.problems:
        print(f"PROBLEM: {problem}")
    out = args.json or scratch / "results.json"
    out.write_text(json.dumps({"versions": peers.versions, "samples": bench.res.samples,
                               "problems": bench.res.problems, "notes": bench.res.notes,
                               "reps": reps, "kills": kills, "idle_s": idle_s,
                               "elapsed_s": elapsed}, indent=2))
    print(f"raw samples: {out}")
    if bench.res.problems:
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
