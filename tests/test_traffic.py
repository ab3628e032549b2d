"""The traffic-aware placement (dbnode.traffic): a pure cost model."""

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbnode.blocks import blocks
from dbnode.errors import ConfigError
from dbnode.model import ModelSpec
from dbnode.placement import plan_shards, split_layers
from dbnode.traffic import NodeShape, Workload, plan_run

MLP = (784, 1024, 1024, 10)


def workload(layers=MLP, partitions=1, shards=1, replicas=1, batch=64, n_fetch=1, n_push=1):
    spec = ModelSpec(layers)
    bounds = split_layers(layers, partitions)
    plan = plan_shards(blocks(spec, bounds), shards, 4)
    work = Workload.of(
        layers, bounds, plan, replicas=replicas, batch=batch, n_fetch=n_fetch, n_push=n_push
    )
    return work, plan


def test_a_lone_replica_keeps_its_shards_beside_it():
    work, _ = workload(shards=3)
    for nodes in ([NodeShape(2)], [NodeShape(1), NodeShape(1)], [NodeShape(1)] * 4):
        run = plan_run(nodes, work)
        (host,) = run.placement.partitions[0]
        assert run.placement.shards == (host,) * 3
        assert run.links == {} and run.bytes_per_step == 0


def test_two_replicas_on_two_nodes_each_keep_one_shard_and_exchange_the_rest():
    work, plan = workload(shards=2, replicas=2)
    run = plan_run([NodeShape(1), NodeShape(1)], work)
    assert sorted(run.placement.partitions) == [(0,), (1,)]
    assert sorted(run.placement.shards) == [0, 1]
    # Each replica pushes the pieces of the other node's shard and fetches them back.
    far = [
        plan.shard_bytes()[s]
        for s in (run.placement.shards.index(1), run.placement.shards.index(0))
    ]
    assert run.links == {(0, 1): 2.0 * far[1], (1, 0): 2.0 * far[0]}
    assert run.flops[0] == run.flops[1] > 0


def test_bytes_follow_the_fetch_and_push_periods():
    every_step = plan_run([NodeShape()] * 2, workload(shards=2, replicas=2)[0])
    every_4 = plan_run([NodeShape()] * 2, workload(shards=2, replicas=2, n_fetch=4, n_push=4)[0])
    assert every_4.bytes_per_step == pytest.approx(every_step.bytes_per_step / 4)


def test_a_node_with_more_threads_takes_more_work():
    work, _ = workload(replicas=6)
    run = plan_run([NodeShape(2), NodeShape(1)], work)
    per_node = Counter(h for parts in run.placement.partitions for h in parts)
    assert per_node == {0: 4, 1: 2}


def test_a_layer_split_replica_uses_several_nodes_and_its_activations_are_counted():
    work, _ = workload(partitions=2, shards=2, batch=64)
    run = plan_run([NodeShape(), NodeShape()], work)
    assert sorted(run.placement.partitions[0]) == [0, 1]
    a, b = run.placement.partitions[0]
    # Layer 1's output (1024 floats a row) goes up, its delta comes back.
    assert run.links[(a, b)] >= 64 * 1024 * 4 and run.links[(b, a)] >= 64 * 1024 * 4


def test_describe_names_every_node_link_and_the_total():
    work, _ = workload(shards=2, replicas=2)
    run = plan_run([NodeShape(1, name="a:1"), NodeShape(1, name="b:2")], work)
    text = run.describe()
    assert "a:1: 1 thread(s); partitions r" in text and "link a:1 -> b:2:" in text
    assert f"{run.bytes_per_step / 1e6:,.3f} MB per step" in text


def test_no_nodes_or_no_threads_is_a_config_error():
    work, _ = workload()
    with pytest.raises(ConfigError):
        plan_run([], work)
    with pytest.raises(ConfigError):
        plan_run([NodeShape(0)], work)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=5),
    st.integers(1, 6),
    st.integers(1, 3),
    st.integers(1, 5),
    st.integers(1, 4),
)
def test_every_role_is_placed_and_shards_go_where_they_are_used_most(
    threads, replicas, partitions, shards, n_fetch
):
    layers = (20, 30, 30, 40, 10)
    work, _ = workload(layers, partitions, shards, replicas, 8, n_fetch, 1)
    nodes = [NodeShape(t) for t in threads]
    run = plan_run(nodes, work)
    assert run == plan_run(nodes, work)  # deterministic
    p = run.placement
    assert len(p.partitions) == replicas and all(len(r) == partitions for r in p.partitions)
    assert all(0 <= h < len(nodes) for h in [*p.shards, *(h for r in p.partitions for h in r)])
    for parts in p.partitions:
        # Never two partitions of a replica on a node while another has none of it.
        assert max(Counter(parts).values()) == -(-partitions // len(nodes))
    for s, host in enumerate(p.shards):
        use = [0] * len(nodes)
        for parts in p.partitions:
            for k, h in enumerate(parts):
                use[h] += work.shard_use[s][k]
        assert use[host] == max(use)
    assert sum(run.flops) == pytest.approx(replicas * sum(work.flops))


@pytest.mark.parametrize(
    "replicas, partitions, codec",
    [(1, 1, "f32"), (2, 1, "f32"), (1, 2, "f32"), (2, 1, "bf16"), (1, 2, "f16")],
)
def test_a_real_run_moves_the_bytes_the_plan_predicts(tmp_path, replicas, partitions, codec):
    """Real node processes on the embedded cluster: summary.wire_bytes counts
    the payload bytes that crossed between them, which is the plan's bytes
    per step times the steps, plus each partition's first pull at most; a
    16-bit [wire] codec for everything halves both."""
    import numpy as np

    from dbnode.config import RunConfig
    from dbnode.driver import plan, train

    rng = np.random.default_rng(0)
    rows, batch = 640, 32
    np.savez(tmp_path / "d.npz", X=rng.normal(size=(rows, 16)).astype(np.float32),
             y=rng.integers(0, 4, rows))  # fmt: skip
    config = RunConfig.from_dict(
        {
            "model": {
                "layers": [16, 64, 64, 4],
                "output": "softmax",
                "loss": "cross_entropy",
                "dtype": "float32",
                "partitions": partitions,
            },
            "data": {"train": str(tmp_path / "d.npz"), "test_fraction": 0},  # every row trains
            "train": {"replicas": replicas, "batch_size": batch, "epochs": 1},
            "optimizer": {"name": "sgd", "learning_rate": 0.01},
            "cluster": {"parameter_shards": 2, "nodes": replicas * partitions},
            "wire": {"fetch": codec, "push": codec, "activations": codec},
        }
    )
    summary = train(config)
    f32_plan = plan(RunConfig.from_dict({**config.to_dict(), "wire": {}})).bytes_per_step
    assert summary.planned_bytes_per_step == round(f32_plan * (0.5 if codec != "f32" else 1))
    steps = -(-rows // replicas // batch)
    planned = summary.planned_bytes_per_step
    assert summary.wire_bytes == sum(summary.links.values())
    if replicas * partitions == 1:
        assert planned == 0 and summary.wire_bytes == 0 and summary.links == {}
    else:
        assert planned > 0
        assert planned * steps <= summary.wire_bytes <= planned * (steps + 1), summary.links
        assert all(" -> " in link for link in summary.links)
