"""Staleness on the wire: every push says which parameters its gradient came
from; shards count how stale each applied push was, scale its step by the
optimizer's policy and refuse those past ``train.max_staleness``."""

import json
import time
from types import SimpleNamespace

import numpy as np
import pytest
import trio

from dbnode import reference
from dbnode.blocks import block_layout
from dbnode.config import RunConfig
from dbnode.control import StalenessReport
from dbnode.driver import LocalCluster, train
from dbnode.driver.state import RunState
from dbnode.errors import ConfigError, ErrorCode, RemoteError, ShardError, TooStaleError
from dbnode.model import ModelSpec
from dbnode.optim import SGD, Adagrad, from_wire
from dbnode.partition_core import PartitionCore
from dbnode.partition_sync import RETRY_DELAY, ShardSync
from dbnode.placement import plan_shards
from dbnode.ps import ParameterClient
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


def test_a_refresh_copies_only_the_pieces_held_in_this_process():
    """What a replica refreshes at its turn: the pieces a shard of its own
    process holds, with their versions, and nothing of the others (no
    request: they stay as the lobby's fetch brought them)."""
    plan = plan_shards({"w": (8, 4)}, 2, 4, min_split_bytes=0)
    here, there = ("127.0.0.1", 1), ("127.0.0.1", 2)
    shard, w = ParameterShard(), np.arange(32, dtype=np.float32).reshape(8, 4)
    mine = [p for p in plan.pieces("w") if p.shard == 0]
    assert mine and len(mine) < len(plan.pieces("w"))
    for piece in mine:
        shard.init(piece.key, piece.name, piece.of(w).copy(), optimizer=SGD(1.0))
        shard.push(piece.key, np.ones(piece.shape, np.float32))  # version 1
    client = ParameterClient(plan, [here, there], peers=None, run="r",
                             local=lambda address, epoch: shard if address == here else None)  # fmt: skip
    into = np.full((8, 4), -7.0, np.float32)
    versions = client.pull_in_process({"w": into})
    assert versions == {p.key: 1 for p in mine}
    for piece in plan.pieces("w"):
        expected = piece.of(w) - 1 if piece.shard == 0 else np.full(piece.shape, -7.0)
        np.testing.assert_array_equal(piece.of(into), expected)

    def fenced(address, epoch):  # this process's shard moved on: a remap is coming
        raise RemoteError(ErrorCode.STALE_EPOCH, "stale epoch")

    client = ParameterClient(plan, [here, there], peers=None, run="r", local=fenced)
    untouched = np.full((8, 4), -7.0, np.float32)
    with pytest.raises(RemoteError):
        client.pull_in_process({"w": untouched})
    assert (untouched == -7.0).all()


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
    # No backups: a backup's copies of applied pushes are acknowledged too
    # (dropped as duplicates), which a slow machine brings on.
    bounded = _run(cluster, tmp_path / "bounded", replicas=4, n_fetch=4, max_staleness=1,
                   backups=False)  # fmt: skip
    assert bounded.staleness["max"] <= 1
    assert set(bounded.staleness["histogram"]) <= {"0", "1"}
    assert sum(bounded.staleness["histogram"].values()) == bounded.pushes["applied"]
    # What was refused was never applied, and the run still learns.
    assert bounded.pushes["duplicates"] == 0
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


def test_replicas_made_after_the_warm_up_start_at_once(cluster, tmp_path, monkeypatch):
    """Shipping the held replicas' data is slowed (0.4 s each): the warm-up
    ends while they are made, those made go, and the rest go as they are
    made -- not all of them once the last is (the watch loop's release)."""
    made: dict[int, float] = {}  # replica -> seconds into the run its launch ended
    launch = RunState.launch

    async def slow_launch(state, replica, inputs, run):
        if replica.index > 0:
            await trio.sleep(0.4)
        await launch(state, replica, inputs, run=run)
        made[replica.index] = time.monotonic() - state.started

    monkeypatch.setattr(RunState, "launch", slow_launch)
    summary = _run(cluster, tmp_path, replicas=4, warmstart_steps=5)
    (event,) = [e for e in summary.events if e["event"] == "warmstart done"]
    assert event["seconds"] < made[3], (event, made)  # before the last was made
    assert 5 <= event["steps"] and summary.examples == 2 * (1797 - 359)


