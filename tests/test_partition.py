"""Layer partitions and shards wired in process: Downpour's arithmetic
without the network (the cluster tests repeat this over TCP)."""

import numpy as np
import pytest

from dbnode.blocks import BlockPool, block_layout, block_views, pack_block
from dbnode.data import batch_indices
from dbnode.model import Loss, ModelSpec, init_params
from dbnode.optim import make_optimizer
from dbnode.partition import PartitionCore
from dbnode.placement import plan_shards
from dbnode.ps.shard import ParameterShard
from dbnode.trainer import Trainer


def run_one_replica(spec, params, x, y, bounds, n_shards, lr, n_fetch, n_push, batch, epochs, seed):
    blocks = {f"block{k}": pack_block(spec, params, a, b) for k, (a, b) in enumerate(bounds)}
    plan = plan_shards(
        {n: b.shape for n, b in blocks.items()},
        n_shards,
        spec.np_dtype.itemsize,
        min_split_bytes=64,
    )
    shards = [ParameterShard(i) for i in range(n_shards)]
    for name, full in blocks.items():
        for key, piece in plan.cut(name, full).items():
            shards[plan.slice(key).shard].init(
                key, plan.slice(key).name, piece, optimizer={"name": "sgd", "learning_rate": lr}
            )
    cores = [
        PartitionCore(spec, a, b, blocks[f"block{k}"].copy(), lr, n_fetch, n_push)
        for k, (a, b) in enumerate(bounds)
    ]
    targets = Loss(spec).targets(y)
    for step, idx in enumerate(batch_indices(len(x), batch, epochs, seed)):
        h = x[idx]
        for core in cores:
            h = core.forward(h)
        _, delta = cores[-1].loss_delta(h, targets[idx])
        for core in reversed(cores):
            delta = core.backward(delta)
        for k, core in enumerate(cores):
            if core.push_due:
                grads = core.take_gradients()
                for key, piece in plan.cut(f"block{k}", grads).items():
                    shards[plan.slice(key).shard].push(key, piece, pusher="r0", seq=step)
                core.release(grads)
            if core.fetch_due:
                core.fetch_issued()
                fetched = np.empty_like(core.flat)
                for key, view in plan.cut(f"block{k}", fetched).items():
                    shards[plan.slice(key).shard].pull(key, out=view)
                core.install(fetched)
    final = {}
    for k, (a, b) in enumerate(bounds):
        flat = np.empty_like(blocks[f"block{k}"])
        for key, view in plan.cut(f"block{k}", flat).items():
            shards[plan.slice(key).shard].pull(key, out=view)
        final.update(block_views(spec, flat, a, b))
    return final, shards, plan


@pytest.mark.parametrize("bounds", [[(0, 3)], [(0, 1), (1, 3)], [(0, 1), (1, 2), (2, 3)]])
@pytest.mark.parametrize("n_shards", [1, 3])
def test_one_replica_fetching_and_pushing_every_step_is_the_reference_trainer(bounds, n_shards):
    spec = ModelSpec(
        (5, 8, 6, 3), activation="tanh", output="softmax", loss="cross_entropy", dtype="float64"
    )
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 5)), rng.integers(0, 3, 40)
    params = init_params(spec, "xavier", seed=1)
    ref = {k: v.copy() for k, v in params.items()}
    Trainer(spec, ref, make_optimizer("sgd", 0.2)).fit(x, y, batch_size=1, epochs=2, seed=7)
    final, shards, plan = run_one_replica(spec, params, x, y, bounds, n_shards, 0.2, 1, 1, 1, 2, 7)
    for name in ref:
        np.testing.assert_allclose(final[name], ref[name], rtol=0, atol=1e-9)
    assert sum(s.stats()["totals"]["pushes"] for s in shards) == 80 * len(plan.slices)


def test_accumulating_pushes_sum_the_steps_between_them():
    # n_push = 3 with SGD on the shard: the shard moves by the sum of three
    # steps' gradients, each computed on the locally updated copy.
    spec = ModelSpec((3, 4, 1), dtype="float64")
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(9, 3)), rng.random(9)
    params = init_params(spec, seed=3)
    final, shards, plan = run_one_replica(
        spec,
        {k: v.copy() for k, v in params.items()},
        x,
        y,
        [(0, 1), (1, 2)],
        2,
        0.1,
        3,
        3,
        1,
        1,
        0,
    )
    ref = {k: v.copy() for k, v in params.items()}
    Trainer(spec, ref, make_optimizer("sgd", 0.1)).fit(x, y, batch_size=1, epochs=1, seed=0)
    for name in ref:  # local SGD between pushes: the same trajectory
        np.testing.assert_allclose(final[name], ref[name], rtol=0, atol=1e-12)
    assert sum(s.stats()["totals"]["pushes"] for s in shards) == 3 * len(plan.slices)


