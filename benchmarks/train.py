"""Downpour SGD across node processes against a plain numpy loop.

    python benchmarks/train.py [--examples N] [--skip-digits] [--skip-pinned] [--skip-codecs]
                               [--pipeline | --skip-pipeline]

1. MLP 784-1024-1024-10, batch 64, float32, relu + softmax cross-entropy, on
   synthetic data, examples/s of ``dbnode.train(config)`` against the numpy
   loop of benchmarks/kernels.py, each dbnode run next to a numpy run:
   - **default**: as users run it — no thread variables, the embedded
     cluster and its defaults (one node per partition of every replica up
     to one per core, each with its share of the cores; shards placed by
     traffic), against the numpy loop with its default BLAS threads (all
     cores);
   - **pinned**: every node and the numpy loop with one BLAS/OpenMP thread,
     one node per role.
   Rows: 1 replica; 1 replica in 2 layer partitions; 2 replicas (2 shards)
   fetching and pushing every step, then every 4 steps. Each row also gives
   the setup seconds (wall time of ``train`` minus its training loop: the
   embedded cluster's start included).
2. The digits example: seconds to reach 95% test accuracy with 1, 2 and 4
   replicas (2 layer partitions each), next to the single-process trainer.
3. Wire codecs: the digits example as 2 replicas x 2 partitions on the
   embedded cluster, with ``[wire]`` f32 and then bf16 everywhere (fetch,
   push, activations), over several seeds: held-out accuracy of each and
   ``wire_bytes`` of bf16 over f32; then the MLP's 2-replica row in bf16
   next to its f32 run.

4. Pipelined layer partitions (``--pipeline`` runs this part alone): the
   MLP 784-1024-1024-1024-10, batch 64, one replica in 2 and in 4 layer
   partitions on the embedded cluster's 2 nodes with ``train.pipeline`` 1,
   2 and 4 (and the default), each next to the numpy loop, with every
   partition's idle fraction (the share of its training loop it waited for
   a neighbour); then digits as 1 replica x 2 partitions, pipelined and not,
   over several seeds (held-out accuracy).

Every dbnode rate is the replicas' training-loop time (from the first step
to the last push applied), as ``summary.json``'s ``train_seconds``.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time

import numpy as np
from common import environment
from kernels import NumpyMLP
from threadpoolctl import threadpool_limits

from dbnode import kernels
from dbnode.config import RunConfig
from dbnode.data import load, split
from dbnode.driver import LocalCluster, train
from dbnode.metrics import evaluate
from dbnode.model import ModelSpec, init_params
from dbnode.optim import make_optimizer
from dbnode.threads import THREAD_VARIABLES
from dbnode.trainer import Trainer

LAYERS = [784, 1024, 1024, 10]
BATCH = 64

# (name, replicas, partitions, shards, every, target on the default path)
RUNS = [
    ("1 replica, n=1", 1, 1, 1, 1, 0.9),
    ("1 replica, 2 partitions, n=1", 1, 2, 1, 1, None),
    ("2 replicas, 2 shards, n=1", 2, 1, 2, 1, 0.8),
    ("2 replicas, 2 shards, n=4", 2, 1, 2, 4, 1.0),
]


def mlp_config(data: str, replicas: int, partitions: int, shards: int, every: int) -> RunConfig:
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
            "cluster": {"parameter_shards": shards},
        }
    )


def numpy_rate(x: np.ndarray, y: np.ndarray, threads: int | None) -> float:
    spec = ModelSpec(tuple(LAYERS), activation="relu", output="softmax", loss="cross_entropy")
    mlp = NumpyMLP(spec, init_params(spec, "he", 0), 0.01)
    with threadpool_limits(threads):  # None: the defaults, all cores
        mlp.step(x[:BATCH], y[:BATCH])  # warm up
        start = time.perf_counter()
        for i in range(0, len(x) - BATCH + 1, BATCH):
            mlp.step(x[i : i + BATCH], y[i : i + BATCH])
    return (len(x) // BATCH * BATCH) / (time.perf_counter() - start)


def dbnode_run(config: RunConfig, pinned: bool) -> tuple[float, float, dict]:
    """examples/s, setup seconds, and each node's threads."""
    start = time.perf_counter()
    if pinned:
        roles = config.train.replicas * config.model.partitions
        with LocalCluster(roles, threads=[1] * roles) as cluster:
            summary = train(
                config, hosts=cluster.addresses, secret=cluster.secret_file.read_bytes()
            )
    else:
        summary = train(config)  # exactly what `dbnode train config.toml` does
    wall = time.perf_counter() - start
    return summary.examples_per_second, wall - summary.train_seconds, summary.threads