def test_warmstart_steps_must_not_be_negative():
    with pytest.raises(ConfigError, match="train.warmstart_steps"):
        RunConfig.from_dict({"model": {"layers": [2, 1]}, "train": {"warmstart_steps": -1}})


def test_replicas_sharing_a_node_take_turns_and_stay_fresh(tmp_path):
    """Four replicas on one node of one thread compute one at a time, each
    fetching its parameters (a copy: the shard is in the same process) when
    its turn starts, after the push of the turn before: its push is fresh,
    not as stale as the queue is long (about 3 here when each fetched right
    after its own push, about 1 when it fetched in the lobby)."""
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
    assert staleness["mean"] < 0.5, staleness
    assert summary.test_accuracy > 0.8


def test_replicas_taking_turns_with_shards_on_another_node_fetch_in_the_lobby(tmp_path):
    """Two replicas on each of two nodes of one thread, each block cut over
    both nodes' shards: a replica fetches the other node's pieces while the
    replica before it computes, its own node's pieces when its turn starts,
    and leaves its local update to that fetch (which always lands before
    its next step): fresh pushes, a model that learns."""
    config = RunConfig.from_dict({
        "model": {"layers": [64, 512, 256, 10], "activation": "relu", "output": "softmax",
                  "loss": "cross_entropy", "init": "he"},
        "data": {"train": "digits", "test_fraction": 0.2},
        "train": {"batch_size": 16, "epochs": 2, "seed": 0, "replicas": 4},
        "optimizer": {"name": "sgd", "learning_rate": 0.05},
        "cluster": {"parameter_shards": 2},
    })  # fmt: skip
    with LocalCluster(2, threads=[1, 1]) as two:
        summary = train(config, hosts=two.addresses, out_dir=tmp_path,
                        secret=two.secret_file.read_bytes())  # fmt: skip
    staleness = summary.staleness
    assert sum(staleness["histogram"].values()) == summary.pushes["applied"]
    assert staleness["mean"] < 2.5, staleness  # measured 1.3-1.5
    assert summary.test_accuracy > 0.8


_X, _Y = np.ones((2, 3)), np.array([[0.0, 1.0], [1.0, 0.0]])


async def _sync_beside_its_shard(max_staleness=None, fetched=True):
    """A whole-model partition's :class:`ShardSync` and core, its block held by
    one shard in this process (its requests are calls), after its first
    fetch (unless not ``fetched``); ``fence.on = True`` fences the shard off
    (a remap coming)."""
    spec = ModelSpec(layers=(3, 4, 2), dtype="float64")
    size = block_layout(spec, 0, 2)[1]
    shard = ParameterShard()
    shard.init(0, "block0", np.zeros(size), optimizer=SGD(0.1))
    fence = SimpleNamespace(on=False)

    def local(address, epoch):
        if fence.on:
            raise RemoteError(ErrorCode.STALE_EPOCH, "stale epoch")
        return shard

    plan = plan_shards({"block0": (size,)}, 1, 8)
    client = ParameterClient(plan, [("127.0.0.1", 1)], peers=None, run="r", local=local)
    core = PartitionCore(spec, 0, 2, np.zeros(size), 0.1)
    job = SimpleNamespace(max_staleness=max_staleness, n_push=1, portion_steps=0, start_step=0,
                          pusher=lambda step: "r0")  # fmt: skip
    sync = ShardSync(job, core, client, "block0", SimpleNamespace(pushes=0))
    if fetched:
        await sync.first_fetch()
    return shard, core, sync, fence


def _whole_step(core: PartitionCore, sync: ShardSync, deferred: bool = False) -> bool:
    """One step as the runner takes it; whether it updated the local copy."""
    local = sync.local_update(deferred)
    sync.forwarded(0)
    core.whole_step(_X, _Y, local)
    sync.backwarded(0)
    return local


