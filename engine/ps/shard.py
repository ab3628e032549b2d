"""The parameter shard service, without the network: tensors, optimizers,
versions, deduplicated pushes and crash-safe snapshots.

A :class:`ParameterShard` holds named tensors (whole tensors or row ranges of
large ones, see :mod:`dbnode.placement`), each under an integer key (the
wire protocol's u32 ``key``) with its own optimizer, optimizer state and a
version counter. The node feeds it decoded PULL / PUSH / PUSH_PULL / STATS /
SNAPSHOT requests (:mod:`dbnode.ps.service`); this module never touches a socket.

Concurrency: a shard is **not thread-safe**. ``push`` updates the
parameters, the optimizer state, the version and the dedup table in several
steps with no lock. That is by design: the node drives a shard from its one
trio event loop, and every method here is synchronous (no ``await`` inside),
so each call runs to completion before the loop can start another — pushes
are applied one at a time, exactly, in arrival order. Never call into a
shard from ``trio.to_thread`` while the loop may call it too.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .. import kernels
from ..errors import (
    ConfigError,
    DTypeMismatchError,
    KeyConflictError,
    NotFiniteError,
    ShapeMismatchError,
    ShardError,
    SnapshotError,
    TooStaleError,
    UnknownKeyError,
)
from ..optim import OPTIMIZERS, Optimizer, Schedule, Scheduled, from_wire
from . import snapshot

__all__ = [
    "STALENESS_BUCKETS",
    "ParameterShard",
    "Pulled",
    "Staleness",
]

_MAX_U64 = 2**64 - 1

#: The staleness histogram's last bucket: it counts pushes this many
#: versions stale or more (the mean and max stay exact).
STALENESS_BUCKETS = 256


# ------------------------------------------------------------------ state


class Pulled(NamedTuple):
    """A tensor's value and the version it has (pushes applied so far)."""

    value: np.ndarray
    version: int


@dataclass(eq=False)
class _Tensor:
    key: int
    name: str
    value: np.ndarray  # aligned, C-contiguous, owned by the shard
    optimizer: Optimizer
    state: dict[str, np.ndarray]
    version: int = 0
    pushes: int = 0
    duplicates: int = 0
    rejected: int = 0
    last_seq: dict[str, int] = field(default_factory=dict)
    scale: float = 1.0  # on the learning rate: what reduce-on-plateau has lowered it to
    pins: int = 0  # zero-copy sends of ``value`` still in flight (see pin)

    def describe(self) -> dict[str, Any]:
        return {"key": self.key, "name": self.name, "shape": list(self.value.shape),
                "dtype": self.value.dtype.name}  # fmt: skip


def _make_optimizer(key: int, spec) -> Optimizer:
    """An optimizer object, or one from its wire form (:func:`dbnode.optim.from_wire`)."""
    if isinstance(spec, (*OPTIMIZERS.values(), Scheduled)):
        return spec
    try:
        return from_wire(spec)
    except ConfigError as exc:
        raise ShardError(key, f"key {key}: bad optimizer: {exc}") from None


def _initial_value(key: int, shape, dtype: np.dtype, initializer: str, seed: int) -> np.ndarray:
    """``zeros``, ``constant:C`` or ``normal:STD`` (seeded by ``seed``)."""
    kind, _, arg = initializer.partition(":")
    try:
        if kind == "zeros" and not arg:
            return kernels.zeros(shape, dtype)
        if kind == "constant":
            out = kernels.empty(shape, dtype)
            out.fill(float(arg))
            return out
        if kind == "normal":
            std = float(arg) if arg else 0.2
            # Drawn in float64 and rounded once, as model.init_params does.
            return kernels.aligned_copy(np.random.default_rng(seed).normal(0.0, std, shape), dtype)
    except ValueError:
        pass
    raise ShardError(
        key, f"key {key}: initializer {initializer!r} is not zeros, constant:C or normal:STD"
    )


