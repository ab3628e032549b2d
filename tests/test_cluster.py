"""Downpour SGD across real ``dbnode serve`` processes talking TCP on loopback."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import dbnode
from dbnode.config import RunConfig
from dbnode.data import XOR_ROWS, XOR_TARGETS
from dbnode.driver import load_data, train
from dbnode.driver.inputs import shard_optimizer
from dbnode.driver.planning import plan
from dbnode.model import init_params, load_params, predict
from dbnode.optim import from_wire, make_optimizer
from dbnode.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DBNODE = [sys.executable, "-m", "dbnode.cli"]


def start_node(secret_file: Path, name: str) -> tuple[subprocess.Popen, str]:
    # The node's log goes to the test's stderr: a pipe nobody reads would fill.
    proc = subprocess.Popen(
        [
            *DBNODE,
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--secret-file",
            str(secret_file),
            "--name",
            name,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.startswith("dbnode serve: listening on "), line
    return proc, line.rsplit(" ", 1)[1].strip()


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """Two nodes started by the test, as an operator would start them."""
    secret = tmp_path_factory.mktemp("secret") / "secret"
    secret.write_bytes(os.urandom(32))
    started = [start_node(secret, f"test-{i}") for i in range(2)]
    yield [addr for _, addr in started], secret
    for proc, _ in started:
        proc.send_signal(signal.SIGTERM)
    for proc, _ in started:
        assert proc.wait(timeout=10) == 0  # SIGTERM is a clean shutdown
        proc.stdout.close()


def hosts_of(nodes):
    addresses, secret = nodes
    return [(a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1])) for a in addresses], secret.read_bytes()


def serve_processes(parent: int | None = None) -> dict[int, str]:
    """Pid -> node name of every ``dbnode serve`` process on the machine (or
    only the children of ``parent``)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent is not None and ppid != parent:
                continue
            if b"dbnode.cli" in cmdline and b"serve" in cmdline:
                name = cmdline[cmdline.index(b"--name") + 1] if b"--name" in cmdline else b""
                found[int(entry.name)] = name.decode()
    return found


def serve_pids() -> set[int]:
    return set(serve_processes())


@pytest.mark.parametrize("partitions,shards", [(1, 1), (2, 2), (3, 1), (3, 3)])
def test_one_replica_reproduces_the_single_process_trainer(nodes, tmp_path, partitions, shards):
    raw = {
        "model": {
            "layers": [8, 6, 5, 3],
            "activation": "tanh",
            "output": "softmax",
            "loss": "cross_entropy",
            "dtype": "float64",
            "init": "xavier",
            "partitions": partitions,
        },
        "data": {"train": "blobs:150"},
        # One minibatch in flight: the trainer's step order (pipelined runs
        # are checked against their replay in test_pipeline.py).
        "train": {"replicas": 1, "batch_size": 1, "epochs": 2, "seed": 4, "pipeline": 1},
        "optimizer": {"name": "sgd", "learning_rate": 0.1},
        "cluster": {"parameter_shards": shards},
    }
    config = RunConfig.from_dict(raw)
    hosts, secret = hosts_of(nodes)
    summary = train(config, hosts=hosts, out_dir=tmp_path, secret=secret)
    x, y, _, _ = load_data(config)  # 90% of the 150: 10% held out
    assert summary.examples == 2 * 135 == 2 * len(x)
    assert summary.replicas == 1 and summary.partitions == partitions

    spec = config.spec()
    ref = init_params(spec, "xavier", seed=4)
    Trainer(spec, ref, make_optimizer("sgd", 0.1)).fit(x, y, batch_size=1, epochs=2, seed=4)
    got = load_params(tmp_path / "model.npz", spec)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "optimizer,schedule",
    [({"name": "sgd", "learning_rate": 0.2}, {"name": "step", "every": 1, "factor": 0.5}),
     ({"name": "adam", "learning_rate": 0.02}, {"name": "cosine", "min_factor": 0.1})],
)  # fmt: skip
def test_schedules_and_adam_on_the_shards_reproduce_the_single_process_trainer(
    nodes, tmp_path, optimizer, schedule
):
    """The shards apply the schedule by each piece's update count: one
    replica matches the trainer stepping the same scheduled optimizer."""
    config = RunConfig.from_dict({
        "model": {"layers": [8, 6, 3], "activation": "tanh", "output": "softmax",
                  "loss": "cross_entropy", "dtype": "float64", "init": "xavier",
                  "partitions": 2},
        "data": {"train": "blobs:120"},
        "train": {"replicas": 1, "batch_size": 4, "epochs": 3, "seed": 4, "pipeline": 1},
        "optimizer": optimizer, "schedule": schedule, "cluster": {"parameter_shards": 2},
    })  # fmt: skip
    hosts, secret = hosts_of(nodes)
    train(config, hosts=hosts, out_dir=tmp_path, secret=secret)
    x, y, _, _ = load_data(config)
    wire = shard_optimizer(config, [slice(0, len(x))])
    assert wire["schedule"]["name"] == schedule["name"]
    spec = config.spec()
    ref = init_params(spec, "xavier", seed=4)
    Trainer(spec, ref, from_wire(wire)).fit(x, y, batch_size=4, epochs=3, seed=4)
    got = load_params(tmp_path / "model.npz", spec)
    constant = init_params(spec, "xavier", seed=4)
    Trainer(spec, constant, from_wire(config.optimizer.to_wire())).fit(
        x, y, batch_size=4, epochs=3, seed=4
    )
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=0, atol=1e-9)
    assert any(not np.allclose(ref[n], constant[n]) for n in ref)  # the schedule mattered


