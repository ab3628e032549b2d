"""Numerical kernels: the compiled tier's Python face.

Every function here has a plain-numpy twin of the same signature in
:mod:`dbnode.reference`, which the tests use as the oracle.

Conventions (shared by both):

- Inputs may be any layout; a non-contiguous input is copied once to a
  contiguous one (the compiled loops need unit stride). Outputs (``out``,
  in-place parameters and state) must be C-contiguous, writable and of the
  operands' dtype; they are allocated when passed as ``None``.
- Arrays must all share one dtype, float32 or float64: nothing is silently
  promoted.
- Losses are returned as Python floats, which do not promote float32 arrays
  in later arithmetic.
- Activations are named: ``linear``, ``sigmoid``, ``tanh``, ``relu``,
  ``softmax`` (row-wise).
"""

from pathlib import Path

import numpy as np

from ._buildinfo import source_hash

# Bumped together with KERNELS_API in csrc/_kernels.pyx.
KERNELS_API = 1

try:
    from . import _kernels as _k
except ImportError as exc:  # pragma: no cover - exercised by a packaging test
    raise ImportError(
        "dbnode's compiled kernels (dbnode._kernels) are missing or fail to "
        "load; dbnode never falls back to slow Python loops. Build and install "
        "it with `pip install .` from the source tree (a C compiler is needed)."
        f" Cause: {exc}"
    ) from exc


def _check_build() -> None:
    """Refuse a compiled module built from other sources than this package."""
    if getattr(_k, "KERNELS_API", None) != KERNELS_API:
        raise ImportError(
            f"dbnode._kernels is stale: it implements kernels API "
            f"{getattr(_k, 'KERNELS_API', None)}, this package needs {KERNELS_API}. "
            "Rebuild it with `pip install .`."
        )
    here = Path(__file__).resolve().parent
    csrc = here.parent / "csrc"
    # Only in a source checkout (an editable install): the package directory
    # is engine/ with csrc/ beside it.
    if here.name == "engine" and (csrc / "_kernels.pyx").is_file():
        current = source_hash(csrc)
        if current != _k.SOURCE_HASH:
            raise ImportError(
                f"dbnode._kernels is stale: built from csrc/ sources {_k.SOURCE_HASH}, "
                f"the tree now has {current}. Rebuild it with `pip install .`."
            )


_check_build()

ACTIVATIONS = {"linear": 0, "sigmoid": 1, "tanh": 2, "relu": 3, "softmax": 4}
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

max_threads = _k.max_threads
set_threads = _k.set_threads
OPENMP = _k.OPENMP


def _code(name: str) -> int:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}"
        ) from None


def _contig(a: np.ndarray) -> np.ndarray:
    # A copy only when the caller passed a strided view: the loops need unit stride.
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def _out(out, shape, dtype) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype)
    if out.shape != tuple(shape):
        raise ValueError(f"out: shape {out.shape} does not match {tuple(shape)}")
    if out.dtype != dtype:
        raise TypeError(f"out: dtype {out.dtype} does not match {np.dtype(dtype)}")
    return out


def _same_dtype(**arrays) -> np.dtype:
    items = iter(arrays.items())
    first_name, first = next(items)
    if first.dtype not in DTYPES:
        raise TypeError(f"{first_name}: dtype must be float32 or float64, got {first.dtype}")
    for name, a in items:
        if a.dtype != first.dtype:
            raise TypeError(f"{name}: dtype {a.dtype} does not match {first_name}'s {first.dtype}")
    return first.dtype


# ------------------------------------------------------------- optimizers


def sgd(w: np.ndarray, g: np.ndarray, lr: float) -> None:
    """In place: ``w -= lr * g``."""
    _k.sgd(w, _contig(g), lr)


def momentum(w: np.ndarray, g: np.ndarray, velocity: np.ndarray, lr: float, mu: float) -> None:
    """In place: ``velocity = mu * velocity - lr * g; w += velocity``."""
    _k.momentum(w, _contig(g), velocity, lr, mu)


def adagrad(w: np.ndarray, g: np.ndarray, sum_sq: np.ndarray, lr: float, eps: float = 1e-8) -> None:
    """In place: ``sum_sq += g**2; w -= lr * g / sqrt(sum_sq + eps)``
    (the per-parameter rate of Dean et al. 2012)."""
    _k.adagrad(w, _contig(g), sum_sq, lr, eps)


