"""Optimizers: the rule a parameter shard applies to a pushed gradient.

Each optimizer is one frozen dataclass: its settings are its fields (the
learning rate first), it checks them itself, it keeps its state per tensor,
and its update is one compiled in-place pass (:mod:`dbnode.kernels`). Its
wire form is ``{"name": ..., "learning_rate": ..., **settings}``, the
``optimizer`` of an INIT's meta (docs/protocol.md).

Everything else derives from :data:`OPTIMIZERS`: the run config's
``[optimizer]`` keys (:mod:`dbnode.config`), the shard's INIT, the driver's
wire form, snapshots. A new optimizer is its kernel (csrc/ and
:mod:`dbnode.kernels`), its numpy twin (:mod:`dbnode.reference`) and one
class here, added to :data:`OPTIMIZERS`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from . import kernels
from .errors import ConfigError

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "STALENESS_POLICIES",
    "Schedule",
    "Scheduled",
    "Adagrad",
    "Adam",
    "Momentum",
    "Optimizer",
    "SGD",
    "from_wire",
    "make_optimizer",
    "settings_of",
]


class Optimizer(Protocol):
    """What a parameter shard (and the single-process trainer) asks of an optimizer."""

    name: ClassVar[str]
    learning_rate: float
    staleness: str  # one of STALENESS_POLICIES

    def staleness_factor(self, tau: int) -> float:
        """The factor on the learning rate for a push ``tau`` versions stale.

        Args:
            tau: how many versions the push's parameters are behind (>= 0).

        Returns:
            The factor (1.0 when the policy is ``none``).
        """

    def state(self, param: np.ndarray) -> dict[str, np.ndarray]:
        """Fresh per-tensor state for ``param`` (aligned arrays of its shape and dtype).

        Args:
            param: the tensor the state is for.

        Returns:
            State name -> array; ``{}`` for a stateless optimizer.
        """

    def apply(
        self,
        param: np.ndarray,
        grad: np.ndarray,
        state: dict[str, np.ndarray],
        step: int,
        scale: float = 1.0,
    ) -> None:
        """Update ``param`` (and ``state``) in place with ``grad``.

        Args:
            param: the tensor, updated in place (C-contiguous, writable).
            grad: its gradient, of the same shape and dtype.
            state: its state, from :meth:`state` (updated in place).
            step: which update of this tensor this is, from 1 (a shard's
                version after it; what Adam's bias correction and the
                learning-rate schedules need).
            scale: a factor on the learning rate (reduce-on-plateau's).

        Raises:
            ValueError, TypeError: arrays of mismatched shape, dtype or layout.
        """

    def to_wire(self) -> dict[str, Any]:
        """The JSON form: ``{"name": ..., "learning_rate": ..., **settings}``.

        Returns:
            A new dict that :func:`from_wire` takes back.
        """


def _positive(key: str, value: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value > 0)
    ):
        raise ConfigError(f"optimizer.{key}", value, "must be a finite number > 0")


#: How a shard scales the step of a push computed from parameters ``tau``
#: versions behind its own (``optimizer.staleness``): ``none`` leaves it,
#: ``inverse`` multiplies the learning rate by ``1 / max(1, tau)`` (Zhang et
#: al., "Staleness-aware async-SGD", IJCAI 2016).
STALENESS_POLICIES = ("none", "inverse")


@dataclass(frozen=True)
class _Base:
    learning_rate: float
    # Keyword-only: positional settings (``Momentum(0.1, 0.9)``) keep their meaning.
    staleness: str = field(default="none", kw_only=True)

    def __post_init__(self) -> None:
        _positive("learning_rate", self.learning_rate)
        if self.staleness not in STALENESS_POLICIES:
            raise ConfigError(
                "optimizer.staleness", self.staleness,
                f"must be one of {', '.join(STALENESS_POLICIES)}",
            )  # fmt: skip
        for f in dataclasses.fields(self):  # numbers as floats: no int in a float kernel call
            if f.name != "staleness":
                object.__setattr__(self, f.name, float(getattr(self, f.name)))

    def staleness_factor(self, tau: int) -> float:
        """The factor on the learning rate for a push ``tau`` versions stale.

        Args:
            tau: the shard's version when it applies the push, minus the
                version the push's gradient was computed from (>= 0).

        Returns:
            1.0, or ``1 / max(1, tau)`` under the ``inverse`` policy.
        """
        return 1.0 / max(1, tau) if self.staleness == "inverse" else 1.0

    def to_wire(self) -> dict[str, Any]:
        """The JSON form: ``{"name": ..., "learning_rate": ..., **settings}``
        (and ``staleness`` when it is not ``none``).

        Returns:
            A new dict that :func:`from_wire` takes back.
        """
        wire = {"name": self.name, **dataclasses.asdict(self)}  # type: ignore[attr-defined]
        if wire["staleness"] == "none":
            del wire["staleness"]  # the form every earlier peer and snapshot has
        return wire


@dataclass(frozen=True)
class SGD(_Base):
    """Plain SGD, the original project's rule: ``w -= lr * g``.

    Args:
        learning_rate: the step size (finite, > 0).

    Raises:
        ConfigError: a setting out of range (the key is ``optimizer.<setting>``).
    """

    name: ClassVar[str] = "sgd"

    def state(self, param: np.ndarray) -> dict[str, np.ndarray]:
        """No state.

        Args:
            param: the tensor the state is for.

        Returns:
            ``{}``.
        """
        return {}

    def apply(
        self, param: np.ndarray, grad: np.ndarray, state: dict, step: int = 1, scale: float = 1.0
    ) -> None:
        """``param -= lr * grad``, in place.

        Args:
            param: the tensor, updated in place (C-contiguous, writable).
            grad: its gradient, of the same shape and dtype.
            state: its state, from :meth:`state` (unused).
            step: which update this is (unused).
            scale: a factor on the learning rate.

        Raises:
            ValueError, TypeError: arrays of mismatched shape, dtype or layout.
        """
        kernels.sgd(param, grad, self.learning_rate * scale)


@dataclass(frozen=True)
class Momentum(_Base):
    """Classical momentum: ``v = mu * v - lr * g; w += v``.

    Args:
        learning_rate: the step size (finite, > 0).
        momentum: ``mu``, in [0, 1).

    Raises:
        ConfigError: a setting out of range.
    """

    momentum: float = 0.9
    name: ClassVar[str] = "momentum"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.momentum < 1:
            raise ConfigError("optimizer.momentum", self.momentum, "must be in [0, 1)")

    def state(self, param: np.ndarray) -> dict[str, np.ndarray]:
        """``velocity``, zeros like ``param``.

        Args:
            param: the tensor the state is for.

        Returns:
            ``{"velocity": zeros}``, aligned.
        """
        return {"velocity": kernels.zeros(param.shape, param.dtype)}

    def apply(
        self, param: np.ndarray, grad: np.ndarray, state: dict, step: int = 1, scale: float = 1.0
    ) -> None:
        """One momentum step, in place.

        Args:
            param: the tensor, updated in place (C-contiguous, writable).
            grad: its gradient, of the same shape and dtype.
            state: its state, from :meth:`state` (its ``velocity`` is updated in place).
            step: which update this is (unused).
            scale: a factor on the learning rate.

        Raises:
            ValueError, TypeError: arrays of mismatched shape, dtype or layout.
        """
        kernels.momentum(param, grad, state["velocity"], self.learning_rate * scale, self.momentum)


@dataclass(frozen=True)
class Adagrad(_Base):
    """Adagrad as in Downpour SGD: ``s += g * g; w -= lr * g / sqrt(s + eps)``.

    Args:
        learning_rate: the step size (finite, > 0).
        eps: added under the square root (finite, > 0).

    Raises:
        ConfigError: a setting out of range.
    """

    eps: float = 1e-8
    name: ClassVar[str] = "adagrad"

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("eps", self.eps)

    def state(self, param: np.ndarray) -> dict[str, np.ndarray]:
        """``sum_sq``, zeros like ``param``.

        Args:
            param: the tensor the state is for.

        Returns:
            ``{"sum_sq": zeros}``, aligned.
        """
        return {"sum_sq": kernels.zeros(param.shape, param.dtype)}

    def apply(
        self, param: np.ndarray, grad: np.ndarray, state: dict, step: int = 1, scale: float = 1.0
    ) -> None:
        """One Adagrad step, in place.

        Args:
            param: the tensor, updated in place (C-contiguous, writable).
            grad: its gradient, of the same shape and dtype.
            state: its state, from :meth:`state` (its ``sum_sq`` is updated in place).
            step: which update this is (unused).
            scale: a factor on the learning rate.

        Raises:
            ValueError, TypeError: arrays of mismatched shape, dtype or layout.
        """
        kernels.adagrad(param, grad, state["sum_sq"], self.learning_rate * scale, self.eps)


@dataclass(frozen=True)
class Adam(_Base):
    """Adam (Kingma & Ba 2015), as PyTorch computes it: moving averages of
    the gradient and its square, bias-corrected by the tensor's update count.

    Applied on the shards, each tensor piece counts its own updates (its
    version), so every piece's correction is exact however the pushes of
    several replicas interleave.

    Args:
        learning_rate: the step size (finite, > 0).
        beta1: the first moment's decay, in [0, 1).
        beta2: the second moment's decay, in [0, 1).
        eps: added to the root of the second moment (finite, > 0).

    Raises:
        ConfigError: a setting out of range.
    """

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    name: ClassVar[str] = "adam"

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"optimizer.{key}", getattr(self, key), "must be in [0, 1)")
        _positive("eps", self.eps)

    def state(self, param: np.ndarray) -> dict[str, np.ndarray]:
        """``m`` and ``v``, zeros like ``param``.

        Args:
            param: the tensor the state is for.

        Returns:
            ``{"m": zeros, "v": zeros}``, aligned.
        """
        return {name: kernels.zeros(param.shape, param.dtype) for name in ("m", "v")}

    def apply(
        self, param: np.ndarray, grad: np.ndarray, state: dict, step: int = 1, scale: float = 1.0
    ) -> None:
        """One Adam step, in place.

        Args:
            param: the tensor, updated in place (C-contiguous, writable).
            grad: its gradient, of the same shape and dtype.
            state: its state, from :meth:`state` (``m`` and ``v`` updated in place).
            step: which update of this tensor this is, from 1.
            scale: a factor on the learning rate.

        Raises:
            ValueError, TypeError: arrays of mismatched shape, dtype or layout.
        """
        kernels.adam(param, grad, state["m"], state["v"], self.learning_rate * scale,
                     self.beta1, self.beta2, self.eps, step)  # fmt: skip


#: Learning-rate schedules by name: ``constant``; ``step`` (times ``factor``
#: every ``every`` updates); ``cosine`` (from 1 down to ``min_factor`` over
#: ``total`` updates, then flat); ``plateau`` (constant here: the driver
#: lowers the shards' scale when the held-out figure stalls).
SCHEDULES = ("constant", "step", "cosine", "plateau")


@dataclass(frozen=True)
class Schedule:
    """A learning-rate schedule as the shards apply it: a factor on the
    rate that is a function of the tensor's update count alone, so it is
    exact and the same on every shard whatever the timing.

    Args:
        name: one of :data:`SCHEDULES`.
        every: ``step``: updates between two reductions.
        factor: ``step``: the factor of each reduction.
        total: ``cosine``: updates over which the rate falls.
        min_factor: ``cosine``: where it falls to.

    Raises:
        ConfigError: an unknown name or a setting out of range.
    """

    name: str = "constant"
    every: float = 0.0
    factor: float = 0.1
    total: float = 0.0
    min_factor: float = 0.0

    def __post_init__(self) -> None:
        for key in ("every", "factor", "total", "min_factor"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"schedule.{key}", value, "must be a number")
            object.__setattr__(self, key, float(value))
        if self.name not in SCHEDULES:
            raise ConfigError("schedule.name", self.name, f"must be one of {', '.join(SCHEDULES)}")
        if self.name == "step" and not self.every > 0:
            raise ConfigError("schedule.every", self.every, "must be > 0")
        if not 0 < self.factor <= 1:
            raise ConfigError("schedule.factor", self.factor, "must be in (0, 1]")
        if not 0 <= self.min_factor <= 1:
            raise ConfigError("schedule.min_factor", self.min_factor, "must be in [0, 1]")

    def factor_at(self, step: int) -> float:
        """The factor on the learning rate at update ``step`` (from 1).

        Args:
            step: the update's number.

        Returns:
            The factor, in (0, 1] (or ``min_factor`` for cosine's end).
        """
        done = step - 1  # updates before this one
        if self.name == "step":
            return self.factor ** int(done // self.every)
        if self.name == "cosine" and self.total > 0:
            t = min(1.0, done / self.total)
            return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * t))
        return 1.0

    def to_wire(self) -> dict[str, Any]:
        """The JSON form, as the optimizer's ``schedule``.

        Returns:
            The fields, as a dict.
        """
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Scheduled:
    """An optimizer whose learning rate follows a :class:`Schedule`: its
    wire form is the optimizer's with a ``schedule`` entry.

    Args:
        inner: the optimizer.
        schedule: the schedule.
    """

    inner: Any
    schedule: Schedule

    @property
    def name(self) -> str:
        """The inner optimizer's name."""
        return self.inner.name

    @property
    def learning_rate(self) -> float:
        """The base learning rate (before the schedule's factor)."""
        return self.inner.learning_rate

    @property
    def staleness(self) -> str:
        """The inner optimizer's staleness policy."""
        return self.inner.staleness

    def staleness_factor(self, tau: int) -> float:
        """As the inner optimizer's.

        Args:
            tau: the push's staleness in versions.

        Returns:
            The factor on the learning rate.
        """
        return self.inner.staleness_factor(tau)

    def state(self, param: np.ndarray) -> dict[str, np.ndarray]:
        """The inner optimizer's state.

        Args:
            param: the tensor the state is for.

        Returns:
            As the inner optimizer's :meth:`state`.
        """
        return self.inner.state(param)

    def apply(
        self, param: np.ndarray, grad: np.ndarray, state: dict, step: int = 1, scale: float = 1.0
    ) -> None:
        """The inner optimizer's step at the scheduled rate.

        Args:
            param: the tensor, updated in place.
            grad: its gradient.
            state: its state.
            step: which update of this tensor this is, from 1.
            scale: a further factor on the learning rate.

        Raises:
            ValueError, TypeError: arrays of mismatched shape, dtype or layout.
        """
        self.inner.apply(param, grad, state, step, scale * self.schedule.factor_at(step))

    def to_wire(self) -> dict[str, Any]:
        """The inner optimizer's wire form with ``schedule``.

        Returns:
            A new dict that :func:`from_wire` takes back.
        """
        return {**self.inner.to_wire(), "schedule": self.schedule.to_wire()}


#: Every optimizer by wire name.
OPTIMIZERS: dict[str, type] = {cls.name: cls for cls in (SGD, Momentum, Adagrad, Adam)}


def settings_of(name: str) -> dict[str, Any]:
    """The settings of optimizer ``name`` besides the learning rate, with their defaults.

    Args:
        name: a wire name in :data:`OPTIMIZERS`.

    Returns:
        Setting name -> default value (``{}`` for SGD).

    Raises:
        KeyError: ``name`` is not an optimizer.
    """
    return {f.name: f.default for f in dataclasses.fields(OPTIMIZERS[name])
            if f.name not in ("learning_rate", "staleness")}  # fmt: skip


def make_optimizer(
    name: str, learning_rate: float, staleness: str = "none", **settings: Any
) -> Optimizer:
    """Build an optimizer by name (``sgd``, ``momentum``, ``adagrad``, ``adam``).

    Args:
        name: the optimizer's wire name.
        learning_rate: the step size (finite, > 0).
        staleness: one of :data:`STALENESS_POLICIES`.
        **settings: the optimizer's own settings (:func:`settings_of`), as numbers.

    Returns:
        The optimizer.

    Raises:
        ConfigError: an unknown name or setting, or a setting out of range;
            the key is ``optimizer.<name or setting>`` and the message lists
            what is allowed.
    """
    try:
        cls = OPTIMIZERS[name]
    except (KeyError, TypeError):
        raise ConfigError(
            "optimizer.name", name, f"unknown optimizer {name!r}; expected one of "
            f"{', '.join(sorted(OPTIMIZERS))}",
        ) from None  # fmt: skip
    allowed = settings_of(name)
    for key in settings:
        if key not in allowed:
            raise ConfigError(
                f"optimizer.{key}", settings[key], f"unknown setting for {name}; expected one of "
                f"{', '.join(['learning_rate', *allowed, 'staleness'])}",
            )  # fmt: skip
    for key, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"optimizer.{key}", value, "must be a number")
    return cls(learning_rate, staleness=staleness, **settings)


def from_wire(wire: Mapping[str, Any]) -> Optimizer:
    """An optimizer from its wire form (see :meth:`Optimizer.to_wire`).

    Args:
        wire: ``{"name": ..., "learning_rate": ..., **settings}``, and
            optionally ``"schedule"``: a :class:`Schedule`'s fields (then a
            :class:`Scheduled` optimizer).

    Returns:
        The optimizer.

    Raises:
        ConfigError: not a mapping with ``name`` and ``learning_rate``, or as
            :func:`make_optimizer`.
    """
    if not isinstance(wire, Mapping) or "name" not in wire or "learning_rate" not in wire:
        raise ConfigError("optimizer", wire, "must be a mapping with 'name' and 'learning_rate'")
    settings = {k: v for k, v in wire.items() if k not in ("name", "learning_rate", "schedule")}
    optimizer = make_optimizer(wire["name"], wire["learning_rate"], **settings)
    schedule = wire.get("schedule")
    if schedule is None:
        return optimizer
    fields = {f.name for f in dataclasses.fields(Schedule)}
    if not isinstance(schedule, Mapping) or not set(schedule) <= fields:
        raise ConfigError("optimizer.schedule", schedule, f"must be a mapping of {sorted(fields)}")
    return Scheduled(optimizer, Schedule(**schedule))