def run_cli(*args, timeout=300):
    return subprocess.run([*DBNODE, *args], capture_output=True, text=True, timeout=timeout)


def run_watching(*args, timeout=300) -> tuple[subprocess.CompletedProcess, set[int]]:
    """Run ``dbnode ARGS`` and note every ``dbnode serve`` child it starts."""
    proc = subprocess.Popen(
        [*DBNODE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    with Drain(proc) as output:
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= set(serve_processes(proc.pid))
            time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, *output), seen


class Drain:
    """Read a process's stdout and stderr in threads (a full pipe would stall
    it); inside the ``with``, the yielded list becomes [stdout, stderr]."""

    def __init__(self, proc):
        self.proc, self.out, self.err = proc, [], []
        self.threads = [
            threading.Thread(target=lambda: self.out.append(proc.stdout.read())),
            threading.Thread(target=lambda: self.err.append(proc.stderr.read())),
        ]

    def __enter__(self):
        self.result = ["", ""]
        for t in self.threads:
            t.start()
        return self.result

    def __exit__(self, *exc):
        for t in self.threads:
            t.join(timeout=30)
        self.result[0], self.result[1] = "".join(self.out), "".join(self.err)


def test_xor_example_converges_on_the_embedded_cluster(tmp_path):
    out, nodes = run_watching("train", str(EXAMPLES / "xor.toml"), "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    assert nodes  # it did start its embedded cluster
    config = RunConfig.load(EXAMPLES / "xor.toml")
    assert config.replicas_for(50_000) == 25
    params = load_params(tmp_path / "model.npz", config.spec())
    rows = predict(config.spec(), params, XOR_ROWS)[:, 0]
    assert np.all((rows > 0.5) == (XOR_TARGETS > 0.5)), rows
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["replicas"] == 25 and summary["examples"] == 50_000
    assert summary["test_accuracy"] == 1.0
    # Standard output piped: the summary as JSON, for scripts.
    assert json.loads(out.stdout)["run_id"] == summary["run_id"]
    metrics = (tmp_path / "metrics.csv").read_text().splitlines()
    assert (
        metrics[0] == ("epoch,examples,seconds,train_loss,train_accuracy,test_loss,test_accuracy")
        and len(metrics) >= 2
    )
    wait_until_gone(nodes)  # and stopped it


def test_digits_example_on_hosts_given_by_the_command_line(nodes, tmp_path):
    pytest.importorskip("sklearn")
    addresses, secret = nodes
    out = run_cli(
        "train",
        str(EXAMPLES / "digits.toml"),
        "--hosts",
        ",".join(addresses),
        "--secret-file",
        str(secret),
        "--out",
        str(tmp_path),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.95
    assert summary["replicas"] == 4 and summary["partitions"] == 2 and summary["nodes"] == 2
    evaluated = run_cli("eval", str(tmp_path / "model.npz"), "--data", "digits")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["accuracy"] >= 0.95


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.layers=[3, 2, 1]", "examples have 2 features, model.layers[0] is 3"),
        ("train.batch_size=0", "train.batch_size"),
        ("optimizer.name=nadam", "optimizer.name"),
        ("model.colour=1", "model.colour"),
        ("data.train=missing.csv", "missing.csv"),
    ],
)
def test_bad_configs_fail_clearly_before_starting_anything(override, message):
    out, nodes = run_watching("train", str(EXAMPLES / "xor.toml"), "--set", override, timeout=60)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert not nodes


def test_unreachable_host_is_named(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32))
    out = run_cli(
        "train",
        str(EXAMPLES / "xor.toml"),
        "--hosts",
        "127.0.0.1:1",
        "--secret-file",
        str(secret),
        timeout=60,
    )
    assert out.returncode == 1
    assert "127.0.0.1:1" in out.stderr and "unreachable" in out.stderr


