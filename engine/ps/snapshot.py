"""The shard snapshot format, over file objects: an ``.npz`` with a checksum.

A snapshot holds every tensor of a shard (or some of them), its optimizer
state, and a JSON ``meta`` (stored as a uint8 array) with names, shapes,
dtypes, versions, counters, optimizer settings and the last seq per pusher,
plus a SHA-256 ``checksum`` over meta and all arrays. No pickle anywhere:
every array is numeric, and the reader accepts only the dtypes and shapes
the metadata names, checking every size against the zip directory and the
archive's length before allocating it.

:func:`dump` / :func:`load` work on any binary file object (a file, a
``BytesIO`` for a checkpoint export); :func:`save` / :func:`read` on paths,
``save`` atomically and durably (:mod:`dbnode.durable`).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import zipfile
from math import prod
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .. import kernels
from ..durable import replace_file
from ..errors import SnapshotError

__all__ = ["SNAPSHOT_FORMAT", "SNAPSHOT_VERSION", "Record", "dump", "load", "read", "save"]

SNAPSHOT_FORMAT = "dbnode-shard-snapshot"
SNAPSHOT_VERSION = 1
# Caps checked against the zip directory before anything is allocated, so a
# corrupt size field cannot make restore allocate gigabytes.
_MAX_META_BYTES = 64 << 20
_NPY_HEADER_SLACK = 64 << 10  # an .npy header is 128 bytes; its cap is 10 000

#: One tensor of a snapshot: its metadata record (``key``, ``name``, ``shape``,
#: ``dtype``, ``state`` names, counters, ...), its value, its optimizer state.
Record = tuple[dict[str, Any], np.ndarray, dict[str, np.ndarray]]


def dump(f: BinaryIO, header: dict[str, Any], records: list[Record]) -> None:
    """Write a snapshot of ``records`` to the binary file ``f``.

    ``header`` holds the shard-wide fields (``shard``, ``rejected_unknown``);
    each record's ``state`` names must match its state arrays.
    """
    arrays = []
    for record, value, state in records:
        key = record["key"]
        arrays.append((f"{key}.value", value))
        arrays.extend((f"{key}.state.{s}", state[s]) for s in record["state"])
    meta = {"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, **header,
            "tensors": [r for r, _, _ in records]}  # fmt: skip
    meta_array = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
    out = {"meta": meta_array, "checksum": _checksum(meta_array, [a for _, a in arrays])}
    out.update(arrays)
    _write_payload(f, out)


def save(path: str | os.PathLike, header: dict[str, Any], records: list[Record]) -> Path:
    """:func:`dump` to ``path``, atomically and durably; returns ``path``.

    Raises:
        OSError: writing failed; the previous file at ``path`` is untouched.
    """
    return replace_file(path, lambda f: dump(f, header, records))


def load(f: BinaryIO, name: str | os.PathLike = "") -> tuple[dict[str, Any], list[Record]]:
    """Read and verify a snapshot from the seekable binary file ``f``.

    Returns the meta (``shard``, ``rejected_unknown``, ``tensors``) and the
    records, in the order they were written.

    Raises:
        SnapshotError: truncated, corrupt or not a shard snapshot; the message
            names ``name``.
    """
    try:
        archive = f.seek(0, io.SEEK_END)
        f.seek(0)
        with zipfile.ZipFile(f) as zf:
            return _load(zf, archive)
    except SnapshotError as exc:
        raise SnapshotError(name, exc.reason) from None
    except (zipfile.BadZipFile, EOFError) as exc:
        reason = f"not a readable .npz file (truncated or corrupt): {exc}"
        raise SnapshotError(name, reason) from exc
    except Exception as exc:
        # Whatever else zipfile, numpy or json raise on bad bytes (a corrupt
        # version field makes zipfile raise NotImplementedError), the file is
        # bad; the cause stays chained for debugging.
        raise SnapshotError(name, f"corrupt: {type(exc).__name__}: {exc}") from exc


def read(path: str | os.PathLike) -> tuple[dict[str, Any], list[Record]]:
    """:func:`load` from the file ``path``.

    Raises:
        SnapshotError: the file is missing or unreadable, or as :func:`load`.
    """
    try:
        with open(path, "rb") as f:
            return load(f, path)
    except FileNotFoundError:
        raise SnapshotError(path, "no such file") from None
    except OSError as exc:
        raise SnapshotError(path, f"cannot read it: {exc.strerror}") from None


def _load(zf: zipfile.ZipFile, archive: int) -> tuple[dict[str, Any], list[Record]]:
    meta_array = _read_member(zf, archive, "meta", np.dtype(np.uint8), None)
    checksum = _read_member(zf, archive, "checksum", np.dtype(np.uint8), (32,))
    meta = json.loads(meta_array.tobytes().decode())
    if not isinstance(meta, dict) or meta.get("format") != SNAPSHOT_FORMAT:
        raise SnapshotError("", "not a dbnode shard snapshot")
    if meta.get("version") != SNAPSHOT_VERSION:
        raise SnapshotError(
            "", f"format version {meta.get('version')!r}, this dbnode reads {SNAPSHOT_VERSION}"
        )
    expected = {"meta", "checksum"}
    layout = []
    for d in meta["tensors"]:
        key, dtype = int(d["key"]), np.dtype(d["dtype"])
        shape = tuple(int(n) for n in d["shape"])
        if f"{key}.value" in expected:
            raise SnapshotError("", f"key {key} appears twice in the metadata")
        expected.add(f"{key}.value")
        expected.update(f"{key}.state.{s}" for s in d["state"])
        layout.append((key, dtype, shape, d))
    members = {n.removesuffix(".npy") for n in zf.namelist()}
    if members != expected:
        raise SnapshotError(
            "", f"members {sorted(members)} do not match the metadata's {sorted(expected)}"
        )
    records: list[Record] = []
    arrays = []
    for key, dtype, shape, d in layout:
        value = _read_member(zf, archive, f"{key}.value", dtype, shape)
        state = {s: _read_member(zf, archive, f"{key}.state.{s}", dtype, shape) for s in d["state"]}
        arrays.append(value)
        arrays.extend(state[s] for s in d["state"])
        records.append((d, value, state))
    if not hmac.compare_digest(_checksum(meta_array, arrays).tobytes(), checksum.tobytes()):
        raise SnapshotError("", "checksum mismatch: the file is corrupt")
    return meta, records


def _checksum(meta: np.ndarray, arrays: list[np.ndarray]) -> np.ndarray:
    # The meta fixes every array's dtype and shape, hence its length, so the
    # plain concatenation of their bytes is unambiguous.
    h = hashlib.sha256(meta.tobytes())
    for a in arrays:
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))  # no copy: contiguous
    return np.frombuffer(h.digest(), np.uint8)


def _write_payload(f, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as an .npz to the open file ``f`` (a seam for tests).

    All arrays are numeric, so nothing is pickled (numpy pickles only object
    arrays); restore reads with its own reader that accepts only the dtypes
    the metadata names.
    """
    np.savez(f, **arrays)


