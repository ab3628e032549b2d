"""Early stopping: the best model so far, and when to give up on a better one.

The watched figure is a ``metrics.csv`` column; losses and errors improve
downwards, accuracy and R² upwards. Patience is counted in epochs (the
rows' ``epoch``), whatever mix of epoch-end and interval evaluations
produced them; the best model is the parameters an evaluation scored.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import EarlyStoppingConfig
from ..errors import ConfigError

__all__ = ["EarlyStopper"]

# Figures that improve upwards; every other one (losses, errors) downwards.
_HIGHER_IS_BETTER = ("accuracy", "r2")


class EarlyStopper:
    """Follows one figure through a run's evaluations.

    Args:
        settings: ``train.early_stopping``.
        columns: ``metrics.csv``'s columns for the run.
        held_out: whether the run has a held-out set (the default figure).

    Raises:
        ConfigError: the metric is not a figure the run reports.
    """

    def __init__(self, settings: EarlyStoppingConfig, columns: list[str], held_out: bool):
        self.patience = settings.patience
        self.min_delta = settings.min_delta
        self.metric = settings.metric or ("test_loss" if held_out else "train_loss")
        figures = [c for c in columns if c not in ("epoch", "examples", "seconds")]
        if self.metric not in figures or (self.metric.startswith("test_") and not held_out):
            choices = [f for f in figures if held_out or not f.startswith("test_")]
            raise ConfigError(
                "train.early_stopping.metric", self.metric,
                f"not a figure of this run; expected one of {', '.join(choices)}",
            )  # fmt: skip
        self.higher = self.metric.endswith(_HIGHER_IS_BETTER)
        self.best: dict[str, Any] | None = None  # the best row
        self.best_params: dict[str, np.ndarray] | None = None

    @property
    def on(self) -> bool:
        """Whether early stopping is on (patience > 0)."""
        return self.patience > 0

    def update(self, row: dict[str, Any], params: dict[str, np.ndarray] | None) -> str | None:
        """Take one evaluation into account.

        Args:
            row: the evaluation's ``metrics.csv`` row.
            params: the model it scored (kept, copied, if it is the best).

        Returns:
            Why the run should end now, or None.
        """
        value = row.get(self.metric)
        if value is None or not np.isfinite(value):
            return None
        if self.best is None or self._better(value, self.best[self.metric]):
            self.best = dict(row)
            self.best_params = {k: v.copy() for k, v in params.items()} if params else None
            return None
        waited = row["epoch"] - self.best["epoch"]
        if waited >= self.patience:
            return (
                f"early stopping: {self.metric} has not improved for {waited:g} epochs "
                f"(best {self.best[self.metric]:.6g} at epoch {self.best['epoch']:g})"
            )
        return None

    def _better(self, value: float, best: float) -> bool:
        if self.higher:
            return value > best + self.min_delta
        return value < best - self.min_delta

    def summary(self) -> dict[str, Any] | None:
        """The best evaluation, for the run's summary.

        Returns:
            ``{"metric", "value", "epoch", "examples"}``, or None before any.
        """
        if self.best is None:
            return None
        return {"metric": self.metric, "value": self.best[self.metric],
                "epoch": self.best["epoch"], "examples": self.best["examples"]}  # fmt: skip


class Plateau:
    """Reduce-on-plateau: lowers the learning rate's scale when a figure
    has not improved for ``schedule.patience`` epochs.

    Args:
        settings: the ``[schedule]`` section (name ``plateau``).
        columns: ``metrics.csv``'s columns for the run.
        held_out: whether the run has a held-out set.

    Raises:
        ConfigError: the metric is not a figure the run reports.
    """

    def __init__(self, settings, columns: list[str], held_out: bool):
        watch = EarlyStoppingConfig(patience=1, metric=settings.metric)
        try:
            self.watch = EarlyStopper(watch, columns, held_out)
        except ConfigError as exc:
            raise ConfigError("schedule.metric", exc.value, exc.reason) from None
        self.watch.patience = settings.patience
        self.factor, self.floor = settings.factor, settings.min_factor
        self.scale = 1.0
        self.sent_epoch = 0  # the shard map epoch the shards last heard the scale in

    def update(self, row: dict[str, Any]) -> float | None:
        """Take one evaluation into account.

        Args:
            row: the evaluation's ``metrics.csv`` row.

        Returns:
            The new scale when it is time to lower it, else None.
        """
        if self.watch.update(row, None) is None:
            return None
        # Wait another patience from here before the next reduction.
        self.watch.best = {**self.watch.best, "epoch": row["epoch"]}
        lower = max(self.floor, self.scale * self.factor)
        if lower >= self.scale:
            return None  # at the floor already
        self.scale = lower
        return lower
