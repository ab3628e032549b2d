"""A node's compute, taken in turns by its partitions: :class:`Turns`.

A node computes each step with all its threads (its BLAS pool and dbnode's
kernels are sized to them: :mod:`dbnode.threads`). Several partitions on
one node (more replicas than nodes, or several runs) computing at once
would each start that many threads and fight over the cores: every step
slower, caches thrashed. So a node's partitions take turns, one step at a
time, first come first served.

Taking turns has a cost of its own in Downpour: a replica that waits for
its turn computes from parameters fetched before the wait, as many pushes
old as turns were taken meanwhile, so staleness would grow with the
replicas sharing a node rather than with the compute really running in
parallel. Hence the lobby: as many places as turns, entered one turn ahead.
A whole-model replica that will have to wait leaves its fetch for the lobby
(see :meth:`dbnode.partition_sync.ShardSync.after_step`) and makes it
there, while the turn before its own computes; its parameters are then
about one turn old however many replicas share the node. (From shards in
its own process it fetches when its turn starts instead: a copy, as fresh
as can be, that keeps nobody waiting.) A partition with nothing to prepare
queues for its turn directly.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import trio

__all__ = ["PATIENCE", "Turns"]

#: Seconds a partition may take to prepare its turn in the lobby (a fetch
#: takes milliseconds) before it steps out to let the next one in.
PATIENCE = 1.0


class Turns:
    """At most ``slots`` steps computing at once on a node, in arrival order.

    Args:
        slots: how many may compute at once (a node: 1, each step using all
            its threads).
    """

    def __init__(self, slots: int = 1) -> None:
        self.slots = max(1, slots)
        self._lobby = trio.CapacityLimiter(self.slots)
        self._compute = trio.CapacityLimiter(self.slots)

    @property
    def crowded(self) -> bool:
        """Whether a partition asking for a turn now would wait for it:
        every turn taken, or others already waiting."""
        return self._crowded(self._compute.statistics().borrowed_tokens)

    @property
    def crowded_after_turn(self) -> bool:
        """From inside a turn: whether, were it over, a partition asking for
        a turn would wait for it (others are waiting for every slot)."""
        return self._crowded(self._compute.statistics().borrowed_tokens - 1)

    def _crowded(self, computing: int) -> bool:
        lobby, compute = self._lobby.statistics(), self._compute.statistics()
        # They take the free turns first (a lobby place waiting for its turn
        # is counted twice: harmless, every turn is taken then).
        ahead = lobby.borrowed_tokens + lobby.tasks_waiting + compute.tasks_waiting
        return ahead >= self.slots - computing

    @asynccontextmanager
    async def turn(self, prepare=None):
        """Compute inside: ``async with turns.turn(prepare): ...``.

        Args:
            prepare: an async callable that must have finished before the
                turn starts (the deferred fetch), run in the lobby one turn
                ahead, or None. It must be safe to cancel and call again: if
                it takes longer than :data:`PATIENCE` (a frozen shard, a
                remap), it is finished outside the lobby and the partition
                queues again, so a slow network holds the lobby up for at
                most that long.
        """
        if prepare is None:
            await self._compute.acquire()
        else:
            await self._prepared(prepare)
        try:
            yield
        finally:
            self._compute.release()

    async def _prepared(self, prepare) -> None:
        """Take a turn once ``prepare`` has finished in the lobby."""
        while True:
            async with self._lobby:
                with trio.move_on_after(PATIENCE) as waited:
                    await prepare()
                if not waited.cancelled_caught:
                    await self._compute.acquire()
                    return
            await prepare()