async def test_a_turn_copies_its_fetch_from_this_process_unless_the_shard_is_fenced():
    """A whole-model replica whose block a shard of its own process holds
    leaves its fetch for its next turn and makes it there (a copy, after the
    pushes made meanwhile); when that shard is fenced off (a remap coming),
    it makes none in the turn, which nobody should wait for, and fetches out
    of it once the remap has come."""
    shard, core, sync, fence = await _sync_beside_its_shard()

    async def step(n: int, nursery) -> None:
        _whole_step(core, sync)
        await sync.after_step(n, nursery, defer_fetch=True)

    async with trio.open_nursery() as nursery:
        await step(0, nursery)
        assert shard.version(0) == 1 and not sync.needs_lobby  # pushed; the fetch left
        shard.push(0, np.ones(core.flat.size), pusher="r1", seq=0)  # the turn before's push
        assert sync.fetch_at_turn()
        sync.install_ready()
        np.testing.assert_array_equal(core.flat, shard.pull(0).value)
        assert sync.versions == {0: 2}

        await step(1, nursery)
        fence.on = True
        before = core.flat.copy()
        assert not sync.fetch_at_turn()  # no copy: the fetch is still to make
        sync.install_ready()
        np.testing.assert_array_equal(core.flat, before)
        fence.on = False  # the remap has come
        await sync.deferred_fetch()
        assert sync.fetch_at_turn()
        sync.install_ready()
        np.testing.assert_array_equal(core.flat, shard.pull(0).value)
        assert sync.versions == {0: 3}


async def test_a_first_fetch_refused_for_a_moved_shard_waits_for_the_remap():
    """A replica whose shard node is lost just before its first fetch (the
    driver fencing it off) fetches from the new map once the remap comes,
    as every later request does, instead of failing and being restarted."""
    shard, core, sync, fence = await _sync_beside_its_shard(fetched=False)
    shard.push(0, np.ones(core.flat.size), pusher="r1", seq=0)  # moved on meanwhile
    fence.on = True
    with trio.fail_after(RETRY_DELAY / 2):  # the remap, not the retry timer, sends it again
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sync.first_fetch)
            await trio.sleep(0.05)
            assert not sync._done.is_set()  # refused: waiting for the remap
            fence.on = False
            sync.remap(sync.client.epoch + 1, (("127.0.0.1", 1),))
    np.testing.assert_array_equal(core.flat, shard.pull(0).value)
    assert sync.versions == {0: 1}


async def test_a_fetch_cut_off_by_a_remap_leaves_the_next_push_free_to_go():
    """A push refused as too stale fetches at once; if a remap cuts that
    fetch off, nothing waits for it any more: the next step pushes (and
    fetches with it) instead of failing for a fetch still "in flight"."""
    shard, core, sync, fence = await _sync_beside_its_shard(max_staleness=1)
    fence.on = True
    with pytest.raises(RemoteError):
        await sync._fetch_now_into(core.block())
    fence.on = False
    async with trio.open_nursery() as nursery:
        _whole_step(core, sync)
        await sync.after_step(0, nursery)  # pushes and fetches: nothing in flight
    sync.install_ready()
    assert shard.version(0) == 1 and sync.versions == {0: 1}
    np.testing.assert_array_equal(core.flat, shard.pull(0).value)


async def test_a_step_whose_fetch_waits_for_its_turn_leaves_its_update_to_that_fetch():
    """A replica whose shard is on another node and whose node is crowded
    leaves its fetch for its next turn, and its local update with it (the
    fetch replaces the local copy before the next step). If the node is no
    longer crowded when the step ends, it fetches at once and waits."""
    shard, core, sync, _ = await _sync_beside_its_shard()
    # As if the shard were on another node (its requests are calls here).
    sync._in_process_at, sync._in_process_cached = sync.client.epoch, False

    def step() -> None:
        before = core.flat.copy()
        assert not _whole_step(core, sync, deferred=True)
        np.testing.assert_array_equal(core.flat, before)  # left to the fetch

    async with trio.open_nursery() as nursery:
        step()
        await sync.after_step(0, nursery, defer_fetch=True)
        assert sync.needs_lobby
        await sync.deferred_fetch(nursery)  # in the lobby, before the next turn
        sync.install_ready()
        np.testing.assert_array_equal(core.flat, shard.pull(0).value)
        assert shard.version(0) == 1 and sync.versions == {0: 1}

        step()
        await sync.after_step(1, nursery, defer_fetch=False)  # not crowded any more
        sync.install_ready()  # landed already: the step waited for it
        np.testing.assert_array_equal(core.flat, shard.pull(0).value)
        assert shard.version(0) == 2 and sync.versions == {0: 2}
