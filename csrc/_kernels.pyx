"""Compiled numerical kernels of dbnode (built as ``dbnode._kernels``).

Three tiers, as in scikit-learn's kernels:

1. ``cdef ... noexcept nogil`` cores over raw pointers, fused over
   float/double, written as flat loops the compiler vectorizes;
2. ``def`` entry points that check dtype, shape, contiguity and writability
   in C (a few hundred nanoseconds; typed memoryviews cost microseconds per
   argument, which matters for small layers), then run a core without the
   GIL, split across OpenMP threads when the array is large enough to pay
   for it;
3. the Python wrapper ``dbnode.kernels`` that allocates outputs and
   normalizes layouts.

GEMM is not here: it goes to numpy's BLAS (``np.matmul(..., out=)``). These
kernels are the memory-bound passes around it, each fused into one sweep.
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.float cimport DBL_MIN, FLT_MIN
from libc.math cimport log, logf, sqrt, sqrtf, tanh, tanhf
from libc.string cimport memcpy

cimport numpy as cnp

cnp.import_array()

cdef extern from "dbnode_math.h":
    float dbn_expf(float x) noexcept nogil
    double dbn_exp(double x) noexcept nogil
    unsigned short dbn_to_bf16(float f) noexcept nogil
    float dbn_from_bf16(unsigned short h) noexcept nogil
    unsigned short dbn_to_f16(float f) noexcept nogil
    float dbn_from_f16(unsigned short h) noexcept nogil

cdef extern from *:
    """
    #if DBNODE_OPENMP
    #include <omp.h>
    /* OpenMP's own limit is per calling thread; a node computes in worker
       threads, so the limit it sets must hold in every thread: 0 = unset. */
    static int dbnode_limit = 0;
    static int dbnode_max_threads(void) {
        return dbnode_limit > 0 ? dbnode_limit : omp_get_max_threads();
    }
    static void dbnode_set_threads(int n) { dbnode_limit = n; }
    #else
    static int dbnode_max_threads(void) { return 1; }
    static void dbnode_set_threads(int n) { (void)n; }
    #endif
    """
    const char* DBNODE_SOURCE_HASH
    int DBNODE_OPENMP
    int dbnode_max_threads() noexcept nogil
    void dbnode_set_threads(int n) noexcept nogil

# Bumped whenever a signature or a semantic of this module changes; the
# Python wrapper refuses to run against a module built from other sources.
KERNELS_API = 5
SOURCE_HASH = DBNODE_SOURCE_HASH.decode()
OPENMP = bool(DBNODE_OPENMP)

# Activation codes shared with dbnode.kernels.ACTIVATIONS.
cdef enum:
    LINEAR = 0
    SIGMOID = 1
    TANH = 2
    RELU = 3
    SOFTMAX = 4

# A pass splits across threads only when its work, in element-updates of a
# plain SGD sweep, passes this: waking a sleeping OpenMP team costs tens of
# microseconds, and one core streams about a million floats in 100 us from
# cache. Heavier loops weigh their elements (see the COST_ constants).
cdef Py_ssize_t PARALLEL_MIN = 1 << 20
cdef Py_ssize_t COST_ADAGRAD = 6      # sqrt and divide per element
cdef Py_ssize_t COST_EXP = 8          # sigmoid, softmax
cdef Py_ssize_t COST_SIMPLE = 1


def max_threads():
    """Threads the parallel kernels use (1 in a build without OpenMP)."""
    return dbnode_max_threads()


def set_threads(int n):
    """Set the number of OpenMP threads the parallel kernels use, in every
    thread of the process."""
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    dbnode_set_threads(n)


# ---------------------------------------------------------------- checking

cdef inline int _dtype_of(cnp.ndarray a, str name) except -1:
    cdef int t = cnp.PyArray_TYPE(a)
    if t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64:
        raise TypeError(f"{name}: dtype must be float32 or float64, got {a.dtype}")
    return t


cdef inline int _check(cnp.ndarray a, str name, int dtype, bint writable) except -1:
    """Same dtype as the first operand, C-contiguous, writable if an output."""
    if cnp.PyArray_TYPE(a) != dtype:
        raise TypeError(f"{name}: dtype {a.dtype} does not match "
                        f"{cnp.PyArray_DescrFromType(dtype)}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"{name}: array must be C-contiguous")
    if writable and not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError(f"{name}: output array is read-only")
    return 0


cdef inline tuple _shape(cnp.ndarray a):
    return (<object>a).shape


cdef inline int _rows_cols(cnp.ndarray a, str name, Py_ssize_t* rows,
                           Py_ssize_t* cols) except -1:
    if cnp.PyArray_NDIM(a) != 2:
        raise ValueError(f"{name}: expected a 2-d (batch, features) array, "
                         f"got shape {_shape(a)}")
    rows[0] = cnp.PyArray_DIM(a, 0)
    cols[0] = cnp.PyArray_DIM(a, 1)
    return 0


cdef inline int _same_shape(cnp.ndarray a, cnp.ndarray b, str name) except -1:
    if not cnp.PyArray_SAMESHAPE(a, b):
        raise ValueError(f"{name}: shape {_shape(b)} does not match {_shape(a)}")
    return 0


cdef inline int _act_code(int act) except -1:
    if act < LINEAR or act > SOFTMAX:
        raise ValueError(f"unknown activation code {act}")
    return act


cdef inline int _threads_for(Py_ssize_t work) noexcept nogil:
    return 1 if work < PARALLEL_MIN else dbnode_max_threads()


# ------------------------------------------------------------ scalar math

cdef inline floating _exp(floating x) noexcept nogil:
    # Inline and branch-free (csrc/dbnode_math.h): loops calling it vectorize.
    if floating is float:
        return dbn_expf(x)
    else:
        return dbn_exp(x)


cdef inline floating _log(floating x) noexcept nogil:
    if floating is float:
        return logf(x)
    else:
        return log(x)


cdef inline floating _sqrt(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline floating _tanh(floating x) noexcept nogil:
    if floating is float:
        return tanhf(x)
    else:
        return tanh(x)


cdef inline floating _sigmoid(floating x) noexcept nogil:
    # exp(-x) overflows to inf for very negative x, giving exactly 0: fine.
    return <floating>1 / (<floating>1 + _exp(-x))


# ------------------------------------------------------- optimizer cores
# Each reads and writes every element once: numpy's `w -= lr * g` makes a
# full-size temporary and sweeps memory three more times.

cdef inline void _sgd(floating* w, const floating* g, floating lr,
                      Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        w[i] -= lr * g[i]


cdef inline void _axpy(floating* y, const floating* x, floating alpha,
                       Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        y[i] += alpha * x[i]


cdef inline void _momentum(floating* w, const floating* g, floating* v,
                           floating lr, floating mu, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating vi
    for i in range(n):
        vi = mu * v[i] - lr * g[i]
        v[i] = vi
        w[i] += vi


cdef inline void _adagrad(floating* w, const floating* g, floating* h,
                          floating lr, floating eps, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating gi, hi
    for i in range(n):
        gi = g[i]
        hi = h[i] + gi * gi
        h[i] = hi
        w[i] -= lr * gi / _sqrt(hi + eps)


cdef inline void _adam(floating* w, const floating* g, floating* m, floating* v,
                       floating lr_t, floating b1, floating b2, floating eps_t,
                       Py_ssize_t n) noexcept nogil:
    # Bias correction is folded into lr_t and eps_t by the caller (one scalar
    # each per step), so this is one pass with no per-element division by it.
    cdef Py_ssize_t i
    cdef floating gi, mi, vi
    for i in range(n):
        gi = g[i]
        mi = b1 * m[i] + (1 - b1) * gi
        vi = b2 * v[i] + (1 - b2) * gi * gi
        m[i] = mi
        v[i] = vi
        w[i] -= lr_t * mi / (_sqrt(vi) + eps_t)


# Parallel drivers: split [0, n) into one contiguous span per thread and run
# the serial core on each, so every span is a plain vectorizable loop.

cdef void _par_sgd(floating* w, const floating* g, floating lr,
                   Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t k, lo, nk = _threads_for(n * COST_SIMPLE), step = (n + nk - 1) // nk
    if nk == 1:
        _sgd(w, g, lr, n)
        return
    for k in prange(nk, schedule="static", num_threads=nk):
        lo = k * step
        if lo < n:
            _sgd(w + lo, g + lo, lr, min(step, n - lo))


cdef void _par_axpy(floating* y, const floating* x, floating alpha,
                    Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t k, lo, nk = _threads_for(n * COST_SIMPLE), step = (n + nk - 1) // nk
    if nk == 1:
        _axpy(y, x, alpha, n)
        return
    for k in prange(nk, schedule="static", num_threads=nk):
        lo = k * step
        if lo < n:
            _axpy(y + lo, x + lo, alpha, min(step, n - lo))


cdef void _par_momentum(floating* w, const floating* g, floating* v,
                        floating lr, floating mu, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t k, lo, nk = _threads_for(n * COST_SIMPLE), step = (n + nk - 1) // nk
    if nk == 1:
        _momentum(w, g, v, lr, mu, n)
        return
    for k in prange(nk, schedule="static", num_threads=nk):
        lo = k * step
        if lo < n:
            _momentum(w + lo, g + lo, v + lo, lr, mu, min(step, n - lo))


cdef void _par_adagrad(floating* w, const floating* g, floating* h,
                       floating lr, floating eps, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t k, lo, nk = _threads_for(n * COST_ADAGRAD), step = (n + nk - 1) // nk
    if nk == 1:
        _adagrad(w, g, h, lr, eps, n)
        return
    for k in prange(nk, schedule="static", num_threads=nk):
        lo = k * step
        if lo < n:
            _adagrad(w + lo, g + lo, h + lo, lr, eps, min(step, n - lo))


cdef void _par_adam(floating* w, const floating* g, floating* m, floating* v,
                    floating lr_t, floating b1, floating b2, floating eps_t,
                    Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t k, lo, nk = _threads_for(n * COST_ADAGRAD), step = (n + nk - 1) // nk
    if nk == 1:
        _adam(w, g, m, v, lr_t, b1, b2, eps_t, n)
        return
    for k in prange(nk, schedule="static", num_threads=nk):
        lo = k * step
        if lo < n:
            _adam(w + lo, g + lo, m + lo, v + lo, lr_t, b1, b2, eps_t, min(step, n - lo))


def sgd(cnp.ndarray w, cnp.ndarray g, double lr):
    """In place: ``w -= lr * g``."""
    cdef int t = _dtype_of(w, "w")
    _check(w, "w", t, True)
    _check(g, "g", t, False)
    _same_shape(w, g, "g")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(w)
    with nogil:
        if t == cnp.NPY_FLOAT32:
            _par_sgd(<float*>cnp.PyArray_DATA(w), <const float*>cnp.PyArray_DATA(g),
                     <float>lr, n)
        else:
            _par_sgd(<double*>cnp.PyArray_DATA(w), <const double*>cnp.PyArray_DATA(g),
                     lr, n)


def axpy(cnp.ndarray y, cnp.ndarray x, double alpha):
    """In place: ``y += alpha * x`` (gradient accumulation: y is the
    accumulator ``acc``, x the gradient ``g``)."""
    cdef int t = _dtype_of(y, "acc")
    _check(y, "acc", t, True)
    _check(x, "g", t, False)
    _same_shape(y, x, "g")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(y)
    with nogil:
        if t == cnp.NPY_FLOAT32:
            _par_axpy(<float*>cnp.PyArray_DATA(y), <const float*>cnp.PyArray_DATA(x),
                      <float>alpha, n)
        else:
            _par_axpy(<double*>cnp.PyArray_DATA(y), <const double*>cnp.PyArray_DATA(x),
                      alpha, n)


def momentum(cnp.ndarray w, cnp.ndarray g, cnp.ndarray v, double lr, double mu):
    """In place: ``v = mu * v - lr * g; w += v``."""
    cdef int t = _dtype_of(w, "w")
    _check(w, "w", t, True)
    _check(g, "g", t, False)
    _check(v, "velocity", t, True)
    _same_shape(w, g, "g")
    _same_shape(w, v, "velocity")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(w)
    with nogil:
        if t == cnp.NPY_FLOAT32:
            _par_momentum(<float*>cnp.PyArray_DATA(w), <const float*>cnp.PyArray_DATA(g),
                          <float*>cnp.PyArray_DATA(v), <float>lr, <float>mu, n)
        else:
            _par_momentum(<double*>cnp.PyArray_DATA(w), <const double*>cnp.PyArray_DATA(g),
                          <double*>cnp.PyArray_DATA(v), lr, mu, n)


def adagrad(cnp.ndarray w, cnp.ndarray g, cnp.ndarray h, double lr, double eps):
    """In place: ``h += g * g; w -= lr * g / sqrt(h + eps)``."""
    cdef int t = _dtype_of(w, "w")
    _check(w, "w", t, True)
    _check(g, "g", t, False)
    _check(h, "sum_sq", t, True)
    _same_shape(w, g, "g")
    _same_shape(w, h, "sum_sq")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(w)
    with nogil:
        if t == cnp.NPY_FLOAT32:
            _par_adagrad(<float*>cnp.PyArray_DATA(w), <const float*>cnp.PyArray_DATA(g),
                         <float*>cnp.PyArray_DATA(h), <float>lr, <float>eps, n)
        else:
            _par_adagrad(<double*>cnp.PyArray_DATA(w), <const double*>cnp.PyArray_DATA(g),
                         <double*>cnp.PyArray_DATA(h), lr, eps, n)


def adam(cnp.ndarray w, cnp.ndarray g, cnp.ndarray m, cnp.ndarray v, double lr_t,
         double b1, double b2, double eps_t):
    """In place: ``m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
    w -= lr_t * m / (sqrt(v) + eps_t)``."""
    cdef int t = _dtype_of(w, "w")
    _check(w, "w", t, True)
    _check(g, "g", t, False)
    _check(m, "m", t, True)
    _check(v, "v", t, True)
    _same_shape(w, g, "g")
    _same_shape(w, m, "m")
    _same_shape(w, v, "v")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(w)
    with nogil:
        if t == cnp.NPY_FLOAT32:
            _par_adam(<float*>cnp.PyArray_DATA(w), <const float*>cnp.PyArray_DATA(g),
                      <float*>cnp.PyArray_DATA(m), <float*>cnp.PyArray_DATA(v),
                      <float>lr_t, <float>b1, <float>b2, <float>eps_t, n)
        else:
            _par_adam(<double*>cnp.PyArray_DATA(w), <const double*>cnp.PyArray_DATA(g),
                      <double*>cnp.PyArray_DATA(m), <double*>cnp.PyArray_DATA(v),
                      lr_t, b1, b2, eps_t, n)


# ------------------------------------------------------ activation cores
# All work row by row on (rows, cols) C-contiguous blocks; softmax needs the
# whole row, the others are elementwise within it.

cdef inline void _act_row(floating* z, Py_ssize_t cols, int act) noexcept nogil:
    """In place: z = act(z) for one row."""
    cdef Py_ssize_t j
    cdef floating m, s
    if act == SIGMOID:
        for j in range(cols):
            z[j] = _sigmoid(z[j])
    elif act == TANH:
        for j in range(cols):
            z[j] = _tanh(z[j])
    elif act == RELU:
        for j in range(cols):
            z[j] = z[j] if z[j] > 0 else 0
    elif act == SOFTMAX:
        m = z[0]
        for j in range(1, cols):
            if z[j] > m:
                m = z[j]
        s = 0
        for j in range(cols):
            z[j] = _exp(z[j] - m)
            s += z[j]
        s = 1 / s
        for j in range(cols):
            z[j] *= s


cdef inline void _bias_act_row(floating* z, const floating* b, Py_ssize_t cols,
                               int act) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(cols):
        z[j] += b[j]
    _act_row(z, cols, act)


cdef inline Py_ssize_t _act_cost(int act) noexcept nogil:
    return COST_EXP if act == SIGMOID or act == TANH or act == SOFTMAX else COST_SIMPLE


cdef void _bias_act(floating* z, const floating* b, Py_ssize_t rows,
                    Py_ssize_t cols, int act) noexcept nogil:
    cdef Py_ssize_t i
    cdef int nt = _threads_for(rows * cols * _act_cost(act))
    if nt == 1:
        for i in range(rows):
            _bias_act_row(z + i * cols, b, cols, act)
    else:
        for i in prange(rows, schedule="static", num_threads=nt):
            _bias_act_row(z + i * cols, b, cols, act)


cdef void _bias_act_t(const floating* zt, const floating* b, floating* out,
                      Py_ssize_t rows, Py_ssize_t cols, int act) noexcept nogil:
    # out[i, j] = act(zt[j, i] + b[j]): a transpose fused into the epilogue,
    # by TB x TB tiles that stay in L1. Row by row would write one float per
    # cache line of ``out`` at a stride of whole rows, which alias in cache.
    cdef Py_ssize_t i0 = 0, j0, i, j, ilim, jlim
    cdef Py_ssize_t TB = 16
    while i0 < rows:
        ilim = min(i0 + TB, rows)
        j0 = 0
        while j0 < cols:
            jlim = min(j0 + TB, cols)
            for i in range(i0, ilim):
                for j in range(j0, jlim):
                    out[i * cols + j] = zt[j * rows + i] + b[j]
            j0 = jlim
        for i in range(i0, ilim):
            _act_row(out + i * cols, cols, act)
        i0 = ilim


cdef void _act(const floating* z, floating* out, Py_ssize_t rows,
               Py_ssize_t cols, int act) noexcept nogil:
    cdef Py_ssize_t i
    if out != z:
        memcpy(out, z, rows * cols * sizeof(floating))
    cdef int nt = _threads_for(rows * cols * _act_cost(act))
    if nt == 1:
        for i in range(rows):
            _act_row(out + i * cols, cols, act)
    else:
        for i in prange(rows, schedule="static", num_threads=nt):
            _act_row(out + i * cols, cols, act)


cdef inline void _act_grad_row(const floating* a, const floating* d,
                               floating* dz, Py_ssize_t cols,
                               int act) noexcept nogil:
    """dz = d * act'(.) for one row, the derivative written in terms of the
    activation's output ``a`` (what the forward pass keeps)."""
    cdef Py_ssize_t j
    cdef floating s
    if act == LINEAR:
        for j in range(cols):
            dz[j] = d[j]
    elif act == SIGMOID:
        for j in range(cols):
            dz[j] = d[j] * a[j] * (1 - a[j])
    elif act == TANH:
        for j in range(cols):
            dz[j] = d[j] * (1 - a[j] * a[j])
    elif act == RELU:
        # Multiply by the mask, no branch: signs are random, a branch mispredicts.
        for j in range(cols):
            dz[j] = d[j] * <floating>(a[j] > 0)
    elif act == SOFTMAX:
        # Jacobian-vector product of softmax: a * (d - <d, a>).
        s = 0
        for j in range(cols):
            s += d[j] * a[j]
        for j in range(cols):
            dz[j] = a[j] * (d[j] - s)


