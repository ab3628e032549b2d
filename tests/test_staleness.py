"""Staleness on the wire: every push says which parameters its gradient came
from; shards count how stale each applied push was, scale its step by the
optimizer's policy and refuse those past ``train.max_staleness``."""

import json

import numpy as np
import pytest

from dbnode import reference
from dbnode.config import RunConfig
from dbnode.control import StalenessReport
from dbnode.driver import LocalCluster, train
from dbnode.errors import ConfigError, ErrorCode, ShardError, TooStaleError
from dbnode.optim import SGD, Adagrad, from_wire
from dbnode.ps.shard import STALENESS_BUCKETS, ParameterShard


def _shard(optimizer) -> tuple[ParameterShard, np.ndarray]:
    w = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float64)
    s = ParameterShard()
    s.init(1, "w", w, optimizer=optimizer)
    return s, w.copy()


def _state(s: ParameterShard):
    return (
        s.view(1).value.tobytes(),
        s.version(1),
        {k: v.tobytes() for k, v in s.optimizer_state(1).items()},
    )


# ------------------------------------------------------------------ the shard


def test_staleness_is_the_versions_applied_since_the_gradients_parameters():
    s, _ = _shard(SGD(0.1))
    g = np.ones((5, 4))
    for _ in range(3):
        s.push(1, g, version=0)  # three pushes all computed from version 0
    s.push(1, g, version=3)  # fresh
    s.push(1, g, version=9)  # ahead of the shard (e.g. restored from an older copy): 0
    s.push(1, g)  # says nothing: not counted
    assert s.staleness.histogram == {0: 3, 1: 1, 2: 1}
    assert (s.staleness.total, s.staleness.max, s.staleness.refused) == (3, 2, 0)
    assert s.version(1) == 6


def test_a_duplicate_is_dropped_before_it_is_counted():
    s, _ = _shard(SGD(0.1))
    g = np.ones((5, 4))
    s.push(1, g, pusher="r0", seq=5, version=0)
    s.push(1, g, pusher="r0", seq=5, version=0)  # the retry
    assert s.staleness.histogram == {0: 1} and s.version(1) == 1


def test_the_last_bucket_counts_everything_staler_and_the_figures_stay_exact():
    s, _ = _shard(SGD(1e-6))
    g = np.ones((5, 4))
    for _ in range(STALENESS_BUCKETS + 40):
        s.push(1, g)
    s.push(1, g, version=0)
    tau = STALENESS_BUCKETS + 40
    assert s.staleness.histogram == {STALENESS_BUCKETS: 1}
    assert s.staleness.total == tau and s.staleness.max == tau


@pytest.mark.parametrize("tau", [0, 1, 2, 5])
@pytest.mark.parametrize("name", ["sgd", "adagrad"])
def test_inverse_divides_the_step_by_the_staleness(name, tau):
    optimizer = {"name": name, "learning_rate": 0.3, "staleness": "inverse"}
    s, w = _shard(optimizer)
    g1 = np.random.default_rng(1).standard_normal(w.shape)
    g2 = np.random.default_rng(2).standard_normal(w.shape)
    for _ in range(tau):
        s.push(1, g1, version=s.version(1))  # fresh: full steps
    state = np.zeros_like(w)
    for _ in range(tau):
        if name == "sgd":
            reference.sgd(w, g1, 0.3)
        else:
            reference.adagrad(w, g1, state, 0.3, Adagrad(0.3).eps)
    s.push(1, g2, version=0)
    lr = 0.3 / max(1, tau)
    if name == "sgd":
        reference.sgd(w, g2, lr)
    else:
        reference.adagrad(w, g2, state, lr, Adagrad(0.3).eps)
    np.testing.assert_allclose(s.view(1).value, w, rtol=1e-13, atol=1e-15)


def test_none_leaves_a_stale_step_whole():
    s, w = _shard(SGD(0.3))
    g = np.ones(w.shape)
    s.push(1, g)
    s.push(1, g, version=0)  # one version stale
    np.testing.assert_array_equal(s.view(1).value, w - 0.3 - 0.3)


