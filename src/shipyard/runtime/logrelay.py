"""The log relay: a small process, one per Shipyard home, that carries the output of
every instance from a pipe into its log file.

Why a process of its own: an instance must outlive its control plane (kill -9, upgrade)
without losing output or stalling, and must keep running when the log disk is full.
Each instance's stdout and stderr are a named pipe (FIFO) that the instance holds open
for reading *and* writing, so it never gets SIGPIPE whoever reads; this relay reads every
pipe and appends to the log files. When a write fails (ENOSPC, EIO...) the output is
dropped, not buffered: the instance keeps running, the relay tells the control plane
("dropped", then "resumed" with the number of bytes lost) and writes a marker line into
the log once it can write again. The relay also rotates the files it writes (rename
rotation: no line is lost).

It imports only the standard library and is run by path (`python -I -S logrelay.py
--fd N`), never as part of the `shipyard` package, so it starts in milliseconds. The
control plane makes the listening socket (a Linux abstract unix socket: no path-length
limit) and hands it over as fd N, so it can connect before the relay has even started.
Only connections from the relay's own uid are served.

Protocol, one JSON object per line:
- control plane → relay: {"op": "attach", "fifo", "log", "max_bytes", "backups", "key"}
  (idempotent: an attached fifo is only acknowledged again);
- relay → control plane: {"ev": "attached", "fifo"}; {"ev": "dropped", "key", "log",
  "error"}; {"ev": "resumed", "key", "log", "dropped"}; {"ev": "failed", "fifo", "error"}.
Notices written while no control plane is connected are kept (the last 1,000) for the
next one.

A pipe is read until end of file: when the instance and every process that inherited
its output have exited. The relay exits once it has no pipe and no connection left.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import socket
import struct
import sys
import time
from collections import deque
from typing import Any

CHUNK = 64 * 1024
READS_PER_WAKE = 16  # bounded work per pipe per wake-up: one chatty instance cannot starve
NOTICES_KEPT = 1000
STARTUP_GRACE = 5.0  # seconds to wait for a first connection before exiting idle


class Sink:
    """One instance's pipe and the log file it goes to."""

    def __init__(self, fifo: str, fd: int, log: str, max_bytes: int, backups: int,
                 key: str) -> None:
        self.fifo = fifo
        self.fd = fd
        self.log = log
        self.max_bytes = max_bytes
        self.backups = backups
        self.key = key
        self.out: int | None = None
        self.size = 0
        self.dropped = 0  # bytes lost in the current episode
        self.error: str | None = None  # why, while dropping

    def open_log(self) -> None:
        self.out = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                           0o640)
        self.size = os.fstat(self.out).st_size

    def close(self) -> None:
        for fd in (self.fd, self.out):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.out = None

    def write(self, data: bytes) -> list[dict[str, Any]]:
        """Append `data` to the log; the notices this caused (a drop starting, or ending
        with this write)."""
        notices: list[dict[str, Any]] = []
        try:
            if self.out is None:
                self.open_log()
            assert self.out is not None
            if self.error is not None:  # writable again: say what was lost, then go on
                marker = (f"[shipyard] {self.dropped} bytes of output dropped: "
                          f"{self.error}\n").encode()
                self._write_all(marker)
                notices.append({"ev": "resumed", "key": self.key, "log": self.log,
                                "dropped": self.dropped})
                self.error, self.dropped = None, 0
            self._write_all(data)
        except OSError as exc:
            left = len(data) - getattr(exc, "written", 0)
            if self.error is None:
                self.error = exc.strerror or str(exc)
                notices.append({"ev": "dropped", "key": self.key, "log": self.log,
                                "error": self.error})
            self.dropped += left
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) and self.out is not None:
                # the file may be gone or broken: reopen it next time
                with contextlib.suppress(OSError):
                    os.close(self.out)
                self.out = None
            return notices
        if self.max_bytes > 0 and self.size > self.max_bytes:
            self.rotate()
        return notices

    def _write_all(self, data: bytes) -> None:
        assert self.out is not None
        view = memoryview(data)
        written = 0
        while written < len(view):
            try:
                n = os.write(self.out, view[written:])
            except OSError as exc:
                exc.written = written  # type: ignore[attr-defined]
                raise
            written += n
            self.size += n

    def rotate(self) -> None:
        """Shift `.1`→`.2`… (the oldest dropped), the file to `.1`, and start a new one.
        Readers following the file see it replaced (logs.follow handles that)."""
        try:
            if self.backups <= 0:
                assert self.out is not None
                os.ftruncate(self.out, 0)
                self.size = 0
                return
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.log}.{self.backups}")
            for n in range(self.backups - 1, 0, -1):
                with contextlib.suppress(FileNotFoundError):
                    os.replace(f"{self.log}.{n}", f"{self.log}.{n + 1}")
            os.replace(self.log, f"{self.log}.1")
        except OSError:
            return  # keep writing to the current file; tried again after the next write
        if self.out is not None:
            with contextlib.suppress(OSError):
                os.close(self.out)
        self.out = None
        with contextlib.suppress(OSError):
            self.open_log()


