"""Node memory: each node's peak resident set while it trains, against what it holds.

    python benchmarks/memory.py [--examples N]

The MLP of benchmarks/train.py (784-1024-1024-10, float32, batch 64) on the
embedded cluster's default layout: 1 replica on 1 node, then 2 replicas
with 2 shards on 2 nodes. A poller reads every node's VmRSS each 50 ms;
the bound is 3x the parameters and data the node holds, plus 100 MB (the
interpreter, numpy, trio and the BLAS pools).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from train import LAYERS, mlp_config

from dbnode.driver import LocalCluster, train


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=25600)
    args = parser.parse_args()
    n = args.examples
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, LAYERS[0])).astype(np.float32)
    y = rng.integers(0, LAYERS[-1], n)
    params = sum(a * b + b for a, b in zip(LAYERS, LAYERS[1:])) * 4
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/mlp.npz"
        np.savez(path, X=x, y=y)
        for replicas in (1, 2):
            config = mlp_config(path, replicas, 1, replicas, 1)
            with LocalCluster(replicas) as cluster:
                peak = {p.pid: 0 for p in cluster.processes}
                done = threading.Event()

                def poll(peak=peak, done=done) -> None:
                    while not done.is_set():
                        for pid in peak:
                            try:
                                peak[pid] = max(peak[pid], rss(pid))
                            except OSError:
                                pass
                        time.sleep(0.05)

                poller = threading.Thread(target=poll)
                poller.start()
                try:
                    train(config, hosts=cluster.addresses, secret=cluster.secret_file.read_bytes())
                finally:
                    done.set()
                    poller.join()
            held = params / replicas + (x.nbytes + y.nbytes) / replicas  # its shard, its data
            bound = 3 * held + 100 * 2**20
            for i, value in enumerate(peak.values()):
                verdict = "PASS" if value <= bound else "MISS"
                print(
                    f"{replicas} replica(s), node {i}: peak RSS {value / 2**20:6.0f} MB; holds "
                    f"{held / 2**20:5.1f} MB of parameters and data; bound {bound / 2**20:4.0f} "
                    f"MB  {verdict}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
