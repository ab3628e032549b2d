"""The parameter shard without the network: init, pull, push, dedup, stats,
snapshots."""

import json
import os
import zipfile

import numpy as np
import pytest

from dbnode import durable, reference
from dbnode.errors import (
    DBNodeError,
    DTypeMismatchError,
    ErrorCode,
    KeyConflictError,
    NotFiniteError,
    ShapeMismatchError,
    ShardError,
    SnapshotError,
    UnknownKeyError,
)
from dbnode.model import ModelSpec, init_params
from dbnode.optim import SGD, Momentum
from dbnode.placement import plan_shards
from dbnode.ps import snapshot as snapshot_module
from dbnode.ps.shard import ParameterShard

DTYPES = [np.float32, np.float64]
TOL = {np.dtype(np.float32): (2e-6, 1e-7), np.dtype(np.float64): (1e-13, 1e-15)}
OPTIMIZERS = {
    "sgd": {"name": "sgd", "learning_rate": 0.5},
    "momentum": {"name": "momentum", "learning_rate": 0.1, "momentum": 0.8},
    "adagrad": {"name": "adagrad", "learning_rate": 0.3, "eps": 1e-6},
}


def _reference_step(name, w, g, state, opt):
    if name == "sgd":
        reference.sgd(w, g, opt["learning_rate"])
    elif name == "momentum":
        reference.momentum(w, g, state["velocity"], opt["learning_rate"], opt["momentum"])
    else:
        reference.adagrad(w, g, state["sum_sq"], opt["learning_rate"], opt["eps"])


def _bits(a: np.ndarray) -> bytes:
    return a.dtype.str.encode() + str(a.shape).encode() + a.tobytes()


def _tensor_state(s: ParameterShard, key: int):
    """Everything a push could change, bitwise."""
    state = {k: _bits(v) for k, v in s.optimizer_state(key).items()}
    return _bits(s.view(key).value), state, s.version(key)


def _shard(dtype=np.float32, opt="momentum") -> ParameterShard:
    rng = np.random.default_rng(1)
    s = ParameterShard(shard_id=3)
    w = rng.standard_normal((4, 3)).astype(dtype)
    s.init(7, "layer0.weight[0:4]", w, optimizer=OPTIMIZERS[opt])
    s.init(8, "layer0.bias", rng.standard_normal(4).astype(dtype), optimizer=OPTIMIZERS["adagrad"])
    return s


# ------------------------------------------------------------- init / pull


def test_init_copies_into_an_aligned_owned_buffer():
    value = np.arange(12, dtype=np.float32).reshape(3, 4)
    s = ParameterShard()
    assert s.init(1, "w", value, optimizer={"name": "sgd", "learning_rate": 0.1}) == 0
    value[...] = -1  # the caller reuses its buffer
    got, version = s.pull(1)
    assert version == 0 and got.dtype == np.float32
    assert (got == np.arange(12).reshape(3, 4)).all()
    view, _ = s.view(1)
    assert view.ctypes.data % 64 == 0 and view.flags.c_contiguous
    assert s.keys() == [1] and 1 in s and len(s) == 1 and s.name(1) == "w"


@pytest.mark.parametrize("dtype", DTYPES)
def test_init_from_initializers(dtype):
    s = ParameterShard()
    opt = {"name": "sgd", "learning_rate": 0.1}
    s.init(0, "z", shape=(2, 3), dtype=dtype, optimizer=opt)
    s.init(
        1, "c", shape=(4,), dtype=np.dtype(dtype).name, initializer="constant:1.5", optimizer=opt
    )
    s.init(2, "n", shape=(500,), dtype=dtype, initializer="normal:0.2", seed=5, optimizer=opt)
    s.init(3, "n2", shape=(500,), dtype=dtype, initializer="normal:0.2", seed=5, optimizer=opt)
    assert (s.pull(0).value == 0).all() and s.pull(0).value.dtype == dtype
    assert (s.pull(1).value == 1.5).all()
    n = s.pull(2).value
    assert n.dtype == dtype and 0.15 < n.std() < 0.25
    assert n.tobytes() == s.pull(3).value.tobytes()  # seeded
    with pytest.raises(ShardError, match="initializer 'uniform:1'"):
        s.init(4, "u", shape=(2,), dtype=dtype, initializer="uniform:1", optimizer=opt)


