"""The Kubernetes target: the same stack file rendered to manifests, validated against the
official schemas, applied and rolled out through the official client.

- `render`: pure — a `Stack` and `RenderOptions` in, plain manifest dicts out.
- `strategies`: pure — canary replica ratios and the blue-green selector switch.
- `rollout`: pure — reads a Deployment's or Job's status as "done / waiting / failed".
- `validate`: strict, offline schema validation with `kubernetes-validate`'s schemas.
- `cluster`: the adapter that talks to a cluster (server-side apply, waits, day-2 ops).
"""

from __future__ import annotations

from shipyard.k8s.render import Manifests, RenderOptions, ServiceManifests, render_stack

__all__ = ["Manifests", "RenderOptions", "ServiceManifests", "render_stack"]
