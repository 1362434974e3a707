"""Leader election among the control planes that share one etcd namespace, with a lease.

One key, `/shipyard/<cluster>/leader`, names the leader: `{"member", "address", "pid",
"since"}`, attached to the leader's lease. A control plane campaigns with one etcd
transaction: `create_revision(leader) == 0` → put the key with its lease. The winner's
term is the key's create revision (the revision of that transaction): a number no other
term shares, which the store uses as its fence (etcd_tx.Fence) so that every write of a
former leader fails, however late it arrives.

The leader renews its lease every ttl/3 seconds. It counts itself leader only until
`sent + TTL` of the last renewal that etcd confirmed (measured on the monotonic clock from
when the renewal was *sent*, so never later than etcd's own expiry): a process that was
paused (SIGSTOP) past its lease knows, the moment it runs again, that it leads no more,
before any renewal answer. A renewal answered with TTL 0 (expired or revoked), or a write
refused by the fence (`lose()`), ends the term at once.

The others watch the key from the revision they read it at, so they miss no change, and
campaign again as soon as it is deleted: at once after a clean `resign()` (the lease is
revoked), within the TTL (plus etcd's expiry check, ~0.5 s) after the leader died.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from shipyard.errors import StoreError
from shipyard.state.etcd_conn import Compare, Connection, put_op, range_op
from shipyard.state.etcd_keys import Keys
from shipyard.state.etcd_tx import Fence, NotLeader

__all__ = ["Election", "LeaderInfo", "NotLeader", "default_member"]

log = logging.getLogger("shipyard.election")
_DELETE = 1  # mvccpb.Event.DELETE


def default_member() -> str:
    """This control plane's name in the election: host and pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class LeaderInfo:
    """Who leads: the leader key's value, and its create revision (the term)."""

    member: str
    address: str  # where the leader's API answers (its unix socket)
    term: int
    since: float = 0.0
    pid: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"member": self.member, "address": self.address, "term": self.term,
                "since": self.since, "pid": self.pid}


