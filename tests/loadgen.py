"""A bounded HTTP load generator for rollout tests: a few threads send GET requests to
127.0.0.1:PORT back to back (a new connection each time, as many clients do) and count
every failure (refused, reset, timeout, or a status other than 200).

Use it as `async with Load(port) as load:` inside the event loop that runs the router:
stopping joins the threads off the loop, so requests in flight can finish."""

from __future__ import annotations

import asyncio
import http.client
import threading
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Load:
    port: int
    path: str = "/whoami"
    workers: int = 4
    pause: float = 0.005  # between two requests of one worker: bounded load
    timeout: float = 5.0
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    answers: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def __aenter__(self) -> Load:
        for _ in range(self.workers):
            thread = threading.Thread(target=self._run, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            await asyncio.to_thread(thread.join, self.timeout + 1)

    async def settle(self, requests: int = 40) -> None:
        """Until at least `requests` more requests were sent."""
        target = self.total + requests
        while self.total < target:
            await asyncio.sleep(0.02)

    @property
    def total(self) -> int:
        return self.ok + len(self.failures)

    def versions(self) -> Counter[str]:
        """Answers by version (the part after the instance name)."""
        out: Counter[str] = Counter()
        for answer, n in self.answers.items():
            out[answer.partition(" ")[2]] += n
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
                conn.request("GET", self.path)
                resp = conn.getresponse()
                body = resp.read().decode()
                conn.close()
                with self._lock:
                    self.statuses[resp.status] += 1
                    if resp.status == 200:
                        self.ok += 1
                        self.answers[body] += 1
                    else:
                        self.failures.append(f"{time.time():.3f} status {resp.status}")
            except (OSError, http.client.HTTPException) as exc:
                with self._lock:
                    self.failures.append(f"{time.time():.3f} {exc!r}")
            time.sleep(self.pause)
