"""Pipelined layer partitions: the 1F1B schedule, weight stashing, and a
single-process replay that every pipelined run must equal."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbnode import kernels
from dbnode.blocks import block_views, pack_block
from dbnode.config import RunConfig
from dbnode.data import batch_indices
from dbnode.driver import LocalCluster, load_data, train
from dbnode.model import LayerStack, Loss, ModelSpec, init_params, load_params
from dbnode.partition import PartitionCore
from dbnode.pipeline import Pass, ahead, depth_of, schedule
from dbnode.placement import split_layers
from dbnode.ps.shard import ParameterShard

# -- the replay: a reference that shares nothing with the partitions' buffers --


def replay(spec, params, x, targets, bounds, depth, lr, batch_size, epochs, seed, stash=True):
    """Train one replica in ``bounds`` partitions as the pipeline schedules it,
    in one process, the plain way: each forward keeps an explicit copy of
    the weights it used, each backward recomputes the forward at that copy
    (at the newest weights without ``stash``) and applies its gradient to
    the newest weights."""
    k_count = len(bounds)
    names = [[n for n in spec.shapes() if first <= int(n[5:].split(".")[0]) < last]
             for first, last in bounds]  # fmt: skip
    current = [{n: params[n].copy() for n in names[k]} for k in range(k_count)]
    batches = list(batch_indices(len(x), batch_size, epochs, seed))
    queues = [list(schedule(k, k_count, depth, 0, len(batches))) for k in range(k_count)]
    inputs, deltas, kept = {}, {}, {}
    loss = Loss(spec)

    def ready(k, kind, step):
        if kind is Pass.FORWARD:
            return k == 0 or (k, step) in inputs
        return k == k_count - 1 or (k, step) in deltas

    while any(queues):
        moved = False
        for k, (first, last) in enumerate(bounds):
            while queues[k] and ready(k, *queues[k][0]):
                kind, step = queues[k].pop(0)
                moved = True
                if kind is Pass.FORWARD:
                    h = x[batches[step]] if k == 0 else inputs.pop((k, step))
                    weights = {n: v.copy() for n, v in current[k].items()}
                    kept[(k, step)] = (weights, h)
                    out = LayerStack(spec, weights, first, last).forward(h).copy()
                    if k + 1 < k_count:
                        inputs[(k + 1, step)] = out
                    else:
                        _, delta = loss(out, targets[batches[step]], np.empty_like(out))
                        deltas[(k, step)] = delta
                    continue
                weights, h = kept.pop((k, step))
                stack = LayerStack(spec, weights if stash else current[k], first, last)
                stack.forward(h)
                below = stack.backward(
                    deltas.pop((k, step)),
                    need_delta_below=k > 0,
                    preactivation=k == k_count - 1 and loss.preactivation,
                )
                for n in names[k]:
                    kernels.sgd(current[k][n], stack.grads[n], lr)
                if k > 0:
                    deltas[(k - 1, step)] = below.copy()
        assert moved, "the schedule deadlocked"
    return {n: v for part in current for n, v in part.items()}


# -- the schedule --------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    partitions=st.integers(1, 6),
    depth=st.integers(1, 8),
    start=st.integers(0, 5),
    steps=st.integers(0, 20),
)
def test_the_schedule_is_1f1b_bounded_and_free_of_deadlock(partitions, depth, start, steps):
    stop = start + steps
    orders = [list(schedule(k, partitions, depth, start, stop)) for k in range(partitions)]
    for k, order in enumerate(orders):
        forwards = [s for kind, s in order if kind is Pass.FORWARD]
        backwards = [s for kind, s in order if kind is Pass.BACKWARD]
        assert forwards == backwards == list(range(start, stop))
        in_flight = 0
        for kind, _ in order:
            in_flight += 1 if kind is Pass.FORWARD else -1
            assert 0 <= in_flight <= ahead(k, partitions, depth)
        # After the warm-up a partition alternates: one backward, one forward.
        w = ahead(k, partitions, depth)
        steady = order[min(w, steps) :]
        assert all(kind is Pass.BACKWARD for kind, _ in steady[0::2])
    # Run every partition's order against the data dependencies: it finishes.
    done = set()
    position = [0] * partitions
    while any(position[k] < len(orders[k]) for k in range(partitions)):
        progressed = False
        for k in range(partitions):
            while position[k] < len(orders[k]):
                kind, s = orders[k][position[k]]
                need = (
                    (k - 1, Pass.FORWARD, s) if kind is Pass.FORWARD else (k + 1, Pass.BACKWARD, s)
                )
                if not (0 <= need[0] < partitions) or need in done:
                    done.add((k, kind, s))
                    position[k] += 1
                    progressed = True
                else:
                    break
        assert progressed, f"deadlock at {position}"


def test_depth_defaults_to_one_minibatch_per_partition():
    assert depth_of(0, 1) == 1 and depth_of(5, 1) == 1
    assert depth_of(0, 3) == 3 and depth_of(1, 3) == 1 and depth_of(4, 2) == 4
    assert [ahead(k, 4, 4) for k in range(4)] == [4, 3, 2, 1]
    assert [ahead(k, 4, 2) for k in range(4)] == [2, 1, 1, 1]
    assert [ahead(k, 2, 6) for k in range(2)] == [6, 1]


# -- weight stashing in process --------------------------------------------------


def pipelined_in_process(spec, params, x, targets, bounds, depth, lr, batch_size, epochs, seed):
    """Partition cores with a shard each, driven by the schedule as the
    runner drives them (pushing and fetching every step), with the passes of
    all partitions interleaved in a different legal order than the replay's."""
    k_count = len(bounds)
    shards, cores = [], []
    for k, (first, last) in enumerate(bounds):
        block = pack_block(spec, params, first, last)
        shard = ParameterShard(k)
        shard.init(0, f"block{k}", block, optimizer={"name": "sgd", "learning_rate": lr})
        shards.append(shard)
        cores.append(PartitionCore(spec, first, last, block.copy(), lr,
                                   ahead=ahead(k, k_count, depth)))  # fmt: skip
    batches = list(batch_indices(len(x), batch_size, epochs, seed))
    queues = [list(schedule(k, k_count, depth, 0, len(batches))) for k in range(k_count)]
    inputs, deltas = {}, {}
    most_stashed = [0] * k_count
    while any(queues):
        for k in reversed(range(k_count)):  # backwards first: another legal interleaving
            core = cores[k]
            if not queues[k]:
                continue
            kind, step = queues[k][0]
            slot = step % core.ahead
            if kind is Pass.FORWARD:
                if k > 0 and (k, step) not in inputs:
                    continue
                h = x[batches[step]] if k == 0 else inputs.pop((k, step))
                out = core.forward(h, slot)
                most_stashed[k] = max(most_stashed[k], core.stashed)
                if core.is_last:
                    _, delta = core.loss_delta(out, targets[batches[step]])
                    deltas[(k, step)] = delta.copy()
                else:
                    inputs[(k + 1, step)] = out.copy()
            else:
                if (k, step) not in deltas:
                    continue
                below = core.backward(deltas.pop((k, step)), True, slot)
                if below is not None:
                    deltas[(k - 1, step)] = below.copy()
                grads = core.take_gradients()
                core.fetch_issued()
                fetched = core.block()
                shards[k].push_pull(0, grads, pusher="r0", seq=step, out=fetched)
                core.release(grads)
                previous = core.install(fetched)
                if previous is not None:
                    core.release(previous)
            queues[k].pop(0)
    final = {}
    for k, (first, last) in enumerate(bounds):
        final.update(block_views(spec, shards[k].pull(0).value.copy(), first, last))
        assert np.array_equal(shards[k].pull(0).value, cores[k].flat)  # one replica: the same
    return final, most_stashed