def bench_mlp(n: int, pinned: bool) -> list[str]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, LAYERS[0])).astype(np.float32)
    y = rng.integers(0, LAYERS[-1], n)
    rows = []
    base_name = "numpy 1 thread" if pinned else "numpy all cores"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mlp.npz")
        np.savez(path, X=x, y=y)
        for name, replicas, partitions, shards, every, target in RUNS:
            config = mlp_config(path, replicas, partitions, shards, every)
            ours, setup, threads = dbnode_run(config, pinned)
            base = numpy_rate(x, y, 1 if pinned else None)  # next to each run: noisy machine
            ratio = ours / base
            verdict = "" if pinned or target is None else (
                f"  {'PASS' if ratio >= target else 'MISS'} (target >= {target}x)"
            )  # fmt: skip
            rows.append(
                f"{'pinned' if pinned else 'default'} {name:<30} dbnode {ours:8,.0f} ex/s   "
                f"{base_name} {base:8,.0f} ex/s   ratio {ratio:4.2f}x   setup {setup:4.2f} s   "
                f"threads {'+'.join(map(str, threads.values()))}{verdict}"
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


def bench_codecs(x_path: str, seeds: int = 3) -> list[str]:
    rows = []
    digits = os.path.join(os.path.dirname(__file__), "..", "examples", "digits.toml")
    results = {}
    for codec in ("f32", "bf16"):
        accuracy, wire = [], []
        for seed in range(seeds):
            sets = [f'wire.{k}="{codec}"' for k in ("fetch", "push", "activations")]
            config = RunConfig.load(digits, ["train.replicas=2", f"train.seed={seed}", *sets])
            summary = train(config)
            accuracy.append(summary.test_accuracy)
            wire.append(summary.wire_bytes)
        results[codec] = (np.mean(accuracy), np.mean(wire))
        rows.append(
            f"digits 2 replicas x 2 partitions, [wire] {codec:<4}: test accuracy "
            f"{' '.join(f'{a:.4f}' for a in accuracy)} (mean {np.mean(accuracy):.4f})   "
            f"wire_bytes {np.mean(wire) / 1e6:.1f} MB"
        )
        print(rows[-1], flush=True)
    (a32, w32), (a16, w16) = results["f32"], results["bf16"]
    drop, ratio = (a32 - a16) * 100, w16 / w32
    rows.append(
        f"bf16 vs f32: accuracy {-drop:+.2f} points "
        f"{'PASS' if drop <= 0.5 else 'MISS'} (target within 0.5)   wire_bytes {ratio:.3f}x "
        f"{'PASS' if ratio <= 0.55 else 'MISS'} (target <= 0.55x)"
    )
    print(rows[-1], flush=True)
    x = np.load(x_path)
    for codec in ("f32", "bf16"):
        config = mlp_config(x_path, 2, 1, 2, 1)
        config = RunConfig.from_dict(
            {**config.to_dict(), "wire": {"fetch": codec, "push": codec, "activations": codec}}
        )
        ours, _, _ = dbnode_run(config, pinned=False)
        base = numpy_rate(x["X"], x["y"], None)
        rows.append(
            f"default 2 replicas, 2 shards, n=1, [wire] {codec:<4} dbnode {ours:8,.0f} ex/s   "
            f"numpy all cores {base:8,.0f} ex/s   ratio {ours / base:4.2f}x"
        )
        print(rows[-1], flush=True)
    return rows


PIPELINE_LAYERS = [784, 1024, 1024, 1024, 10]


def pipeline_config(data: str, partitions: int, depth: int | None) -> RunConfig:
    raw = mlp_config(data, 1, 1, 1, 1).to_dict()
    raw["model"].update(layers=PIPELINE_LAYERS, partitions=partitions)
    del raw["cluster"]["parameter_shards"]  # the default: one beside each partition
    if depth is not None:
        raw["train"]["pipeline"] = depth
    return RunConfig.from_dict(raw)


def bench_pipeline(n: int, pinned: bool, seeds: int = 3) -> list[str]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, PIPELINE_LAYERS[0])).astype(np.float32)
    y = rng.integers(0, PIPELINE_LAYERS[-1], n)
    spec = ModelSpec(tuple(PIPELINE_LAYERS), activation="relu", output="softmax",
                     loss="cross_entropy")  # fmt: skip
    mlp = NumpyMLP(spec, init_params(spec, "he", 0), 0.01)
    rows, rates = [], {}
    label = "pinned" if pinned else "default"
    base_name = "numpy 1 thread" if pinned else "numpy all cores"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mlp.npz")
        np.savez(path, X=x, y=y)
        for partitions in (2, 4):
            for depth in (1, 2, 4, None):
                config = pipeline_config(path, partitions, depth)
                if pinned:
                    with LocalCluster(2, threads=[1, 1]) as cluster:
                        summary = train(config, hosts=cluster.addresses,
                                        secret=cluster.secret_file.read_bytes())  # fmt: skip
                else:
                    summary = train(config)  # as `dbnode train` runs it
                with threadpool_limits(1 if pinned else None):
                    mlp.step(x[:BATCH], y[:BATCH])
                    t = time.perf_counter()
                    for i in range(0, n - BATCH + 1, BATCH):
                        mlp.step(x[i : i + BATCH], y[i : i + BATCH])
                    base = (n // BATCH * BATCH) / (time.perf_counter() - t)
                ours = summary.examples_per_second
                rates[(partitions, depth)] = ours
                figures = summary.pipeline
                idle = " ".join(f"{p['idle']:.2f}" for p in figures["partitions"])
                name = f"depth {figures['depth']}" + (" (default)" if depth is None else "")
                verdict = ""
                if depth is None and not pinned and partitions == 2:
                    vs_one, vs_numpy = ours / rates[(2, 1)], ours / base
                    verdict = (
                        f"  vs depth 1 {vs_one:.2f}x {'PASS' if vs_one >= 1.6 else 'MISS'} "
                        f"(>= 1.6x), vs numpy {'PASS' if vs_numpy >= 0.8 else 'MISS'} (>= 0.8x)"
                    )
                if depth is None and partitions == 4:
                    vs_two = ours / rates[(2, None)]
                    verdict = (
                        f"  vs 2 partitions {vs_two:.2f}x {'PASS' if vs_two >= 1.0 else 'MISS'}"
                    )
                rows.append(
                    f"{label} 1 replica x {partitions} partitions, {name:<17} dbnode "
                    f"{ours:8,.0f} ex/s   {base_name} {base:8,.0f} ex/s   ratio {ours / base:4.2f}x"
                    f"   idle {idle}   threads {'+'.join(map(str, summary.threads.values()))}"
                    f"{verdict}"
                )
                print(rows[-1], flush=True)
    if pinned:
        return rows
    digits = os.path.join(os.path.dirname(__file__), "..", "examples", "digits.toml")
    accuracy = {}
    for depth in (1, 0):
        accuracy[depth] = []
        for seed in range(seeds):
            config = RunConfig.load(
                digits, ["train.replicas=1", f"train.seed={seed}", f"train.pipeline={depth}"]
            )
            accuracy[depth].append(train(config).test_accuracy)
        rows.append(
            f"digits 1 replica x 2 partitions, pipeline {depth or 'default (2)'}: test accuracy "
            f"{' '.join(f'{a:.4f}' for a in accuracy[depth])} (mean {np.mean(accuracy[depth]):.4f})"
        )
        print(rows[-1], flush=True)
    drop = (np.mean(accuracy[1]) - np.mean(accuracy[0])) * 100
    rows.append(
        f"digits pipelined vs not: {-drop:+.2f} points {'PASS' if drop <= 1 else 'MISS'} "
        "(target within 1)"
    )
    print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=25600, help="examples in the MLP runs")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--skip-pinned", action="store_true")
    parser.add_argument("--skip-codecs", action="store_true")
    parser.add_argument("--pipeline", action="store_true", help="only the pipelined rows")
    parser.add_argument("--skip-pipeline", action="store_true")
    args = parser.parse_args()
    pinned_env = {v: os.environ[v] for v in THREAD_VARIABLES if v in os.environ}
    if pinned_env:
        print(f"note: {pinned_env} set: the 'default' rows are not the default environment")
    print(environment())
    print(f"dbnode kernels: -march={kernels.MARCH}, OpenMP={kernels.OPENMP}")
    if args.pipeline:
        bench_pipeline(args.examples // 2, pinned=False)
        if not args.skip_pinned:
            bench_pipeline(args.examples // 2, pinned=True)
        return
    bench_mlp(args.examples, pinned=False)
    if not args.skip_pinned:
        bench_mlp(args.examples, pinned=True)
    if not args.skip_digits:
        bench_digits()
    if not args.skip_codecs:
        with tempfile.TemporaryDirectory() as tmp:
            rng = np.random.default_rng(0)
            path = os.path.join(tmp, "mlp.npz")
            np.savez(path, X=rng.normal(size=(args.examples, LAYERS[0])).astype(np.float32),
                     y=rng.integers(0, LAYERS[-1], args.examples))  # fmt: skip
            bench_codecs(path)
    if not args.skip_pipeline:
        bench_pipeline(args.examples // 2, pinned=False)
        if not args.skip_pinned:
            bench_pipeline(args.examples // 2, pinned=True)


if __name__ == "__main__":
    main()