class Election:
    """`Election(connection, keys, member, address, ttl=5)`: campaign with `campaign()`
    (returns once elected), hold the lease with `hold()` (returns when the term ends),
    `resign()` on a clean shutdown. `leader` is who leads as last seen, `is_leader` whether
    this one does now, `fence()` the store fence of the current term."""

    def __init__(self, conn: Connection, keys: Keys, member: str, address: str, *,
                 ttl: int = 5) -> None:
        if ttl < 1:
            raise ValueError("the lease TTL is at least 1 second")
        self.conn = conn
        self.key = keys.root + b"leader"
        self.member = member
        self.address = address
        self.ttl = ttl
        self.leader: LeaderInfo | None = None
        self.term = 0  # ours while we lead, else 0
        self._lease = 0
        self._deadline = 0.0  # monotonic: we lead until then at the latest
        self._lost = asyncio.Event()  # set when the current term ended
        self.changed = asyncio.Event()  # pulsed whenever `leader` changes

    # -- state ----------------------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        return (self.term > 0 and not self._lost.is_set()
                and time.monotonic() < self._deadline)

    @property
    def leader_address(self) -> str | None:
        return self.leader.address if self.leader is not None else None

    def fence(self) -> Fence:
        """The store fence of the current term (a refused write ends the term)."""
        if self.term <= 0:
            raise NotLeader("this control plane does not lead")
        return Fence(self.key, self.term, on_fail=self.lose)

    def lose(self) -> None:
        """End the current term now (a write was refused by the fence)."""
        if self.term > 0 and not self._lost.is_set():
            log.warning("%s: term %d ended (a write was refused)", self.member, self.term)
            self._lost.set()

    def _set_leader(self, leader: LeaderInfo | None) -> None:
        if leader != self.leader:
            self.leader = leader
            self.changed.set()
            self.changed = asyncio.Event()

    # -- campaigning ----------------------------------------------------------------------
    async def campaign_once(self) -> tuple[bool, int]:
        """Try to become leader with one transaction: (won, the etcd revision it ran at).
        When another leads, `leader` says who."""
        sent = time.monotonic()  # before the grant: etcd's countdown starts after this
        lease, granted = await self.conn.lease_grant(self.ttl)
        value = json.dumps({"member": self.member, "address": self.address,
                            "pid": os.getpid(), "since": time.time()}).encode()
        try:
            resp = await self.conn.txn(
                [Compare(target=Compare.CREATE, result=Compare.EQUAL, key=self.key,
                         create_revision=0)],
                [put_op(self.key, value, lease)], [range_op(self.key)],
                what="campaigning for leader")
        except BaseException:
            await self._revoke(lease)
            raise
        revision = int(resp.header.revision)
        if resp.succeeded:
            self._lease, self.term = lease, revision
            self._deadline = sent + granted
            self._lost = asyncio.Event()
            self._set_leader(_info(value, revision))
            log.info("%s leads (term %d, lease TTL %ds)", self.member, revision, granted)
            return True, revision
        await self._revoke(lease)
        kvs = resp.responses[0].response_range.kvs
        self._set_leader(_info(kvs[0].value, kvs[0].create_revision) if kvs else None)
        return False, revision

    async def campaign(self) -> None:
        """Campaign until elected: try, and while another leads, watch the leader key
        (from the revision it was read at) until it is deleted, then try again."""
        delay = 0.1
        while True:
            try:
                won, revision = await self.campaign_once()
                if won:
                    return
                await self._observe(revision + 1)
                delay = 0.1
            except StoreError as exc:
                log.warning("%s: campaigning failed: %s", self.member, exc.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.ttl / 3)

    async def _observe(self, start_revision: int) -> None:
        """Follow the leader key until it is deleted (the leader resigned or its lease
        expired)."""
        stream = self.conn.watch_key(self.key, start_revision)
        try:
            async for resp in stream:
                if resp.canceled or resp.compact_revision:
                    return  # read it again
                for change in resp.events:
                    if change.type == _DELETE:
                        self._set_leader(None)
                        return
                    self._set_leader(_info(change.kv.value, change.kv.create_revision))
        except Exception as exc:  # the watch broke: read the key again
            raise StoreError(f"etcd at {self.conn.where}: watching the leader key failed "
                             f"({type(exc).__name__})") from None
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()  # type: ignore[attr-defined]

    # -- leading --------------------------------------------------------------------------
    async def hold(self) -> None:
        """Renew the lease every ttl/3 seconds; return when the term ends (renewal
        refused, no renewal confirmed before the deadline, or `lose()`)."""
        lease = self._lease
        try:
            while self.term > 0 and not self._lost.is_set():
                if time.monotonic() >= self._deadline:
                    log.warning("%s: lease not renewed in time; term %d over", self.member,
                                self.term)
                    break
                sent = time.monotonic()
                try:
                    ttl = await self.conn.lease_keepalive(self._lease)
                except StoreError as exc:
                    log.warning("%s: renewing the lease failed: %s", self.member, exc.message)
                    await self._pause(min(0.5, self.ttl / 6))
                    continue
                if ttl <= 0:
                    log.warning("%s: the lease of term %d has expired", self.member,
                                self.term)
                    break
                if not self._lost.is_set():
                    self._deadline = sent + ttl
                await self._pause(self.ttl / 3)
        finally:
            self._end_term()
        if self._lease == lease:  # give up what is left of it (if a fence refused us)
            self._lease = 0
            await self._revoke(lease)

    async def _pause(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._lost.wait()

    def _end_term(self) -> None:
        self._lost.set()
        self.term = 0
        if self.leader is not None and self.leader.member == self.member:
            self._set_leader(None)

    async def resign(self) -> None:
        """Give the leadership up (revoke the lease: the key goes, a standby takes over at
        once)."""
        lease, self._lease = self._lease, 0
        self._end_term()
        if lease:
            await self._revoke(lease)

    async def _revoke(self, lease: int) -> None:
        with contextlib.suppress(StoreError):
            await self.conn.lease_revoke(lease)


def _info(value: bytes, term: int) -> LeaderInfo | None:
    try:
        data = json.loads(value)
        return LeaderInfo(member=str(data["member"]), address=str(data["address"]),
                          term=int(term), since=float(data.get("since") or 0.0),
                          pid=data.get("pid"))
    except (ValueError, KeyError, TypeError):
        log.warning("the leader key holds no leader record: %r", value[:200])
        return None
