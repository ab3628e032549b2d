"""What a run needs before any node is contacted: data and initial model, all checked.

Every mistake in a config that can be found without a cluster shows up
here, as a :class:`~dbnode.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import data as datasets
from ..config import RunConfig, TrainConfig
from ..errors import ConfigError
from ..metrics import data_warnings, task_of
from ..model import ModelSpec, init_params, load_params
from ..optim import Schedule
from . import checkpoint

__all__ = [
    "Arrays",
    "Inputs",
    "check_data",
    "find_resume",
    "load_data",
    "prepare",
    "identity_hash",
    "run_identity",
    "shard_data",
    "shard_optimizer",
]


def load_data(
    config: RunConfig, arrays: Arrays | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Training and test sets, checked against the model.

    Args:
        config: the run; ``[data]`` says where the examples come from.
        arrays: in-memory data instead of ``data.train`` (and of
            ``data.test`` when it has a test set).

    Returns:
        ``(x, y, x_test, y_test)``; the test set is None when nothing is
        held out.

    Raises:
        ConfigError: no data, or data that is unreadable or does not fit.
    """
    spec = config.spec()
    seed = config.train.seed
    if arrays is not None:
        x, y = datasets.from_arrays(arrays.x, arrays.y, "x, y")
        train_source = "x, y"
    elif config.data.train:
        x, y = datasets.load(config.data.train, seed=seed)
        train_source = config.data.train
    else:
        raise ConfigError(
            "data.train", "", "is required (a built-in name or a path), or pass arrays: "
            "dbnode.train(config, x=..., y=...)",
        )  # fmt: skip
    test_source = config.data.test
    if arrays is not None and arrays.x_test is not None:
        x_test, y_test = datasets.from_arrays(arrays.x_test, arrays.y_test, "x_test, y_test")
        test_source = "x_test, y_test"
    elif config.data.test:
        x_test, y_test = datasets.load(config.data.test, seed=seed + 1)
    elif config.data.test_fraction and len(x) > 1:
        x, y, x_test, y_test = datasets.split(x, y, config.data.test_fraction, seed)
        if len(x_test) == 0:  # too few examples to hold any out
            x_test = y_test = None
    else:
        x_test = y_test = None
    check_data(spec, x, y, train_source)
    if x_test is not None:
        check_data(spec, x_test, y_test, test_source or train_source)
    return x, y, x_test, y_test


