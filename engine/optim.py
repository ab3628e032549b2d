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
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from . import kernels
from .errors import ConfigError

__all__ = [
    "OPTIMIZERS",
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

    def state(self, param: np.ndarray) -> dict[str, np.ndarray]:
        """Fresh per-tensor state for ``param`` (aligned arrays of its shape and dtype).

        Args:
            param: the tensor the state is for.

        Returns:
            State name -> array; ``{}`` for a stateless optimizer.
        """

    def apply(
        self, param: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray], step: int
    ) -> None:
        """Update ``param`` (and ``state``) in place with ``grad``.

        Args:
            param: the tensor, updated in place (C-contiguous, writable).
            grad: its gradient, of the same shape and dtype.
            state: its state, from :meth:`state` (updated in place).
            step: which update of this tensor this is, from 1 (a shard's
                version after it; what Adam's bias correction needs).

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


@dataclass(frozen=True)
class _Base:
    learning_rate: float

    def __post_init__(self) -> None:
        _positive("learning_rate", self.learning_rate)
        for f in dataclasses.fields(self):  # numbers as floats: no int in a float kernel call
            object.__setattr__(self, f.name, float(getattr(self, f.name)))

    def to_wire(self) -> dict[str, Any]:
        """The JSON form: ``{"name": ..., "learning_rate": ..., **settings}``.

        Returns:
            A new dict that :func:`from_wire` takes back.
        """
        return {"name": self.name, **dataclasses.asdict(self)}  # type: ignore[attr-defined]


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

    def apply(self, param: np.ndarray, grad: np.ndarray, state: dict, step: int = 1) -> None:
        """``param -= lr * grad``, in place.

        Args:
            param: the tensor, updated in place (C-contiguous, writable).
            grad: its gradient, of the same shape and dtype.
            state: its state, from :meth:`state` (unused).
            step: which update this is (unused).

        Raises:
            ValueError, TypeError: arrays of mismatched shape, dtype or layout.
        """
        kernels.sgd(param, grad, self.learning_rate)


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

    def apply(self, param: np.ndarray, grad: np.ndarray, state: dict, step: int = 1) -> None:
        """One momentum step, in place.

        Args:
            param: the tensor, updated in place (C-contiguous, writable).
            grad: its gradient, of the same shape and dtype.
            state: its state, from :meth:`state` (its ``velocity`` is updated in place).
            step: which update this is (unused).

        Raises:
            ValueError, TypeError: arrays of mismatched shape, dtype or layout.
        """
        kernels.momentum(param, grad, state["velocity"], self.learning_rate, self.momentum)


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

    def apply(self, param: np.ndarray, grad: np.ndarray, state: dict, step: int = 1) -> None:
        """One Adagrad step, in place.

        Args:
            param: the tensor, updated in place (C-contiguous, writable).
            grad: its gradient, of the same shape and dtype.
            state: its state, from :meth:`state` (its ``sum_sq`` is updated in place).
            step: which update this is (unused).

        Raises:
            ValueError, TypeError: arrays of mismatched shape, dtype or layout.
        """
        kernels.adagrad(param, grad, state["sum_sq"], self.learning_rate, self.eps)


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

    def apply(self, param: np.ndarray, grad: np.ndarray, state: dict, step: int = 1) -> None:
        """One Adam step, in place.

        Args:
            param: the tensor, updated in place (C-contiguous, writable).
            grad: its gradient, of the same shape and dtype.
            state: its state, from :meth:`state` (``m`` and ``v`` updated in place).
            step: which update of this tensor this is, from 1.

        Raises:
            ValueError, TypeError: arrays of mismatched shape, dtype or layout.
        """
        kernels.adam(param, grad, state["m"], state["v"], self.learning_rate, self.beta1,
                     self.beta2, self.eps, step)  # fmt: skip


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
            if f.name != "learning_rate"}  # fmt: skip


def make_optimizer(name: str, learning_rate: float, **settings: Any) -> Optimizer:
    """Build an optimizer by name (``sgd``, ``momentum``, ``adagrad``, ``adam``).

    Args:
        name: the optimizer's wire name.
        learning_rate: the step size (finite, > 0).
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
                f"{', '.join(['learning_rate', *allowed])}",
            )  # fmt: skip
    for key, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"optimizer.{key}", value, "must be a number")
    return cls(learning_rate, **settings)


def from_wire(wire: Mapping[str, Any]) -> Optimizer:
    """An optimizer from its wire form (see :meth:`Optimizer.to_wire`).

    Args:
        wire: ``{"name": ..., "learning_rate": ..., **settings}``.

    Returns:
        The optimizer.

    Raises:
        ConfigError: not a mapping with ``name`` and ``learning_rate``, or as
            :func:`make_optimizer`.
    """
    if not isinstance(wire, Mapping) or "name" not in wire or "learning_rate" not in wire:
        raise ConfigError("optimizer", wire, "must be a mapping with 'name' and 'learning_rate'")
    settings = {k: v for k, v in wire.items() if k not in ("name", "learning_rate")}
    return make_optimizer(wire["name"], wire["learning_rate"], **settings)