def test_a_push_past_its_bound_is_refused_and_changes_nothing():
    s, _ = _shard({"name": "momentum", "learning_rate": 0.1})
    g = np.ones((5, 4))
    s.push(1, g)
    s.push(1, g)
    before = _state(s)
    with pytest.raises(TooStaleError, match="2 versions stale, more than its max_staleness 1") as e:
        s.push(1, g, pusher="r1", seq=4, version=0, max_staleness=1)
    assert e.value.code == ErrorCode.TOO_STALE
    assert _state(s) == before
    assert s.staleness.refused == 1 and s.staleness.histogram == {}
    # Not recorded as applied: the same seq, computed afresh, goes in.
    s.push(1, g, pusher="r1", seq=4, version=2, max_staleness=1)
    assert s.version(1) == 3 and s.staleness.histogram == {0: 1}
    # push_pull refuses the same way, before its pull.
    with pytest.raises(TooStaleError):
        s.push_pull(1, g, version=0, max_staleness=2)


@pytest.mark.parametrize("field", ["version", "max_staleness"])
@pytest.mark.parametrize("bad", [-1, True, "3", 1.5, 2**64])
def test_bad_versions_are_refused_and_change_nothing(field, bad):
    s, _ = _shard(SGD(0.1))
    before = _state(s)
    kwargs = {"version": 0, field: bad}
    with pytest.raises(ShardError, match=f"{field} must be an integer"):
        s.push(1, np.ones((5, 4)), **kwargs)
    assert _state(s) == before and s.stats()["tensors"][0]["rejected"] == 1


# ------------------------------------------------------------------ the policy


def test_the_policy_is_part_of_the_optimizer_and_its_wire_form():
    inverse = from_wire({"name": "adagrad", "learning_rate": 0.1, "staleness": "inverse"})
    assert inverse == Adagrad(0.1, staleness="inverse")
    assert from_wire(inverse.to_wire()) == inverse
    assert [inverse.staleness_factor(t) for t in (0, 1, 4)] == [1.0, 1.0, 0.25]
    # "none" stays out of the wire form (what earlier snapshots hold).
    assert "staleness" not in Adagrad(0.1).to_wire()
    assert Adagrad(0.1).staleness_factor(7) == 1.0
    with pytest.raises(ConfigError, match="optimizer.staleness"):
        RunConfig.from_dict({"model": {"layers": [2, 1]}, "optimizer": {"staleness": "linear"}})
    with pytest.raises(ConfigError, match="train.max_staleness"):
        RunConfig.from_dict({"model": {"layers": [2, 1]}, "train": {"max_staleness": -2}})


def test_a_snapshot_keeps_the_policy(tmp_path):
    s, _ = _shard({"name": "sgd", "learning_rate": 0.5, "staleness": "inverse"})
    restored = ParameterShard.restore(s.snapshot(tmp_path / "s.npz"))
    assert restored.optimizer(1).staleness == "inverse"


def test_reports_of_several_nodes_add_up():
    a = StalenessReport(histogram={"0": 3, "2": 1}, total=2, max=2, refused=1)
    b = StalenessReport(histogram={"2": 1, "10": 2}, total=22, max=10, refused=0)
    figures = StalenessReport.figures([a, b])
    assert figures == {"histogram": {"0": 3, "2": 2, "10": 2}, "mean": round(24 / 7, 4),
                       "max": 10, "refused": 1}  # fmt: skip
    assert StalenessReport.figures([])["mean"] is None


# ------------------------------------------------------------------ real runs


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(2) as local:
        yield local


def _run(cluster, tmp_path, **train_keys):
    config = RunConfig.from_dict({
        "model": {"layers": [64, 32, 10], "activation": "relu", "output": "softmax",
                  "loss": "cross_entropy", "init": "he",
                  "partitions": train_keys.pop("partitions", 1)},
        "data": {"train": "digits", "test_fraction": 0.2},
        "train": {"batch_size": 16, "epochs": 2, "seed": 0, **train_keys},
        "optimizer": {"name": "sgd", "learning_rate": 0.05},
    })  # fmt: skip
    summary = train(config, hosts=cluster.addresses, out_dir=tmp_path,
                    secret=cluster.secret_file.read_bytes())  # fmt: skip
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["staleness"] == summary.staleness
    return summary