cdef void _act_grad(const floating* a, const floating* d, floating* dz,
                    Py_ssize_t rows, Py_ssize_t cols, int act) noexcept nogil:
    cdef Py_ssize_t i
    cdef int nt = _threads_for(rows * cols)
    if nt == 1:
        for i in range(rows):
            _act_grad_row(a + i * cols, d + i * cols, dz + i * cols, cols, act)
    else:
        for i in prange(rows, schedule="static", num_threads=nt):
            _act_grad_row(a + i * cols, d + i * cols, dz + i * cols, cols, act)


cdef void _act_grad_bias(const floating* a, const floating* d, floating* dz,
                         floating* gb, Py_ssize_t rows, Py_ssize_t cols,
                         int act) noexcept nogil:
    # Serial over rows: the bias gradient is a column sum, and rows are few
    # (a minibatch); each row's inner loop vectorizes.
    cdef Py_ssize_t i, j
    cdef floating* dzi
    for j in range(cols):
        gb[j] = 0
    for i in range(rows):
        dzi = dz + i * cols
        _act_grad_row(a + i * cols, d + i * cols, dzi, cols, act)
        for j in range(cols):
            gb[j] += dzi[j]


def bias_activation(cnp.ndarray z, cnp.ndarray b, int act):
    """In place on a (batch, out) block: ``z = act(z + b)``.

    The epilogue of a dense layer's forward pass, one sweep after the GEMM.
    """
    cdef int t = _dtype_of(z, "z")
    cdef Py_ssize_t rows, cols
    _rows_cols(z, "z", &rows, &cols)
    _check(z, "z", t, True)
    _check(b, "b", t, False)
    if cnp.PyArray_NDIM(b) != 1 or cnp.PyArray_DIM(b, 0) != cols:
        raise ValueError(f"b: shape {_shape(b)} does not match ({cols},)")
    _act_code(act)
    if rows == 0 or cols == 0:
        return
    with nogil:
        if t == cnp.NPY_FLOAT32:
            _bias_act(<float*>cnp.PyArray_DATA(z), <const float*>cnp.PyArray_DATA(b),
                      rows, cols, act)
        else:
            _bias_act(<double*>cnp.PyArray_DATA(z), <const double*>cnp.PyArray_DATA(b),
                      rows, cols, act)


