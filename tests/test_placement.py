"""Placement as pure functions: tensor pieces over shards, roles over hosts."""

from itertools import combinations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbnode.errors import ConfigError
from dbnode.model import ModelSpec
from dbnode.placement import DEFAULT_MIN_SPLIT_BYTES, ShardPlan, plan_shards, split_layers

NAMES = [f"layer{i}.{kind}" for i in range(6) for kind in ("weight", "bias")] + ["emb", "x"]

shapes_st = st.dictionaries(
    st.sampled_from(NAMES),
    st.tuples(st.integers(0, 300))
    | st.tuples(st.integers(0, 200), st.integers(0, 40))
    | st.tuples(st.integers(1, 20), st.integers(1, 5), st.integers(1, 4)),
    min_size=1,
    max_size=10,
)
plans_st = st.tuples(
    shapes_st,
    st.integers(1, 9),  # n_shards
    st.sampled_from([4, 8]),  # itemsize
    st.sampled_from([0, 1, 64, 1024, DEFAULT_MIN_SPLIT_BYTES]),  # min_split_bytes
)


def _plan(args) -> tuple[dict, ShardPlan]:
    shapes, n, itemsize, min_split = args
    return shapes, plan_shards(shapes, n, itemsize, min_split_bytes=min_split)


@settings(max_examples=300, deadline=None)
@given(plans_st)
def test_every_row_owned_exactly_once(args):
    shapes, plan = _plan(args)
    assert [s.key for s in plan.slices] == list(range(len(plan.slices)))
    assert len({s.name for s in plan.slices}) == len(plan.slices)
    assert {name for name, _ in plan.shapes} == set(shapes)
    for name, shape in shapes.items():
        owner = np.zeros(shape[0], int)
        pieces = plan.pieces(name)
        for s in pieces:
            assert 0 <= s.shard < plan.n_shards
            assert s.tensor == name
            assert s.shape == (s.rows, *shape[1:])
            assert s.nbytes == int(np.prod(s.shape)) * plan.itemsize
            assert s.whole == (len(pieces) == 1)
            assert s.name == (name if s.whole else f"{name}[{s.row_start}:{s.row_stop}]")
            owner[s.row_start : s.row_stop] += 1
        assert (owner == 1).all()
        # contiguous, in row order, starting at 0
        assert [s.row_start for s in pieces] == [0] + [s.row_stop for s in pieces[:-1]]
        assert pieces[-1].row_stop == shape[0]
    assert sum(plan.shard_bytes()) == sum(int(np.prod(s)) for s in shapes.values()) * plan.itemsize


@settings(max_examples=200, deadline=None)
@given(plans_st, st.randoms(use_true_random=False))
def test_plan_is_deterministic_and_order_independent(args, rnd):
    shapes, plan = _plan(args)
    items = list(shapes.items())
    rnd.shuffle(items)
    _, again = _plan((dict(items), *args[1:]))
    assert again == plan
    assert again.slices == plan.slices


