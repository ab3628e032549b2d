"""The compiled kernels (``dbnode.kernels``) held to their numpy twin
(``dbnode.reference``) and to finite differences.

Every kernel runs over dtype x memory layout x read-only input x shape
(empty, one element, odd sizes, tens of thousands of elements), and, in
explicit cases, past the size where the compiled loops split work across
OpenMP threads, with 1 and 3 threads. Results are checked where they land:
in the caller's ``out`` arrays and in the caller's in-place arrays, each of
which lives inside a larger buffer with sentinels on both sides (a write past
either end shows) and starts NaN-filled (an element the kernel never wrote
shows).
"""

import inspect
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dbnode import kernels as K
from dbnode import reference as R

DTYPES = [np.dtype(np.float32), np.dtype(np.float64)]
ACTIVATIONS = ["linear", "sigmoid", "tanh", "relu", "softmax"]
KERNELS = [
    "sgd",
    "momentum",
    "adagrad",
    "accumulate",
    "activation",
    "activation_grad",
    "squared_error",
    "softmax_cross_entropy",
    "sigmoid_cross_entropy",
    "adam",
    "dense_forward",
    "dense_backward",
    "all_finite",
]

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# (rtol, atol) per dtype for elementwise results. atol is scaled by the
# magnitude of the expected values and, for reductions, by the number of
# summed terms (the compiled loops and numpy sum in different orders).
TOL = {np.dtype(np.float32): (2e-5, 2e-6), np.dtype(np.float64): (1e-12, 1e-14)}
LOSS_RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}


def assert_close(got, want, dtype, terms=1):
    rtol, atol = TOL[np.dtype(dtype)]
    want = np.asarray(want)
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale * terms)


# ------------------------------------------------------------------ arrays

LAYOUTS = ["C", "T", "strided", "reversed"]


def layout(v, kind):
    """An array equal to ``v`` (values and dtype) in the memory layout ``kind``:
    C-contiguous, a transposed view, every other element of a wider buffer,
    or negative strides."""
    if v.ndim == 0 or kind == "C":
        return v.copy()
    if kind == "T":
        return np.ascontiguousarray(v.T).T
    if kind == "strided":
        a = np.zeros(v.shape[:-1] + (2 * v.shape[-1],), v.dtype)[..., ::2]
    elif kind == "reversed":
        a = np.zeros_like(v)[::-1]
    else:
        raise AssertionError(kind)
    a[...] = v
    return a


def inp(v, kind="C", readonly=False):
    a = layout(v, kind)
    if readonly:
        a.flags.writeable = False
    return a


SENTINEL = 7777.0
PAD = 5


class Guarded:
    """A C-contiguous array inside a larger buffer with sentinels on both sides."""

    def __init__(self, shape, dtype, fill=np.nan):
        self.n = math.prod(shape)
        self.buf = np.full(self.n + 2 * PAD, SENTINEL, dtype)
        self.arr = self.buf[PAD : PAD + self.n].reshape(shape)
        assert self.arr.flags.c_contiguous
        assert self.n == 0 or np.shares_memory(self.arr, self.buf)
        self.arr[...] = fill

    @classmethod
    def of(cls, values):
        return cls(values.shape, values.dtype, fill=values)

    def assert_intact(self):
        assert (self.buf[:PAD] == SENTINEL).all(), "write before the start of the array"
        assert (self.buf[PAD + self.n :] == SENTINEL).all(), "write past the end of the array"


def normal(rng, shape, dtype, scale=1.0):
    return np.asarray(scale * rng.standard_normal(shape), dtype=dtype)


# -------------------------------------------------------------- strategies

seeds = st.integers(0, 2**32 - 1)
dtypes = st.sampled_from(DTYPES)
layouts = st.sampled_from(LAYOUTS)
activations = st.sampled_from(ACTIVATIONS)

# Sizes around 32768 elements (2**15), an earlier thread threshold, stay as
# odd moderately large cases; the threaded path has its own tests below.
BIG_2D = [(128, 256), (1, 32769), (32769, 1), (181, 181), (257, 131)]


def rows_cols(min_rows=0):
    return st.one_of(
        st.tuples(st.integers(min_rows, 9), st.integers(1, 9)),
        st.tuples(st.integers(max(min_rows, 1), 70), st.integers(1, 70)),
        st.sampled_from(BIG_2D),
    )


# Any ndim for the optimizers, 0-d and empty included.
any_shape = st.one_of(
    st.lists(st.integers(0, 7), max_size=3).map(tuple),
    st.sampled_from([(1,), (32767,), (32768,), (32769,), (3, 11, 997), (40001,)]),
)

# (batch, n_in, n_out).
# Layers from K.TRANSPOSED_FORWARD_MIN (64) outputs wide run their forward GEMM
# transposed when the batch has more than one row: 63 and 64 straddle that.
dense_shapes = st.tuples(
    st.one_of(st.integers(0, 8), st.just(300)),
    st.integers(1, 9),
    st.one_of(st.integers(1, 9), st.sampled_from([63, 64, 111])),
)


# ------------------------------------------------------------ the surface


def test_every_activation_is_covered():
    assert sorted(K.ACTIVATIONS) == sorted(ACTIVATIONS)


@pytest.mark.parametrize("name", KERNELS)
def test_reference_twin_has_the_same_signature(name):
    def params(f):
        return [(p.name, p.kind, p.default) for p in inspect.signature(f).parameters.values()]

    assert params(getattr(K, name)) == params(getattr(R, name))


# -------------------------------------------------------------- optimizers


def call_optimizer(mod, name, w, g, state, hp):
    if name == "sgd":
        return mod.sgd(w, g, hp["lr"])
    if name == "momentum":
        return mod.momentum(w, g, state, hp["lr"], hp["mu"])
    if name == "adagrad":
        return mod.adagrad(w, g, state, hp["lr"], hp["eps"])
    if name == "accumulate":
        return mod.accumulate(w, g, hp["scale"])
    raise AssertionError(name)


OPTIMIZERS = ["sgd", "momentum", "adagrad", "accumulate"]
hyperparameters = st.fixed_dictionaries(
    {
        "lr": st.floats(1e-3, 1.0),
        "mu": st.floats(0.0, 0.99),
        "eps": st.sampled_from([1e-8, 1e-6, 0.1]),
        "scale": st.one_of(st.floats(-2.0, -0.1), st.floats(0.1, 2.0)),
    }
)


def optimizer_state(rng, name, shape, dtype):
    if name == "momentum":
        return normal(rng, shape, dtype)
    if name == "adagrad":  # a running sum of squares is never negative
        return np.asarray(rng.random(shape), dtype=dtype)
    return None


