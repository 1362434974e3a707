"""Just enough HTTP/1.x framing to count requests passing through the router.

The router never rewrites traffic: it only needs to know where each request and each
response ends, so that it can count status codes, time requests, and tell when a
keep-alive connection sits idle between requests (the moment it may be moved to another
backend). Anything that does not parse switches the connection to plain TCP counting.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

MAX_HEAD = 64 * 1024
_METHOD_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")

# Body lengths returned by a head callback, besides a fixed length >= 0.
CHUNKED, UNTIL_CLOSE, OPAQUE, INTERIM = -1, -2, -3, -4

# Framer states.
_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _UNTIL_CLOSE, _OPAQUE = range(8)


class HttpParseError(ValueError):
    """The stream is not (or no longer) HTTP/1.x we can frame: count it as plain TCP."""


def looks_like_http(first: bytes) -> bool:
    """Whether a connection's first bytes start an HTTP/1.x request line (`GET /...`)."""
    head = first.lstrip(b"\r\n")[:16]
    space = head.find(b" ")
    return 3 <= space <= 10 and all(c in _METHOD_CHARS for c in head[:space])


class _Framer:
    """Splits one direction of a connection into messages; the owner decides bodies."""

    __slots__ = ("_buf", "_remaining", "on_end", "on_head", "state")

    def __init__(self, on_head: Callable[[list[bytes]], int], on_end: Callable[[], None]) -> None:
        # on_head returns the body length: >= 0 fixed, CHUNKED, UNTIL_CLOSE, OPAQUE or INTERIM.
        self.on_head = on_head
        self.on_end = on_end
        self.state = _HEAD
        self._buf = bytearray()
        self._remaining = 0

    @property
    def at_boundary(self) -> bool:
        """Between two messages, with nothing of the next one seen yet."""
        return self.state == _HEAD and not self._buf

    def _line(self, data: bytes, pos: int, delim: bytes) -> tuple[bytes | None, int]:
        """The bytes up to `delim` (joined with what earlier chunks left), and the new pos."""
        buf = self._buf
        if not buf:
            idx = data.find(delim, pos)
            if idx >= 0:
                return data[pos:idx], idx + len(delim)
            buf += data[pos:]
        else:
            old = len(buf)
            buf += data[pos:]
            idx = buf.find(delim, max(0, old - len(delim) + 1))
            if idx >= 0:
                line = bytes(buf[:idx])
                buf.clear()
                return line, pos + idx + len(delim) - old
        if len(buf) > MAX_HEAD:
            raise HttpParseError("head too long")
        return None, len(data)

    def feed(self, data: bytes) -> None:
        """Consume `data`, calling on_head / on_end as messages start and end."""
        pos, end = 0, len(data)
        while pos < end:
            state = self.state
            if state in (_BODY, _CHUNK_DATA):
                take = min(self._remaining, end - pos)
                self._remaining -= take
                pos += take
                if self._remaining == 0:
                    if state == _BODY:
                        self.state = _HEAD
                        self.on_end()
                    else:
                        self.state = _CHUNK_CRLF
                        self._remaining = 2
            elif state == _CHUNK_CRLF:
                take = min(self._remaining, end - pos)
                self._remaining -= take
                pos += take
                if self._remaining == 0:
                    self.state = _CHUNK_SIZE
            elif state == _HEAD:
                if not self._buf:
                    while pos < end and data[pos] in b"\r\n":  # stray CRLF between messages
                        pos += 1
                    if pos == end:
                        break
                head, pos = self._line(data, pos, b"\r\n\r\n")
                if head is None:
                    break
                length = self.on_head(head.split(b"\r\n"))
                if length == 0:
                    self.on_end()
                elif length > 0:
                    self.state, self._remaining = _BODY, length
                elif length == CHUNKED:
                    self.state = _CHUNK_SIZE
                elif length == UNTIL_CLOSE:
                    self.state = _UNTIL_CLOSE
                elif length == OPAQUE:
                    self.state = _OPAQUE
            elif state == _CHUNK_SIZE:
                line, pos = self._line(data, pos, b"\r\n")
                if line is None:
                    break
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise HttpParseError("bad chunk size") from None
                if size < 0:
                    raise HttpParseError("bad chunk size")
                if size == 0:
                    self.state = _TRAILER
                else:
                    self.state, self._remaining = _CHUNK_DATA, size
            elif state == _TRAILER:
                line, pos = self._line(data, pos, b"\r\n")
                if line is None:
                    break
                if not line:
                    self.state = _HEAD
                    self.on_end()
            else:  # until close or opaque: the rest of the stream is one body
                break


