"""Elastic runs (dbnode.driver.elastic): real ``dbnode serve`` processes
join a run and leave it through ``cluster.hosts_file``, while it trains."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from serve_node import DBNODE, ServeNode

from dbnode.driver.elastic import HostsFile, read_hosts
from dbnode.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SETS = ["--set", "model.partitions=1", "--set", "train.pipeline=1",
        "--set", "cluster.heartbeat=0.5"]  # fmt: skip


def test_a_hosts_file_is_read_again_only_when_it_changes(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("# the nodes\n127.0.0.1:7001\n\n  [::1]:7002  # a comment\n127.0.0.1:7001\n")
    assert read_hosts(path) == [("127.0.0.1", 7001), ("::1", 7002)]
    watched = HostsFile(path)
    assert watched.changed() == [("127.0.0.1", 7001), ("::1", 7002)]
    assert watched.changed() is None
    path.write_text("127.0.0.1:7003\n")
    assert watched.changed() == [("127.0.0.1", 7003)]
    path.write_text("127.0.0.1:http\n")
    with pytest.raises(ConfigError, match="line 1"):
        read_hosts(path)
    assert watched.changed() is None  # unreadable: the run keeps its nodes
    path.unlink()
    assert watched.changed() is None
    path.write_bytes(b"\xff\xfe not text\n")
    assert watched.changed() is None  # not text: the run keeps its nodes


def _start(nodes, hosts_file: Path, out: Path, *more: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*DBNODE, "train", str(EXAMPLES / "digits.toml"), "--secret-file", str(nodes[0].secret),
         "--set", f"cluster.hosts_file={hosts_file}", *SETS, *more, "--out", str(out), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _summary(proc: subprocess.Popen, out: Path) -> dict:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads((out / "summary.json").read_text())


def _when_training(out: Path, proc: subprocess.Popen) -> None:
    """Wait for the run's first evaluation row: it is training by then."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        metrics = out / "metrics.csv"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            return
        time.sleep(0.05)


@pytest.fixture
def nodes(tmp_path):
    started = [ServeNode(tmp_path, f"elastic-{i}") for i in range(3)]
    yield started
    for node in started:
        node.kill()


def test_a_run_grows_onto_nodes_added_to_its_hosts_file(tmp_path, nodes):
    """One node added is running; the other is listed before it starts,
    and joins at a retry."""
    pytest.importorskip("sklearn")
    hosts = tmp_path / "hosts"
    hosts.write_text(nodes[0].address + "\n")
    late = nodes[2]
    late.kill()  # listed first, started later on the same port
    out = tmp_path / "grown"
    proc = _start(nodes, hosts, out, "--set", "train.replicas=2", "--set", "train.epochs=400",
                  "--set", "train.eval_interval=0.5")  # fmt: skip
    _when_training(out, proc)
    hosts.write_text("\n".join(n.address for n in nodes) + "\n")
    time.sleep(0.5)
    late.start(late.port)
    summary = _summary(proc, out)
    joined = [e for e in summary["events"] if e["event"] == "host joined"]
    assert sorted(e["node"] for e in joined) == sorted(n.address for n in nodes[1:]), joined
    refused = [e for e in summary["events"] if e["event"] == "host not joined"]
    assert [e["node"] for e in refused] == [late.address], summary["events"]  # said once
    # The new nodes' helpers (replicas 2 and 3) took over portions.
    helped = {e["replica"] for e in summary["events"] if e["event"] == "backup leased"}
    assert helped & {2, 3}, summary["events"]
    assert summary["examples"] == 400 * 1438 and not summary["restarts"]
    assert summary["test_accuracy"] >= 0.93
    assert summary["pushes"]["acknowledged"] <= (
        summary["pushes"]["applied"] + summary["pushes"]["duplicates"]
    )


def test_nodes_removed_from_the_hosts_file_are_drained_without_losing_their_shards(tmp_path, nodes):
    """Two of three nodes dropped in one edit: what they held and ran goes
    to the one left, nothing of one drain lands on the other."""
    pytest.importorskip("sklearn")
    hosts = tmp_path / "hosts"
    # Two layer partitions, their blocks on 6 parameter shards: some hold
    # nothing, on the nodes that leave too.
    more = ["--set", "model.partitions=2", "--set", "train.replicas=2",
            "--set", "cluster.parameter_shards=6",
            "--set", "train.epochs=60", "--set", "train.eval_interval=0.2",
            "--set", "train.backups=false"]  # fmt: skip
    hosts.write_text("\n".join(n.address for n in nodes) + "\n")
    calm = _summary(_start(nodes, hosts, tmp_path / "calm", *more), tmp_path / "calm")
    out = tmp_path / "drained"
    proc = _start(nodes, hosts, out, *more)
    _when_training(out, proc)
    hosts.write_text(nodes[0].address + "\n")
    summary = _summary(proc, out)
    events = summary["events"]
    leaving = sorted(n.address for n in nodes[1:])
    draining = [e for e in events if e["event"] == "host draining"]
    assert sorted(e["node"] for e in draining) == leaving, events
    assert any(e["shards"] for e in draining), "a drained node held a parameter shard"
    # Their replicas trained to the end of their portion, backups took the rest.
    assert any(e["event"] == "replica handed over" for e in events), events
    assert sorted(e["node"] for e in events if e["event"] == "host left") == leaving, events
    # Moved, not restored: nothing lost, every step applied once, no node
    # dead, nothing restarted.
    assert summary["lost_updates"] == 0 and summary["dead_nodes"] == []
    assert summary["pushes"]["applied"] == calm["pushes"]["applied"]
    assert summary["examples"] == calm["examples"]
    assert summary["restarts"] == [], summary["restarts"]
    assert summary["test_accuracy"] >= calm["test_accuracy"] - 0.03
    assert all(n.alive() for n in nodes)  # drained, not killed


def test_a_helper_node_killed_mid_backup_loses_nothing(tmp_path, nodes):
    """kill -9 of a joined node while its helper trains a backup: the backup
    fails, its steps go back to the replica it was cut from, and every step
    of every schedule is still applied exactly once."""
    pytest.importorskip("sklearn")
    hosts = tmp_path / "hosts"
    hosts.write_text(nodes[0].address + "\n")
    out = tmp_path / "hit"
    epochs = 300
    proc = _start(nodes[:2], hosts, out, "--set", "train.replicas=2",
                  "--set", f"train.epochs={epochs}", "--set", "train.eval_interval=0.5")  # fmt: skip
    _when_training(out, proc)
    hosts.write_text(f"{nodes[0].address}\n{nodes[1].address}\n")
    deadline = time.monotonic() + 60
    for line in proc.stderr:  # events come as they happen, one a line
        if "backup leased" in line and "replica=2" in line or time.monotonic() > deadline:
            break
    nodes[1].kill()
    out_text, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    events = [e["event"] for e in summary["events"]]
    assert "backup failed" in events and "node dead" in events, summary["events"]
    steps = epochs * -(-719 // 16)  # each replica's schedule: 719 examples, batches of 16
    assert summary["pushes"]["applied"] == 2 * steps  # one piece per step
    assert summary["examples"] == epochs * 1438
    assert summary["test_accuracy"] >= 0.93
