"""prometheus_client's metric classes, without the rest of the package until it is used.

`import prometheus_client` (or of any of its modules) runs the package's __init__, which
imports its exposition side too: an HTTP server, WSGI and ASGI apps, a push-gateway
client, the process and platform collectors — http.server, socketserver, wsgiref,
urllib.request, gzip, email, mimetypes... 2.5 MiB of resident memory in an engine that
only counts (measured: import of the package 2.9 MiB, of the modules below 0.4 MiB). So
the package is registered here without running its __init__ (a module made from its
spec, its own `__path__`: its modules import as usual), and the first access to a name
only the __init__ defines (`from prometheus_client import generate_latest`, as the API
server does) runs that __init__ then: PEP 562's module `__getattr__`. Once run, the
package is exactly what a plain import gives. Nothing changes when prometheus_client was
imported before this module.

Import the metric classes from here.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any


def _register_light_package() -> None:
    if "prometheus_client" in sys.modules:
        return
    spec = importlib.util.find_spec("prometheus_client")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return  # not installed as a package: the imports below say so
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def __getattr__(name: str) -> Any:
        if name.startswith("__") and name != "__all__":
            raise AttributeError(name)
        # `from . import values` in its modules: that module alone
        if "__getattr__" in package.__dict__ and importlib.util.find_spec(
                f"prometheus_client.{name}") is not None:
            return importlib.import_module(f"prometheus_client.{name}")
        if package.__dict__.pop("__getattr__", None) is not None:
            loader.exec_module(package)  # the package's own __init__, once
        return getattr(package, name)

    package.__getattr__ = __getattr__  # type: ignore[attr-defined]
    sys.modules["prometheus_client"] = package


_register_light_package()

# These modules import nothing of the exposition side.
from prometheus_client.metrics import Counter, Gauge, Histogram  # noqa: E402
from prometheus_client.metrics_core import (  # noqa: E402
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry  # noqa: E402

__all__ = ["Collector", "CollectorRegistry", "Counter", "CounterMetricFamily", "Gauge",
           "GaugeMetricFamily", "Histogram", "HistogramMetricFamily", "Metric"]