@pytest.mark.parametrize("name", OPTIMIZERS)
@SETTINGS
@given(
    shape=any_shape,
    dtype=dtypes,
    g_layout=layouts,
    g_readonly=st.booleans(),
    hp=hyperparameters,
    seed=seeds,
)
def test_optimizer_matches_reference(name, shape, dtype, g_layout, g_readonly, hp, seed):
    rng = np.random.default_rng(seed)
    w0, g0 = normal(rng, shape, dtype), normal(rng, shape, dtype)
    s0 = optimizer_state(rng, name, shape, dtype)

    w_ref, s_ref = w0.copy(), None if s0 is None else s0.copy()
    call_optimizer(R, name, w_ref, g0.copy(), s_ref, hp)

    w = Guarded.of(w0)
    s = None if s0 is None else Guarded.of(s0)
    g = inp(g0, g_layout, g_readonly)
    result = call_optimizer(K, name, w.arr, g, None if s is None else s.arr, hp)

    assert result is None
    # The caller's own arrays hold the update (the guarded buffer shares
    # their memory), in their dtype.
    assert w.arr.dtype == dtype
    assert_close(w.arr, w_ref, dtype)
    w.assert_intact()
    if s is not None:
        assert s.arr.dtype == dtype
        assert_close(s.arr, s_ref, dtype)
        s.assert_intact()
    np.testing.assert_array_equal(g, g0)  # the gradient is an input: untouched


@SETTINGS
@given(shape=any_shape, dtype=dtypes, g_layout=layouts, hp=hyperparameters, seed=seeds,
       step=st.integers(1, 10_000), b1=st.floats(0.0, 0.99), b2=st.floats(0.9, 0.9999))  # fmt: skip
def test_adam_matches_reference(shape, dtype, g_layout, hp, seed, step, b1, b2):
    rng = np.random.default_rng(seed)
    w0, g0 = normal(rng, shape, dtype), normal(rng, shape, dtype)
    m0 = normal(rng, shape, dtype, 0.1)
    v0 = np.asarray(rng.random(shape) * 0.1, dtype=dtype)  # a mean of squares: never negative
    refs = [a.copy() for a in (w0, m0, v0)]
    R.adam(*refs[:1], g0.copy(), *refs[1:], hp["lr"], b1, b2, hp["eps"], step)
    w, m, v = (Guarded.of(a) for a in (w0, m0, v0))
    assert K.adam(w.arr, inp(g0, g_layout, True), m.arr, v.arr, hp["lr"], b1, b2, hp["eps"],
                  step) is None  # fmt: skip
    for got, want in zip((w, m, v), refs):
        assert got.arr.dtype == dtype
        assert_close(got.arr, want, dtype)
        got.assert_intact()
    with pytest.raises(ValueError, match="step must be >= 1"):
        K.adam(w.arr, g0, m.arr, v.arr, 0.1, 0.9, 0.999, 1e-8, 0)


def test_in_place_kernels_update_the_callers_arrays():
    # Exact small cases worked by hand, through aliases of the caller's
    # arrays: an update applied to a copy would leave the aliases stale.
    for dtype in DTYPES:
        w = np.ones(4, dtype)
        alias = w.view()
        K.sgd(w, np.full(4, 2, dtype), 0.25)
        np.testing.assert_array_equal(alias, np.full(4, 0.5, dtype))

        w, v = np.ones(3, dtype), np.full(3, 2, dtype)
        w_alias, v_alias = w[:], v[:]
        K.momentum(w, np.full(3, 4, dtype), v, 0.5, 0.5)  # v = 1 - 2 = -1
        np.testing.assert_array_equal(v_alias, np.full(3, -1, dtype))
        np.testing.assert_array_equal(w_alias, np.zeros(3, dtype))

        w, h = np.ones(2, dtype), np.full(2, 5, dtype)
        w_alias, h_alias = w[:], h[:]
        K.adagrad(w, np.full(2, 2, dtype), h, 3.0, 0.0)  # h = 9, w = 1 - 3*2/3
        np.testing.assert_array_equal(h_alias, np.full(2, 9, dtype))
        np.testing.assert_array_equal(w_alias, np.full(2, -1, dtype))

        acc = np.ones((2, 2), dtype)
        alias = acc.reshape(4)
        K.accumulate(acc, np.full((2, 2), 3, dtype), -2.0)
        np.testing.assert_array_equal(alias, np.full(4, -5, dtype))
        K.accumulate(acc, np.ones((2, 2), dtype))  # default scale 1
        np.testing.assert_array_equal(alias, np.full(4, -4, dtype))


# ------------------------------------------------------------ activations


@SETTINGS
@given(
    shape=rows_cols(),
    dtype=dtypes,
    act=activations,
    z_layout=layouts,
    z_readonly=st.booleans(),
    out_mode=st.sampled_from(["none", "given", "z"]),
    scale=st.sampled_from([1e-3, 1.0, 30.0]),
    seed=seeds,
)
def test_activation_matches_reference(
    shape, dtype, act, z_layout, z_readonly, out_mode, scale, seed
):
    rng = np.random.default_rng(seed)
    z0 = normal(rng, shape, dtype, scale)
    with np.errstate(over="ignore"):  # the twin's sigmoid: exp(-z) -> inf -> 0, fine
        want = R.activation(z0.copy(), act)

    if out_mode == "z":  # documented: out may be z itself
        z = Guarded.of(z0)
        result = K.activation(z.arr, act, out=z.arr)
        assert result is z.arr
        z.assert_intact()
    else:
        z = inp(z0, z_layout, z_readonly)
        if out_mode == "given":
            out = Guarded(shape, dtype)
            result = K.activation(z, act, out=out.arr)
            assert result is out.arr
            out.assert_intact()
        else:
            result = K.activation(z, act)
        np.testing.assert_array_equal(z, z0)
    assert isinstance(result, np.ndarray)
    assert result.dtype == dtype and result.shape == shape
    assert_close(result, want, dtype, terms=shape[1] if act == "softmax" else 1)


@SETTINGS
@given(
    shape=rows_cols(),
    dtype=dtypes,
    act=activations,
    a_layout=layouts,
    d_layout=layouts,
    readonly=st.booleans(),
    out_mode=st.sampled_from(["none", "given", "delta"]),
    seed=seeds,
)
def test_activation_grad_matches_reference(
    shape, dtype, act, a_layout, d_layout, readonly, out_mode, seed
):
    rng = np.random.default_rng(seed)
    a0 = R.activation(normal(rng, shape, dtype, 2.0), act)  # a real activation output
    d0 = normal(rng, shape, dtype)
    want = R.activation_grad(a0, d0.copy(), act)
    a = inp(a0, a_layout, readonly)

    if out_mode == "delta":  # dz written over the incoming delta
        d = Guarded.of(d0)
        result = K.activation_grad(a, d.arr, act, out=d.arr)
        assert result is d.arr
        d.assert_intact()
    else:
        d = inp(d0, d_layout, readonly)
        if out_mode == "given":
            out = Guarded(shape, dtype)
            result = K.activation_grad(a, d, act, out=out.arr)
            assert result is out.arr
            out.assert_intact()
        else:
            result = K.activation_grad(a, d, act)
        np.testing.assert_array_equal(d, d0)
    np.testing.assert_array_equal(a, a0)
    assert result.dtype == dtype and result.shape == shape
    assert_close(result, want, dtype, terms=shape[1] if act == "softmax" else 1)


# ----------------------------------------------------------------- losses


