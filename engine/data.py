"""Training data: built-in data sets and the order examples are visited in.

The visiting order is a pure function of (examples, epoch, seed), so the
single-process trainer and a distributed replica given the same shard see
the same minibatches.
"""

from collections.abc import Iterator

import numpy as np

XOR_ROWS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float64)
XOR_TARGETS = np.array([0, 1, 1, 0], dtype=np.float64)


def xor(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` examples drawn uniformly from the four rows of XOR, as the
    original project's example did."""
    rows = np.random.default_rng(seed).integers(0, 4, size=n)
    return XOR_ROWS[rows], XOR_TARGETS[rows]


def blobs(n: int, features: int = 8, classes: int = 3, spread: float = 0.6,
          seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic classification set: Gaussian clusters around random centres,
    integer labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (classes, features))
    labels = rng.integers(0, classes, size=n)
    x = centres[labels] + rng.normal(0.0, spread, (n, features))
    return x, labels


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """The permutation of ``range(n)`` that epoch ``epoch`` visits."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def minibatches(x: np.ndarray, y: np.ndarray, batch_size: int, epochs: int = 1,
                seed: int = 0, shuffle: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Contiguous minibatches of ``(x, y)`` for ``epochs`` passes; the last
    batch of an epoch may be smaller."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) != len(y):
        raise ValueError(f"data: {len(x)} inputs but {len(y)} targets")
    for epoch in range(epochs):
        order = epoch_order(len(x), epoch, seed, shuffle)
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            # Fancy indexing copies into a fresh contiguous batch, which the
            # kernels want anyway.
            yield x[idx], y[idx]
