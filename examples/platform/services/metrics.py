"""metrics: scrapes the other services' /metrics and serves one aggregate.

    GET /metrics   its own metrics, then every target's samples with `job` and
                   `instance` labels added, plus platform_target_up{job} and
                   platform_target_scrape_seconds{job}
    GET /targets   {"<job>": {"url", "up", "error", "samples", "scraped_at"}}
    GET /summary   per job: requests served, up, and the platform_* gauges in JSON

Targets are the services named in $METRICS_TARGETS (comma-separated; default: every
service of the example whose `<NAME>_URL` is set), found through the `<NAME>_URL`
variables the orchestrator sets for dependencies. They are scraped every
$METRICS_INTERVAL seconds (default 2), in parallel, each with a 1 s timeout. /ready
answers 200 once a first round is done, whatever it found: a target that is down is a
fact to report, not a reason to be unready.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))

from common import (
    App,
    Request,
    Unavailable,
    arguments,
    call,
    dependency_urls,
    text,
)

KNOWN = ("config", "db", "cache", "queue", "auth", "api", "worker", "scheduler", "gateway",
         "web")
SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+\d+)?$")
UPTIME = "platform_uptime_seconds"
SUFFIXES = ("_total", "_sum", "_count", "_bucket", "_created")


class Scrape:
    def __init__(self, job: str, url: str) -> None:
        self.job = job
        self.url = url
        self.up = False
        self.error: str | None = "not scraped yet"
        self.seconds = 0.0
        self.scraped_at: float | None = None
        self.types: dict[str, tuple[str, str]] = {}  # family → (type, help)
        self.samples: list[tuple[str, str, str]] = []  # (name, labels without {}, value)


def parse(body: str, scrape: Scrape) -> None:
    helps: dict[str, str] = {}
    types: dict[str, str] = {}
    samples = []
    for line in body.splitlines():
        line = line.strip()
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            helps[name] = help_text
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            types[name] = kind.strip()
        elif line and not line.startswith("#"):
            match = SAMPLE_RE.match(line)
            if match:
                samples.append((match.group(1), (match.group(2) or "{}")[1:-1],
                                match.group(3)))
    scrape.types = {name: (kind, helps.get(name, name)) for name, kind in types.items()}
    scrape.samples = samples


def family(name: str, known: dict[str, tuple[str, str]]) -> str:
    if name in known:
        return name
    for suffix in SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in known:
            return name[: -len(suffix)]
    return name


def number(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return 0.0


def main() -> int:
    parser = arguments("metrics: aggregate of the platform's /metrics")
    parser.add_argument("--interval", type=float,
                        default=float(os.environ.get("METRICS_INTERVAL") or 2.0))
    args = parser.parse_args()
    app = App("metrics", args.port, args.host)
    names = [n.strip() for n in (os.environ.get("METRICS_TARGETS") or "").split(",")
             if n.strip()] or [n for n in KNOWN if dependency_urls(n)]
    targets: dict[str, list[Scrape]] = {}
    for name in names:
        urls = dependency_urls(name)
        if not urls:
            app.log(f"target {name}: no {name.upper()}_URL, skipped")
            continue
        targets[name] = [Scrape(name, url) for url in urls]
    scrapes = [s for group in targets.values() for s in group]
    lock = threading.Lock()
    rounds = [0]
    pool = ThreadPoolExecutor(max_workers=max(1, min(8, len(scrapes))),
                              thread_name_prefix="scrape")
    app.on_stop(lambda: pool.shutdown(wait=False, cancel_futures=True))

    def scrape_one(scrape: Scrape) -> None:
        started = time.perf_counter()
        fresh = Scrape(scrape.job, scrape.url)
        try:
            status, body = call("GET", scrape.url + "/metrics", timeout=1.0)
            if status != 200 or not isinstance(body, str):
                raise Unavailable(f"/metrics → {status}")
            parse(body, fresh)
            fresh.up, fresh.error = True, None
        except Unavailable as exc:
            fresh.up, fresh.error = False, str(exc)
        with lock:
            was_up = scrape.up
            scrape.up, scrape.error = fresh.up, fresh.error
            scrape.types, scrape.samples = fresh.types, fresh.samples
            scrape.seconds = time.perf_counter() - started
            scrape.scraped_at = time.time()
        if was_up != scrape.up and rounds[0]:
            app.log(f"target {scrape.job} {scrape.url} is "
                    + ("up" if scrape.up else f"down: {scrape.error}"))

    def scrape_all() -> None:
        list(pool.map(scrape_one, scrapes))
        rounds[0] += 1
        if rounds[0] == 1:
            up = sum(s.up for s in scrapes)
            app.log(f"first scrape: {up}/{len(scrapes)} targets up")

    app.every(args.interval, scrape_all, "scrape")
    app.ready_when("first scrape", lambda: (rounds[0] > 0, f"{rounds[0]} rounds"))

    def aggregate() -> str:
        own = Scrape("metrics", "")
        parse(app.metrics.render(), own)
        families: dict[str, tuple[str, str]] = {
            "platform_target_up": ("gauge", "1 if the last scrape of the target worked"),
            "platform_target_scrape_seconds": ("gauge", "How long the last scrape took"),
        }
        rows: dict[str, list[str]] = {name: [] for name in families}
        with lock:
            sources = [(own, "")]
            for scrape in scrapes:
                extra = f'job="{scrape.job}",instance="{scrape.url.split("://", 1)[-1]}"'
                sources.append((scrape, extra))
                rows["platform_target_up"].append(
                    f"platform_target_up{{{extra}}} {int(scrape.up)}")
                rows["platform_target_scrape_seconds"].append(
                    f"platform_target_scrape_seconds{{{extra}}} {scrape.seconds:.4f}")
            for source, extra in sources:
                for name, labels, value in source.samples:
                    fam = family(name, source.types)
                    families.setdefault(fam, source.types.get(fam, ("untyped", fam)))
                    inner = ",".join(part for part in (extra, labels) if part)
                    rows.setdefault(fam, []).append(
                        f"{name}{{{inner}}} {value}" if inner else f"{name} {value}")
        lines = []
        for fam, samples in rows.items():
            kind, help_text = families[fam]
            lines += [f"# HELP {fam} {help_text}", f"# TYPE {fam} {kind}", *samples]
        return "\n".join(lines) + "\n"

    @app.route("GET", "/metrics")
    def metrics(request: Request) -> Any:
        return text(aggregate(), content_type="text/plain; version=0.0.4")

    @app.route("GET", "/targets")
    def show_targets(request: Request) -> Any:
        with lock:
            return {s.job if len(targets[s.job]) == 1 else f"{s.job}@{s.url}": {
                "url": s.url, "up": s.up, "error": s.error, "samples": len(s.samples),
                "scraped_at": s.scraped_at, "seconds": round(s.seconds, 4)} for s in scrapes}

    @app.route("GET", "/summary")
    def summary(request: Request) -> Any:
        out: dict[str, Any] = {}
        with lock:
            for scrape in scrapes:
                entry = out.setdefault(scrape.job, {"up": scrape.up})
                for name, _, value in scrape.samples:
                    # summed over labels (and replicas): requests_total, queue_length...
                    if name.startswith("platform_") and name not in ("platform_up", UPTIME):
                        key = name.removeprefix("platform_")
                        entry[key] = entry.get(key, 0.0) + number(value)
        return out

    return app.run()


if __name__ == "__main__":
    sys.exit(main())
