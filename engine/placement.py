"""Placement, as pure functions: which parameter shard owns which rows of
which tensor, and which host runs which shard and layer partition.

Nothing here does I/O or reads global configuration; the same input always
gives the same answer, so the driver and every node can compute a plan
independently and agree on it (as ps-lite's key-range slicing does).

Sharding tensors
----------------
:func:`plan_shards` spreads the model's tensors over ``n_shards`` parameter
shards so that every shard holds about the same number of bytes. A tensor is
split only along axis 0 (rows), into contiguous row ranges, so each piece is
a C-contiguous view of the full tensor and travels as one frame. Each piece
is a :class:`Slice` with a stable integer key (the wire protocol's u32
``key``) and a readable name such as ``"layer0.weight[0:512]"``.

Placing roles
-------------
:class:`Placement` says which host runs which parameter shard and layer
partition; :func:`dbnode.traffic.plan_run` decides it from what each role
computes and moves. :func:`split_layers` cuts a network into partitions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from math import prod

import numpy as np

from .errors import ConfigError

__all__ = [
    "DEFAULT_MIN_SPLIT_BYTES",
    "Slice",
    "ShardPlan",
    "plan_shards",
    "Placement",
    "split_layers",
]

# Below this size a tensor is never split: every piece costs a frame and a
# round trip, which on a LAN is worth tens of kilobytes of transfer time.
DEFAULT_MIN_SPLIT_BYTES = 64 << 10

MAX_KEY = 2**32 - 1  # keys travel as the header's u32 ``key``


@dataclass(frozen=True)
class Slice:
    """One piece of a tensor: rows ``[row_start, row_stop)`` of ``tensor``,
    held by parameter shard ``shard`` under wire key ``key``.

    Attributes:
        key: the piece's integer id, unique within its plan (the wire key).
        name: ``tensor`` itself when the piece is the whole tensor, else
            ``"tensor[row_start:row_stop]"``.
        tensor: name of the full tensor, e.g. ``"layer0.weight"``.
        shard: index of the parameter shard that owns the piece.
        row_start, row_stop: the row range along axis 0.
        shape: the piece's shape, ``(row_stop - row_start, *full_shape[1:])``.
        nbytes: the piece's size in bytes at the plan's itemsize.
        whole: whether the piece is the entire tensor.
    """

    key: int
    name: str
    tensor: str
    shard: int
    row_start: int
    row_stop: int
    shape: tuple[int, ...]
    nbytes: int
    whole: bool

    @property
    def rows(self) -> int:
        """The number of rows in the piece."""
        return self.row_stop - self.row_start

    def of(self, full: np.ndarray) -> np.ndarray:
        """This piece's rows of ``full`` as a view (no copy).

        Args:
            full: the whole tensor.

        Returns:
            ``full[row_start:row_stop]``.
        """
        return full[self.row_start : self.row_stop]


@dataclass(frozen=True)
class ShardPlan:
    """The result of :func:`plan_shards`: every tensor's pieces and owners.

    Attributes:
        n_shards: number of parameter shards.
        itemsize: bytes per element the loads were computed with.
        min_split_bytes: tensors up to this size were never split.
        shapes: ``(name, shape)`` of every tensor, sorted by name.
        slices: every piece, in key order (keys are ``0 .. len - 1``).
    """

    n_shards: int
    itemsize: int
    min_split_bytes: int
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    slices: tuple[Slice, ...]

    # Lookup tables, built once on first use (a frozen dataclass may still
    # carry cached_property: it writes the instance __dict__ directly).
    @cached_property
    def _by_tensor(self) -> dict[str, tuple[Slice, ...]]:
        out: dict[str, list[Slice]] = {name: [] for name, _ in self.shapes}
        for s in self.slices:
            out[s.tensor].append(s)
        return {
            name: tuple(sorted(pieces, key=lambda s: s.row_start)) for name, pieces in out.items()
        }

    @cached_property
    def _shape_of(self) -> dict[str, tuple[int, ...]]:
        return dict(self.shapes)

    def shape(self, tensor: str) -> tuple[int, ...]:
        """The full shape of ``tensor``.

        Args:
            tensor: a tensor name.

        Returns:
            Its shape.

        Raises:
            KeyError: the tensor is not in this plan.
        """
        try:
            return self._shape_of[tensor]
        except KeyError:
            raise KeyError(f"tensor {tensor!r} is not in this plan") from None

    def pieces(self, tensor: str) -> tuple[Slice, ...]:
        """The pieces of ``tensor``, in row order.

        Args:
            tensor: a tensor name.

        Returns:
            Its slices.

        Raises:
            KeyError: the tensor is not in this plan.
        """
        self.shape(tensor)  # the KeyError names the tensor
        return self._by_tensor[tensor]

    def slice(self, key: int) -> Slice:
        """The piece with wire key ``key``.

        Args:
            key: a wire key.

        Returns:
            Its slice.

        Raises:
            KeyError: no piece has that key.
        """
        if not (isinstance(key, (int, np.integer)) and 0 <= key < len(self.slices)):
            raise KeyError(f"key {key!r} is not in this plan (keys are 0..{len(self.slices) - 1})")
        return self.slices[key]

    def on_shard(self, shard: int) -> tuple[Slice, ...]:
        """The pieces shard ``shard`` owns, in key order.

        Args:
            shard: a shard index, ``0 .. n_shards - 1``.

        Returns:
            Its slices (possibly none).

        Raises:
            KeyError: the shard is not in this plan.
        """
        if not 0 <= shard < self.n_shards:
            raise KeyError(
                f"shard {shard!r} is not in this plan (shards are 0..{self.n_shards - 1})"
            )
        return tuple(s for s in self.slices if s.shard == shard)

    def shard_bytes(self) -> tuple[int, ...]:
        """Bytes of parameters each shard holds.

        Returns:
            One count per shard, in shard order.
        """
        load = [0] * self.n_shards
        for s in self.slices:
            load[s.shard] += s.nbytes
        return tuple(load)

    def balance_bound(self) -> int:
        """The guaranteed ceiling on any shard's bytes (see :func:`plan_shards`):
        ``ceil(mean) + max(min_split_bytes, largest row in bytes)``.

        Returns:
            The bound, in bytes.
        """
        total = sum(_nbytes(shape, self.itemsize) for _, shape in self.shapes)
        rows = [_row_bytes(shape, self.itemsize) for _, shape in self.shapes]
        return -(-total // self.n_shards) + max([self.min_split_bytes, *rows])

    def cut(self, tensor: str, full: np.ndarray) -> dict[int, np.ndarray]:
        """Key -> the piece's rows of ``full`` as views (no copies).

        The views alias ``full``: writing into them writes ``full``. This is
        how a pull lands in place — cut the destination buffer and receive
        each piece straight into its view. The views of a C-contiguous
        ``full`` are C-contiguous (row ranges are), so they can go on the
        wire as they are.

        Args:
            tensor: a tensor name.
            full: an array of the tensor's full shape.

        Returns:
            Piece key -> view.

        Raises:
            KeyError: the tensor is not in this plan.
            ValueError: ``full`` is not an array of its shape.
        """
        self._check_full(tensor, full, "full")
        return {s.key: s.of(full) for s in self.pieces(tensor)}

    def assemble(
        self, tensor: str, parts: Mapping[int, np.ndarray], *, out: np.ndarray
    ) -> np.ndarray:
        """Copy every piece of ``tensor`` from ``parts`` (key -> array) into its
        rows of ``out``, and return ``out``.

        A part that already *is* its destination view (it was received into
        ``cut(tensor, out)``) is not copied. Everything is checked before the
        first row is written, so a bad part leaves ``out`` untouched.

        Args:
            tensor: a tensor name.
            parts: piece key -> its rows, for every piece of the tensor.
            out: an array of the tensor's full shape.

        Returns:
            ``out``.

        Raises:
            KeyError: the tensor is not in this plan.
            ValueError: ``out`` is not of its shape, ``parts`` lacks a piece or
                has another, or a part's shape or dtype is wrong.
        """
        self._check_full(tensor, out, "out")
        pieces = self.pieces(tensor)
        want = {s.key for s in pieces}
        if set(parts) != want:
            raise ValueError(
                f"{tensor}: parts have keys {sorted(parts)}, the plan's pieces are {sorted(want)}"
            )
        for s in pieces:
            part = parts[s.key]
            if part.shape != s.shape or part.dtype != out.dtype:
                raise ValueError(
                    f"{s.name} (key {s.key}): expected {out.dtype} {s.shape}, "
                    f"got {part.dtype} {part.shape}"
                )
        for s in pieces:
            part, dest = parts[s.key], s.of(out)
            if _same_view(part, dest):
                continue  # already in place: received into the destination
            dest[...] = part
        return out

    def _check_full(self, tensor: str, a: np.ndarray, what: str) -> None:
        shape = self.shape(tensor)
        if not isinstance(a, np.ndarray) or a.shape != shape:
            got = a.shape if isinstance(a, np.ndarray) else type(a).__name__
            raise ValueError(f"{tensor}: {what} has shape {got}, the plan says {shape}")


def _same_view(a: np.ndarray, b: np.ndarray) -> bool:
    return (
        a.shape == b.shape
        and a.strides == b.strides
        and a.dtype == b.dtype
        and a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
    )


def _nbytes(shape: tuple[int, ...], itemsize: int) -> int:
    return prod(shape) * itemsize


def _row_bytes(shape: tuple[int, ...], itemsize: int) -> int:
    return prod(shape[1:]) * itemsize


def _check_int(key: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(key, value, f"must be an integer >= {low}")
    return int(value)


def _check_shapes(shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for name, shape in shapes.items():
        if not isinstance(name, str) or not name:
            raise ConfigError("shapes", name, "tensor names must be non-empty strings")
        shape = tuple(shape)
        if not shape:
            # A piece is a row range; a 0-d tensor has no rows. Store it as (1,).
            raise ConfigError(f"shapes[{name!r}]", shape, "a tensor needs at least one axis")
        for dim in shape:
            if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 0:
                raise ConfigError(f"shapes[{name!r}]", shape, "dims must be integers >= 0")
        out.append((name, tuple(int(d) for d in shape)))
    return sorted(out)


def plan_shards(
    shapes: Mapping[str, tuple[int, ...]],
    n_shards: int,
    itemsize: int,
    *,
    min_split_bytes: int = DEFAULT_MIN_SPLIT_BYTES,
) -> ShardPlan:
    """Split ``shapes`` (tensor name -> shape) over ``n_shards`` parameter
    shards so that each holds about the same number of bytes.

    Tensors are taken largest first (ties by name). A tensor goes whole to
    the least-loaded shard (ties: lowest index) if it fits there without
    exceeding the mean load, if it is at most ``min_split_bytes``, or if it
    has a single row. Otherwise it is split along axis 0: its rows are dealt
    out in order, each time to the least-loaded shard, as many rows as fit
    under the mean (at least one); consecutive rows landing on the same shard
    form one piece.

    Guarantees (tested):

    - every row of every tensor is owned by exactly one piece, the pieces
      of a tensor are contiguous row ranges, keys are ``0 .. n - 1`` in
      (tensor name, row) order;
    - the plan depends only on the mapping's contents, not its order;
    - every shard holds at most ``ceil(mean) + max(min_split_bytes, R)``
      bytes, where ``mean = total / n_shards`` and ``R`` is the largest row
      of any tensor in bytes (:meth:`ShardPlan.balance_bound`). The least
      loaded shard always sits below the mean while bytes remain, so adding
      a whole small tensor or one row to it overshoots by at most that much.

    Shards may be left empty when there are fewer tensors than shards and
    nothing is large enough to split.

    Args:
        shapes: tensor name -> shape (at least one axis).
        n_shards: parameter shards.
        itemsize: bytes per element.
        min_split_bytes: tensors up to this size are never split.

    Returns:
        The plan.

    Raises:
        ConfigError: a bad shape, ``n_shards < 1``, ``itemsize < 1`` or
            ``min_split_bytes < 0``.
    """
    n_shards = _check_int("n_shards", n_shards, 1)
    itemsize = _check_int("itemsize", itemsize, 1)
    min_split_bytes = _check_int("min_split_bytes", min_split_bytes, 0)
    tensors = _check_shapes(shapes)
    total = sum(_nbytes(shape, itemsize) for _, shape in tensors)

    load = [0] * n_shards
    # (tensor, row_start, row_stop, shard) before keys are assigned.
    placed: list[tuple[str, int, int, int]] = []

    def least_loaded() -> int:
        return min(range(n_shards), key=lambda i: (load[i], i))

    # Largest first, the classic greedy (LPT) order: the big pieces are laid
    # down while there is room, the small ones fill the gaps.
    order = sorted(tensors, key=lambda t: (-_nbytes(t[1], itemsize), t[0]))
    for name, shape in order:
        nbytes, row = _nbytes(shape, itemsize), _row_bytes(shape, itemsize)
        rows = shape[0]
        s = least_loaded()
        # `load * n_shards + nbytes * n_shards <= total` is `load + nbytes <=
        # mean` in integers: no float rounding can make two runs disagree.
        fits = (load[s] + nbytes) * n_shards <= total
        if fits or nbytes <= min_split_bytes or rows <= 1 or row == 0:
            load[s] += nbytes
            placed.append((name, 0, rows, s))
            continue
        start = 0
        while start < rows:
            s = least_loaded()
            room = total - load[s] * n_shards  # (mean - load) * n_shards, > 0 here
            take = min(rows - start, max(1, room // (row * n_shards)))
            last = placed[-1] if placed else None
            if last is not None and last[0] == name and last[3] == s and last[2] == start:
                placed[-1] = (name, last[1], start + take, s)  # extend the previous piece
            else:
                placed.append((name, start, start + take, s))
            load[s] += take * row
            start += take

    shape_of = dict(tensors)
    slices = []
    for key, (name, start, stop, shard) in enumerate(sorted(placed, key=lambda p: (p[0], p[1]))):
        full = shape_of[name]
        whole = start == 0 and stop == full[0]
        piece_shape = (stop - start, *full[1:])
        slices.append(
            Slice(
                key=key,
                name=name if whole else f"{name}[{start}:{stop}]",
                tensor=name,
                shard=shard,
                row_start=start,
                row_stop=stop,
                shape=piece_shape,
                nbytes=_nbytes(piece_shape, itemsize),
                whole=whole,
            )
        )
    if len(slices) > MAX_KEY + 1:  # pragma: no cover - needs 4 billion pieces
        raise ConfigError("shapes", len(slices), "more pieces than u32 keys")
    return ShardPlan(n_shards, itemsize, min_split_bytes, tuple(tensors), tuple(slices))


# ------------------------------------------------------------------- hosts


@dataclass(frozen=True)
class Placement:
    """Which host runs which role (hosts are indices ``0 .. n_hosts - 1``).

    Attributes:
        n_hosts: number of hosts.
        shards: ``shards[i]`` is the host of parameter shard ``i``.
        partitions: ``partitions[r][p]`` is the host of partition ``p`` of
            replica ``r``.
        data: ``data[r]`` is the host of replica ``r``'s data shard — the
            host of its first partition, which it feeds, so the input never
            crosses the network.
    """

    n_hosts: int
    shards: tuple[int, ...]
    partitions: tuple[tuple[int, ...], ...]

    @property
    def data(self) -> tuple[int, ...]:
        """``data[r]``: the host of replica ``r``'s data shard (its first partition's)."""
        return tuple(parts[0] for parts in self.partitions)

    def on_host(self, host: int) -> dict[str, list]:
        """The roles of ``host``: ``{"shards": [i, ...], "partitions":
        [(replica, partition), ...], "data": [replica, ...]}``.

        Args:
            host: a host index.

        Returns:
            Its roles, as above (empty lists for a host with none).
        """
        return {
            "shards": [i for i, h in enumerate(self.shards) if h == host],
            "partitions": [
                (r, p)
                for r, parts in enumerate(self.partitions)
                for p, h in enumerate(parts)
                if h == host
            ],
            "data": [r for r, h in enumerate(self.data) if h == host],
        }


def split_layers(layers: tuple[int, ...], partitions: int) -> tuple[tuple[int, int], ...]:
    """Cut a network's layers into ``partitions`` contiguous blocks
    ``(first, last)`` whose largest parameter count is as small as possible
    (compute and traffic both scale with it).

    ``layers`` are the sizes, input first, so layer ``i`` has
    ``layers[i] * layers[i + 1] + layers[i + 1]`` parameters. Every block has
    at least one layer. Exact, by dynamic programming over the cut points.

    Args:
        layers: the layer sizes, input first.
        partitions: how many blocks.

    Returns:
        ``(first, last)`` of each block, in order.

    Raises:
        ConfigError: ``partitions`` is below 1 or above the number of layers.
    """
    n = len(layers) - 1
    partitions = _check_int("partitions", partitions, 1)
    if partitions > n:
        raise ConfigError("partitions", partitions, f"more partitions than layers ({n})")
    weight = [layers[i] * layers[i + 1] + layers[i + 1] for i in range(n)]
    prefix = [0]
    for w in weight:
        prefix.append(prefix[-1] + w)
    # best[p][i]: the smallest possible largest block when the first i layers
    # form p blocks; cut[p][i] is where the last of those blocks starts.
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(partitions + 1)]
    cut = [[0] * (n + 1) for _ in range(partitions + 1)]
    best[0][0] = 0
    for p in range(1, partitions + 1):
        for i in range(p, n + 1):
            for j in range(p - 1, i):
                cost = max(best[p - 1][j], prefix[i] - prefix[j])
                if cost < best[p][i]:
                    best[p][i], cut[p][i] = cost, j
    bounds, i = [], n
    for p in range(partitions, 0, -1):
        bounds.append((cut[p][i], i))
        i = cut[p][i]
    return tuple(reversed(bounds))
