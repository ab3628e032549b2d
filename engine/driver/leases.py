"""Portions of the replicas' schedules, and backups of the slow ones (the
paper's Sandblaster load balancing, here for Downpour).

A replica's schedule -- the minibatches of its data shard over every epoch
-- is cut into portions of ``train.portion_steps`` steps. A replica trains
its own portions in order (data affinity); one that has trained all of its
own while another has not takes a *backup*: the later portions that
replica has not reached, cut where both would end together at the speeds
they showed (both then train at once), or, when less than
a portion is left, a copy of the rest (the first copy to push a step has it
applied). The driver then stops whatever copies are still running once the
shards have applied every step of the schedule.

Nothing is applied twice: a portion's pushes go under one name per layer
partition whichever copy sends them (:meth:`dbnode.control.PartitionJob.pusher`),
with the step as sequence number and push periods counted in steps of the
schedule, so a shard drops the second copy of every push as a retry; and a
copy starts no later than the first step the shards have not applied.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["AUTO_PORTIONS", "backup_range", "first_unapplied", "portion_steps"]

# Portions per epoch of a replica's data shard when train.portion_steps = 0:
# fine enough for a backup to take a fair share of a slow replica's epoch,
# few enough for the shards' per-portion pusher names to stay small.
AUTO_PORTIONS = 8


def portion_steps(configured: int, steps_per_epoch: int, n_push: int) -> int:
    """Steps per portion.

    Args:
        configured: ``train.portion_steps`` (0: automatic).
        steps_per_epoch: steps of one epoch of a replica's data shard.
        n_push: the push period (a portion is made whole periods).

    Returns:
        ``configured`` rounded up to whole push periods, or by default an
        :data:`AUTO_PORTIONS`-th of an epoch so rounded.
    """
    steps = configured or -(-steps_per_epoch // AUTO_PORTIONS)
    return -(-steps // n_push) * n_push


def first_unapplied(
    last_seq: dict[str, int], pusher: Callable[[int], str], start: int, end: int, portion: int
) -> int:
    """The first step of ``[start, end)`` whose push the shards have not
    applied (``end`` if all), for one partition's pushes to one piece.

    Args:
        last_seq: the piece's last applied seq, by pusher name.
        pusher: the name a step's push goes under.
        start, end: the steps asked about.
        portion: steps per portion (0: one name for the whole schedule).

    Returns:
        The step.
    """
    step = start
    while step < end:
        stop = min(end, (step // portion + 1) * portion) if portion else end
        last = last_seq.get(pusher(step), -1)
        if last + 1 < stop:
            return max(step, last + 1)
        step = stop
    return end


def backup_range(step: int, end: int, portion: int, keep: float = 0.5) -> tuple[int, int] | None:
    """What a backup of a schedule whose copy is at ``step`` of ``[.., end)`` takes.

    Args:
        step: where the copy it backs up stands (its first step not
            applied, or a later one it has reached).
        end: where that copy's share of the schedule ends.
        portion: steps per portion.
        keep: the fraction of what is left the copy keeps (its speed over
            both copies' speeds: both then end together).

    Returns:
        ``(begin, end)``: the portions from the boundary strictly inside
        ``(step, end)`` nearest to ``keep`` of the way (the copy then stops
        at ``begin``); None when there is no such boundary (the caller may
        copy the rest).
    """
    if portion <= 0 or end - step < 2:
        return None
    first = (step // portion + 1) * portion  # the first boundary after step
    last = (end - 1) // portion * portion  # the last boundary before end
    if first > last:
        return None
    aim = step + min(max(keep, 0.0), 1.0) * (end - step)
    begin = min(max(round(aim / portion) * portion, first), last)
    return begin, end