@SETTINGS
@given(
    shape=rows_cols(min_rows=1),
    dtype=dtypes,
    p_layout=layouts,
    t_layout=layouts,
    readonly=st.booleans(),
    flat_targets=st.booleans(),
    give_delta=st.booleans(),
    seed=seeds,
)
def test_squared_error_matches_reference(
    shape, dtype, p_layout, t_layout, readonly, flat_targets, give_delta, seed
):
    rng = np.random.default_rng(seed)
    p0, t0 = normal(rng, shape, dtype), normal(rng, shape, dtype)
    if flat_targets and shape[1] == 1:
        t0 = t0.reshape(shape[0])  # (batch,) targets of a single-output network
    want_loss, want_delta = R.squared_error(p0.copy(), t0.copy())

    p, t = inp(p0, p_layout, readonly), inp(t0, t_layout, readonly)
    delta = Guarded(shape, dtype) if give_delta else None
    loss, result = K.squared_error(p, t, None if delta is None else delta.arr)

    assert type(loss) is float
    assert loss == pytest.approx(want_loss, rel=LOSS_RTOL[dtype])
    if delta is not None:
        assert result is delta.arr
        delta.assert_intact()
    assert result.dtype == dtype and result.shape == shape
    assert_close(result, want_delta, dtype)
    np.testing.assert_array_equal(p, p0)
    np.testing.assert_array_equal(t, t0)


def labels_as(y, form):
    if form == "intp":
        return y.astype(np.intp)
    if form == "int32":
        return y.astype(np.int32)
    if form == "strided":
        return layout(y.astype(np.int64), "strided")
    if form == "readonly":
        return inp(y.astype(np.intp), "C", readonly=True)
    if form == "list":
        return [int(v) for v in y]
    raise AssertionError(form)


@SETTINGS
@given(
    shape=rows_cols(min_rows=1),
    dtype=dtypes,
    p_layout=layouts,
    readonly=st.booleans(),
    label_form=st.sampled_from(["intp", "int32", "strided", "readonly", "list"]),
    give_delta=st.booleans(),
    scale=st.sampled_from([1.0, 10.0]),
    seed=seeds,
)
def test_softmax_cross_entropy_matches_reference(
    shape, dtype, p_layout, readonly, label_form, give_delta, scale, seed
):
    rng = np.random.default_rng(seed)
    p0 = R.activation(normal(rng, shape, dtype, scale), "softmax")
    y = rng.integers(0, shape[1], shape[0])
    want_loss, want_delta = R.softmax_cross_entropy(p0.copy(), y.copy())

    p = inp(p0, p_layout, readonly)
    labels = labels_as(y, label_form)
    delta = Guarded(shape, dtype) if give_delta else None
    loss, result = K.softmax_cross_entropy(p, labels, None if delta is None else delta.arr)

    assert type(loss) is float
    assert loss == pytest.approx(want_loss, rel=LOSS_RTOL[dtype], abs=1e-6)
    if delta is not None:
        assert result is delta.arr
        delta.assert_intact()
    assert result.dtype == dtype and result.shape == shape
    assert_close(result, want_delta, dtype)
    np.testing.assert_array_equal(p, p0)
    np.testing.assert_array_equal(np.asarray(labels), y)


# ------------------------------------------------------------ dense layer


@SETTINGS
@given(
    shape=dense_shapes,
    dtype=dtypes,
    act=activations,
    x_layout=layouts,
    w_layout=layouts,
    readonly=st.booleans(),
    give_out=st.booleans(),
    give_scratch=st.booleans(),
    seed=seeds,
)
def test_dense_forward_matches_reference(
    shape, dtype, act, x_layout, w_layout, readonly, give_out, give_scratch, seed
):
    batch, n_in, n_out = shape
    rng = np.random.default_rng(seed)
    x0 = normal(rng, (batch, n_in), dtype)
    w0 = normal(rng, (n_out, n_in), dtype, 0.5)
    b0 = normal(rng, (n_out,), dtype, 0.5)
    want = R.dense_forward(x0, w0, b0, act)

    # The bias stays contiguous here: a strided bias has its own test below.
    x, w, b = inp(x0, x_layout, readonly), inp(w0, w_layout, readonly), inp(b0, "C", readonly)
    out = Guarded((batch, n_out), dtype) if give_out else None
    # Documented: any C-contiguous buffer of out's size, here a flat one.
    scratch = Guarded((batch * n_out,), dtype) if give_scratch else None
    result = K.dense_forward(
        x,
        w,
        b,
        act,
        None if out is None else out.arr,
        scratch=None if scratch is None else scratch.arr,
    )

    if out is not None:
        assert result is out.arr
        out.assert_intact()
    if scratch is not None:
        scratch.assert_intact()
        assert not np.shares_memory(result, scratch.buf)
    assert result.dtype == dtype and result.shape == (batch, n_out)
    assert_close(result, want, dtype, terms=n_in + (n_out if act == "softmax" else 0))
    for got, orig in ((x, x0), (w, w0), (b, b0)):
        np.testing.assert_array_equal(got, orig)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias_layout", ["strided", "reversed"])
@pytest.mark.parametrize("n_out", [5, 70])  # direct and transposed GEMM
def test_dense_forward_accepts_a_non_contiguous_bias(dtype, bias_layout, n_out):
    # Inputs may be any layout (module docstring of dbnode.kernels).
    rng = np.random.default_rng(7)
    x0, w0 = normal(rng, (3, 4), dtype), normal(rng, (n_out, 4), dtype)
    b0 = normal(rng, (n_out,), dtype)
    result = K.dense_forward(x0, w0, inp(b0, bias_layout), "tanh")
    assert_close(result, R.dense_forward(x0, w0, b0, "tanh"), dtype, terms=4)


@SETTINGS
@given(
    shape=dense_shapes,
    dtype=dtypes,
    act=activations,
    x_layout=layouts,
    a_layout=layouts,
    d_layout=layouts,
    w_layout=layouts,
    readonly=st.booleans(),
    give_outs=st.booleans(),
    dz_mode=st.sampled_from(["none", "given", "delta"]),
    need_delta_below=st.booleans(),
    seed=seeds,
)
def test_dense_backward_matches_reference(
    shape,
    dtype,
    act,
    x_layout,
    a_layout,
    d_layout,
    w_layout,
    readonly,
    give_outs,
    dz_mode,
    need_delta_below,
    seed,
):
    batch, n_in, n_out = shape
    rng = np.random.default_rng(seed)
    x0 = normal(rng, (batch, n_in), dtype)
    w0 = normal(rng, (n_out, n_in), dtype, 0.5)
    a0 = R.dense_forward(x0, w0, normal(rng, (n_out,), dtype, 0.5), act)
    d0 = normal(rng, (batch, n_out), dtype)
    want_gw, want_gb, want_db = R.dense_backward(
        x0, a0, d0.copy(), w0, act, need_delta_below=need_delta_below
    )
    want_dz = R.activation_grad(a0, d0, act)

    x, a, w = (
        inp(x0, x_layout, readonly),
        inp(a0, a_layout, readonly),
        inp(w0, w_layout, readonly),
    )
    outs = {}
    if give_outs:
        outs["grad_weight"] = Guarded((n_out, n_in), dtype)
        outs["grad_bias"] = Guarded((n_out,), dtype)
        if need_delta_below:
            outs["delta_below"] = Guarded((batch, n_in), dtype)
    if dz_mode == "delta":  # documented: dz may be delta itself
        delta = Guarded.of(d0)
        outs["dz"] = delta
        d = delta.arr
    else:
        d = inp(d0, d_layout, readonly)
        if dz_mode == "given":
            outs["dz"] = Guarded((batch, n_out), dtype)
    kwargs = {k: g.arr for k, g in outs.items()}
    result = K.dense_backward(x, a, d, w, act, need_delta_below=need_delta_below, **kwargs)

    assert isinstance(result, tuple) and len(result) == 3
    gw, gb, db = result
    for key, got in (("grad_weight", gw), ("grad_bias", gb), ("delta_below", db)):
        if key in outs:
            assert got is outs[key].arr, key
    for g in outs.values():
        g.assert_intact()
    assert gw.dtype == dtype and gw.shape == (n_out, n_in)
    assert gb.dtype == dtype and gb.shape == (n_out,)
    terms = max(batch, 1) * (n_out if act == "softmax" else 1)
    assert_close(gw, want_gw, dtype, terms=terms)
    assert_close(gb, want_gb, dtype, terms=terms)
    if need_delta_below:
        assert db.dtype == dtype and db.shape == (batch, n_in)
        assert_close(db, want_db, dtype, terms=n_out * (n_out if act == "softmax" else 1))
    else:
        assert db is None
    if "dz" in outs:
        assert_close(outs["dz"].arr, want_dz, dtype, terms=n_out if act == "softmax" else 1)
    for got, orig in ((x, x0), (a, a0), (w, w0)):
        np.testing.assert_array_equal(got, orig)
    if dz_mode != "delta":
        np.testing.assert_array_equal(d, d0)


