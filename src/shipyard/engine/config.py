"""Engine configuration: where Shipyard keeps its state, logs and socket."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def default_home() -> Path:
    """`$SHIPYARD_HOME`, else `~/.shipyard`."""
    env = os.environ.get("SHIPYARD_HOME")
    return Path(env).expanduser() if env else Path.home() / ".shipyard"


def default_store() -> str | None:
    """`$SHIPYARD_STORE` (a file path, sqlite:///... or etcd://h1:2379,h2:2379[/cluster]),
    else None: the SQLite file home/state.db."""
    return os.environ.get("SHIPYARD_STORE", "").strip() or None


@dataclass
class EngineConfig:
    home: Path = field(default_factory=default_home)
    store: str | None = field(default_factory=default_store)  # None: home/state.db
    stop_on_exit: bool = False  # stop every instance when the engine closes (foreground `up`)
    reconcile_interval: float = 5.0  # seconds between housekeeping passes (log rotation)
    log_max_bytes: int = 10 * 2**20  # rotate an instance's log past this size
    log_backups: int = 3
    # carry instance output through the home's log relay (runtime/logrelay.py): output
    # survives a full log disk (dropped, with an event) and a control plane restart
    log_relay: bool = True
    max_concurrent_deployments: int = 100  # operations running at once (all stacks)
    prometheus_url: str | None = None  # for `prometheus` autoscale metrics (default:
    # $SHIPYARD_PROMETHEUS_URL)

    def __post_init__(self) -> None:
        self.home = Path(self.home).expanduser().resolve()

    @property
    def store_url(self) -> str:
        return self.store or str(self.home / "state.db")

    @property
    def socket_path(self) -> Path:
        return self.home / "shipyard.sock"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    def log_path(self, stack: str, instance: str) -> Path:
        return self.logs_dir / stack / f"{instance}.log"
