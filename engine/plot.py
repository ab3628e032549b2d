"""A picture of one run or several: the paper's Fig. 4 for your runs.

Four panels: the held-out figure and the training loss, each against
seconds and against examples trained, one line per run -- to see how a run
learned, or to compare replicas, optimizers or settings. Needs matplotlib
(``pip install "dbnode[plot]"``); it draws off screen, into a file.
"""

from __future__ import annotations

import json
from pathlib import Path

from .driver.outputs import read_metrics
from .errors import ConfigError

__all__ = ["plot"]

# The held-out figure drawn, in order of preference.
PREFERRED = ("test_accuracy", "test_r2", "test_loss", "train_loss")


def _label(run: Path) -> str:
    """A run's name in the legend: its directory, with replicas and optimizer."""
    try:
        summary = json.loads((run / "summary.json").read_text())
        config = summary["config"]
        return (f"{run.name} ({summary['replicas']} replicas, "
                f"{config['optimizer']['name']} {config['optimizer']['learning_rate']:g})")  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return run.name


def plot(runs: list[str | Path], out: str | Path | None = None, metric: str | None = None) -> Path:
    """Draw runs' learning curves into a PNG (or any format matplotlib
    knows by the file's suffix).

    Args:
        runs: run directories (each with its ``metrics.csv``).
        out: the image file; default ``run.png`` in the run's directory
            for one run, ``runs.png`` in the working directory for several.
        metric: the ``metrics.csv`` column drawn in the upper panels
            (default: ``test_accuracy``, else ``test_r2``, else ``test_loss``,
            else ``train_loss``: the first every run has).

    Returns:
        The file written.

    Raises:
        ConfigError: no runs, a run without ``metrics.csv``, a metric no run
            has, or matplotlib missing.
    """
    if not runs:
        raise ConfigError("runs", "", "give at least one run directory")
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(
            "plot", "", 'needs matplotlib: pip install "dbnode[plot]"'
        ) from None  # fmt: skip
    curves = {}
    for run in map(Path, runs):
        try:
            curves[run] = read_metrics(run / "metrics.csv")
        except OSError:
            raise ConfigError("run", str(run), "has no readable metrics.csv") from None
        except ValueError as exc:
            raise ConfigError("run", str(run / "metrics.csv"), str(exc)) from None

    def has(column: str) -> bool:
        return all(any(r.get(column) is not None for r in rows) for rows in curves.values())

    if metric is None:
        metric = next((m for m in PREFERRED if has(m)), "train_loss")
    elif not has(metric):
        raise ConfigError("--metric", metric, "not a column every run's metrics.csv fills")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex="col")
    for run, rows in curves.items():
        label = _label(run)
        for row_axes, column in zip(axes, (metric, "train_loss")):
            points = [r for r in rows if r.get(column) is not None]
            for ax, x in zip(row_axes, ("seconds", "examples")):
                ax.plot([r[x] for r in points], [r[column] for r in points], marker=".",
                        label=label)  # fmt: skip
    for ax, (y, x) in zip(
        axes.flat,
        [
            (metric, "seconds"),
            (metric, "examples"),
            ("train_loss", "seconds"),
            ("train_loss", "examples"),
        ],
    ):
        ax.set_ylabel(y.replace("_", " "))
        ax.set_xlabel("seconds" if x == "seconds" else "examples trained")
        ax.grid(True, alpha=0.3)
        if "loss" in y:
            ax.set_yscale("log")
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"{metric.replace('_', ' ')} and training loss")
    fig.tight_layout()
    if out is None:
        out = Path(runs[0]) / "run.png" if len(curves) == 1 else Path("runs.png")
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
