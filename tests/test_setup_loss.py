"""A node lost at the edges of a run -- while it is set up (its replicas
being created and their data shipped), as the warm-up ends (the held
replicas set running), or as it finishes (before the final model is read)
-- is dealt with as one lost mid-run: its shards restored from the
driver's copy, its replicas restarted on the others (past any node that
refuses them); or, with nothing to restore its shards from, the run fails
saying so.

Three real ``dbnode serve`` processes; the victim is killed (-9) from a
wrapper around the driver's own step (creating the second replica, setting
the held ones running, finishing), so the loss falls at that point every
time (a timed kill lands anywhere, depending on the machine's load)."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from serve_node import ServeNode
from test_cluster import EXAMPLES

import dbnode
from dbnode import control
from dbnode.config import parse_address
from dbnode.driver import run as driver_run
from dbnode.driver.state import RunState
from dbnode.errors import DBNodeError
from dbnode.wire import MessageKind


@pytest.fixture
def nodes(tmp_path):
    started = [ServeNode(tmp_path, f"setup-{i}") for i in range(3)]
    yield started
    for node in started:
        node.kill()


def kill_during_setup(monkeypatch, nodes, victim: str) -> list:
    """Kill ``victim`` ("shard": the node of parameter shard 0; "partitions":
    one of the second replica's nodes holding no shard) as the driver is
    about to create the second replica. Returns, once done, the killed
    node's address and the indices of the replicas placed on it."""
    killed: list = []
    launch = RunState.launch

    async def launch_and_kill(state, replica, inputs, run):
        if replica is state.replicas[1] and not killed:
            if victim == "shard":
                host = state.shard_hosts[0]
            else:
                host = next(h for h in replica.hosts if h not in state.shard_hosts)
            address = kill(nodes, host)
            killed.extend([address, {r.index for r in state.replicas if host in r.hosts}])
        await launch(state, replica, inputs, run=run)

    monkeypatch.setattr(RunState, "launch", launch_and_kill)
    return killed


def kill(nodes, host) -> str:
    """``kill -9`` the node at ``host``, and wait for it; its address."""
    address = f"{host[0]}:{host[1]}"
    node = next(n for n in nodes if n.address == address)
    os.kill(node.proc.pid, signal.SIGKILL)
    node.proc.wait()
    return address


def train_on(nodes, out, *sets: str) -> dbnode.Summary:
    """Train :func:`config` with ``sets`` on ``nodes``, into ``out``."""
    return dbnode.train(
        config(*sets),
        hosts=[parse_address(n.address) for n in nodes],
        secret=nodes[0].secret.read_bytes(),
        out_dir=out,
    )


def config(*sets: str) -> dbnode.RunConfig:
    return dbnode.RunConfig.load(
        EXAMPLES / "digits.toml",
        ["train.epochs=20", "cluster.heartbeat=0.5", "cluster.parameter_shards=1", *sets],
    )


@pytest.mark.parametrize("victim", ["partitions", "shard"])
def test_a_node_lost_while_the_run_is_set_up_is_replaced(tmp_path, nodes, monkeypatch, victim):
    pytest.importorskip("sklearn")
    killed = kill_during_setup(monkeypatch, nodes, victim)
    summary = train_on(nodes, tmp_path / "out")
    address, placed = killed
    assert summary.dead_nodes == [address], (killed, summary.dead_nodes)
    # Its replicas, and only they, went on elsewhere, for that reason (the
    # others' first fetches found the shards where they were restored).
    assert {r["replica"] for r in summary.restarts} == placed, summary.restarts
    assert all(r["reason"] == f"node {address} is dead" for r in summary.restarts)
    if victim == "shard":
        restored = [e for e in summary.events if e["event"] == "shards restored"]
        assert restored and restored[0]["source"] == "backup", summary.events
    assert summary.examples == 20 * 1438
    assert summary.test_accuracy >= 0.93
    model = dbnode.load(tmp_path / "out")
    assert all(np.isfinite(w).all() for w in model.params.values())


def test_without_a_copy_a_shard_node_lost_during_set_up_fails_the_run_clearly(
    tmp_path, nodes, monkeypatch
):
    killed = kill_during_setup(monkeypatch, nodes, "shard")
    with pytest.raises(DBNodeError, match="died holding parameter shards and there is no copy"):
        train_on(nodes, tmp_path / "out", "cluster.backup_interval=0")
    assert all(n.alive() for n in nodes if n.address != killed[0])


def test_a_node_lost_as_the_warm_up_ends_is_replaced(tmp_path, nodes, monkeypatch):
    """Killed right before the driver sets the held replicas running (the
    warm-up over): that node's replicas go on elsewhere, the others start."""
    pytest.importorskip("sklearn")
    killed: list = []
    set_running = RunState.set_running

    async def kill_and_set_running(state, replicas, at):
        if state.replicas[0] not in replicas and not killed:
            host = next(h for r in replicas for h in r.hosts if h not in state.shard_hosts)
            address = kill(nodes, host)
            killed.extend([address, {r.index for r in state.replicas if host in r.hosts}])
        await set_running(state, replicas, at)

    monkeypatch.setattr(RunState, "set_running", kill_and_set_running)
    summary = train_on(nodes, tmp_path / "out", "train.warmstart_steps=30")
    address, placed = killed
    assert summary.dead_nodes == [address], (killed, summary.dead_nodes)
    assert {r["replica"] for r in summary.restarts} == placed, summary.restarts
    assert any(e["event"] == "warmstart done" for e in summary.events)
    assert summary.examples == 20 * 1438
    assert summary.test_accuracy >= 0.93


def test_a_node_that_refuses_a_restarted_replica_is_passed_over(tmp_path, monkeypatch):
    """The node picked for a lost node's replica refuses it (another run on
    that shared node has taken its memory budget): the replica goes on the
    next node instead of failing the run."""
    pytest.importorskip("sklearn")
    nodes = [ServeNode(tmp_path, f"budget-{i}", extra=("--max-memory", "64M")) for i in range(3)]
    try:
        killed = kill_during_setup(monkeypatch, nodes, "partitions")
        hogged: list = []
        launch = RunState.launch

        async def hog_then_launch(state, replica, inputs, run):
            restart = killed and not set(replica.hosts) & state.dead
            if restart and replica.index in killed[1] and not hogged:
                host = replica.hosts[0]
                info = await state.control(host, control.Info())
                await state.control(host, control.Open(run="hog", name="hog", lease=600.0))
                ch = await state.peers.get(host)
                hog = np.zeros((info.max_memory - info.memory) // 2 // 8 - 1024)
                adagrad = {"name": "adagrad", "learning_rate": 0.1}  # its state as big: 2x counted
                meta = {"run": "hog", "name": "hog", "optimizer": adagrad}
                await ch.request(MessageKind.INIT, key=1, array=hog, meta=meta)
                hogged.append(f"{host[0]}:{host[1]}")
            await launch(state, replica, inputs, run=run)

        monkeypatch.setattr(RunState, "launch", hog_then_launch)
        summary = train_on(nodes, tmp_path / "out")
        address, placed = killed
        assert hogged, "no replica was restarted"
        assert summary.dead_nodes == [address]
        assert {r["replica"] for r in summary.restarts} == placed, summary.restarts
        assert summary.examples == 20 * 1438
        assert summary.test_accuracy >= 0.93
        assert any(n.alive() for n in nodes if n.address == hogged[0])
    finally:
        for node in nodes:
            node.kill()


def test_the_shard_node_lost_as_the_run_finishes_is_restored_for_the_final_model(
    tmp_path, nodes, monkeypatch
):
    """Killed once the replicas are done, before the driver reads the final
    model: its shard is restored from the backup and the model read there."""
    pytest.importorskip("sklearn")
    finish = driver_run.finish
    killed = []

    async def kill_then_finish(state, *args, **kwargs):
        host = state.shard_hosts[0]
        killed.append(kill(nodes, host))
        return await finish(state, *args, **kwargs)

    monkeypatch.setattr(driver_run, "finish", kill_then_finish)
    summary = train_on(nodes, tmp_path / "out")
    assert summary.dead_nodes == killed
    restored = [e for e in summary.events if e["event"] == "shards restored"]
    assert restored and restored[0]["source"] == "backup", summary.events
    assert summary.test_accuracy >= 0.9
    model = dbnode.load(tmp_path / "out")
    assert all(np.isfinite(w).all() for w in model.params.values())
