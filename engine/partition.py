"""The layer-partition service: a replica's layers on one node.

A Downpour replica is cut by layer into partitions, each an independent
piece on some node. This module and :mod:`dbnode.partition_core` hold
all of it, bottom up:

- :class:`~dbnode.partition_core.PartitionCore` (its own module): a
  contiguous block of layers with a local copy of their parameters —
  forward, backward, the local updates and the fetch correction. No I/O.
- :class:`PartitionStatus`: a partition's progress, as ``status`` reports it.
- :class:`PartitionRunner`: drives one core over the network — activations
  and deltas to and from its neighbours, pushes and fetches to and from the
  parameter shards, in the background.
- :class:`PartitionService`: a node's partitions and their handlers:
  FORWARD/BACKWARD delivery into their inboxes, and the control ops
  ``start`` (the job: :class:`~dbnode.control.PartitionJob`), ``data``,
  ``run``, ``stop`` and ``status``.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import trio

from . import codecs, control, kernels
from .aio import first_error
from .blocks import BlockPool, blocks
from .config import format_address
from .control import Op
from .data import batch_indices, steps_per_run
from .errors import (
    DBNodeError,
    Diverged,
    ErrorCode,
    RemoteError,
    RequestError,
)
from .partition_core import PartitionCore
from .partition_sync import ShardSync
from .pipeline import Pass, ahead, schedule
from .placement import plan_shards
from .ps.client import ParameterClient
from .ps.shard import ParameterShard
from .runs import NodeRun, RunTable
from .turns import Turns
from .wire import Address, Frame, MessageKind, Peers

__all__ = [
    "OFFLOAD_FLOPS",
    "PartitionCore",
    "PartitionRunner",
    "PartitionService",
    "PartitionStatus",
]

# A partition's failures are the node's to log: one logger for the process.
log = logging.getLogger("dbnode.node")

# Steps of at least this many floating-point operations run in a worker
# thread (about 50 us of BLAS work; a trio thread hop costs tens of us).
OFFLOAD_FLOPS = 1 << 22

# ------------------------------------------------------------ the runner


@dataclass
class PartitionStatus:
    """A running partition's progress, as ``heartbeat`` and ``status`` report it.

    Attributes:
        step: steps done (a restarted replica starts at its ``start_step``).
        steps: steps of the whole run.
        examples: examples trained by this incarnation.
        loss_sum, loss_count: the loss summed over the examples trained by
            this incarnation, and how many (last partitions only). Never
            reset: whoever reports a rate takes differences, so any number of
            readers see the same figures.
        seconds: in the training loop, until the last push was applied.
        done: finished, every push applied.
        error: why the partition failed, or None.
        diverged: it failed because its loss stopped being finite.
        pushes: piece updates the shards acknowledged (a block split over k
            shard pieces counts k per push).
        sent, received: payload bytes to and from other processes, by their
            ``host:port``: sent, its pushes, activations and deltas; received,
            its fetches (a neighbour counts what it sends).
        idle: seconds of the training loop spent waiting for a neighbour's
            activations or deltas.
        stashed: the most weight versions it kept at once for minibatches in
            flight (besides the local copy).
        held_bytes: the most bytes those versions and the in-flight
            minibatches' activations took at once.
        lag: the most local updates between the weights a minibatch's
            forward used here and those it used in the partition below
            (the version carried on each activation frame).
    """

    step: int = 0
    steps: int = 0
    examples: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    seconds: float = 0.0
    done: bool = False
    error: str | None = None
    diverged: bool = False
    pushes: int = 0
    sent: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    idle: float = 0.0
    stashed: int = 0
    held_bytes: int = 0
    lag: int = 0

    def count(self, peer: Address, sent: int, received: int) -> None:
        """Add payload bytes exchanged with ``peer``."""
        name = format_address(peer)
        if sent:
            self.sent[name] = self.sent.get(name, 0) + sent
        if received:
            self.received[name] = self.received.get(name, 0) + received

    def report(self) -> control.PartitionReport:
        """The status as the control ops carry it (reading it changes nothing).

        Returns:
            The report.
        """
        return control.PartitionReport(
            step=self.step,
            steps=self.steps,
            examples=self.examples,
            loss_sum=self.loss_sum,
            loss_count=self.loss_count,
            seconds=self.seconds,
            done=self.done,
            error=self.error,
            diverged=self.diverged,
            pushes=self.pushes,
            sent=dict(self.sent),
            received=dict(self.received),
            idle=self.idle,
            stashed=self.stashed,
            held_bytes=self.held_bytes,
            lag=self.lag,
        )

    @property
    def busy(self) -> bool:
        """Started and neither finished nor failed."""
        return bool(self.step) and not (self.done or self.error)


class PartitionRunner:
    """Runs one layer partition of one replica on this node.

    The loop is the replica's step: forward (from its data shard or the
    partition below), send on or compute the loss, backward, send the delta
    back. After each step it pushes accumulated gradients every ``n_push``
    steps and fetches parameters every ``n_fetch`` steps, in a background
    task (at most one in flight), so the loop only waits for the network
    when the previous push or fetch has not finished by the next one. Its
    passes compute in the node's turns (:mod:`dbnode.turns`), but for
    steps small enough to stay in the event loop; a whole-model replica
    that takes turns fetches for its next step when that turn starts (from
    shards in this process), or one turn ahead when it will wait, instead.

    A failure of any kind (an exception group among them) ends the partition
    alone: it is reported through its status, never raised into the node.

    Args:
        job: what the driver's ``start`` said.
        service: the node's partition service (neighbours, peers).
        run: the run on this node the partition belongs to.

    Raises:
        ValueError, KeyError: the job does not fit its own plan (e.g. an
            ``index`` without bounds).
    """

    def __init__(self, job: control.PartitionJob, service: PartitionService, run: NodeRun):
        self.job = job
        self.service = service
        self.run_state = run
        steps = steps_per_run(job.n_examples, job.batch_size, job.epochs)
        if job.end_step and not job.start_step < job.end_step <= steps:
            raise ValueError(
                f"end_step {job.end_step} is not in (start_step {job.start_step}, {steps}]"
            )
        steps = job.end_step or steps
        self.status = PartitionStatus(step=job.start_step, steps=steps)
        self.started = False
        self.reserved = 0  # bytes of the node's memory budget granted to it
        self.cancel_scope = trio.CancelScope()
        # Room for every frame the pipeline may send ahead: a full inbox
        # would stall the connection that carries it for everyone.
        self.inbox_send, self.inbox = trio.open_memory_channel[Frame](2 * job.pipeline + 2)
        self._arrived: dict[tuple[int, int], Frame] = {}  # frames ahead of the schedule
        self.x: np.ndarray | None = None
        self.y: np.ndarray | None = None
        spec = job.spec
        # The same plan the driver made, from the same inputs.
        self.plan = plan_shards(
            blocks(spec, job.bounds),
            len(job.shards),
            spec.np_dtype.itemsize,
            min_split_bytes=job.min_split_bytes,
        )
        self.block = f"block{job.index}"
        size = self.plan.shape(self.block)
        # The local copy; a fetch lands in another block (core.block()) and
        # the two swap when it is installed.
        self.core = PartitionCore(
            spec,
            job.first,
            job.last,
            kernels.zeros(size, spec.np_dtype),
            job.learning_rate,
            job.n_fetch,
            job.n_push,
            ahead=ahead(job.index, len(job.bounds), job.pipeline),
            pool=run.pools.setdefault((job.first, job.last), BlockPool(spec, job.first, job.last)),
        )
        self.client = ParameterClient(
            self.plan,
            list(job.shards),
            service.peers,
            run=job.run,
            epoch=job.epoch,
            local=service.local_shard(run),
            count=self.status.count,
            fetch=job.wire_fetch,
            push=job.wire_push,
        )
        self.sync = ShardSync(job, self.core, self.client, self.block, self.status)
        # A step that takes long enough to matter computes in a worker thread
        # (the kernels and BLAS release the GIL), so the event loop keeps
        # moving this node's frames — its pushes and fetches among them —
        # meanwhile. A tiny step stays in the loop: a thread hop costs more.
        flops = 2 * job.batch_size * self.core.flat.size
        self._offload = flops >= OFFLOAD_FLOPS

    @staticmethod
    def memory_needed(job: control.PartitionJob) -> int:
        """Bytes a partition of ``job`` allocates once started (its data shard
        aside, which comes with ``data``): an upper bound, checked against
        the node's budget before anything is allocated.

        Args:
            job: the ``start`` request.

        Returns:
            Bytes: five parameter blocks (local copy, fetch landing buffer,
            gradients, two accumulators) and the activations of a batch,
            plus a weight version and a batch's activations and inputs for
            each further minibatch it keeps in flight.
        """
        spec = job.spec
        layers = spec.layers[job.first : job.last + 1]
        block = sum(a * b + b for a, b in zip(layers, layers[1:])) + 16 * len(layers)
        activations = 4 * job.batch_size * sum(layers)
        kept = ahead(job.index, len(job.bounds), job.pipeline) - 1
        per_kept = block + job.batch_size * sum(layers)
        return (5 * block + activations + kept * per_kept) * spec.np_dtype.itemsize

    async def run(self) -> None:
        """Train to the end of the job's schedule, or until stopped.

        Never raises (but for the cancellation of an enclosing scope): a
        failure ends up in ``status.error``, and the node keeps serving.
        """
        self.started = True
        try:
            with self.cancel_scope:
                await self._run()
        except Exception as exc:  # ExceptionGroups too: nothing of ours reaches the node
            self._failed(exc)
        finally:
            self.sync.close()  # its steps and requests are over: the blocks go back
            self.inbox_send.close()  # what its neighbours still send is dropped

    def stop(self) -> None:
        """Cancel the partition; frames still arriving for it are refused."""
        self.cancel_scope.cancel()
        self.inbox_send.close()

    def remap(self, epoch: int, shards: tuple[tuple[str, int], ...]) -> None:
        """Push to and fetch from ``shards`` at shard map ``epoch`` from now on;
        a push or fetch refused for a stale epoch meanwhile is sent again."""
        self.sync.remap(epoch, shards)

    def _failed(self, exc: BaseException) -> None:
        if self.status.error is not None:
            return
        cause = first_error(exc)
        self.status.error = f"{type(cause).__name__}: {cause}"
        self.status.diverged = isinstance(cause, Diverged)
        log.error(
            "partition %s of run %s failed: %s", self.job.uid, self.job.run, self.status.error
        )
        log.debug("partition %s failure", self.job.uid, exc_info=exc)

    async def _run(self) -> None:
        job = self.job
        try:
            self._check_data()
            await self.sync.first_fetch()
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._loop()
                await self.sync.finish()
            self.status.seconds = trio.current_time() - start
            self.status.done = True
            log.info("partition %s of run %s done: %d steps in %.1f s", job.uid, job.run,
                     self.core.step, self.status.seconds)  # fmt: skip
        except Exception as exc:  # reported through status; the node keeps serving
            self._failed(exc)

    def _check_data(self) -> None:
        job = self.job
        if self.core.is_first and (self.x is None or len(self.x) != job.n_examples):
            raise DBNodeError(f"partition {job.uid}: inputs not received (need {job.n_examples})")
        if self.core.is_last and (self.y is None or len(self.y) != job.n_examples):
            raise DBNodeError(f"partition {job.uid}: targets not received (need {job.n_examples})")
        if self.core.is_first and self.x.shape[1] != job.spec.layers[0]:
            raise DBNodeError(
                f"partition {job.uid}: inputs have {self.x.shape[1]} features, "
                f"the model takes {job.spec.layers[0]}"
            )

    async def _loop(self) -> None:
        job, core, status, sync = self.job, self.core, self.status, self.sync
        order = batch_indices(job.n_examples, job.batch_size, job.epochs, job.seed + job.replica)
        # Steps before start_step were done by an earlier incarnation of the replica.
        batches = itertools.islice(order, job.start_step, self.status.steps)
        if core.is_first and core.is_last:
            for step, idx in enumerate(batches, job.start_step):
                if self._offload:
                    loss = await self._whole_step_in_turn(idx)
                else:  # in the event loop, which computes one step at a time anyway
                    loss = core.whole_step(*self._whole_step_args(idx))
                if not math.isfinite(loss):
                    raise Diverged(f"diverged at step {step} (loss {loss})")
                sync.backwarded(0)
                status.loss_sum += loss * len(idx)
                status.loss_count += len(idx)
                status.step = step + 1
                status.examples += len(idx)
                await sync.after_step(step, self._nursery, defer_fetch=self._defers_fetch())
            return
        send = partial(self.service.send, self.run_state, codec=job.wire_activations)
        sizes: dict[int, int] = {}  # step -> its batch's examples, while in flight
        delta = None
        passes = schedule(job.index, len(job.bounds), job.pipeline, job.start_step, status.steps)
        for kind, step in passes:
            sync.install_ready()
            slot = step % core.ahead
            if kind is Pass.FORWARD:
                idx = next(batches)
                sizes[step] = len(idx)
                version = job.start_step + core.step  # the local updates its weights have
                if core.is_first:
                    x = self.x[idx]
                else:
                    x, below = await self._receive(MessageKind.FORWARD, step)
                    status.lag = max(status.lag, version - below)
                sync.forwarded(slot)
                h = await self._compute(core.forward, x, slot)
                self._held(x, in_flight=len(sizes))
                if core.is_last:
                    loss, delta = core.loss_delta(h, self.y[idx])
                    if not math.isfinite(loss):
                        # Its gradients would be refused by every shard: stop here.
                        raise Diverged(f"diverged at step {step} (loss {loss})")
                    status.loss_sum += loss * len(idx)
                    status.loss_count += len(idx)
                else:
                    sent = await send(job.next, MessageKind.FORWARD, step, h, version=version)
                    status.count(job.next[:2], sent, 0)
                continue
            if not core.is_last:
                delta, _ = await self._receive(MessageKind.BACKWARD, step)
            below = await self._compute(core.backward, delta, sync.local_update(), slot)
            sync.backwarded(slot)
            if below is not None:
                status.count(
                    job.prev[:2], await send(job.prev, MessageKind.BACKWARD, step, below), 0
                )
            status.step = step + 1
            status.examples += sizes.pop(step)
            await sync.after_step(step, self._nursery)

    def _held(self, x: np.ndarray, in_flight: int) -> None:
        """Record the weight versions and bytes kept for the ``in_flight``
        minibatches (``x`` the newest one's input)."""
        core, status, job = self.core, self.status, self.job
        if core.ahead == 1:
            return
        stashed = core.stashed
        status.stashed = max(status.stashed, stashed)
        features = x.shape[1] + sum(job.spec.layers[job.first + 1 : job.last + 1])
        held = stashed * core.flat.nbytes + in_flight * features * x.shape[0] * x.itemsize
        status.held_bytes = max(status.held_bytes, held)

    async def _whole_step_in_turn(self, idx: np.ndarray) -> float:
        """A whole-model step computed in the node's turn, from parameters as
        fresh as they are when it starts (:meth:`ShardSync.fetch_at_turn`)."""
        sync, turns = self.sync, self.service.turns
        while True:
            lobby = partial(sync.deferred_fetch, self._nursery) if sync.needs_lobby else None
            async with turns.turn(lobby):
                # One pass of the event loop first: the replica that has just
                # left the turn applies its push to shards here in it.
                await trio.lowlevel.checkpoint()
                if sync.fetch_at_turn():
                    args = self._whole_step_args(idx, self._defers_fetch(in_turn=True))
                    return await trio.to_thread.run_sync(self.core.whole_step, *args)
            # Its shard fenced off or moved: fetch out of the turn (across the
            # remap), then queue again.
            await sync.deferred_fetch()

    def _defers_fetch(self, in_turn: bool = False) -> bool:
        """Whether a whole-model step leaves its fetch for its next turn
        rather than make it at once: from shards in this process (a copy
        when the turn starts), or when the turn will wait (the node crowded,
        :mod:`dbnode.turns`); asked after the step, or from inside its turn."""
        turns = self.service.turns
        crowded = turns.crowded_after_turn if in_turn else turns.crowded
        return self._offload and (self.sync.in_process or crowded)

    def _whole_step_args(self, idx: np.ndarray, deferred: bool = False) -> tuple:
        """A whole-model step's inputs, with the newest fetch installed
        (``deferred``: its next fetch will be left for its next turn)."""
        sync = self.sync
        sync.install_ready()
        local = sync.local_update(deferred)
        sync.forwarded(0)
        return self.x[idx], self.y[idx], local

    async def _compute(self, fn, *args):
        if not self._offload:  # in the event loop: one at a time anyway
            return fn(*args)
        async with self.service.turns.turn():
            return await trio.to_thread.run_sync(fn, *args)

    async def _receive(self, kind: MessageKind, step: int) -> tuple[np.ndarray, int]:
        """The activations or deltas of ``step``, decoded from their codec, and
        the version the sender's forward used (activations; else 0).

        Frames of the next steps may arrive first (the neighbours run their
        own schedules): they wait here, as many as the pipeline can send ahead.
        """
        want = (int(kind), step)
        started = trio.current_time()
        while want not in self._arrived:
            frame = await self.inbox.receive()
            got = (frame.kind, frame.seq)
            expected = MessageKind.BACKWARD if self.core.is_first else (
                MessageKind.FORWARD if self.core.is_last else None)  # fmt: skip
            if (
                got in self._arrived
                or (frame.kind == kind and frame.seq < step)
                or (expected is not None and frame.kind != expected)
                or len(self._arrived) > 2 * self.job.pipeline
            ):
                raise DBNodeError(
                    f"partition {self.job.uid}: waiting for {kind.name} of step {step}, "
                    f"got {MessageKind(frame.kind).name} of step {frame.seq}"
                )
            self._arrived[got] = frame
        self.status.idle += trio.current_time() - started
        frame = self._arrived.pop(want)
        version = frame.meta.get("version", 0)
        if isinstance(version, bool) or not isinstance(version, int):
            raise DBNodeError(f"partition {self.job.uid}: version {version!r} is not a count")
        return codecs.decode(frame.array), version


# ----------------------------------------------------------- the service


class PartitionService:
    """The layer partitions of a node's runs, and the handlers that reach them.

    Every request names its run (``run``), and a partition's uid is its id
    within that run: two runs never see each other's partitions.

    Args:
        runs: the node's runs (each run's partitions live in it, and compute
            in its nursery).
        peers: the node's channels to other nodes (neighbours, shards).
        address: ``address()`` is where this node is reachable (known only
            once it listens): a neighbour or shard there is this very node.

    Attributes:
        handlers: MessageKind -> async handler (FORWARD, BACKWARD).
        ops: control :class:`~dbnode.control.Op` -> async handler taking the
            decoded request (``start``, ``data``, ``run``, ``stop``).
    """

    def __init__(self, runs: RunTable, peers: Peers, address: Callable[[], Address]) -> None:
        self.runs = runs
        self.turns = Turns()  # shared by every run's partitions here
        self.peers = peers
        self.address = address
        self.handlers = {MessageKind.FORWARD: self._deliver, MessageKind.BACKWARD: self._deliver}
        self.ops = {
            Op.START: self._start,
            Op.DATA: self._data,
            Op.RUN: self._run,
            Op.STOP: self._stop,
        }

    def local_shard(self, run: NodeRun) -> Callable[[Address, int], ParameterShard | None]:
        """What a partition's :class:`~dbnode.ps.client.ParameterClient` of
        ``run`` uses to reach this node's own shard without the network.

        Args:
            run: the partition's run.

        Returns:
            ``local(address, epoch)``: ``run``'s shard (looked up at each call:
            ``restore`` replaces it) when ``address`` is this node, else None.
            It refuses a stale ``epoch`` exactly as a shard request would.
        """

        def local(address: Address, epoch: int) -> ParameterShard | None:
            if address != self.address():
                return None
            try:
                run.check_epoch(epoch)
            except RequestError as exc:
                raise RemoteError(exc.code, exc.message) from None
            return run.shard

        return local

    @staticmethod
    def _runner(run: NodeRun, uid: int) -> PartitionRunner:
        runner = run.partitions.get(uid)
        if runner is None:
            raise RequestError(ErrorCode.UNKNOWN_KEY, f"run {run.id}: no partition {uid} here")
        return runner

    async def send(
        self,
        run: NodeRun,
        target: tuple[str, int, int],
        kind: MessageKind,
        step: int,
        array: np.ndarray,
        codec: str = "f32",
        version: int | None = None,
    ) -> int:
        """Send activations or deltas to a partition of ``run``: straight into
        its inbox when it lives on this node, else over its connection (TCP, or
        shared memory on this host) in ``codec``.

        Args:
            run: the run both partitions belong to.
            target: the partition's ``(host, port, uid)``.
            kind: FORWARD or BACKWARD.
            step: the step they belong to (the frame's ``seq``).
            array: the activations or deltas.
            codec: their wire codec (:mod:`dbnode.codecs`) to another node.
            version: of the weights that computed activations (the sender's
                local updates), carried in the frame's meta as ``version``.

        Returns:
            The payload bytes sent to another process (0: delivered here).

        Raises:
            TransportError: the partition's node cannot be reached.
            RemoteError: its node refused them (e.g. the partition is gone).
        """
        host, port, uid = target
        meta = {} if version is None else {"version": version}
        local = run.partitions.get(uid)
        if local is not None and (host, int(port)) == self.address():
            # Copied: the sender reuses its buffer on the next step.
            frame = Frame(
                kind=kind, request_id=0, key=uid, seq=step, flags=0, array=array.copy(), meta=meta
            )
            await local.inbox_send.send(frame)
            return 0
        ch = await self.peers.get((host, int(port)))
        wire = codecs.encode(array, codec)
        await ch.notify(kind, key=uid, seq=step, array=wire, meta={"run": run.id, **meta})
        return wire.nbytes

    async def _deliver(self, frame: Frame) -> None:
        run = self.runs.get(frame.meta.get("run"))
        if frame.key in run.stopped:
            # The neighbours of a stopped copy (a backup ended, a replica
            # parked) may still be sending: expected, nothing to answer.
            return
        runner = self._runner(run, frame.key)
        try:
            if runner.started:  # its pipeline bounds what may wait: the inbox holds it
                await runner.inbox_send.send(frame)
                return
            # Not set running yet, its neighbours are not either: a peer that
            # fills its inbox anyway must not stall the connection (shared by
            # every run) until the partition runs, which it may never do.
            runner.inbox_send.send_nowait(frame)
        except trio.WouldBlock:
            raise RequestError(
                ErrorCode.UNAVAILABLE,
                f"run {run.id}: partition {frame.key} is not running and its inbox is full",
            ) from None
        except trio.ClosedResourceError:  # stopped or over meanwhile
            return

    async def _start(self, job: control.PartitionJob) -> None:
        run = self.runs.get(job.run)
        existing = run.partitions.get(job.uid)
        if existing is not None:
            if existing.job == job:  # a retried start: nothing to do
                return
            raise RequestError(
                ErrorCode.BAD_REQUEST,
                f"run {run.id}: partition {job.uid} already exists with another job",
            )
        need = PartitionRunner.memory_needed(job)
        self.runs.reserve(need, f"partition {job.uid} of run {run.id}")
        try:
            runner = PartitionRunner(job, self, run)
        except (KeyError, ValueError) as exc:  # fields that do not fit together
            raise RequestError(ErrorCode.BAD_REQUEST, f"start: {exc}") from None
        runner.reserved = need
        run.reserved += need
        run.partitions[job.uid] = runner
        log.info("run %s (%s): partition %s of replica %d, layers [%d, %d), from step %d",
                 run.id, run.name, job.uid, job.replica, job.first, job.last, job.start_step)  # fmt: skip

    async def _data(self, request: control.Data) -> None:
        run = self.runs.get(request.run)
        runner = self._runner(run, request.uid)
        role, array = request.role, request.array
        if array.dtype.kind in "fc" and not kernels.all_finite(array):
            what = "inputs" if role == "x" else "targets"
            raise RequestError(
                ErrorCode.NOT_FINITE, f"{what} for partition {request.uid} hold NaN or infinity"
            )
        spec, n = runner.job.spec, runner.job.n_examples
        if array.ndim == 0 or len(array) != n:
            raise RequestError(
                ErrorCode.SHAPE_MISMATCH,
                f"{role}: {len(array) if array.ndim else 0} examples, "
                f"the partition was started for {n}",
            )
        if role == "x":
            if not runner.core.is_first or array.ndim != 2 or array.shape[1] != spec.layers[0]:
                raise RequestError(
                    ErrorCode.SHAPE_MISMATCH,
                    f"inputs of shape {array.shape} for partition {request.uid}: only a first "
                    f"partition takes inputs, of {spec.layers[0]} features",
                )
            self._fits(run, runner, array.size * spec.np_dtype.itemsize, runner.x)
            x = array.astype(spec.np_dtype, copy=False)
            self._account(run, runner, x, runner.x)
            runner.x = x
            return
        if not runner.core.is_last:
            raise RequestError(
                ErrorCode.BAD_REQUEST, f"partition {request.uid} is not a last partition"
            )
        kind = np.dtype(np.intp) if spec.takes_labels else spec.np_dtype
        self._fits(run, runner, array.size * kind.itemsize, runner.y)
        y = runner.core.loss.targets(array)
        if spec.takes_labels and (y.min() < 0 or y.max() >= spec.layers[-1]):
            raise RequestError(
                ErrorCode.BAD_REQUEST, f"labels must be classes in [0, {spec.layers[-1]})"
            )
        if not spec.takes_labels and (
            spec.loss == "cross_entropy" and (y.min() < 0 or y.max() > 1)
        ):
            raise RequestError(
                ErrorCode.BAD_REQUEST, "a sigmoid's log-loss takes targets in [0, 1]"
            )
        if not spec.takes_labels and y.shape[1] != spec.layers[-1]:
            raise RequestError(
                ErrorCode.SHAPE_MISMATCH,
                f"targets of shape {array.shape}, the model has {spec.layers[-1]} outputs",
            )
        self._account(run, runner, y, runner.y)
        runner.y = y

    def _fits(self, run: NodeRun, runner: PartitionRunner, nbytes: int, previous) -> None:
        """Refuse a data shard that would not fit the node's memory budget as
        ``nbytes`` in place of the one it replaces: checked before it is
        converted (a copy up to 8 times the received payload, which the
        transport's limit bounded)."""
        change = nbytes - (previous.nbytes if previous is not None else 0)
        self.runs.reserve(change, f"data for partition {runner.job.uid} of run {run.id}")

    def _account(self, run: NodeRun, runner: PartitionRunner, array: np.ndarray, previous) -> None:
        """Count a data shard against the node's memory budget, in place of
        the one it replaces (:meth:`_fits` checked it before it was made)."""
        change = array.nbytes - (previous.nbytes if previous is not None else 0)
        runner.reserved += change
        run.reserved += change

    async def _run(self, request: control.Run) -> None:
        run = self.runs.get(request.run)
        # Every uid checked before any starts: a refused request changes nothing.
        uids = request.uids if request.uids is not None else list(run.partitions)
        runners = [self._runner(run, uid) for uid in uids]
        for runner in runners:
            if not runner.started:  # a cancel scope is good for one run only
                runner.started = True
                run.nursery.start_soon(runner.run)

    async def _stop(self, request: control.Stop) -> None:
        run = self.runs.get(request.run)
        for uid in request.uids:
            runner = run.partitions.pop(uid, None)
            if runner is not None:
                run.stopped.add(uid)
                runner.stop()
                if not runner.started:
                    runner.sync.close()  # it never ran: its blocks go back now
                run.reserved -= runner.reserved
