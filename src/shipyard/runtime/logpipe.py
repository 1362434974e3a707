"""The control plane's side of the log relay (runtime/logrelay.py).

`LogPipes.open(spec)` makes the named pipe an instance writes its output to and asks the
relay to carry it into the instance's log file; `adopt()` does the same for an instance a
restarted control plane re-adopts. The relay is started on first use, one per Shipyard
home (found by an abstract socket name derived from the home), and started again, with
every live pipe re-attached, if it dies. Until the relay has acknowledged a pipe the
control plane keeps it open too, so output written by an instance that exits at once is
never lost with the pipe.

While no relay reads a pipe (a gap of milliseconds when it is restarted), an instance can
write the pipe's buffer (1 MiB where the host allows) before its writes wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import secrets
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shipyard.runtime.base import LaunchSpec
from shipyard.runtime.logrelay import decode, encode

log = logging.getLogger("shipyard.runtime.logpipe")

RELAY_SCRIPT = str(Path(__file__).with_name("logrelay.py"))
PIPE_SIZE = 1 << 20
ACK_WAIT = 5.0  # seconds close() waits for the relay to acknowledge the last pipes
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

Notice = dict[str, Any]


@dataclass(frozen=True)
class Attach:
    fifo: str
    log: str
    max_bytes: int
    backups: int
    key: str  # "stack/instance"

    def message(self) -> bytes:
        return encode("attach", self.fifo, self.log, self.max_bytes, self.backups, self.key)


def pipes_dir(home: Path) -> Path:
    """Where a home's pipes are made: on a tmpfs when there is one we own (making a
    FIFO on a busy ext4 can take a millisecond, on a tmpfs 2 µs; pipes mean nothing
    after a reboot anyway), else in home/run/pipes."""
    digest = hashlib.sha1(str(home.resolve()).encode()).hexdigest()[:16]
    for base in (os.environ.get("XDG_RUNTIME_DIR"), "/dev/shm"):
        if not base or not os.path.isdir(base):
            continue
        top = Path(base) / f"shipyard-{os.getuid()}"
        with contextlib.suppress(FileExistsError, OSError):
            top.mkdir(mode=0o700)
        try:
            st = os.lstat(top)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() \
                and not st.st_mode & 0o077:  # ours alone, not a planted link
            return top / digest
    return home / "run" / "pipes"


def pipe_record(fifo: str, spec: LaunchSpec) -> dict[str, str]:
    """What an instance's handle keeps of its pipe, for `LogPipes.readopt`."""
    return {"log_fifo": fifo, "log_path": spec.log_path,
            "log_rotate": f"{spec.log_max_bytes}:{spec.log_backups}"}


def _notice(fields: list[str]) -> Notice | None:
    """A relay's line as a dict: {"ev": "attached"|"failed"|"dropped"|"resumed", ...}."""
    match fields:
        case ["attached", fifo]:
            return {"ev": "attached", "fifo": fifo}
        case ["failed", fifo, error]:
            return {"ev": "failed", "fifo": fifo, "error": error}
        case ["dropped", key, log, error]:
            return {"ev": "dropped", "key": key, "log": log, "error": error}
        case ["resumed", key, log, dropped] if dropped.isdigit():
            return {"ev": "resumed", "key": key, "log": log, "dropped": int(dropped)}
    return None


def relay_address(home: Path | str) -> str:
    """The relay's abstract socket name for a home (a leading NUL: no file, no path
    length limit; only the relay's own uid is served)."""
    digest = hashlib.sha1(str(Path(home).resolve()).encode()).hexdigest()[:16]
    return f"\0shipyard-logs-{digest}"


