"""Downpour SGD across node processes against a single-process numpy trainer.

    python benchmarks/train.py [--examples N] [--skip-digits]

1. MLP 784-1024-1024-10, batch 64, float32, relu + softmax cross-entropy,
   fetch and push every step (n_fetch = n_push = 1), on synthetic data:
   examples/s of dbnode with 1 replica in 1 and 2 layer partitions, and
   with 2 replicas on the 2 cores (2 parameter shards; fetching and pushing
   every step, then every 4 steps), each against the clean numpy trainer of
   benchmarks/kernels.py, every process with one BLAS/OpenMP thread.
2. The digits example: seconds to reach 95% test accuracy with 1, 2 and 4
   replicas (2 layer partitions each), next to the single-process trainer.

Every dbnode figure is the replicas' training-loop time (from the first
step to the last push applied), as ``summary.json``'s ``train_seconds``.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time

# One thread per process, in this process and in every node it starts.
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import numpy as np
from common import environment
from kernels import NumpyMLP

from dbnode import kernels
from dbnode.config import RunConfig
from dbnode.data import load, split
from dbnode.driver import LocalCluster, train
from dbnode.model import ModelSpec, evaluate, init_params
from dbnode.optim import make_optimizer
from dbnode.trainer import Trainer

LAYERS = [784, 1024, 1024, 10]
BATCH = 64


def mlp_config(
    data: str, replicas: int, partitions: int, nodes: int, shards: int = 1, every: int = 1
) -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": {
                "layers": LAYERS,
                "activation": "relu",
                "output": "softmax",
                "loss": "cross_entropy",
                "dtype": "float32",
                "init": "he",
                "partitions": partitions,
            },
            "data": {"train": data},
            "train": {
                "replicas": replicas,
                "batch_size": BATCH,
                "epochs": 1,
                "seed": 0,
                "n_fetch": every,
                "n_push": every,
                "eval_interval": 3600.0,
            },
            "optimizer": {"name": "sgd", "learning_rate": 0.01},
            "cluster": {"parameter_shards": shards, "nodes": nodes},
        }
    )


def numpy_rate(x: np.ndarray, y: np.ndarray) -> float:
    spec = ModelSpec(tuple(LAYERS), activation="relu", output="softmax", loss="cross_entropy")
    mlp = NumpyMLP(spec, init_params(spec, "he", 0), 0.01)
    mlp.step(x[:BATCH], y[:BATCH])  # warm up
    start = time.perf_counter()
    for i in range(0, len(x) - BATCH + 1, BATCH):
        mlp.step(x[i : i + BATCH], y[i : i + BATCH])
    return (len(x) // BATCH * BATCH) / (time.perf_counter() - start)


def dbnode_rate(
    data: str, replicas: int, partitions: int, nodes: int, shards: int, every: int
) -> float:
    config = mlp_config(data, replicas, partitions, nodes, shards, every)
    with LocalCluster(nodes) as cluster:
        summary = train(config, hosts=cluster.addresses, secret=cluster.secret_file.read_bytes())
    return summary.examples_per_second


def bench_mlp(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, LAYERS[0])).astype(np.float32)
    y = rng.integers(0, LAYERS[-1], n)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mlp.npz")
        np.savez(path, X=x, y=y)
        for name, replicas, partitions, nodes, shards, every, target in [
            ("1 replica, 1 partition, n=1", 1, 1, 1, 1, 1, 0.7),
            ("1 replica, 2 partitions, n=1", 1, 2, 2, 1, 1, 0.6),
            ("2 replicas, 2 cores, 2 shards, n=1", 2, 1, 2, 2, 1, None),
            ("2 replicas, 2 cores, 2 shards, n=4", 2, 1, 2, 2, 4, 1.4),
        ]:
            ours = dbnode_rate(path, replicas, partitions, nodes, shards, every)
            base = numpy_rate(x, y)  # measured next to each run: the machine is noisy
            ratio = ours / base
            verdict = (
                ""
                if target is None
                else (f"  {'PASS' if ratio >= target else 'MISS'} (target >= {target}x)")
            )
            rows.append(
                f"{name:<40} dbnode {ours:8,.0f} ex/s   numpy 1 thread {base:8,.0f} ex/s"
                f"   ratio {ratio:4.2f}x{verdict}"
            )
            print(rows[-1], flush=True)
    return rows


def seconds_to(metrics_rows: list[tuple[float, float]], target: float) -> float | None:
    for seconds, accuracy in metrics_rows:
        if accuracy is not None and accuracy >= target:
            return seconds
    return None


def reference_time_to_95(config: RunConfig) -> float | None:
    spec = config.spec()
    x, y = load("digits", seed=config.train.seed)
    x, y, x_test, y_test = split(x, y, config.data.test_fraction, config.train.seed)
    params = init_params(spec, config.model.init, config.train.seed)
    trainer = Trainer(
        spec, params, make_optimizer(config.optimizer.name, config.optimizer.learning_rate)
    )
    targets = trainer.loss.targets(y)
    xs = x.astype(spec.np_dtype)
    start = time.perf_counter()
    b = config.train.batch_size
    for epoch in range(config.train.epochs):
        order = np.random.default_rng([config.train.seed, epoch]).permutation(len(x))
        for i in range(0, len(x), b):
            idx = order[i : i + b]
            trainer.step(xs[idx], targets[idx])
        if evaluate(spec, params, x_test, y_test)["accuracy"] >= 0.95:
            return time.perf_counter() - start
    return None


def bench_digits() -> list[str]:
    rows = []
    base_config = RunConfig.load(
        os.path.join(os.path.dirname(__file__), "..", "examples", "digits.toml"),
        ["train.eval_interval=0.1"],
    )
    ref = reference_time_to_95(base_config)
    rows.append(
        f"digits to 95% test accuracy: single-process trainer {ref:.2f} s (evaluated every epoch)"
        if ref
        else "digits: single-process trainer never reached 95%"
    )
    print(rows[-1], flush=True)
    for replicas in (1, 2, 4):
        config = RunConfig.load(
            os.path.join(os.path.dirname(__file__), "..", "examples", "digits.toml"),
            ["train.eval_interval=0.1", f"train.replicas={replicas}"],
        )
        with tempfile.TemporaryDirectory() as out, LocalCluster(2) as cluster:
            train(
                config,
                hosts=cluster.addresses,
                secret=cluster.secret_file.read_bytes(),
                out_dir=out,
            )
            with open(os.path.join(out, "metrics.csv")) as f:
                points = [
                    (float(r["seconds"]), float(r["test_accuracy"]) if r["test_accuracy"] else None)
                    for r in csv.DictReader(f)
                ]
        t = seconds_to(points, 0.95)
        rows.append(
            f"digits to 95% test accuracy: {replicas} replica(s) x 2 partitions "
            + (f"{t:.2f} s (wall, setup included)" if t else "never")
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=6400, help="examples in the MLP runs")
    parser.add_argument("--skip-digits", action="store_true")
    args = parser.parse_args()
    print(environment())
    print(
        f"dbnode kernels: -march={kernels.MARCH}, OpenMP={kernels.OPENMP}; "
        f"every process: 1 BLAS/OpenMP thread"
    )
    bench_mlp(args.examples)
    if not args.skip_digits:
        bench_digits()


if __name__ == "__main__":
    main()
