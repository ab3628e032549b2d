"""Wire codecs on a slow network: three hosts, every link limited to 1 Gbit/s.

    python benchmarks/network.py [--rate 1gbit] [--examples N] [--rounds R]

Needs root and iproute2 (``ip``, ``tc`` with the tbf qdisc). Three ``dbnode
serve`` hosts and a driver, each a Linux network namespace on a private
bridge (tests/netns.py; nothing leaves the namespaces), every host's link
shaped both ways by a token bucket (``tc qdisc ... tbf rate 1gbit``) as a
1 Gbit/s Ethernet port would be. First it measures what one TCP stream
gets through a shaped link; then it trains the MLP 784-1024-1024-10
(7.5 MB of parameters), batch 64, 3 replicas, 3 parameter shards (one of
each per host), fetching and pushing every step, with ``[wire]`` f32 and
bf16 everywhere, alternately, ``--rounds`` times each. It reports the
replicas' examples/s (``summary.json``), ``wire_bytes`` and the final
training loss, and the ratio bf16 / f32 of the median rates.

The hosts share this machine's cores, so each node runs with one thread
(``dbnode serve --threads 1``): the figure is about the network, which is
what a codec changes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
from common import environment

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import netns  # noqa: E402  (the tests' namespace testbed)

DBNODE = [sys.executable, "-m", "dbnode.cli"]
HOSTS = ["h1", "h2", "h3"]
PORT = 7070
LAYERS = [784, 1024, 1024, 10]

CONFIG = """\
[model]
layers = {layers}
activation = "relu"
output = "softmax"
loss = "cross_entropy"
init = "he"

[data]
train = "{data}"

[train]
replicas = 3
batch_size = 64
epochs = 1
eval_interval = 3600.0

[optimizer]
name = "sgd"
learning_rate = 0.01

[cluster]
parameter_shards = 3
"""

THROUGHPUT = """\
import socket, sys, time
host, port, mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((host, port))
chunk = bytes(1 << 20)
start = time.monotonic()
for _ in range(mb):
    s.sendall(chunk)
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(mb / (time.monotonic() - start))
"""

SINK = """\
import socket, sys
l = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
c, _ = l.accept()
buf = bytearray(1 << 20)
while c.recv_into(buf):
    pass
c.sendall(b"x")
"""


def shape(net: netns.Testbed, rate: str) -> None:
    """A token bucket on both ends of every host's veth: what the host sends
    and what it receives each pass at most ``rate``."""
    for i, host in enumerate(net.hosts, 1):
        for ns, dev in ((net.ns[host], "eth0"), (net.switch, f"p{i}")):
            done = netns._ip("netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root",
                             "tbf", "rate", rate, "burst", "256kb", "latency", "50ms",
                             check=False)  # fmt: skip
            if done.returncode:
                sys.exit(f"tc tbf refused on {host}: {done.stderr.strip()}")


def link_throughput(net: netns.Testbed, work: Path) -> float:
    """MB/s of one TCP stream from h1 to h2."""
    sink = net.start("h2", [sys.executable, "-c", SINK, net.address["h2"], "9000"], name="sink")
    sink.wait_for("ready")
    done = net.run("h1", [sys.executable, "-c", THROUGHPUT, net.address["h2"], "9000", "200"],
                   timeout=120)  # fmt: skip
    sink.stop()
    if done.returncode:
        sys.exit(f"throughput probe failed: {done.stderr}")
    return float(done.stdout)


def train(net: netns.Testbed, work: Path, secret: Path, codec: str, n: int) -> dict:
    out = work / f"run-{codec}-{n}"
    hosts = ",".join(f"{net.address[h]}:{PORT}" for h in HOSTS)
    sets = [a for k in ("fetch", "push", "activations") for a in ("--set", f'wire.{k}="{codec}"')]
    done = net.run(
        "driver",
        [*DBNODE, "train", str(work / "mlp.toml"), "--hosts", hosts, "--secret-file", str(secret),
         "--out", str(out), *sets],
        timeout=1800, cwd=ROOT,
    )  # fmt: skip
    if done.returncode:
        sys.exit(f"dbnode train failed:\n{done.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default="1gbit", help="tc rate of every link (default 1gbit)")
    parser.add_argument("--examples", type=int, default=7680, help="training examples")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each codec")
    args = parser.parse_args()
    reason = netns.unavailable()
    if reason:
        sys.exit(f"network benchmark: {reason}")
    print(environment())
    netns.remove_stale()
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="dbnode-network-"))
    secret = work / "secret"
    secret.write_bytes(os.urandom(32))
    secret.chmod(0o600)
    rng = np.random.default_rng(0)
    np.savez(work / "mlp.npz", X=rng.normal(size=(args.examples, LAYERS[0])).astype(np.float32),
             y=rng.integers(0, LAYERS[-1], args.examples))  # fmt: skip
    (work / "mlp.toml").write_text(CONFIG.format(layers=LAYERS, data=work / "mlp.npz"))
    net = netns.Testbed([*HOSTS, "driver"], work)
    try:
        net.up()
        shape(net, args.rate)
        print(f"links: tbf rate {args.rate}; one TCP stream h1 -> h2: "
              f"{link_throughput(net, work):.0f} MB/s", flush=True)  # fmt: skip
        for h in HOSTS:
            node = net.start(h, [*DBNODE, "serve", "--listen", f"{net.address[h]}:{PORT}",
                                 "--secret-file", str(secret), "--name", h, "--threads", "1"],
                             cwd=ROOT)  # fmt: skip
            node.wait_for(r"^dbnode serve: listening on (\S+)$", timeout=30)
        rates: dict[str, list[float]] = {"f32": [], "bf16": []}
        for n in range(args.rounds):
            for codec in rates:
                s = train(net, work, secret, codec, n)
                rates[codec].append(s["examples_per_second"])
                print(f"[wire] {codec:<4} round {n + 1}: {s['examples_per_second']:8,.0f} ex/s   "
                      f"wire_bytes {s['wire_bytes'] / 1e6:7.1f} MB   "
                      f"final train loss {s['final_train_loss']:.4f}", flush=True)  # fmt: skip
        f32, bf16 = (statistics.median(rates[c]) for c in ("f32", "bf16"))
        ratio = bf16 / f32
        print(f"bf16 / f32 examples/s: {ratio:.2f}x  "
              f"{'PASS' if ratio >= 1.7 else 'MISS'} (target >= 1.7x)")  # fmt: skip
    finally:
        net.down()


if __name__ == "__main__":
    main()
