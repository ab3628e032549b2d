"""A layer partition of one replica: its compute and gradient bookkeeping.

:class:`PartitionCore` is the part of a Downpour replica that runs on one
node: a contiguous block of layers with a local copy of their parameters.
It does no I/O; the node's partition service (:mod:`dbnode.node`) feeds it
activations and deltas and moves its gradients and parameters to and from
the parameter shards.

Between fetches the partition applies its own gradients to its local copy
with plain SGD at the run's learning rate, as the paper's replicas do, so
the next step never waits for the network. With the shard's optimizer also
plain SGD and one replica, the local copy and the shard's copy are then
bit-for-bit the same, which is why a one-replica run reproduces the
single-process trainer exactly.
"""

from __future__ import annotations

import numpy as np

from . import kernels
from .model import LayerStack, Loss, ModelSpec


class PartitionCore:
    """Layers ``[first, last)`` of one replica, without I/O.

    ``params`` holds this partition's tensors (``layer{i}.weight`` and
    ``layer{i}.bias`` for its layers); it is used in place and later
    replaced by :meth:`install`.
    """

    def __init__(self, spec: ModelSpec, first: int, last: int, params: dict[str, np.ndarray],
                 learning_rate: float, n_fetch: int = 1, n_push: int = 1):
        if n_fetch < 1 or n_push < 1:
            raise ValueError(f"n_fetch and n_push must be >= 1, got {n_fetch} and {n_push}")
        self.spec = spec
        self.stack = LayerStack(spec, params, first, last)
        self.names = list(self.stack.grads)
        missing = sorted(set(self.names) - set(params))
        if missing:
            raise ValueError(f"partition [{first}, {last}): missing parameters {missing}")
        self.is_first = first == 0
        self.is_last = last == spec.n_layers
        self.loss = Loss(spec) if self.is_last else None
        self.learning_rate = float(learning_rate)
        self.n_fetch, self.n_push = n_fetch, n_push
        self.step = 0
        self._acc = self._zeros()
        self._free: list[dict[str, np.ndarray]] = []
        self._delta: np.ndarray | None = None

    def _zeros(self) -> dict[str, np.ndarray]:
        return {name: kernels.zeros(self.stack.grads[name].shape, self.stack.dtype) for name in self.names}

    @property
    def params(self) -> dict[str, np.ndarray]:
        return self.stack.params

    def forward(self, x: np.ndarray) -> np.ndarray:
        """This partition's output for the batch ``x`` (a view of a buffer
        that the next forward overwrites)."""
        return self.stack.forward(x)

    def loss_delta(self, out: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
        """The last partition's loss on its output, and the delta that starts backward."""
        if self.loss is None:
            raise RuntimeError("only the last partition computes the loss")
        if self._delta is None or self._delta.shape != out.shape:
            self._delta = kernels.empty(out.shape, out.dtype)
        return self.loss(out, targets, self._delta)

    def backward(self, delta: np.ndarray) -> np.ndarray | None:
        """Backward through the partition, then accumulate its gradients for
        the next push and apply them to the local copy. Returns the delta for
        the partition below (``None`` for the first)."""
        preactivation = self.loss is not None and self.loss.preactivation
        below = self.stack.backward(delta, need_delta_below=not self.is_first, preactivation=preactivation)
        for name, grad in self.stack.grads.items():
            kernels.accumulate(self._acc[name], grad)
            kernels.sgd(self.stack.params[name], grad, self.learning_rate)
        self.step += 1
        return below

    @property
    def push_due(self) -> bool:
        return self.step % self.n_push == 0

    @property
    def fetch_due(self) -> bool:
        return self.step % self.n_fetch == 0

    def take_gradients(self) -> dict[str, np.ndarray]:
        """The gradients accumulated since the last push. They stay valid
        until handed back with :meth:`release`; accumulation continues in
        another buffer meanwhile."""
        taken = self._acc
        self._acc = self._free.pop() if self._free else self._zeros()
        return taken

    def release(self, grads: dict[str, np.ndarray]) -> None:
        """Give back a pushed gradient buffer for reuse."""
        for g in grads.values():
            g.fill(0)
        self._free.append(grads)

    def install(self, fetched: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Make freshly fetched parameters the local copy (no copy: the
        dicts swap). Returns the previous copy, free to receive the next fetch."""
        if set(fetched) != set(self.names):
            raise ValueError(f"fetched {sorted(fetched)}, partition needs {sorted(self.names)}")
        previous = self.stack.params
        self.stack.params = fetched
        return previous
