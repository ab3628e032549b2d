"""Optimizers: the rule a parameter shard applies to a pushed gradient.

Each optimizer is a small object with a learning rate and the state it keeps
per tensor; the update itself is one compiled in-place pass
(:mod:`dbnode.kernels`).
"""

from dataclasses import dataclass

import numpy as np

from . import kernels


@dataclass(frozen=True)
class SGD:
    """Plain SGD, the original project's rule: ``w -= lr * g``."""

    learning_rate: float
    name = "sgd"

    def state(self, param: np.ndarray) -> dict[str, np.ndarray]:
        return {}

    def apply(self, param: np.ndarray, grad: np.ndarray, state: dict) -> None:
        kernels.sgd(param, grad, self.learning_rate)


@dataclass(frozen=True)
class Momentum:
    """Classical momentum: ``v = mu * v - lr * g; w += v``."""

    learning_rate: float
    momentum: float = 0.9
    name = "momentum"

    def state(self, param: np.ndarray) -> dict[str, np.ndarray]:
        return {"velocity": kernels.zeros(param.shape, param.dtype)}

    def apply(self, param: np.ndarray, grad: np.ndarray, state: dict) -> None:
        kernels.momentum(param, grad, state["velocity"], self.learning_rate, self.momentum)


@dataclass(frozen=True)
class Adagrad:
    """Adagrad as in Downpour SGD: each parameter's rate is
    ``lr / sqrt(sum of its squared gradients + eps)``."""

    learning_rate: float
    eps: float = 1e-8
    name = "adagrad"

    def state(self, param: np.ndarray) -> dict[str, np.ndarray]:
        return {"sum_sq": kernels.zeros(param.shape, param.dtype)}

    def apply(self, param: np.ndarray, grad: np.ndarray, state: dict) -> None:
        kernels.adagrad(param, grad, state["sum_sq"], self.learning_rate, self.eps)


OPTIMIZERS = {cls.name: cls for cls in (SGD, Momentum, Adagrad)}


def make_optimizer(name: str, learning_rate: float, **options) -> SGD | Momentum | Adagrad:
    """Build an optimizer by name (``sgd``, ``momentum``, ``adagrad``)."""
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(OPTIMIZERS)}") from None
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    return cls(float(learning_rate), **options)