def test_reinit_is_idempotent_and_conflicts_are_errors():
    s = _shard()
    g = np.ones((4, 3), np.float32)
    s.push(7, g)
    before = _bits(s.pull(7).value)
    # A retried INIT (same description, any value) keeps the pushed state.
    zeros = np.zeros((4, 3), np.float32)
    assert s.init(7, "layer0.weight[0:4]", zeros, optimizer=OPTIMIZERS["momentum"]) == 1
    assert s.init(7, "layer0.weight[0:4]", shape=(4, 3), dtype="float32",
                  optimizer=Momentum(0.1, 0.8)) == 1  # fmt: skip
    assert _bits(s.pull(7).value) == before
    for kwargs, what in [
        (dict(name="w", value=np.zeros((4, 3), np.float32)), "name"),
        (dict(value=np.zeros((4, 4), np.float32)), "shape"),
        (dict(value=np.zeros((4, 3), np.float64)), "dtype"),
        (dict(value=np.zeros((4, 3), np.float32), optimizer=OPTIMIZERS["sgd"]), "optimizer"),
    ]:
        args = {"name": "layer0.weight[0:4]", "optimizer": OPTIMIZERS["momentum"], **kwargs}
        with pytest.raises(KeyConflictError, match=f"key 7 .*'{what}'") as info:
            s.init(7, **args)
        assert info.value.key == 7
    assert _bits(s.pull(7).value) == before and s.version(7) == 1


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(value=np.zeros(3, np.int32)), DTypeMismatchError, "float32 or float64, got int32"),
        (dict(value=np.zeros(3, np.float32), shape=(4,)), ShapeMismatchError, r"shape \(4,\) given"),
        (dict(value=np.zeros(3, np.float32), dtype="float64"), DTypeMismatchError, "dtype float64 given"),
        (dict(value=[1.0, 2.0]), ShardError, "numpy array"),
        (dict(shape=(3,)), ShardError, "shape and a dtype"),
        (dict(shape=(2.5,), dtype="float32"), ShapeMismatchError, "bad shape"),
        (dict(shape=(-1,), dtype="float32"), ShapeMismatchError, "bad shape"),
        (dict(shape=(2,), dtype="nonsense"), DTypeMismatchError, "float32 or float64"),
        (dict(value=np.zeros(3, np.float32), optimizer={"name": "nadam", "learning_rate": 1}),
         ShardError, "unknown optimizer 'nadam'"),
        (dict(value=np.zeros(3, np.float32), optimizer={"name": "sgd", "learning_rate": -1}),
         ShardError, "learning_rate"),
        (dict(value=np.zeros(3, np.float32), optimizer={"name": "sgd"}), ShardError, "learning_rate"),
        (dict(value=np.zeros(3, np.float32), optimizer={"name": "sgd", "learning_rate": 1, "mu": 2}),
         ShardError, "bad optimizer"),
    ],
)  # fmt: skip
def test_bad_init_is_rejected(kwargs, error, match):
    s = ParameterShard()
    kwargs.setdefault("optimizer", OPTIMIZERS["sgd"])
    with pytest.raises(error, match=match):
        s.init(5, "t", **kwargs)
    assert len(s) == 0
    with pytest.raises(ShardError, match="key must be an integer"):
        s.init(2**32, "t", np.zeros(2), optimizer=OPTIMIZERS["sgd"])
    with pytest.raises(ShardError, match="name"):
        s.init(1, "", np.zeros(2), optimizer=OPTIMIZERS["sgd"])