def test_one_replica_is_never_stale(cluster, tmp_path):
    """Its local copy holds its own pushes: every push is fresh, even with
    fetches every 3 steps, and every applied push is counted once."""
    summary = _run(cluster, tmp_path, replicas=1, n_fetch=3)
    steps = summary.pushes["applied"]
    assert summary.staleness == {"histogram": {"0": steps}, "mean": 0.0, "max": 0, "refused": 0}


def test_a_pipelined_replica_is_one_version_stale_below(cluster, tmp_path):
    """With two minibatches in flight, the first partition's backward uses
    weights from before its previous push (weight stashing): stale by one."""
    summary = _run(cluster, tmp_path, replicas=1, partitions=2, pipeline=2)
    histogram = summary.staleness["histogram"]
    assert set(histogram) == {"0", "1"} and summary.staleness["max"] == 1
    steps = summary.pushes["applied"] // 2
    # the last partition: all fresh; the first: all but its first push stale
    assert histogram == {"0": steps + 1, "1": steps - 1}


def test_free_replicas_are_stale_and_a_bound_holds(cluster, tmp_path):
    free = _run(cluster, tmp_path / "free", replicas=4, n_fetch=4)
    assert free.staleness["max"] > 1 and free.staleness["refused"] == 0
    assert sum(free.staleness["histogram"].values()) == free.pushes["applied"]
    bounded = _run(cluster, tmp_path / "bounded", replicas=4, n_fetch=4, max_staleness=1)
    assert bounded.staleness["max"] <= 1
    assert set(bounded.staleness["histogram"]) <= {"0", "1"}
    assert sum(bounded.staleness["histogram"].values()) == bounded.pushes["applied"]
    # What was refused was never applied, and the run still learns.
    assert bounded.pushes["applied"] == bounded.pushes["acknowledged"]
    assert bounded.test_accuracy > 0.5  # ten classes: chance is 0.1


def test_warmstart_runs_the_first_replica_alone_then_the_others(cluster, tmp_path):
    """Warmed for longer than its whole schedule, the first replica trains
    alone to its end; only then does the second start, from the shards'
    parameters: one replica at a time, so no push is ever stale."""
    summary = _run(cluster, tmp_path, replicas=2, warmstart_steps=10_000)
    (event,) = [e for e in summary.events if e["event"] == "warmstart done"]
    steps_each = summary.pushes["applied"] // 2
    assert event["replica"] == 0 and event["steps"] == steps_each
    assert summary.staleness["histogram"] == {"0": summary.pushes["applied"]}
    assert summary.examples == 2 * (1797 - 359)  # both epochs of the 1,797 less 359 held out
    assert summary.test_accuracy > 0.5


def test_warmstart_steps_must_not_be_negative():
    with pytest.raises(ConfigError, match="train.warmstart_steps"):
        RunConfig.from_dict({"model": {"layers": [2, 1]}, "train": {"warmstart_steps": -1}})


def test_replicas_sharing_a_node_take_turns_and_stay_fresh(tmp_path):
    """Four replicas on one node of one thread compute one at a time, and each
    fetches while the one before it computes: every push is about one turn
    (one other replica's push) stale, not as stale as the queue is long
    (about 3 here without the lobby's fetch)."""
    config = RunConfig.from_dict({
        # Large enough that a step computes in a worker thread (OFFLOAD_FLOPS).
        "model": {"layers": [64, 512, 256, 10], "activation": "relu", "output": "softmax",
                  "loss": "cross_entropy", "init": "he"},
        "data": {"train": "digits", "test_fraction": 0.2},
        "train": {"batch_size": 16, "epochs": 2, "seed": 0, "replicas": 4},
        "optimizer": {"name": "sgd", "learning_rate": 0.05},
    })  # fmt: skip
    with LocalCluster(1, threads=[1]) as one:
        summary = train(config, hosts=one.addresses, out_dir=tmp_path,
                        secret=one.secret_file.read_bytes())  # fmt: skip
    staleness = summary.staleness
    assert sum(staleness["histogram"].values()) == summary.pushes["applied"]
    assert staleness["mean"] < 1.5, staleness
    assert summary.test_accuracy > 0.8
