"""Kernel benchmarks: compiled dbnode kernels against plain numpy, same run.

    python benchmarks/kernels.py [--threads N]

Optimizers run on 10M float32 parameters with the kernels' default threads
(numpy's elementwise ops are single-threaded whatever we do). The training
steps pin BLAS and OpenMP to the same thread count for both sides.
"""

import argparse

import numpy as np
from common import compare, environment, row
from threadpoolctl import threadpool_limits

from dbnode import kernels
from dbnode.model import Loss, ModelSpec, init_params
from dbnode.optim import SGD
from dbnode.trainer import Trainer

N = 10_000_000
LR = np.float32(0.01)
EPS = np.float32(1e-8)


def bench_optimizers() -> list[str]:
    rng = np.random.default_rng(0)
    w = rng.normal(size=N).astype(np.float32)
    g = rng.normal(size=N).astype(np.float32)
    h = np.ones(N, np.float32)
    t1 = np.empty_like(w)
    t2 = np.empty_like(w)

    def numpy_sgd():
        nonlocal w
        w -= LR * g

    def numpy_adagrad():
        nonlocal w, h
        h += g * g
        w -= LR * g / np.sqrt(h + EPS)

    def numpy_adagrad_prealloc():
        np.multiply(g, g, out=t1)
        np.add(h, t1, out=h)
        np.add(h, EPS, out=t1)
        np.sqrt(t1, out=t1)
        np.multiply(g, LR, out=t2)
        np.divide(t2, t1, out=t2)
        np.subtract(w, t2, out=w)

    out = []
    ours, base = compare(lambda: kernels.sgd(w, g, LR), numpy_sgd, rounds=25)
    gbs = 3 * w.nbytes / ours / 1e9
    out.append(row("sgd 10M f32 (w -= lr*g)", ours, base, "numpy", 2.0) + f"   [{gbs:.0f} GB/s]")
    ours, base = compare(lambda: kernels.adagrad(w, g, h, LR, EPS), numpy_adagrad, rounds=25)
    out.append(row("adagrad 10M f32 vs numpy as written", ours, base, "numpy", 3.0))
    ours, base = compare(
        lambda: kernels.adagrad(w, g, h, LR, EPS), numpy_adagrad_prealloc, rounds=25
    )
    out.append(row("adagrad 10M f32 vs numpy preallocated", ours, base, "numpy"))
    m, v = np.zeros_like(w), np.zeros_like(w)

    def numpy_adam():  # as written in numpy, bias correction and all (step 10)
        nonlocal m, v, w
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w -= LR * (m / (1 - 0.9**10)) / (np.sqrt(v / (1 - 0.999**10)) + EPS)

    ours, base = compare(
        lambda: kernels.adam(w, g, m, v, LR, 0.9, 0.999, EPS, 10), numpy_adam, rounds=25
    )
    out.append(row("adam 10M f32 vs numpy as written", ours, base, "numpy"))
    return out


class NumpyMLP:
    """A clean plain-numpy training step of the same network: the baseline."""

    def __init__(self, spec: ModelSpec, params: dict, lr: float):
        self.n = spec.n_layers
        self.w = [params[f"layer{i}.weight"] for i in range(self.n)]
        self.b = [params[f"layer{i}.bias"] for i in range(self.n)]
        self.lr = spec.np_dtype.type(lr)

    def step(self, x, labels):
        acts = [x]
        for i in range(self.n - 1):
            acts.append(np.maximum(acts[-1] @ self.w[i].T + self.b[i], 0))
        z = acts[-1] @ self.w[-1].T + self.b[-1]
        e = np.exp(z - z.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        batch = len(x)
        loss = -np.log(p[np.arange(batch), labels]).mean()
        dz = p
        dz[np.arange(batch), labels] -= 1
        dz /= batch
        for i in range(self.n - 1, -1, -1):
            gw = dz.T @ acts[i]
            gb = dz.sum(axis=0)
            if i:
                dz = (dz @ self.w[i]) * (acts[i] > 0)
            self.w[i] -= self.lr * gw
            self.b[i] -= self.lr * gb
        return loss


def bench_step(layers: tuple[int, ...], batch: int, threads: int, target: float) -> str:
    spec = ModelSpec(layers, activation="relu", output="softmax", loss="cross_entropy")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, layers[0])).astype(np.float32)
    y = rng.integers(0, layers[-1], size=batch)
    ours = Trainer(spec, init_params(spec, "he", 0), SGD(0.01))
    base = NumpyMLP(spec, init_params(spec, "he", 0), 0.01)
    targets = Loss(spec).targets(y)
    # Same answer first: the benchmark compares equal work.
    assert np.isclose(ours.step(x, targets), base.step(x, y), rtol=1e-4)
    repeat = max(1, 20_000 // (sum(a * b for a, b in zip(layers, layers[1:])) * batch // 1000 + 1))
    with threadpool_limits(threads):
        kernels.set_threads(threads)
        t_ours, t_base = compare(
            lambda: ours.step(x, targets), lambda: base.step(x, y), rounds=15, repeat=repeat
        )
    name = f"train step {'-'.join(map(str, layers))} b{batch} ({threads} thr)"
    return row(name, t_ours, t_base, "numpy", target, unit="us" if t_ours < 1e-3 else "ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=1, help="BLAS/OpenMP threads for the training steps"
    )
    args = parser.parse_args()
    print(environment())
    print(f"dbnode kernels: OpenMP={kernels.OPENMP}, threads={kernels.max_threads()}")
    for line in bench_optimizers():
        print(line)
    print(bench_step((784, 1024, 1024, 10), 64, args.threads, 1.0))
    print(bench_step((64, 128, 10), 32, args.threads, 1.3))


if __name__ == "__main__":
    main()
