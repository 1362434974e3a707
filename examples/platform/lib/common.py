"""What every service of the example platform shares, on the standard library only.

- `App`: a small HTTP service on `ThreadingHTTPServer` with routing, `/health`, `/ready`
  (200 only once the readiness checks pass), `/metrics` (Prometheus text), a log line per
  start and per request, background loops, and a graceful stop on SIGTERM/SIGINT.
- `Upstream`: a client for a dependency found through the variables the orchestrator
  injects (`<DEP>_URL`, else `<DEP>_HOST` + `<DEP>_PORT`; `<DEP>_URLS` lists several
  addresses). It retries connection failures and fails over between addresses, so it
  tolerates a dependency that restarts or a URL that points at one replica of several.
- `call`: one JSON request with urllib.

Services put this folder on `sys.path` themselves, so they run from any working
directory: `python3 services/db.py --port 8001`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# The schema version `migrate` brings the db to, and that `api` waits for.
SCHEMA_VERSION = 3
MAX_BODY = 1 << 20  # bytes accepted in a request body
STOP_GRACE = 0.8  # seconds given to in-flight requests and loops after a stop signal

JSON = "application/json"


# -- logging --------------------------------------------------------------------------

_log_lock = threading.Lock()


def log(name: str, message: str) -> None:
    """One line on stdout: time, service[instance], message."""
    now = time.time()
    stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
    with _log_lock:
        sys.stdout.write(f"{stamp} {name} {message}\n")
        sys.stdout.flush()


# -- requests and responses -----------------------------------------------------------


class Request:
    # (plain classes, not dataclasses: importing dataclasses costs start-up time)
    def __init__(self, method: str, path: str, query: dict[str, str], headers: Any,
                 body: bytes, client: str = "", raw_query: str = "") -> None:
        self.method = method
        self.path = path  # as sent, without the query string
        self.query = query  # the first value of each parameter
        self.headers = headers  # email.message.Message: case-insensitive .get()
        self.body = body
        self.client = client
        self.raw_query = raw_query
        self.params: dict[str, str] = {}  # the route's {names}, percent-decoded

    def json(self, default: Any = None) -> Any:
        if not self.body:
            return default
        try:
            return json.loads(self.body)
        except ValueError as exc:
            raise HttpError(400, f"body is not JSON: {exc}") from None

    def bearer(self) -> str | None:
        value = self.headers.get("Authorization") or ""
        if value.lower().startswith("bearer "):
            return value[7:].strip() or None
        return self.query.get("token") or None


class Response:
    def __init__(self, status: int = 200, body: bytes = b"", content_type: str = JSON,
                 headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers or {}


class HttpError(Exception):
    """Raised by a handler: answered as `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def reply(data: Any = None, status: int = 200, **headers: str) -> Response:
    body = b"" if data is None else json.dumps(data, separators=(",", ":")).encode()
    return Response(status, body, JSON, {k.replace("_", "-"): v for k, v in headers.items()})


def text(body: str, status: int = 200, content_type: str = "text/plain; charset=utf-8"
         ) -> Response:
    return Response(status, body.encode(), content_type)


Handler = Callable[[Request], "Response | dict | list | None"]
Check = Callable[[], "tuple[bool, str]"]


def _compile(pattern: str) -> re.Pattern[str]:
    """`/kv/{key:path}` → a regex; `{name}` is one segment, `{name:path}` the rest."""
    out = ""
    for part in re.split(r"(\{[a-z_]+(?::path)?\})", pattern):
        if part.startswith("{"):
            name, _, kind = part[1:-1].partition(":")
            out += f"(?P<{name}>.+)" if kind == "path" else f"(?P<{name}>[^/]+)"
        else:
            out += re.escape(part)
    return re.compile(f"^{out}$")


# -- metrics --------------------------------------------------------------------------


class Metrics:
    """Counters kept by the app, plus gauges computed when /metrics is read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._help: dict[str, tuple[str, str]] = {}  # name → (type, help)
        self._gauges: list[tuple[str, str, Callable[[], Any]]] = []

    def describe(self, name: str, kind: str, help_text: str) -> None:
        self._help.setdefault(name, (kind, help_text))

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + amount

    def value(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def gauge(self, name: str, help_text: str, fn: Callable[[], Any]) -> None:
        """`fn` returns a number, or a list of (labels dict, number)."""
        self.describe(name, "gauge", help_text)
        self._gauges.append((name, help_text, fn))

    def render(self) -> str:
        samples: dict[str, list[str]] = {}
        with self._lock:
            for (name, labels), value in sorted(self._counters.items()):
                samples.setdefault(name, []).append(_sample(name, dict(labels), value))
        for name, _, fn in self._gauges:
            try:
                result = fn()
            except Exception:  # a broken gauge must not break the endpoint
                continue
            rows = result if isinstance(result, list) else [({}, result)]
            for labels, value in rows:
                samples.setdefault(name, []).append(_sample(name, labels, value))
        lines = []
        for name, rows in samples.items():
            kind, help_text = self._help.get(name, ("untyped", name))
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *rows]
        return "\n".join(lines) + "\n"


def _sample(name: str, labels: dict[str, Any], value: Any) -> str:
    if labels:
        inner = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in labels.items())
        return f"{name}{{{inner}}} {float(value):g}"
    return f"{name} {float(value):g}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# -- the app --------------------------------------------------------------------------


class App:
    """An HTTP service: `@app.route(...)`, `app.ready_when(...)`, `app.run()`."""

    def __init__(self, name: str, port: int, host: str = "127.0.0.1") -> None:
        self.service = os.environ.get("SHIPYARD_SERVICE") or name
        self.instance = os.environ.get("SHIPYARD_INSTANCE") or self.service
        self.name = self.instance
        self.host = host
        self.port = port
        self.started = time.monotonic()
        self.stopping = threading.Event()
        install_stop_signals(self.stopping)  # early: a SIGTERM during set-up is graceful too
        self.metrics = Metrics()
        self._routes: list[tuple[str, re.Pattern[str], str, Handler]] = []
        self._checks: list[tuple[str, Check]] = []
        self._threads: list[threading.Thread] = []
        self._on_stop: list[Callable[[], None]] = []
        self._inflight = 0
        self._inflight_lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.quiet: set[str] = set()
        self.metrics.describe("platform_requests_total", "counter", "HTTP requests served")
        self.metrics.describe("platform_request_seconds_total", "counter",
                              "Seconds spent serving HTTP requests")
        self.metrics.gauge("platform_up", "1 while the service runs", lambda: 1)
        self.metrics.gauge("platform_uptime_seconds", "Seconds since the service started",
                           lambda: round(time.monotonic() - self.started, 3))
        self.metrics.gauge("platform_ready", "1 when /ready answers 200",
                           lambda: 1 if self.readiness()[0] else 0)
        self._was_ready: bool | None = None
        # probes and scrapes are not logged; /ready logs when its answer changes
        self.silent = {"/health", "/ready", "/metrics"}
        self.route("GET", "/health")(self._health)
        self.route("GET", "/ready")(self._ready)
        self.route("GET", "/metrics")(self._metrics)

    # registration

    def route(self, method: str, pattern: str, *, quiet: bool = False
              ) -> Callable[[Handler], Handler]:
        """Register a handler; `method` "*" matches any method. The requests of a `quiet`
        route are logged only when they fail (/health, /ready and /metrics never are)."""

        def register(fn: Handler) -> Handler:
            # registering a method and pattern again replaces the handler (e.g. /metrics)
            self._routes = [r for r in self._routes if (r[0], r[2]) != (method.upper(), pattern)]
            self._routes.append((method.upper(), _compile(pattern), pattern, fn))
            if quiet:
                self.quiet.add(pattern)
            return fn

        return register

    def ready_when(self, name: str, check: Check) -> None:
        """/ready answers 200 only while every check returns (True, ...)."""
        self._checks.append((name, check))

    def ready_when_up(self, *upstreams: Upstream) -> None:
        for upstream in upstreams:
            self.ready_when(upstream.name, upstream.check)

    def every(self, interval: float, fn: Callable[[], Any], name: str | None = None) -> None:
        """Run `fn` now and then every `interval` seconds until the stop, in a thread."""

        def loop() -> None:
            while not self.stopping.is_set():
                try:
                    fn()
                except Exception as exc:
                    self.log(f"{name or fn.__name__} failed: {exc!r}")
                self.stopping.wait(interval)

        self.background(loop, name or fn.__name__)

    def background(self, fn: Callable[[], Any], name: str | None = None) -> None:
        """Run `fn` in a thread; it should return soon after `self.stopping` is set."""
        self._threads.append(threading.Thread(target=fn, name=name, daemon=True))

    def on_stop(self, fn: Callable[[], None]) -> None:
        self._on_stop.append(fn)

    def log(self, message: str) -> None:
        log(self.name, message)

    # built-in endpoints

    def readiness(self) -> tuple[bool, dict[str, str]]:
        if self.stopping.is_set():
            return False, {"self": "stopping"}
        ok, details = True, {}
        for name, check in self._checks:
            try:
                passed, message = check()
            except Exception as exc:
                passed, message = False, repr(exc)
            details[name] = message
            ok = ok and passed
        return ok, details

    def _health(self, request: Request) -> Response:
        return reply({"status": "ok", "service": self.service, "instance": self.instance,
                      "uptime": round(time.monotonic() - self.started, 3)})

    def _ready(self, request: Request) -> Response:
        ok, details = self.readiness()
        if ok != self._was_ready:
            self._was_ready = ok
            self.log("ready" if ok else f"not ready: {json.dumps(details)}")
        return reply({"ready": ok, "checks": details}, 200 if ok else 503)

    def _metrics(self, request: Request) -> Response:
        return text(self.metrics.render(), content_type="text/plain; version=0.0.4")

    # serving

    def dispatch(self, request: Request) -> tuple[Response, str]:
        """The response to `request` and the route pattern that served it."""
        wrong_method = False
        for method, regex, pattern, fn in self._routes:
            match = regex.match(request.path)
            if not match:
                continue
            if method not in ("*", request.method) and not (
                    method == "GET" and request.method == "HEAD"):
                wrong_method = True
                continue
            request.params = {k: urllib.parse.unquote(v) for k, v in match.groupdict().items()}
            try:
                result = fn(request)
            except HttpError as exc:
                return reply({"error": exc.message}, exc.status), pattern
            except Unavailable as exc:  # a dependency is down: the caller may retry
                return reply({"error": f"unavailable: {exc}"}, 503), pattern
            except Exception as exc:
                self.log(f"error in {request.method} {request.path}: {exc!r}")
                return reply({"error": f"internal error: {exc}"}, 500), pattern
            if isinstance(result, Response):
                return result, pattern
            return (reply(result) if result is not None else Response(204)), pattern
        if wrong_method:
            return reply({"error": "method not allowed"}, 405), "other"
        return reply({"error": f"no route for {request.path}"}, 404), "other"

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT, then stop gracefully; returns the exit status."""
        try:
            self.server = _Server((self.host, self.port), _handler_class(self))
        except OSError as exc:
            self.log(f"cannot listen on {self.host}:{self.port}: {exc}")
            return 1
        self.port = self.server.server_address[1]
        serving = threading.Thread(target=self.server.serve_forever, args=(0.1,),
                                   name="http", daemon=True)
        serving.start()
        for thread in self._threads:
            thread.start()
        self.log(f"started: listening on http://{self.host}:{self.port} pid={os.getpid()}")
        while not self.stopping.wait(0.5):
            pass
        self.log("stopping: signal received, finishing in-flight work")
        deadline = time.monotonic() + STOP_GRACE
        self.server.shutdown()  # no new requests
        while self._inflight and time.monotonic() < deadline:
            time.sleep(0.02)
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for fn in self._on_stop:
            try:
                fn()
            except Exception as exc:
                self.log(f"stop hook failed: {exc!r}")
        self.server.server_close()
        self.log("stopped")
        return 0

    def _track(self, delta: int) -> None:
        with self._inflight_lock:
            self._inflight += delta


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def _handler_class(app: App) -> type[BaseHTTPRequestHandler]:
    class RequestHandler(BaseHTTPRequestHandler):
        server_version = f"platform-{app.service}/1"
        timeout = 10  # seconds a client may take to send its request

        def _serve(self) -> None:
            app._track(1)
            start = time.perf_counter()
            response, pattern = reply({"error": "bad request"}, 400), "other"
            try:
                split = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                if length > MAX_BODY:
                    response = reply({"error": "body too large"}, 413)
                else:
                    body = self.rfile.read(length) if length > 0 else b""
                    request = Request(
                        method=self.command, path=split.path,
                        query=dict(urllib.parse.parse_qsl(split.query)),
                        headers=self.headers, body=body, client=self.client_address[0],
                        raw_query=split.query)
                    response, pattern = app.dispatch(request)
            except (ValueError, OSError):
                pass  # a malformed Content-Length or a client gone mid-body: the 400
            try:
                self._send(response)
            finally:
                app._track(-1)
            elapsed = time.perf_counter() - start
            status = str(response.status)
            app.metrics.inc("platform_requests_total", method=self.command, route=pattern,
                            status=status)
            app.metrics.inc("platform_request_seconds_total", elapsed, route=pattern)
            if pattern in app.silent:
                pass
            elif pattern not in app.quiet or response.status >= 400:
                app.log(f'{self.client_address[0]} "{self.command} {self.path}" '
                        f"{status} {len(response.body)}B {elapsed * 1000:.1f}ms")

        def _send(self, response: Response) -> None:
            try:
                self.send_response(response.status)
                self.send_header("Content-Type", response.content_type)
                self.send_header("Content-Length", str(len(response.body)))
                if "X-Served-By" not in response.headers:  # a proxy passes on its upstream's
                    self.send_header("X-Served-By", app.instance)
                for key, value in response.headers.items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD" and response.body:
                    self.wfile.write(response.body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away; nothing to tell it

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request is written by _serve

    return RequestHandler


def install_stop_signals(event: threading.Event) -> None:
    """SIGTERM and SIGINT set `event` (call from the main thread)."""

    def handler(signum: int, frame: Any) -> None:
        event.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


# -- clients --------------------------------------------------------------------------


class Unavailable(Exception):
    """No address of an upstream answered (connection refused, reset or timed out)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out  # the request may have been carried out


def call(method: str, url: str, body: Any = None, *, headers: dict[str, str] | None = None,
         timeout: float = 2.0) -> tuple[int, Any]:
    """One request; returns (status, decoded JSON body or text or None).

    HTTP error statuses are returned, not raised; a failure to talk to the server raises
    Unavailable."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", JSON)
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, _decode(response.read(), response.headers)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, _decode(exc.read(), exc.headers)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unavailable(f"{method} {url}: {reason}",
                          timed_out=isinstance(reason, TimeoutError)) from None


def _decode(raw: bytes, headers: Any) -> Any:
    if not raw:
        return None
    if (headers.get("Content-Type") or "").startswith(JSON):
        try:
            return json.loads(raw)
        except ValueError:
            pass
    return raw.decode("utf-8", "replace")


def env_key(name: str) -> str:
    return name.upper().replace("-", "_")


def dependency_urls(name: str, environ: dict[str, str] | None = None) -> list[str]:
    """The addresses of dependency `name` from `<DEP>_URLS`, `<DEP>_URL` or
    `<DEP>_HOST`/`<DEP>_PORT`; [] when none is set."""
    env = os.environ if environ is None else environ
    key = env_key(name)
    many = env.get(f"{key}_URLS")
    if many:
        return [url.strip().rstrip("/") for url in many.split(",") if url.strip()]
    if env.get(f"{key}_URL"):
        return [env[f"{key}_URL"].rstrip("/")]
    if env.get(f"{key}_PORT"):
        return [f"http://{env.get(f'{key}_HOST') or '127.0.0.1'}:{env[f'{key}_PORT']}"]
    return []


class Upstream:
    """A dependency: retries connection failures, rotating over its addresses."""

    def __init__(self, name: str, urls: Iterable[str] | None = None, *, timeout: float = 2.0,
                 attempts: int = 3, backoff: float = 0.1) -> None:
        self.name = name
        self.urls = list(urls) if urls is not None else dependency_urls(name)
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff
        self._next = 0
        self._lock = threading.Lock()

    @property
    def configured(self) -> bool:
        return bool(self.urls)

    def addresses(self) -> list[str]:
        """Every address once, starting from the next one in turn."""
        with self._lock:
            start = self._next
            self._next = (self._next + 1) % max(1, len(self.urls))
        return self.urls[start:] + self.urls[:start]

    def request(self, method: str, path: str, body: Any = None, *,
                headers: dict[str, str] | None = None, timeout: float | None = None,
                attempts: int | None = None) -> tuple[int, Any]:
        if not self.urls:
            raise Unavailable(f"{self.name}: no address (set {env_key(self.name)}_URL)")
        error: Unavailable | None = None
        tries = attempts or self.attempts
        for attempt in range(tries):
            for url in self.addresses():
                try:
                    return call(method, url + path, body, headers=headers,
                                timeout=timeout or self.timeout)
                except Unavailable as exc:
                    if exc.timed_out and method == "POST":
                        raise  # not idempotent: sending it again could do it twice
                    error = exc
            if attempt + 1 < tries:
                time.sleep(self.backoff * (2**attempt))
        assert error is not None
        raise error

    def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        return self.request("POST", path, body, **kw)

    def put(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        return self.request("PUT", path, body, **kw)

    def delete(self, path: str, **kw: Any) -> tuple[int, Any]:
        return self.request("DELETE", path, **kw)

    def check(self) -> tuple[bool, str]:
        """A readiness check: the upstream's /health answers 200."""
        try:
            status, _ = self.request("GET", "/health", timeout=0.5, attempts=1)
        except Unavailable as exc:
            return False, str(exc)
        return status == 200, f"{self.name} /health → {status}"


def quote(key: str) -> str:
    """A key for a URL path (slashes kept, the rest escaped)."""
    return urllib.parse.quote(key, safe="/")


# -- command line ---------------------------------------------------------------------


def arguments(description: str, *, port: bool = True) -> argparse.ArgumentParser:
    """A parser with --port (default $PORT_HTTP or $PORT) and --host (127.0.0.1)."""
    parser = argparse.ArgumentParser(description=description)
    if port:
        default = os.environ.get("PORT_HTTP") or os.environ.get("PORT") or "0"
        parser.add_argument("--port", type=int, default=int(default),
                            help="port to listen on (default: $PORT_HTTP, $PORT, or any)")
        parser.add_argument("--host", default="127.0.0.1")
    return parser


def data_dir(service: str, override: str | None = None) -> str:
    """Where a service keeps its files: --data-dir, else $SHIPYARD_DATA/<service>, else
    ./data under the working directory."""
    if override:
        path = override
    elif os.environ.get("SHIPYARD_DATA"):
        path = os.path.join(os.environ["SHIPYARD_DATA"], service)
    else:
        path = os.path.join(os.getcwd(), "data")
    os.makedirs(path, exist_ok=True)
    return path
