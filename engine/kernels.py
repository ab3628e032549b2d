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

import math
import os
from pathlib import Path

import numpy as np

from ._buildinfo import missing_cpu_flags, source_hash

# The kernels' OpenMP team must sleep between parallel passes, not spin:
# spinning threads take the cores from BLAS's own threads in the GEMM that
# follows (measured: a 784-1024-1024-10 step went from 8.5 to 15.8 ms on two
# cores). libgomp reads this once, when the compiled module loads it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Bumped together with KERNELS_API in csrc/_kernels.pyx.
KERNELS_API = 5

_NOT_BUILT = (
    "dbnode's compiled kernels are missing or fail to load; dbnode never falls "
    "back to slow Python loops. Build and install them with `pip install .` "
    "from the source tree (a C compiler is needed). Cause: "
)


def _load_compiled():
    """Import the compiled modules, refusing one that cannot run on this CPU
    or that was built from other sources than this package."""
    try:
        from . import _target
    except ImportError as exc:
        raise ImportError(_NOT_BUILT + str(exc)) from exc
    missing = missing_cpu_flags(_target.CPU_FLAGS)
    if missing:
        # Checked before loading: the kernels would die of SIGILL, not raise.
        raise ImportError(
            f"dbnode's kernels were compiled with -march={_target.MARCH} for a CPU with "
            f"{', '.join(missing)}, which this CPU lacks. Reinstall dbnode on this machine "
            "(`pip install .`), or build a portable wheel with DBNODE_MARCH=portable."
        )
    try:
        from . import _kernels
    except ImportError as exc:
        raise ImportError(_NOT_BUILT + str(exc)) from exc
    if getattr(_kernels, "KERNELS_API", None) != KERNELS_API:
        raise ImportError(
            f"dbnode._kernels is stale: it implements kernels API "
            f"{getattr(_kernels, 'KERNELS_API', None)}, this package needs {KERNELS_API}. "
            "Rebuild it with `pip install .`."
        )
    here = Path(__file__).resolve().parent
    csrc = here.parent / "csrc"
    # Only in a source checkout (an editable install): the package directory
    # is engine/ with csrc/ beside it.
    if here.name == "engine" and (csrc / "_kernels.pyx").is_file():
        current = source_hash(csrc)
        if current != _kernels.SOURCE_HASH:
            raise ImportError(
                f"dbnode._kernels is stale: built from csrc/ sources {_kernels.SOURCE_HASH}, "
                f"the tree now has {current}. Rebuild it with `pip install .`."
            )
    return _kernels, _target


_k, _target = _load_compiled()

MARCH = _target.MARCH
ACTIVATIONS = {"linear": 0, "sigmoid": 1, "tanh": 2, "relu": 3, "softmax": 4}
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

max_threads = _k.max_threads
set_threads = _k.set_threads
OPENMP = _k.OPENMP


ALIGN = 64


def empty(shape, dtype) -> np.ndarray:
    """An uninitialized C-contiguous array whose data starts on a cache line.

    numpy's own large allocations start 16 bytes past a page boundary; BLAS
    writes a GEMM result about 10% faster into a 64-byte-aligned buffer, so
    every buffer the engine keeps (parameters, gradients, activations) is
    made here.

    Args:
        shape: an int or a tuple of ints.
        dtype: anything ``np.dtype`` takes.

    Returns:
        The array, its contents undefined.
    """
    dtype = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def zeros(shape, dtype) -> np.ndarray:
    """:func:`empty`, zero-filled.

    Args:
        shape: an int or a tuple of ints.
        dtype: anything ``np.dtype`` takes.

    Returns:
        The aligned array of zeros.
    """
    out = empty(shape, dtype)
    out.fill(0)
    return out


def aligned_copy(a: np.ndarray, dtype=None) -> np.ndarray:
    """A C-contiguous, cache-line-aligned copy of ``a`` (cast to ``dtype``).

    Args:
        a: an array, or anything ``np.asarray`` takes.
        dtype: the copy's dtype; None keeps ``a``'s.

    Returns:
        The copy.
    """
    a = np.asarray(a)
    out = empty(a.shape, a.dtype if dtype is None else dtype)
    out[...] = a
    return out


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