def _kernel_dtype(key: int, name: str, dtype) -> np.dtype:
    """``dtype`` as a numpy dtype the optimizer kernels update (float32/64)."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        ok = False
    else:
        ok = dt in kernels.DTYPES
    if not ok:
        raise DTypeMismatchError(
            key, f"key {key} ({name}): dtype must be float32 or float64, got {dtype}"
        )
    return dt


def _is_uint(x, top: int = _MAX_U64) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and 0 <= x <= top


def _check_key(key) -> int:
    if not _is_uint(key, 2**32 - 1):
        raise ShardError(None, f"key must be an integer in [0, 2**32), got {key!r}")
    return int(key)


@dataclass(eq=False)
class Staleness:
    """How stale the pushes a shard applied were, counted as they come.

    Attributes:
        histogram: staleness in versions -> pushes applied (piece updates);
            the last bucket, :data:`STALENESS_BUCKETS`, counts that many or more.
        total: the staleness summed over those pushes (exact).
        max: the largest (exact).
        refused: pushes refused for being staler than their ``max_staleness``.
    """

    histogram: dict[int, int] = field(default_factory=dict)
    total: int = 0
    max: int = 0
    refused: int = 0

    def add(self, tau: int) -> None:
        """Count one applied push ``tau`` versions stale."""
        bucket = min(tau, STALENESS_BUCKETS)
        self.histogram[bucket] = self.histogram.get(bucket, 0) + 1
        self.total += tau
        self.max = max(self.max, tau)


# ------------------------------------------------------------------ shard


class ParameterShard:
    """Named tensors, their optimizers and versions: one parameter shard.

    Every tensor lives under an integer ``key`` (unique in the shard) with a
    human-readable ``name``; its ``version`` starts at 0 and grows by one for
    every push applied. Bad requests raise a :class:`ShardError` subclass
    (whose ``code`` is the protocol's ErrorCode for the reply) and change
    nothing.

    Not thread-safe; see the module docstring for why that is fine.

    Args:
        shard_id: this shard's index in the plan (reported in stats and
            stored in snapshots).
    """

    def __init__(self, shard_id: int = 0) -> None:
        self.shard_id = int(shard_id)
        self._tensors: dict[int, _Tensor] = {}
        self._rejected_unknown = 0  # pushes to keys the shard does not hold
        self.staleness = Staleness()

    # -- introspection ------------------------------------------------------

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def keys(self) -> list[int]:
        """The keys held, in ascending order."""
        return sorted(self._tensors)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor and its optimizer state."""
        return sum(
            t.value.nbytes + sum(a.nbytes for a in t.state.values()) for t in self._tensors.values()
        )

    def versions(self) -> dict[int, int]:
        """Every key's version (pushes applied so far)."""
        return {key: t.version for key, t in self._tensors.items()}

    @property
    def pushes(self) -> int:
        """Pushes applied, over every key."""
        return sum(t.pushes for t in self._tensors.values())

    def name(self, key: int) -> str:
        """The name of tensor ``key``."""
        return self._get(key).name

    def set_scale(self, scale: float) -> None:
        """Set the factor on every tensor's learning rate (what
        reduce-on-plateau lowers; the schedule's own factor applies on top).

        Args:
            scale: the factor, finite and > 0.

        Raises:
            ShardError: ``scale`` is not a finite number > 0.
        """
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not (math.isfinite(scale) and scale > 0)
        ):
            raise ShardError(0, f"learning-rate scale must be a finite number > 0, got {scale!r}")
        for t in self._tensors.values():
            t.scale = float(scale)

    def scale(self) -> float:
        """The learning-rate scale (:meth:`set_scale`; 1.0 for an empty shard).

        Returns:
            The smallest scale of its tensors.
        """
        return min((t.scale for t in self._tensors.values()), default=1.0)

    def set_schedule(self, schedule: dict[str, Any] | None) -> None:
        """Give every tensor's optimizer this learning-rate schedule (a
        resumed run's, which may be longer); the optimizer and its state
        stay as they are.

        Args:
            schedule: a :class:`~dbnode.optim.Schedule`'s wire form, or None
                for a constant rate.

        Raises:
            ShardError: the schedule is malformed.
        """
        try:
            made = Schedule(**schedule) if schedule is not None else None
        except (ConfigError, TypeError) as exc:
            raise ShardError(0, f"bad schedule {schedule!r}: {exc}") from None
        for t in self._tensors.values():
            inner = t.optimizer.inner if isinstance(t.optimizer, Scheduled) else t.optimizer
            t.optimizer = Scheduled(inner, made) if made is not None else inner

    def dtype(self, key: int) -> np.dtype:
        """Tensor ``key``'s dtype."""
        return self._get(key).value.dtype

    def shape(self, key: int) -> tuple[int, ...]:
        """Tensor ``key``'s shape."""
        return self._get(key).value.shape

    def version(self, key: int) -> int:
        """The version of tensor ``key`` (pushes applied so far)."""
        return self._get(key).version

    def optimizer(self, key: int):
        """The optimizer object tensor ``key`` is updated with."""
        return self._get(key).optimizer

    def optimizer_state(self, key: int) -> dict[str, np.ndarray]:
        """Copies of tensor ``key``'s optimizer state arrays (e.g.
        ``{"velocity": ...}`` for momentum, ``{}`` for SGD)."""
        return {k: v.copy() for k, v in self._get(key).state.items()}

    def _get(self, key: int) -> _Tensor:
        try:
            return self._tensors[key]
        except (KeyError, TypeError):
            msg = f"key {key!r}: no such tensor on shard {self.shard_id}"
            raise UnknownKeyError(key, msg) from None

    # -- requests -------------------------------------------------------------

    def init(
        self,
        key: int,
        name: str,
        value: np.ndarray | None = None,
        *,
        shape: tuple[int, ...] | None = None,
        dtype: str | np.dtype | None = None,
        initializer: str = "zeros",
        seed: int = 0,
        optimizer: dict[str, Any] | Any,
    ) -> int:
        """Create tensor ``key`` named ``name`` and return its version.

        The initial value is either ``value`` (copied into a buffer the shard
        owns: the caller may reuse its array) or made from ``shape``,
        ``dtype`` and ``initializer`` (``"zeros"``, ``"constant:C"``,
        ``"normal:STD"`` drawn with ``seed``). With ``value``, ``shape`` and
        ``dtype`` may still be given and must then match it. The dtype must
        be float32 or float64 (what the kernels update).

        ``optimizer`` is a mapping ``{"name": "sgd" | "momentum" | "adagrad" | "adam",
        "learning_rate": lr, **options}`` (JSON-friendly, as INIT's meta
        carries it) or an optimizer object from :mod:`dbnode.optim`.

        Re-init of an existing key is idempotent when name, shape, dtype and
        optimizer agree: it changes nothing — not even the value, which
        pushes may have moved since — and returns the current version. This
        makes a retried INIT (its reply was lost) harmless. Any disagreement
        raises :class:`KeyConflictError`.
        """
        key = _check_key(key)
        if not isinstance(name, str) or not name:
            raise ShardError(key, f"key {key}: name must be a non-empty string, got {name!r}")
        opt = _make_optimizer(key, optimizer)

        if value is not None:
            if not isinstance(value, np.ndarray):
                raise ShardError(
                    key, f"key {key}: value must be a numpy array, got {type(value).__name__}"
                )
            if shape is not None and tuple(shape) != value.shape:
                raise ShapeMismatchError(
                    key, f"key {key} ({name}): shape {tuple(shape)} given, value has {value.shape}"
                )
            if dtype is not None and _kernel_dtype(key, name, dtype) != value.dtype:
                raise DTypeMismatchError(
                    key,
                    f"key {key} ({name}): dtype {np.dtype(dtype)} given, value has {value.dtype}",
                )
            shape, dtype = value.shape, value.dtype
        elif shape is None or dtype is None:
            raise ShardError(key, f"key {key} ({name}): give a value, or a shape and a dtype")
        shape = tuple(shape)
        if not all(_is_uint(d) for d in shape):
            raise ShapeMismatchError(key, f"key {key} ({name}): bad shape {shape}")
        shape = tuple(int(d) for d in shape)
        dtype = _kernel_dtype(key, name, dtype)

        old = self._tensors.get(key)
        if old is not None:
            want = {"name": name, "shape": list(shape), "dtype": dtype.name,
                    "optimizer": opt.to_wire()}  # fmt: skip
            have = {**old.describe(), "optimizer": old.optimizer.to_wire()}
            if diff := {k: (have[k], want[k]) for k in want if have[k] != want[k]}:
                raise KeyConflictError(
                    key, f"key {key} already holds a different tensor: (have, init) = {diff}"
                )
            return old.version

        # Copies below: the shard must own an aligned, C-contiguous buffer the
        # compiled kernels can update in place for as long as the key lives.
        if value is not None:
            if not kernels.all_finite(value):
                raise NotFiniteError(key, f"key {key} ({name}): the value holds NaN or infinity")
            data = kernels.aligned_copy(value)
        else:
            data = _initial_value(key, shape, dtype, initializer, seed)
        self._tensors[key] = _Tensor(key, name, data, opt, opt.state(data))
        return 0

    def view(self, key: int) -> Pulled:
        """Tensor ``key``'s live parameters as a read-only view, no copy.

        The view changes as pushes are applied. It is a consistent snapshot
        of ``version`` only until the next push to ``key``, so use it only
        when nothing can push before you are done with it (in-process use,
        or a node that sends it without yielding to the loop). Otherwise use
        :meth:`pull`.
        """
        t = self._get(key)
        v = t.value.view()
        v.flags.writeable = False  # callers must not bypass push()
        return Pulled(v, t.version)

    def pin(self, key: int) -> tuple[Pulled, Callable[[], None]]:
        """Tensor ``key``'s live buffer for a zero-copy send, and its unpin.

        Until ``unpin()`` is called, the buffer is frozen at ``version``:
        a push arriving meanwhile first moves the tensor to a fresh copy
        (copy on write) and updates that, so the send goes out whole and
        consistent, and the common case — no push during the send — copies
        nothing.
        """
        t = self._get(key)
        buffer = t.value
        t.pins += 1
        v = buffer.view()
        v.flags.writeable = False

        def unpin() -> None:
            if t.value is buffer:  # a copy on write already set the buffer free
                t.pins -= 1

        return Pulled(v, t.version), unpin

    def pull(self, key: int, *, out: np.ndarray | None = None) -> Pulled:
        """A copy of tensor ``key``'s parameters and its version.

        A copy, not a view, because sending a tensor takes many turns of the
        event loop (a partial ``send_all`` awaits), and a push applied in one
        of them would otherwise tear the reply into a mix of two versions.
        The copy is one memcpy, far faster than the network that sends it.
        Pass ``out`` (a pooled send buffer: C-contiguous, writable, same
        shape and dtype) to avoid the allocation. See :meth:`view` for the
        zero-copy variant.
        """
        t = self._get(key)
        if out is None:
            out = kernels.empty(t.value.shape, t.value.dtype)
        else:
            self._check_out(t, out)
        np.copyto(out, t.value)
        return Pulled(out, t.version)

    def push(
        self, key: int, grad: np.ndarray, *, pusher: str | None = None, seq: int | None = None,
        version: int | None = None, max_staleness: int | None = None,
    ) -> int:  # fmt: skip
        """Apply ``grad`` to tensor ``key`` with its optimizer, in place, and
        return the new version.

        Staleness: ``version`` is the version of the parameters the gradient
        was computed from; the push's staleness is the shard's version when
        it applies it minus that (0 if the pusher is ahead, e.g. after a
        restore from an older checkpoint). It is counted in
        :attr:`staleness`, scales the step by the optimizer's policy
        (``staleness_factor``) and, with ``max_staleness``, a push staler
        than that is refused (:class:`TooStaleError`, nothing applied).

        ``grad`` must have exactly the tensor's shape and dtype; it is checked
        before anything is touched, so a rejected push leaves parameters,
        optimizer state and version as they were.

        Deduplication: give ``pusher`` (a stable id of the sender, e.g. its
        replica/partition) and ``seq`` (an integer that grows with each new
        gradient that pusher sends to this key; gaps are fine) to make a
        retried push harmless. A push whose ``seq`` is not greater than the
        last applied seq of that pusher for this key is dropped: nothing
        changes, the current version is returned and ``duplicates`` counts
        it. Sequences are tracked per (key, pusher), so pushes to different
        keys may arrive in any order. Without ``pusher``/``seq`` every push
        is applied.

        Raises:
            UnknownKeyError, ShapeMismatchError, DTypeMismatchError,
            ShardError (bad pusher/seq/version/max_staleness or a non-array
            gradient), TooStaleError.
        """
        t = self._tensors.get(key) if isinstance(key, (int, np.integer)) else None
        if t is None:
            self._rejected_unknown += 1
            self._get(key)  # raises UnknownKeyError
        try:
            self._check_push(t, grad, pusher, seq)
            for name, value in (("version", version), ("max_staleness", max_staleness)):
                if value is not None and not _is_uint(value):
                    raise ShardError(
                        t.key, f"key {t.key} ({t.name}): {name} must be an integer in "
                        f"[0, 2**64), got {value!r}",
                    )  # fmt: skip
        except ShardError:
            t.rejected += 1
            raise
        if pusher is not None and seq <= t.last_seq.get(pusher, -1):
            t.duplicates += 1
            return t.version
        scale = t.scale
        if version is not None:
            tau = max(0, t.version - int(version))
            if max_staleness is not None and tau > max_staleness:
                self.staleness.refused += 1
                raise TooStaleError(
                    t.key, f"key {t.key} ({t.name}): the push is {tau} versions stale, "
                    f"more than its max_staleness {max_staleness}",
                )  # fmt: skip
            self.staleness.add(tau)
            scale *= t.optimizer.staleness_factor(tau)
        if t.pins:
            # A zero-copy send of the current buffer is in flight: leave it
            # to the send and update a copy (see pin).
            t.value = kernels.aligned_copy(t.value)
            t.pins = 0
        # Checked above, so the kernel cannot fail half-way: it validates its
        # operands before it writes, and they are now known to be valid.
        t.optimizer.apply(t.value, grad, t.state, t.version + 1, scale)
        t.version += 1
        t.pushes += 1
        if pusher is not None:
            t.last_seq[pusher] = int(seq)
        return t.version

    def push_pull(
        self, key: int, grad: np.ndarray, *, pusher: str | None = None, seq: int | None = None,
        version: int | None = None, max_staleness: int | None = None,
        out: np.ndarray | None = None,
    ) -> Pulled:  # fmt: skip
        """:meth:`push`, then :meth:`pull`: the updated parameters (a copy,
        into ``out`` if given) and the version after the push. A duplicate
        push is dropped as in :meth:`push` and the current value returned;
        a push too stale raises as :meth:`push`'s (pull then)."""
        if out is not None:
            self._check_out(self._get(key), out)  # before the push is applied
        self.push(key, grad, pusher=pusher, seq=seq, version=version, max_staleness=max_staleness)
        return self.pull(key, out=out)

    def _check_out(self, t: _Tensor, out) -> None:
        if not isinstance(out, np.ndarray):
            raise ShardError(t.key, f"key {t.key} ({t.name}): out must be a numpy array")
        self._check_like(t, out, "out")
        if not (out.flags.c_contiguous and out.flags.writeable):
            raise ShardError(
                t.key, f"key {t.key} ({t.name}): out must be C-contiguous and writable"
            )

    def _check_like(self, t: _Tensor, a: np.ndarray, what: str) -> None:
        if a.dtype != t.value.dtype:
            raise DTypeMismatchError(
                t.key,
                f"key {t.key} ({t.name}): {what} dtype expected {t.value.dtype}, got {a.dtype}",
            )
        if a.shape != t.value.shape:
            raise ShapeMismatchError(
                t.key,
                f"key {t.key} ({t.name}): {what} shape expected {t.value.shape}, got {a.shape}",
            )

    def _check_push(self, t: _Tensor, grad, pusher, seq) -> None:
        where = f"key {t.key} ({t.name})"
        if not isinstance(grad, np.ndarray):
            raise ShardError(
                t.key, f"{where}: gradient must be a numpy array, got {type(grad).__name__}"
            )
        self._check_like(t, grad, "gradient")
        # A NaN or infinity would poison the tensor for every replica: refused
        # whole, before anything is touched.
        if not kernels.all_finite(grad):
            raise NotFiniteError(t.key, f"{where}: the gradient holds NaN or infinity")
        if (pusher is None) != (seq is None):
            raise ShardError(t.key, f"{where}: give both pusher and seq, or neither")
        if pusher is not None:
            if not isinstance(pusher, str) or not pusher:
                raise ShardError(
                    t.key, f"{where}: pusher must be a non-empty string, got {pusher!r}"
                )
            if not _is_uint(seq):
                raise ShardError(
                    t.key, f"{where}: seq must be an integer in [0, 2**64), got {seq!r}"
                )

    def stats(self, pushers: str = "") -> dict[str, Any]:
        """JSON-ready statistics: ``{"shard", "tensors": [per key: key, name,
        shape, dtype, version, pushes, duplicates, rejected, bytes,
        state_bytes, optimizer, scale, pushers, last_seq (by pusher)], "totals": {tensors, bytes,
        state_bytes, pushes, duplicates, rejected}}``. ``rejected`` in the
        totals includes pushes to unknown keys.

        Args:
            pushers: ``last_seq`` lists only the pushers whose names start
                with this (a run has a name per portion: all of them may be
                many).
        """
        tensors = []
        for key in self.keys():
            t = self._tensors[key]
            tensors.append({
                **t.describe(),
                "version": t.version,
                "pushes": t.pushes,
                "duplicates": t.duplicates,
                "rejected": t.rejected,
                "bytes": t.value.nbytes,
                "state_bytes": sum(a.nbytes for a in t.state.values()),
                "optimizer": t.optimizer.to_wire(),
                "scale": t.scale,
                "pushers": len(t.last_seq),
                "last_seq": {k: v for k, v in t.last_seq.items() if k.startswith(pushers)},
            })  # fmt: skip
        counters = ("bytes", "state_bytes", "pushes", "duplicates", "rejected")
        totals = {k: sum(d[k] for d in tensors) for k in counters}
        totals["rejected"] += self._rejected_unknown
        totals["tensors"] = len(tensors)
        return {"shard": self.shard_id, "tensors": tensors, "totals": totals}

    # -- snapshots ----------------------------------------------------------

    def snapshot(self, path: str | os.PathLike, keys: list[int] | None = None) -> Path:
        """Write the shard (or only ``keys``) to ``path`` atomically and
        durably (the format: :mod:`dbnode.ps.snapshot`); return it.

        A crash or error at any point leaves either the previous snapshot or
        the new one, never a mix. Synchronous: it reads the live tensors, so
        no push may run while it writes (true under the node's single event
        loop; a large shard holds the loop for the duration of the write).

        Raises:
            UnknownKeyError: ``keys`` names a key the shard does not hold.
            OSError: writing failed (disk full, ...).
        """
        return snapshot.save(path, *self._records(keys))

    def snapshot_bytes(self, keys: list[int] | None = None) -> bytes:
        """The snapshot of the shard (or only ``keys``) as bytes, in memory."""
        buf = io.BytesIO()
        snapshot.dump(buf, *self._records(keys))
        return buf.getvalue()

    def _records(self, keys: list[int] | None) -> tuple[dict[str, Any], list[snapshot.Record]]:
        records = []
        for key in self.keys() if keys is None else sorted(self._get(k).key for k in keys):
            t = self._tensors[key]
            record = {
                **t.describe(),
                "version": t.version,
                "pushes": t.pushes,
                "duplicates": t.duplicates,
                "rejected": t.rejected,
                "optimizer": t.optimizer.to_wire(),
                "scale": t.scale,
                "state": sorted(t.state),
                "last_seq": dict(sorted(t.last_seq.items())),
            }  # fmt: skip
            records.append((record, t.value, t.state))
        return {"shard": self.shard_id, "rejected_unknown": self._rejected_unknown}, records

    def merge(self, other: ParameterShard) -> None:
        """Take over every tensor of ``other`` (e.g. pieces restored from a
        dead node's checkpoint); keys must not clash."""
        clash = sorted(set(self._tensors) & set(other._tensors))
        if clash:
            raise KeyConflictError(
                clash[0], f"keys {clash} are already held by shard {self.shard_id}"
            )
        self._tensors.update(other._tensors)

    @classmethod
    def restore(cls, path: str | os.PathLike) -> ParameterShard:
        """A shard exactly as it was snapshotted to ``path``: values, versions,
        counters, optimizers, optimizer state and dedup sequences.

        Raises:
            SnapshotError: the file is missing, unreadable, truncated,
                corrupt or not a shard snapshot; the message names it.
        """
        return cls._from_snapshot(path, *snapshot.read(path))

    @classmethod
    def from_bytes(
        cls, data: bytes | bytearray | memoryview, name: str = "<bytes>"
    ) -> ParameterShard:
        """A shard from :meth:`snapshot_bytes`' output (SnapshotError if it is bad)."""
        return cls._from_snapshot(name, *snapshot.load(io.BytesIO(data), name))

    @classmethod
    def _from_snapshot(
        cls, where, meta: dict[str, Any], records: list[snapshot.Record]
    ) -> ParameterShard:
        # Checked as INIT checks what it takes: a snapshot may come from a
        # peer (an ``import``), and its checksum says nothing of who made it.
        try:
            shard = cls(int(meta["shard"]))
            shard._rejected_unknown = int(meta["rejected_unknown"])
            for d, value, state in records:
                key = _check_key(d["key"])
                name = str(d["name"])
                _kernel_dtype(key, name, value.dtype)
                opt = _make_optimizer(key, d["optimizer"])
                if sorted(opt.state(value)) != sorted(state):
                    raise SnapshotError(
                        where, f"key {key}: state {sorted(state)} does not fit optimizer {opt.name}"
                    )
                if not all(kernels.all_finite(a) for a in (value, *state.values())):
                    raise SnapshotError(where, f"key {key}: its values hold NaN or infinity")
                scale = float(d.get("scale", 1.0))
                counts = [int(d[c]) for c in ("version", "pushes", "duplicates", "rejected")]
                if not (0 < scale < math.inf) or min(counts) < 0:
                    raise SnapshotError(where, f"key {key}: bad scale or counts")
                shard._tensors[key] = _Tensor(
                    key, name, value, opt, state, version=counts[0],
                    pushes=counts[1], duplicates=counts[2], rejected=counts[3], scale=scale,
                    last_seq={str(p): int(q) for p, q in dict(d["last_seq"]).items()},
                )  # fmt: skip
        except SnapshotError:
            raise
        except (ShardError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SnapshotError(where, f"bad record: {type(exc).__name__}: {exc}") from None
        return shard
