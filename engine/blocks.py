"""Flat parameter blocks: a layer partition's parameters as one contiguous buffer.

A layer partition keeps its parameters (and gradients) as one flat block:
one buffer to push, fetch, accumulate and update in a single pass and a
single message per shard, whatever the number of layers. The parameter
server holds these blocks (``block{k}`` for partition ``k``).
"""

import numpy as np

from . import kernels
from .model import ModelSpec

__all__ = ["block_layout", "block_views", "blocks", "pack_block"]


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
