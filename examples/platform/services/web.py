"""web: serves the platform's static page.

    GET /              web/index.html, with the gateway's address filled in
    GET /<file>        other files of web/ (no subfolders)
    GET /config.json   {"gateway": "<address>"} for the page's script

The page talks to the gateway from the browser: its address is $GATEWAY_PUBLIC_URL, else
$GATEWAY_URL (what the orchestrator sets). /ready answers 200 once the gateway answers.
"""

from __future__ import annotations

import mimetypes
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))

from common import App, HttpError, Request, Response, Upstream, arguments

ROOT = Path(__file__).resolve().parent.parent / "web"


def main() -> int:
    parser = arguments("web: the static page")
    parser.add_argument("--root", default=str(ROOT))
    args = parser.parse_args()
    app = App("web", args.port, args.host)
    gateway = Upstream("gateway", attempts=1)
    public = os.environ.get("GATEWAY_PUBLIC_URL") or (gateway.urls[0] if gateway.urls else "")
    root = Path(args.root).resolve()
    if gateway.configured:
        app.ready_when_up(gateway)
    else:
        app.log("no GATEWAY_URL: the page will not reach the API")

    def serve(name: str) -> Response:
        path = (root / name).resolve()
        if path.parent != root or not path.is_file():  # nothing outside web/
            raise HttpError(404, f"no file {name}")
        body = path.read_bytes()
        if path.suffix == ".html":
            body = body.replace(b"{{GATEWAY_URL}}", public.encode())
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if kind.startswith("text/") or kind == "application/javascript":
            kind += "; charset=utf-8"
        return Response(200, body, kind, {"Cache-Control": "no-cache"})

    @app.route("GET", "/")
    def index(request: Request) -> Any:
        return serve("index.html")

    @app.route("GET", "/config.json")
    def config(request: Request) -> Any:
        return {"gateway": public}

    @app.route("GET", "/{name}")
    def static(request: Request) -> Any:
        return serve(request.params["name"])

    return app.run()


if __name__ == "__main__":
    sys.exit(main())
