"""Flat parameter blocks: a layer partition's parameters as one contiguous buffer.

A layer partition keeps its parameters (and gradients) as one flat block:
one buffer to push, fetch, accumulate and update in a single pass and a
single message per shard, whatever the number of layers. The parameter
server holds these blocks (``block{k}`` for partition ``k``).
"""

import numpy as np

from . import kernels
from .model import ModelSpec

__all__ = ["BlockPool", "block_layout", "block_views", "blocks", "pack_block"]


def block_layout(
    spec: ModelSpec, first: int, last: int
) -> tuple[dict[str, tuple[int, tuple[int, ...]]], int]:
    """Where each parameter of layers ``[first, last)`` sits in a flat block.

    Each tensor starts on a cache line (GEMMs write faster there); the
    padding between them stays zero.

    Args:
        spec: the network.
        first: the first layer of the block.
        last: one past its last layer.

    Returns:
        ``(layout, length)``: name -> ``(offset, shape)`` of each parameter,
        and the block's length in elements.
    """
    step = kernels.ALIGN // spec.np_dtype.itemsize
    layout, offset = {}, 0
    for name, shape in spec.shapes().items():
        if first <= int(name[5 : name.index(".")]) < last:
            layout[name] = (offset, shape)
            offset += -(-int(np.prod(shape)) // step) * step
    return layout, offset


def block_views(spec: ModelSpec, flat: np.ndarray, first: int, last: int) -> dict[str, np.ndarray]:
    """Name -> view into ``flat`` of each parameter of layers ``[first, last)``.

    A layer partition keeps its parameters (and gradients) as one flat,
    contiguous block: one buffer to push, fetch, accumulate and update in a
    single pass and a single message per shard, whatever the number of
    layers. The tensors are views into it, each C-contiguous.

    Args:
        spec: the network.
        flat: the block, of the length :func:`block_layout` gives.
        first: the first layer of the block.
        last: one past its last layer.

    Returns:
        Parameter name -> its view into ``flat`` (no copy).

    Raises:
        ValueError: ``flat`` is not of the block's shape ``(length,)``.
    """
    layout, total = block_layout(spec, first, last)
    if flat.shape != (total,):
        raise ValueError(
            f"flat block: shape {flat.shape} does not match ({total},) for layers [{first}, {last})"
        )
    return {
        name: flat[offset : offset + int(np.prod(shape))].reshape(shape)
        for name, (offset, shape) in layout.items()
    }


def blocks(spec: ModelSpec, bounds) -> dict[str, tuple[int]]:
    """The flat blocks of a network cut at ``bounds``.

    These are the tensors the parameter server holds.

    Args:
        spec: the network.
        bounds: ``(first, last)`` of each layer partition, in order.

    Returns:
        ``block{k}`` -> its shape ``(length,)``, for partition ``k``.
    """
    return {f"block{k}": (block_layout(spec, a, b)[1],) for k, (a, b) in enumerate(bounds)}


def pack_block(spec: ModelSpec, params: dict[str, np.ndarray], first: int, last: int) -> np.ndarray:
    """A new flat block holding the parameters of layers ``[first, last)``.

    Args:
        spec: the network.
        params: parameter name -> array; those of layers ``[first, last)``
            are copied in (cast to the model's dtype).
        first: the first layer of the block.
        last: one past its last layer.

    Returns:
        The block: aligned, of the model's dtype, padding zeroed.

    Raises:
        KeyError: ``params`` lacks a parameter of those layers.
        ValueError: a parameter's shape does not fit its place.
    """
    flat = kernels.zeros(block_layout(spec, first, last)[1], spec.np_dtype)
    for name, view in block_views(spec, flat, first, last).items():
        view[...] = params[name]
    return flat


class BlockPool:
    """Blocks of one layout that nobody holds, and each block's tensor views.

    A partition cycles through a few blocks: its local copy, where a fetch
    lands, its gradients, a push in flight. Replicas of one run that share
    a node (and take turns to compute) share a pool: a step's gradients
    land in the block the turn before has just pushed, still in the
    caches, rather than in one of several models' own, long evicted.
    Taking and giving are safe from any thread (a step in a worker thread
    takes its gradient block): a list's ``pop`` and ``append`` are atomic
    under CPython's GIL.

    Args:
        spec: the network.
        first: the first layer of the blocks.
        last: one past their last layer.
    """

    def __init__(self, spec: ModelSpec, first: int, last: int):
        self.spec, self.first, self.last = spec, first, last
        self.length = block_layout(spec, first, last)[1]
        self._free: list[np.ndarray] = []
        self._made = 0
        self._views: dict[int, tuple[np.ndarray, dict[str, np.ndarray]]] = {}

    def take(self) -> np.ndarray:
        """A block nobody holds (its contents are garbage, its padding zero), or a new one."""
        try:
            return self._free.pop()  # the last given: the likeliest still cached
        except IndexError:
            self._made += 1
            return kernels.zeros(self.length, self.spec.np_dtype)

    def give(self, block: np.ndarray) -> None:
        """Hand back a block nobody reads any more.

        Args:
            block: one of this layout (its contents are never read again).
        """
        self._free.append(block)

    def views(self, block: np.ndarray) -> dict[str, np.ndarray]:
        """``block``'s tensor views (:func:`block_views`), made once per
        block: the few blocks in use are re-viewed at every step, and
        making the views costs more than a tiny step.

        Args:
            block: a block of this layout.

        Returns:
            Parameter name -> its view into ``block``.

        Raises:
            ValueError: ``block`` is not of this layout's shape.
        """
        cached = self._views.get(id(block))
        if cached is None or cached[0] is not block:
            # Views keep their block alive. A partition gives its blocks back
            # when it ends (PartitionCore.close), so the pool's own are all
            # there are but for a few it was started with.
            if len(self._views) > 2 * self._made + 8:
                self._views.clear()
            cached = (block, block_views(self.spec, block, self.first, self.last))
            self._views[id(block)] = cached
        return cached[1]