def _read_member(
    zf: zipfile.ZipFile,
    archive: int,
    name: str,
    dtype: np.dtype,
    shape: tuple[int, ...] | None,
) -> np.ndarray:
    """Read the .npy member ``name`` straight into a fresh aligned array,
    checking its dtype and shape (``None``: any 1-d shape up to the meta cap)
    against the expectation *before* allocating it."""
    info = zf.getinfo(name + ".npy")
    cap = _MAX_META_BYTES if shape is None else prod(shape) * dtype.itemsize
    # np.savez stores members uncompressed, so a member is never larger than
    # the archive holding it: that bounds what a corrupt size can allocate.
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise SnapshotError("", f"member {name}: compressed; snapshots are stored uncompressed")
    low = 0 if shape is None else cap
    high = min(cap + _NPY_HEADER_SLACK, archive)
    if not low <= info.file_size <= high:
        raise SnapshotError("", f"member {name}: {info.file_size} bytes, expected {low}..{high}")
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            got_shape, fortran, got_dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            got_shape, fortran, got_dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise SnapshotError("", f"member {name}: unsupported .npy version {version}")
        if shape is None:
            if len(got_shape) != 1 or got_shape[0] > min(cap, info.file_size):
                raise SnapshotError("", f"member {name}: shape {got_shape}, expected (n <= {cap},)")
            shape = got_shape
        if got_dtype != dtype or got_shape != shape or fortran:
            raise SnapshotError(
                "",
                f"member {name}: {got_dtype} {got_shape} (fortran={fortran}), "
                f"expected {dtype} {shape}",
            )
        out = kernels.empty(shape, dtype)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        filled = 0
        while filled < len(buf):
            n = f.readinto(buf[filled:])
            if not n:
                raise SnapshotError(
                    "", f"member {name}: truncated after {filled} of {len(buf)} bytes"
                )
            filled += n
        if f.read(1):
            raise SnapshotError("", f"member {name}: trailing bytes after the array")
    return out
