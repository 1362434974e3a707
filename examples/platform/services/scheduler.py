"""scheduler: pushes periodic jobs into the queue.

Every `scheduler.interval` seconds (from config; else $SCHEDULER_INTERVAL; default 2) it
pushes each job listed in `scheduler.jobs` (default: one `{"kind": "report"}`) to queue
`jobs`. The schedule is re-read from config every tick, so editing config/platform.json
changes it live. Serves /health, /ready (200 once queue answers) and /metrics, and
`GET /schedule` to show what it does.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))

from common import App, Request, Unavailable, Upstream, arguments


def main() -> int:
    parser = arguments("scheduler: periodic jobs")
    parser.add_argument("--interval", type=float,
                        default=float(os.environ.get("SCHEDULER_INTERVAL") or 2.0))
    args = parser.parse_args()
    app = App("scheduler", args.port, args.host)
    queue = Upstream("queue", attempts=1)
    config = Upstream("config", timeout=0.5, attempts=1)
    if not queue.configured:
        app.log("needs QUEUE_URL")
        return 2
    app.ready_when_up(queue)
    schedule: dict[str, Any] = {"interval": args.interval, "jobs": [{"kind": "report"}],
                                "last_tick": None, "source": "defaults"}

    def refresh() -> None:
        if not config.configured:
            return
        try:
            status, body = config.get("/config/scheduler")
        except Unavailable:
            return  # keep the last schedule
        if status == 200 and isinstance(body, dict):
            interval = body.get("interval", schedule["interval"])
            if isinstance(interval, int | float) and interval >= 0.1:
                schedule["interval"] = float(interval)
            if isinstance(body.get("jobs"), list):
                schedule["jobs"] = [job for job in body["jobs"] if isinstance(job, dict)]
            schedule["source"] = "config"

    def loop() -> None:
        next_tick = time.monotonic()
        while not app.stopping.wait(max(0.0, next_tick - time.monotonic())):
            refresh()
            next_tick = time.monotonic() + schedule["interval"]
            pushed = 0
            for job in schedule["jobs"]:
                try:
                    status, _ = queue.post("/queues/jobs/push", {**job, "scheduled": True})
                except Unavailable as exc:
                    app.log(f"queue unavailable, skipping this tick: {exc}")
                    break
                if status == 201:
                    pushed += 1
                    app.metrics.inc("platform_scheduler_pushed_total",
                                    kind=str(job.get("kind")))
            schedule["last_tick"] = time.time()
            if pushed:
                app.log(f"tick: pushed {pushed} job(s), next in {schedule['interval']:g}s")

    app.background(loop, "schedule")

    @app.route("GET", "/schedule")
    def show(request: Request) -> Any:
        return schedule

    app.metrics.describe("platform_scheduler_pushed_total", "counter", "Jobs pushed")
    return app.run()


if __name__ == "__main__":
    sys.exit(main())
