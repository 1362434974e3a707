"""Benchmark: what a circuit breaker and a retry wrapper cost on the path they guard.

    python bench/bench_reliability.py [--number N] [--repeat N]

Nanoseconds per call (timeit, median of --repeat runs of --number calls each) for
`allow()` / `check()` on a closed breaker, `allow()` refused by an open one, a
`record_success()`, `with guard():` around a no-op and `await call()`, and
`retry_async` around a first-time success; each against a baseline from the same run (a
bare function call, a bare `with` of a no-op context manager, a bare await). The target
is `allow()` <= 300 ns.

Prints a markdown table, then one JSON document, to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from shipyard.reliability import BreakerConfig, CircuitBreaker, RetryPolicy, retry_async

TARGET_NS = 300.0


def per_call_ns(stmt: Callable[[], object], number: int, repeat: int) -> dict[str, float]:
    runs = [t / number * 1e9 for t in timeit.repeat(stmt, number=number, repeat=repeat)]
    return {"median_ns": statistics.median(runs), "min_ns": min(runs)}


def per_await_ns(make: Callable[[], Any], number: int, repeat: int) -> dict[str, float]:
    """Awaits `make()` `number` times inside one coroutine, so the loop is not measured."""

    async def batch() -> float:
        clock = timeit.default_timer
        start = clock()
        for _ in range(number):
            await make()
        return clock() - start

    async def all_runs() -> list[float]:
        return [await batch() / number * 1e9 for _ in range(repeat)]

    runs = asyncio.run(all_runs())
    return {"median_ns": statistics.median(runs), "min_ns": min(runs)}


class _Nothing:
    """A no-op context manager: the cost of a `with` statement alone."""

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


def bench(number: int, repeat: int) -> dict[str, Any]:
    def noop() -> bool:
        return True

    async def anoop() -> bool:
        return True

    closed = CircuitBreaker("service:api")
    opened = CircuitBreaker("service:db", BreakerConfig(window=0, consecutive_failures=1))
    opened.record_failure("exit code 1")
    nothing = _Nothing()

    def with_nothing() -> None:
        with nothing:
            noop()

    def with_guard() -> None:
        with closed.guard():
            noop()

    policy = RetryPolicy(backoff="fixed", initial=0)
    rows: dict[str, dict[str, Any]] = {}

    def row(name: str, figures: dict[str, float], baseline: str | None) -> None:
        if baseline is not None:
            figures["ratio"] = figures["median_ns"] / rows[baseline]["median_ns"]
            figures["baseline"] = baseline
        if rows:
            call = rows["bare function call"]["median_ns"]
            figures["ratio_vs_call"] = figures["median_ns"] / call
        rows[name] = figures

    row("bare function call", per_call_ns(noop, number, repeat), None)
    row("allow(), closed", per_call_ns(closed.allow, number, repeat), "bare function call")
    row("check(), closed", per_call_ns(closed.check, number, repeat), "bare function call")
    row("allow(), open (refused)", per_call_ns(opened.allow, number, repeat), "bare function call")
    row(
        "record_success(), closed",
        per_call_ns(closed.record_success, number, repeat),
        "bare function call",
    )
    row("with <no-op cm>: noop()", per_call_ns(with_nothing, number, repeat), None)
    row("with guard(): noop()", per_call_ns(with_guard, number, repeat), "with <no-op cm>: noop()")
    small = max(number // 20, 1)
    row("await noop()", per_await_ns(anoop, number, repeat), None)
    row(
        "await call(noop)", per_await_ns(lambda: closed.call(anoop), number, repeat), "await noop()"
    )
    row(
        "await retry_async(noop)",
        per_await_ns(lambda: retry_async(policy, anoop), small, repeat),
        "await noop()",
    )
    return {
        "python": sys.version.split()[0],
        "number": number,
        "repeat": repeat,
        "target_allow_ns": TARGET_NS,
        "allow_within_target": rows["allow(), closed"]["median_ns"] <= TARGET_NS,
        "rows": rows,
    }


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Python {report['python']}, median of {report['repeat']} runs",
        "",
        "| operation | median ns | min ns | vs bare call | vs its baseline |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for name, row in report["rows"].items():
        ratio = f"{row['ratio']:.2f}x {row['baseline']}" if "ratio" in row else "baseline"
        vs_call = f"{row.get('ratio_vs_call', 1.0):.2f}x"
        lines.append(
            f"| {name} | {row['median_ns']:.1f} | {row['min_ns']:.1f} | {vs_call} | {ratio} |"
        )
    verdict = "within" if report["allow_within_target"] else "OVER"
    lines += ["", f"allow() when closed: {verdict} the {report['target_allow_ns']:.0f} ns target"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=200_000, help="calls per run")
    parser.add_argument("--repeat", type=int, default=7, help="runs; the median is reported")
    args = parser.parse_args()
    report = bench(args.number, args.repeat)
    print(markdown(report))
    print()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
