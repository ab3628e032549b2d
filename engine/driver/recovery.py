"""Where a dead node's parameter shards come back from: the driver's backups
of every shard, or its checkpoints.

With default settings the driver keeps, in its own memory, a copy of every
plan shard (values, optimizer state, versions, dedup table: an ``export``),
refreshed in the background every ``cluster.backup_interval`` seconds. When
the node holding a shard dies, the shard is restored on a live node from
the newer of that copy and the newest checkpoint of the run. No shared
filesystem is needed: the driver is the one place that outlives every node
of its run (when the driver dies, the run ends with it: the nodes' leases
lapse). What the shard learned after its copy was taken is lost; the driver
counts those updates from the versions the nodes report in their heartbeats.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..ps.shard import ParameterShard
from . import checkpoint

__all__ = ["Source", "ShardBackups", "lost_updates"]

# A backup round may take at most this share of the time between rounds (as
# the driver times it; it costs the nodes about as much again): a model
# large enough that exporting it is slow is backed up less often.
_MAX_SHARE = 0.02


@dataclass(frozen=True)
class Source:
    """A shard's state to restore from.

    Attributes:
        data: the exported snapshot's bytes.
        time: when it was taken (seconds since the epoch).
        origin: ``"backup"`` or ``"checkpoint N"``.
    """

    data: bytes
    time: float
    origin: str


@dataclass
class ShardBackups:
    """The driver's latest copy of each plan shard.

    Args:
        interval: seconds between rounds (0: no backups).

    Attributes:
        copies: plan shard index -> its latest copy.
    """

    interval: float
    copies: dict[int, Source] = field(default_factory=dict)
    _next: float = 0.0

    def due(self, now: float) -> bool:
        """Whether a round is due at ``now`` (a monotonic time)."""
        return self.interval > 0 and now >= self._next

    def done(self, now: float, took: float) -> None:
        """Schedule the next round after one that took ``took`` seconds."""
        self._next = now + max(self.interval, took / _MAX_SHARE)

    def store(self, index: int, data: bytes) -> None:
        """Keep ``data`` as shard ``index``'s latest copy."""
        self.copies[index] = Source(data, time.time(), "backup")

    def source(self, index: int, checkpoint_dir: Path | None, runs: set[str]) -> Source | None:
        """The newest state shard ``index`` can be restored from.

        Args:
            index: the plan shard.
            checkpoint_dir: the run's checkpoint directory, if it has one.
            runs: the run ids whose checkpoints belong to this run (itself,
                and the run it resumed).

        Returns:
            The newer of its backup and the newest verified checkpoint of
            ``runs``, or None when there is neither.
        """
        candidates = []
        if index in self.copies:
            candidates.append(self.copies[index])
        try:
            newest = checkpoint.newest(checkpoint_dir, runs) if checkpoint_dir else None
            if newest is not None:
                candidates.append(
                    Source(newest.read_shard(index), newest.time, f"checkpoint {newest.number}")
                )
        except (OSError, checkpoint.CheckpointError):  # unreadable: the backup, if any
            pass
        return max(candidates, key=lambda s: s.time, default=None)


def lost_updates(source: Source, last_seen: dict[int, int]) -> int:
    """Pushes a shard applied after ``source`` was taken, as far as the
    driver saw them (the versions of its last heartbeats).

    Args:
        source: what the shard is restored from.
        last_seen: key -> the last version the driver saw.

    Returns:
        The number of updates the restored shard does not have.
    """
    restored = ParameterShard.from_bytes(source.data, source.origin).versions()
    return sum(max(0, last_seen.get(key, v) - v) for key, v in restored.items())