def _out(out, shape, dtype, name: str = "out") -> np.ndarray:
    """The caller's output array after checking it, or a fresh one."""
    if out is None:
        return empty(shape, dtype)
    if out.shape != tuple(shape):
        raise ValueError(f"{name}: shape {out.shape} does not match {tuple(shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{name}: dtype {out.dtype} does not match {np.dtype(dtype)}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name}: array must be C-contiguous")
    if not out.flags.writeable:
        raise ValueError(f"{name}: output array is read-only")
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
    """In place: ``w -= lr * g``.

    Args:
        w: the parameters, updated in place.
        g: the gradient, of ``w``'s shape and dtype.
        lr: the learning rate.

    Raises:
        ValueError, TypeError: arrays of mismatched shape, dtype or layout
            (see the module's conventions).
    """
    _k.sgd(w, _contig(g), lr)


def momentum(w: np.ndarray, g: np.ndarray, velocity: np.ndarray, lr: float, mu: float) -> None:
    """In place: ``velocity = mu * velocity - lr * g; w += velocity``.

    Args:
        w: the parameters, updated in place.
        g: the gradient, of ``w``'s shape and dtype.
        velocity: the momentum state, updated in place.
        lr: the learning rate.
        mu: the momentum.

    Raises:
        ValueError, TypeError: arrays of mismatched shape, dtype or layout
            (see the module's conventions).
    """
    _k.momentum(w, _contig(g), velocity, lr, mu)


def adam(
    w: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
) -> None:
    """In place, Adam's update number ``step`` (Kingma & Ba 2015, as PyTorch
    computes it): ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g**2``,
    ``w -= lr * m_hat / (sqrt(v_hat) + eps)`` with the bias-corrected
    ``m_hat = m / (1 - b1**step)`` and ``v_hat = v / (1 - b2**step)``.

    Args:
        w: the parameters, updated in place.
        g: the gradient, of ``w``'s shape and dtype.
        m: the first moment, updated in place.
        v: the second moment, updated in place.
        lr: the learning rate.
        beta1: the first moment's decay.
        beta2: the second moment's decay.
        eps: added to the root of the second moment.
        step: which update this is, from 1.

    Raises:
        ValueError, TypeError: arrays of mismatched shape, dtype or layout
            (see the module's conventions), or ``step`` < 1.
    """
    lr_t, eps_t = adam_scalars(lr, beta1, beta2, eps, step)
    _k.adam(w, _contig(g), m, v, lr_t, beta1, beta2, eps_t)


def adam_scalars(
    lr: float, beta1: float, beta2: float, eps: float, step: int
) -> tuple[float, float]:
    """Adam's bias correction folded into two scalars (in float64):
    ``lr * sqrt(1 - b2**t) / (1 - b1**t)`` and ``eps * sqrt(1 - b2**t)``, so
    that ``lr_t * m / (sqrt(v) + eps_t)`` equals ``lr * m_hat / (sqrt(v_hat) + eps)``.

    Args:
        lr, beta1, beta2, eps: the optimizer's settings.
        step: which update this is, from 1.

    Returns:
        ``(lr_t, eps_t)``.

    Raises:
        ValueError: ``step`` < 1.
    """
    if step < 1:
        raise ValueError(f"adam: step must be >= 1, got {step}")
    root = math.sqrt(1.0 - beta2**step)
    return lr * root / (1.0 - beta1**step), eps * root


def adagrad(w: np.ndarray, g: np.ndarray, sum_sq: np.ndarray, lr: float, eps: float = 1e-8) -> None:
    """In place: ``sum_sq += g**2; w -= lr * g / sqrt(sum_sq + eps)``
    (the per-parameter rate of Dean et al. 2012).

    Args:
        w: the parameters, updated in place.
        g: the gradient, of ``w``'s shape and dtype.
        sum_sq: the sum of squared gradients, updated in place.
        lr: the learning rate.
        eps: added under the square root.

    Raises:
        ValueError, TypeError: arrays of mismatched shape, dtype or layout
            (see the module's conventions).
    """
    _k.adagrad(w, _contig(g), sum_sq, lr, eps)


