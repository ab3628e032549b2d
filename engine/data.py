"""Training data: where it comes from, and the order examples are visited in.

:func:`load` reads a data source named in a run config: a built-in
(``xor:N``, ``blobs:N``, ``digits``), an ``.npz`` with arrays ``X`` and
``y``, a ``.csv`` with the label last, or an MNIST-format idx pair.

The visiting order is a pure function of (examples, epoch, seed), so the
single-process trainer and a distributed replica given the same shard see
the same minibatches.
"""

import gzip
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import ConfigError

XOR_ROWS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float64)
XOR_TARGETS = np.array([0, 1, 1, 0], dtype=np.float64)


def xor(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` examples drawn uniformly from the four rows of XOR, as the
    original project's example did.

    Args:
        n: examples.
        seed: seeds the draws.

    Returns:
        ``(x, y)``: float64 ``(n, 2)`` inputs and ``(n,)`` targets.
    """
    rows = np.random.default_rng(seed).integers(0, 4, size=n)
    return XOR_ROWS[rows], XOR_TARGETS[rows]


def blobs(
    n: int, features: int = 8, classes: int = 3, spread: float = 0.6, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic classification set: Gaussian clusters around random centres,
    integer labels.

    Args:
        n: examples.
        features: inputs per example.
        classes: clusters, one per class.
        spread: the standard deviation around each centre.
        seed: seeds the centres and the draws.

    Returns:
        ``(x, y)``: float64 ``(n, features)`` inputs and int labels ``(n,)``.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (classes, features))
    labels = rng.integers(0, classes, size=n)
    x = centres[labels] + rng.normal(0.0, spread, (n, features))
    return x, labels


def epoch_order(n: int, epoch: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """The permutation of ``range(n)`` that epoch ``epoch`` visits.

    Args:
        n: examples.
        epoch: the epoch, from 0.
        seed: with ``epoch``, seeds the permutation.
        shuffle: False visits the examples in order.

    Returns:
        The example indices in visiting order.
    """
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(
    n: int, batch_size: int, epochs: int = 1, seed: int = 0, shuffle: bool = True
) -> Iterator[np.ndarray]:
    """Indices of each minibatch over ``epochs`` passes of ``n`` examples;
    the last batch of an epoch may be smaller. A replica's first partition
    takes inputs and its last partition takes targets by the same indices.

    Args:
        n: examples.
        batch_size: examples per batch.
        epochs: passes over the examples.
        seed: seeds each epoch's order (:func:`epoch_order`).
        shuffle: False visits the examples in order.

    Returns:
        An iterator of index arrays, one per minibatch.

    Raises:
        ValueError: ``batch_size < 1`` (when iteration starts).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for epoch in range(epochs):
        order = epoch_order(n, epoch, seed, shuffle)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


def steps_per_run(n: int, batch_size: int, epochs: int) -> int:
    """How many minibatches :func:`batch_indices` yields.

    Args:
        n: examples.
        batch_size: examples per batch.
        epochs: passes over the examples.

    Returns:
        ``epochs * ceil(n / batch_size)``.
    """
    return epochs * -(-n // batch_size)


def examples_after(n: int, batch_size: int, steps: int) -> int:
    """How many examples the first ``steps`` minibatches of
    :func:`batch_indices` hold (an epoch's last batch may be short).

    Args:
        n: examples.
        batch_size: examples per batch.
        steps: minibatches taken.

    Returns:
        The examples they hold.
    """
    per_epoch = -(-n // batch_size)
    epochs, rest = divmod(steps, per_epoch)
    return epochs * n + min(rest * batch_size, n)


def minibatches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    epochs: int = 1,
    seed: int = 0,
    shuffle: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Contiguous minibatches of ``(x, y)`` for ``epochs`` passes; the last
    batch of an epoch may be smaller.

    Args:
        x: the inputs.
        y: their targets, as many.
        batch_size: examples per batch.
        epochs: passes over the examples.
        seed: seeds each epoch's order (:func:`epoch_order`).
        shuffle: False visits the examples in order.

    Returns:
        An iterator of ``(x_batch, y_batch)`` copies.

    Raises:
        ValueError: ``x`` and ``y`` differ in length, or ``batch_size < 1``
            (when iteration starts).
    """
    if len(x) != len(y):
        raise ValueError(f"data: {len(x)} inputs but {len(y)} targets")
    for idx in batch_indices(len(x), batch_size, epochs, seed, shuffle):
        # Fancy indexing copies into a fresh contiguous batch, which the
        # kernels want anyway.
        yield x[idx], y[idx]


# ---------------------------------------------------------------- sources


def is_builtin(source: str) -> bool:
    """Whether ``source`` names a built-in data set rather than a file.

    Args:
        source: a data source, as :func:`load` takes it.

    Returns:
        True for ``xor:N``, ``blobs:N``, ``idx:IMAGES,LABELS`` and ``digits``.
    """
    return source == "digits" or source.partition(":")[0] in ("xor", "blobs", "idx")


def load(source: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` from a data source; ``X`` is float64 ``(N, features)``.

    Sources: ``xor:N``; ``blobs:N`` (8 features, 3 classes); ``digits``
    (scikit-learn's bundled 8x8 digits, scaled to [0, 1]; needs the
    ``digits`` extra); ``PATH.npz`` (arrays ``X`` and ``y``); ``PATH.csv``
    (numbers, label last, an optional header line); ``idx:IMAGES,LABELS`` or
    the images file of an MNIST-format pair whose name contains
    ``images-idx`` (labels: the same name with ``labels-idx1``; pixels
    scaled to [0, 1]).

    Args:
        source: the data source, as above.
        seed: seeds the synthetic sets.

    Returns:
        ``(X, y)``.

    Raises:
        ConfigError: an unknown or malformed source, a missing or unreadable
            file, data that is not numeric, finite and as long as its
            targets, or ``digits`` without scikit-learn.
    """
    kind, _, arg = source.partition(":")
    if kind in ("xor", "blobs") and arg:
        if not arg.isdigit() or int(arg) < 1:
            raise ConfigError("data", source, f"expected {kind}:N with N a positive integer")
        return (xor if kind == "xor" else blobs)(int(arg), seed=seed)
    if source == "digits":
        return _digits()
    if kind == "idx":
        images, _, labels = arg.partition(",")
        return _idx_pair(Path(images), Path(labels))
    path = Path(source)
    if not path.is_file():
        raise ConfigError(
            "data", source, "no such file, and not a built-in data set (xor:N, blobs:N, digits)"
        )
    name = path.name.lower()
    if name.endswith(".npz"):
        return _npz(path)
    if name.endswith(".csv"):
        return _csv(path)
    if "images-idx" in name:
        # MNIST's naming: train-images-idx3-ubyte beside train-labels-idx1-ubyte.
        return _idx_pair(path, path.with_name(re.sub(r"images-idx\d", "labels-idx1", path.name)))
    raise ConfigError("data", source, "unknown format: expected .npz, .csv or an idx images file")


def split(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A reproducible random train/test split: ``(x_train, y_train, x_test, y_test)``.

    Args:
        x: the inputs.
        y: their targets.
        test_fraction: the part held out, rounded to whole examples.
        seed: seeds the split.

    Returns:
        ``(x_train, y_train, x_test, y_test)``, copies.
    """
    n_test = int(round(len(x) * test_fraction))
    order = np.random.default_rng([seed, 0x7E57]).permutation(len(x))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def from_arrays(x, y, where: str = "arrays") -> tuple[np.ndarray, np.ndarray]:
    """In-memory data, checked as a file's would be.

    Args:
        x: inputs, ``(examples, features)`` (a 1-d array is one feature).
        y: their targets, as long as ``x``.
        where: what the messages call the data.

    Returns:
        ``(X, y)``: float64 ``X`` and ``y`` as a numpy array.

    Raises:
        ConfigError: not numeric, empty, of different lengths, or not finite.
    """
    return _checked(x, y, where)


def _checked(x: np.ndarray, y: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or len(x) == 0:
        raise ConfigError(
            "data", where, f"X must be a non-empty (examples, features) array, got shape {x.shape}"
        )
    if len(y) != len(x):
        raise ConfigError("data", where, f"{len(x)} examples but {len(y)} targets")
    if not (np.issubdtype(x.dtype, np.number) and np.issubdtype(y.dtype, np.number)):
        raise ConfigError("data", where, f"X and y must be numeric, got {x.dtype} and {y.dtype}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ConfigError("data", where, "X holds NaN or infinite values")
    return x, y


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = {"X", "y"} - set(npz.files)
            if missing:
                raise ConfigError(
                    "data", str(path), f"missing arrays {sorted(missing)}; has {npz.files}"
                )
            return _checked(npz["X"], npz["y"], str(path))
    except (OSError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError("data", str(path), f"cannot be read as .npz: {exc}") from None


def _csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    table = _csv_table(path)
    if table.shape[1] < 2:
        raise ConfigError("data", str(path), "needs at least one feature column and the label")
    return _checked(table[:, :-1], table[:, -1], str(path))


def _csv_table(path: Path) -> np.ndarray:
    """A numeric CSV as a 2-d float array, its header line (if any) skipped."""
    try:
        with open(path) as f:
            first = f.readline()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError("data", str(path), f"cannot be read: {exc}") from None
    try:
        float(first.split(",")[0])
        skip = 0
    except ValueError:
        skip = 1  # a header line
    try:
        return np.loadtxt(path, delimiter=",", skiprows=skip, ndmin=2)
    except ValueError as exc:
        raise ConfigError("data", str(path), f"not a numeric CSV: {exc}") from None


def load_inputs(source: str, features: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """Inputs to predict from, with their targets when the source has them.

    As :func:`load`, except that a ``.csv`` of exactly ``features`` columns
    is all inputs (no label column), and an ``.npz`` may lack ``y``.

    Args:
        source: the data source (see :func:`load`).
        features: the model's inputs per example.
        seed: seeds the synthetic sets.

    Returns:
        ``(X, y)``; ``y`` is None when the source holds inputs only.

    Raises:
        ConfigError: as :func:`load`; or inputs that are not ``features`` wide.
    """
    path = Path(source)
    name = path.name.lower()
    if path.is_file() and name.endswith(".csv"):
        table = _csv_table(path)
        if table.shape[1] == features:
            return _checked(table, np.zeros(len(table)), str(path))[0], None
    elif path.is_file() and name.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as npz:
                if "X" in npz.files and "y" not in npz.files:
                    x = npz["X"]
                    return _checked(x, np.zeros(len(x)), str(path))[0], None
        except (OSError, ValueError) as exc:
            raise ConfigError("data", str(path), f"cannot be read as .npz: {exc}") from None
    x, y = load(source, seed=seed)
    if x.shape[1] != features:
        raise ConfigError(
            "data", source, f"examples have {x.shape[1]} features, the model takes {features}"
        )
    return x, y


_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An array from an idx file (MNIST's format), optionally gzipped.

    Args:
        path: the file; a ``.gz`` suffix means gzipped.

    Returns:
        The array, of the file's (big-endian) dtype and shape.

    Raises:
        ConfigError: the file cannot be read, or is not a whole idx file.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError("data", str(path), f"cannot be read: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ConfigError("data", str(path), "not an idx file (bad magic)")
    ndim = data[3]
    dtype = np.dtype(_IDX_TYPES[data[2]])
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ConfigError("data", str(path), "truncated idx header")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    if len(data) != header + int(np.prod(shape)) * dtype.itemsize:
        raise ConfigError("data", str(path), f"idx payload does not match its shape {shape}")
    return np.frombuffer(data, dtype, offset=header).reshape(shape)


def _idx_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x = read_idx(images)
    y = read_idx(labels)
    x = x.reshape(len(x), -1).astype(np.float64)
    if x.size and x.max() > 1:
        x /= 255.0
    return _checked(x, y.astype(np.int64), str(images))


def _digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigError(
            "data", "digits", "needs scikit-learn: pip install 'dbnode[digits]'"
        ) from None
    digits = load_digits()
    return digits.data / 16.0, digits.target.astype(np.int64)