def problem(dtype="float64", layers=(6, 9, 8, 8, 7, 5, 3), n=50):
    spec = ModelSpec(layers, activation="tanh", output="softmax", loss="cross_entropy",
                     dtype=dtype)  # fmt: skip
    params = init_params(spec, "xavier", seed=2)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, layers[0])).astype(dtype)
    y = rng.integers(0, layers[-1], n)
    return spec, params, x, Loss(spec).targets(y)


@pytest.mark.parametrize("partitions,depth", [(2, 2), (3, 3), (3, 2), (4, 4), (2, 5)])
def test_every_backward_uses_the_weights_of_its_forward(partitions, depth):
    spec, params, x, targets = problem()
    bounds = split_layers(spec.layers, partitions)
    args = (spec, params, x, targets, bounds, depth, 0.05, 4, 2, 3)
    expected = replay(*args)
    got, stashed = pipelined_in_process(*args)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    # A partition keeps at most `ahead - 1` old versions besides its copy.
    assert stashed == [ahead(k, partitions, depth) - 1 for k in range(partitions)]


def test_without_stashing_the_replay_would_differ():
    """The replay can fail: the same schedule with each backward at the
    newest weights (no stash) ends elsewhere."""
    spec, params, x, targets = problem()
    bounds = split_layers(spec.layers, 3)
    args = (spec, params, x, targets, bounds, 3, 0.05, 4, 2, 3)
    stashed = replay(*args)
    unstashed = replay(*args, stash=False)
    assert any(not np.allclose(stashed[n], unstashed[n]) for n in stashed)


