"""Nodes and assignments in the etcd store: the records, their keys and JSON codecs.

Keys, under the store's namespace `/shipyard/<cluster>/` (etcd_keys.py):

    nodes/<node>                          NodeRecord: what the node offers, its state
    heartbeats/<node>                     {"session", "pid", "ts"}, attached to the agent's
                                          lease: present exactly while the agent is alive
    assignments/<node>/<stack>/<inst>     Assignment: an instance that node must run

A node record outlives its agent (it says `lost` or `left` afterwards); the heartbeat key
is what tells a live node from a dead one, and it vanishes by itself when the lease
expires. Names are percent-encoded as in etcd_keys.py.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from shipyard.plan.placement import NodeInfo
from shipyard.state.etcd_conn import Connection
from shipyard.state.etcd_keys import Keys, dumps, prefix_end

if TYPE_CHECKING:
    from shipyard.state.etcd import EtcdStore

READY = "ready"  # registered, heartbeat alive
LOST = "lost"  # its lease expired (agent killed, host down, partitioned)
LEFT = "left"  # its agent stopped cleanly


@dataclass
class NodeRecord:
    name: str
    state: str = READY
    cpu: float = 0.0  # cores
    memory: int = 0  # bytes
    disk: int = 0  # bytes free when the agent started
    gpu: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    address: str = "127.0.0.1"  # where the node's instances answer
    hostname: str = ""
    pid: int = 0  # the agent's
    version: str = ""
    session: str = ""  # one per agent run: tells a restarted agent from the old one
    lease_ttl: int = 0
    joined_at: float = field(default_factory=time.time)
    lost_at: float | None = None
    message: str = ""

    def info(self) -> NodeInfo:
        """The node as placement sees it (plan/placement.py)."""
        return NodeInfo(name=self.name, cpu=self.cpu, memory=self.memory, disk=self.disk,
                        gpu=self.gpu, labels=dict(self.labels))

    def encode(self) -> bytes:
        return dumps(asdict(self))

    @classmethod
    def decode(cls, value: bytes) -> NodeRecord:
        data: dict[str, Any] = json.loads(value)
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Assignment:
    """One instance a node must run: enough for the agent to launch it on its own."""

    stack: str
    service: str
    instance: str
    index: int
    node: str
    revision: int
    spec: dict[str, Any]  # Service.model_dump(mode="json")
    spec_hash: str
    base_dir: str = "."
    ports: dict[str, int] = field(default_factory=dict)
    placed_at: float = field(default_factory=time.time)

    def encode(self) -> bytes:
        return dumps(asdict(self))

    @classmethod
    def decode(cls, value: bytes) -> Assignment:
        data: dict[str, Any] = json.loads(value)
        known = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in known})

    def same_run(self, other: Assignment) -> bool:
        """Whether `other` asks for exactly this run (same node, spec and ports)."""
        return (self.node, self.spec_hash, self.ports, self.base_dir) == (
            other.node, other.spec_hash, other.ports, other.base_dir)


class NodeKeys:
    """The node keys of one namespace (`Keys(cluster)`)."""

    def __init__(self, keys: Keys) -> None:
        root = keys.root
        self.root = root
        self.nodes = root + b"nodes/"
        self.heartbeats = root + b"heartbeats/"
        self.assignments = root + b"assignments/"

    def node(self, name: str) -> bytes:
        return self.nodes + _name(name)

    def heartbeat(self, name: str) -> bytes:
        return self.heartbeats + _name(name)

    def assigned(self, node: str | None = None) -> bytes:
        """The prefix of one node's assignments (all nodes' when None)."""
        return self.assignments if node is None else self.assignments + _name(node) + b"/"

    def assignment(self, node: str, stack: str, instance: str) -> bytes:
        return self.assigned(node) + _name(stack) + b"/" + _name(instance)

    @staticmethod
    def end(prefix: bytes) -> bytes:
        return prefix_end(prefix)


def _name(name: str) -> bytes:
    return quote(name, safe="").encode()


def store_connection(store: EtcdStore, timeout: float | None = None) -> Connection:
    """A connection of its own (leases, watches) to the etcd of `store`: the same
    endpoints, and the same TLS settings when the store has any."""
    conn = store._conn  # (as engine/leadership.py does)
    tls = getattr(conn, "tls", None)
    options: dict[str, Any] = {"tls": tls} if tls is not None else {}
    return Connection(store.endpoints, timeout=timeout or conn.timeout, **options)