@dataclass(frozen=True)
class Arrays:
    """In-memory data for a run: training inputs and targets, and optionally
    a test set (else ``data.test_fraction`` of the training set is held out)."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None


def check_data(spec: ModelSpec, x: np.ndarray, y: np.ndarray, where: str) -> None:
    """A clear error when the data does not fit the model.

    Args:
        spec: the model.
        x, y: inputs (one row per example) and targets.
        where: the data source, for the message.

    Raises:
        ConfigError: wrong number of features or outputs, labels out of
            range, or NaN or infinity in the inputs or targets.
    """
    for what, values in (("inputs", x), ("targets", y)):
        if values.dtype.kind in "fc" and not np.isfinite(values).all():
            bad = int(np.argwhere(~np.isfinite(values))[0][0])
            raise ConfigError("data", where, f"{what} hold NaN or infinity (example {bad})")
    if x.shape[1] != spec.layers[0]:
        raise ConfigError(
            "data",
            where,
            f"examples have {x.shape[1]} features, model.layers[0] is {spec.layers[0]}",
        )
    outputs = spec.layers[-1]
    if spec.takes_labels:
        if y.ndim != 1 or not np.all(np.mod(y, 1) == 0) or y.min() < 0 or y.max() >= outputs:
            raise ConfigError(
                "data",
                where,
                f"cross_entropy needs integer labels in [0, {outputs}), "
                f"got values in [{y.min()}, {y.max()}]",
            )
    else:
        if spec.loss == "cross_entropy" and (y.min() < 0 or y.max() > 1):
            raise ConfigError(
                "data", where, f"a sigmoid's cross_entropy needs targets in [0, 1], "
                f"got values in [{y.min()}, {y.max()}]",
            )  # fmt: skip
        width = 1 if y.ndim == 1 else y.shape[1]
        if width != outputs:
            raise ConfigError(
                "data", where, f"targets have {width} columns, the model has {outputs} outputs"
            )


def shard_data(n: int, replicas: int) -> list[slice]:
    """Contiguous, near-equal slices of ``range(n)``, one per replica (the
    original's dataPerReplica shards)."""
    if replicas > n:
        raise ConfigError("train.replicas", replicas, f"more replicas than training examples ({n})")
    bounds = np.linspace(0, n, replicas + 1).round().astype(int)
    return [slice(int(a), int(b)) for a, b in zip(bounds, bounds[1:])]


@dataclass
class Inputs:
    """Everything a run needs before any node is contacted, all checked."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    params: dict[str, np.ndarray]
    shards: list[slice]  # each replica's rows of (x, y)
    task: str = "regression"  # what the model solves: dbnode.metrics.task_of
    sample: tuple[np.ndarray, np.ndarray] | None = None  # training rows for the train_* figures
    warnings: tuple[str, ...] = ()  # what about the data will likely make training go badly
    resume: checkpoint.Checkpoint | None = None
    resume_dir: Path | None = None  # the directory resumed from (its metrics.csv goes on)


# The train_* figures of metrics.csv are taken on this many training rows
# (a fixed random sample): enough for a curve, cheap beside the held-out set.
TRAIN_SAMPLE = 2000


def prepare(config: RunConfig, arrays: Arrays | None = None) -> Inputs:
    """Load and check the data and the initial model: every mistake in the
    config shows up here, before a node is started or contacted."""
    x, y, x_test, y_test = load_data(config, arrays)
    spec = config.spec()
    params = initial_params(config, spec)
    shards = shard_data(len(x), config.replicas_for(len(x)))
    rows = np.sort(
        np.random.default_rng([config.train.seed, 0x5A]).permutation(len(x))[:TRAIN_SAMPLE]
    )
    sample = (x[rows], y[rows])
    return Inputs(x, y, x_test, y_test, params, shards, task=task_of(spec, y), sample=sample,
                  warnings=tuple(data_warnings(spec, x, y, config.data.train or "x")))  # fmt: skip


# Keys of [train] that may change when a run is resumed: how it is watched,
# when it may end early, how long it goes on (more epochs extend it), and
# how slow replicas are helped (not train.portion_steps: pushes are named
# after their portion).
RESUMABLE_CHANGES = ("eval_interval", "early_stopping", "epochs", "backups", "max_replicas")


# What a key that a checkpoint's identity lacks (one added since) meant then.
_DEFAULTS = {"train": dataclasses.asdict(TrainConfig())}


def run_identity(config: RunConfig) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed: the model, data,
    optimizer and training schedule -- not hosts, intervals, or
    :data:`RESUMABLE_CHANGES`.

    Args:
        config: the run.

    Returns:
        Section -> key -> value.
    """
    d = config.to_dict()
    train = {k: v for k, v in d["train"].items() if k not in RESUMABLE_CHANGES}
    return {"model": d["model"], "data": d["data"], "optimizer": d["optimizer"], "train": train}


def identity_hash(config: RunConfig) -> str:
    """The hash of :func:`run_identity`, as checkpoints carry it.

    Args:
        config: the run.

    Returns:
        The hash.
    """
    return checkpoint.config_hash(run_identity(config))


def find_resume(config: RunConfig, directory: str | Path) -> checkpoint.Checkpoint:
    """The newest checkpoint under ``directory`` (a run's --out or its
    checkpoints directory) that verifies and belongs to this config.

    Raises:
        ConfigError: none there, or one written with another model, data,
            optimizer or schedule (the message names the first key that
            differs and both values).
    """
    directory = Path(directory)
    newest = checkpoint.newest(directory / "checkpoints") or checkpoint.newest(directory)
    if newest is None:
        raise ConfigError("--resume", str(directory), "holds no complete checkpoint")
    if newest.identity is not None:
        ours = run_identity(config)
        for section in sorted(set(ours) | set(newest.identity)):
            theirs, mine = newest.identity.get(section, {}), ours.get(section, {})
            for key in sorted(set(theirs) | set(mine)):
                if key not in theirs and mine.get(key) == _DEFAULTS.get(section, {}).get(key):
                    continue  # a key added since that checkpoint, at its default
                if theirs.get(key) != mine.get(key):
                    raise ConfigError(
                        f"{section}.{key}", mine.get(key),
                        f"differs from the checkpoint's ({theirs.get(key)!r}, in "
                        f"{newest.path}): a resumed run may change only "
                        f"{', '.join('train.' + k for k in RESUMABLE_CHANGES)}",
                    )  # fmt: skip
    else:  # written before checkpoints carried their identity: the hash, epochs and all
        d = config.to_dict()
        legacy = {
            **run_identity(config),
            "train": {
                k: v for k, v in d["train"].items() if k not in ("eval_interval", "early_stopping")
            },
        }
        if newest.config_hash != checkpoint.config_hash(legacy):
            raise ConfigError(
                "--resume", str(newest.path),
                "was written by a run with another model, data, optimizer or schedule",
            )  # fmt: skip
    return newest


def shard_optimizer(config: RunConfig, shards: list[slice]) -> dict[str, Any]:
    """The optimizer's wire form as the shards take it: with the schedule,
    its epochs turned into updates of each tensor piece (every replica
    pushes every piece once per ``n_push`` steps).

    Args:
        config: the run.
        shards: each replica's rows.

    Returns:
        The wire form (:func:`dbnode.optim.from_wire`).
    """
    wire = config.optimizer.to_wire()
    s, t = config.schedule, config.train
    if s.name not in ("step", "cosine"):
        return wire  # constant; plateau is the driver's (a scale op)
    steps = sum(-(-(rows.stop - rows.start) // t.batch_size) for rows in shards)
    per_epoch = steps / t.n_push
    return {**wire, "schedule": Schedule(s.name, every=s.every * per_epoch, factor=s.factor,
                                         total=t.epochs * per_epoch,
                                         min_factor=s.min_factor).to_wire()}  # fmt: skip


def initial_params(config: RunConfig, spec: ModelSpec) -> dict[str, np.ndarray]:
    init = config.model.init
    try:
        if init.endswith(".npz"):
            return load_params(init, spec)
        return init_params(spec, init, seed=config.train.seed)
    except (OSError, ValueError) as exc:
        raise ConfigError("model.init", init, str(exc)) from None
