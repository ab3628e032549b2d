"""Data sources and splits: every format, and clear errors for bad files."""

import gzip
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbnode import data
from dbnode.errors import ConfigError


def write_idx(path, array, code):
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + body)


def test_builtins():
    x, y = data.load("xor:100", seed=1)
    assert x.shape == (100, 2) and set(np.unique(y)) <= {0.0, 1.0}
    np.testing.assert_array_equal(y, np.logical_xor(x[:, 0], x[:, 1]))
    np.testing.assert_array_equal(data.load("xor:100", seed=1)[0], x)
    x, y = data.load("blobs:50")
    assert x.shape == (50, 8) and y.dtype.kind == "i"
    for bad in ("xor:", "xor:0", "xor:-3", "blobs:many"):
        with pytest.raises(ConfigError):
            data.load(bad)


def test_npz_and_csv(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 3)), rng.integers(0, 2, 20)
    np.savez(tmp_path / "d.npz", X=x, y=y)
    gx, gy = data.load(str(tmp_path / "d.npz"))
    np.testing.assert_array_equal(gx, x)
    np.testing.assert_array_equal(gy, y)
    table = np.hstack([x, y[:, None]])
    np.savetxt(tmp_path / "d.csv", table, delimiter=",", header="a,b,c,label", comments="")
    gx, gy = data.load(str(tmp_path / "d.csv"))
    np.testing.assert_allclose(gx, x)
    np.testing.assert_array_equal(gy, y)
    np.savetxt(tmp_path / "nohead.csv", table, delimiter=",")
    assert data.load(str(tmp_path / "nohead.csv"))[0].shape == (20, 3)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_mnist_idx_pair(tmp_path, suffix):
    images = np.random.default_rng(0).integers(0, 256, (6, 4, 5)).astype(np.uint8)
    labels = np.arange(6, dtype=np.uint8)
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, 0x08)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, 0x08)
    x, y = data.load(str(tmp_path / f"train-images-idx3-ubyte{suffix}"))
    assert x.shape == (6, 20) and x.max() <= 1.0
    np.testing.assert_allclose(x * 255, images.reshape(6, 20))
    np.testing.assert_array_equal(y, labels)
    x2, _ = data.load(
        f"idx:{tmp_path}/train-images-idx3-ubyte{suffix},{tmp_path}/train-labels-idx1-ubyte{suffix}"
    )
    np.testing.assert_array_equal(x2, x)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.npz.*no such file"):
        data.load(str(tmp_path / "nope.npz"))
    np.savez(tmp_path / "noy.npz", X=np.zeros((3, 2)))
    with pytest.raises(ConfigError, match=r"noy.npz.*missing arrays \['y'\]"):
        data.load(str(tmp_path / "noy.npz"))
    np.savez(tmp_path / "len.npz", X=np.zeros((3, 2)), y=np.zeros(4))
    with pytest.raises(ConfigError, match="3 examples but 4 targets"):
        data.load(str(tmp_path / "len.npz"))
    np.savez(tmp_path / "nan.npz", X=np.array([[np.nan, 1.0]]), y=np.zeros(1))
    with pytest.raises(ConfigError, match="NaN"):
        data.load(str(tmp_path / "nan.npz"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="junk.npz.*cannot be read"):
        data.load(str(tmp_path / "junk.npz"))
    (tmp_path / "text.csv").write_text("a,b\n1,x\n")
    with pytest.raises(ConfigError, match="text.csv.*not a numeric CSV"):
        data.load(str(tmp_path / "text.csv"))
    (tmp_path / "one.csv").write_text("1\n2\n")
    with pytest.raises(ConfigError, match="at least one feature"):
        data.load(str(tmp_path / "one.csv"))
    (tmp_path / "x-images-idx3-ubyte").write_bytes(b"\x01\x02\x08\x01")
    with pytest.raises(ConfigError, match="bad magic"):
        data.load(str(tmp_path / "x-images-idx3-ubyte"))
    write_idx(tmp_path / "t-images-idx1-ubyte", np.zeros(4, np.uint8), 0x08)
    (tmp_path / "t-images-idx1-ubyte").write_bytes(
        (tmp_path / "t-images-idx1-ubyte").read_bytes()[:-1]
    )
    with pytest.raises(ConfigError, match="does not match its shape"):
        data.load(str(tmp_path / "t-images-idx1-ubyte"))
    (tmp_path / "data.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="unknown format"):
        data.load(str(tmp_path / "data.bin"))


def test_split_is_reproducible_and_disjoint():
    x = np.arange(100.0)[:, None]
    y = np.arange(100)
    xtr, ytr, xte, yte = data.split(x, y, 0.2, seed=4)
    assert len(xte) == 20 and len(xtr) == 80
    assert set(ytr) | set(yte) == set(range(100)) and not set(ytr) & set(yte)
    np.testing.assert_array_equal(data.split(x, y, 0.2, seed=4)[3], yte)
    assert data.split(x, y, 0.0)[2].shape == (0, 1)


def test_digits_when_scikit_learn_is_installed():
    pytest.importorskip("sklearn")
    x, y = data.load("digits")
    assert x.shape == (1797, 64) and 0 <= x.min() and x.max() <= 1
    assert set(np.unique(y)) == set(range(10))


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 60), batch=st.integers(1, 70), steps=st.integers(0, 300))
def test_examples_after_counts_what_the_batches_hold(n, batch, steps):
    batches = list(data.batch_indices(n, batch, epochs=steps // max(1, -(-n // batch)) + 1))
    assert data.examples_after(n, batch, steps) == sum(len(b) for b in batches[:steps])