class LogPipes:
    """Named pipes for instance output, carried to log files by the home's relay."""

    def __init__(self, home: Path | str, *,
                 on_notice: Callable[[Notice], None] | None = None) -> None:
        self.home = Path(home)
        self.pipes_dir = pipes_dir(self.home)
        self.address = relay_address(self.home)
        self.on_notice = on_notice
        self._attached: dict[str, Attach] = {}  # live pipes, re-sent to a new relay
        self._held: dict[str, int] = {}  # fifo -> our fd, until the relay acknowledged
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._retrying: asyncio.Task[None] | None = None
        self._acked: asyncio.Future[None] | None = None  # set at close: all acknowledged
        self._adopting: set[asyncio.Task[bool]] = set()
        self._connecting: asyncio.Lock | None = None
        self._relay: subprocess.Popen[bytes] | None = None
        self._closed = False

    @property
    def relay_pid(self) -> int | None:
        """The relay this control plane started, while it runs (None: none, or one
        started by an earlier control plane)."""
        self._reap()
        return self._relay.pid if self._relay is not None else None

    # -- per instance -----------------------------------------------------------------
    async def open(self, fifo_name: str, attach_log: str, max_bytes: int, backups: int,
                   key: str) -> tuple[int, str]:
        """A new pipe for an instance: (an fd for the child's stdout and stderr, which the
        caller closes once the child has it, and the pipe's path for re-adoption)."""
        fifo = str(self.pipes_dir / f"{fifo_name}.{secrets.token_hex(4)}.fifo")
        try:
            os.mkfifo(fifo, 0o600)
        except FileNotFoundError:  # first pipe, or a relay leaving removed the directory
            self.pipes_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.mkfifo(fifo, 0o600)
        try:
            fd = os.open(fifo, os.O_RDWR | os.O_CLOEXEC)
            with contextlib.suppress(OSError):  # a host limit: keep the default 64 KiB
                fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
            self._held[fifo] = os.dup(fd)
            os.set_inheritable(self._held[fifo], False)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(fifo)
            raise
        att = Attach(fifo, attach_log, max_bytes, backups, key)
        self._attached[fifo] = att
        try:
            await self._send(att)
        except OSError as exc:  # no relay: the pipe is held, and re-sent when one runs
            log.warning("log relay unavailable (%s); output of %s waits in its pipe",
                        exc, key)
            self._retry_soon()
        return fd, fifo

    async def adopt(self, fifo: str, attach_log: str, max_bytes: int, backups: int,
                    key: str) -> bool:
        """Carry on with the pipe of a re-adopted instance; False if it is gone (the
        instance then writes to a pipe no one can open again)."""
        if not os.path.exists(fifo):
            return False
        if Path(fifo).parent != self.pipes_dir:
            # another home's pipe (an HA take-over on the same host): that home's relay
            # carries it on, independent of the control plane that made it
            return False
        att = Attach(fifo, attach_log, max_bytes, backups, key)
        self._attached[fifo] = att
        try:
            await self._send(att)
        except OSError:
            self._retry_soon()
        return True

    def readopt(self, record: Mapping[str, str], key: str) -> None:
        """`adopt()` the pipe of `pipe_record`, in the background (awaited by close)."""
        max_bytes, _, backups = record.get("log_rotate", "0:0").partition(":")
        task = asyncio.get_running_loop().create_task(self.adopt(
            record["log_fifo"], record.get("log_path", os.devnull), int(max_bytes or 0),
            int(backups or 0), key))
        self._adopting.add(task)
        task.add_done_callback(self._adopting.discard)

    def discard(self, fifo: str) -> None:
        """A pipe whose instance never started: remove it now (a relay reading it already
        finishes it at end of file, as always)."""
        self._attached.pop(fifo, None)
        fd = self._held.pop(fifo, None)
        if fd is not None:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(fifo)

    def forget(self, fifo: str) -> None:
        """The instance has exited: the relay finishes its pipe on its own (end of file)
        and it is not re-attached any more."""
        self._attached.pop(fifo, None)

    # -- the connection ---------------------------------------------------------------
    def _retry_soon(self) -> None:
        """Keep trying to reach (or start) a relay in the background, every second, for
        as long as pipes are waiting for one."""
        if self._retrying is None or self._retrying.done():
            self._retrying = asyncio.create_task(self._retry(), name="log-relay-retry")

    async def _retry(self) -> None:
        while not self._closed and self._attached:
            await asyncio.sleep(1.0)
            try:
                await self._connect()  # re-sends every pipe
                return
            except OSError as exc:
                log.warning("log relay still unavailable: %s", exc)

    async def _send(self, att: Attach) -> None:
        writer = await self._connect()
        writer.write(att.message())

    async def _connect(self) -> asyncio.StreamWriter:
        if self._writer is not None and not self._writer.is_closing():
            return self._writer
        if self._closed:
            raise OSError(errno.ESHUTDOWN, "closed")
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._writer is not None and not self._writer.is_closing():
                return self._writer
            sock = self._relay_socket()
            reader, writer = await asyncio.open_unix_connection(sock=sock)
            self._writer = writer
            for att in list(self._attached.values()):  # a new relay: everything again
                writer.write(att.message())
            self._reader_task = asyncio.create_task(self._read(reader, writer),
                                                    name="log-relay")
            return writer

    def _relay_socket(self) -> socket.socket:
        """A connected socket to the home's relay, starting one if none runs."""
        for _ in range(3):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.address)
                return sock
            except OSError:
                sock.close()
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                listener.bind(self.address)
            except OSError as exc:  # another one is starting: connect to it
                listener.close()
                if exc.errno != errno.EADDRINUSE:
                    raise
                continue
            listener.listen(128)
            try:
                self._start_relay(listener)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(self.address)  # queued in the backlog until it accepts
                return sock
            finally:
                listener.close()
        raise OSError(errno.ECONNREFUSED, "cannot reach or start the log relay")

    def _start_relay(self, listener: socket.socket) -> None:
        self._reap()
        errors = self.home / "logs" / "relay.log"
        errors.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(errors, "ab") as err:
            self._relay = subprocess.Popen(
                [sys.executable, "-I", "-S", RELAY_SCRIPT, "--fd", str(listener.fileno())],
                pass_fds=(listener.fileno(),), stdin=subprocess.DEVNULL, stdout=err,
                stderr=err, start_new_session=True, close_fds=True)

    def _reap(self) -> None:
        if self._relay is not None and self._relay.poll() is not None:
            self._relay = None

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                notice = _notice(decode(line.rstrip(b"\n")))
                if notice is not None:
                    self._handle(notice)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            if self._writer is writer:
                self._writer = None
            self._reap()
        if not self._closed and self._attached:  # the relay died: start another
            log.warning("log relay connection lost; starting a new relay")
            try:
                await self._connect()
            except OSError:
                self._retry_soon()

    def _handle(self, msg: Notice) -> None:
        ev = msg.get("ev")
        if ev in ("attached", "failed"):
            fd = self._held.pop(str(msg.get("fifo")), None)
            if fd is not None:
                os.close(fd)
            if not self._held and self._acked is not None and not self._acked.done():
                self._acked.set_result(None)
            if ev == "failed":
                log.warning("log relay cannot open %s: %s", msg.get("fifo"), msg.get("error"))
        elif self.on_notice is not None:
            try:
                self.on_notice(msg)
            except Exception:  # a notice handler must not end the connection
                log.exception("log relay notice %s", msg)

    async def close(self) -> None:
        """Disconnect; the relay goes on carrying the output of instances left running,
        and exits on its own once it has none."""
        if self._adopting:
            await asyncio.wait(self._adopting)
        self._closed = True
        if self._held and self._writer is not None and not self._writer.is_closing():
            # pipes the relay has not acknowledged yet: an instance that exited at once
            # has its last words there only while someone holds the pipe open
            self._acked = asyncio.get_running_loop().create_future()
            await asyncio.wait([self._acked], timeout=ACK_WAIT)
        if self._writer is not None:
            self._writer.close()
        for task in (self._reader_task, self._retrying):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for fd in self._held.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._held.clear()
        self._reap()
