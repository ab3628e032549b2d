"""The failure detector: which nodes of a run are alive, from their heartbeats.

The driver's heartbeat (the ``heartbeat`` op: it renews the run's lease on
the node and answers the run's state there) is also its failure detector. A
node that does not answer within the timeout (3 heartbeat intervals), or
answers that it no longer holds the run, is declared dead. A dead node is
probed briefly on every later round; one that answers again (it was frozen,
or lost the run, not gone) rejoins empty: whatever it still held of the run
is dropped first, since it was replaced meanwhile.
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
        timeout: seconds a live node has to answer a heartbeat.
        event: ``event(what, **details)`` records "node dead" and "node
            rejoined" in the run's events.
    """

    def __init__(self, hosts: list[Address], timeout: float, event: Callable[..., None]) -> None:
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
        """Mark ``host`` dead (once): logged and recorded as an event.

        Args:
            host: the node.
            why: what showed it, for the log.
        """
        if host in self.dead:
            return
        name = format_address(host)
        log.warning("node %s is dead: %s", name, why)
        self.dead.add(host)
        self.ever_dead.append(name)
        self._event("node dead", node=name, why=str(why)[:200])

    async def poll(
        self,
        heartbeat: Callable[[Address, float], Awaitable[Any]],
        rejoin: Callable[[Address, float], Awaitable[dict[str, Any]]],
    ) -> dict[Address, Any]:
        """One heartbeat round over every node, concurrently.

        Args:
            heartbeat: ``heartbeat(host, timeout)`` -> the node's answer (a
                DBNodeError when it cannot be had or the node refuses).
            rejoin: ``rejoin(host, timeout)`` makes a dead node that answers
                again a clean member of the run; returns details for the
                event (a DBNodeError when it cannot).

        Returns:
            The answer of every live node, by address.
        """
        answers: dict[Address, Any] = {}

        async def one(host: Address) -> None:
            if host in self.dead:
                wait = min(self.timeout, _PROBE)
                try:
                    with trio.fail_after(wait):
                        details = await rejoin(host, wait)
                except (DBNodeError, trio.TooSlowError):
                    return
                name = format_address(host)
                log.warning("node %s answers again; it rejoins the run empty", name)
                self.dead.discard(host)
                self._event("node rejoined", node=name, **details)
                return
            try:
                with trio.fail_after(self.timeout):
                    answers[host] = await heartbeat(host, self.timeout)
            except (DBNodeError, trio.TooSlowError) as exc:
                self.declare_dead(host, str(exc) or f"no answer within {self.timeout:g} s")

        async with trio.open_nursery() as nursery:
            for host in self.hosts:
                nursery.start_soon(one, host)
        return answers