def test_block_layout_aligns_every_tensor_and_round_trips():
    spec = ModelSpec((5, 7, 3), dtype="float32")
    params = init_params(spec, seed=0)
    flat = pack_block(spec, params, 0, 2)
    layout, total = block_layout(spec, 0, 2)
    assert flat.shape == (total,) and all(off % 16 == 0 for off, _ in layout.values())
    assert total >= sum(p.size for p in params.values())
    views = block_views(spec, flat, 0, 2)
    for name in params:
        np.testing.assert_array_equal(views[name], params[name])
        assert views[name].base is flat or views[name].base is flat.base
    padding = np.ones(total, bool)
    for off, shape in layout.values():
        padding[off : off + int(np.prod(shape))] = False
    assert not flat[padding].any()
    with pytest.raises(ValueError, match="flat block"):
        block_views(spec, flat[:-1], 0, 2)


def test_core_buffers():
    spec = ModelSpec((3, 4, 2), dtype="float32")
    flat = pack_block(spec, init_params(spec), 0, 2)
    core = PartitionCore(spec, 0, 2, flat, 0.1, n_fetch=2, n_push=1)
    out = core.forward(np.ones((2, 3), np.float32))
    _, delta = core.loss_delta(out, np.zeros((2, 2), np.float32))
    assert core.backward(delta) is None and core.step == 1
    assert core.push_due and not core.fetch_due
    grads = core.take_gradients()
    assert grads.any() and grads.dtype == np.float32
    assert not core.take_gradients().any()  # nothing accumulated since: zeros
    first = grads.copy()
    core.release(grads)
    # A released block's old contents never leak into the next push.
    before = core.flat.copy()
    out = core.forward(np.ones((2, 3), np.float32))
    _, delta = core.loss_delta(out, np.zeros((2, 2), np.float32))
    core.backward(delta)
    again = core.take_gradients()
    reference = PartitionCore(spec, 0, 2, before, 0.1)
    out = reference.forward(np.ones((2, 3), np.float32))
    _, delta = reference.loss_delta(out, np.zeros((2, 2), np.float32))
    reference.backward(delta)
    np.testing.assert_array_equal(again, reference.take_gradients())
    assert not np.array_equal(again, first + again)
    with pytest.raises(ValueError, match="fetched block"):
        core.install(flat[:-1].copy())
    other = core.install(flat.copy() + 1)
    assert other is flat and core.flat is not flat
    middle_spec = ModelSpec((3, 4, 4, 2))
    middle = PartitionCore(
        middle_spec, 1, 2, pack_block(middle_spec, init_params(middle_spec), 1, 2), 0.1
    )
    with pytest.raises(RuntimeError, match="last partition"):
        middle.loss_delta(np.zeros((1, 4), np.float32), np.zeros((1, 2), np.float32))


def test_partitions_sharing_a_pool_compute_in_the_block_the_other_just_gave_back():
    """Replicas taking turns on a node share their spare blocks: a step's
    gradients land in the block the turn before pushed (the one still in
    the caches), and each replica's arithmetic is that of one on its own."""
    spec = ModelSpec((3, 4, 2), dtype="float32")
    pool = BlockPool(spec, 0, 2)
    x, y = np.ones((2, 3), np.float32), np.array([[0, 1], [1, 0]], np.float32)
    cores = [PartitionCore(spec, 0, 2, pack_block(spec, init_params(spec, seed=k), 0, 2), 0.1,
                           pool=pool) for k in range(2)]  # fmt: skip
    alone = [PartitionCore(spec, 0, 2, pack_block(spec, init_params(spec, seed=k), 0, 2), 0.1)
             for k in range(2)]  # fmt: skip
    for _ in range(3):
        for core, own in zip(cores, alone):
            pushed = []
            for c in (core, own):
                c.whole_step(x, y)
                pushed.append(c.take_gradients())
            np.testing.assert_array_equal(*pushed)
            core.release(pushed[0])
            own.release(pushed[1])
            np.testing.assert_array_equal(core.flat, own.flat)
        assert pool.take() is pushed[0]  # the last given comes first
        pool.give(pushed[0])
    # The other replica's next gradients overwrite that block: nothing of its
    # old contents stays (the padding between tensors stays zero).
    cores[0].whole_step(x, y)
    grads = cores[0].take_gradients()
    assert grads is pushed[0]
    alone[0].whole_step(x, y)
    np.testing.assert_array_equal(grads, alone[0].take_gradients())
    assert pool.views(grads) is pool.views(grads)  # made once per block
    # A partition that ends gives back every block it holds: the next
    # incarnation of a replica computes in them, nothing is made anew.
    cores[0].release(grads)
    held = {id(cores[0].flat), id(grads)}
    cores[0].close()
    assert cores[0].flat is None
    assert {id(pool.take()) for _ in range(2)} == held