def test_pull_copies_view_does_not():
    s = _shard()
    copy, v0 = s.pull(7)
    view, _ = s.view(7)
    assert not np.shares_memory(copy, view)
    assert not view.flags.writeable
    s.push(7, np.ones((4, 3), np.float32))
    assert s.pull(7).value.tobytes() == view.tobytes() != copy.tobytes()  # view is live
    out = np.empty((4, 3), np.float32)
    got, v1 = s.pull(7, out=out)
    assert got is out and (v0, v1) == (0, 1) and out.tobytes() == view.tobytes()
    with pytest.raises(DTypeMismatchError):
        s.pull(7, out=np.empty((4, 3), np.float64))
    with pytest.raises(ShapeMismatchError):
        s.pull(7, out=np.empty((3, 4), np.float32))
    with pytest.raises(ShardError, match="C-contiguous"):
        s.pull(7, out=np.empty((3, 4), np.float32).T)
    with pytest.raises(UnknownKeyError, match="key 99"):
        s.pull(99)


# ------------------------------------------------------------------- push


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_push_matches_the_numpy_reference(opt, dtype):
    rng = np.random.default_rng(0)
    config = OPTIMIZERS[opt]
    w = rng.standard_normal((17, 5)).astype(dtype)
    s = ParameterShard()
    s.init(0, "w", w, optimizer=config)
    ref_w = w.copy()
    state_names = {"momentum": ["velocity"], "adagrad": ["sum_sq"]}.get(opt, [])
    ref_state = {k: np.zeros_like(w) for k in state_names}
    rtol, atol = TOL[np.dtype(dtype)]
    for step in range(1, 6):
        g = rng.standard_normal(w.shape).astype(dtype)
        if step == 3:
            g = np.asfortranarray(g)  # any layout is accepted
        assert s.push(0, g) == step
        _reference_step(opt, ref_w, g, ref_state, config)
        got = s.pull(0).value
        assert got.dtype == dtype
        np.testing.assert_allclose(got, ref_w, rtol=rtol, atol=atol)
        for k, v in s.optimizer_state(0).items():
            assert v.dtype == dtype
            np.testing.assert_allclose(v, ref_state[k], rtol=rtol, atol=atol)
    assert s.version(0) == 5


def test_sgd_push_is_exact_on_representable_values():
    # 1 - 0.5 * 2 = 0 with no rounding anywhere: a kernel that ignored the
    # learning rate or the sign would not get it.
    s = ParameterShard()
    s.init(0, "w", np.ones(4, np.float32), optimizer=SGD(0.5))
    s.push(0, np.full(4, 2, np.float32))
    assert s.pull(0).value.tolist() == [0, 0, 0, 0]


def test_push_pull_returns_the_updated_copy():
    s = _shard()
    g = np.ones((4, 3), np.float32)
    value, version = s.push_pull(7, g, pusher="r0", seq=0)
    assert version == 1
    assert value.tobytes() == s.view(7).value.tobytes()
    assert not np.shares_memory(value, s.view(7).value)
    # duplicate: nothing applied, current value returned
    value2, version2 = s.push_pull(7, g, pusher="r0", seq=0)
    assert version2 == 1 and value2.tobytes() == value.tobytes()
    # a bad `out` is caught before the push is applied
    with pytest.raises(ShapeMismatchError, match="out shape"):
        s.push_pull(7, g, pusher="r0", seq=1, out=np.empty(12, np.float32))
    assert s.version(7) == 1 and s.view(7).value.tobytes() == value.tobytes()
    out = np.empty((4, 3), np.float32)
    assert s.push_pull(7, g, pusher="r0", seq=1, out=out) == (out, 2)


def test_dedup_drops_retried_and_stale_pushes():
    s = _shard(opt="sgd")
    g = np.ones((4, 3), np.float32)
    assert s.push(7, g, pusher="a", seq=5) == 1
    after_first = _bits(s.pull(7).value)
    assert s.push(7, g, pusher="a", seq=5) == 1  # the retry
    assert s.push(7, g, pusher="a", seq=2) == 1  # older
    assert _bits(s.pull(7).value) == after_first
    assert s.push(7, g, pusher="b", seq=0) == 2  # other pusher, own sequence
    assert s.push(7, g, pusher="a", seq=9) == 3  # gaps are fine
    assert s.push(8, np.ones(4, np.float32), pusher="a", seq=1) == 1  # per key
    assert s.push(7, g) == 4  # without ids: always applied
    t = {d["key"]: d for d in s.stats()["tensors"]}
    assert (t[7]["pushes"], t[7]["duplicates"], t[7]["pushers"]) == (4, 2, 2)
    assert s.stats()["totals"]["duplicates"] == 2


