"""A layer partition of one replica: its compute and gradient bookkeeping.

:class:`PartitionCore` is the part of a Downpour replica that runs on one
node: a contiguous block of layers with a local copy of their parameters.
It does no I/O; the node's partition service (:mod:`dbnode.node`) feeds it
activations and deltas and moves its gradients and parameters to and from
the parameter shards.

Between fetches the partition applies its own gradients to its local copy
with plain SGD at the run's learning rate, as the paper's replicas do, so
the next step never waits for the network. A fetch is asynchronous too: it
answers with the shard's parameters as they were when it was issued, and
the partition may have taken more steps since. :meth:`PartitionCore.install`
therefore re-applies the local gradients the shards have not seen yet to the
fetched values, so no step's own update is lost. With the shard's optimizer also
plain SGD and one replica, the local copy and the shard's copy are then
bit-for-bit the same, which is why a one-replica run reproduces the
single-process trainer exactly, however late its fetches land.
"""

from __future__ import annotations

import numpy as np

from . import kernels
from .model import LayerStack, Loss, ModelSpec, block_layout, block_views


class PartitionCore:
    """Layers ``[first, last)`` of one replica, without I/O.

    ``flat`` is this partition's parameter block (see
    :func:`~dbnode.model.block_views`): used in place, later replaced by
    :meth:`install`. Gradients, their accumulation for the next push and
    the local updates all work on flat blocks of the same layout, one pass
    each.
    """

    def __init__(self, spec: ModelSpec, first: int, last: int, flat: np.ndarray,
                 learning_rate: float, n_fetch: int = 1, n_push: int = 1):
        if n_fetch < 1 or n_push < 1:
            raise ValueError(f"n_fetch and n_push must be >= 1, got {n_fetch} and {n_push}")
        self.spec, self.first, self.last = spec, first, last
        self.flat = flat
        self._grad = self._zeros()
        self.stack = LayerStack(spec, block_views(spec, flat, first, last), first, last,
                                grads=block_views(spec, self._grad, first, last))
        self.is_first = first == 0
        self.is_last = last == spec.n_layers
        self.loss = Loss(spec) if self.is_last else None
        self.learning_rate = float(learning_rate)
        self.n_fetch, self.n_push = n_fetch, n_push
        self.step = 0
        # Gradients since the last push: what the next push sends, and what a
        # fetched value lacks of this partition's own work (see install).
        self._acc = self._zeros()
        self._fetch_pending = False
        self._free: list[np.ndarray] = []
        self._delta: np.ndarray | None = None

    def _zeros(self) -> np.ndarray:
        return kernels.zeros(block_layout(self.spec, self.first, self.last)[1], self.spec.np_dtype)

    @property
    def params(self) -> dict[str, np.ndarray]:
        """The local copy's tensors (views into :attr:`flat`)."""
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
        kernels.accumulate(self._acc, self._grad)
        kernels.sgd(self.flat, self._grad, self.learning_rate)
        self.step += 1
        return below

    @property
    def push_due(self) -> bool:
        return self.step % self.n_push == 0

    @property
    def fetch_due(self) -> bool:
        return self.step % self.n_fetch == 0

    def take_gradients(self) -> np.ndarray:
        """The gradients accumulated since the last push (a flat block). It
        stays valid until handed back with :meth:`release`; accumulation
        continues in another buffer meanwhile."""
        if self._fetch_pending:
            raise RuntimeError("install the fetch in flight before taking more gradients: "
                               "its correction is the gradients accumulated since the last push")
        taken = self._acc
        self._acc = self._free.pop() if self._free else self._zeros()
        return taken

    def release(self, grads: np.ndarray) -> None:
        """Give back a pushed gradient block for reuse."""
        grads.fill(0)
        self._free.append(grads)

    def fetch_issued(self) -> None:
        """Mark a fetch as sent: until it is installed no gradients may be
        taken (see :meth:`install`)."""
        self._fetch_pending = True

    def install(self, fetched: np.ndarray) -> np.ndarray:
        """Make a fetched parameter block the local copy, after re-applying
        the local gradients it lacks. No copy: the blocks swap. Returns the
        previous block, free for the next fetch.

        What it lacks is exactly the gradients accumulated since the last
        push, provided (as the node guarantees) every push before the fetch
        was applied by the time the fetch was answered — one push or fetch
        in flight at a time, a paired PUSH_PULL applies before it answers —
        and no gradients were taken while the fetch was in flight (refused).
        """
        if fetched.shape != self.flat.shape or fetched.dtype != self.flat.dtype:
            raise ValueError(f"fetched block {fetched.shape} {fetched.dtype} does not match "
                             f"{self.flat.shape} {self.flat.dtype}")
        kernels.sgd(fetched, self._acc, self.learning_rate)
        self._fetch_pending = False
        previous, self.flat = self.flat, fetched
        self.stack.params = block_views(self.spec, fetched, self.first, self.last)
        return previous
