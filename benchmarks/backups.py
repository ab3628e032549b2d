"""A slow replica's run time with and without backups of its portions.

    python benchmarks/backups.py [--epochs 150] [--rounds 2]

Digits, three replicas of one partition each on three embedded nodes (the
parameter shard on one of them), ``dbnode train`` run as a user runs it.
The node that holds a replica and nothing else is slowed fivefold by
SIGSTOP/SIGCONT cycles (80 ms stopped, 20 ms running). Each round times, in
the same order: the undisturbed run (defaults: backups on), the slowed run
with backups, the slowed run with ``train.backups = false``; it prints each
run's training seconds and the slowed runs' ratios to the undisturbed one.
Every run must apply every step exactly once: its piece updates and
examples are checked against the undisturbed run's.

On this machine the three nodes share two cores, so a stopped node leaves
its core's time to the other two: the slowdown costs less capacity than it
would on three machines of their own.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import environment

from dbnode.config import RunConfig
from dbnode.driver.planning import plan

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "digits.toml"
SETS = ["cluster.nodes=3", "cluster.parameter_shards=1", "model.partitions=1",
        "train.replicas=3", "train.pipeline=1"]  # fmt: skip


def replica_only_node(sets: list[str]) -> str:
    """The name of the embedded node with a replica and no parameter shard."""
    planned = plan(RunConfig.load(CONFIG, sets))
    roles = [planned.placement.on_host(i) for i in range(len(planned.nodes))]
    index = next(i for i, r in enumerate(roles) if r["partitions"] and not r["shards"])
    return planned.nodes[index].name


def node_pid(driver: subprocess.Popen, name: str) -> int:
    """The pid of the driver's embedded node ``name`` (its ``--name``)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and driver.poll() is None:
        for entry in Path("/proc").iterdir():
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == driver.pid and b"serve" in args and b"--name" in args:
                if args[args.index(b"--name") + 1].decode() == name:
                    return int(entry.name)
        time.sleep(0.05)
    raise RuntimeError(f"embedded node {name} not found: {driver.communicate()[1][-2000:]}")


def train(out: Path, sets: list[str], slow: bool) -> dict:
    command = [
        sys.executable,
        "-m",
        "dbnode.cli",
        "train",
        str(CONFIG),
        "--out",
        str(out),
        "--quiet",
    ]
    for item in sets:
        command += ["--set", item]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if slow:
        victim = node_pid(driver, replica_only_node(sets))

        def cycle() -> None:  # running a fifth of the time
            while driver.poll() is None:
                try:
                    os.kill(victim, signal.SIGSTOP)
                    time.sleep(0.08)
                    os.kill(victim, signal.SIGCONT)
                    time.sleep(0.02)
                except ProcessLookupError:
                    return

        threading.Thread(target=cycle, daemon=True).start()
    _, err = driver.communicate(timeout=900)
    if driver.returncode:
        raise RuntimeError(f"dbnode train failed: {err[-2000:]}")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(environment())
    sets = [*SETS, f"train.epochs={args.epochs}"]
    runs = {"undisturbed": (sets, False), "slowed, backups": (sets, True),
            "slowed, no backups": ([*sets, "train.backups=false"], True)}  # fmt: skip
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            reference = None
            for i, (name, (run_sets, slow)) in enumerate(runs.items()):
                summary = train(Path(tmp) / f"{round_}-{i}", run_sets, slow)
                seconds[name].append(summary["train_seconds"])
                leased = sum(e["event"] == "backup leased" for e in summary["events"])
                print(f"round {round_}: {name:<20} {summary['train_seconds']:6.2f} s  "
                      f"backups {leased:2d}  accuracy {summary['test_accuracy']:.4f}")  # fmt: skip
                counts = (summary["pushes"]["applied"], summary["examples"])
                reference = reference or counts
                assert counts == reference, (
                    f"{name}: {counts} applied/examples, undisturbed {reference}"
                )
    calm = statistics.median(seconds["undisturbed"])
    for name in ("slowed, backups", "slowed, no backups"):
        ratio = statistics.median(seconds[name]) / calm
        print(f"{name}: {ratio:.2f}x the undisturbed run's time (median of {args.rounds})")


if __name__ == "__main__":
    main()