def bias_activation_t(cnp.ndarray zt, cnp.ndarray b, cnp.ndarray out, int act):
    """``out = act(zt.T + b)`` for ``zt`` of shape (out_features, batch).

    The epilogue of a dense layer whose GEMM was computed transposed
    (``W @ x.T``), which BLAS runs faster for wide layers.
    """
    cdef int t = _dtype_of(out, "out")
    cdef Py_ssize_t rows, cols
    _rows_cols(out, "out", &rows, &cols)
    _check(out, "out", t, True)
    _check(zt, "zt", t, False)
    _check(b, "b", t, False)
    if cnp.PyArray_NDIM(zt) != 2 or cnp.PyArray_DIM(zt, 0) != cols or cnp.PyArray_DIM(zt, 1) != rows:
        raise ValueError(f"zt: shape {_shape(zt)} does not match ({cols}, {rows})")
    if cnp.PyArray_NDIM(b) != 1 or cnp.PyArray_DIM(b, 0) != cols:
        raise ValueError(f"b: shape {_shape(b)} does not match ({cols},)")
    _act_code(act)
    if rows == 0 or cols == 0:
        return
    with nogil:
        if t == cnp.NPY_FLOAT32:
            _bias_act_t(<const float*>cnp.PyArray_DATA(zt), <const float*>cnp.PyArray_DATA(b),
                        <float*>cnp.PyArray_DATA(out), rows, cols, act)
        else:
            _bias_act_t(<const double*>cnp.PyArray_DATA(zt), <const double*>cnp.PyArray_DATA(b),
                        <double*>cnp.PyArray_DATA(out), rows, cols, act)