def _headers(lines: list[bytes]) -> tuple[int | None, bool, bool]:
    """Content-Length, chunked, and Connection: upgrade, from a message head."""
    length: int | None = None
    chunked = upgrade = False
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise HttpParseError("bad header line")
        name = name.strip().lower()
        if name == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                raise HttpParseError("bad content-length") from None
            if length < 0:
                raise HttpParseError("bad content-length")
        elif name == b"transfer-encoding":
            chunked = value.strip().lower().endswith(b"chunked")
        elif name == b"connection":
            upgrade = b"upgrade" in value.lower()
    return length, chunked, upgrade


class HttpTracker:
    """Follows requests and responses of one proxied connection, pure (no I/O).

    `on_response(status, seconds)` is called once per completed exchange; interim
    (1xx) responses are skipped. After an upgrade or CONNECT the stream is opaque and
    nothing more is counted.
    """

    __slots__ = (
        "_now",
        "_pending",
        "_req_start",
        "_request",
        "_response",
        "_status",
        "on_response",
        "opaque",
    )

    def __init__(self, on_response: Callable[[int, float], None]) -> None:
        self.on_response = on_response
        self._pending: deque[tuple[bytes, float]] = deque()
        self._req_start = 0.0
        self._now = 0.0
        self._status = 0
        self._request = _Framer(self._request_head, _ignore)
        self._response = _Framer(self._response_head, self._complete)
        self.opaque = False

    @property
    def idle(self) -> bool:
        """No request in flight and none partly sent: the connection may change backend."""
        return (
            not self.opaque
            and not self._pending
            and self._request.at_boundary
            and self._response.at_boundary
        )

    @property
    def in_flight(self) -> int:
        """Requests sent whose response has not ended yet."""
        return len(self._pending)

    def _request_head(self, lines: list[bytes]) -> int:
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            raise HttpParseError("bad request line")
        method = parts[0]
        if not method or any(c not in _METHOD_CHARS for c in method):
            raise HttpParseError("bad method")
        length, chunked, upgrade = _headers(lines)
        self._pending.append((method, self._req_start))
        if method == b"CONNECT":
            return OPAQUE
        if chunked and not upgrade:
            return CHUNKED
        return length or 0

    def _response_head(self, lines: list[bytes]) -> int:
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise HttpParseError("bad status line")
        try:
            status = int(parts[1])
        except ValueError:
            raise HttpParseError("bad status code") from None
        if not 100 <= status <= 599:
            raise HttpParseError("bad status code")
        if not self._pending:
            raise HttpParseError("response without a request")
        method = self._pending[0][0]
        self._status = status
        if status == 101 or (method == b"CONNECT" and 200 <= status < 300):
            self._complete()
            self.opaque = True
            return OPAQUE
        if status < 200:
            return INTERIM
        length, chunked, _ = _headers(lines)
        if method == b"HEAD" or status in (204, 304):
            return 0
        if chunked:
            return CHUNKED
        if length is not None:
            return length
        return UNTIL_CLOSE

    def _complete(self) -> None:
        _, start = self._pending.popleft()
        self.on_response(self._status, self._now - start)

    def client_data(self, data: bytes, now: float) -> None:
        """Bytes the client sent to the backend."""
        if self.opaque:
            return
        if self._request.at_boundary:
            self._req_start = now
        self._request.feed(data)

    def upstream_data(self, data: bytes, now: float) -> None:
        """Bytes the backend sent to the client."""
        if self.opaque:
            return
        self._now = now
        self._response.feed(data)

    def upstream_closed(self, now: float) -> None:
        """The backend closed: a response delimited by close ends here."""
        if self._response.state == _UNTIL_CLOSE and self._pending:
            self._now = now
            self._complete()
        self.opaque = True


def _ignore() -> None:
    """A request's end needs no action: the request was counted at its head."""