BAD_PUSHES = [
    ("dtype", lambda: np.ones((4, 3), np.float64), {}, DTypeMismatchError,
     r"key 7 \(layer0.weight\[0:4\]\): gradient dtype expected float32, got float64"),
    ("shape", lambda: np.ones((3, 4), np.float32), {}, ShapeMismatchError,
     r"key 7 \(layer0.weight\[0:4\]\): gradient shape expected \(4, 3\), got \(3, 4\)"),
    ("flat", lambda: np.ones(12, np.float32), {}, ShapeMismatchError, "expected"),
    ("big-endian", lambda: np.ones((4, 3), ">f4"), {}, DTypeMismatchError, "got >f4"),
    ("list", lambda: [[1.0] * 3] * 4, {}, ShardError, "numpy array"),
    ("seq-only", lambda: np.ones((4, 3), np.float32), {"seq": 1}, ShardError, "both pusher and seq"),
    ("pusher-only", lambda: np.ones((4, 3), np.float32), {"pusher": "a"}, ShardError, "both"),
    ("negative-seq", lambda: np.ones((4, 3), np.float32), {"pusher": "a", "seq": -1}, ShardError, "seq"),
    ("int-pusher", lambda: np.ones((4, 3), np.float32), {"pusher": 3, "seq": 1}, ShardError, "pusher"),
    ("nan", lambda: _with(np.ones((4, 3), np.float32), (2, 1), np.nan), {}, NotFiniteError, "NaN or infinity"),
    ("inf", lambda: _with(np.ones((4, 3), np.float32), (0, 0), -np.inf), {}, NotFiniteError, "NaN or infinity"),
]  # fmt: skip


def _with(a, where, value):
    a[where] = value
    return a


def test_a_non_finite_init_value_is_refused():
    s = ParameterShard()
    with pytest.raises(NotFiniteError, match="NaN or infinity") as info:
        s.init(1, "w", np.array([1.0, np.inf], np.float32), optimizer=SGD(0.1))
    assert info.value.code == ErrorCode.NOT_FINITE and len(s) == 0


@pytest.mark.parametrize(
    "what, grad, kwargs, error, match", BAD_PUSHES, ids=[b[0] for b in BAD_PUSHES]
)
def test_bad_push_is_rejected_and_changes_nothing(what, grad, kwargs, error, match):
    s = _shard()
    s.push(7, np.full((4, 3), 0.5, np.float32), pusher="a", seq=0)  # some momentum state
    before = _tensor_state(s, 7)
    with pytest.raises(error, match=match) as info:
        s.push(7, grad(), **kwargs)
    assert isinstance(info.value, DBNodeError) and isinstance(info.value, ValueError)
    assert info.value.key == 7
    assert _tensor_state(s, 7) == before
    assert s.stats()["tensors"][0]["rejected"] == 1
    # a rejected push does not consume the pusher's sequence number
    assert s.push(7, np.ones((4, 3), np.float32), pusher="a", seq=1) == 2


def test_errors_carry_protocol_codes():
    s = _shard()
    with pytest.raises(UnknownKeyError) as info:
        s.push(99, np.ones(3, np.float32))
    assert info.value.code == ErrorCode.UNKNOWN_KEY and info.value.key == 99
    assert s.stats()["totals"]["rejected"] == 1
    with pytest.raises(ShapeMismatchError) as info:
        s.push(7, np.ones(3, np.float32))
    assert info.value.code == ErrorCode.SHAPE_MISMATCH
    with pytest.raises(DTypeMismatchError) as info:
        s.push(7, np.ones((4, 3)))
    assert info.value.code == ErrorCode.DTYPE_MISMATCH
    assert ShardError(1, "x").code == KeyConflictError(1, "x").code == ErrorCode.BAD_REQUEST


