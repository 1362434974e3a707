"""gateway: the front door; forwards HTTP to the services behind it.

    /api/...    → api  ($API_URL, or the comma-separated $API_URLS), path kept
    /auth/...   → auth ($AUTH_URL), the /auth prefix removed: POST /auth/token
    GET /       a JSON index of the routes

Method, body, query and the headers that matter (Content-Type, Authorization, Accept)
are passed on, with X-Forwarded-For and an X-Request-Id. A connection that fails is
retried on the next address of the upstream, and a refused one for up to --retry-for
seconds (default 2: an api replica restarting is back by then), so a request sees an
error only when no address answers: 502 then, 504 when the upstream is too slow
(--timeout, default 5 s; a timed-out request is never sent again). Every answer carries
CORS headers so the web page (on another port) can call the gateway from the browser.
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))

from common import App, Request, Response, Upstream, arguments, reply

FORWARDED_HEADERS = ("Content-Type", "Authorization", "Accept", "X-Request-Id")
RETURNED_HEADERS = ("Content-Type", "X-Served-By", "Location", "Retry-After")
IDEMPOTENT = {"GET", "HEAD", "PUT", "DELETE", "OPTIONS"}
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, PUT, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "Content-Type, Authorization",
    "Access-Control-Max-Age": "600",
}


def main() -> int:
    parser = arguments("gateway: reverse proxy")
    parser.add_argument("--timeout", type=float, default=5.0,
                        help="seconds an upstream may take to answer (then 504)")
    parser.add_argument("--retry-for", type=float, default=2.0,
                        help="seconds to keep retrying upstreams that refuse connections")
    args = parser.parse_args()
    app = App("gateway", args.port, args.host)
    upstreams = {"api": Upstream("api"), "auth": Upstream("auth")}
    missing = [name for name, upstream in upstreams.items() if not upstream.configured]
    if missing:
        app.log(f"needs {', '.join(n.upper() + '_URL' for n in missing)}")
        return 2
    app.ready_when_up(*upstreams.values())

    def forward(upstream: Upstream, path: str, request: Request) -> Response:
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex[:16]
        headers = {h: request.headers[h] for h in FORWARDED_HEADERS if request.headers.get(h)}
        headers["X-Request-Id"] = request_id
        forwarded = request.headers.get("X-Forwarded-For")
        headers["X-Forwarded-For"] = f"{forwarded}, {request.client}" if forwarded \
            else request.client
        target = path + (f"?{request.raw_query}" if request.raw_query else "")
        last_error = "no address"
        deadline = time.monotonic() + args.retry_for
        pause = 0.05
        while True:
            for base in upstream.addresses():  # each address in turn: failover
                outgoing = urllib.request.Request(base + target, method=request.method,
                                                  data=request.body or None, headers=headers)
                try:
                    with urllib.request.urlopen(outgoing, timeout=args.timeout) as answer:
                        return relay(answer.status, answer.read(), answer.headers, request_id)
                except urllib.error.HTTPError as exc:
                    with exc:
                        return relay(exc.code, exc.read(), exc.headers, request_id)
                except (urllib.error.URLError, OSError) as exc:
                    reason = getattr(exc, "reason", exc)
                    if isinstance(reason, TimeoutError):  # maybe half done: never resent
                        app.metrics.inc("platform_gateway_upstream_errors_total",
                                        upstream=upstream.name, reason="timeout")
                        return with_cors(reply({"error": f"{upstream.name} timed out"}, 504,
                                               X_Request_Id=request_id))
                    last_error = str(reason)
                    app.metrics.inc("platform_gateway_upstream_errors_total",
                                    upstream=upstream.name, reason="connect")
                    # refused: nothing was sent, so any request may go again; after a
                    # reset only one that can safely be repeated
                    if not isinstance(reason, ConnectionRefusedError) \
                            and request.method not in IDEMPOTENT:
                        return with_cors(reply(
                            {"error": f"{upstream.name} failed mid-request: {last_error}"},
                            502, X_Request_Id=request_id))
            # every address refused: a replica restarting is back within a second or two
            if time.monotonic() + pause > deadline or app.stopping.is_set():
                break
            time.sleep(pause)
            pause = min(pause * 2, 0.4)
        return with_cors(reply({"error": f"{upstream.name} unavailable: {last_error}"}, 502,
                               X_Request_Id=request_id))

    def relay(status: int, body: bytes, headers: Any, request_id: str) -> Response:
        response = Response(status, body, headers.get("Content-Type") or "application/json")
        for name in RETURNED_HEADERS[1:]:
            if headers.get(name):
                response.headers[name] = headers[name]
        response.headers["X-Request-Id"] = request_id
        return with_cors(response)

    def with_cors(response: Response) -> Response:
        response.headers.update(CORS)
        return response

    @app.route("*", "/api")
    @app.route("*", "/api/{rest:path}")
    def api(request: Request) -> Response:
        if request.method == "OPTIONS":
            return with_cors(Response(204))
        return forward(upstreams["api"], request.path, request)

    @app.route("*", "/auth/{rest:path}")
    def auth(request: Request) -> Response:
        if request.method == "OPTIONS":
            return with_cors(Response(204))
        return forward(upstreams["auth"], request.path.removeprefix("/auth"), request)

    @app.route("GET", "/")
    def index(request: Request) -> Response:
        return with_cors(reply({
            "service": "gateway",
            "routes": {"/api/...": upstreams["api"].urls, "/auth/...": upstreams["auth"].urls},
        }))

    app.metrics.describe("platform_gateway_upstream_errors_total", "counter",
                         "Upstream calls that failed, by upstream and reason")
    return app.run()


if __name__ == "__main__":
    sys.exit(main())
