"""config: serves the platform's configuration as JSON.

    GET /config            the whole document
    GET /config/<section>  one top-level section, or 404

The document is read from --file (default: $CONFIG_FILE, else config/platform.json next
to the services) and re-read whenever the file changes, so an edit needs no restart. A
file that stops parsing keeps the last good document (and the service stays ready).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))

from common import App, HttpError, Request, arguments

DEFAULT_FILE = Path(__file__).resolve().parent.parent / "config" / "platform.json"


class Document:
    def __init__(self, path: str, app: App) -> None:
        self.path = path
        self.app = app
        self.lock = threading.Lock()
        self.data: dict[str, Any] | None = None
        self.mtime: float | None = None
        self.reloads = 0

    def current(self) -> dict[str, Any]:
        try:
            mtime = os.stat(self.path).st_mtime
        except OSError as exc:
            if self.data is None:
                raise HttpError(503, f"cannot read {self.path}: {exc}") from None
            return self.data
        with self.lock:
            if mtime != self.mtime:
                try:
                    with open(self.path) as f:
                        data = json.load(f)
                    if not isinstance(data, dict):
                        raise ValueError("the document must be a JSON object")
                except (OSError, ValueError) as exc:
                    self.app.log(f"keeping the last good config: {self.path}: {exc}")
                    if self.data is None:
                        raise HttpError(503, f"bad config {self.path}: {exc}") from None
                else:
                    self.data = data
                    self.reloads += 1
                    self.app.log(f"loaded {self.path} ({len(data)} sections)")
                self.mtime = mtime
            assert self.data is not None
            return self.data


def main() -> int:
    parser = arguments("config: configuration over HTTP")
    parser.add_argument("--file", default=os.environ.get("CONFIG_FILE") or str(DEFAULT_FILE))
    args = parser.parse_args()
    app = App("config", args.port, args.host)
    document = Document(args.file, app)

    def loaded() -> tuple[bool, str]:
        try:
            return True, f"{len(document.current())} sections"
        except HttpError as exc:
            return False, exc.message

    app.ready_when("file", loaded)

    @app.route("GET", "/config")
    def whole(request: Request) -> Any:
        return document.current()

    @app.route("GET", "/config/{section}")
    def section(request: Request) -> Any:
        data = document.current()
        if request.params["section"] not in data:
            raise HttpError(404, f"no section {request.params['section']}")
        return data[request.params["section"]]

    app.metrics.gauge("platform_config_reloads_total", "Times the file was (re)loaded",
                      lambda: document.reloads)
    return app.run()


if __name__ == "__main__":
    sys.exit(main())