def activation(cnp.ndarray z, cnp.ndarray out, int act):
    """``out = act(z)`` on a (batch, features) block; ``out`` may be ``z``."""
    cdef int t = _dtype_of(z, "z")
    cdef Py_ssize_t rows, cols
    _rows_cols(z, "z", &rows, &cols)
    _check(z, "z", t, False)
    _check(out, "out", t, True)
    _same_shape(z, out, "out")
    _act_code(act)
    if rows == 0 or cols == 0:
        return
    with nogil:
        if t == cnp.NPY_FLOAT32:
            _act(<const float*>cnp.PyArray_DATA(z), <float*>cnp.PyArray_DATA(out),
                 rows, cols, act)
        else:
            _act(<const double*>cnp.PyArray_DATA(z), <double*>cnp.PyArray_DATA(out),
                 rows, cols, act)


def activation_grad(cnp.ndarray a, cnp.ndarray d, cnp.ndarray out, int act):
    """``out = d * act'`` given the activation's output ``a``; ``out`` may be ``d``."""
    cdef int t = _dtype_of(a, "a")
    cdef Py_ssize_t rows, cols
    _rows_cols(a, "a", &rows, &cols)
    _check(a, "a", t, False)
    _check(d, "delta", t, False)
    _check(out, "out", t, True)
    _same_shape(a, d, "delta")
    _same_shape(a, out, "out")
    _act_code(act)
    if rows == 0 or cols == 0:
        return
    with nogil:
        if t == cnp.NPY_FLOAT32:
            _act_grad(<const float*>cnp.PyArray_DATA(a), <const float*>cnp.PyArray_DATA(d),
                      <float*>cnp.PyArray_DATA(out), rows, cols, act)
        else:
            _act_grad(<const double*>cnp.PyArray_DATA(a), <const double*>cnp.PyArray_DATA(d),
                      <double*>cnp.PyArray_DATA(out), rows, cols, act)


