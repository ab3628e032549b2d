"""What a run reports: its progress while it trains, its curve as it goes,
its summary and model at the end.

A run's directory holds ``metrics.csv`` (one row per evaluation, appended
and flushed as each is made, so a crash keeps the curve so far),
``model.npz`` (the model and its description: :mod:`dbnode.saved`) and
``summary.json`` (:class:`Summary`), written on every stop; and
``checkpoints/`` when checkpointing is on.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import saved
from ..config import RunConfig
from ..errors import ConfigError
from ..metrics import metric_names

__all__ = [
    "OUTPUT_FILES",
    "MetricsLog",
    "Progress",
    "Summary",
    "metric_columns",
    "new_run_dir",
    "prepare_out_dir",
    "read_metrics",
    "write_outputs",
]

#: What a run writes into its directory (``--overwrite`` removes these, nothing else).
OUTPUT_FILES = (saved.MODEL_FILE, "metrics.csv", "summary.json", "checkpoints")


@dataclass
class Progress:
    """What the driver knows about the run at one moment.

    Attributes:
        seconds: since the run started.
        examples: examples trained so far, over every replica.
        total_examples: examples the whole run trains.
        train_loss: the mean training loss since the previous report, or None.
        replicas_done: replicas that finished.
        replicas: replicas in all.
        per_replica: each replica's fraction done.
        test: the latest held-out evaluation (the task's figures:
            :func:`dbnode.metrics.metric_names`), if any.
        epochs: the run's passes over the training set.
        events: what happened since the previous report (see
            :attr:`Summary.events`), in order.
        start_examples: examples trained before this run started (a
            resumed run's): rates count the others.
    """

    seconds: float
    examples: int
    total_examples: int
    train_loss: float | None
    replicas_done: int
    replicas: int
    per_replica: list[float] = field(default_factory=list)
    test: dict[str, float] | None = None
    epochs: int = 1
    events: list[dict[str, Any]] = field(default_factory=list)
    start_examples: int = 0


@dataclass
class Summary:
    """What a run did: its config, its size, its times, results and incidents.

    Written to ``summary.json`` (every field), and returned by
    :func:`dbnode.train`.

    Attributes:
        config: the run config, as nested dicts.
        replicas, partitions, nodes: the run's size.
        examples: examples the run was to train (every example of every
            epoch); of a run that ended early or whose replicas diverged,
            those trained.
        seconds: wall time of the run, setup included.
        train_seconds: the replicas' training loops, to the last applied push.
        examples_per_second: ``examples / train_seconds``.
        final_train_loss: the mean training loss of the last window.
        task: ``classification`` or ``regression`` (:mod:`dbnode.metrics`).
        test: every held-out figure of the final model (the task's).
        test_loss, test_accuracy: of the final model on the held-out set
            (accuracy: classifiers only).
        history: the rows of ``metrics.csv``, one per evaluation.
        best: with ``train.early_stopping``, the best evaluation
            (``metric``, ``value``, ``epoch``, ``examples``): the model
            written and ``test`` are that one's.
        out_dir: where the outputs went.
        run_id, run_name: the run's identity on the nodes.
        interrupted: the signal that stopped the run early, or None.
        stopped: why the run was ended early on purpose (a callback's
            :class:`~dbnode.errors.StopTraining`), or None.
        error: what failed, when the run failed (its outputs are still
            written, as far as the model could be read).
        dead_nodes: nodes declared dead during the run, in order.
        restarts: replicas started again (replica, step, reason).
        diverged: replicas whose loss stopped being finite.
        lost_updates: pushes lost with dead shard nodes (applied after the
            copy they were restored from was taken).
        pushes: piece updates the shards acknowledged to the replicas and
            their backups (``acknowledged``, as far as the driver heard),
            those the final model holds (``applied``), and the pushes the
            shards dropped as copies of one already applied (``duplicates``:
            a backup's or a retry's). In a run that lost nothing,
            acknowledged = applied + duplicates.
        fenced_requests: shard requests refused for a stale shard map.
        refused_not_finite: pushes the shards refused for NaN or infinity.
        warnings: what the user should look at.
        events: what happened to nodes, replicas and shards, when: ``time``
            (wall clock) and ``seconds`` (since the run started).
        threads: each node's compute threads, by address.
        planned_bytes_per_step: what the placement predicts moves between
            processes per step of every replica (:mod:`dbnode.traffic`).
        wire_bytes: payload bytes the replicas sent between processes while
            training (pushes, fetches, activations and deltas; what stays
            in a process is not counted), as far as the driver heard.
        links: the same by ``"source -> destination"`` node.
        pipeline: minibatches each replica kept in flight (``depth``) and,
            by partition, the share of its training loop it waited for its
            neighbours (``idle``), the most weight versions (``stashed``)
            and bytes (``held_bytes``) it kept for minibatches in flight, and
            the most local updates between its weights and those below
            (``lag``) (:mod:`dbnode.pipeline`).
        staleness: how stale the pushes the shards applied were: pushes by
            staleness in versions (``histogram``; its last bucket, 256,
            counts that many or more), ``mean`` and ``max``, and pushes
            ``refused`` as staler than ``train.max_staleness``.
    """

    config: dict[str, Any]
    replicas: int
    partitions: int
    nodes: int
    examples: int
    seconds: float
    train_seconds: float
    examples_per_second: float
    final_train_loss: float | None
    test_loss: float | None
    test_accuracy: float | None
    out_dir: str | None
    task: str = ""
    test: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    run_id: str = ""
    run_name: str = ""
    interrupted: str | None = None
    stopped: str | None = None
    error: str | None = None
    dead_nodes: list[str] = field(default_factory=list)
    restarts: list[dict[str, Any]] = field(default_factory=list)
    diverged: list[dict[str, Any]] = field(default_factory=list)
    lost_updates: int = 0
    pushes: dict[str, int] = field(default_factory=dict)
    fenced_requests: int = 0
    refused_not_finite: int = 0
    warnings: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    threads: dict[str, int] = field(default_factory=dict)
    planned_bytes_per_step: int = 0
    wire_bytes: int = 0
    links: dict[str, int] = field(default_factory=dict)
    pipeline: dict[str, Any] = field(default_factory=dict)
    staleness: dict[str, Any] = field(default_factory=dict)


def metric_columns(task: str) -> list[str]:
    """``metrics.csv``'s columns for a run of ``task``.

    ``epoch`` (passes over the training set so far: examples trained by
    every replica over the training set's size), ``examples``, ``seconds``
    (since the run started, carried on across ``--resume``), ``train_loss``
    (the replicas' mean minibatch loss since the previous row), the task's
    other figures on a fixed sample of the training set (``train_accuracy``,
    or ``train_mse`` ...), and every figure on the held-out set
    (``test_loss``, ``test_accuracy`` ...).

    Args:
        task: ``classification`` or ``regression``.

    Returns:
        The column names, in order.
    """
    names = metric_names(task)
    return ["epoch", "examples", "seconds", "train_loss",
            *(f"train_{m}" for m in names[1:]), *(f"test_{m}" for m in names)]  # fmt: skip


class MetricsLog:
    """A run's learning curve: rows kept in memory and appended to
    ``metrics.csv`` as they come, each flushed at once.

    Args:
        path: the CSV file, or None to keep the rows in memory only.
        columns: its columns (:func:`metric_columns`).
        resume: an earlier run's ``metrics.csv`` whose rows come first (the
            same file when resuming into its directory); its last
            ``seconds`` is where this run's clock starts.

    Raises:
        OSError: the file cannot be written.
    """

    def __init__(self, path: Path | None, columns: list[str], resume: Path | None = None):
        self.columns = columns
        self.rows: list[dict[str, Any]] = []
        if resume is not None and resume.is_file():
            self.rows = [{c: row.get(c) for c in columns} for row in read_metrics(resume)]
        self.offset = float(self.rows[-1]["seconds"] or 0.0) if self.rows else 0.0
        self._file = None
        if path is not None:
            self._file = open(path, "w", newline="")  # rewritten whole: columns may have changed
            self._writer = csv.DictWriter(self._file, columns, extrasaction="ignore")
            self._writer.writeheader()
            self._writer.writerows(self.rows)
            self._file.flush()

    def append(self, row: dict[str, Any]) -> None:
        """Add one evaluation's row (missing columns are left empty).

        Args:
            row: column -> value.
        """
        row = {c: row.get(c) for c in self.columns}
        self.rows.append(row)
        if self._file is not None:
            self._writer.writerow(row)
            self._file.flush()

    def close(self) -> None:
        """Close the file (the rows stay readable)."""
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.csv``, numbers as numbers.

    Args:
        path: the file.

    Returns:
        One dict per row, column -> int, float or None (an empty cell).

    Raises:
        OSError: the file cannot be read.
        ValueError: a cell is not a number.
    """
    with open(path, newline="") as f:
        return [{c: _number(v) for c, v in row.items()} for row in csv.DictReader(f)]


def _number(text: str | None) -> float | int | None:
    if text in (None, ""):
        return None
    value = float(text)
    return int(value) if value.is_integer() and "." not in text else value


def new_run_dir(stem: str, base: str | Path = "runs") -> Path:
    """A fresh directory name for a run: ``<base>/<stem>-<YYYYmmdd-HHMMSS>``,
    with ``-2``, ``-3`` ... when that one is taken. Not created.

    Args:
        stem: what the run is called (its config file's stem).
        base: where run directories go.

    Returns:
        The path.
    """
    name = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = Path(base) / name, 1
    while path.exists():
        n += 1
        path = Path(base) / f"{name}-{n}"
    return path


def prepare_out_dir(out: str | Path, overwrite: bool = False, resume: str | Path | None = None):
    """Make ``out`` ready for a run's files before anything starts, or refuse it.

    Args:
        out: the output directory (made, with its parents, if need be).
        overwrite: replace the outputs of an earlier run there
            (:data:`OUTPUT_FILES`; nothing else is touched).
        resume: the directory the run resumes from: resuming into it is
            allowed.

    Returns:
        ``out`` as a Path.

    Raises:
        ConfigError: ``out`` is a file, holds files (and neither
            ``overwrite`` nor resuming into it), or cannot be written.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", str(out), "is a file, not a directory")
    into_resume = resume is not None and out.is_dir() and out.resolve() == Path(resume).resolve()
    if overwrite and resume is not None and out.resolve() in Path(resume).resolve().parents:
        raise ConfigError("--overwrite", str(out), "would remove the checkpoints --resume reads")
    if out.is_dir() and any(out.iterdir()) and not into_resume:
        if not overwrite:
            raise ConfigError(
                "--out",
                str(out),
                "already holds files: choose a new directory, --overwrite to replace "
                "an earlier run's outputs, or --resume it to go on from its checkpoint",
            )
        for name in OUTPUT_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".dbnode-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError("--out", str(out), f"cannot be written: {exc.strerror or exc}") from None
    return out


def write_outputs(out: Path, params, summary: Summary, config: RunConfig) -> None:
    """Write a run's ``model.npz`` and ``summary.json`` (``metrics.csv`` is
    written as the run goes: :class:`MetricsLog`).

    Each file is written beside its final name and renamed into place, so a
    stop halfway leaves the earlier file whole.

    Args:
        out: the output directory (created if need be).
        params: the final model, name -> array (None: it could not be
            read, as when a failed run lost a shard; no model.npz then).
        summary: the run's summary.
        config: the run config (it goes into the model's description).

    Raises:
        OSError: a file could not be written.
    """
    out.mkdir(parents=True, exist_ok=True)
    if params is not None:
        staging = out / "model.partial.npz"
        saved.save(staging, params, config, summary.task)
        os.replace(staging, out / saved.MODEL_FILE)
    text = json.dumps(_strict(summary.__dict__), indent=2, allow_nan=False)
    (out / "summary.partial.json").write_text(text + "\n")
    os.replace(out / "summary.partial.json", out / "summary.json")


def _strict(value: Any) -> Any:
    """``value`` with NaN and infinities as strings: strict JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value
