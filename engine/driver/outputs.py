"""What a run reports: its progress while it trains, its summary and files at the end."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..model import save_params

__all__ = ["Progress", "Summary", "write_outputs"]


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
        test: the latest held-out evaluation (``loss``, ``accuracy``), if any.
    """

    seconds: float
    examples: int
    total_examples: int
    train_loss: float | None
    replicas_done: int
    replicas: int
    per_replica: list[float] = field(default_factory=list)
    test: dict[str, float] | None = None


@dataclass
class Summary:
    """What a run did: its config, its size, its times, results and incidents.

    Written to ``summary.json`` (every field), and returned by
    :func:`dbnode.train`.

    Attributes:
        config: the run config, as nested dicts.
        replicas, partitions, nodes: the run's size.
        examples: examples the run was to train.
        seconds: wall time of the run, setup included.
        train_seconds: the replicas' training loops, to the last applied push.
        examples_per_second: ``examples / train_seconds``.
        final_train_loss: the mean training loss of the last window.
        test_loss, test_accuracy: of the final model on the held-out set.
        out_dir: where the outputs went.
        run_id, run_name: the run's identity on the nodes.
        interrupted: the signal that stopped the run early, or None.
        dead_nodes: nodes declared dead during the run, in order.
        restarts: replicas started again (replica, step, reason).
        diverged: replicas whose loss stopped being finite.
        lost_updates: pushes lost with dead shard nodes (applied after the
            copy they were restored from was taken).
        pushes: piece updates the shards acknowledged to the replicas
            (``acknowledged``, as far as the driver heard) and those the
            final model holds (``applied``): equal in a run that lost
            nothing, since a retried push is never applied twice.
        fenced_requests: shard requests refused for a stale shard map.
        refused_not_finite: pushes the shards refused for NaN or infinity.
        warnings: what the user should look at.
        events: what happened to nodes, replicas and shards, when.
        threads: each node's compute threads, by address.
        planned_bytes_per_step: what the placement predicts moves between
            processes per step of every replica (:mod:`dbnode.traffic`).
        wire_bytes: payload bytes the replicas sent between processes while
            training (pushes, fetches, activations and deltas; what stays
            in a process is not counted), as far as the driver heard.
        links: the same by ``"source -> destination"`` node.
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
    run_id: str = ""
    run_name: str = ""
    interrupted: str | None = None
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


METRICS = ["seconds", "examples", "train_loss", "test_loss", "test_accuracy"]


def write_outputs(out: Path, params, metrics: list[dict], summary: Summary) -> None:
    """Write a run's ``model.npz``, ``metrics.csv`` and ``summary.json``.

    Args:
        out: the output directory (created if need be).
        params: the final model, name -> array.
        metrics: one row per evaluation: seconds, examples, losses, accuracy.
        summary: the run's summary.

    Raises:
        OSError: a file could not be written.
    """
    out.mkdir(parents=True, exist_ok=True)
    save_params(out / "model.npz", params)
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, METRICS)
        writer.writeheader()
        writer.writerows(metrics)
    text = json.dumps(_strict(summary.__dict__), indent=2, allow_nan=False)
    (out / "summary.json").write_text(text + "\n")


def _strict(value: Any) -> Any:
    """``value`` with NaN and infinities as strings: strict JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value