def test_stats():
    s = _shard(dtype=np.float64)
    s.push(7, np.ones((4, 3)), pusher="p", seq=1)
    st = s.stats()
    json.dumps(st)  # ready for a STATS reply's meta
    assert st["shard"] == 3
    t7, t8 = st["tensors"]
    assert t7 == {
        "key": 7, "name": "layer0.weight[0:4]", "shape": [4, 3], "dtype": "float64", "version": 1,
        "pushes": 1, "duplicates": 0, "rejected": 0, "bytes": 96, "state_bytes": 96,
        "optimizer": {"name": "momentum", "learning_rate": 0.1, "momentum": 0.8}, "scale": 1.0,
        "pushers": 1, "last_seq": {"p": 1},
    }  # fmt: skip
    assert t8["bytes"] == 32 and t8["version"] == 0
    assert st["totals"] == {"tensors": 2, "bytes": 128, "state_bytes": 128, "pushes": 1,
                            "duplicates": 0, "rejected": 0}  # fmt: skip


def test_sharded_model_matches_one_big_update():
    """Placement and shards together: a model split over three shards, each
    piece updated on its own shard, reassembles to the unsharded update."""
    spec = ModelSpec((30, 40, 5), dtype="float64")
    params = init_params(spec, seed=2)
    plan = plan_shards(spec.shapes(), 3, 8, min_split_bytes=0)
    assert any(not s.whole for s in plan.slices)
    shards = [ParameterShard(i) for i in range(3)]
    for name, full in params.items():
        for key, piece in plan.cut(name, full).items():
            sl = plan.slice(key)
            shards[sl.shard].init(key, sl.name, piece, optimizer=OPTIMIZERS["adagrad"])
    rng = np.random.default_rng(0)
    expected = {k: v.copy() for k, v in params.items()}
    sum_sq = {k: np.zeros_like(v) for k, v in params.items()}
    for seq in range(3):
        for name, full in params.items():
            grad = rng.standard_normal(full.shape)
            for key, piece in plan.cut(name, grad).items():
                shards[plan.slice(key).shard].push(key, piece, pusher="r0", seq=seq)
            reference.adagrad(expected[name], grad, sum_sq[name], 0.3, 1e-6)
    for name, full in params.items():
        out = np.empty_like(full)
        views = plan.cut(name, out)
        for key, view in views.items():
            shards[plan.slice(key).shard].pull(key, out=view)  # lands in place
        plan.assemble(name, views, out=out)
        np.testing.assert_allclose(out, expected[name], rtol=1e-12, atol=1e-14)


# -------------------------------------------------------------- snapshots


def _full_state(s: ParameterShard):
    return (
        s.shard_id,
        s.stats(),
        {k: _bits(s.view(k).value) for k in s.keys()},
        {k: {n: _bits(a) for n, a in s.optimizer_state(k).items()} for k in s.keys()},
        {k: s.optimizer(k) for k in s.keys()},
        {k: dict(s._tensors[k].last_seq) for k in s.keys()},
    )


def _busy_shard(dtype=np.float32) -> ParameterShard:
    s = _shard(dtype)
    s.init(9, "c", shape=(3, 2), dtype=dtype, initializer="constant:2", optimizer=OPTIMIZERS["sgd"])
    s.init(10, "empty", shape=(0, 4), dtype=dtype, optimizer=OPTIMIZERS["sgd"])
    rng = np.random.default_rng(3)
    for i in range(3):
        s.push(7, rng.standard_normal((4, 3)).astype(dtype), pusher="r0", seq=i)
        s.push(8, rng.standard_normal(4).astype(dtype), pusher=f"r{i}", seq=10 + i)
    s.push(7, np.ones((4, 3), dtype), pusher="r0", seq=1)  # a duplicate
    with pytest.raises(ShapeMismatchError):
        s.push(9, np.ones(3, dtype))
    return s