class Relay:
    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.uid = os.getuid()
        self.sel = selectors.DefaultSelector()
        listener.setblocking(False)
        self.sel.register(listener, selectors.EVENT_READ, None)
        self.clients: dict[socket.socket, bytearray] = {}
        self.sinks: dict[str, Sink] = {}
        self.pending: deque[dict[str, Any]] = deque(maxlen=NOTICES_KEPT)
        self.had_client = False
        self.started = time.monotonic()

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> None:
        while True:
            idle = not self.sinks and not self.clients
            if idle and (self.had_client or time.monotonic() - self.started > STARTUP_GRACE):
                return
            for key, _ in self.sel.select(timeout=1.0 if idle else None):
                target = key.data
                if target is None:
                    self.accept()
                elif isinstance(target, Sink):
                    self.pump(target)
                else:
                    self.receive(key.fileobj)  # type: ignore[arg-type]

    def accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != self.uid:
            conn.close()
            return
        conn.setblocking(True)  # replies are small; a full buffer means a stuck client
        conn.settimeout(5.0)
        self.clients[conn] = bytearray()
        self.had_client = True
        self.sel.register(conn, selectors.EVENT_READ, "client")
        while self.pending:
            if not self.send(conn, self.pending.popleft()):
                break

    def receive(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(CHUNK)
        except OSError:
            data = b""
        if not data:
            self.drop_client(conn)
            return
        buf = self.clients[conn]
        buf += data
        while (nl := buf.find(b"\n")) >= 0:
            line = bytes(buf[:nl])
            del buf[:nl + 1]
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if isinstance(msg, dict) and msg.get("op") == "attach":
                self.attach(conn, msg)

    def attach(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        fifo = str(msg.get("fifo", ""))
        if fifo not in self.sinks:
            try:
                fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                self.send(conn, {"ev": "failed", "fifo": fifo,
                                 "error": exc.strerror or str(exc)})
                return
            sink = Sink(fifo, fd, str(msg.get("log", os.devnull)),
                        int(msg.get("max_bytes", 0)), int(msg.get("backups", 0)),
                        str(msg.get("key", "")))
            self.sinks[fifo] = sink
            self.sel.register(fd, selectors.EVENT_READ, sink)
        self.send(conn, {"ev": "attached", "fifo": fifo})

    def pump(self, sink: Sink) -> None:
        for _ in range(READS_PER_WAKE):
            try:
                data = os.read(sink.fd, CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # every writer is gone: the instance has ended
                self.sel.unregister(sink.fd)
                sink.close()
                del self.sinks[sink.fifo]
                with contextlib.suppress(OSError):
                    os.unlink(sink.fifo)
                return
            for notice in sink.write(data):
                self.notify(notice)

    # -- talking to control planes ---------------------------------------------------
    def notify(self, notice: dict[str, Any]) -> None:
        delivered = False
        for conn in list(self.clients):
            delivered = self.send(conn, notice) or delivered
        if not delivered:
            self.pending.append(notice)

    def send(self, conn: socket.socket, msg: dict[str, Any]) -> bool:
        try:
            conn.sendall(json.dumps(msg).encode() + b"\n")
        except OSError:
            self.drop_client(conn)
            return False
        return True

    def drop_client(self, conn: socket.socket) -> None:
        if conn in self.clients:
            del self.clients[conn]
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(conn)
            conn.close()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--fd":
        print("usage: logrelay.py --fd N (a listening unix socket)", file=sys.stderr)
        return 2
    listener = socket.socket(fileno=int(argv[1]))
    os.set_inheritable(listener.fileno(), False)
    Relay(listener).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
