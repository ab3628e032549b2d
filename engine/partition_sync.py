"""A layer partition's pushes and fetches: :class:`ShardSync`.

Downpour's other half of a partition (:mod:`dbnode.partition` drives the
passes): every ``n_push`` steps the gradients accumulated since the last
push go to the parameter shards, every ``n_fetch`` steps fresh parameters
come back, one request in flight at a time and in the background, so the
passes only wait for the network when the previous request has not finished
by the next one. (Shards in this process, or a staleness bound: at once. A
whole-model replica whose steps take its node's turns, :mod:`dbnode.turns`:
when its next turn starts from shards in this process, else in the lobby a
turn ahead when it will wait.)

Every push says which version of the parameters its gradients were
computed from (per shard piece: the version of the last fetch installed,
plus this partition's own pushes since, which its local copy already holds;
for gradients accumulated over several steps, or kept in flight by a
pipeline, the oldest such version). The shard counts the push's staleness —
its own version minus that — applies its optimizer's staleness policy, and
refuses the push if the run set ``train.max_staleness`` and it is staler:
the partition then fetches before its next push.
"""

from __future__ import annotations

import numpy as np
import trio

from . import control, kernels
from .errors import ConnectionClosedError, Diverged, ErrorCode, NotFiniteError, RemoteError
from .partition_core import PartitionCore
from .ps.client import ParameterClient

__all__ = ["REMAP_WAIT", "RETRY_DELAY", "ShardSync"]

# Seconds a partition whose shard node is lost or fenced off keeps trying
# (waiting for the driver's remap) before it gives up and fails (and its
# replica is restarted); and how long it waits between two tries.
REMAP_WAIT = 30.0
RETRY_DELAY = 1.0


