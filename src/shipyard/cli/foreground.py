"""Watching a deploy and supervising a stack from the terminal.

`shipyard up` without `-d` either talks to the running server or, when there is none,
runs the whole control plane (engine and API) in a thread of its own process, so that
`shipyard ps` works from another terminal; either way the view is built from the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from shipyard.cli.render import STATE_STYLE, console, event_line, ports_text
from shipyard.engine.results import DeployResult
from shipyard.errors import NotFoundError, ShipyardError

if TYPE_CHECKING:
    from shipyard.api.client import Client
    from shipyard.api.models import Submitted
    from shipyard.api.server import Listeners
    from shipyard.engine.config import EngineConfig
    from shipyard.spec.models import Stack

POLL = 0.2  # seconds between two looks at the server while a deploy runs
DEPLOY_END = ("deploy.finished", "deploy.failed")
# A service's state when its instances disagree: the most alarming one wins.
SEVERITY = ("failed", "backoff", "stopping", "starting", "running", "pending", "stopped",
            "completed", "ready")


class ControlPlaneThread(threading.Thread):
    """The engine and its API server on their own event loop, in this process."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(name="shipyard-control-plane", daemon=True)
        self.config = config
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._stop_asked = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            self.error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        from shipyard.api.server import run_server

        self._stop_event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        if self._stop_asked.is_set():
            self._stop_event.set()

        def ready(listeners: Listeners) -> None:
            self._ready.set()

        await run_server(self.config, stop=self._stop_event, on_ready=ready, handle_signals=False)

    def wait_ready(self, timeout: float = 30.0) -> None:
        if not self._ready.wait(timeout):
            raise ShipyardError("the control plane did not start within "
                                f"{timeout:g}s")
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """Ask for a graceful stop (the engine stops every instance on its way out)."""
        self._stop_asked.set()
        loop, stop = self._loop, self._stop_event
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(stop.set)


class DeployWaiter(threading.Thread):
    """Waits for a deploy's result on a connection of its own."""

    def __init__(self, make_client: Callable[[], Client], stack: str) -> None:
        super().__init__(name="shipyard-deploy-waiter", daemon=True)
        self._make_client = make_client
        self.stack = stack
        self.result: DeployResult | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            with self._make_client() as client:
                self.result = client.wait_deploy(self.stack)
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()

    def outcome(self) -> DeployResult:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


@dataclass
class ProgressView:
    """A live table of the stack's services while it deploys."""

    stack: Stack
    order: list[str]
    instances: list[dict[str, Any]] = field(default_factory=list)
    messages: dict[str, str] = field(default_factory=dict)
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=4))
    started: float = field(default_factory=time.monotonic)

    def feed(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            if event.get("service") and not event.get("instance"):
                self.messages[event["service"]] = str(event.get("message", ""))
            self.recent.append(event_line(event))

    def render(self) -> RenderableType:
        elapsed = time.monotonic() - self.started
        table = Table("SERVICE", "STATE", "READY", "PORTS", "INFO", box=None,
                      title=f"deploying {self.stack.name} ({elapsed:.0f}s)",
                      title_justify="left", pad_edge=False)
        for name in self.order:
            mine = [i for i in self.instances if i.get("service") == name]
            state = service_state(mine)
            wanted = self.stack.services[name].replicas if name in self.stack.services else 0
            ready = sum(1 for i in mine if i.get("ready") or i.get("state") == "completed")
            ports = " ".join(ports_text(i.get("ports") or {}) for i in mine) or "-"
            table.add_row(name, Text(state, style=STATE_STYLE.get(state, "")),
                          f"{ready}/{wanted}", ports, Text(self.messages.get(name, "")))
        return Group(table, Text("\n".join(self.recent), style="dim"))


def service_state(instances: list[dict[str, Any]]) -> str:
    states = {str(i.get("state")) for i in instances}
    if not states:
        return "waiting"
    for state in SEVERITY:
        if state in states:
            return state
    return sorted(states)[0]


def watch_deploy(client: Client, make_client: Callable[[], Client], stack: Stack,
                 submitted: Submitted) -> tuple[DeployResult, int]:
    """Show the deploy's progress until its result is in; the result and the sequence
    number of the last event shown."""
    waiter = DeployWaiter(make_client, stack.name)
    waiter.start()
    after = submitted.events_after
    if console().is_terminal:
        view = ProgressView(stack, [s for phase in submitted.phases for s in phase])
        with Live(view.render(), console=console(), refresh_per_second=8,
                  transient=True) as live:
            while True:
                finished = waiter.done.is_set()
                events = client.events(after=after, stack=stack.name)
                after = events[-1]["seq"] if events else after
                view.feed(events)
                with contextlib.suppress(NotFoundError):
                    view.instances = client.instances(stack=stack.name)
                live.update(view.render())
                if finished:
                    break
                waiter.done.wait(POLL)
    else:
        while True:
            finished = waiter.done.is_set()
            events = client.events(after=after, stack=stack.name)
            for event in events:
                print(event_line(event), flush=True)
            after = events[-1]["seq"] if events else after
            if finished:
                break
            waiter.done.wait(POLL)
    return waiter.outcome(), after


def supervise(client: Client, stack: str, after: int) -> None:
    """Print the stack's events as they happen, until interrupted, the stack is brought
    down (from another terminal), or the server ends."""
    for event in client.follow_events(after=after, stack=stack):
        print(event_line(event), flush=True)
        if event.get("kind") == "stack.down":
            return


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C: both stop a foreground stack gracefully."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def shielded(note: str) -> Iterator[None]:
    """Keep Ctrl-C and SIGTERM from breaking off a graceful stop; say so when pressed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def remind(signum: int, frame: FrameType | None) -> None:
        print(note, file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, remind) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