def test_bad_initial_weights_are_caught_before_any_node_starts(tmp_path):
    bad = tmp_path / "w.npz"
    np.savez(
        bad, **init_params(RunConfig.load(EXAMPLES / "xor.toml", ["model.layers=[2, 3, 1]"]).spec())
    )
    out, nodes = run_watching(
        "train", str(EXAMPLES / "xor.toml"), "--set", f'model.init="{bad}"', timeout=60
    )
    assert out.returncode == 2, out.stderr
    assert "model.init" in out.stderr and "layer0.weight has shape (3, 2)" in out.stderr
    assert not nodes


def wait_for_nodes(driver: subprocess.Popen, count: int, timeout: float = 30) -> dict[int, str]:
    """The embedded cluster of a ``dbnode train`` process: its children."""
    deadline = time.monotonic() + timeout
    while len(serve_processes(driver.pid)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    nodes = serve_processes(driver.pid)
    assert len(nodes) >= count, "the embedded cluster never started"
    return nodes


def wait_until_gone(pids: set[int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while serve_pids() & pids and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not serve_pids() & pids, "nodes were left running"


def node_with(role: str, config: Path, sets: list[str]) -> str:
    """The embedded node the placement gives parameter shard 0 (``role``
    "shard"), or the first with partitions and no shard ("partitions")."""
    config = RunConfig.load(config, sets[1::2])
    planned = plan(config)
    roles = [planned.placement.on_host(i) for i in range(len(planned.nodes))]
    if role == "shard":
        index = planned.placement.shards[0]
    else:
        index = next(i for i, r in enumerate(roles) if r["partitions"] and not r["shards"])
    return planned.nodes[index].name


def embedded_node(driver: subprocess.Popen, name: str) -> tuple[int, set[int]]:
    """The pid of the embedded node called ``name``, and all of them."""
    nodes = wait_for_nodes(driver, 3)
    return next(pid for pid, n in nodes.items() if n == name), set(nodes)


def test_killing_the_node_that_holds_the_parameters_with_no_copy_fails_clearly(tmp_path):
    sets = ["--set", "cluster.nodes=3", "--set", "cluster.backup_interval=0"]
    proc = subprocess.Popen(
        [*DBNODE, "train", str(EXAMPLES / "xor.toml"), *sets, "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    victim, nodes = embedded_node(proc, node_with("shard", EXAMPLES / "xor.toml", sets))
    wait_training(tmp_path)  # a node killed during set-up fails the run otherwise
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    assert "died holding parameter shards and there is no copy to restore them from" in err, err
    wait_until_gone(nodes)


def test_a_replica_node_killed_mid_run_is_replaced_and_the_run_completes(tmp_path):
    """kill -9 of a node holding partitions of pipelined replicas (two
    minibatches in flight): each is restarted from the first step the shards
    have not applied for all its partitions, and the run completes with a
    good model in which every step of every partition was applied once."""
    pytest.importorskip("sklearn")
    common = [
        "--set",
        "cluster.nodes=3",
        "--set",
        "cluster.parameter_shards=1",
        "--set",
        "train.epochs=60",
        "--set",
        "cluster.heartbeat=0.5",
        "--set",
        "train.pipeline=2",
    ]
    calm = run_cli("train", str(EXAMPLES / "digits.toml"), *common, "--out", str(tmp_path / "calm"))
    assert calm.returncode == 0, calm.stderr[-2000:]
    calm_accuracy = json.loads((tmp_path / "calm" / "summary.json").read_text())["test_accuracy"]

    proc = subprocess.Popen(
        [*DBNODE, "train", str(EXAMPLES / "digits.toml"), *common, "--out", str(tmp_path / "hit")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    victim, nodes = embedded_node(proc, node_with("partitions", EXAMPLES / "digits.toml", common))
    wait_training(tmp_path / "hit")  # a node killed during set-up fails the run instead
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "hit" / "summary.json").read_text())
    assert summary["dead_nodes"] and summary["restarts"], summary
    assert all(r["at_step"] >= 0 for r in summary["restarts"])
    assert summary["pipeline"]["depth"] == 2
    assert summary["pipeline"]["partitions"][0]["stashed"] == 1
    assert summary["examples"] == calm_json_examples(tmp_path)
    assert summary["test_accuracy"] >= calm_accuracy - 0.02
    # Nothing lost, nothing twice: re-pushed steps are dropped as retries.
    calm_pushes = json.loads((tmp_path / "calm" / "summary.json").read_text())["pushes"]
    assert summary["pushes"]["applied"] == calm_pushes["applied"], summary["restarts"]
    wait_until_gone(nodes)


def wait_training(out: Path, timeout: float = 30) -> None:
    """Until the run in ``out`` has logged its first evaluation (it trains)."""
    metrics, deadline = out / "metrics.csv", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) > 1:
            return
        time.sleep(0.05)
    raise AssertionError(f"{out}: no evaluation within {timeout} s")


def calm_json_examples(tmp_path):
    return json.loads((tmp_path / "calm" / "summary.json").read_text())["examples"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_signal_stops_the_run_writes_its_outputs_and_says_how_to_resume(tmp_path, sig):
    out = tmp_path / "out"
    more = ["--set", "checkpoint.interval=60"] if sig != signal.SIGHUP else []
    proc = subprocess.Popen(
        [*DBNODE, "train", str(EXAMPLES / "xor.toml"), "--set", "train.epochs=20",
         "--out", str(out), *more],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    nodes = set(wait_for_nodes(proc, 1))
    time.sleep(2.0)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert f"stopped by {signal.Signals(sig).name}; outputs written to {out}" in err, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] == signal.Signals(sig).name
    assert 0 < summary["examples"] < 20 * 50_000
    assert (out / "model.npz").exists() and (out / "metrics.csv").exists()
    if more:  # a final checkpoint, and the command that goes on from it
        assert "resume with: dbnode train" in err and "--resume" in err, err
        assert [e for e in summary["events"] if e["event"] == "checkpoint"]
    else:
        assert "no checkpoint (checkpointing is off" in err, err
    assert "Traceback" not in err
    wait_until_gone(nodes)


def test_status_reports_each_node_and_names_the_unreachable(nodes, tmp_path):
    addresses, secret = nodes
    out = run_cli(
        "status", "--hosts", ",".join(addresses), "--secret-file", str(secret), "--json",
        timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    entries = [json.loads(line) for line in out.stdout.splitlines()]
    assert [e["address"] for e in entries] == addresses
    assert {e["node"]["name"] for e in entries} == {"test-0", "test-1"}
    assert all("runs" in e and "node_id" in e["node"] for e in entries)
    out = run_cli(
        "status", "--hosts", f"{addresses[0]},127.0.0.1:1", "--secret-file", str(secret),
        "--json", timeout=60,
    )  # fmt: skip
    assert out.returncode == 1
    assert "error" in json.loads(out.stdout.splitlines()[1])
    table = run_cli("status", "--hosts", f"{addresses[0]},127.0.0.1:1", "--secret-file",
                    str(secret), "--interval", "0.2", timeout=60)  # fmt: skip
    assert table.returncode == 1 and "127.0.0.1:1  UNREACHABLE" in table.stdout


def test_status_shows_a_running_run_with_its_rates(nodes, tmp_path):
    addresses, secret = nodes
    proc = subprocess.Popen(
        [*DBNODE, "train", str(EXAMPLES / "xor.toml"), "--hosts", ",".join(addresses),
         "--secret-file", str(secret), "--set", "train.epochs=20", "--set", "model.partitions=2",
         "--set", "train.examples_per_replica=50000", "--out", str(tmp_path / "run"), "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline, table, parts = time.monotonic() + 60, "", []

        def rated(parts):  # both partitions seen in both looks: rates for each
            return len(parts) == 2 and all("/s steps" in line for line in parts)

        while time.monotonic() < deadline and not rated(parts):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            table = run_cli("status", "--hosts", ",".join(addresses), "--secret-file",
                            str(secret), "--interval", "0.5", timeout=60).stdout  # fmt: skip
            parts = [line for line in table.splitlines() if "partition" in line]
        assert "  run xor-" in table and "shard " in table and "pushes" in table, table
        assert "staleness mean " in table, table  # how stale the applied pushes were
        assert rated(parts), table
        assert any("-> 127.0.0.1:" in line for line in parts), table  # activations cross nodes
        assert all(" idle " in line for line in parts), table  # waiting on its neighbours
    finally:
        proc.send_signal(signal.SIGINT)  # a clean stop closes the run on the shared nodes
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=30)


@pytest.mark.parametrize("role", ["partitions", "shard"])
def test_a_frozen_node_is_declared_dead_within_three_heartbeats_and_replaced(tmp_path, role):
    """A node with replica partitions only; or one with the parameter shard
    too, which is restored elsewhere: when it thaws, it is fenced off and
    rejoins empty."""
    pytest.importorskip("sklearn")
    heartbeat = 0.5
    sets = ["--set", "cluster.nodes=3", "--set", "cluster.parameter_shards=1",
            "--set", "train.epochs=150", "--set", f"cluster.heartbeat={heartbeat}"]  # fmt: skip
    proc = subprocess.Popen(
        [*DBNODE, "train", str(EXAMPLES / "digits.toml"), *sets, "--out", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    victim, nodes = embedded_node(proc, node_with(role, EXAMPLES / "digits.toml", sets))
    time.sleep(2.5)  # past the run's start and the driver's first shard backup
    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.time()
    try:
        deadline = time.monotonic() + 30
        while (
            not (tmp_path / "summary.json").exists()
            and proc.poll() is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.1)
            if time.time() - stopped_at > 4 * heartbeat:
                break
    finally:
        os.kill(victim, signal.SIGCONT)  # it comes back; its old partitions must stop
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    dead = [e for e in summary["events"] if e["event"] == "node dead"]
    assert dead, summary["events"]
    # Detected within 3 heartbeats (+ one polling round and scheduling slack).
    assert dead[0]["time"] - stopped_at <= 3 * heartbeat + 0.2 + 0.5, (dead[0], stopped_at)
    rejoined = [e for e in summary["events"] if e["event"] == "node rejoined"]
    assert rejoined and rejoined[0]["stale_partitions"] >= 1, summary["events"]
    if role == "shard":
        assert rejoined[0]["stale_keys"] >= 1  # its copy of the shard, dropped
        restored = [e for e in summary["events"] if e["event"] == "shards restored"]
        assert restored and restored[0]["epoch"] == 1
    assert summary["restarts"]
    assert summary["test_accuracy"] >= 0.93
    wait_until_gone(nodes)


@pytest.mark.parametrize("copy", ["backup", "checkpoint"])
def test_a_shard_node_killed_mid_run_is_restored_and_the_run_completes(tmp_path, copy):
    """Default settings (the driver's in-memory backups) and checkpoints alone."""
    pytest.importorskip("sklearn")
    common = [
        "--set",
        "cluster.nodes=3",
        "--set",
        "cluster.parameter_shards=1",
        "--set",
        "train.epochs=150",
        "--set",
        "cluster.heartbeat=0.5",
    ]
    if copy == "checkpoint":
        common += ["--set", "checkpoint.interval=0.3", "--set", "checkpoint.keep=2",
                   "--set", "cluster.backup_interval=0"]  # fmt: skip
    calm = run_cli("train", str(EXAMPLES / "digits.toml"), *common, "--out", str(tmp_path / "calm"))
    assert calm.returncode == 0, calm.stderr[-2000:]
    calm_summary = json.loads((tmp_path / "calm" / "summary.json").read_text())

    proc = subprocess.Popen(
        [*DBNODE, "train", str(EXAMPLES / "digits.toml"), *common, "--out", str(tmp_path / "hit")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    victim, nodes = embedded_node(proc, node_with("shard", EXAMPLES / "digits.toml", common))
    time.sleep(1.5)
    if copy == "checkpoint":  # a busy machine may take longer to write the first one
        written = tmp_path / "hit" / "checkpoints"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(
            p.name.startswith("ckpt-") and not p.name.endswith(".tmp")
            for p in (written.iterdir() if written.exists() else ())
        ):
            time.sleep(0.05)
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((tmp_path / "hit" / "summary.json").read_text())
    restored = [e for e in summary["events"] if e["event"] == "shards restored"]
    # The copy's age: its interval (backups 1 s, checkpoints 0.3 s), the
    # detection (3 heartbeats) and a round of slack.
    assert restored and restored[0]["seconds_lost"] <= 1.0 + 3 * 0.5 + 1.0, restored
    assert restored[0]["source"].startswith(copy), restored
    assert summary["lost_updates"] == sum(e["lost_updates"] for e in restored)
    assert summary["test_accuracy"] >= calm_summary["test_accuracy"] - 0.02, (summary, calm_summary)
    if copy == "checkpoint":
        checkpoints = sorted(p.name for p in (tmp_path / "hit" / "checkpoints").iterdir())
        assert len(checkpoints) <= 2 and all(not c.endswith(".tmp") for c in checkpoints)
    wait_until_gone(nodes)


def test_a_killed_run_resumes_from_its_newest_checkpoint(tmp_path):
    pytest.importorskip("sklearn")
    # Long enough (3-6 s of training on two cores) that the driver is surely
    # killed mid-run: it dies at the first checkpoint, 0.3 s in.
    common = ["--set", "train.epochs=60", "--set", "checkpoint.interval=0.3"]
    first = tmp_path / "first"
    proc = subprocess.Popen(
        [*DBNODE, "train", str(EXAMPLES / "digits.toml"), *common, "--out", str(first)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    nodes = set(wait_for_nodes(proc, 1))
    deadline = time.monotonic() + 60
    while not list((first / "checkpoints").glob("ckpt-*[0-9]")) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()  # the driver dies outright
    proc.communicate(timeout=30)
    wait_until_gone(nodes)  # its nodes follow it (stdin closes)
    assert not (first / "summary.json").exists()

    out = run_cli(
        "train",
        str(EXAMPLES / "digits.toml"),
        *common,
        "--resume",
        str(first),
        "--out",
        str(tmp_path / "second"),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "second" / "summary.json").read_text())
    resumed = [e for e in summary["events"] if e["event"] == "resumed"]
    assert resumed and "ckpt-" in resumed[0]["checkpoint"]
    assert summary["test_accuracy"] >= 0.95

    other = run_cli(
        "train",
        str(EXAMPLES / "digits.toml"),
        *common,
        "--set",
        "train.seed=9",
        "--resume",
        str(first),
        timeout=60,
    )
    assert (
        other.returncode == 2 and "train.seed=9: differs from the checkpoint's (0" in other.stderr
    )
    empty = run_cli(
        "train", str(EXAMPLES / "digits.toml"), "--resume", str(tmp_path / "none"), timeout=60
    )
    assert empty.returncode == 2 and "no complete checkpoint" in empty.stderr


def test_a_run_whose_replicas_all_diverge_fails_and_keeps_the_last_finite_model(tmp_path):
    pytest.importorskip("sklearn")
    out = run_cli(
        "train", str(EXAMPLES / "digits.toml"), "--set", "optimizer.learning_rate=1e8",
        "--set", "model.activation=\"linear\"", "--set", "train.epochs=3", "--out", str(tmp_path),
    )  # fmt: skip
    assert out.returncode == 1, out.stderr[-3000:]
    assert "diverged at step" in out.stderr and "lower optimizer.learning_rate" in out.stderr
    assert "Traceback" not in out.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["diverged"]) == summary["replicas"] and summary["restarts"] == []
    model = dbnode.load(tmp_path)
    assert all(np.isfinite(p).all() for p in model.params.values())


def test_a_replica_that_diverges_alone_stops_and_the_summary_counts_what_was_trained(tmp_path):
    """One replica's data shard overflows (its gradients are NaN at once):
    it stops, the others train on, and the summary's examples (and rate)
    are those trained, not every example of every epoch."""
    sklearn = pytest.importorskip("sklearn.datasets")
    x, y = sklearn.load_digits(return_X_y=True)
    x, y = (x / 16).astype(np.float32)[:1792], y[:1792]
    x_test, y_test = x.copy(), y.copy()
    x[-448:] *= 3e38  # the last of 4 replicas' shard
    config = RunConfig.from_dict({
        "model": {"layers": [64, 32, 10], "activation": "relu", "output": "softmax",
                  "loss": "cross_entropy"},
        "train": {"batch_size": 16, "epochs": 5, "replicas": 4, "seed": 0},
        "optimizer": {"name": "sgd", "learning_rate": 0.05},
    })  # fmt: skip
    summary = train(config, out_dir=tmp_path, x=x, y=y, x_test=x_test, y_test=y_test)
    assert [d["replica"] for d in summary.diverged] == [3], summary.diverged
    total = 5 * len(x)
    assert total * 3 // 4 <= summary.examples < total * 3 // 4 + 16 * 4, summary.examples
    rate = summary.examples / summary.train_seconds
    assert summary.examples_per_second == pytest.approx(rate, rel=0.01)
    assert summary.test_accuracy >= 0.85


def test_huge_weights_earn_a_warning(tmp_path):
    pytest.importorskip("sklearn")
    out = run_cli(
        "train", str(EXAMPLES / "digits.toml"), "--set", "optimizer.learning_rate=1e4",
        "--set", "train.epochs=2", "--out", str(tmp_path),
    )  # fmt: skip
    # Asynchronous replicas at this rate may also overflow to infinity (the
    # run then fails as diverged): the warning comes either way.
    assert out.returncode in (0, 1) and "Traceback" not in out.stderr, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert any("learning rate" in w for w in summary["warnings"]), summary["warnings"]
    assert "is probably too high" in out.stderr
    if out.returncode == 1:
        assert "diverged" in out.stderr and "lower optimizer.learning_rate" in out.stderr


def test_non_finite_targets_are_refused_before_anything_starts(tmp_path):
    data = tmp_path / "bad.csv"
    data.write_text("0,0,0\n0,1,1\n1,0,nan\n1,1,0\n")
    out, nodes = run_watching(
        "train", str(EXAMPLES / "xor.toml"), "--set", f'data.train="{data}"', timeout=60
    )
    assert out.returncode == 2, out.stderr
    assert "targets hold NaN or infinity (example 2)" in out.stderr
    assert not nodes


def test_a_node_logs_its_runs_and_says_what_it_is_doing_when_asked(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32))
    log_path = tmp_path / "node.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [*DBNODE, "serve", "--listen", "127.0.0.1:0", "--secret-file", str(secret),
             "--name", "watched"],
            stdout=subprocess.PIPE, stderr=log_file, text=True,
        )  # fmt: skip
        try:
            address = proc.stdout.readline().rsplit(" ", 1)[1].strip()
            done = run_cli("train", str(EXAMPLES / "xor.toml"), "--hosts", address,
                           "--secret-file", str(secret), "--set", "train.epochs=1",
                           "--set", 'data.train="xor:4000"', "--out", str(tmp_path / "run"))  # fmt: skip
            assert done.returncode == 0, done.stderr[-3000:]
            dumped = run_cli("status", "--hosts", address, "--secret-file", str(secret), "--dump")
            assert dumped.returncode == 0, dumped.stderr
            assert f"==== {address}" in dumped.stdout and "== trio tasks" in dumped.stdout
            assert "== thread MainThread" in dumped.stdout
            proc.send_signal(signal.SIGUSR1)  # the same, into its log; it keeps serving
            deadline = time.monotonic() + 10
            while "== trio tasks" not in log_path.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            again = run_cli("status", "--hosts", address, "--secret-file", str(secret), "--json")
            assert again.returncode == 0 and proc.poll() is None
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
    text = log_path.read_text()
    for seen in (" opened, lease ", "partition 1 of replica 0, layers [0, 2)", "done: ",
                 " freed: closed by its driver", "connection from 127.0.0.1:", "(driver)",
                 "== trio tasks"):  # fmt: skip
        assert seen in text, (seen, text[-3000:])
    assert "INFO" in text and "Traceback" not in text
