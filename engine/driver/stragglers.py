"""What the driver does about slow replicas: it leases backups of their
portions to idle ones, parks a replica whose own share is behind it, ends
a schedule once the shards hold every step of it, and gives a failed
backup's steps back. The rules (portions, where a backup starts, why
nothing is applied twice) are :mod:`dbnode.driver.leases`'.

A replica is *idle* when it has trained its own schedule, is parked, or is
the helper of a node that joined (:mod:`dbnode.driver.elastic`) with
nothing to do. A parked replica's partitions are stopped: its share was
applied and its backups train the rest; it is done once they are.
"""

from __future__ import annotations

import logging
import time

from ..data import examples_after
from ..errors import DBNodeError, NodeUnreachable
from .inputs import Inputs
from .leases import backup_range
from .state import Replica, RunState

__all__ = ["backup_done", "backup_failed", "lease_backups", "settle"]

log = logging.getLogger("dbnode.driver")


def _idle(replica: Replica) -> bool:
    if replica.diverged is not None or not (replica.done or replica.parked):
        return False
    return replica.helping is None or replica.helping.over


async def lease_backups(run: RunState, inputs: Inputs) -> None:
    """Give each idle replica a backup of the replica with the most steps left.

    Args:
        run: the run.
        inputs: its data (a backup gets its target's data shard).
    """
    if not run.config.train.backups:
        return
    for helper in run.replicas + run.helpers:
        live = run.placeable  # not a node that died, left or is leaving
        if not _idle(helper) or any(h not in live for h in helper.hosts):
            continue
        slow = [r for r in run.replicas
                if not (r.over or r.held or r.parked) and r.last is not None]  # fmt: skip
        slow += [b for r in run.replicas if not r.over
                 for b in r.backups if not b.over and b.last is not None]  # fmt: skip
        if not slow:
            return
        share = lambda r: (r.share_end or run.steps_of(r)) - r.progress  # noqa: E731
        target = max(slow, key=share)
        owner = _owner(run, target)
        end = target.share_end or run.steps_of(target)
        now = time.monotonic()
        mine = (helper.helping or helper).speed(now)  # its last job's pace
        theirs = target.speed(now)
        keep = theirs / (theirs + mine) if mine > 0 else 0.5  # a new one: as fast
        cut = backup_range(target.progress, end, run.portion, keep)
        previous = target.share_end
        if cut is None:  # less than a portion left: a copy of the rest, once
            busy = target is not owner or any(not b.over for b in owner.backups)
            if busy or target.progress >= end:
                continue
            rest = Replica(target.index, target.rows, [], [], start_step=target.start_step,
                           end_step=end)  # fmt: skip
            begin = await run.applied_through(rest)
            if begin is None or begin >= end:
                continue
            cut = (begin, end)
        else:
            target.share_end = cut[0]
        backup = Replica(target.index, target.rows, list(helper.hosts), [],
                         start_step=cut[0], end_step=cut[1])  # fmt: skip
        try:
            await run.launch(backup, inputs, run=True)
        except DBNodeError as exc:  # refused (its memory budget, say) or gone: not now
            if isinstance(exc, NodeUnreachable):
                run.health.declare_dead(exc.host, exc)
            log.info("backup of replica %d not leased: %s", target.index, exc)
            await run.stop_partitions(backup)
            target.share_end = previous
            continue
        owner.backups.append(backup)
        helper.helping = backup
        run.event("backup leased", replica=helper.index, of=target.index, steps=list(cut))


async def backup_done(run: RunState, backup: Replica) -> None:
    """A backup that trained its steps: its partitions go, freeing what they
    hold on their nodes (a data shard, parameter blocks)."""
    backup.done = True
    await run.stop_partitions(backup)


def _owner(run: RunState, copy: Replica) -> Replica:
    """The replica whose schedule ``copy`` trains (itself, or the one it backs up)."""
    return next((r for r in run.replicas if copy in r.backups), copy)


async def backup_failed(run: RunState, backup: Replica, reason: str) -> None:
    """Stop a failed backup; its steps go back to the copy it was cut from
    (which trains through them: every copy runs to its own end, and only
    stops early once its share is applied). If that copy stopped already,
    :func:`settle` sets its replica going again."""
    backup.diverged = reason  # over, for good
    await run.stop_partitions(backup)
    run.event("backup failed", of=backup.index, steps=[backup.start_step, backup.end_step],
              reason=reason)  # fmt: skip
    owner = _owner(run, backup)
    for copy in [owner, *owner.backups]:
        if copy.share_end == backup.start_step and not copy.over:
            later = [b.start_step for b in owner.backups
                     if b.diverged is None and b.start_step > backup.start_step]  # fmt: skip
            copy.share_end = min(later, default=None) if copy is owner else None


async def settle(run: RunState, inputs: Inputs) -> None:
    """Park the replicas whose own share the shards hold while their backups
    train on; end those whose every step the shards hold (their backups did
    the rest), and the copies still training for them."""
    for replica in run.replicas:
        live = [b for b in replica.backups if not b.over]
        if replica.over:
            for backup in live:  # it trained through: the copies lost
                await backup_done(run, backup)
            continue
        if not replica.backups or replica.held or replica.last is None:
            continue
        for backup in live:  # a backup whose own share is applied ends
            if backup.share_end is not None and backup.progress >= backup.share_end:
                own = Replica(backup.index, backup.rows, [], [],
                              start_step=backup.start_step, end_step=backup.share_end)  # fmt: skip
                if await run.applied_through(own) == backup.share_end:
                    await backup_done(run, backup)
        live = [b for b in live if not b.over]
        share = replica.share_end or run.steps_of(replica)
        if live:
            # Its own share behind it (not a copy racing it): free its nodes.
            if not replica.parked and replica.share_end is not None and replica.progress >= share:
                own = Replica(replica.index, replica.rows, [], [],
                              start_step=replica.start_step, end_step=share)  # fmt: skip
                if await run.applied_through(own) == share:
                    await run.stop_partitions(replica)
                    replica.parked = True
                    run.event("replica parked", replica=replica.index, at_step=share)
            continue
        if not replica.parked and replica.share_end is not None and replica.progress < share:
            continue  # its own share not trained yet: the schedule cannot be complete
        whole = Replica(replica.index, replica.rows, [], [], start_step=replica.start_step)
        end = run.steps_of(replica)
        applied = await run.applied_through(whole)
        if applied is not None and applied < end and replica.parked:
            # Steps no copy trains (a backup failed after it parked): it goes on.
            replica.parked = False
            await run.restart(replica, inputs, "steps left by a failed backup", node_failure=True)
            continue
        if applied != end:
            continue  # a push still on its way: later
        if not replica.parked:  # a parked one's partitions were stopped
            await run.stop_partitions(replica)
        replica.done, replica.parked = True, False
        replica.base_examples = examples_after(
            replica.n_examples, run.config.train.batch_size, end
        ) - (replica.last.examples if replica.last else 0)
        run.event("replica done by backups", replica=replica.index)