def activation_grad_bias(cnp.ndarray a, cnp.ndarray d, cnp.ndarray dz,
                         cnp.ndarray gb, int act):
    """One sweep: ``dz = d * act'`` and ``gb = dz.sum(axis=0)``.

    The start of a dense layer's backward pass; ``dz`` may be ``d``.
    """
    cdef int t = _dtype_of(a, "a")
    cdef Py_ssize_t rows, cols
    _rows_cols(a, "a", &rows, &cols)
    _check(a, "a", t, False)
    _check(d, "delta", t, False)
    _check(dz, "dz", t, True)
    _check(gb, "grad_bias", t, True)
    _same_shape(a, d, "delta")
    _same_shape(a, dz, "dz")
    if cnp.PyArray_NDIM(gb) != 1 or cnp.PyArray_DIM(gb, 0) != cols:
        raise ValueError(f"grad_bias: shape {_shape(gb)} does not match ({cols},)")
    _act_code(act)
    if cols == 0:
        return
    with nogil:
        if t == cnp.NPY_FLOAT32:
            _act_grad_bias(<const float*>cnp.PyArray_DATA(a),
                           <const float*>cnp.PyArray_DATA(d),
                           <float*>cnp.PyArray_DATA(dz), <float*>cnp.PyArray_DATA(gb),
                           rows, cols, act)
        else:
            _act_grad_bias(<const double*>cnp.PyArray_DATA(a),
                           <const double*>cnp.PyArray_DATA(d),
                           <double*>cnp.PyArray_DATA(dz), <double*>cnp.PyArray_DATA(gb),
                           rows, cols, act)


