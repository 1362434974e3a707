"""The control plane's API: the FastAPI app, its server, and a client.

`from shipyard.api import Client, create_app, serve`; imported lazily so that a client
does not load the server's dependencies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Client", "ServerNotRunning", "create_app", "run_server", "serve"]

if TYPE_CHECKING:
    from shipyard.api.app import create_app
    from shipyard.api.client import Client, ServerNotRunning
    from shipyard.api.server import run_server, serve

_HOMES = {"create_app": "app", "Client": "client", "ServerNotRunning": "client",
          "run_server": "server", "serve": "server"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"shipyard.api.{_HOMES[name]}"), name)