def accumulate(acc: np.ndarray, g: np.ndarray, scale: float = 1.0) -> None:
    """In place: ``acc += scale * g`` (gradient accumulation between pushes).

    Args:
        acc: the accumulator, updated in place.
        g: the gradient, of ``acc``'s shape and dtype.
        scale: the factor on ``g``.

    Raises:
        ValueError, TypeError: arrays of mismatched shape, dtype or layout
            (see the module's conventions).
    """
    _k.axpy(acc, _contig(g), scale)


def all_finite(a: np.ndarray) -> bool:
    """Whether no element of ``a`` is NaN or infinite (one compiled pass, no
    temporary: what a shard checks every pushed gradient with).

    Args:
        a: any array; float32 and float64 ones in native byte order and C
            order take the compiled pass, others numpy's.

    Returns:
        True when every element is finite (an empty array is).
    """
    if a.dtype in DTYPES and a.dtype.isnative and a.flags.c_contiguous:
        return bool(_k.all_finite(a))
    return bool(np.isfinite(a).all())


# ------------------------------------------------------------ wire codecs

# The 16-bit formats tensors may travel in (float32 stays as it is). Codes
# shared with csrc/_kernels.pyx.
WIRE_CODECS = {"bf16": 1, "f16": 2}


def _wire_codec(codec: str) -> int:
    try:
        return WIRE_CODECS[codec]
    except KeyError:
        raise ValueError(
            f"unknown wire codec {codec!r}; expected one of {sorted(WIRE_CODECS)}"
        ) from None


def encode_wire(
    x: np.ndarray, codec: str, out: np.ndarray | None = None, residual: np.ndarray | None = None
) -> np.ndarray:
    """A float32 array as the 16-bit words of a wire codec, rounded to
    nearest even, saturating (a finite value never becomes infinite;
    infinity and NaN stay what they are).

    Args:
        x: the float32 values.
        codec: ``"bf16"`` or ``"f16"``.
        out: uint16 array of ``x``'s shape for the words; None allocates it.
        residual: error feedback: float32 of ``x``'s shape, added to ``x``
            before rounding and left holding what the rounding lost (in
            place), so that a stream of encodings loses nothing over time.

    Returns:
        ``out``: the words.

    Raises:
        ValueError, TypeError: an unknown codec, or arrays of the wrong dtype,
            size or layout.
    """
    code = _wire_codec(codec)
    x = _contig(x)
    out = _out(out, x.shape, np.uint16)
    _k.encode(x, out, residual, code)
    return out


def decode_wire(q: np.ndarray, codec: str, out: np.ndarray | None = None) -> np.ndarray:
    """The float32 values of a wire codec's 16-bit words (exact).

    Args:
        q: uint16 words.
        codec: ``"bf16"`` or ``"f16"``.
        out: float32 array of ``q``'s shape for the values; None allocates it.

    Returns:
        ``out``: the values.

    Raises:
        ValueError, TypeError: an unknown codec, or arrays of the wrong dtype,
            size or layout.
    """
    code = _wire_codec(codec)
    q = _contig(q)
    out = _out(out, q.shape, np.float32)
    _k.decode(q, out, code)
    return out


# ------------------------------------------------------------ activations


def activation(z: np.ndarray, name: str, out: np.ndarray | None = None) -> np.ndarray:
    """``out = act(z)`` on a (batch, features) array; ``out`` may be ``z``.

    Args:
        z: the pre-activations.
        name: the activation's name.
        out: where to write; None allocates it.

    Returns:
        ``out``.

    Raises:
        ValueError: an unknown activation, or a bad shape or layout.
        TypeError: a dtype that is not float32/float64 or does not match.
    """
    z = _contig(z)
    out = _out(out, z.shape, z.dtype)
    _k.activation(z, out, _code(name))
    return out