def accumulate(acc: np.ndarray, g: np.ndarray, scale: float = 1.0) -> None:
    """In place: ``acc += scale * g`` (gradient accumulation between pushes)."""
    _k.axpy(acc, _contig(g), scale)


# ------------------------------------------------------------ activations


def activation(z: np.ndarray, name: str, out: np.ndarray | None = None) -> np.ndarray:
    """``out = act(z)`` on a (batch, features) array; ``out`` may be ``z``."""
    z = _contig(z)
    out = _out(out, z.shape, z.dtype)
    _k.activation(z, out, _code(name))
    return out


def activation_grad(a: np.ndarray, delta: np.ndarray, name: str,
                    out: np.ndarray | None = None) -> np.ndarray:
    """``out = delta * act'``, the derivative taken from the activation's
    output ``a``; for softmax, the Jacobian-vector product."""
    a, delta = _contig(a), _contig(delta)
    out = _out(out, a.shape, a.dtype)
    _k.activation_grad(a, delta, out, _code(name))
    return out


# ----------------------------------------------------------------- losses


def squared_error(p: np.ndarray, t: np.ndarray,
                  delta: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """The original project's loss, averaged over the batch:
    ``0.5 * sum((t - p)**2) / batch``. ``delta = (p - t) / batch`` is its
    gradient with respect to ``p``."""
    p, t = _contig(p), _contig(t)
    if t.shape != p.shape and t.size == p.size:
        t = t.reshape(p.shape)  # (batch,) targets of a single-output network
    delta = _out(delta, p.shape, p.dtype)
    return _k.squared_error(p, t, delta), delta


def softmax_cross_entropy(p: np.ndarray, labels: np.ndarray,
                          delta: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Cross-entropy of softmax probabilities ``p`` against integer class
    ``labels``, averaged over the batch. ``delta = (p - onehot) / batch`` is
    the gradient with respect to the softmax's input."""
    p = _contig(p)
    labels = np.ascontiguousarray(labels, dtype=np.intp)
    delta = _out(delta, p.shape, p.dtype)
    return _k.softmax_cross_entropy(p, labels, delta), delta


# ------------------------------------------------------------ dense layer


def dense_forward(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, name: str,
                  out: np.ndarray | None = None) -> np.ndarray:
    """``out = act(x @ weight.T + bias)`` for ``weight (out, in)``: one BLAS
    GEMM into ``out``, then bias and activation fused into one sweep."""
    _same_dtype(x=x, weight=weight, bias=bias)
    out = _out(out, (x.shape[0], weight.shape[0]), x.dtype)
    np.matmul(x, weight.T, out=out)
    _k.bias_activation(out, bias, _code(name))
    return out


def dense_backward(x: np.ndarray, a: np.ndarray, delta: np.ndarray, weight: np.ndarray,
                   name: str, grad_weight: np.ndarray | None = None,
                   grad_bias: np.ndarray | None = None, delta_below: np.ndarray | None = None,
                   dz: np.ndarray | None = None, need_delta_below: bool = True):
    """Backward through ``a = act(x @ weight.T + bias)`` given ``delta = dL/da``.

    Returns ``(grad_weight, grad_bias, delta_below)``; ``delta_below`` (dL/dx)
    is ``None`` when ``need_delta_below`` is false (the first layer). ``dz`` is
    scratch for ``dL/dz`` and may be ``delta`` itself.
    """
    _same_dtype(x=x, a=a, delta=delta, weight=weight)
    a, delta = _contig(a), _contig(delta)
    dz = _out(dz, a.shape, a.dtype)
    grad_bias = _out(grad_bias, (weight.shape[0],), a.dtype)
    _k.activation_grad_bias(a, delta, dz, grad_bias, _code(name))
    grad_weight = _out(grad_weight, weight.shape, a.dtype)
    np.matmul(dz.T, x, out=grad_weight)
    if need_delta_below:
        delta_below = _out(delta_below, x.shape, a.dtype)
        np.matmul(dz, weight, out=delta_below)
    else:
        delta_below = None
    return grad_weight, grad_bias, delta_below
