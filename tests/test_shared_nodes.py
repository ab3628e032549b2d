"""Nodes as a shared service: several drivers, drivers that die, hosts named
twice, runs closed under a driver's feet. Real ``dbnode serve`` processes
and real ``dbnode train`` drivers on loopback."""

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import trio
from serve_node import DBNODE, ServeNode

from dbnode import control
from dbnode.wire import Peers

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture
def two(tmp_path):
    nodes = [ServeNode(tmp_path, f"shared-{i}") for i in range(2)]
    yield nodes
    for n in nodes:
        if n.alive():
            assert n.stop() == 0, "a node did not shut down cleanly"
        assert "Traceback" not in n.logs(), n.logs()[-3000:]


def train_cmd(nodes, config="xor.toml", *more, hosts=None):
    hosts = hosts or ",".join(n.address for n in nodes)
    return [*DBNODE, "train", str(EXAMPLES / config), "--hosts", hosts,
            "--secret-file", str(nodes[0].secret), *more]  # fmt: skip


def runs_on(nodes) -> list[dict]:
    """What ``dbnode status`` says of each node's runs."""
    out = subprocess.run(
        [*DBNODE, "status", "--hosts", ",".join(n.address for n in nodes),
         "--secret-file", str(nodes[0].secret), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [json.loads(line)["runs"] for line in out.stdout.splitlines()]


def test_two_drivers_share_the_nodes_and_each_gets_its_own_model(two, tmp_path):
    pytest.importorskip("sklearn")
    first = subprocess.Popen(
        train_cmd(two, "digits.toml", "--set", "train.epochs=80", "--out", str(tmp_path / "a")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    second = subprocess.Popen(
        train_cmd(two, "xor.toml", "--set", "model.layers=[2, 3, 1]", "--out", str(tmp_path / "b")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    names = set()
    deadline = time.monotonic() + 60
    while first.poll() is None and second.poll() is None and time.monotonic() < deadline:
        for runs in runs_on(two):
            names |= {r["name"] for r in runs.values()}
        time.sleep(0.2)
    _, err_a = first.communicate(timeout=180)
    _, err_b = second.communicate(timeout=180)
    assert first.returncode == 0, err_a[-3000:]
    assert second.returncode == 0, err_b[-3000:]
    assert any(n.startswith("digits-") for n in names) and any(n.startswith("xor-") for n in names)
    a = json.loads((tmp_path / "a" / "summary.json").read_text())
    b = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert a["run_id"] != b["run_id"]
    assert a["test_accuracy"] >= 0.95 and b["test_accuracy"] == 1.0
    assert b["config"]["model"]["layers"] == [2, 3, 1]
    assert runs_on(two) == [{}, {}]  # both closed their runs


@pytest.mark.parametrize("form", ["twice", "two names"])
def test_one_node_named_twice_is_used_once(two, tmp_path, form):
    a, b = two
    hosts = {
        "twice": f"{a.address},{a.address},{b.address}",
        "two names": f"127.0.0.1:{a.port},localhost:{a.port}",
    }[form]
    out = subprocess.run(
        train_cmd(two, "xor.toml", "--set", "train.epochs=1", "--out", str(tmp_path / "run"),
                  hosts=hosts),
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["nodes"] == (2 if form == "twice" else 1)
    assert [e for e in summary["events"] if e["event"] == "duplicate hosts"]
    assert all(n.alive() for n in two)


def test_a_driver_killed_outright_leaves_nothing_computing(two, tmp_path):
    driver = subprocess.Popen(
        train_cmd(two, "xor.toml", "--set", "train.epochs=200", "--set", "cluster.lease=1.5",
                  "--set", "cluster.heartbeat=0.5"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not any(runs_on(two)) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    driver.kill()
    driver.communicate(timeout=30)
    killed = time.monotonic()
    while True:
        # Timed from when each status call begins: the call itself (a CLI
        # process starting up, 0.5-1 s on a busy host) is no part of the lease.
        asked = time.monotonic() - killed
        runs = runs_on(two)
        if not any(runs) or asked > 10:
            break
        time.sleep(0.1)
    assert runs == [{}, {}]
    assert asked <= 1.5 + 1.0, asked  # the lease, and the sweep's period with slack
    before = [n.cpu_seconds() for n in two]
    time.sleep(1.0)
    assert all(n.cpu_seconds() - c < 0.2 for n, c in zip(two, before)), "still computing"


async def close_every_run(nodes) -> int:
    closed = 0
    async with trio.open_nursery() as nursery:
        peers = Peers(nursery, nodes[0].secret.read_bytes(), name="intruder")
        for n in nodes:
            ch = await peers.get(("127.0.0.1", n.port))
            for run_id in (await control.call(ch, control.Status())).runs:
                await control.call(ch, control.Close(run=run_id))
                closed += 1
        await peers.aclose()
    return closed


@pytest.mark.parametrize("delay", [0.5, 1.0, 1.5])
def test_runs_closed_mid_push_end_the_run_not_the_nodes(two, delay):
    """The old way to kill a node: drop a run's shards while its partitions
    push a block split over several shards."""
    driver = subprocess.Popen(
        train_cmd(two, "xor.toml", "--set", "train.epochs=50",
                  "--set", "cluster.parameter_shards=2", "--set", "model.partitions=2"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not any(runs_on(two)) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    assert trio.run(close_every_run, two) >= 1
    _, err = driver.communicate(timeout=120)
    assert driver.returncode == 1, err[-3000:]
    assert "Traceback" not in err
    assert all(n.alive() for n in two)
    assert runs_on(two) == [{}, {}]


def test_ctrl_c_of_drivers_never_ends_a_node(two):
    for delay in (0.3, 0.8, 1.3, 2.0):
        driver = subprocess.Popen(
            train_cmd(two, "xor.toml", "--set", "train.epochs=50",
                      "--set", "cluster.parameter_shards=2", "--set", "model.partitions=2"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(delay)
        driver.send_signal(signal.SIGINT)
        _, err = driver.communicate(timeout=60)
        assert driver.returncode in (130, 0), err[-3000:]
        assert all(n.alive() for n in two)
    assert runs_on(two) == [{}, {}]
