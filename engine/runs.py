"""Runs on a node: everything a node holds for one driver, leased and fenced.

A node is a shared service. Each driver's run is an object here
(:class:`NodeRun`): its parameter shard, its layer partitions, the epoch of
its shard map, and a lease. Every request that touches a run names it (the
``run`` meta field), so runs never see each other's keys or partitions.

- **Lease.** A run lives as long as its driver keeps renewing it (``open``
  and ``heartbeat``); when ``lease`` seconds pass without a renewal the node
  frees it: a driver killed outright, or cut off, leaves nothing computing.
  An expired run is refused at once, even before the node's sweep frees it.
- **Fencing.** A shard request may carry the ``epoch`` of the shard map its
  sender uses; one that is not the run's current epoch is refused with
  STALE_EPOCH, so nothing is applied to a copy the driver has replaced.
- **Memory.** The node has a budget (``dbnode serve --max-memory``); what a
  run would add is checked against it before anything is allocated.

No I/O here but the run's cancel scope: the node (:mod:`dbnode.node`) opens
a nursery per run in which its partitions compute, and cancelling the scope
stops them all.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from .errors import ErrorCode, RequestError

__all__ = ["NodeRun", "RunTable", "default_max_memory", "parse_bytes"]

log = logging.getLogger("dbnode.node")


@dataclass(eq=False)
class NodeRun:
    """One driver's run on this node.

    Attributes:
        id: the run id (the driver's, random).
        name: a name for people (logs, ``dbnode status``).
        lease: seconds the run lives without a renewal.
        expires: when it expires, on trio's clock.
        epoch: the current shard map's epoch.
        shard: the run's parameter shard (its pieces on this node).
        partitions: uid -> the run's layer partitions on this node
            (:class:`~dbnode.partition.PartitionRunner`).
        stopped: uids of its partitions stopped here (a uid is never reused
            in a run): frames their neighbours still send are dropped.
        scope: cancels everything the run computes on this node.
        nursery: where its partitions run (set by the node once open).
        reserved: bytes of memory its partitions were granted.
        fenced: shard requests refused for a stale epoch.
        not_finite: pushes refused for NaN or infinity.
        pools: ``(first, last)`` -> the spare blocks
            (:class:`~dbnode.blocks.BlockPool`) its partitions of those
            layers share.
    """

    id: str
    name: str
    lease: float
    expires: float
    epoch: int = 0
    shard: Any = None  # a ParameterShard: made by the table's ``new_shard``
    partitions: dict[int, Any] = field(default_factory=dict)
    stopped: set[int] = field(default_factory=set)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    nursery: trio.Nursery | None = None
    reserved: int = 0
    fenced: int = 0
    not_finite: int = 0
    pools: dict[tuple[int, int], Any] = field(default_factory=dict)
    opened: float = field(default_factory=time.time)

    def renew(self, now: float) -> None:
        """Extend the lease from ``now`` (trio's clock)."""
        self.expires = now + self.lease

    def lease_left(self, now: float) -> float:
        """Seconds until the lease expires (negative once it has)."""
        return self.expires - now

    def check_epoch(self, epoch: Any) -> None:
        """Refuse a shard request made with another shard map.

        Args:
            epoch: the request's ``epoch`` (None: the sender did not say).

        Raises:
            RequestError: STALE_EPOCH (counted in :attr:`fenced`).
        """
        if epoch is not None and epoch != self.epoch:
            self.fenced += 1
            raise RequestError(
                ErrorCode.STALE_EPOCH,
                f"run {self.id}: shard map epoch {epoch!r} is not the current one ({self.epoch})",
            )

    @property
    def memory(self) -> int:
        """Bytes the run holds: its shard's tensors and state, its partitions'."""
        return self.shard.nbytes + self.reserved


class RunTable:
    """The runs a node holds, by id.

    Args:
        max_memory: the node's memory budget in bytes for all runs.
        new_shard: makes a run's empty parameter shard
            (:class:`~dbnode.ps.shard.ParameterShard`; given, so that this
            module stays below the services that use it).
        clock: the time now (trio's clock by default; tests give another).
    """

    def __init__(
        self, max_memory: int, new_shard: Callable[[], Any], clock=trio.current_time
    ) -> None:
        self.max_memory = max_memory
        self.runs: dict[str, NodeRun] = {}
        self._new_shard = new_shard
        self._clock = clock

    def __len__(self) -> int:
        return len(self.runs)

    @property
    def memory(self) -> int:
        """Bytes held by every run."""
        return sum(run.memory for run in self.runs.values())

    def open(self, run_id: str, name: str, lease: float, epoch: int) -> tuple[NodeRun, bool]:
        """Open a run, or renew it if it is open.

        Args:
            run_id: the run's id.
            name: its name, for people.
            lease: seconds it lives without a renewal.
            epoch: its shard map's epoch (a reopened run keeps its own if
                that is newer).

        Returns:
            The run, and whether it was created.
        """
        now = self._clock()
        run = self.runs.get(run_id)
        if run is not None and not run.lease_left(now) < 0:
            run.lease = lease
            run.renew(now)
            run.epoch = max(run.epoch, epoch)
            return run, False
        if run is not None:  # expired but not swept yet: start afresh
            self.close(run_id, "its lease expired")
        run = NodeRun(run_id, name, lease, now + lease, epoch, self._new_shard())
        self.runs[run_id] = run
        log.info("run %s (%s) opened, lease %.1f s", run_id, name, lease)
        return run, True

    def get(self, run_id: Any) -> NodeRun:
        """The open run ``run_id``.

        Raises:
            RequestError: UNKNOWN_RUN: no such run, or its lease expired.
        """
        run = self.runs.get(run_id) if isinstance(run_id, str) else None
        if run is None:
            raise RequestError(
                ErrorCode.UNKNOWN_RUN, f"no run {run_id!r} on this node (never opened, or closed)"
            )
        if run.lease_left(self._clock()) < 0:
            raise RequestError(
                ErrorCode.UNKNOWN_RUN,
                f"run {run_id} ({run.name}): its lease of {run.lease:g} s expired",
            )
        return run

    def for_request(self, meta: Mapping[str, Any]) -> NodeRun:
        """The run a shard or partition request names, fenced by its epoch.

        Args:
            meta: the request's meta: ``run`` and optionally ``epoch``.

        Raises:
            RequestError: UNKNOWN_RUN, or STALE_EPOCH.
        """
        run = self.get(meta.get("run"))
        run.check_epoch(meta.get("epoch"))
        return run

    def close(self, run_id: str, why: str = "closed by its driver") -> NodeRun | None:
        """Free a run: cancel whatever it computes, forget its partitions and shard.

        Returns:
            The run, or None if the node did not hold it.
        """
        run = self.runs.pop(run_id, None)
        if run is None:
            return None
        for runner in run.partitions.values():
            runner.stop()
        run.scope.cancel()
        log.log(
            logging.WARNING if "expired" in why else logging.INFO,
            "run %s (%s) freed: %s (%d partitions, %d keys)",
            run.id,
            run.name,
            why,
            len(run.partitions),
            len(run.shard),
        )
        return run

    def sweep(self) -> list[NodeRun]:
        """Free every run whose lease has expired.

        Returns:
            The runs freed.
        """
        now = self._clock()
        expired = [run_id for run_id, run in self.runs.items() if run.lease_left(now) < 0]
        out = []
        for run_id in expired:
            run = self.runs[run_id]
            out.append(self.close(run_id, f"its lease of {run.lease:g} s expired"))
        return out

    def reserve(self, nbytes: int, what: str) -> None:
        """Check that ``nbytes`` more fit the node's memory budget.

        Args:
            nbytes: what the request would allocate.
            what: the request, for the message.

        Raises:
            RequestError: UNAVAILABLE, saying how much is in use and allowed.
        """
        used = self.memory
        if used + nbytes > self.max_memory:
            raise RequestError(
                ErrorCode.UNAVAILABLE,
                f"{what} needs {_size(nbytes)}, and this node has {_size(self.max_memory - used)} "
                f"left of its {_size(self.max_memory)} budget (dbnode serve --max-memory)",
            )


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux
        return 8 << 30


def default_max_memory(share: float = 0.75, nodes: int = 1) -> int:
    """A node's default memory budget.

    Args:
        share: the part of the machine's RAM all its nodes may use.
        nodes: how many nodes share the machine.

    Returns:
        Bytes: ``share`` of the physical memory, split evenly across ``nodes``.
    """
    return int(_physical_memory() * share / max(1, nodes))


_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """``"4G"``, ``"512M"``, ``"1.5g"``, ``"1000000"`` -> bytes.

    Raises:
        ValueError: not a positive size.
    """
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = t[-1:] if t[-1:] in _UNITS and t[-1:] else ""
    number = t[: -1 if unit else None]
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise ValueError(f"{text!r} is not a size (e.g. 4G, 512M, 1000000)") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{text!r} must be a size > 0")
    return int(value)