def activation_grad(
    a: np.ndarray, delta: np.ndarray, name: str, out: np.ndarray | None = None
) -> np.ndarray:
    """``out = delta * act'``, the derivative taken from the activation's
    output ``a``; for softmax, the Jacobian-vector product.

    Args:
        a: the activation's output.
        delta: dL/da, of ``a``'s shape.
        name: the activation's name.
        out: where to write dL/dz; None allocates it.

    Returns:
        ``out``.

    Raises:
        ValueError: an unknown activation, or a bad shape or layout.
        TypeError: a dtype that is not float32/float64 or does not match.
    """
    a, delta = _contig(a), _contig(delta)
    out = _out(out, a.shape, a.dtype)
    _k.activation_grad(a, delta, out, _code(name))
    return out


# ----------------------------------------------------------------- losses


def squared_error(
    p: np.ndarray, t: np.ndarray, delta: np.ndarray | None = None
) -> tuple[float, np.ndarray]:
    """The original project's loss, averaged over the batch:
    ``0.5 * sum((t - p)**2) / batch``. ``delta = (p - t) / batch`` is its
    gradient with respect to ``p``.

    Args:
        p: the predictions, ``(batch, outputs)``.
        t: the targets, of ``p``'s shape (or ``(batch,)`` for one output).
        delta: where to write the gradient; None allocates it.

    Returns:
        ``(loss, delta)``.

    Raises:
        ValueError, TypeError: arrays of mismatched shape, dtype or layout.
    """
    p, t = _contig(p), _contig(t)
    if t.ndim == 1 and p.shape == (len(t), 1):
        t = t.reshape(p.shape)  # (batch,) targets of a single-output network
    delta = _out(delta, p.shape, p.dtype, "delta")
    return _k.squared_error(p, t, delta), delta


def sigmoid_cross_entropy(
    p: np.ndarray, t: np.ndarray, delta: np.ndarray | None = None
) -> tuple[float, np.ndarray]:
    """Binary log-loss of sigmoid outputs ``p`` against targets ``t`` in
    [0, 1], summed over outputs and averaged over the batch:
    ``-sum(t log p + (1 - t) log(1 - p)) / batch``. ``delta = (p - t) /
    batch`` is its gradient with respect to the sigmoid's *input* (the two
    derivatives cancel to this).

    Args:
        p: the sigmoid outputs, ``(batch, outputs)``.
        t: the targets, of ``p``'s shape (or ``(batch,)`` for one output).
        delta: where to write the gradient; None allocates it.

    Returns:
        ``(loss, delta)``.

    Raises:
        ValueError, TypeError: arrays of mismatched shape, dtype or layout.
    """
    p, t = _contig(p), _contig(t)
    if t.ndim == 1 and p.shape == (len(t), 1):
        t = t.reshape(p.shape)  # (batch,) targets of a single-output network
    delta = _out(delta, p.shape, p.dtype, "delta")
    return _k.sigmoid_cross_entropy(p, t, delta), delta


def softmax_cross_entropy(
    p: np.ndarray, labels: np.ndarray, delta: np.ndarray | None = None
) -> tuple[float, np.ndarray]:
    """Cross-entropy of softmax probabilities ``p`` against integer class
    ``labels``, averaged over the batch. ``delta = (p - onehot) / batch`` is
    the gradient with respect to the softmax's input.

    Args:
        p: the softmax probabilities, ``(batch, classes)``.
        labels: the class indices, ``(batch,)`` of an integer dtype.
        delta: where to write the gradient; None allocates it.

    Returns:
        ``(loss, delta)``.

    Raises:
        TypeError: labels that are not integers, or a bad dtype.
        ValueError: mismatched shapes, or a label out of range.
    """
    p = _contig(p)
    if not np.issubdtype(np.asarray(labels).dtype, np.integer):
        raise TypeError(f"labels: expected integer class labels, got {np.asarray(labels).dtype}")
    labels = np.ascontiguousarray(labels, dtype=np.intp)
    delta = _out(delta, p.shape, p.dtype, "delta")
    return _k.softmax_cross_entropy(p, labels, delta), delta


# ------------------------------------------------------------ dense layer


