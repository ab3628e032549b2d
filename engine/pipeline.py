"""Pipelined layer partitions: the order of each partition's passes (pure).

A replica cut into K layer partitions computes one partition at a time if it
waits for each minibatch's backward before the next forward: the others
idle. With ``depth`` minibatches in flight every partition computes at once.
Each partition follows a fixed one-forward-one-backward (1F1B) order: it
forwards :func:`ahead` minibatches, then alternates the backward of its
oldest with the forward of the next. The order depends only on the
partition's place, the depth and the steps, never on timing, so a pipelined
run is as reproducible as an unpipelined one, and a single process can
replay it exactly (``tests/test_pipeline.py`` does).

A forward's minibatch comes back for its backward ``ahead - 1`` local
updates later, so its backward uses the weights its forward used (weight
stashing, as in PipeDream): its gradient is the gradient at those weights,
applied to the newest ones. Partition ``k`` thus keeps at most
``ahead(k)`` weight versions; the last partition, whose backward follows its
forward at once, keeps none.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum

__all__ = ["MAX_PIPELINE", "Pass", "ahead", "depth_of", "schedule"]

#: The most minibatches ``train.pipeline`` may keep in flight: each costs a
#: weight version and a minibatch's activations per partition.
MAX_PIPELINE = 64


class Pass(Enum):
    """A partition's two passes over a minibatch."""

    FORWARD = "F"
    BACKWARD = "B"


def depth_of(pipeline: int, partitions: int) -> int:
    """The minibatches a replica keeps in flight.

    Args:
        pipeline: ``train.pipeline`` (0: one per partition).
        partitions: the replica's layer partitions.

    Returns:
        At least 1; 1 for a replica in one partition (nothing to overlap).
    """
    if partitions <= 1:
        return 1
    return partitions if pipeline == 0 else pipeline


def ahead(index: int, partitions: int, depth: int) -> int:
    """How many minibatches partition ``index`` forwards before the backward
    of the first: ``depth`` at the first partition, one fewer at each next
    (never below 1), and 1 at the last (its backward follows its forward).
    Non-increasing along the replica, which is what keeps the schedule free
    of deadlock: a partition never waits for a forward its predecessor only
    makes after a backward that waits on it.

    Args:
        index: the partition's place in its replica, from 0.
        partitions: the replica's partitions.
        depth: minibatches in flight (:func:`depth_of`).

    Returns:
        At least 1.
    """
    if index >= partitions - 1:
        return 1
    return max(1, depth - index)


def schedule(
    index: int, partitions: int, depth: int, start: int, stop: int
) -> Iterator[tuple[Pass, int]]:
    """Partition ``index``'s passes over steps ``[start, stop)``, in order.

    Args:
        index, partitions, depth: as :func:`ahead`'s.
        start: the first step (a restarted replica's ``start_step``).
        stop: one past the last step.

    Returns:
        ``(Pass, step)`` pairs: every step's forward before its backward,
        backwards in step order, forwards in step order.
    """
    w = ahead(index, partitions, depth)
    for step in range(start, min(start + w, stop)):
        yield Pass.FORWARD, step
    for step in range(start, stop):
        yield Pass.BACKWARD, step
        if step + w < stop:
            yield Pass.FORWARD, step + w
