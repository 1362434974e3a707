"""HTTP framing used by the router to count requests: pure, fed byte streams."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shipyard.traffic.http import HttpParseError, HttpTracker, looks_like_http


def run(requests: bytes, responses: bytes, splits: list[int] | None = None) -> list[int]:
    """Feed a whole exchange (optionally cut into pieces); the statuses completed."""
    done: list[int] = []
    tracker = HttpTracker(lambda status, seconds: done.append(status))
    tracker.client_data(requests, 1.0)
    cuts = sorted({0, len(responses), *(s % (len(responses) + 1) for s in splits or [])})
    for a, b in itertools.pairwise(cuts):
        tracker.upstream_data(responses[a:b], 2.0)
    return done


PIPELINE = (
    b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
    b"POST /b HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"
    b"HEAD /c HTTP/1.1\r\n\r\n"
    b"PUT /d HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    b"GET /e HTTP/1.1\r\n\r\n"
    b"GET /f HTTP/1.1\r\n\r\n"
)
ANSWERS = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"4;ext=1\r\nwiki\r\n5\r\npedia\r\n0\r\nTrailer: x\r\n\r\n"
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 100\r\n\r\n"  # HEAD: no body follows
    b"HTTP/1.1 204 No Content\r\n\r\n"
    b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"
    b"HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\n\r\n"
)


def test_pipelined_exchange_is_framed_whole() -> None:
    assert run(PIPELINE, ANSWERS) == [200, 201, 404, 204, 304, 503]


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=30))
def test_framing_does_not_depend_on_how_bytes_arrive(splits: list[int]) -> None:
    assert run(PIPELINE, ANSWERS, splits) == [200, 201, 404, 204, 304, 503]


def test_idle_only_between_exchanges() -> None:
    tracker = HttpTracker(lambda s, t: None)
    assert tracker.idle
    tracker.client_data(b"GET / HTTP/1.1\r\n", 0.0)
    assert not tracker.idle  # a request half sent
    tracker.client_data(b"\r\n", 0.0)
    assert tracker.in_flight == 1 and not tracker.idle
    tracker.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab", 0.0)
    assert not tracker.idle
    tracker.upstream_data(b"cd", 0.0)
    assert tracker.idle


def test_latency_runs_from_request_to_end_of_response() -> None:
    seen: list[float] = []
    tracker = HttpTracker(lambda s, t: seen.append(t))
    tracker.client_data(b"GET / HTTP/1.1\r\n\r\n", 10.0)
    tracker.upstream_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", 10.1)
    tracker.upstream_data(b"ok", 10.25)
    assert seen == [pytest.approx(0.25)]


def test_response_delimited_by_close() -> None:
    done: list[int] = []
    tracker = HttpTracker(lambda s, t: done.append(s))
    tracker.client_data(b"GET / HTTP/1.0\r\n\r\n", 0.0)
    tracker.upstream_data(b"HTTP/1.0 200 OK\r\n\r\nbody without length", 0.0)
    assert done == []
    tracker.upstream_closed(1.0)
    assert done == [200]


def test_upgrade_makes_the_stream_opaque() -> None:
    done: list[int] = []
    tracker = HttpTracker(lambda s, t: done.append(s))
    tracker.client_data(b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 0)
    tracker.upstream_data(b"HTTP/1.1 101 Switching\r\nConnection: Upgrade\r\n\r\n\x81\x00", 0)
    tracker.client_data(b"\x81\x85garbage", 0)
    assert done == [101] and tracker.opaque


@pytest.mark.parametrize(
    ("requests", "responses"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", b"SSH-2.0-OpenSSH\r\n\r\n"),
        (b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 abc OK\r\n\r\n"),
        (b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"),
        (b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"),
        (b"", b"HTTP/1.1 200 OK\r\n\r\n"),  # a response nobody asked for
    ],
)
def test_garbage_is_refused(requests: bytes, responses: bytes) -> None:
    with pytest.raises(HttpParseError):
        run(requests, responses)


def test_bad_request_line_is_refused() -> None:
    tracker = HttpTracker(lambda s, t: None)
    with pytest.raises(HttpParseError):
        tracker.client_data(b"GET /\r\n\r\n", 0.0)


def test_detection_by_first_bytes() -> None:
    assert looks_like_http(b"GET / HTTP/1.1\r\n")
    assert looks_like_http(b"OPTIONS * HTTP/1.1\r\n")
    assert not looks_like_http(b"\x16\x03\x01\x02\x00")  # a TLS hello
    assert not looks_like_http(b"*1\r\n$4\r\nPING\r\n")  # redis
    assert not looks_like_http(b"get / HTTP/1.1\r\n")
