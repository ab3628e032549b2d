"""Plain-numpy twins of :mod:`dbnode.kernels`: same signatures, same
results, written for obviousness rather than speed. The tests hold the
compiled kernels to these, and these to finite differences."""

import numpy as np


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


_FORWARD = {
    "linear": lambda z: z,
    "sigmoid": _sigmoid,
    "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0),
    "softmax": _softmax,
}


def _out(out, value):
    if out is None:
        return np.array(value)
    out[...] = value
    return out


def sgd(w, g, lr):
    w -= w.dtype.type(lr) * g


def momentum(w, g, velocity, lr, mu):
    velocity *= velocity.dtype.type(mu)
    velocity -= velocity.dtype.type(lr) * g
    w += velocity


def adagrad(w, g, sum_sq, lr, eps=1e-8):
    sum_sq += g * g
    w -= w.dtype.type(lr) * g / np.sqrt(sum_sq + w.dtype.type(eps))


def adam(w, g, m, v, lr, beta1, beta2, eps, step):
    t = w.dtype.type
    m *= t(beta1)
    m += t(1 - beta1) * g
    v *= t(beta2)
    v += t(1 - beta2) * g * g
    m_hat = m / t(1 - beta1**step)
    v_hat = v / t(1 - beta2**step)
    w -= t(lr) * m_hat / (np.sqrt(v_hat) + t(eps))


def accumulate(acc, g, scale=1.0):
    acc += acc.dtype.type(scale) * g


def all_finite(a):
    return bool(np.isfinite(a).all())


def encode_wire(x, codec, out=None, residual=None):
    x = np.asarray(x, np.float32)
    v = x if residual is None else x + residual
    if codec == "bf16":
        u = v.view(np.uint32).astype(np.uint64)
        mag, sign = u & 0x7FFFFFFF, (u >> 16) & 0x8000
        r = np.minimum((mag + 0x7FFF + ((mag >> 16) & 1)) >> 16, 0x7F7F)
        r = np.where(mag == 0x7F800000, 0x7F80, r)
        r = np.where(mag > 0x7F800000, (mag >> 16) | 0x40, r)
        q = (r | sign).astype(np.uint16)
    elif codec == "f16":
        big = np.float32(65504)
        with np.errstate(over="ignore", invalid="ignore"):
            kept = np.isnan(v) | np.isinf(v)
            q = np.where(kept, v, np.clip(v, -big, big)).astype(np.float16).view(np.uint16)
    else:
        raise ValueError(f"unknown wire codec {codec!r}")
    if residual is not None:
        with np.errstate(invalid="ignore"):
            d = v - decode_wire(q, codec)
        residual[...] = np.where(np.isnan(d), 0, d)
    return _out(out, q.reshape(x.shape))


def decode_wire(q, codec, out=None):
    q = np.asarray(q, np.uint16)
    if codec == "bf16":
        x = (q.astype(np.uint32) << 16).view(np.float32)
    elif codec == "f16":
        x = q.view(np.float16).astype(np.float32)
    else:
        raise ValueError(f"unknown wire codec {codec!r}")
    return _out(out, x)


def _forward(name):
    try:
        return _FORWARD[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}") from None


def activation(z, name, out=None):
    return _out(out, _forward(name)(z))


def activation_grad(a, delta, name, out=None):
    if name == "linear":
        dz = delta
    elif name == "sigmoid":
        dz = delta * a * (1 - a)
    elif name == "tanh":
        dz = delta * (1 - a * a)
    elif name == "relu":
        dz = delta * (a > 0)
    elif name == "softmax":
        dz = a * (delta - (delta * a).sum(axis=1, keepdims=True))
    else:
        raise ValueError(f"unknown activation {name!r}")
    return _out(out, dz)


def squared_error(p, t, delta=None):
    if t.ndim == 1 and p.shape == (len(t), 1):
        t = t.reshape(p.shape)
    if t.shape != p.shape:
        raise ValueError(f"target: shape {t.shape} does not match {p.shape}")
    n = p.shape[0]
    loss = 0.5 * float(np.sum((t.astype(np.float64) - p) ** 2)) / n
    return loss, _out(delta, (p - t) / p.dtype.type(n))


def softmax_cross_entropy(p, labels, delta=None):
    n = p.shape[0]
    labels = np.asarray(labels, dtype=np.intp)
    picked = p[np.arange(n), labels].astype(np.float64)
    loss = -float(np.mean(np.log(np.maximum(picked, np.finfo(p.dtype).tiny))))
    onehot = np.zeros_like(p)
    onehot[np.arange(n), labels] = 1
    return loss, _out(delta, (p - onehot) / p.dtype.type(n))


def sigmoid_cross_entropy(p, t, delta=None):
    if t.ndim == 1 and p.shape == (len(t), 1):
        t = t.reshape(p.shape)
    if t.shape != p.shape:
        raise ValueError(f"target: shape {t.shape} does not match {p.shape}")
    n = p.shape[0]
    tiny = np.finfo(p.dtype).tiny
    t64 = t.astype(np.float64)
    on = np.log(np.maximum(p, tiny).astype(np.float64))
    off = np.log(np.maximum(p.dtype.type(1) - p, tiny).astype(np.float64))
    loss = -float(np.sum(t64 * on + (1 - t64) * off)) / n
    return loss, _out(delta, (p - t) / p.dtype.type(n))


def dense_forward(x, weight, bias, name, out=None, scratch=None):
    return _out(out, _forward(name)(x @ weight.T + bias))


def dense_backward(
    x,
    a,
    delta,
    weight,
    name,
    grad_weight=None,
    grad_bias=None,
    delta_below=None,
    dz=None,
    need_delta_below=True,
):
    dz = activation_grad(a, delta, name, out=dz)
    grad_weight = _out(grad_weight, dz.T @ x)
    grad_bias = _out(grad_bias, dz.sum(axis=0))
    delta_below = _out(delta_below, dz @ weight) if need_delta_below else None
    return grad_weight, grad_bias, delta_below
