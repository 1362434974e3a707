"""The `placement:` block of a service: where its instances may run when the control plane
has several nodes (agents). Ignored with a single machine."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from shipyard.spec.base import Model


class PlacementPolicy(Model):
    # node labels an instance's node must carry, e.g. {zone: eu-west-1a, disk: ssd}
    constraints: dict[str, str] = Field(default_factory=dict)
    # binpack: fill nodes before using empty ones; spread: use the emptiest node first
    strategy: Literal["binpack", "spread"] = "binpack"
    # replicas of the service on distinct nodes: when possible (preferred), always
    # (required: a replica that cannot have a node of its own is not placed), or no matter
    anti_affinity: Literal["none", "preferred", "required"] = "preferred"
