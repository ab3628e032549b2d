"""A layer partition's arithmetic, without I/O: :class:`PartitionCore`.

A Downpour replica is cut by layer into partitions; each holds a contiguous
block of layers with a local copy of their parameters, and this class does
its forward, backward, local updates and fetch correction
(:mod:`dbnode.partition` drives it over the network).

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

import math

import numpy as np

from . import kernels
from .blocks import BlockPool
from .model import LayerStack, Loss, ModelSpec

__all__ = ["PartitionCore"]


class PartitionCore:
    """Layers ``[first, last)`` of one replica, without I/O.

    ``flat`` is this partition's parameter block (see
    :func:`~dbnode.blocks.block_views`): used in place, later replaced by
    :meth:`install`. Gradients, their accumulation for the next push and
    the local updates all work on flat blocks of the same layout, one pass
    each.

    Args:
        spec: the whole model.
        first, last: the layers this partition holds, ``[first, last)``.
        flat: the initial parameter block (taken, not copied).
        learning_rate: of the local plain-SGD updates.
        n_fetch, n_push: the fetch and push periods, in steps.
        ahead: minibatches forwarded before the backward of the first
            (:func:`dbnode.pipeline.ahead`): each backward then uses the
            weights its forward used, kept until it is done.
        pool: where its spare blocks come from and go back to, shared with
            partitions of the same layers (default: its own).

    Raises:
        ValueError: ``n_fetch``, ``n_push`` or ``ahead`` is below 1.
    """

    def __init__(
        self,
        spec: ModelSpec,
        first: int,
        last: int,
        flat: np.ndarray,
        learning_rate: float,
        n_fetch: int = 1,
        n_push: int = 1,
        ahead: int = 1,
        pool: BlockPool | None = None,
    ):
        if n_fetch < 1 or n_push < 1:
            raise ValueError(f"n_fetch and n_push must be >= 1, got {n_fetch} and {n_push}")
        if ahead < 1:
            raise ValueError(f"ahead must be >= 1, got {ahead}")
        self.spec, self.first, self.last = spec, first, last
        self.flat = flat
        self.pool = pool if pool is not None else BlockPool(spec, first, last)
        # Where backward writes; taken from the pool when a backward needs it
        # (None after it has become the accumulation).
        self._grad: np.ndarray | None = self.pool.take()
        self.stack = LayerStack(
            spec,
            self.pool.views(flat),
            first,
            last,
            grads=self.pool.views(self._grad),
        )
        self.is_first = first == 0
        self.is_last = last == spec.n_layers
        self.loss = Loss(spec) if self.is_last else None
        self.learning_rate = float(learning_rate)
        self.n_fetch, self.n_push = n_fetch, n_push
        self.step = 0
        # Gradients since the last push: what the next push sends, and what a
        # fetched value lacks of this partition's own work (see install).
        self._acc: np.ndarray | None = None  # taken from the pool when first needed
        self._acc_empty = True  # nothing accumulated: _acc's contents mean zero
        self._fetch_pending = False
        self._delta: np.ndarray | None = None
        # Weight stashing: the parameter block each kept forward read. A block
        # still read may not be updated in place, nor reused.
        self.ahead = ahead
        self.stack.slots = ahead
        self._stashed: list[np.ndarray | None] = [None] * ahead

    @property
    def params(self) -> dict[str, np.ndarray]:
        """The local copy's tensors (views into :attr:`flat`)."""
        return self.stack.params

    def forward(self, x: np.ndarray, slot: int = 0) -> np.ndarray:
        """This partition's output for a batch, kept in ``slot`` (with the
        weights it read) for its backward.

        Args:
            x: the batch's inputs to this partition (kept, not copied).
            slot: in ``[0, ahead)``; free (its backward done).

        Returns:
            The output: a view of a buffer that the slot's next forward overwrites.
        """
        if self._stashed[slot] is not None:
            if self.ahead > 1:
                raise RuntimeError(f"slot {slot} holds a forward whose backward is not done")
            self._unstash(slot)  # a forward whose backward never came (its loss not finite)
        # Kept even when alone: a fetch installed before its backward (a
        # pipeline's last partition) must not hand these weights out.
        self._stashed[slot] = self.flat
        return self.stack.forward(x, slot)

    @property
    def stashed(self) -> int:
        """Weight versions kept for forwards whose backward is not done, other
        than the current local copy."""
        return len({id(b) for b in self._stashed if b is not None and b is not self.flat})

    def _read(self, block: np.ndarray) -> bool:
        """Whether a kept forward still reads ``block``."""
        return any(b is block for b in self._stashed)

    def _unstash(self, slot: int) -> None:
        block = self._stashed[slot]
        if block is None:
            return
        self._stashed[slot] = None
        if block is not self.flat and not self._read(block):
            self.pool.give(block)  # an old version nobody reads any more

    def block(self) -> np.ndarray:
        """A parameter-sized block nobody holds (e.g. where a fetch lands).

        Returns:
            A free block (its contents are garbage), or a new one.
        """
        return self.pool.take()

    def loss_delta(self, out: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
        """The last partition's loss on its output, and the delta that starts backward.

        Args:
            out: this partition's output of the batch.
            targets: the batch's targets.

        Returns:
            ``(mean loss, delta)``.

        Raises:
            RuntimeError: this is not the last partition.
        """
        if self.loss is None:
            raise RuntimeError("only the last partition computes the loss")
        if self._delta is None or self._delta.shape != out.shape:
            self._delta = kernels.empty(out.shape, out.dtype)
        return self.loss(out, targets, self._delta)

    def backward(
        self, delta: np.ndarray, local_update: bool = True, slot: int = 0
    ) -> np.ndarray | None:
        """Backward through the partition at the weights the slot's forward
        read, then accumulate its gradients for the next push and apply them
        to the local copy (the newest weights).

        Args:
            delta: dL/d(this partition's output).
            local_update: off for a step whose fetch replaces the local copy
                before the next step (shards in this process): the update
                would be thrown away.
            slot: the forward's slot.

        Returns:
            The delta for the partition below (None for the first).
        """
        preactivation = self.loss is not None and self.loss.preactivation
        if self._grad is None:
            self._grad = self.pool.take()
            self.stack.grads = self.pool.views(self._grad)
        below = self.stack.backward(
            delta, need_delta_below=not self.is_first, preactivation=preactivation, slot=slot
        )
        self._unstash(slot)
        if local_update:
            if self._read(self.flat):
                # A kept forward still reads these weights: the update makes
                # a new version (copy, then the same in-place kernel, so the
                # values are bit for bit those of an in-place update).
                fresh = self.block()
                np.copyto(fresh, self.flat)
                kernels.sgd(fresh, self._grad, self.learning_rate)
                self._make_current(fresh)
            else:
                kernels.sgd(self.flat, self._grad, self.learning_rate)
        if self._acc_empty:
            # The first gradients since a push are the accumulation: no pass
            # over the block (_acc is None then: taken by the last push). The
            # next backward takes a block from the pool.
            self._acc, self._grad = self._grad, None
            self._acc_empty = False
        else:
            kernels.accumulate(self._acc, self._grad)
        self.step += 1
        return below

    def whole_step(self, x: np.ndarray, targets: np.ndarray, local_update: bool = True) -> float:
        """A step of a partition holding the whole network, in one call (one
        hop to a worker thread): forward, loss, backward.

        Args:
            x: the batch's inputs.
            targets: its targets.
            local_update: as :meth:`backward`'s.

        Returns:
            The batch's mean loss; when it is not finite the step stops there
            (no gradients, no update).
        """
        loss, delta = self.loss_delta(self.forward(x), targets)
        if math.isfinite(loss):
            self.backward(delta, local_update)
        return loss

    @property
    def push_due(self) -> bool:
        """Whether the step just taken ends a push period (every ``n_push`` steps)."""
        return self.step % self.n_push == 0

    @property
    def fetch_due(self) -> bool:
        """Whether the step just taken ends a fetch period (every ``n_fetch`` steps)."""
        return self.step % self.n_fetch == 0

    def take_gradients(self) -> np.ndarray:
        """The gradients accumulated since the last push (a flat block). It
        stays valid until handed back with :meth:`release`; accumulation
        continues in another buffer meanwhile."""
        if self._fetch_pending:
            raise RuntimeError(
                "install the fetch in flight before taking more gradients: "
                "its correction is the gradients accumulated since the last push"
            )
        if self._acc_empty:
            taken = self._acc if self._acc is not None else self.pool.take()
            taken.fill(0)  # nothing since the last push (not a step's end)
        else:
            taken = self._acc
        self._acc = None
        self._acc_empty = True
        return taken

    def release(self, grads: np.ndarray) -> None:
        """Give back a pushed gradient block for reuse.

        Args:
            grads: a block :meth:`take_gradients` gave (its contents are never
                read again: the next backward overwrites it).
        """
        self.pool.give(grads)

    def close(self) -> None:
        """After the last step (nothing computes, pushes or fetches any
        more): give every block it holds back to the pool, for the run's
        other partitions and the next incarnation of this one."""
        held = [self.flat, self._grad, self._acc, *self._stashed]
        self.flat = self._grad = self._acc = None
        self._stashed = [None] * self.ahead
        for block in {id(b): b for b in held if b is not None}.values():
            self.pool.give(block)

    def fetch_issued(self) -> None:
        """Mark a fetch as sent: until it is installed no gradients may be
        taken (see :meth:`install`)."""
        self._fetch_pending = True

    def fetch_abandoned(self) -> None:
        """Mark the fetch sent as never to be installed (it failed, or a
        remap cut it off): gradients may be taken again."""
        self._fetch_pending = False

    def install(self, fetched: np.ndarray) -> np.ndarray:
        """Make a fetched parameter block the local copy, after re-applying
        the local gradients it lacks. No copy: the blocks swap.

        What it lacks is exactly the gradients accumulated since the last
        push, provided (as the node guarantees) every push before the fetch
        was applied by the time the fetch was answered — one push or fetch
        in flight at a time, a paired PUSH_PULL applies before it answers —
        and no gradients were taken while the fetch was in flight (refused).

        Args:
            fetched: the fetched block (taken, not copied).

        Returns:
            The previous block, free for the next fetch; None when a kept
            forward still reads it (it becomes free after that backward, and
            :meth:`block` hands it out then).

        Raises:
            ValueError: ``fetched`` is not a block of this partition's shape
                and dtype.
        """
        if fetched.shape != self.flat.shape or fetched.dtype != self.flat.dtype:
            raise ValueError(
                f"fetched block {fetched.shape} {fetched.dtype} does not match "
                f"{self.flat.shape} {self.flat.dtype}"
            )
        if not self._acc_empty:
            kernels.sgd(fetched, self._acc, self.learning_rate)
        self._fetch_pending = False
        return self._make_current(fetched)

    def _make_current(self, block: np.ndarray) -> np.ndarray | None:
        """Make ``block`` the local copy; the previous one, unless a kept
        forward still reads it (then None: it is freed by that backward)."""
        previous, self.flat = self.flat, block
        self.stack.params = self.pool.views(block)
        if self._read(previous):
            return None
        return previous