@pytest.mark.parametrize("dtype", DTYPES)
def test_snapshot_restore_is_exact(tmp_path, dtype):
    s = _busy_shard(dtype)
    path = s.snapshot(tmp_path / "shard3.npz")
    assert os.listdir(tmp_path) == ["shard3.npz"]  # no temporary left behind
    r = ParameterShard.restore(path)
    assert _full_state(r) == _full_state(s)
    for k in r.keys():
        v = r.view(k).value
        assert v.size == 0 or v.ctypes.data % 64 == 0
    # Both continue identically: optimizer state and dedup tables came back.
    for shard_ in (s, r):
        shard_.push(7, np.ones((4, 3), dtype), pusher="r0", seq=2)  # duplicate in both
        for g in np.random.default_rng(4).standard_normal((3, 4, 3)).astype(dtype):
            shard_.push(7, g, pusher="r0", seq=shard_.version(7) + 10)
    assert _full_state(r) == _full_state(s)


def test_snapshot_is_plain_npz_without_pickle(tmp_path):
    path = _busy_shard().snapshot(tmp_path / "s.npz")
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(npz["meta"].tobytes())
        assert meta["format"] == "dbnode-shard-snapshot"
        assert npz["checksum"].shape == (32,)
        assert {"7.value", "7.state.velocity", "8.state.sum_sq", "9.value"} <= set(npz.files)
    with zipfile.ZipFile(path) as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())


def test_empty_shard_round_trips(tmp_path):
    r = ParameterShard.restore(ParameterShard(shard_id=2).snapshot(tmp_path / "e.npz"))
    assert len(r) == 0 and r.shard_id == 2


def test_snapshot_overwrites_atomically(tmp_path):
    s = _busy_shard()
    path = tmp_path / "s.npz"
    s.snapshot(path)
    s.push(9, np.ones((3, 2), np.float32))
    s.snapshot(path)
    assert ParameterShard.restore(path).version(9) == 1


def test_failed_snapshot_leaves_the_previous_one_untouched(tmp_path, monkeypatch):
    s = _busy_shard()
    path = tmp_path / "s.npz"
    s.snapshot(path)
    old = path.read_bytes()
    s.push(9, np.ones((3, 2), np.float32))

    def write_half_then_fail(f, arrays):
        f.write(b"PK\x03\x04" + b"x" * 1000)  # a partial zip
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snapshot_module, "_write_payload", write_half_then_fail)
    with pytest.raises(OSError, match="No space"):
        s.snapshot(path)
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["s.npz"]  # the temporary was removed
    assert ParameterShard.restore(path).version(9) == 0

    def fail_fsync(fd):
        raise OSError(5, "I/O error")

    monkeypatch.undo()
    monkeypatch.setattr(durable.os, "fsync", fail_fsync)
    with pytest.raises(OSError, match="I/O error"):
        s.snapshot(path)
    monkeypatch.undo()
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["s.npz"]


