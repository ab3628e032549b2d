"""The failure detector: which nodes of a run are alive, from their heartbeats.

A run's status polls double as heartbeats. A node that does not answer one
within the timeout (3 heartbeat intervals) is declared dead; a dead node is
probed briefly on every later round, and one that answers again (it was
frozen, not gone) has the partitions it ran stopped, since they were
replaced, and rejoins the live nodes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ..config import format_address
from ..errors import DBNodeError
from ..wire import Address

__all__ = ["FailureDetector"]

log = logging.getLogger("dbnode.driver")

# How long a dead node's probe may take: it costs every round that much.
_PROBE = 0.5


class FailureDetector:
    """Tracks the live and dead nodes of one run.

    Args:
        hosts: every node of the run.
        timeout: seconds a live node has to answer a status poll.
        event: ``event(what, **details)`` records "node dead" and "node
            rejoined" in the run's events.
    """

    def __init__(self, hosts: list[Address], timeout: float,
                 event: Callable[..., None]) -> None:  # fmt: skip
        self.hosts = hosts
        self.timeout = timeout
        self.dead: set[Address] = set()
        self.ever_dead: list[str] = []  # names, in the order they died
        self._event = event

    @property
    def live(self) -> list[Address]:
        """The nodes not declared dead, in the run's order."""
        return [h for h in self.hosts if h not in self.dead]

    def declare_dead(self, host: Address, why: object) -> None:
        """Mark ``host`` dead (once): logged and recorded as an event."""
        if host in self.dead:
            return
        name = format_address(host)
        log.warning("node %s is dead: %s", name, why)
        self.dead.add(host)
        self.ever_dead.append(name)
        self._event("node dead", node=name)

    async def poll(
        self,
        status: Callable[[Address, float], Awaitable[dict[str, Any]]],
        stop: Callable[[Address, list[int], float], Awaitable[None]],
        current: set[int],
    ) -> dict[str, dict[str, Any]]:
        """One heartbeat round over every node, concurrently.

        Args:
            status: ``status(host, timeout)`` -> the node's partition statuses
                by uid (a DBNodeError when it cannot be had).
            stop: ``stop(host, uids, timeout)`` stops stale partitions on a
                node that answers again.
            current: the uids of the run's current partitions.

        Returns:
            Every answering node's statuses of current partitions, by uid.
        """
        statuses: dict[str, dict[str, Any]] = {}

        async def one(host: Address) -> None:
            was_dead = host in self.dead
            wait = min(self.timeout, _PROBE) if was_dead else self.timeout
            try:
                with trio.fail_after(wait):
                    mine = await status(host, wait)
                    if was_dead:
                        stale = [int(uid) for uid in mine if int(uid) not in current]
                        if stale:
                            await stop(host, stale, wait)
            except (DBNodeError, trio.TooSlowError) as exc:
                if not was_dead:
                    self.declare_dead(host, exc)
                return
            if was_dead:
                name = format_address(host)
                log.warning("node %s answers again; its old partitions are stopped", name)
                self.dead.discard(host)
                self._event("node rejoined", node=name)
                mine = {uid: st for uid, st in mine.items() if int(uid) in current}
            statuses.update(mine)

        async with trio.open_nursery() as nursery:
            for host in self.hosts:
                nursery.start_soon(one, host)
        return statuses