# ------------------------------------------------------------ finiteness
# A float is NaN or infinite exactly when its exponent bits are all ones.
# The test runs on the bits as unsigned integers and folds with min, which
# vectorizes (a float sum would not, without -ffast-math): one read of the
# array, no temporary, no branch per element.

cdef bint _finite_f32(const unsigned int* x, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef unsigned int low = 0xffffffffu, m
    for i in range(n):
        m = (x[i] & 0x7f800000u) ^ 0x7f800000u
        low = m if m < low else low
    return low != 0


cdef bint _finite_f64(const unsigned long long* x, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef unsigned long long low = 0xffffffffffffffffull, m
    for i in range(n):
        m = (x[i] & 0x7ff0000000000000ull) ^ 0x7ff0000000000000ull
        low = m if m < low else low
    return low != 0


def all_finite(cnp.ndarray a):
    """Whether no element of ``a`` is NaN or infinite."""
    cdef int t = _dtype_of(a, "a")
    _check(a, "a", t, False)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(a)
    cdef bint ok
    with nogil:
        if t == cnp.NPY_FLOAT32:
            ok = _finite_f32(<const unsigned int*>cnp.PyArray_DATA(a), n)
        else:
            ok = _finite_f64(<const unsigned long long*>cnp.PyArray_DATA(a), n)
    return ok


# ------------------------------------------------------------ wire codecs
# float32 <-> 16-bit wire formats (dbnode_math.h). Encoding may fold in an
# error-feedback residual: what rounding loses from one push is added to the
# next, so over time nothing is lost.

cdef enum:
    BF16 = 1
    F16 = 2


cdef void _encode(const float* x, unsigned short* q, float* r, Py_ssize_t n,
                  int codec) noexcept nogil:
    cdef Py_ssize_t i
    cdef float v, d
    if r == NULL:
        if codec == BF16:
            for i in range(n):
                q[i] = dbn_to_bf16(x[i])
        else:
            for i in range(n):
                q[i] = dbn_to_f16(x[i])
    elif codec == BF16:
        for i in range(n):
            v = x[i] + r[i]
            q[i] = dbn_to_bf16(v)
            d = v - dbn_from_bf16(q[i])
            r[i] = d if d == d else 0  # nothing carried from an inf or NaN
    else:
        for i in range(n):
            v = x[i] + r[i]
            q[i] = dbn_to_f16(v)
            d = v - dbn_from_f16(q[i])
            r[i] = d if d == d else 0


cdef void _decode(const unsigned short* q, float* x, Py_ssize_t n, int codec) noexcept nogil:
    cdef Py_ssize_t i
    if codec == BF16:
        for i in range(n):
            x[i] = dbn_from_bf16(q[i])
    else:
        for i in range(n):
            x[i] = dbn_from_f16(q[i])


cdef void _par_encode(const float* x, unsigned short* q, float* r, Py_ssize_t n,
                      int codec) noexcept nogil:
    cdef Py_ssize_t k, lo, nk = _threads_for(n * COST_SIMPLE), step = (n + nk - 1) // nk
    if nk == 1:
        _encode(x, q, r, n, codec)
        return
    for k in prange(nk, schedule="static", num_threads=nk):
        lo = k * step
        if lo < n:
            _encode(x + lo, q + lo, NULL if r == NULL else r + lo, min(step, n - lo), codec)


cdef void _par_decode(const unsigned short* q, float* x, Py_ssize_t n, int codec) noexcept nogil:
    cdef Py_ssize_t k, lo, nk = _threads_for(n * COST_SIMPLE), step = (n + nk - 1) // nk
    if nk == 1:
        _decode(q, x, n, codec)
        return
    for k in prange(nk, schedule="static", num_threads=nk):
        lo = k * step
        if lo < n:
            _decode(q + lo, x + lo, min(step, n - lo), codec)


cdef inline int _codec(int codec) except -1:
    if codec != BF16 and codec != F16:
        raise ValueError(f"unknown wire codec {codec}")
    return codec


cdef inline int _bits16(cnp.ndarray a, str name, bint writable) except -1:
    if cnp.PyArray_ITEMSIZE(a) != 2 or cnp.PyArray_TYPE(a) not in (cnp.NPY_UINT16, cnp.NPY_FLOAT16):
        raise TypeError(f"{name}: need the 16-bit wire words (uint16), got {a.dtype}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"{name}: array must be C-contiguous")
    if writable and not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError(f"{name}: output array is read-only")
    return 0


def encode(cnp.ndarray x, cnp.ndarray q, residual, int codec):
    """``q = codec(x + residual)`` as 16-bit words; then ``residual`` (if
    not None, updated in place) keeps what the rounding lost."""
    _codec(codec)
    _check(x, "x", cnp.NPY_FLOAT32, False)
    _bits16(q, "q", True)
    if cnp.PyArray_SIZE(q) != cnp.PyArray_SIZE(x):
        raise ValueError(f"q: {cnp.PyArray_SIZE(q)} words for {cnp.PyArray_SIZE(x)} values")
    cdef float* r = NULL
    cdef cnp.ndarray res
    if residual is not None:
        res = residual
        _check(res, "residual", cnp.NPY_FLOAT32, True)
        _same_shape(x, res, "residual")
        r = <float*>cnp.PyArray_DATA(res)
    cdef Py_ssize_t n = cnp.PyArray_SIZE(x)
    with nogil:
        _par_encode(<const float*>cnp.PyArray_DATA(x), <unsigned short*>cnp.PyArray_DATA(q),
                    r, n, codec)


def decode(cnp.ndarray q, cnp.ndarray x, int codec):
    """``x = float32(q)`` from 16-bit words of ``codec``."""
    _codec(codec)
    _bits16(q, "q", False)
    _check(x, "x", cnp.NPY_FLOAT32, True)
    if cnp.PyArray_SIZE(q) != cnp.PyArray_SIZE(x):
        raise ValueError(f"x: {cnp.PyArray_SIZE(x)} values for {cnp.PyArray_SIZE(q)} words")
    cdef Py_ssize_t n = cnp.PyArray_SIZE(x)
    with nogil:
        _par_decode(<const unsigned short*>cnp.PyArray_DATA(q), <float*>cnp.PyArray_DATA(x),
                    n, codec)


# ---------------------------------------------------------------- losses
# Both return the loss averaged over the batch (accumulated in double) and
# write its gradient, also divided by the batch size, into ``delta``.

cdef double _squared_error(const floating* p, const floating* t, floating* d,
                           Py_ssize_t rows, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef double acc = 0
    cdef floating r, inv = <floating>1 / <floating>rows
    for i in range(n):
        r = p[i] - t[i]
        acc += <double>r * r
        d[i] = r * inv
    return 0.5 * acc / rows


cdef double _cross_entropy(const floating* p, const Py_ssize_t* y, floating* d,
                           Py_ssize_t rows, Py_ssize_t cols) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef double acc = 0
    cdef floating inv = <floating>1 / <floating>rows, pi, tiny
    # The smallest positive normal keeps log finite when a probability
    # underflowed to 0 (float32 softmax of a confident wrong answer).
    if floating is float:
        tiny = FLT_MIN
    else:
        tiny = DBL_MIN
    for i in range(rows):
        for j in range(cols):
            d[i * cols + j] = p[i * cols + j] * inv
        pi = p[i * cols + y[i]]
        acc -= _log(pi if pi > tiny else tiny)
        d[i * cols + y[i]] -= inv
    return acc / rows


cdef double _binary_cross_entropy(const floating* p, const floating* t, floating* d,
                                  Py_ssize_t rows, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef double acc = 0
    cdef floating inv = <floating>1 / <floating>rows, pi, qi, tiny
    # As in _cross_entropy: a saturated sigmoid (p rounded to 0 or 1) keeps
    # its log finite.
    if floating is float:
        tiny = FLT_MIN
    else:
        tiny = DBL_MIN
    for i in range(n):
        pi = p[i]
        qi = 1 - pi
        acc -= <double>t[i] * _log(pi if pi > tiny else tiny) + \
            (1 - <double>t[i]) * _log(qi if qi > tiny else tiny)
        d[i] = (pi - t[i]) * inv
    return acc / rows


def sigmoid_cross_entropy(cnp.ndarray p, cnp.ndarray t, cnp.ndarray delta):
    """Loss ``-sum(t log p + (1 - t) log(1 - p)) / batch`` of sigmoid outputs
    ``p``; ``delta = (p - t) / batch``, the gradient with respect to the
    sigmoid's *input*."""
    cdef int ty = _dtype_of(p, "probabilities")
    cdef Py_ssize_t rows, cols
    _rows_cols(p, "probabilities", &rows, &cols)
    _check(p, "probabilities", ty, False)
    _check(t, "target", ty, False)
    _check(delta, "delta", ty, True)
    _same_shape(p, t, "target")
    _same_shape(p, delta, "delta")
    if rows == 0:
        raise ValueError("probabilities: empty batch")
    cdef double loss
    with nogil:
        if ty == cnp.NPY_FLOAT32:
            loss = _binary_cross_entropy(<const float*>cnp.PyArray_DATA(p),
                                         <const float*>cnp.PyArray_DATA(t),
                                         <float*>cnp.PyArray_DATA(delta), rows, rows * cols)
        else:
            loss = _binary_cross_entropy(<const double*>cnp.PyArray_DATA(p),
                                         <const double*>cnp.PyArray_DATA(t),
                                         <double*>cnp.PyArray_DATA(delta), rows, rows * cols)
    return loss


def squared_error(cnp.ndarray p, cnp.ndarray t, cnp.ndarray delta):
    """Loss ``0.5 * sum((t - p)**2) / batch``; ``delta = (p - t) / batch``.

    ``delta`` is the gradient with respect to the prediction ``p``.
    """
    cdef int ty = _dtype_of(p, "prediction")
    cdef Py_ssize_t rows, cols
    _rows_cols(p, "prediction", &rows, &cols)
    _check(p, "prediction", ty, False)
    _check(t, "target", ty, False)
    _check(delta, "delta", ty, True)
    _same_shape(p, t, "target")
    _same_shape(p, delta, "delta")
    if rows == 0:
        raise ValueError("prediction: empty batch")
    cdef double loss
    with nogil:
        if ty == cnp.NPY_FLOAT32:
            loss = _squared_error(<const float*>cnp.PyArray_DATA(p),
                                  <const float*>cnp.PyArray_DATA(t),
                                  <float*>cnp.PyArray_DATA(delta), rows, rows * cols)
        else:
            loss = _squared_error(<const double*>cnp.PyArray_DATA(p),
                                  <const double*>cnp.PyArray_DATA(t),
                                  <double*>cnp.PyArray_DATA(delta), rows, rows * cols)
    return loss


def softmax_cross_entropy(cnp.ndarray p, cnp.ndarray labels, cnp.ndarray delta):
    """Loss ``-mean(log p[i, labels[i]])`` of softmax probabilities ``p``;
    ``delta = (p - onehot(labels)) / batch``, the gradient with respect to
    the softmax's *input* (the two derivatives cancel to this)."""
    cdef int ty = _dtype_of(p, "probabilities")
    cdef Py_ssize_t rows, cols, i
    _rows_cols(p, "probabilities", &rows, &cols)
    _check(p, "probabilities", ty, False)
    _check(delta, "delta", ty, True)
    _same_shape(p, delta, "delta")
    if cnp.PyArray_TYPE(labels) != cnp.NPY_INTP or not cnp.PyArray_IS_C_CONTIGUOUS(labels):
        raise TypeError(f"labels: expected a C-contiguous intp array, got {labels.dtype}")
    if cnp.PyArray_NDIM(labels) != 1 or cnp.PyArray_DIM(labels, 0) != rows:
        raise ValueError(f"labels: shape {_shape(labels)} does not match ({rows},)")
    if rows == 0:
        raise ValueError("probabilities: empty batch")
    cdef const Py_ssize_t* y = <const Py_ssize_t*>cnp.PyArray_DATA(labels)
    for i in range(rows):
        if y[i] < 0 or y[i] >= cols:
            raise ValueError(f"labels[{i}] = {y[i]} is not a class in [0, {cols})")
    cdef double loss
    with nogil:
        if ty == cnp.NPY_FLOAT32:
            loss = _cross_entropy(<const float*>cnp.PyArray_DATA(p), y,
                                  <float*>cnp.PyArray_DATA(delta), rows, cols)
        else:
            loss = _cross_entropy(<const double*>cnp.PyArray_DATA(p), y,
                                  <double*>cnp.PyArray_DATA(delta), rows, cols)
    return loss
