"""The single-process trainer: minibatch SGD on one model in one process.

It is the reference the distributed engine must agree with: one Downpour
replica that fetches and pushes every step computes exactly this.
"""

from dataclasses import dataclass, field

import numpy as np

from . import kernels
from .data import minibatches
from .model import LayerStack, Loss, ModelSpec
from .optim import Optimizer


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` did.

    Attributes:
        params: the trained parameters (the trainer's own, updated in place).
        steps: minibatch steps taken.
        examples: examples visited (``epochs * len(x)``).
        losses: each step's batch loss, before its update.
    """

    params: dict[str, np.ndarray]
    steps: int
    examples: int
    losses: list[float] = field(default_factory=list)


class Trainer:
    """Forward, loss, backward and an in-place optimizer step, all in the
    model's dtype with buffers reused across steps.

    Args:
        spec: the network.
        params: its parameters, of the model's dtype; updated in place.
        optimizer: the update rule (its state is kept per tensor here).
    """

    def __init__(self, spec: ModelSpec, params: dict[str, np.ndarray], optimizer: Optimizer):
        self.spec = spec
        self.params = params
        self.optimizer = optimizer
        self.stack = LayerStack(spec, params)
        self.loss = Loss(spec)
        self.state = {name: optimizer.state(p) for name, p in params.items()}
        self.steps = 0  # updates applied (every tensor gets one per step)
        self._delta = None

    def step(self, x: np.ndarray, targets: np.ndarray) -> float:
        """One SGD step on a batch; ``targets`` as given by ``Loss.targets``.

        Args:
            x: the inputs, ``(batch, features)`` of the model's dtype.
            targets: their targets, as :meth:`Loss.targets` gives them.

        Returns:
            The batch's loss before the update.

        Raises:
            ValueError, TypeError: ``x`` or ``targets`` of the wrong shape or dtype.
        """
        out = self.stack.forward(x)
        if self._delta is None or self._delta.shape != out.shape:
            self._delta = kernels.empty(out.shape, out.dtype)
        value, delta = self.loss(out, targets, self._delta)
        self.stack.backward(delta, need_delta_below=False, preactivation=self.loss.preactivation)
        self.steps += 1
        for name, grad in self.stack.grads.items():
            self.optimizer.apply(self.params[name], grad, self.state[name], self.steps)
        return value

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int = 1,
        epochs: int = 1,
        seed: int = 0,
        shuffle: bool = True,
    ) -> TrainResult:
        """Train over ``(x, y)``; the per-step losses are kept.

        Args:
            x: the inputs, ``(examples, features)``; cast to the model's dtype.
            y: their targets (class labels, or rows of output values).
            batch_size: examples per step.
            epochs: passes over the data.
            seed: seeds the visiting order.
            shuffle: whether each epoch visits the examples in a new order.

        Returns:
            The trained parameters, step and example counts, and the losses.

        Raises:
            ValueError: ``x`` and ``y`` differ in length, ``batch_size < 1``, or
                shapes that do not fit the model.
        """
        x = np.asarray(x, dtype=self.spec.np_dtype)
        y = self.loss.targets(y)
        losses = []
        for xb, yb in minibatches(x, y, batch_size, epochs, seed, shuffle):
            losses.append(self.step(xb, yb))
        return TrainResult(self.params, len(losses), epochs * len(x), losses)
