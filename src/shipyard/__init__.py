"""Shipyard: a deployment orchestrator. `from shipyard import Engine, EngineConfig`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Engine", "EngineConfig", "__version__", "load_stack"]

if TYPE_CHECKING:
    from shipyard.engine.engine import Engine, EngineConfig
    from shipyard.spec.loader import load_stack


def __getattr__(name: str) -> Any:
    # Imported lazily so that `shipyard --help` and the spec layer stay fast to import.
    if name in ("Engine", "EngineConfig"):
        from shipyard.engine import engine

        return getattr(engine, name)
    if name == "load_stack":
        from shipyard.spec.loader import load_stack

        return load_stack
    raise AttributeError(name)