def test_snapshot_is_durable(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.path.realpath(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(durable.os, "fsync", spy)
    _busy_shard().snapshot(tmp_path / "s.npz")
    # first the temporary file's data, then the directory holding the rename
    assert len(synced) == 2
    assert os.path.dirname(synced[0]) == str(tmp_path) and synced[0].endswith(".tmp")
    assert synced[1] == str(tmp_path)


def test_restore_of_a_missing_file_names_it(tmp_path):
    with pytest.raises(SnapshotError, match="nope.npz.*no such file") as info:
        ParameterShard.restore(tmp_path / "nope.npz")
    assert info.value.path == tmp_path / "nope.npz"


@pytest.fixture(scope="module")
def snapshot_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("snap") / "s.npz"
    shard = _busy_shard()
    shard.snapshot(path)
    return path.read_bytes(), _full_state(shard)


def test_truncated_snapshot_is_rejected(tmp_path, snapshot_bytes):
    data, _ = snapshot_bytes
    path = tmp_path / "t.npz"
    for size in sorted({0, 1, 10, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 1}):
        path.write_bytes(data[:size])
        with pytest.raises(SnapshotError, match="t.npz"):
            ParameterShard.restore(path)


def test_flipped_bytes_are_rejected_or_harmless(tmp_path, snapshot_bytes):
    """A flipped byte anywhere either raises SnapshotError or (in zip fields
    nothing reads) restores the exact state: never wrong state."""
    data, state = snapshot_bytes
    path = tmp_path / "f.npz"
    rejected = 0
    for i in range(0, len(data), 7):
        corrupt = bytearray(data)
        corrupt[i] ^= 0x40
        path.write_bytes(bytes(corrupt))
        try:
            r = ParameterShard.restore(path)
        except SnapshotError as exc:
            assert "f.npz" in str(exc)
            rejected += 1
        else:
            assert _full_state(r) == state, f"byte {i} flipped: wrong state restored"
    assert rejected > len(data) // 7 // 2


def test_flipped_tensor_byte_fails_the_checksum_or_crc(tmp_path, snapshot_bytes):
    data, _ = snapshot_bytes
    # Locate the bytes of tensor 9 (constant 2.0 as float32) in the file.
    needle = np.full(6, 2, np.float32).tobytes()
    at = data.index(needle)
    corrupt = bytearray(data)
    corrupt[at + 5] ^= 0x01
    path = tmp_path / "c.npz"
    path.write_bytes(bytes(corrupt))
    with pytest.raises(SnapshotError, match="c.npz"):
        ParameterShard.restore(path)


def _rewrite(src, dst, change):
    """Copy the npz at ``src`` to ``dst`` with ``change(arrays)`` applied and
    valid zip CRCs, so only dbnode's own checks can catch it."""
    with np.load(src) as npz:
        arrays = {k: npz[k] for k in npz.files}
    change(arrays)
    np.savez(dst, **arrays)


def test_checksum_catches_what_the_zip_crc_cannot(tmp_path):
    src = _busy_shard().snapshot(tmp_path / "s.npz")

    def bump_value(a):
        a["9.value"] = a["9.value"] + 1

    def bump_version(a):
        meta = json.loads(a["meta"].tobytes())
        meta["tensors"][0]["version"] += 1
        a["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)

    def drop_state(a):
        del a["7.state.velocity"]

    def wrong_dtype(a):
        a["9.value"] = a["9.value"].astype(np.float64)

    def pickled(a):
        a["9.value"] = np.array([object()], dtype=object)

    for change, match in [(bump_value, "checksum"), (bump_version, "checksum"), (drop_state, "members"),
                          (wrong_dtype, "9.value"), (pickled, "9.value")]:  # fmt: skip
        dst = tmp_path / f"{change.__name__}.npz"
        _rewrite(src, dst, change)
        with pytest.raises(SnapshotError, match=f"{change.__name__}.npz.*{match}"):
            ParameterShard.restore(dst)
    # unchanged, the rewrite restores fine: the checks above are real
    _rewrite(src, tmp_path / "same.npz", lambda a: None)
    ParameterShard.restore(tmp_path / "same.npz")


def test_not_a_snapshot(tmp_path):
    path = tmp_path / "params.npz"
    np.savez(path, w=np.ones(3))
    with pytest.raises(SnapshotError, match="params.npz"):
        ParameterShard.restore(path)
    path.write_text("hello")
    with pytest.raises(SnapshotError, match="params.npz.*not a readable"):
        ParameterShard.restore(path)


def test_pinned_buffer_stays_at_its_version_while_pushes_go_to_a_copy():
    shard = ParameterShard()
    shard.init(
        1, "w", np.arange(4, dtype=np.float32), optimizer={"name": "sgd", "learning_rate": 1.0}
    )
    (view, version), unpin = shard.pin(1)
    assert version == 0 and not view.flags.writeable
    shard.push(1, np.ones(4, np.float32))
    np.testing.assert_array_equal(view, [0, 1, 2, 3])  # the send sees version 0
    np.testing.assert_array_equal(shard.pull(1).value, [-1, 0, 1, 2])
    unpin()  # stale unpin: harmless
    (view2, version2), unpin2 = shard.pin(1)
    assert version2 == 1
    unpin2()
    base = shard.view(1).value.base
    shard.push(1, np.ones(4, np.float32))  # unpinned: updated in place
    assert shard.view(1).value.base is base
    np.testing.assert_array_equal(view2, [-2, -1, 0, 1])


def test_snapshot_of_some_keys_merges_into_another_shard(tmp_path):
    a = ParameterShard()
    for key in (1, 2, 3):
        a.init(
            key, f"t{key}", np.full(4, float(key)), optimizer={"name": "sgd", "learning_rate": 1.0}
        )
    a.push(2, np.ones(4), pusher="r0p0i0", seq=5)
    a.snapshot(tmp_path / "part.npz", keys=[2, 3])
    b = ParameterShard()
    b.init(9, "t9", np.zeros(2), optimizer={"name": "sgd", "learning_rate": 1.0})
    b.merge(ParameterShard.restore(tmp_path / "part.npz"))
    assert b.keys() == [2, 3, 9] and b.version(2) == 1
    np.testing.assert_array_equal(b.pull(2).value, np.full(4, 1.0))
    assert b.push(2, np.ones(4), pusher="r0p0i0", seq=5) == 1  # the dedup table came along
    with pytest.raises(KeyConflictError):
        b.merge(ParameterShard.restore(tmp_path / "part.npz"))
    with pytest.raises(UnknownKeyError):
        a.snapshot(tmp_path / "bad.npz", keys=[7])


def _forged(change) -> bytes:
    """A well-formed snapshot (its checksum right) of a one-tensor shard, its
    record, value and state changed by ``change(record, value, state)``."""
    import io

    from dbnode.ps import snapshot

    shard = ParameterShard()
    shard.init(1, "w", np.ones(4, np.float32), optimizer={"name": "momentum",
               "learning_rate": 0.1, "momentum": 0.9})  # fmt: skip
    header, ((record, value, state),) = shard._records(None)
    record, value, state = dict(record), value.copy(), {k: v.copy() for k, v in state.items()}
    record, value, state = change(record, value, state)
    buf = io.BytesIO()
    snapshot.dump(buf, header, [(record, value, state)])
    return buf.getvalue()


def _changed(record, **changes):
    return {**record, **changes}


@pytest.mark.parametrize(
    "change, says",
    [
        (lambda r, v, s: (r, np.array([np.nan, 1, 1, 1], np.float32), s), "NaN or infinity"),
        (lambda r, v, s: (r, v, {"velocity": np.full(4, np.inf, np.float32)}), "NaN or infinity"),
        (
            lambda r, v, s: (
                _changed(r, dtype="int32"),
                v.astype(np.int32),
                {"velocity": s["velocity"].astype(np.int32)},
            ),
            "dtype must be float32 or float64",
        ),
        (lambda r, v, s: (_changed(r, key=2**40), v, s), "key must be an integer"),
        (lambda r, v, s: (_changed(r, scale=float("nan")), v, s), "bad scale"),
        (lambda r, v, s: (_changed(r, version=-3), v, s), "bad scale or counts"),
        (lambda r, v, s: (_changed(r, last_seq=[1, 2]), v, s), "bad record"),
        (lambda r, v, s: ({k: x for k, x in r.items() if k != "name"}, v, s), "bad record"),
    ],
)
def test_a_snapshot_from_elsewhere_is_checked_as_an_init_is(change, says):
    """An ``import`` takes a peer's bytes, whose checksum proves only that
    they arrived whole: what INIT would refuse is refused (SnapshotError),
    never taken in to be pulled or to fail a later push."""
    with pytest.raises(SnapshotError, match=says):
        ParameterShard.from_bytes(_forged(change))
    assert ParameterShard.from_bytes(_forged(lambda r, v, s: (r, v, s))).keys() == [1]
