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

Protocol: one message per line, its fields separated by tabs (`encode`/`decode`: a
backslash, tab or newline inside a field is escaped):
- control plane → relay: `attach fifo log max_bytes backups key` (idempotent: an
  attached fifo is only acknowledged again);
- relay → control plane: `attached fifo`; `failed fifo error`; `dropped key log error`;
  `resumed key log bytes`.
Notices written while no control plane is connected are kept (the last 1,000) for the
next one.

It imports as little as it can (`_socket` and `select`, no json, selectors or
contextlib): it runs for as long as instances do, so its memory counts (≈9 MiB RSS,
most of it the interpreter's).

A pipe is read until end of file: when the instance and every process that inherited
its output have exited. The relay exits once it has no pipe and no connection left.
"""

# contextlib costs the relay 0.6 MiB of memory for as long as instances run:
# ruff: noqa: SIM105

from __future__ import annotations

import _socket
import errno
import os
import select
import sys
import time

CHUNK = 64 * 1024
READS_PER_WAKE = 16  # bounded work per pipe per wake-up: one chatty instance cannot starve
NOTICES_KEPT = 1000
STARTUP_GRACE = 5.0  # seconds to wait for a first connection before exiting idle
_ESCAPES = (("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"))


def encode(*fields: object) -> bytes:
    """One protocol line."""
    out = []
    for field in fields:
        text = str(field)
        for raw, escaped in _ESCAPES:
            text = text.replace(raw, escaped)
        out.append(text)
    return ("\t".join(out) + "\n").encode("utf-8", "surrogateescape")


def decode(line: bytes) -> list[str]:
    """The fields of one protocol line (without its newline)."""
    fields = []
    for text in line.decode("utf-8", "surrogateescape").split("\t"):
        if "\\" in text:
            chars, i = [], 0
            while i < len(text):
                c = text[i]
                if c == "\\" and i + 1 < len(text):
                    i += 1
                    c = {"t": "\t", "n": "\n"}.get(text[i], text[i])
                chars.append(c)
                i += 1
            text = "".join(chars)
        fields.append(text)
    return fields


def _close(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


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
        _close(self.fd)
        _close(self.out)
        self.out = None

    def write(self, data: bytes) -> list[dict[str, object]]:
        """Append `data` to the log; the notices this caused (a drop starting, or ending
        with this write): {"ev": "dropped", "key", "log", "error"} and {"ev": "resumed",
        "key", "log", "dropped": bytes}."""
        notices: list[dict[str, object]] = []
        try:
            if self.out is None:
                self.open_log()
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
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                _close(self.out)  # the file may be gone or broken: reopen it next time
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
            for n in range(self.backups, 0, -1):
                try:
                    if n == self.backups:
                        os.unlink(f"{self.log}.{n}")
                    else:
                        os.replace(f"{self.log}.{n}", f"{self.log}.{n + 1}")
                except FileNotFoundError:
                    pass
            os.replace(self.log, f"{self.log}.1")
        except OSError:
            return  # keep writing to the current file; tried again after the next write
        _close(self.out)
        self.out = None
        try:
            self.open_log()
        except OSError:
            pass  # reopened by the next write, or dropped with a notice


class Relay:
    def __init__(self, listener: _socket.socket) -> None:
        self.listener = listener
        self.uid = os.getuid()
        self.poll = select.epoll()
        listener.setblocking(False)
        self.poll.register(listener.fileno(), select.EPOLLIN)
        self.clients: dict[int, tuple[_socket.socket, bytearray]] = {}
        self.sinks: dict[str, Sink] = {}
        self.by_fd: dict[int, Sink] = {}
        self.pending: list[bytes] = []
        self.dirs: set[str] = set()
        self.had_client = False
        self.started = time.monotonic()

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> None:
        lfd = self.listener.fileno()
        while True:
            idle = not self.sinks and not self.clients
            if idle and (self.had_client or time.monotonic() - self.started > STARTUP_GRACE):
                for directory in self.dirs:  # the home's pipes directory, when empty
                    try:
                        os.rmdir(directory)
                    except OSError:
                        pass
                return
            try:
                events = self.poll.poll(1.0 if idle else -1)
            except InterruptedError:
                continue
            for fd, _ in events:
                try:
                    if fd == lfd:
                        self.accept()
                    elif fd in self.by_fd:
                        self.pump(self.by_fd[fd])
                    elif fd in self.clients:
                        self.receive(fd)
                except Exception as exc:  # a bug must not stop every other pipe
                    print(f"log relay: {type(exc).__name__}: {exc} (fd {fd})",
                          file=sys.stderr, flush=True)
                    self.drop_client(fd)

    def accept(self) -> None:
        try:
            fd, _ = self.listener._accept()
        except OSError:
            return
        conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM, 0, fd)
        creds = conn.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
        if int.from_bytes(creds[4:8], sys.byteorder) != self.uid:  # struct ucred's uid
            conn.close()
            return
        conn.settimeout(5.0)  # replies are small; a full buffer means a stuck client
        self.clients[fd] = (conn, bytearray())
        self.had_client = True
        self.poll.register(fd, select.EPOLLIN)
        pending, self.pending = self.pending, []
        for line in pending:
            self.send(fd, line)

    def receive(self, fd: int) -> None:
        conn, buf = self.clients[fd]
        try:
            data = conn.recv(CHUNK)
        except OSError:
            data = b""
        if not data:
            self.drop_client(fd)
            return
        buf += data
        while (nl := buf.find(b"\n")) >= 0:
            fields = decode(bytes(buf[:nl]))
            del buf[:nl + 1]
            if fields[0] == "attach" and len(fields) == 6:
                self.attach(fd, fields[1:])

    def attach(self, client: int, fields: list[str]) -> None:
        fifo, log, max_bytes, backups, key = fields
        if fifo not in self.sinks:
            try:
                fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                self.send(client, encode("failed", fifo, exc.strerror or exc))
                return
            self.dirs.add(os.path.dirname(fifo))
            sink = Sink(fifo, fd, log, int(max_bytes or 0), int(backups or 0), key)
            self.sinks[fifo] = sink
            self.by_fd[fd] = sink
            self.poll.register(fd, select.EPOLLIN)
            # A pipe whose writers were all gone before this open never wakes epoll
            # (Linux reports the hang-up only to readers that saw a writer): read it now,
            # which also finishes it at once if it is already at its end.
            self.pump(sink)
        self.send(client, encode("attached", fifo))

    def pump(self, sink: Sink) -> None:
        for _ in range(READS_PER_WAKE):
            try:
                data = os.read(sink.fd, CHUNK)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:  # every writer is gone: the instance has ended
                self.poll.unregister(sink.fd)
                del self.by_fd[sink.fd]
                del self.sinks[sink.fifo]
                sink.close()
                try:
                    os.unlink(sink.fifo)
                except OSError:
                    pass
                return
            for notice in sink.write(data):
                if notice["ev"] == "dropped":
                    self.notify(encode("dropped", sink.key, sink.log, notice["error"]))
                else:
                    self.notify(encode("resumed", sink.key, sink.log, notice["dropped"]))

    # -- talking to control planes ---------------------------------------------------
    def notify(self, line: bytes) -> None:
        delivered = False
        for fd in list(self.clients):
            delivered = self.send(fd, line) or delivered
        if not delivered:
            self.pending = [*self.pending[-(NOTICES_KEPT - 1):], line]

    def send(self, fd: int, line: bytes) -> bool:
        entry = self.clients.get(fd)
        if entry is None:  # gone meanwhile
            return False
        try:
            entry[0].sendall(line)
        except OSError:
            self.drop_client(fd)
            return False
        return True

    def drop_client(self, fd: int) -> None:
        entry = self.clients.pop(fd, None)
        if entry is not None:
            try:
                self.poll.unregister(fd)
            except (KeyError, ValueError, OSError):
                pass
            entry[0].close()


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--fd":
        print("usage: logrelay.py --fd N (a listening unix socket)", file=sys.stderr)
        return 2
    fd = int(argv[1])
    os.set_inheritable(fd, False)
    Relay(_socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM, 0, fd)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