@settings(max_examples=300, deadline=None)
@given(plans_st)
def test_balance_bound(args):
    shapes, plan = _plan(args)
    n, itemsize, min_split = plan.n_shards, plan.itemsize, plan.min_split_bytes
    total = sum(int(np.prod(s)) for s in shapes.values()) * itemsize
    largest_row = max(int(np.prod(s[1:])) * itemsize for s in shapes.values())
    # The documented bound, recomputed here rather than read from the plan.
    bound = -(-total // n) + max(min_split, largest_row)
    assert plan.balance_bound() == bound
    assert max(plan.shard_bytes()) <= bound


def test_large_tensor_is_split_evenly_small_ones_stay_whole():
    plan = plan_shards({"w": (1000, 100), "b": (1000,)}, 4, 4)
    w = plan.pieces("w")
    # mean = (400 000 + 4 000) / 4 bytes = 252.5 rows of w: three shards
    # take 252 rows, the fourth the remaining 244 rows and the bias.
    assert [(s.row_start, s.row_stop) for s in w] == [(0, 252), (252, 504), (504, 756), (756, 1000)]
    assert sorted(s.shard for s in w) == [0, 1, 2, 3]
    (b,) = plan.pieces("b")
    assert b.whole and b.name == "b" and b.shard == w[-1].shard
    assert plan.shard_bytes() == (100800, 100800, 100800, 101600)


def test_model_is_balanced_within_a_percent():
    # A realistic case beats the worst-case bound by far: MNIST-sized MLP.
    spec = ModelSpec((784, 1024, 1024, 10))
    plan = plan_shards(spec.shapes(), 4, 4)
    loads = plan.shard_bytes()
    mean = sum(loads) / 4
    assert max(loads) <= 1.01 * mean
    assert all(s.whole for s in plan.slices if s.tensor.endswith(".bias"))


def test_one_shard_takes_everything_whole():
    shapes = ModelSpec((5, 7, 3)).shapes()
    plan = plan_shards(shapes, 1, 8)
    assert all(s.whole and s.shard == 0 for s in plan.slices)
    assert len(plan.slices) == len(shapes)
    assert plan.on_shard(0) == plan.slices


def test_min_split_bytes_keeps_small_tensors_whole():
    shapes = {"a": (100, 10), "b": (100, 10)}
    assert all(s.whole for s in plan_shards(shapes, 3, 4).slices)  # 4 KB < 64 KiB
    split = plan_shards(shapes, 3, 4, min_split_bytes=0)
    assert not all(s.whole for s in split.slices)


def test_lookup_helpers():
    plan = plan_shards({"w": (8, 2), "b": (8,)}, 2, 4, min_split_bytes=0)
    for s in plan.slices:
        assert plan.slice(s.key) is s
        assert s in plan.on_shard(s.shard)
    assert plan.shape("w") == (8, 2)
    with pytest.raises(KeyError, match="'nope'"):
        plan.pieces("nope")
    with pytest.raises(KeyError, match="key 99"):
        plan.slice(99)
    with pytest.raises(KeyError, match="shard 2"):
        plan.on_shard(2)


@pytest.mark.parametrize(
    "args, key",
    [
        (({"w": (2, 2)}, 0, 4), "n_shards"),
        (({"w": (2, 2)}, 2, 0), "itemsize"),
        (({"w": ()}, 2, 4), "shapes['w']"),
        (({"w": (2, -1)}, 2, 4), "shapes['w']"),
        (({"": (2,)}, 2, 4), "shapes"),
    ],
)
def test_bad_input_is_a_config_error(args, key):
    with pytest.raises(ConfigError) as info:
        plan_shards(*args)
    assert info.value.key == key


# ------------------------------------------------------ cut and assemble


@settings(max_examples=150, deadline=None)
@given(plans_st, st.sampled_from([np.float32, np.float64]), st.integers(0, 2**32 - 1))
def test_cut_gives_views_and_assemble_round_trips_bit_exactly(args, dtype, seed):
    shapes, plan = _plan(args)
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        full = rng.standard_normal(shape).astype(dtype)
        full.reshape(-1)[:1] = np.nan  # NaN payloads must survive too (bitwise)
        parts = plan.cut(name, full)
        assert sorted(parts) == [s.key for s in plan.pieces(name)]
        for key, part in parts.items():
            s = plan.slice(key)
            assert part.shape == s.shape
            assert part.base is full or part.base is full.base  # a view, not a copy
            if part.size:
                assert np.shares_memory(part, full)
                assert part.flags.c_contiguous
        # Reassemble copies of the pieces into a separate buffer.
        out = np.zeros_like(full)
        got = plan.assemble(name, {k: v.copy() for k, v in parts.items()}, out=out)
        assert got is out
        assert out.tobytes() == full.tobytes()


def test_receiving_into_cut_views_lands_in_place():
    plan = plan_shards({"w": (10, 3)}, 3, 8, min_split_bytes=0)
    full = np.arange(30, dtype=np.float64).reshape(10, 3)
    dest = np.zeros_like(full)
    views = plan.cut("w", dest)
    for key, view in views.items():
        view[...] = plan.slice(key).of(full)  # as recv_into would fill it
    # assemble of the destination's own views copies nothing and changes nothing.
    before = dest.copy()
    dest.flags.writeable = False  # any copy into it would raise
    views = plan.cut("w", dest)
    assert plan.assemble("w", views, out=dest) is dest
    assert dest.tobytes() == before.tobytes() == full.tobytes()


def test_assemble_checks_everything_before_writing():
    plan = plan_shards({"w": (6, 2)}, 2, 4, min_split_bytes=0)
    full = np.ones((6, 2), np.float32)
    parts = {k: v.copy() for k, v in plan.cut("w", full).items()}
    out = np.zeros((6, 2), np.float32)
    bad = dict(parts)
    last = max(bad)
    bad[last] = bad[last].astype(np.float64)
    with pytest.raises(ValueError, match="expected float32"):
        plan.assemble("w", bad, out=out)
    assert not out.any()  # the first, good part was not written either
    with pytest.raises(ValueError, match="keys"):
        plan.assemble("w", {k: parts[k] for k in list(parts)[:1]}, out=out)
    with pytest.raises(ValueError, match="shape"):
        plan.assemble("w", parts, out=np.zeros((5, 2), np.float32))
    with pytest.raises(ValueError, match="shape"):
        plan.cut("w", np.zeros((6, 3), np.float32))


# --------------------------------------------------------------- split_layers


@given(st.lists(st.integers(1, 300), min_size=2, max_size=9), st.data())
@settings(max_examples=100, deadline=None)
def test_split_layers_is_contiguous_and_optimal(layers, data):
    n = len(layers) - 1
    parts = data.draw(st.integers(1, n))
    bounds = split_layers(tuple(layers), parts)
    assert len(bounds) == parts and bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a < b for a, b in bounds) and all(
        bounds[k][1] == bounds[k + 1][0] for k in range(parts - 1)
    )
    weight = [layers[i] * layers[i + 1] + layers[i + 1] for i in range(n)]
    cost = max(sum(weight[a:b]) for a, b in bounds)
    brute = min(
        max(sum(weight[a:b]) for a, b in zip((0, *cuts), (*cuts, n)))
        for cuts in combinations(range(1, n), parts - 1)
    )
    assert cost == brute


def test_split_layers_rejects_more_partitions_than_layers():
    with pytest.raises(ConfigError, match="partitions"):
        split_layers((2, 2, 1), 3)
    with pytest.raises(ConfigError, match="partitions"):
        split_layers((2, 2, 1), 0)