# ------------------------------------------------------- the threaded path

# csrc/_kernels.pyx splits a pass across OpenMP threads once its work, in
# elements weighted by cost (1 for SGD, axpy and relu, 6 for Adagrad, 8 for
# the exp-based activations), reaches PARALLEL_MIN = 1 << 20. About 100k
# elements stays serial for the cheap kernels; LARGE_N crosses the threshold
# for every kernel. Both counts are odd, so per-thread spans are uneven.
LARGE = {
    "100k": (100_003, (317, 331), (1000, 37, 101)),
    "1M": ((1 << 20) + 3, (1031, 1021), (4099, 37, 257)),
}


@pytest.fixture(params=[1, 3], ids=lambda n: f"threads={n}")
def threads(request):
    before = K.max_threads()
    K.set_threads(request.param)
    if K.OPENMP:
        assert K.max_threads() == request.param
    yield request.param
    K.set_threads(before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", LARGE)
def test_large_arrays_match_reference(dtype, size, threads):
    n, shape, (batch, n_in, n_out) = LARGE[size]
    rng = np.random.default_rng(100_000)
    hp = {"lr": 0.1, "mu": 0.9, "eps": 1e-8, "scale": 0.5}
    for name in OPTIMIZERS:
        w0, g0 = normal(rng, (n,), dtype), normal(rng, (n,), dtype)
        s0 = optimizer_state(rng, name, (n,), dtype)
        w_ref, s_ref = w0.copy(), None if s0 is None else s0.copy()
        call_optimizer(R, name, w_ref, g0, s_ref, hp)
        w, s = Guarded.of(w0), None if s0 is None else Guarded.of(s0)
        call_optimizer(K, name, w.arr, layout(g0, "strided"), None if s is None else s.arr, hp)
        assert_close(w.arr, w_ref, dtype)
        w.assert_intact()
        if s is not None:
            assert_close(s.arr, s_ref, dtype)
            s.assert_intact()

    for act in ACTIVATIONS:
        terms = shape[1] if act == "softmax" else 1
        z0 = normal(rng, shape, dtype, 3.0)
        out = Guarded(shape, dtype)
        assert K.activation(layout(z0, "T"), act, out=out.arr) is out.arr
        assert_close(out.arr, R.activation(z0, act), dtype, terms=terms)
        out.assert_intact()
        d0 = normal(rng, shape, dtype)
        grad = Guarded(shape, dtype)
        assert K.activation_grad(out.arr, d0, act, out=grad.arr) is grad.arr
        assert_close(grad.arr, R.activation_grad(out.arr, d0, act), dtype, terms=terms)
        grad.assert_intact()

    x0 = normal(rng, (batch, n_in), dtype)
    w0 = normal(rng, (n_out, n_in), dtype, 0.3)
    b0 = normal(rng, (n_out,), dtype, 0.3)
    for act in ACTIVATIONS:
        a = K.dense_forward(x0, w0, b0, act)
        assert a.dtype == dtype
        assert_close(a, R.dense_forward(x0, w0, b0, act), dtype, terms=n_in + n_out)
        d0 = normal(rng, (batch, n_out), dtype)
        got = K.dense_backward(x0, a, d0, w0, act)
        want = R.dense_backward(x0, a, d0, w0, act)
        for g, w_ in zip(got, want):
            assert g.dtype == dtype
            assert_close(g, w_, dtype, terms=batch)

    t0 = normal(rng, (batch, n_out), dtype)
    p0 = K.dense_forward(x0, w0, b0, "softmax")
    loss, delta = K.squared_error(p0, t0)
    want_loss, want_delta = R.squared_error(p0, t0)
    assert loss == pytest.approx(want_loss, rel=LOSS_RTOL[dtype])
    assert_close(delta, want_delta, dtype)
    y = rng.integers(0, n_out, batch)
    loss, delta = K.softmax_cross_entropy(p0, y)
    want_loss, want_delta = R.softmax_cross_entropy(p0, y)
    assert loss == pytest.approx(want_loss, rel=LOSS_RTOL[dtype])
    assert_close(delta, want_delta, dtype)


def run_with_threads(counts, fn):
    before = K.max_threads()
    try:
        results = []
        for t in counts:
            K.set_threads(t)
            results.append(fn())
        return results
    finally:
        K.set_threads(before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_threaded_optimizers_equal_serial_bit_for_bit(name, dtype):
    # Each element is one independent update: splitting the array across
    # threads must not change a single bit, nor skip or repeat an element.
    rng = np.random.default_rng(3)
    n = LARGE["1M"][0] + 4
    w0, g0 = normal(rng, (n,), dtype), normal(rng, (n,), dtype)
    s0 = optimizer_state(rng, name, (n,), dtype)
    hp = {"lr": 0.01, "mu": 0.9, "eps": 1e-8, "scale": -0.3}

    def step():
        w, s = w0.copy(), None if s0 is None else s0.copy()
        call_optimizer(K, name, w, g0, s, hp)
        return w, s

    results = run_with_threads((1, 3, 4), step)
    for w, s in results[1:]:
        np.testing.assert_array_equal(w, results[0][0])
        if s is not None:
            np.testing.assert_array_equal(s, results[0][1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_threaded_activations_equal_serial_bit_for_bit(act, dtype):
    # Rows are independent: the thread count must not change the result.
    rng = np.random.default_rng(4)
    shape = LARGE["1M"][1]
    z0, d0 = normal(rng, shape, dtype, 3.0), normal(rng, shape, dtype)
    b0 = normal(rng, (shape[1],), dtype)
    x0 = np.eye(shape[0], 4, dtype=dtype)  # a GEMM that is exact: x @ w.T picks rows
    w0 = normal(rng, (shape[1], 4), dtype)

    def passes():
        a = K.activation(z0, act)
        return a, K.activation_grad(a, d0, act), K.dense_forward(x0, w0, b0, act)

    results = run_with_threads((1, 3), passes)
    for got, want in zip(results[1], results[0]):
        np.testing.assert_array_equal(got, want)


# ---------------------------------------------------- finite differences

# Central differences: truncation error ~ h**2, rounding error ~ eps * |L| / h;
# at 1e-5 both stay near 1e-9 for the losses of order 10 used here.
FD_H = 1e-5


def numerical_grad(f, v):
    """Central differences of the scalar ``f()`` with respect to ``v`` (mutated
    in place and restored)."""
    grad = np.zeros_like(v)
    for idx in np.ndindex(v.shape):
        orig = v[idx]
        v[idx] = orig + FD_H
        up = f()
        v[idx] = orig - FD_H
        down = f()
        v[idx] = orig
        grad[idx] = (up - down) / (2 * FD_H)
    return grad


def assert_fd(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


def away_from_zero(rng, shape, margin=0.1):
    # Keeps relu's kink farther than the finite-difference step.
    v = rng.standard_normal(shape)
    return np.sign(v) * (margin + np.abs(v))


MODULES = pytest.mark.parametrize("mod", [K, R], ids=["kernels", "reference"])


@MODULES
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation_grad_is_the_gradient_of_activation(mod, act):
    # activation_grad(a, v) == d<v, act(z)>/dz: the vector-Jacobian product.
    rng = np.random.default_rng(11)
    z = away_from_zero(rng, (3, 5))
    v = rng.standard_normal((3, 5))
    got = mod.activation_grad(mod.activation(z, act), v, act)
    want = numerical_grad(lambda: float(np.sum(v * mod.activation(z, act))), z)
    assert_fd(got, want)


@MODULES
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_activation_grad_is_the_jacobian_vector_product(mod, act):
    # (act(z + h u) - act(z - h u)) / 2h == J u; every Jacobian here (softmax's
    # diag(a) - a a^T included) is symmetric, so activation_grad computes it.
    rng = np.random.default_rng(12)
    z = away_from_zero(rng, (4, 6))
    u = rng.standard_normal((4, 6))
    want = (mod.activation(z + FD_H * u, act) - mod.activation(z - FD_H * u, act)) / (2 * FD_H)
    assert_fd(mod.activation_grad(mod.activation(z, act), u, act), want)


def dense_problem(seed, n_out):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, 3))
    w = rng.standard_normal((n_out, 3))
    b = rng.standard_normal(n_out)
    z = x @ w.T + b
    assert np.min(np.abs(z)) > 1e-4, "pick another seed: a pre-activation sits on relu's kink"
    return rng, x, w, b


# A narrow layer and one wide enough for the transposed forward GEMM.
WIDTHS = pytest.mark.parametrize("n_out", [5, 64])


@MODULES
@WIDTHS
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_dense_backward_with_squared_error_matches_finite_differences(mod, act, n_out):
    rng, x, w, b = dense_problem(21, n_out)
    t = rng.standard_normal((4, n_out))

    def loss():
        return mod.squared_error(mod.dense_forward(x, w, b, act), t)[0]

    a = mod.dense_forward(x, w, b, act)
    _, delta = mod.squared_error(a, t)
    gw, gb, db = mod.dense_backward(x, a, delta, w, act)
    assert_fd(gw, numerical_grad(loss, w))
    assert_fd(gb, numerical_grad(loss, b))
    assert_fd(db, numerical_grad(loss, x))


@MODULES
@WIDTHS
def test_dense_backward_with_softmax_cross_entropy_matches_finite_differences(mod, n_out):
    rng, x, w, b = dense_problem(22, n_out)
    labels = np.array([0, n_out - 1, 2, n_out - 1])

    def loss():
        return mod.softmax_cross_entropy(mod.dense_forward(x, w, b, "softmax"), labels)[0]

    a = mod.dense_forward(x, w, b, "softmax")
    _, delta = mod.softmax_cross_entropy(a, labels)
    # delta is already dL/dz (softmax and cross entropy cancel): "linear".
    gw, gb, db = mod.dense_backward(x, a, delta, w, "linear")
    assert_fd(gw, numerical_grad(loss, w))
    assert_fd(gb, numerical_grad(loss, b))
    assert_fd(db, numerical_grad(loss, x))


@MODULES
@WIDTHS
def test_dense_backward_with_sigmoid_cross_entropy_matches_finite_differences(mod, n_out):
    rng, x, w, b = dense_problem(23, n_out)
    t = (rng.random((x.shape[0], n_out)) > 0.5).astype(x.dtype)

    def loss():
        return mod.sigmoid_cross_entropy(mod.dense_forward(x, w, b, "sigmoid"), t)[0]

    a = mod.dense_forward(x, w, b, "sigmoid")
    _, delta = mod.sigmoid_cross_entropy(a, t)
    # delta is already dL/dz (sigmoid and log-loss cancel): "linear".
    gw, gb, db = mod.dense_backward(x, a, delta, w, "linear")
    assert_fd(gw, numerical_grad(loss, w))
    assert_fd(gb, numerical_grad(loss, b))
    assert_fd(db, numerical_grad(loss, x))


@SETTINGS
@given(shape=any_shape.filter(lambda s: len(s) == 2 and s[0] > 0), dtype=dtypes,
       soft=st.booleans(), seed=seeds)  # fmt: skip
def test_sigmoid_cross_entropy_matches_reference(shape, dtype, soft, seed):
    rng = np.random.default_rng(seed)
    p = R.activation(normal(rng, shape, dtype, 4.0), "sigmoid")
    t = np.asarray(rng.random(shape) if soft else rng.random(shape) > 0.5, dtype=dtype)
    want_loss, want_delta = R.sigmoid_cross_entropy(p.copy(), t.copy())
    loss, delta = K.sigmoid_cross_entropy(p, t)
    assert type(loss) is float
    assert loss == pytest.approx(want_loss, rel=LOSS_RTOL[dtype], abs=1e-6)
    assert delta.dtype == dtype
    assert_close(delta, want_delta, dtype)
    # A saturated output (p rounded to exactly 0 or 1) keeps the loss finite.
    edge = np.array([[0.0, 1.0]], dtype)
    assert np.isfinite(K.sigmoid_cross_entropy(edge, np.array([[1.0, 0.0]], dtype))[0])


def test_float32_training_step_stays_float32():
    # A whole step with Python-float and np.float64 hyperparameters: nothing
    # may silently promote the model to double precision.
    rng = np.random.default_rng(5)
    f32 = np.float32
    x, t = normal(rng, (6, 3), f32), normal(rng, (6, 2), f32)
    w, b = normal(rng, (2, 3), f32), normal(rng, (2,), f32)
    v, h, acc = np.zeros_like(w), np.zeros_like(w), np.zeros_like(w)
    a = K.dense_forward(x, w, b, "sigmoid")
    loss, delta = K.squared_error(a, t)
    gw, gb, db = K.dense_backward(x, a, delta, w, "sigmoid")
    K.accumulate(acc, gw, np.float64(0.5))
    K.sgd(w, gw, np.float64(0.1))
    K.momentum(w, gw, v, np.sqrt(0.01), 0.9)
    K.adagrad(w, gw, h, 0.1)
    p = K.activation(x, "softmax")
    ce, dce = K.softmax_cross_entropy(p, [0, 1, 2, 0, 1, 2])
    for arr in (a, delta, gw, gb, db, w, v, h, acc, p, dce):
        assert arr.dtype == f32
    assert type(loss) is float and type(ce) is float


def ulp_error(got, exact, dtype):
    """|got - exact| in units of the last place of ``exact`` rounded to ``dtype``."""
    spacing = np.spacing(np.abs(exact).astype(dtype)).astype(exact.dtype)
    return np.abs(got.astype(exact.dtype) - exact) / spacing


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exp_based_activations_are_accurate_to_a_few_ulp(dtype):
    # The kernels compute exp themselves (csrc/dbnode_math.h), not through
    # libm: hold sigmoid and softmax to the exact value, computed in a wider
    # type, over the range where the results are normal numbers.
    wide = np.float64 if dtype == np.float32 else np.longdouble
    if np.finfo(wide).nmant <= np.finfo(dtype).nmant:
        pytest.skip("no wider floating type than float64 on this platform")
    hi = 87.0 if dtype == np.float32 else 708.0

    z = np.linspace(-hi, hi, 401 * 499).astype(dtype).reshape(401, 499)
    exact = 1 / (1 + np.exp(-z.astype(wide)))
    assert ulp_error(K.activation(z, "sigmoid"), exact, dtype).max() <= 4

    # Rows [0, -d]: the second probability is exp(-d) / (1 + exp(-d)).
    d = np.linspace(0, hi, 100_001).astype(dtype)
    rows = np.stack([np.zeros_like(d), -d], axis=1)
    e = np.exp(-d.astype(wide))
    p = K.activation(rows, "softmax")
    assert ulp_error(p[:, 1], e / (1 + e), dtype).max() <= 5
    assert ulp_error(p[:, 0], 1 / (1 + e), dtype).max() <= 5


# ------------------------------------------------------------- bad input


def f64(*shape):
    return np.ones(shape)


def f32(*shape):
    return np.ones(shape, np.float32)


def strided(*shape):
    return np.ones(shape[:-1] + (2 * shape[-1],))[..., ::2]


def readonly(*shape):
    a = np.ones(shape)
    a.flags.writeable = False
    return a


P3 = np.full((2, 3), 1 / 3)

# (id, call, the argument the message must name: a regex at its start)
WRONG_DTYPE = [
    ("sgd-w-int", lambda: K.sgd(np.ones(3, np.int64), np.ones(3, np.int64), 0.1), "w"),
    ("sgd-g", lambda: K.sgd(f64(3), f32(3), 0.1), "g"),
    ("sgd-g-f64", lambda: K.sgd(f32(3), f64(3), 0.1), "g"),
    ("momentum-g", lambda: K.momentum(f64(3), f32(3), f64(3), 0.1, 0.9), "g"),
    ("momentum-velocity", lambda: K.momentum(f64(3), f64(3), f32(3), 0.1, 0.9), "velocity"),
    ("adagrad-g", lambda: K.adagrad(f32(3), f64(3), f32(3), 0.1), "g"),
    ("adagrad-sum_sq", lambda: K.adagrad(f64(3), f64(3), f32(3), 0.1), "sum_sq"),
    ("accumulate-g", lambda: K.accumulate(f64(3), f32(3)), "g"),
    (
        "accumulate-acc-f16",
        lambda: K.accumulate(np.ones(3, np.float16), np.ones(3, np.float16)),
        "acc",
    ),
    ("activation-z-int", lambda: K.activation(np.ones((2, 3), np.int64), "tanh"), "z"),
    ("activation-out", lambda: K.activation(f64(2, 3), "tanh", out=f32(2, 3)), "out"),
    ("activation_grad-delta", lambda: K.activation_grad(f64(2, 3), f32(2, 3), "tanh"), "delta"),
    (
        "activation_grad-out",
        lambda: K.activation_grad(f64(2, 3), f64(2, 3), "tanh", out=f32(2, 3)),
        "out",
    ),
    (
        "squared_error-p-int",
        lambda: K.squared_error(np.ones((2, 3), int), f64(2, 3)),
        "(p|prediction)",
    ),
    ("squared_error-t", lambda: K.squared_error(f64(2, 3), f32(2, 3)), "(t|target)"),
    ("squared_error-delta", lambda: K.squared_error(f64(2, 3), f64(2, 3), f32(2, 3)), "delta"),
    (
        "softmax_cross_entropy-p-int",
        lambda: K.softmax_cross_entropy(np.ones((2, 3), int), [0, 1]),
        "(p|probabilities)",
    ),
    (
        "softmax_cross_entropy-delta",
        lambda: K.softmax_cross_entropy(P3, [0, 1], f32(2, 3)),
        "delta",
    ),
    (
        "dense_forward-x-f16",
        lambda: K.dense_forward(np.ones((2, 3), np.float16), f64(4, 3), f64(4), "tanh"),
        "x",
    ),
    (
        "dense_forward-weight",
        lambda: K.dense_forward(f64(2, 3), f32(4, 3), f64(4), "tanh"),
        "weight",
    ),
    ("dense_forward-bias", lambda: K.dense_forward(f32(2, 3), f32(4, 3), f64(4), "tanh"), "bias"),
    (
        "dense_forward-out",
        lambda: K.dense_forward(f64(2, 3), f64(4, 3), f64(4), "tanh", f32(2, 4)),
        "out",
    ),
    (
        "dense_forward-wide-out",
        lambda: K.dense_forward(f64(2, 3), f64(64, 3), f64(64), "tanh", f32(2, 64)),
        "out",
    ),
    (
        "dense_forward-wide-scratch",
        lambda: K.dense_forward(f64(2, 3), f64(64, 3), f64(64), "tanh", scratch=f32(128)),
        "scratch",
    ),
    (
        "dense_backward-a",
        lambda: K.dense_backward(f64(2, 3), f32(2, 4), f64(2, 4), f64(4, 3), "tanh"),
        "a",
    ),
    (
        "dense_backward-delta",
        lambda: K.dense_backward(f64(2, 3), f64(2, 4), f32(2, 4), f64(4, 3), "tanh"),
        "delta",
    ),
    (
        "dense_backward-weight",
        lambda: K.dense_backward(f64(2, 3), f64(2, 4), f64(2, 4), f32(4, 3), "tanh"),
        "weight",
    ),
    (
        "dense_backward-grad_weight",
        lambda: K.dense_backward(
            f64(2, 3), f64(2, 4), f64(2, 4), f64(4, 3), "tanh", grad_weight=f32(4, 3)
        ),
        "grad_weight",
    ),
    (
        "dense_backward-grad_bias",
        lambda: K.dense_backward(
            f64(2, 3), f64(2, 4), f64(2, 4), f64(4, 3), "tanh", grad_bias=f32(4)
        ),
        "grad_bias",
    ),
    (
        "dense_backward-delta_below",
        lambda: K.dense_backward(
            f64(2, 3), f64(2, 4), f64(2, 4), f64(4, 3), "tanh", delta_below=f32(2, 3)
        ),
        "delta_below",
    ),
    (
        "dense_backward-dz",
        lambda: K.dense_backward(f64(2, 3), f64(2, 4), f64(2, 4), f64(4, 3), "tanh", dz=f32(2, 4)),
        "dz",
    ),
]


@pytest.mark.parametrize(
    "call, name", [c[1:] for c in WRONG_DTYPE], ids=[c[0] for c in WRONG_DTYPE]
)
def test_wrong_dtype_is_a_type_error_naming_the_argument(call, name):
    with pytest.raises(TypeError, match=rf"^{name}\b"):
        call()


WRONG_SHAPE = [
    ("sgd-g-size", lambda: K.sgd(f64(2, 3), f64(3), 0.1)),
    ("sgd-g-transposed", lambda: K.sgd(f64(2, 3), f64(3, 2), 0.1)),
    ("momentum-velocity", lambda: K.momentum(f64(3), f64(3), f64(4), 0.1, 0.9)),
    ("adagrad-sum_sq", lambda: K.adagrad(f64(3), f64(3), f64(2), 0.1)),
    ("accumulate-g-size", lambda: K.accumulate(f64(3), f64(4))),
    ("accumulate-g-transposed", lambda: K.accumulate(f64(2, 3), f64(3, 2))),
    ("activation-out", lambda: K.activation(f64(2, 3), "tanh", out=f64(3, 2))),
    ("activation-1d", lambda: K.activation(f64(6), "tanh")),
    ("activation_grad-delta", lambda: K.activation_grad(f64(2, 3), f64(2, 4), "tanh")),
    ("activation_grad-out", lambda: K.activation_grad(f64(2, 3), f64(2, 3), "tanh", f64(2, 2))),
    ("squared_error-t", lambda: K.squared_error(f64(2, 3), f64(2, 4))),
    ("squared_error-t-transposed", lambda: K.squared_error(f64(2, 3), f64(3, 2))),
    ("squared_error-delta", lambda: K.squared_error(f64(2, 3), f64(2, 3), f64(2, 4))),
    ("squared_error-empty-batch", lambda: K.squared_error(f64(0, 3), f64(0, 3))),
    ("softmax_cross_entropy-labels", lambda: K.softmax_cross_entropy(P3, [0, 1, 2])),
    ("softmax_cross_entropy-labels-2d", lambda: K.softmax_cross_entropy(P3, [[0], [1]])),
    ("softmax_cross_entropy-delta", lambda: K.softmax_cross_entropy(P3, [0, 1], f64(3, 2))),
    ("dense_forward-weight", lambda: K.dense_forward(f64(2, 3), f64(4, 5), f64(4), "tanh")),
    ("dense_forward-bias", lambda: K.dense_forward(f64(2, 3), f64(4, 3), f64(5), "tanh")),
    ("dense_forward-out", lambda: K.dense_forward(f64(2, 3), f64(4, 3), f64(4), "tanh", f64(2, 5))),
    (
        "dense_forward-wide-out",
        lambda: K.dense_forward(f64(2, 3), f64(64, 3), f64(64), "tanh", f64(2, 65)),
    ),
    ("dense_forward-wide-bias", lambda: K.dense_forward(f64(2, 3), f64(64, 3), f64(65), "tanh")),
    (
        "dense_forward-wide-scratch",
        lambda: K.dense_forward(f64(2, 3), f64(64, 3), f64(64), "tanh", scratch=f64(127)),
    ),
    (
        "dense_backward-x-rows",
        lambda: K.dense_backward(f64(3, 3), f64(2, 4), f64(2, 4), f64(4, 3), "tanh"),
    ),
    (
        "dense_backward-a-cols",
        lambda: K.dense_backward(f64(2, 3), f64(2, 5), f64(2, 5), f64(4, 3), "tanh"),
    ),
    (
        "dense_backward-delta",
        lambda: K.dense_backward(f64(2, 3), f64(2, 4), f64(2, 5), f64(4, 3), "tanh"),
    ),
    (
        "dense_backward-weight-in",
        lambda: K.dense_backward(f64(2, 3), f64(2, 4), f64(2, 4), f64(4, 5), "tanh"),
    ),
    (
        "dense_backward-grad_weight",
        lambda: K.dense_backward(
            f64(2, 3), f64(2, 4), f64(2, 4), f64(4, 3), "tanh", grad_weight=f64(4, 4)
        ),
    ),
    (
        "dense_backward-grad_bias",
        lambda: K.dense_backward(
            f64(2, 3), f64(2, 4), f64(2, 4), f64(4, 3), "tanh", grad_bias=f64(5)
        ),
    ),
    (
        "dense_backward-delta_below",
        lambda: K.dense_backward(
            f64(2, 3), f64(2, 4), f64(2, 4), f64(4, 3), "tanh", delta_below=f64(2, 4)
        ),
    ),
    (
        "dense_backward-dz",
        lambda: K.dense_backward(f64(2, 3), f64(2, 4), f64(2, 4), f64(4, 3), "tanh", dz=f64(2, 3)),
    ),
]


@pytest.mark.parametrize("call", [c[1] for c in WRONG_SHAPE], ids=[c[0] for c in WRONG_SHAPE])
def test_wrong_shape_is_a_value_error(call):
    with pytest.raises(ValueError):
        call()


BAD_OUTPUT = []
for _make in (strided, readonly):
    _kind = _make.__name__
    BAD_OUTPUT += [
        (f"activation-out-{_kind}", lambda m=_make: K.activation(f64(2, 3), "tanh", out=m(2, 3))),
        (
            f"activation_grad-out-{_kind}",
            lambda m=_make: K.activation_grad(f64(2, 3), f64(2, 3), "tanh", out=m(2, 3)),
        ),
        (
            f"squared_error-delta-{_kind}",
            lambda m=_make: K.squared_error(f64(2, 3), f64(2, 3), m(2, 3)),
        ),
        (
            f"softmax_cross_entropy-delta-{_kind}",
            lambda m=_make: K.softmax_cross_entropy(P3, [0, 1], m(2, 3)),
        ),
        (
            f"dense_forward-out-{_kind}",
            lambda m=_make: K.dense_forward(f64(2, 3), f64(4, 3), f64(4), "tanh", m(2, 4)),
        ),
        (
            f"dense_forward-wide-out-{_kind}",
            lambda m=_make: K.dense_forward(f64(2, 3), f64(64, 3), f64(64), "tanh", m(2, 64)),
        ),
        (
            f"dense_forward-wide-scratch-{_kind}",
            lambda m=_make: K.dense_forward(f64(2, 3), f64(64, 3), f64(64), "tanh", scratch=m(128)),
        ),
    ] + [
        (
            f"dense_backward-{arg}-{_kind}",
            lambda m=_make, arg=arg, shape=shape: K.dense_backward(
                f64(2, 3), f64(2, 4), f64(2, 4), f64(4, 3), "tanh", **{arg: m(*shape)}
            ),
        )
        for arg, shape in (
            ("grad_weight", (4, 3)),
            ("grad_bias", (4,)),
            ("delta_below", (2, 3)),
            ("dz", (2, 4)),
        )
    ]


@pytest.mark.parametrize("call", [c[1] for c in BAD_OUTPUT], ids=[c[0] for c in BAD_OUTPUT])
def test_non_contiguous_or_read_only_output_is_a_value_error(call):
    # Documented: outputs must be C-contiguous and writable; a strided out
    # would otherwise need a hidden copy back.
    with pytest.raises(ValueError):
        call()


def optimizer_args(name, dtype=np.float64):
    w = np.linspace(-1, 1, 6, dtype=dtype).reshape(2, 3)
    g = np.full((2, 3), 0.5, dtype)
    state = np.full((2, 3), 0.25, dtype) if name in ("momentum", "adagrad") else None
    return w, g, state


def break_arg(arr, how):
    if how == "float32":
        return arr.astype(np.float32)
    if how == "shape":
        return np.ones(arr.size + 1, arr.dtype)
    if how == "transposed-shape":
        return np.ascontiguousarray(arr.T)  # same size, other shape
    if how == "strided":
        view = np.zeros(arr.shape[:-1] + (2 * arr.shape[-1],), arr.dtype)[..., ::2]
        view[...] = arr
        return view
    if how == "readonly":
        arr = arr.copy()
        arr.flags.writeable = False
        return arr
    raise AssertionError(how)


REJECTED = [
    (name, arg, how)
    for name in OPTIMIZERS
    for arg in ("w", "g", "state")
    for how in ("float32", "shape", "transposed-shape", "strided", "readonly")
    if not (arg == "state" and name in ("sgd", "accumulate"))
    # Same size, other shape: one case per kernel is enough.
    and not (how == "transposed-shape" and arg != "g")
    # An input gradient may be strided or read-only: those are valid calls.
    and not (arg == "g" and how in ("strided", "readonly"))
]


@pytest.mark.parametrize("name, arg, how", REJECTED, ids=["-".join(r) for r in REJECTED])
def test_rejected_call_leaves_the_parameters_unchanged(name, arg, how):
    hp = {"lr": 0.5, "mu": 0.9, "eps": 1e-8, "scale": 2.0}
    w, g, state = optimizer_args(name)
    args = {"w": w, "g": g, "state": state}
    args[arg] = break_arg(args[arg], how)
    before = {k: None if v is None else v.copy() for k, v in args.items()}
    with pytest.raises(TypeError if how == "float32" else ValueError):
        call_optimizer(K, name, args["w"], args["g"], args["state"], hp)
    for k, v in args.items():
        if v is not None:
            np.testing.assert_array_equal(v, before[k], err_msg=f"{k} changed")


@pytest.mark.parametrize("bad", ["gelu", "Sigmoid", "", "soft max"])
def test_unknown_activation_is_a_value_error(bad):
    for call in (
        lambda: K.activation(f64(2, 3), bad),
        lambda: K.activation_grad(f64(2, 3), f64(2, 3), bad),
        lambda: K.dense_forward(f64(2, 3), f64(4, 3), f64(4), bad),
        lambda: K.dense_backward(f64(2, 3), f64(2, 4), f64(2, 4), f64(4, 3), bad),
    ):
        with pytest.raises(ValueError, match="unknown activation"):
            call()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("labels", [[0, 3], [-1, 0], [2, 2**40]])
def test_label_out_of_range_is_a_value_error(dtype, labels):
    p = np.full((2, 3), 1 / 3, dtype)
    with pytest.raises(ValueError, match="labels"):
        K.softmax_cross_entropy(p, labels)


# ----------------------------------------------------- numerical extremes


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sigmoid_and_tanh_saturate_to_finite_limits(dtype):
    z = np.array([[-1000.0, 1000.0, -1e30, 1e30, 0.0]], dtype)
    with np.errstate(all="raise"):
        s = K.activation(z, "sigmoid")
        t = K.activation(z, "tanh")
    np.testing.assert_array_equal(s, np.array([[0, 1, 0, 1, 0.5]], dtype))
    np.testing.assert_array_equal(t, np.array([[-1, 1, -1, 1, 0]], dtype))
    # The dense layer's fused bias+activation path saturates the same way.
    a = K.dense_forward(
        np.zeros((1, 2), dtype), np.zeros((2, 2), dtype), np.array([-1000, 1000], dtype), "sigmoid"
    )
    np.testing.assert_array_equal(a, np.array([[0, 1]], dtype))
    grad = K.activation_grad(s, np.ones_like(s), "sigmoid")
    assert np.isfinite(grad).all()
    np.testing.assert_array_equal(grad[0, :4], 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_softmax_of_large_logits_is_finite_and_normalized(dtype):
    big = float(np.finfo(dtype).max) / 2
    z = np.array([[1000, 999, -1000], [1e4, 1e4, 1e4], [-1e4, 0, 1e4], [big, -big, 0]], dtype)
    for p in (
        K.activation(z, "softmax"),
        K.dense_forward(np.eye(4, dtype=dtype), np.zeros((3, 4), dtype), z[1], "softmax"),
        K.dense_forward(np.zeros((4, 1), dtype), np.zeros((3, 1), dtype), z[3], "softmax"),
    ):
        assert np.isfinite(p).all()
        np.testing.assert_allclose(p.sum(axis=1), 1, rtol=TOL[np.dtype(dtype)][0])
    p = K.activation(z, "softmax")
    e = math.exp(-1)
    assert_close(p[0], [1 / (1 + e), e / (1 + e), 0], dtype)
    assert_close(p[1], [1 / 3] * 3, dtype)
    np.testing.assert_array_equal(p[2:], [[0, 0, 1], [1, 0, 0]])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy_of_an_underflowed_probability_is_finite(dtype):
    # A confident wrong answer: exp(-2000) underflows to exactly 0 in both dtypes.
    p = K.activation(np.array([[0, -2000, 0], [5, 0, 0]], dtype), "softmax")
    assert p[0, 1] == 0
    loss, delta = K.softmax_cross_entropy(p, [1, 0])
    assert type(loss) is float and math.isfinite(loss)
    # Clamped at the smallest normal: -log(tiny) / 2 from the first row, plus
    # the second row's small loss.
    assert loss > -math.log(float(np.finfo(dtype).tiny)) / 2
    assert loss == pytest.approx(R.softmax_cross_entropy(p, [1, 0])[0], rel=LOSS_RTOL[dtype])
    assert np.isfinite(delta).all()
    assert_close(delta[0], [0.25, -0.5, 0.25], dtype)


# ------------------------------------------------------------- finiteness

SPECIALS = [np.nan, np.inf, -np.inf, -np.nan]


@SETTINGS
@given(
    dtype=st.sampled_from(DTYPES),
    n=st.integers(0, 5000),
    bad=st.lists(st.tuples(st.integers(0, 10**9), st.sampled_from(SPECIALS)), max_size=3),
    lay=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**32 - 1),
)
def test_all_finite_matches_reference(dtype, n, bad, lay, seed):
    rng = np.random.default_rng(seed)
    # Large finite values too: the largest float must not pass for infinity.
    v = (np.clip(rng.standard_normal(n), -4, 4) * (float(np.finfo(dtype).max) / 8)).astype(dtype)
    if n:
        v[rng.integers(n)] = np.finfo(dtype).max
        for where, special in bad:
            v[where % n] = special
    a = layout(v, lay)
    assert K.all_finite(a) == R.all_finite(a) == bool(np.isfinite(v).all())


def test_all_finite_finds_one_bad_element_anywhere_in_a_large_array():
    for dtype in DTYPES:
        v = np.ones(3_000_001, dtype)
        assert K.all_finite(v)
        for where in (0, 1_234_567, len(v) - 1):
            for special in SPECIALS:
                v[where] = special
                assert not K.all_finite(v), (dtype, where, special)
            v[where] = 1
