"""Compute threads: sizing a process's pools, the embedded cluster's shares,
nodes that report theirs, and the warning when one machine is oversubscribed."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from serve_node import ServeNode

from dbnode import control
from dbnode.driver.cluster import LocalCluster, embedded_nodes
from dbnode.threads import (
    THREAD_VARIABLES,
    available_cores,
    environment_threads,
    machine_id,
    shares,
)
from dbnode.wire import Channel, open_connection


@pytest.mark.parametrize(
    "cores, nodes, expected",
    [(2, 1, [2]), (2, 2, [1, 1]), (5, 2, [3, 2]), (2, 3, [1, 1, 1]), (8, 3, [3, 3, 2])],
)
def test_shares_split_the_cores_evenly(cores, nodes, expected):
    assert shares(cores, nodes) == expected


@pytest.mark.parametrize(
    "environ, expected",
    [({}, None), ({"OMP_NUM_THREADS": "3"}, 3), ({"OPENBLAS_NUM_THREADS": "2"}, 2),
     ({"OMP_NUM_THREADS": "4,2"}, 4), ({"OMP_NUM_THREADS": "x", "MKL_NUM_THREADS": "5"}, 5),
     ({"OMP_NUM_THREADS": "0"}, None)],
)  # fmt: skip
def test_environment_threads(environ, expected):
    assert environment_threads(environ) == expected


def test_embedded_nodes_one_per_role_up_to_the_cores():
    assert embedded_nodes(1, cores=8) == 1
    assert embedded_nodes(2, cores=8) == 2
    assert embedded_nodes(16, cores=4) == 4
    assert embedded_nodes(0, cores=4) == 1


def test_limit_threads_sizes_blas_and_the_kernels_in_every_thread():
    code = (
        "import threading\n"
        "from dbnode import kernels, threads\n"
        "threads.limit_threads(1)\n"
        "seen = []\n"
        "t = threading.Thread(target=lambda: seen.append(kernels.max_threads()))\n"
        "t.start(); t.join()\n"
        "print(threads.blas_pools()[0]['threads'], kernels.max_threads(), seen[0])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1", "1"]


async def info_of(address, secret) -> control.InfoReply:
    conn = await open_connection(*address, secret)
    import trio

    async with trio.open_nursery() as nursery:
        ch = Channel(conn)
        await nursery.start(ch.run)
        try:
            return await control.call(ch, control.Info())
        finally:
            await ch.aclose()


def test_embedded_nodes_report_their_share_and_the_machine():
    with LocalCluster(2) as cluster:
        secret = cluster.secret_file.read_bytes()
        infos = [trio.run(info_of, a, secret) for a in cluster.addresses]
    if environment_threads() is None:
        assert [i.threads for i in infos] == shares(available_cores(), 2)
    assert {i.machine for i in infos} == {machine_id()}
    assert all(i.cores == available_cores() for i in infos)


def test_nodes_that_oversubscribe_their_machine_get_a_warning(tmp_path):
    from dbnode.config import RunConfig
    from dbnode.driver import train

    too_many = str(available_cores())  # two nodes, each with every core
    nodes = [ServeNode(tmp_path, f"n{i}", extra=("--threads", too_many)) for i in range(2)]
    try:
        addresses = [("127.0.0.1", n.port) for n in nodes]
        config = RunConfig.from_dict(
            {
                "model": {"layers": [2, 2, 1], "activation": "sigmoid", "output": "sigmoid",
                          "loss": "squared_error", "dtype": "float64"},
                "data": {"train": "xor:400"},
                "train": {"replicas": 2, "batch_size": 4},
            }
        )  # fmt: skip
        summary = train(config, hosts=addresses, secret=nodes[0].secret.read_bytes())
    finally:
        for n in nodes:
            n.stop()
    assert any("share one machine" in w and "--threads" in w for w in summary.warnings), (
        summary.warnings
    )
    assert sorted(summary.threads.values()) == [int(too_many)] * 2


def test_train_plan_prints_the_placement_without_training(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "dbnode.cli", "train", "examples/digits.toml", "--plan",
         "--set", "cluster.nodes=2", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("local-0: ") and lines[1].startswith("local-1: ")
    assert "partitions r0.p" in out.stdout and "MB per step" in lines[-1]
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_oversubscription_is_judged_per_machine():
    from dbnode.driver.planning import oversubscribed

    base = control.InfoReply(node_id="x", name="n", version="v", pid=1, cores=2,
                             address=("h", 1), max_memory=1, memory=0, runs=0)  # fmt: skip

    def node(machine: str, threads: int) -> control.InfoReply:
        return dataclasses.replace(base, machine=machine, threads=threads)

    fits = {("a", 1): node("m1", 1), ("b", 1): node("m1", 1), ("c", 1): node("m2", 2)}
    assert oversubscribed(fits) == []
    (warning,) = oversubscribed({**fits, ("d", 1): node("m2", 1)})
    assert "c:1, d:1" in warning and "3 compute threads on its 2 cores" in warning
    # Nodes too old to say their machine are not lumped together.
    assert oversubscribed({("a", 1): node("", 2), ("b", 1): node("", 2)}) == []
