"""The parameter server client.

:class:`ParameterClient` spreads a model's tensors over the parameter
shards of a :class:`~dbnode.placement.ShardPlan` and moves them in and out
concurrently, every piece straight into or out of its rows of the caller's
buffers (no gather, no scatter copies).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import numpy as np
import trio

from .. import codecs
from ..errors import ErrorCode, RemoteError, TooStaleError
from ..placement import ShardPlan
from ..wire import Address, MessageKind, Peers
from .shard import ParameterShard

__all__ = ["ParameterClient", "Pushed"]


class Pushed(NamedTuple):
    """What a push did, piece by piece.

    Attributes:
        applied: pieces the shards applied (or dropped as a retry's duplicate).
        refused: the keys of pieces refused as staler than ``max_staleness``
            (nothing applied; their fetch, if one was asked, was still made).
        versions: piece key -> the shard's version after the push (with a
            fetch: the fetched value's), for every piece not refused, and
            for every piece with a fetch.
    """

    applied: int
    refused: tuple[int, ...]
    versions: dict[int, int]


class ParameterClient:
    """Pull, push and initialize a model's tensors on its parameter shards.

    Its requests go to ``shards`` at shard map ``epoch``; :meth:`remap`
    changes both (the new nodes of shards restored elsewhere) between
    requests. Every request names the run and the epoch: a node refuses one
    whose epoch is not the run's (STALE_EPOCH).

    Args:
        plan: which shard owns which rows of which tensor.
        shards: the address of each shard of the plan, by shard index.
        peers: where channels come from.
        run: the run the tensors belong to.
        epoch: the shard map's epoch.
        timeout: seconds for any one request.
        local: ``local(address, epoch)`` is the in-process ParameterShard
            serving ``address``, or None. Pieces held by this very process
            are then pushed and pulled by direct calls (same arithmetic,
            same dedup, same fencing: it raises STALE_EPOCH as the node
            would), not through the loopback interface.
        count: ``count(address, sent, received)`` after every request to a
            shard node: the payload bytes it carried each way (pieces in
            this process move none and are not counted).
        fetch, push: the wire codecs (:mod:`dbnode.codecs`) of fetched
            parameters and of pushed gradients, between processes; pushes
            keep an error-feedback residual per piece.

    Raises:
        ValueError: ``shards`` does not have one address per plan shard.
    """

    def __init__(
        self,
        plan: ShardPlan,
        shards: list[Address],
        peers: Peers,
        run: str,
        epoch: int = 0,
        timeout: float | None = 60.0,
        local: Callable[[Address, int], ParameterShard | None] | None = None,
        count: Callable[[Address, int, int], None] | None = None,
        fetch: str = "f32",
        push: str = "f32",
    ):
        self.plan = plan
        self.fetch_codec = fetch
        self._encoder = codecs.Encoder(push)
        self._landing: dict[int, np.ndarray] = {}  # where encoded fetches arrive
        self.peers = peers
        self.run = run
        self.timeout = timeout
        self._local = local or (lambda address, epoch: None)
        self._count = count or (lambda address, sent, received: None)
        self.remap(epoch, shards)

    def remap(self, epoch: int, shards: list[Address]) -> None:
        """Send to ``shards`` at shard map ``epoch`` from now on.

        Raises:
            ValueError: ``shards`` does not have one address per plan shard.
        """
        if len(shards) != self.plan.n_shards:
            raise ValueError(
                f"{len(shards)} shard addresses for a plan of {self.plan.n_shards} shards"
            )
        self.epoch = epoch
        self.shards = [(h, int(p)) for h, p in shards]
        self._meta = {"run": self.run, "epoch": epoch}
        # A fetch names the codec its answer is to come in.
        self._fetch_meta = (
            self._meta if self.fetch_codec == "f32" else {**self._meta, "codec": self.fetch_codec}
        )

    def _address(self, key: int) -> Address:
        return self.shards[self.plan.slice(key).shard]

    def _in_process(self, key: int) -> ParameterShard | None:
        return self._local(self._address(key), self.epoch)

    def in_process(self, tensor: str) -> bool:
        """Whether every piece of ``tensor`` is held by a shard of this process.

        Args:
            tensor: a tensor name of the plan.

        Returns:
            True when pushing and pulling it makes no request at all.
        """
        return all(self._in_process(s.key) is not None for s in self.plan.pieces(tensor))

    async def _each(self, jobs: Iterable[tuple[int, Any]], request) -> None:
        """Run ``request(key, arg)`` for every job, concurrently when there
        are several (one needs no nursery)."""
        jobs = list(jobs)
        if len(jobs) == 1:
            await request(*jobs[0])
            return
        async with trio.open_nursery() as nursery:
            for key, arg in jobs:
                nursery.start_soon(request, key, arg)

    async def _request(self, kind: MessageKind, key: int, meta: dict | None = None, **kwargs):
        """One request for piece ``key``; ``meta`` must name the run and epoch
        (default: just those)."""
        address = self._address(key)
        ch = await self.peers.get(address)
        reply = await ch.request(
            kind, key=key, timeout=self.timeout, meta=self._meta if meta is None else meta, **kwargs
        )
        array, into = kwargs.get("array"), kwargs.get("into")
        self._count(
            address, 0 if array is None else array.nbytes, 0 if into is None else into.nbytes
        )
        return reply

    def _pieces(self, tensors: dict[str, np.ndarray]) -> list[tuple[int, np.ndarray]]:
        return [
            (key, view)
            for name, full in tensors.items()
            for key, view in self.plan.cut(name, full).items()
        ]

    async def init(self, params: dict[str, np.ndarray], optimizer: dict[str, Any]) -> None:
        """Create every piece of ``params`` on its shard. Idempotent.

        Args:
            params: name -> initial value, for every tensor of the plan.
            optimizer: ``{"name": ..., "learning_rate": ..., **options}``.

        Raises:
            RemoteError: a shard refused (e.g. the key exists with another
                shape or optimizer).
            TransportError: a shard could not be reached in time.
        """

        async def one(key, view):
            meta = {**self._meta, "name": self.plan.slice(key).name, "optimizer": optimizer}
            await self._request(MessageKind.INIT, key, array=view, meta=meta)

        await self._each(self._pieces(params), one)

    async def pull(self, into: dict[str, np.ndarray]) -> dict[int, int]:
        """Fetch the current values of tensors, each piece received straight
        into its rows.

        Args:
            into: name -> the buffer to fill (C-contiguous, the tensor's shape
                and dtype).

        Returns:
            Piece key -> its version.

        Raises:
            RemoteError: a shard refused (unknown key, ...).
            TransportError: a shard could not be reached in time.
        """
        versions: dict[int, int] = {}

        async def one(key, view):
            shard = self._in_process(key)
            if shard is not None:
                versions[key] = shard.pull(key, out=view).version
            else:
                versions[key] = await self._pull_one(key, view)

        await self._each(self._pieces(into), one)
        return versions

    def pull_in_process(self, into: dict[str, np.ndarray]) -> dict[int, int]:
        """Refresh the pieces of tensors held by shards of this process (a
        copy each, no request), leaving the others as they are.

        Args:
            into: name -> the buffer whose rows to refresh.

        Returns:
            Piece key -> its version, for the pieces refreshed.

        Raises:
            RemoteError: this process's shard is fenced off (STALE_EPOCH: a
                remap is on its way); then nothing was refreshed.
        """
        held = [(key, view, shard) for key, view in self._pieces(into)
                if (shard := self._in_process(key)) is not None]  # fmt: skip
        return {key: shard.pull(key, out=view).version for key, view, shard in held}

    async def push(
        self,
        grads: dict[str, np.ndarray],
        *,
        pusher: str,
        seq: int,
        fetch_into: dict[str, np.ndarray] | None = None,
        versions: dict[int, int] | None = None,
        max_staleness: int | None = None,
    ) -> Pushed:
        """Send gradients to be applied by the shards' optimizers.

        Args:
            grads: name -> gradient.
            pusher, seq: who pushes and the push's sequence number: the
                shards drop a retried duplicate.
            fetch_into: the same tensors' buffers: each piece's reply then
                brings its values after the push (PUSH_PULL: one round trip
                for both).
            versions: piece key -> the version of the parameters its
                gradient was computed from (the shards count staleness and
                apply their policy), for every piece; None: not said.
            max_staleness: with ``versions``: a piece staler than this is
                refused rather than applied.

        Returns:
            What was applied, refused and fetched (:class:`Pushed`).

        Raises:
            RemoteError: a shard refused (wrong shape or dtype, ...), other
                than as too stale.
            TransportError: a shard could not be reached in time.
        """
        targets = self.plan_views(fetch_into) if fetch_into is not None else {}
        meta = {**(self._fetch_meta if targets else self._meta), "pusher": pusher}
        tag = (pusher, seq)  # a retried push sends what it sent before
        refused: list[int] = []
        fetched: dict[int, int] = {}

        def condition(key: int) -> dict[str, int]:
            if versions is None:
                return {}
            if max_staleness is None:
                return {"version": versions[key]}
            return {"version": versions[key], "max_staleness": max_staleness}

        async def one(key, view):
            shard = self._in_process(key)
            if shard is not None:
                grad = self._encoder.sent(key, view, tag)
                try:
                    if targets:
                        fetched[key] = shard.push_pull(
                            key, grad, pusher=pusher, seq=seq, out=targets[key], **condition(key)
                        ).version
                    else:
                        fetched[key] = shard.push(key, grad, pusher=pusher, seq=seq,
                                                  **condition(key))  # fmt: skip
                except TooStaleError:
                    refused.append(key)
                    if targets:
                        fetched[key] = shard.pull(key, out=targets[key]).version
                return
            wire = self._encoder.encode(key, view, tag)
            piece_meta = {**meta, **condition(key)} if versions is not None else meta
            try:
                if targets:
                    landing = self._land(key, targets[key])
                    reply = await self._request(
                        MessageKind.PUSH_PULL, key, array=wire, seq=seq, meta=piece_meta,
                        into=landing,
                    )  # fmt: skip
                    fetched[key] = reply.seq
                    self._landed(landing, targets[key])
                else:
                    reply = await self._request(
                        MessageKind.PUSH, key, array=wire, seq=seq, meta=piece_meta
                    )
                    fetched[key] = reply.seq
            except RemoteError as exc:
                if exc.code != ErrorCode.TOO_STALE:
                    raise
                refused.append(key)
                if targets:
                    fetched[key] = await self._pull_one(key, targets[key])

        pieces = self._pieces(grads)
        await self._each(pieces, one)
        return Pushed(len(pieces) - len(refused), tuple(sorted(refused)), fetched)

    async def _pull_one(self, key: int, view: np.ndarray) -> int:
        """Fetch piece ``key`` from another process into ``view``; its version."""
        landing = self._land(key, view)
        reply = await self._request(MessageKind.PULL, key, into=landing, meta=self._fetch_meta)
        self._landed(landing, view)
        return reply.seq

    def _land(self, key: int, view: np.ndarray) -> np.ndarray:
        """Where a fetched piece arrives: ``view`` itself, or a buffer of the
        fetch codec (kept per piece) to decode into ``view``."""
        if self.fetch_codec == "f32":
            return view
        landing = self._landing.get(key)
        if landing is None or landing.shape != view.shape:
            landing = self._landing[key] = codecs.empty(view.shape, self.fetch_codec)
        return landing

    @staticmethod
    def _landed(landing: np.ndarray, view: np.ndarray) -> None:
        if landing is not view:
            codecs.decode(landing, out=view)

    def plan_views(self, tensors: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
        """The plan's pieces of ``tensors``.

        Args:
            tensors: name -> full tensor.

        Returns:
            Piece key -> a view of its rows (no copy).
        """
        return dict(self._pieces(tensors))

    async def stats(self, pushers: str = "") -> list[dict[str, Any]]:
        """The STATS of every distinct shard node.

        Args:
            pushers: list only the last seqs of pushers whose names start with this.

        Returns:
            One STATS answer (its meta: the run's shard there) per node, in
            the order of ``shards``.

        Raises:
            RemoteError: a node refused (e.g. it no longer holds the run).
            TransportError: a node could not be reached in time.
        """
        out = []
        for address in dict.fromkeys(self.shards):
            ch = await self.peers.get(address)
            meta = {**self._meta, "pushers": pushers} if pushers else self._meta
            reply = await ch.request(MessageKind.STATS, timeout=self.timeout, meta=meta)
            out.append(reply.meta)
        return out