def test_a_fetch_installed_between_a_forward_and_its_backward_keeps_the_weights_it_read():
    """A pipeline's last partition (one minibatch in flight) may install a
    fetch between its forward and its backward: the block the forward read
    is not handed out (the backward's gradient block would overwrite the
    weights it is computing with), and the gradients are those of the
    weights the forward read."""
    spec = ModelSpec((3, 4, 2), dtype="float64")
    flat = pack_block(spec, init_params(spec, seed=1), 0, 2)
    x, y = np.ones((2, 3)), np.array([[0.0, 1.0], [1.0, 0.0]])
    core, reference = (
        PartitionCore(spec, 0, 2, flat.copy(), 0.1),
        PartitionCore(spec, 0, 2, flat, 0.1),
    )
    for c in (core, reference):  # a step and its push before
        _, delta = c.loss_delta(c.forward(x), y)
        c.backward(delta, local_update=False)
        c.release(c.take_gradients())
    _, delta = core.loss_delta(core.forward(x), y)
    previous = core.install(flat + 1.0)  # a fetch lands
    if previous is not None:  # as the runner does: nobody reads it any more
        core.release(previous)
    core.backward(delta, local_update=False)
    _, delta = reference.loss_delta(reference.forward(x), y)
    reference.backward(delta, local_update=False)
    np.testing.assert_array_equal(core.take_gradients(), reference.take_gradients())


def test_a_late_fetch_keeps_the_local_steps_taken_since_it_was_issued():
    spec = ModelSpec((3, 4, 2), dtype="float64")
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(6, 3)), rng.random((6, 2))
    params = init_params(spec, seed=1)
    shard = pack_block(spec, params, 0, 2)  # a stand-in shard, plain SGD
    core = PartitionCore(spec, 0, 2, shard.copy(), 0.3)
    ref = {k: v.copy() for k, v in params.items()}
    trainer = Trainer(spec, ref, make_optimizer("sgd", 0.3))
    pending = None
    for i in range(6):
        out = core.forward(x[i : i + 1])
        _, delta = core.loss_delta(out, y[i : i + 1])
        core.backward(delta)
        trainer.step(x[i : i + 1], y[i : i + 1])
        if pending is not None:  # the last fetch lands a step late
            core.install(pending)
        grads = core.take_gradients()
        shard -= 0.3 * grads  # the push lands at once
        core.release(grads)
        core.fetch_issued()
        pending = shard.copy()
    for name in ref:
        np.testing.assert_allclose(core.params[name], ref[name], rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_fetch,n_push", [(1, 1), (2, 1), (1, 3)])
def test_late_fetches_with_any_push_and_fetch_periods(n_fetch, n_push):
    spec = ModelSpec((3, 4, 2), dtype="float64")
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(12, 3)), rng.random((12, 2))
    params = init_params(spec, seed=2)
    shard = pack_block(spec, params, 0, 2)
    core = PartitionCore(spec, 0, 2, shard.copy(), 0.2, n_fetch, n_push)
    ref = {k: v.copy() for k, v in params.items()}
    trainer = Trainer(spec, ref, make_optimizer("sgd", 0.2))
    pending = None
    for i in range(12):
        out = core.forward(x[i : i + 1])
        _, delta = core.loss_delta(out, y[i : i + 1])
        core.backward(delta)
        trainer.step(x[i : i + 1], y[i : i + 1])
        if pending is not None and (core.push_due or core.fetch_due):
            core.install(pending)
            pending = None
        if core.push_due:
            grads = core.take_gradients()
            shard -= 0.2 * grads
            core.release(grads)
        if core.fetch_due:
            core.fetch_issued()
            pending = shard.copy()
    if pending is not None:
        core.install(pending)
    for name in ref:
        np.testing.assert_allclose(core.params[name], ref[name], rtol=0, atol=1e-12)


def test_taking_gradients_over_a_paired_fetch_in_flight_is_refused():
    spec = ModelSpec((3, 2), dtype="float64")
    core = PartitionCore(spec, 0, 1, pack_block(spec, init_params(spec), 0, 1), 0.1)
    core.take_gradients()
    core.fetch_issued()
    with pytest.raises(RuntimeError, match="install the fetch in flight"):
        core.take_gradients()