# Output widths from which the forward GEMM runs transposed: OpenBLAS
# computes ``W @ x.T`` (NN-like packing) about 20% faster than ``x @ W.T``
# for wide layers at minibatch sizes; the transpose back is fused into the
# epilogue. Narrow layers gain nothing and keep the direct form.
TRANSPOSED_FORWARD_MIN = 64


def dense_forward(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    name: str,
    out: np.ndarray | None = None,
    scratch: np.ndarray | None = None,
) -> np.ndarray:
    """``out = act(x @ weight.T + bias)`` for ``weight (out, in)``: one BLAS
    GEMM, then bias and activation fused into one sweep. ``scratch`` (any
    C-contiguous buffer of ``out``'s size) holds the transposed GEMM result
    for wide layers; it is allocated when ``None``.

    Args:
        x: the inputs, ``(batch, in)``.
        weight: ``(out, in)``.
        bias: ``(out,)``.
        name: the activation's name.
        out: where to write ``(batch, out)``; None allocates it.
        scratch: see above.

    Returns:
        ``out``.

    Raises:
        ValueError: an unknown activation, or a bad shape or layout.
        TypeError: dtypes that are not float32/float64 or do not all match.
    """
    _same_dtype(x=x, weight=weight, bias=bias)
    bias = _contig(bias)
    shape = (x.shape[0], weight.shape[0])
    out = _out(out, shape, x.dtype)
    if shape[1] >= TRANSPOSED_FORWARD_MIN and shape[0] > 1:
        if scratch is not None:
            scratch = _out(scratch, scratch.shape, x.dtype, "scratch")
            if scratch.size != out.size:
                raise ValueError(f"scratch: size {scratch.size} does not match {out.size}")
            scratch = scratch.reshape(shape[::-1])
        zt = _out(scratch, shape[::-1], x.dtype, "scratch")
        np.matmul(weight, x.T, out=zt)
        _k.bias_activation_t(zt, bias, out, _code(name))
    else:
        np.matmul(x, weight.T, out=out)
        _k.bias_activation(out, bias, _code(name))
    return out


def dense_backward(
    x: np.ndarray,
    a: np.ndarray,
    delta: np.ndarray,
    weight: np.ndarray,
    name: str,
    grad_weight: np.ndarray | None = None,
    grad_bias: np.ndarray | None = None,
    delta_below: np.ndarray | None = None,
    dz: np.ndarray | None = None,
    need_delta_below: bool = True,
):
    """Backward through ``a = act(x @ weight.T + bias)`` given ``delta = dL/da``.

    ``dz`` is scratch for ``dL/dz`` and may be ``delta`` itself. Each output
    is allocated when passed as None.

    Args:
        x: the forward pass's input, ``(batch, in)``.
        a: its output, ``(batch, out)``.
        delta: dL/da, of ``a``'s shape.
        weight: ``(out, in)``.
        name: the activation's name (``linear`` for a delta already taken
            with respect to the pre-activation).
        grad_weight: where to write dL/dweight.
        grad_bias: where to write dL/dbias.
        delta_below: where to write dL/dx.
        dz: scratch of ``a``'s shape.
        need_delta_below: whether to compute dL/dx (not for the first layer).

    Returns:
        ``(grad_weight, grad_bias, delta_below)``; ``delta_below`` is None
        when ``need_delta_below`` is false.

    Raises:
        ValueError: an unknown activation, or a bad shape or layout.
        TypeError: dtypes that are not float32/float64 or do not all match.
    """
    _same_dtype(x=x, a=a, delta=delta, weight=weight)
    a, delta = _contig(a), _contig(delta)
    dz = _out(dz, a.shape, a.dtype, "dz")
    grad_bias = _out(grad_bias, (weight.shape[0],), a.dtype, "grad_bias")
    grad_weight = _out(grad_weight, weight.shape, a.dtype, "grad_weight")
    if need_delta_below:
        delta_below = _out(delta_below, x.shape, a.dtype, "delta_below")
    _k.activation_grad_bias(a, delta, dz, grad_bias, _code(name))
    np.matmul(dz.T, x, out=grad_weight)
    if need_delta_below:
        np.matmul(dz, weight, out=delta_below)
    else:
        delta_below = None
    return grad_weight, grad_bias, delta_below
