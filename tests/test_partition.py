"""Layer partitions and shards wired in process: Downpour's arithmetic
without the network (the cluster tests repeat this over TCP)."""

import numpy as np
import pytest

from dbnode.data import batch_indices
from dbnode.model import Loss, ModelSpec, init_params
from dbnode.optim import make_optimizer
from dbnode.partition import PartitionCore
from dbnode.placement import plan_shards
from dbnode.shard import ParameterShard
from dbnode.trainer import Trainer


def run_one_replica(spec, params, x, y, bounds, n_shards, lr, n_fetch, n_push, batch, epochs, seed):
    plan = plan_shards(spec.shapes(), n_shards, spec.np_dtype.itemsize, min_split_bytes=64)
    shards = [ParameterShard(i) for i in range(n_shards)]
    for name, full in params.items():
        for key, piece in plan.cut(name, full).items():
            shards[plan.slice(key).shard].init(key, plan.slice(key).name, piece,
                                               optimizer={"name": "sgd", "learning_rate": lr})
    cores = []
    for first, last in bounds:
        mine = {n: params[n].copy() for n in params if first <= int(n[5:n.index(".")]) < last}
        cores.append(PartitionCore(spec, first, last, mine, lr, n_fetch, n_push))
    targets = Loss(spec).targets(y)
    for step, idx in enumerate(batch_indices(len(x), batch, epochs, seed)):
        h = x[idx]
        for core in cores:
            h = core.forward(h)
        _, delta = cores[-1].loss_delta(h, targets[idx])
        for core in reversed(cores):
            delta = core.backward(delta)
        for core in cores:
            if core.push_due:
                grads = core.take_gradients()
                for name, g in grads.items():
                    for key, piece in plan.cut(name, g).items():
                        shards[plan.slice(key).shard].push(key, piece, pusher="r0", seq=step)
                core.release(grads)
            if core.fetch_due:
                fetched = {n: np.empty_like(p) for n, p in core.params.items()}
                for name, buf in fetched.items():
                    for key, view in plan.cut(name, buf).items():
                        shards[plan.slice(key).shard].pull(key, out=view)
                core.install(fetched)
    final = {name: np.empty(shape, spec.np_dtype) for name, shape in spec.shapes().items()}
    for name, buf in final.items():
        for key, view in plan.cut(name, buf).items():
            shards[plan.slice(key).shard].pull(key, out=view)
    return final, shards


@pytest.mark.parametrize("bounds", [[(0, 3)], [(0, 1), (1, 3)], [(0, 1), (1, 2), (2, 3)]])
@pytest.mark.parametrize("n_shards", [1, 3])
def test_one_replica_fetching_and_pushing_every_step_is_the_reference_trainer(bounds, n_shards):
    spec = ModelSpec((5, 8, 6, 3), activation="tanh", output="softmax", loss="cross_entropy",
                     dtype="float64")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 5)), rng.integers(0, 3, 40)
    params = init_params(spec, "xavier", seed=1)
    ref = {k: v.copy() for k, v in params.items()}
    Trainer(spec, ref, make_optimizer("sgd", 0.2)).fit(x, y, batch_size=1, epochs=2, seed=7)
    final, shards = run_one_replica(spec, params, x, y, bounds, n_shards, 0.2, 1, 1, 1, 2, 7)
    for name in ref:
        np.testing.assert_allclose(final[name], ref[name], rtol=0, atol=1e-9)
    assert sum(s.stats()["totals"]["pushes"] for s in shards) == 80 * len(plan_pieces(spec, n_shards))


def plan_pieces(spec, n_shards):
    return plan_shards(spec.shapes(), n_shards, spec.np_dtype.itemsize, min_split_bytes=64).slices


def test_accumulating_pushes_sum_the_steps_between_them():
    # n_push = 3 with SGD on the shard: the shard moves by the sum of three
    # steps' gradients, each computed on the locally updated copy.
    spec = ModelSpec((3, 4, 1), dtype="float64")
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(9, 3)), rng.random(9)
    params = init_params(spec, seed=3)
    final, shards = run_one_replica(spec, {k: v.copy() for k, v in params.items()}, x, y,
                                    [(0, 1), (1, 2)], 2, 0.1, 3, 3, 1, 1, 0)
    ref = {k: v.copy() for k, v in params.items()}
    Trainer(spec, ref, make_optimizer("sgd", 0.1)).fit(x, y, batch_size=1, epochs=1, seed=0)
    for name in ref:   # local SGD between pushes: the same trajectory
        np.testing.assert_allclose(final[name], ref[name], rtol=0, atol=1e-12)
    assert sum(s.stats()["totals"]["pushes"] for s in shards) == 3 * len(plan_pieces(spec, 2))


def test_core_buffers():
    spec = ModelSpec((3, 4, 2), dtype="float32")
    params = init_params(spec)
    core = PartitionCore(spec, 0, 2, params, 0.1, n_fetch=2, n_push=1)
    out = core.forward(np.ones((2, 3), np.float32))
    _, delta = core.loss_delta(out, np.zeros((2, 2), np.float32))
    assert core.backward(delta) is None and core.step == 1
    assert core.push_due and not core.fetch_due
    grads = core.take_gradients()
    assert any(g.any() for g in grads.values())
    assert not any(g.any() for g in core.take_gradients().values())   # fresh buffer
    core.release(grads)
    assert not any(g.any() for g in grads.values())
    with pytest.raises(ValueError, match="fetched"):
        core.install({"layer0.weight": params["layer0.weight"]})
    with pytest.raises(ValueError, match="missing parameters"):
        PartitionCore(spec, 0, 2, {"layer0.weight": params["layer0.weight"]}, 0.1)
    middle = PartitionCore(ModelSpec((3, 4, 4, 2)), 1, 2, init_params(ModelSpec((3, 4, 4, 2))), 0.1)
    with pytest.raises(RuntimeError, match="last partition"):
        middle.loss_delta(np.zeros((1, 4), np.float32), np.zeros((1, 2), np.float32))
