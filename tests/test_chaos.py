"""Chaos: a digits run on three real nodes while a seeded schedule kills
(-9), freezes (SIGSTOP/SIGCONT) and restarts them, one at a time. The run
must complete within 2 points of an undisturbed one, and account for every
push: those the shards acknowledged are in the final model or counted lost
with a dead shard node, never applied twice.

``DBNODE_CHAOS_EPOCHS`` makes the runs longer (the default, 250 epochs, keeps
the suite short: 22-26 s runs and 6-7 disturbances each on a slow 2-core
host; the seeded schedules' second disturbance ends 5.4 and 8.1 s in).
"""

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from serve_node import DBNODE, ServeNode

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits.toml"
EPOCHS = int(os.environ.get("DBNODE_CHAOS_EPOCHS", "250"))


@pytest.fixture
def cluster(tmp_path):
    nodes = [ServeNode(tmp_path, f"chaos-{i}") for i in range(3)]
    yield nodes
    for n in nodes:
        if n.alive():
            assert n.stop() == 0, n.name
        assert "Traceback" not in n.logs(), n.logs()[-3000:]


def train(nodes, out: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*DBNODE, "train", str(DIGITS), "--hosts", ",".join(n.address for n in nodes),
         "--secret-file", str(nodes[0].secret), "--out", str(out),
         "--set", f"train.epochs={EPOCHS}", "--set", "cluster.heartbeat=0.5",
         "--set", "cluster.parameter_shards=2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def chaos(nodes, driver: subprocess.Popen, rng: random.Random) -> list[str]:
    """Disturb one node at a time until the run ends; what was done, in order."""
    done = []
    # The clock starts once the run's partitions are started (the driver
    # has backed the shards up before creating them).
    deadline = time.monotonic() + 60
    while not any(", from step" in n.logs() for n in nodes) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(rng.uniform(1.5, 2.5))
    while driver.poll() is None:
        node = rng.choice(nodes)
        what = rng.choice(["kill", "freeze", "restart"])
        if what == "freeze":
            node.proc.send_signal(signal.SIGSTOP)
            time.sleep(rng.uniform(1.0, 3.0))  # past the 1.5 s detection, or not
            node.proc.send_signal(signal.SIGCONT)
        else:
            port = node.port
            node.kill()
            time.sleep(rng.uniform(0.5, 2.5) if what == "restart" else rng.uniform(2.0, 3.0))
            node.start(port)  # a new process on the old address: it rejoins empty
        done.append(f"{what} {node.name}")
        time.sleep(rng.uniform(0.5, 1.5))
    return done


@pytest.fixture(scope="module")
def calm(tmp_path_factory):
    pytest.importorskip("sklearn")
    tmp = tmp_path_factory.mktemp("calm")
    nodes = [ServeNode(tmp, f"calm-{i}") for i in range(3)]
    try:
        driver = train(nodes, tmp / "out")
        _, err = driver.communicate(timeout=600)
        assert driver.returncode == 0, err[-3000:]
    finally:
        for n in nodes:
            n.kill()
    return json.loads((tmp / "out" / "summary.json").read_text())


def test_an_undisturbed_run_applies_exactly_what_was_acknowledged(calm):
    # Every acknowledged push is in the model or was dropped as a copy of one
    # that is (a backup's); copies the driver stopped may have pushed after
    # their last report, so acknowledged may fall short. Without backups
    # the two are equal (tests/test_leases.py: as many applied either way).
    pushes = calm["pushes"]
    assert 0 < pushes["acknowledged"] <= pushes["applied"] + pushes["duplicates"]
    assert calm["lost_updates"] == 0 and calm["dead_nodes"] == []


@pytest.mark.parametrize("seed", [1, 2])
def test_a_run_survives_kills_freezes_and_restarts(cluster, tmp_path, calm, seed):
    rng = random.Random(seed)
    driver = train(cluster, tmp_path / "out")
    done = chaos(cluster, driver, rng)
    _, err = driver.communicate(timeout=600)
    assert driver.returncode == 0, (done, err[-4000:])
    assert len(done) >= 2, f"the run ended after {done}: make it longer"
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["test_accuracy"] >= calm["test_accuracy"] - 0.02, (done, summary)
    pushes, lost = summary["pushes"], summary["lost_updates"]
    # Applied never exceeds what was acknowledged plus what partitions on a
    # dead node had acknowledged since their last report (nothing counted
    # twice); acknowledged pushes missing from the model are counted lost,
    # but for those that reached a shard node after its last heartbeat.
    assert pushes["applied"] <= pushes["acknowledged"] * 1.05 + 200, (done, summary)
    assert pushes["applied"] + pushes["duplicates"] + lost >= pushes["acknowledged"] * 0.9, (
        done,
        summary,
    )
    assert "Traceback" not in err