def _shard_moved(exc: BaseException) -> bool:
    """Whether ``exc`` (or every error of a group) says a shard is not where
    this partition's map puts it: refused for a stale epoch, or its node lost."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_shard_moved(e) for e in exc.exceptions)
    if isinstance(exc, RemoteError):
        return exc.code in (ErrorCode.STALE_EPOCH, ErrorCode.UNKNOWN_RUN)
    return isinstance(exc, ConnectionClosedError)


class ShardSync:
    """The pushes and fetches of one partition's parameter block.

    Args:
        job: the partition's job (``pusher``, ``n_fetch``, ``max_staleness``).
        core: its arithmetic (gradients taken, fetches installed).
        client: its parameter client.
        block: the name of its parameter block in the shard plan.
        status: its status (``pushes`` counted here).
    """

    def __init__(
        self,
        job: control.PartitionJob,
        core: PartitionCore,
        client: ParameterClient,
        block: str,
        status,
    ) -> None:
        self.job, self.core, self.client, self.block, self.status = (
            job, core, client, block, status)  # fmt: skip
        self._remapped = trio.Event()  # set (and replaced) at every remap
        self._skipped_update = False  # the step just taken left its update to its fetch
        self._in_process_at: int | None = None  # the shard map epoch it was asked at
        self._in_process_cached = False
        self._scope: trio.CancelScope | None = None  # the push or fetch in flight
        self._ready: np.ndarray | None = None  # a fetched block, to install
        self._done = trio.Event()
        self._done.set()
        self._error: BaseException | None = None
        # Versions, per shard piece: of the local copy (the last fetch installed
        # plus this partition's own pushes since), of the fetch waiting to be
        # installed, of the weights each kept forward read, and of the oldest
        # forward among the gradients accumulated since the last push.
        self.versions: dict[int, int] = {}
        self._ready_versions: dict[int, int] = {}
        self._slot_versions: list[dict[int, int]] = [{}] * core.ahead
        self._acc_versions: dict[int, int] | None = None
        self._fetch_now = False  # a push was refused as too stale: fetch before the next
        self._deferred = False  # a fetch due is left for just before the next step
        self._deferred_sent = False  # ... and is on its way

    @property
    def in_process(self) -> bool:
        """Whether the block's shards are all in this process (its pushes and
        fetches are then calls, over as soon as made). Asked once per shard
        map: a tiny step costs microseconds."""
        if self._in_process_at != self.client.epoch:
            self._in_process_cached = self.client.in_process(self.block)
            self._in_process_at = self.client.epoch
        return self._in_process_cached

    def remap(self, epoch: int, shards: tuple[tuple[str, int], ...]) -> None:
        """Push to and fetch from ``shards`` at shard map ``epoch`` from now on;
        a push or fetch refused for a stale epoch meanwhile is sent again.

        Args:
            epoch: the new shard map's epoch.
            shards: each plan shard's address.
        """
        self.client.remap(epoch, list(shards))
        self._remapped.set()
        self._remapped = trio.Event()
        if self._scope is not None:  # waiting on the old map: send again
            self._scope.cancel()

    async def first_fetch(self) -> None:
        """Fetch the block into the local copy, before the first step:
        retried across remaps like every later request, so a shard node
        lost just before it is waited for (the driver restores its pieces
        and remaps) rather than failing the replica."""
        staging = self.core.block()
        self.core.fetch_issued()
        self._done = trio.Event()
        await self.sync(None, staging, self.job.start_step, None)
        self.raise_error()
        self.install_ready()

    def local_update(self, deferred: bool = False) -> bool:
        """Whether the backward about to run updates the local copy: not when
        its step's fetch replaces the copy before the next pass anyway (it
        comes from this process at once, or it is left for the next turn).

        Args:
            deferred: the step's fetch will be left for its next turn
                (:meth:`after_step`'s ``defer_fetch``).

        Returns:
            False when the update is left to that fetch.
        """
        core = self.core
        due = (core.step + 1) % core.n_fetch == 0
        local = not (due and (self.in_process or deferred))
        self._skipped_update = not local  # then its fetch must land before the next pass
        return local

    def forwarded(self, slot: int) -> None:
        """Note the versions the forward kept in ``slot`` read (the local copy's)."""
        self._slot_versions[slot] = self.versions

    def backwarded(self, slot: int) -> None:
        """Note that the backward of ``slot`` added to the gradients of the next push."""
        if self._acc_versions is None:  # the oldest forward of them: backwards come in order
            self._acc_versions = self._slot_versions[slot]

    def install_ready(self) -> None:
        """Make a fetch that has arrived the local copy (between passes)."""
        if self._ready is not None:
            previous = self.core.install(self._ready)
            if previous is not None:  # else a minibatch in flight still reads it
                self.core.release(previous)
            self._ready = None
            self.versions = self._ready_versions

    @property
    def needs_lobby(self) -> bool:
        """Whether the next turn has a fetch to prepare in the lobby
        (:mod:`dbnode.turns`): one left for it that comes from another
        node, or one already on its way. From shards in this process it is
        made when the turn starts instead (:meth:`fetch_at_turn`)."""
        return self._deferred_sent or (self._deferred and not self.in_process)

    def fetch_at_turn(self) -> bool:
        """When a whole-model step's turn starts: make the fetch left for it
        if shards in this process hold the whole block (a copy, after the
        push of the turn before: as fresh as can be), else bring this
        process's pieces of a fetch made earlier up to date (a copy each:
        fetched a turn ago, they would lack the pushes of the replicas that
        computed meanwhile; sound as :meth:`PartitionCore.install` needs, no
        push having gone since that fetch, which is over).

        Returns:
            False when the fetch left for the step cannot be made by a copy
            (its shard fenced off or moved, a remap on its way): make it with
            :meth:`deferred_fetch` out of the turn, which nobody else should
            wait for meanwhile.
        """
        if self._deferred_sent:
            return False
        if not self._deferred:
            self._freshen_ready()
            return True
        if not (self._done.is_set() and self.in_process):
            return False
        staging = self._staging()
        try:
            fetched = self.client.pull_in_process({self.block: staging})
        except RemoteError:
            fetched = {}
        if len(fetched) < len(self.client.plan.pieces(self.block)):
            self.core.release(staging)
            return False
        self._ready, self._ready_versions, self._deferred = staging, fetched, False
        return True

    def _staging(self) -> np.ndarray:
        """Where the next fetch lands, once the last request is over: its
        error raised, its fetch installed."""
        self.raise_error()
        self.install_ready()
        return self.core.block()

    def _freshen_ready(self) -> None:
        if self._ready is None or not self._done.is_set():
            return
        try:
            fresh = self.client.pull_in_process({self.block: self._ready})
        except RemoteError:  # fenced off, a remap on its way: the fetch stands
            return
        self._ready_versions = {**self._ready_versions, **fresh}

    def raise_error(self) -> None:
        """Raise what the last push or fetch failed with, if it did."""
        if self._error is not None:
            raise self._error

    async def after_step(self, step: int, nursery: trio.Nursery, defer_fetch: bool = False) -> None:
        """Push and fetch as the step just taken's periods say.

        Args:
            step: the step's global number (the push's ``seq``).
            nursery: where a push or fetch to another process goes on in
                the background.
            defer_fetch: leave a fetch due for the next step's turn
                (:meth:`fetch_at_turn`, or :meth:`deferred_fetch` in its
                lobby): made now, it would be as old as the wait by then.
        """
        core, portion = self.core, self.job.portion_steps
        # Push periods are counted in steps of the schedule, whatever step a
        # copy starts at, and a portion's last step ends one: every copy of a
        # portion (a restarted or backup one) pushes the same steps under the
        # same seq, so the shards can drop the one that comes second.
        push = self._acc_versions is not None and (
            (step + 1) % self.job.n_push == 0 or (portion > 0 and (step + 1) % portion == 0)
        )
        fetch = core.fetch_due or self._fetch_now
        if fetch and defer_fetch:
            self._deferred, self._fetch_now, fetch = True, False, False
        if not (push or fetch):
            return
        await self._done.wait()  # one push/fetch in flight at a time
        self.raise_error()
        self.install_ready()
        grads, versions = self._take() if push else (None, None)
        # Every shard would refuse them, and the local copy has them already.
        # (Shards in this process check them anyway: no second pass here.)
        if grads is not None and not self.in_process and not kernels.all_finite(grads):
            raise Diverged(f"diverged at step {step} (its gradients hold NaN or infinity)")
        staging = None
        if fetch:
            staging = core.block()
            core.fetch_issued()
            self._fetch_now = False
        self._done = trio.Event()
        if (
            self.in_process
            or (self._skipped_update and fetch)
            or self.job.max_staleness is not None
        ):
            # Shards in this process: a push is a few passes over memory, done
            # now rather than beside the next step's GEMMs, whose threads it
            # would only slow (two loads on the cores the step has). A step
            # that left its update to this fetch waits for it even if a remap
            # has moved the shards away meanwhile (one left for the next turn
            # lands before that turn's step anyway). Under a staleness bound the
            # next step waits too: computed from parameters a fetch behind,
            # its push would be refused all the more often.
            await self.sync(grads, staging, step, versions)
            self.raise_error()
        else:
            nursery.start_soon(self.sync, grads, staging, step, versions)

    async def deferred_fetch(self, nursery: trio.Nursery | None = None) -> None:
        """Make the fetch :meth:`after_step` left for later, and wait for it
        (installed by the next :meth:`install_ready`).

        Args:
            nursery: where the request goes on (else it is made here). A
                cancelled call then only stops waiting, and the next one
                waits on: a request cut off midway would cost its connection.
        """
        if self._deferred:
            await self._done.wait()  # the push before it is applied first
            staging = self._staging()
            self.core.fetch_issued()
            self._done = trio.Event()
            self._deferred = False
            step = self.job.start_step + self.core.step
            if nursery is None:
                await self.sync(None, staging, step, None)
            else:
                self._deferred_sent = True
                nursery.start_soon(self.sync, None, staging, step, None)
        if self._deferred_sent:
            await self._done.wait()
            self._deferred_sent = False
        self.raise_error()

    def _take(self) -> tuple[np.ndarray, dict[int, int]]:
        """The gradients for a push, and the versions they were computed from."""
        versions = self._acc_versions if self._acc_versions is not None else self.versions
        self._acc_versions = None
        # The local copy holds them already (its local updates): one version on
        # (a fetch with the push, installed later, says exactly).
        self.versions = {k: v + 1 for k, v in self.versions.items()}
        return self.core.take_gradients(), versions

    async def finish(self) -> None:
        """After the last step: wait for the push or fetch in flight, install
        it, and push the last steps' gradients if a period was left open."""
        job = self.job
        await self.deferred_fetch()  # the last step's, if it left one
        await self._done.wait()
        self.raise_error()
        self.install_ready()
        if self._acc_versions is not None:  # the last steps' gradients
            # Numbered on from the loop's pushes (seq = the global step),
            # or a restarted replica's last push is dropped as a retry.
            last = job.start_step + self.core.step
            grads, versions = self._take()
            await self.sync(grads, None, last, versions)
            self.raise_error()

    def close(self) -> None:
        """After the partition's last step and request: give its blocks back
        (:meth:`PartitionCore.close`), a fetch that landed too."""
        if self._ready is not None:
            self.core.release(self._ready)
            self._ready = None
        self.core.close()

    async def sync(self, grads, staging, step: int, versions: dict[int, int] | None) -> None:
        """One push of ``grads`` (computed from ``versions``) and/or a fetch
        into ``staging``, retried across remaps; errors are kept for
        :meth:`raise_error`, never raised."""
        done = self._done
        try:
            # A shard node that died, froze or was fenced off: the driver
            # restores its pieces elsewhere and remaps, and the request goes
            # again to the new map (a remap also cancels one still waiting on
            # the old). The shards drop whatever part of a push they had
            # already applied, so nothing counts twice.
            deadline = trio.current_time() + REMAP_WAIT
            while True:
                remapped = self._remapped
                with trio.CancelScope() as self._scope:
                    try:
                        await self._send(grads, staging, step, versions)
                        break
                    except NotFiniteError:  # refused by a shard in this process
                        raise Diverged(
                            f"diverged at step {step} (its gradients hold NaN or infinity)"
                        ) from None
                    except Exception as exc:
                        if not _shard_moved(exc) or trio.current_time() > deadline:
                            raise
                if not self._scope.cancelled_caught:
                    with trio.move_on_after(RETRY_DELAY):
                        await remapped.wait()
            if staging is not None:
                self._ready = staging
        except Exception as exc:
            self._error = exc
        finally:
            self._scope = None
            if grads is not None:
                self.core.release(grads)
            if staging is not None and self._ready is not staging:
                self.core.release(staging)
            done.set()

    async def _send(self, grads, staging, step: int, versions) -> None:
        """One push (paired with a fetch into ``staging`` when given), or one fetch."""
        if grads is None:
            if staging is not None:
                self._ready_versions = await self.client.pull({self.block: staging})
            return
        into = None if staging is None else {self.block: staging}
        pushed = await self.client.push(
            {self.block: grads}, pusher=self.job.pusher(step), seq=step, fetch_into=into,
            versions=versions, max_staleness=self.job.max_staleness,
        )  # fmt: skip
        self.status.pushes += pushed.applied
        if staging is not None:
            self._ready_versions = pushed.versions
            return
        bound = self.job.max_staleness
        if pushed.refused or (
            bound is not None
            and any(v - self.versions.get(k, v) > bound for k, v in pushed.versions.items())
        ):
            # Refused, or the shards are further ahead than the bound allows:
            # fetch at once, so that the next push's gradients come from
            # parameters within it.
            await self._fetch_now_into(self.core.block())

    async def _fetch_now_into(self, staging: np.ndarray) -> None:
        self.core.fetch_issued()
        try:
            self._ready_versions = await self.client.pull({self.block: staging})
        except BaseException:
            self.core.release(staging)
            self.core.fetch_abandoned()
            self._fetch_now = True  # the next step's push fetches (and installs) instead
            raise
        self._ready = staging
