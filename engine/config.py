"""Run configuration: a TOML file, overridable key by key, checked up front.

A run config has these sections::

    [model]      layers, activation, output, loss, dtype, init, partitions
    [data]       train, test, test_fraction
    [train]      replicas | examples_per_replica, batch_size, epochs,
                 n_fetch, n_push, pipeline, max_staleness, warmstart_steps,
                 portion_steps, max_replicas, backups, seed, eval_interval,
                 early_stopping = {patience, metric, min_delta}
    [schedule]   name, every, factor, min_factor, patience, metric
    [optimizer]  name, learning_rate, and the named optimizer's own settings
                 (momentum: momentum; adagrad: eps; adam: beta1, beta2, eps) -- see dbnode.optim
    [cluster]    hosts, parameter_shards, secret_file, hosts_file, nodes,
                 heartbeat, lease, backup_interval
    [checkpoint] interval, keep, dir
    [wire]       fetch, push, activations

Every key is optional except ``model.layers`` and ``data.train`` (which
in-memory arrays given to :func:`dbnode.train` stand in for). An unknown
section or key, or a value of the wrong type or range, is a
:class:`~dbnode.errors.ConfigError` naming ``section.key``. The same object
is what the Python API takes: ``RunConfig.from_dict({...})``.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import is_builtin
from .errors import ConfigError
from .kernels import WIRE_CODECS
from .model import DTYPES, HIDDEN_ACTIVATIONS, LOSSES, OUTPUTS, ModelSpec
from .optim import SCHEDULES, SGD, Optimizer, from_wire
from .pipeline import MAX_PIPELINE


@dataclass(frozen=True)
class ModelConfig:
    """The ``[model]`` section: the network and how it starts.

    Attributes:
        layers: sizes, input first (required).
        activation: of the hidden layers.
        output: of the last layer.
        loss: ``squared_error`` or ``cross_entropy`` (softmax: class labels;
            sigmoid: binary log-loss of each output).
        dtype: ``float32`` or ``float64``.
        init: ``normal:STD``, ``xavier``, ``he`` or an ``.npz`` of parameters.
        partitions: layer partitions per replica.
    """

    layers: tuple[int, ...] = ()
    activation: str = "sigmoid"
    output: str = "sigmoid"
    loss: str = "squared_error"
    dtype: str = "float32"
    init: str = "normal:0.2"
    partitions: int = 1


@dataclass(frozen=True)
class DataConfig:
    """The ``[data]`` section: where the examples come from.

    Attributes:
        train: a data source (see :func:`dbnode.data.load`; required).
        test: a held-out source; "" holds out ``test_fraction`` of ``train``.
        test_fraction: the part of ``train`` held out when there is no
            ``test`` (0: none, and no held-out figures).
    """

    train: str = ""
    test: str = ""
    test_fraction: float = 0.1


@dataclass(frozen=True)
class EarlyStoppingConfig:
    """``train.early_stopping``: end the run when a figure stops improving,
    and keep the best model.

    Attributes:
        patience: epochs without improvement before the run ends (0: off).
        metric: the figure watched, a ``metrics.csv`` column (default:
            ``test_loss``, or ``train_loss`` when nothing is held out).
        min_delta: how much better counts as an improvement.
    """

    patience: int = 0
    metric: str = ""
    min_delta: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    """The ``[train]`` section: replicas, minibatches and their pace.

    Attributes:
        replicas: model replicas; 0: from ``examples_per_replica``, else 1.
        examples_per_replica: examples each replica trains on (0: unused).
        batch_size: examples per step.
        epochs: passes over each replica's data shard.
        n_fetch: fetch parameters every this many steps.
        n_push: push accumulated gradients every this many steps.
        pipeline: minibatches a replica in several layer partitions keeps
            in flight (:mod:`dbnode.pipeline`); 0: one per partition; 1:
            one at a time (no pipelining).
        warmstart_steps: the first replica trains alone for this many
            steps before the others start from the shards' parameters (the
            paper's warmstarting; 0: all start at once).
        max_staleness: the shards refuse a push computed from parameters
            more than this many versions behind theirs, and its replica
            fetches before pushing again (SSP-style); -1: no bound.
        portion_steps: steps per leased portion of a replica's schedule
            (:mod:`dbnode.driver.leases`); 0: an eighth of an epoch, in
            whole push periods.
        max_replicas: replicas in all, with the helpers of nodes that join
            during the run (``cluster.hosts_file``); 0: no limit.
        backups: a replica that has trained its own portions takes over
            the later portions of the slowest other one, or trains a copy
            of its last (the first copy to push a step has it applied).
        seed: for initialisation, data order and the held-out split.
        eval_interval: seconds between evaluations (besides one at the end
            of every epoch).
        early_stopping: when to end the run early (:class:`EarlyStoppingConfig`).
    """

    replicas: int = 0
    examples_per_replica: int = 0
    batch_size: int = 1
    epochs: int = 1
    n_fetch: int = 1
    n_push: int = 1
    pipeline: int = 0
    max_staleness: int = -1
    warmstart_steps: int = 0
    portion_steps: int = 0
    max_replicas: int = 0
    backups: bool = True
    seed: int = 0
    eval_interval: float = 2.0
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass(frozen=True)
class ScheduleConfig:
    """The ``[schedule]`` section: how the learning rate changes, applied on
    the parameter shards (:class:`dbnode.optim.Schedule`).

    Attributes:
        name: ``constant``; ``step`` (times ``factor`` every ``every``
            epochs); ``cosine`` (down to ``min_factor`` of the rate over
            ``train.epochs``); ``plateau`` (times ``factor`` when ``metric``
            has not improved for ``patience`` epochs, down to ``min_factor``).
        every: ``step``: epochs between reductions.
        factor: ``step``, ``plateau``: each reduction's factor, in (0, 1].
        min_factor: ``cosine``, ``plateau``: the lowest factor, in [0, 1].
        patience: ``plateau``: epochs without improvement before a reduction.
        metric: ``plateau``: the figure watched (default ``test_loss``, or
            ``train_loss`` without a held-out set).
    """

    name: str = "constant"
    every: float = 10.0
    factor: float = 0.1
    min_factor: float = 0.0
    patience: float = 5.0
    metric: str = ""


@dataclass(frozen=True)
class ClusterConfig:
    """The ``[cluster]`` section: where the run runs.

    Attributes:
        hosts: ``"host:port"`` of running nodes; none: an embedded local cluster.
        parameter_shards: parameter server shards, spread over the nodes;
            0: one per layer partition, each holding its partition's
            parameters whole (beside it, for one replica: no parameter
            traffic between machines), else its share of every partition's
            bytes.
        secret_file: the secret for ``hosts`` ("": ``$DBNODE_SECRET``).
        hosts_file: a file of ``host:port`` lines, more nodes besides
            ``hosts``; read again during the run: nodes added join it, nodes
            removed are drained (:mod:`dbnode.driver.elastic`).
        nodes: nodes of the embedded local cluster (0: one per layer partition
            of every replica, up to one per core).
        heartbeat: seconds; a node silent for three of them is dead.
        lease: seconds a node keeps the run without hearing from the driver;
            then it frees it (a driver killed outright leaves nothing behind).
        backup_interval: seconds between the driver's in-memory copies of
            every parameter shard, what a dead shard node's pieces are
            restored from (0: none; then only checkpoints can).
    """

    hosts: tuple[str, ...] = ()
    parameter_shards: int = 0
    secret_file: str = ""
    hosts_file: str = ""
    nodes: int = 0
    heartbeat: float = 1.0
    lease: float = 10.0
    backup_interval: float = 1.0


@dataclass(frozen=True)
class CheckpointConfig:
    """The ``[checkpoint]`` section: checkpoints of the parameter shards."""

    interval: float = 0.0  # seconds between checkpoints; 0: none
    keep: int = 3  # newest checkpoints kept
    dir: str = ""  # default: <out>/checkpoints


@dataclass(frozen=True)
class WireConfig:
    """The ``[wire]`` section: the codec of each kind of traffic between
    processes (:mod:`dbnode.codecs`): ``"f32"`` (as computed, exact),
    ``"bf16"`` or ``"f16"`` (half the bytes; float32 models only).

    Attributes:
        fetch: parameters the partitions fetch from the shards.
        push: gradients they push (with error feedback: nothing is lost
            over time).
        activations: activations and deltas between layer partitions.
    """

    fetch: str = "f32"
    push: str = "f32"
    activations: str = "f32"


@dataclass(frozen=True)
class RunConfig:
    """A whole run config, one field per section (see the module's docstring).

    Build it with :meth:`load` or :meth:`from_dict`, which check it; the
    constructor does not.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # The [optimizer] section is the optimizer itself: dbnode.optim checks its
    # keys, so a new optimizer needs nothing here.
    optimizer: Optimizer = field(default_factory=lambda: SGD(learning_rate=0.01))
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wire: WireConfig = field(default_factory=WireConfig)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], overrides: list[str] = ()) -> RunConfig:
        """Build and check a config from nested dicts, then apply
        ``section.key=value`` overrides (values in TOML syntax).

        Args:
            raw: section name -> its keys and values, as TOML would give them.
            overrides: ``section.key=value`` items, applied in order.

        Returns:
            The checked config.

        Raises:
            ConfigError: an unknown section or key, a bad value or override;
                the error names ``section.key``.
        """
        raw = {
            section: dict(values) if isinstance(values, dict) else values
            for section, values in raw.items()
        }
        for item in overrides:
            section, key, value = parse_override(item)
            raw.setdefault(section, {})
            if not isinstance(raw[section], dict):
                raise ConfigError(section, raw[section], "must be a table of keys")
            raw[section][key] = value
        sections = {}
        hints = typing.get_type_hints(cls)
        for name, values in raw.items():
            if name not in hints:
                raise ConfigError(
                    name, values, f"unknown section; expected one of {', '.join(hints)}"
                )
            if not isinstance(values, dict):
                raise ConfigError(name, values, "must be a table of keys")
            if name == "optimizer":
                sections[name] = from_wire({"name": "sgd", "learning_rate": 0.01, **values})
            else:
                sections[name] = _section(hints[name], name, values)
        config = cls(**sections)
        config.check()
        return config

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] = ()) -> RunConfig:
        """Read a TOML run config; relative paths written in the file are
        taken from the file's directory, those given as overrides from the
        working directory (where whoever typed them stands).

        Args:
            path: the TOML file.
            overrides: ``section.key=value`` items, as in :meth:`from_dict`.

        Returns:
            The checked config, its relative paths resolved (:meth:`relative_to`).

        Raises:
            ConfigError: the file is missing, unreadable or not TOML, or as
                :meth:`from_dict`.
        """
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError("config", str(path), "file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("config", str(path), f"cannot be read: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", str(path), f"is not valid TOML: {exc}") from None
        return cls.from_dict(_resolved(raw, path.parent), overrides)

    def relative_to(self, base: Path) -> RunConfig:
        """Resolve the paths (:data:`PATH_KEYS`) that are relative to ``base``.

        Built-in data names, absolute and empty paths are kept; so is a
        ``model.init`` that is not an ``.npz``.

        Args:
            base: the directory relative paths are taken from.

        Returns:
            A new config.
        """
        return type(self).from_dict(_resolved(self.to_dict(), base))

    def spec(self) -> ModelSpec:
        """The network ``[model]`` describes.

        Returns:
            Its :class:`~dbnode.model.ModelSpec`.

        Raises:
            ValueError: the model section does not make a network (the checks
                of :meth:`check` report it as a ConfigError).
        """
        m = self.model
        return ModelSpec(m.layers, m.activation, m.output, m.loss, m.dtype)

    def check(self) -> None:
        """Cross-field and range checks; each error names its key.

        Raises:
            ConfigError: the first value out of range or at odds with another.
        """
        m, d, t, c = self.model, self.data, self.train, self.cluster
        if not m.layers:
            raise ConfigError("model.layers", m.layers, "is required (sizes, input first)")
        _choice("model.activation", m.activation, HIDDEN_ACTIVATIONS)
        _choice("model.output", m.output, OUTPUTS)
        _choice("model.loss", m.loss, LOSSES)
        _choice("model.dtype", m.dtype, DTYPES)
        try:
            self.spec()
        except ValueError as exc:
            raise ConfigError("model", m.layers, str(exc)) from None
        if not 1 <= m.partitions <= len(m.layers) - 1:
            raise ConfigError(
                "model.partitions",
                m.partitions,
                f"must be between 1 and the number of layers ({len(m.layers) - 1})",
            )
        if not 0 <= d.test_fraction < 1:
            raise ConfigError("data.test_fraction", d.test_fraction, "must be in [0, 1)")
        if t.replicas and t.examples_per_replica:
            raise ConfigError(
                "train.replicas", t.replicas, "give replicas or examples_per_replica, not both"
            )
        for key in ("replicas", "examples_per_replica"):
            if getattr(t, key) < 0:
                raise ConfigError(f"train.{key}", getattr(t, key), "must be >= 0")
        for key in ("batch_size", "epochs", "n_fetch", "n_push"):
            if getattr(t, key) < 1:
                raise ConfigError(f"train.{key}", getattr(t, key), "must be >= 1")
        if not 0 <= t.pipeline <= MAX_PIPELINE:
            raise ConfigError(
                "train.pipeline", t.pipeline,
                f"must be in [0, {MAX_PIPELINE}] (0: one minibatch in flight per partition)",
            )  # fmt: skip
        for key in ("warmstart_steps", "portion_steps", "max_replicas"):
            if getattr(t, key) < 0:
                raise ConfigError(f"train.{key}", getattr(t, key), "must be >= 0")
        if t.max_staleness < -1:
            raise ConfigError(
                "train.max_staleness", t.max_staleness, "must be >= 0, or -1 for no bound"
            )
        if not t.eval_interval > 0:
            raise ConfigError("train.eval_interval", t.eval_interval, "must be > 0 seconds")
        if t.early_stopping.patience < 0:
            raise ConfigError(
                "train.early_stopping.patience", t.early_stopping.patience, "must be >= 0 (0: off)"
            )
        if t.early_stopping.min_delta < 0:
            raise ConfigError(
                "train.early_stopping.min_delta", t.early_stopping.min_delta, "must be >= 0"
            )
        sc = self.schedule
        _choice("schedule.name", sc.name, SCHEDULES)
        if not sc.every > 0:
            raise ConfigError("schedule.every", sc.every, "must be > 0 epochs")
        if not 0 < sc.factor <= 1:
            raise ConfigError("schedule.factor", sc.factor, "must be in (0, 1]")
        if not 0 <= sc.min_factor <= 1:
            raise ConfigError("schedule.min_factor", sc.min_factor, "must be in [0, 1]")
        if not sc.patience > 0:
            raise ConfigError("schedule.patience", sc.patience, "must be > 0 epochs")
        if c.parameter_shards < 0:
            raise ConfigError(
                "cluster.parameter_shards",
                c.parameter_shards,
                "must be >= 0 (0: one per partition)",
            )
        k = self.checkpoint
        if k.interval < 0:
            raise ConfigError("checkpoint.interval", k.interval, "must be >= 0 seconds (0: off)")
        if k.keep < 1:
            raise ConfigError("checkpoint.keep", k.keep, "must be >= 1")
        if not c.heartbeat > 0:
            raise ConfigError("cluster.heartbeat", c.heartbeat, "must be > 0 seconds")
        if not c.lease >= 3 * c.heartbeat:
            raise ConfigError(
                "cluster.lease", c.lease, f"must be at least 3 heartbeats ({3 * c.heartbeat:g} s)"
            )
        if c.backup_interval < 0:
            raise ConfigError(
                "cluster.backup_interval", c.backup_interval, "must be >= 0 seconds (0: off)"
            )
        if c.nodes < 0:
            raise ConfigError(
                "cluster.nodes",
                c.nodes,
                "must be >= 0 (0: one per partition of every replica, up to one per core)",
            )
        for host in c.hosts:
            parse_address(host, key="cluster.hosts")
        for key, codec in dataclasses.asdict(self.wire).items():
            _choice(f"wire.{key}", codec, ("f32", *WIRE_CODECS))
            if codec != "f32" and m.dtype != "float32":
                raise ConfigError(
                    f"wire.{key}", codec, f"16-bit codecs encode float32 models, not {m.dtype}"
                )

    def replicas_for(self, n_examples: int) -> int:
        """Replica count: given, or ceil(examples / examples_per_replica)
        (the original's dataPerReplica), or 1.

        Args:
            n_examples: examples in the training set.

        Returns:
            The number of replicas, at least 1.
        """
        t = self.train
        if t.replicas:
            return t.replicas
        if t.examples_per_replica:
            return max(1, math.ceil(n_examples / t.examples_per_replica))
        return 1

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The config as nested dicts, as :meth:`from_dict` takes it back.

        Returns:
            Section name -> key -> value; tuples as lists.
        """
        out = {
            name: {
                k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(getattr(self, name)).items()
            }
            for name in typing.get_type_hints(type(self))
        }
        out["optimizer"] = self.optimizer.to_wire()
        return out


#: The keys that hold paths: relative ones in a config file are taken from
#: the file's directory.
PATH_KEYS = (("data", "train"), ("data", "test"), ("model", "init"),
             ("cluster", "secret_file"), ("cluster", "hosts_file"),
             ("checkpoint", "dir"))  # fmt: skip


def _resolved(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """``raw`` (nested dicts) with its relative paths taken from ``base``."""
    out = {section: dict(v) if isinstance(v, dict) else v for section, v in raw.items()}
    for section, key in PATH_KEYS:
        value = out[section].get(key) if isinstance(out.get(section), dict) else None
        if not isinstance(value, str) or not value or Path(value).is_absolute():
            continue
        if is_builtin(value) or (key == "init" and not value.endswith(".npz")):
            continue
        out[section][key] = str(Path(base) / value)
    return out


def parse_override(item: str) -> tuple[str, str, Any]:
    """``section.key=value`` -> (section, key, value); the value is read as
    TOML (``3``, ``0.5``, ``[2, 2, 1]``, ``"relu"``), else as a bare string.

    Args:
        item: the override, ``section.key=value``.

    Returns:
        ``(section, key, value)``.

    Raises:
        ConfigError: ``item`` is not of that form.
    """
    dotted, sep, text = item.partition("=")
    section, dot, key = dotted.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ConfigError("override", item, "expected section.key=value")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return section, key, value


def parse_address(
    text: str, key: str = "address", default_port: int | None = None
) -> tuple[str, int]:
    """``host:port`` -> (host, port); IPv6 as ``[addr]:port``, or a bare
    ``addr`` when a default port applies.

    Args:
        text: the address.
        key: what an error calls it (e.g. ``cluster.hosts``).
        default_port: the port of an address without one; None: required.

    Returns:
        ``(host, port)``, the host without brackets.

    Raises:
        ConfigError: no host, or no port (none given and no default), or one
            outside 0..65535.
    """
    text = text.strip()
    if text.startswith("["):  # [v6] or [v6]:port
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ("" if rest else None)
    elif text.count(":") > 1:  # a bare IPv6 address: no port
        host, port = text, None
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = text, None
    if port is None and default_port is not None:
        port = str(default_port)
    if not host or port is None or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(
            key, text, "expected HOST:PORT with a port in 0..65535 ([ADDR]:PORT for IPv6)"
        )
    return host, int(port)


def format_address(address: tuple[str, int]) -> str:
    """(host, port) -> ``host:port``, with IPv6 hosts in brackets.

    Args:
        address: ``(host, port)``.

    Returns:
        The text :func:`parse_address` reads back.
    """
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _section(cls: type, name: str, values: dict[str, Any]):
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(
                f"{name}.{key}", value, f"unknown key; [{name}] takes {', '.join(hints)}"
            )
        out[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**out)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the field's type; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, f"must be a list of {item.__name__}")
        return tuple(_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if dataclasses.is_dataclass(hint):  # a nested table, e.g. train.early_stopping
        if not isinstance(value, dict):
            raise ConfigError(key, value, "must be a table, e.g. {patience = 5}")
        return _section(hint, key, value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, value, "must be a number")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "must be an integer")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "must be a string")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "must be true or false")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")  # pragma: no cover


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(key, value, f"must be one of {', '.join(allowed)}")