def test_depth_one_is_the_unpipelined_step_order():
    spec, params, x, targets = problem()
    bounds = split_layers(spec.layers, 3)
    args = (spec, params, x, targets, bounds, 1, 0.05, 4, 2, 3)
    got, stashed = pipelined_in_process(*args)
    ref = {n: v.copy() for n, v in params.items()}
    stack = LayerStack(spec, ref)
    for idx in batch_indices(len(x), 4, 2, 3):
        out = stack.forward(x[idx])
        _, delta = Loss(spec)(out, targets[idx], np.empty_like(out))
        stack.backward(delta, preactivation=True)
        for n in ref:
            kernels.sgd(ref[n], stack.grads[n], 0.05)
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    assert stashed == [0, 0, 0]


def test_a_slot_cannot_be_reused_before_its_backward():
    spec, params, x, _ = problem()
    core = PartitionCore(spec, 0, 2, pack_block(spec, params, 0, 2), 0.1, ahead=2)
    core.forward(x[:4], 0)
    with pytest.raises(RuntimeError, match="slot 0"):
        core.forward(x[4:8], 0)


# -- over the network ------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(2) as local:
        yield local


@pytest.mark.parametrize("partitions,depth,shards", [(3, 3, 0), (3, 2, 1), (2, 0, 2)])
def test_a_pipelined_replica_on_two_nodes_equals_its_replay(
    cluster, tmp_path, partitions, depth, shards
):
    """Real nodes over TCP, activations and deltas arriving in any order,
    partitions sharing a node or not, shards beside them or not: the model
    is the replay's."""
    config = RunConfig.from_dict({
        "model": {"layers": [8, 9, 8, 8, 7, 3], "activation": "tanh", "output": "softmax",
                  "loss": "cross_entropy", "dtype": "float64", "init": "xavier",
                  "partitions": partitions},
        "data": {"train": "blobs:150"},
        "train": {"replicas": 1, "batch_size": 4, "epochs": 2, "seed": 4, "pipeline": depth},
        "optimizer": {"name": "sgd", "learning_rate": 0.05},
        "cluster": {"parameter_shards": shards},
    })  # fmt: skip
    summary = train(config, hosts=cluster.addresses, out_dir=tmp_path,
                    secret=cluster.secret_file.read_bytes())  # fmt: skip
    spec = config.spec()
    x, y, _, _ = load_data(config)
    depth = depth_of(depth, partitions)
    bounds = split_layers(spec.layers, partitions)
    expected = replay(spec, init_params(spec, "xavier", seed=4), x.astype(spec.np_dtype),
                      Loss(spec).targets(y), bounds, depth, 0.05, 4, 2, 4)  # fmt: skip
    got = load_params(tmp_path / "model.npz", spec)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-9, err_msg=name)
    figures = summary.pipeline
    assert figures["depth"] == depth
    aheads = [ahead(k, partitions, depth) for k in range(partitions)]
    assert [p["stashed"] for p in figures["partitions"]] == [a - 1 for a in aheads]
    # The version on each activation frame: how many more local updates the
    # partition below had made when it forwarded the same minibatch.
    assert [p["lag"] for p in figures["partitions"]] == [0] + [
        aheads[k - 1] - aheads[k] for k in range(1, partitions)
    ]
    assert all(0 <= p["idle"] < 1 for p in figures["partitions"])
    assert all(p["held_bytes"] > 0 for p in figures["partitions"][: partitions - 1] if p["stashed"])
