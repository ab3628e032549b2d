"""A dbnode node: what one ``dbnode serve`` process hosts.

A node serves authenticated connections (:func:`dbnode.transport.serve`)
and answers each request frame by kind:

- INIT, PULL, PUSH, PUSH_PULL, STATS, SNAPSHOT: its parameter shard (one
  :class:`~dbnode.shard.ParameterShard` holding every piece the driver
  placed here, whatever plan shard index it belongs to);
- FORWARD, BACKWARD: the inbox of the layer partition named by the key;
- CONTROL (``meta["op"]``): the driver's commands — ``info``, ``data``
  (a data shard's inputs or targets), ``start`` (a layer partition),
  ``status``, ``reset``.

Everything runs in one trio event loop; shard requests are synchronous
calls, so pushes are applied one at a time, exactly. Partitions compute in
the loop too: one node process per core is the unit of parallelism.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import trio

from . import kernels
from .aio import first_error
from .data import batch_indices, steps_per_run
from .errors import DBNodeError, ErrorCode, RequestError, ShardError, SnapshotError
from .model import ModelSpec, blocks
from .partition import PartitionCore
from .placement import plan_shards
from .ps.client import ParameterClient
from .ps.shard import ParameterShard
from .wire import DEFER, Address, Frame, MessageKind, Peers, Reply, serve

log = logging.getLogger("dbnode.node")

# Steps of at least this many floating-point operations run in a worker
# thread (about 50 us of BLAS work; a trio thread hop costs tens of us).
OFFLOAD_FLOPS = 1 << 22


# --------------------------------------------------------------- partitions


@dataclass
class PartitionStatus:
    step: int = 0
    steps: int = 0
    examples: int = 0
    loss_sum: float = 0.0       # since the last status report
    loss_count: int = 0
    seconds: float = 0.0        # in the training loop, until the last push was applied
    done: bool = False
    error: str | None = None

    def report(self) -> dict[str, Any]:
        out = {"step": self.step, "steps": self.steps, "examples": self.examples,
               "loss_sum": self.loss_sum, "loss_count": self.loss_count,
               "seconds": self.seconds, "done": self.done, "error": self.error}
        self.loss_sum, self.loss_count = 0.0, 0
        return out


@dataclass
class PartitionJob:
    """What the driver's ``start`` command says about one partition."""

    uid: int
    replica: int
    index: int
    first: int
    last: int
    spec: ModelSpec
    learning_rate: float
    n_fetch: int
    n_push: int
    batch_size: int
    epochs: int
    seed: int
    n_examples: int
    shards: list[Address]
    min_split_bytes: int
    bounds: list[tuple[int, int]]              # every partition's layers: the plan's blocks
    prev: tuple[str, int, int] | None = None    # host, port, uid
    next: tuple[str, int, int] | None = None
    start_step: int = 0                          # a restarted replica resumes its schedule here
    incarnation: int = 0                         # how many times the replica was restarted

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> PartitionJob:
        try:
            m = meta["model"]
            spec = ModelSpec(tuple(m["layers"]), m["activation"], m["output"], m["loss"], m["dtype"])
            job = cls(
                uid=int(meta["uid"]), replica=int(meta["replica"]), index=int(meta["index"]),
                first=int(meta["first"]), last=int(meta["last"]), spec=spec,
                learning_rate=float(meta["learning_rate"]), n_fetch=int(meta["n_fetch"]),
                n_push=int(meta["n_push"]), batch_size=int(meta["batch_size"]),
                epochs=int(meta["epochs"]), seed=int(meta["seed"]),
                n_examples=int(meta["n_examples"]),
                shards=[(str(h), int(p)) for h, p in meta["shards"]],
                min_split_bytes=int(meta["min_split_bytes"]),
                bounds=[(int(a), int(b)) for a, b in meta["bounds"]],
                prev=tuple(meta["prev"]) if meta.get("prev") else None,
                next=tuple(meta["next"]) if meta.get("next") else None,
                start_step=int(meta.get("start_step", 0)),
                incarnation=int(meta.get("incarnation", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RequestError(ErrorCode.BAD_REQUEST, f"bad partition description: {exc!r}") from None
        return job

    @property
    def pusher(self) -> str:
        # A restarted replica pushes under a new name: its sequence numbers
        # start again, and the shards must not take them for retries.
        return f"r{self.replica}p{self.index}i{self.incarnation}"


class PartitionRunner:
    """Runs one layer partition of one replica on this node.

    The loop is the replica's step: forward (from its data shard or the
    partition below), send on or compute the loss, backward, send the delta
    back. After each step it pushes accumulated gradients every ``n_push``
    steps and fetches parameters every ``n_fetch`` steps, in a background
    task (at most one in flight), so the loop only waits for the network
    when the previous push or fetch has not finished by the next one.
    """

    def __init__(self, job: PartitionJob, node: Node):
        self.job = job
        self.node = node
        self.status = PartitionStatus(step=job.start_step,
                                      steps=steps_per_run(job.n_examples, job.batch_size, job.epochs))
        self.cancel_scope = trio.CancelScope()
        self.inbox_send, self.inbox = trio.open_memory_channel[Frame](4)
        self.x: np.ndarray | None = None
        self.y: np.ndarray | None = None
        spec = job.spec
        # The same plan the driver made, from the same inputs.
        self.plan = plan_shards(blocks(spec, job.bounds), len(job.shards), spec.np_dtype.itemsize,
                                min_split_bytes=job.min_split_bytes)
        self.block = f"block{job.index}"
        size = self.plan.shape(self.block)
        # Two parameter blocks: the local copy, and the one a fetch lands in;
        # they swap when the fetch is installed.
        self.core = PartitionCore(spec, job.first, job.last, kernels.zeros(size, spec.np_dtype),
                                  job.learning_rate, job.n_fetch, job.n_push)
        self._spare: np.ndarray | None = kernels.zeros(size, spec.np_dtype)
        self._ready: np.ndarray | None = None
        self._sync_done = trio.Event()
        self._sync_done.set()
        self._sync_error: BaseException | None = None
        # A step that takes long enough to matter computes in a worker thread
        # (the kernels and BLAS release the GIL), so the event loop keeps
        # moving this node's frames — its pushes and fetches among them —
        # meanwhile. A tiny step stays in the loop: a thread hop costs more.
        flops = 2 * job.batch_size * self.core.flat.size
        self._offload = flops >= OFFLOAD_FLOPS

    async def run(self) -> None:
        with self.cancel_scope:
            await self._run()

    def stop(self) -> None:
        """Cancel the partition; frames still arriving for it are refused."""
        self.cancel_scope.cancel()
        self.inbox_send.close()

    async def _run(self) -> None:
        job = self.job
        try:
            node = self.node
            self.client = ParameterClient(
                self.plan, job.shards, node.peers,
                local=lambda address: node.shard if address == node.address else None)
            self._check_data()
            await self.client.pull({self.block: self.core.flat})
            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self._loop()
                await self._sync_done.wait()
                self._raise_sync_error()
                self._install_ready()
                if self.core.step % job.n_push:   # the last steps' gradients
                    await self._sync(self.core.take_gradients(), None, self.core.step)
                    self._raise_sync_error()
            self.status.seconds = trio.current_time() - start
            self.status.done = True
        except Exception as exc:  # reported through status; the node keeps serving
            cause = first_error(exc)
            self.status.error = f"{type(cause).__name__}: {cause}"
            log.error("partition %s failed: %s", job.uid, self.status.error)
            log.debug("partition %s failure", job.uid, exc_info=True)

    def _check_data(self) -> None:
        job = self.job
        if self.core.is_first and (self.x is None or len(self.x) != job.n_examples):
            raise DBNodeError(f"partition {job.uid}: inputs not received (need {job.n_examples})")
        if self.core.is_last and (self.y is None or len(self.y) != job.n_examples):
            raise DBNodeError(f"partition {job.uid}: targets not received (need {job.n_examples})")
        if self.core.is_first and self.x.shape[1] != job.spec.layers[0]:
            raise DBNodeError(f"partition {job.uid}: inputs have {self.x.shape[1]} features, "
                              f"the model takes {job.spec.layers[0]}")

    async def _loop(self) -> None:
        job, core, status = self.job, self.core, self.status
        for step, idx in enumerate(batch_indices(job.n_examples, job.batch_size, job.epochs,
                                                 job.seed + job.replica)):
            if step < job.start_step:      # done by an earlier incarnation of the replica
                continue
            self._install_ready()
            if core.is_first:
                h = await self._compute(core.forward, self.x[idx])
            else:
                h = await self._compute(core.forward, (await self._receive(MessageKind.FORWARD, step)).array)
            if core.is_last:
                loss, delta = core.loss_delta(h, self.y[idx])
                status.loss_sum += loss * len(idx)
                status.loss_count += len(idx)
            else:
                await self.node.send(job.next, MessageKind.FORWARD, step, h)
                delta = (await self._receive(MessageKind.BACKWARD, step)).array
            below = await self._compute(core.backward, delta)
            if below is not None:
                await self.node.send(job.prev, MessageKind.BACKWARD, step, below)
            status.step = step + 1
            status.examples += len(idx)
            await self._after_step(step)

    async def _compute(self, fn, *args):
        if self._offload:
            return await trio.to_thread.run_sync(fn, *args)
        return fn(*args)

    async def _receive(self, kind: MessageKind, step: int) -> Frame:
        frame = await self.inbox.receive()
        if frame.kind != kind or frame.seq != step:
            raise DBNodeError(f"partition {self.job.uid}: expected {kind.name} of step {step}, "
                              f"got {MessageKind(frame.kind).name} of step {frame.seq}")
        return frame

    async def _after_step(self, step: int) -> None:
        core = self.core
        push, fetch = core.push_due, core.fetch_due
        if not (push or fetch):
            return
        await self._sync_done.wait()   # one push/fetch in flight at a time
        self._raise_sync_error()
        self._install_ready()
        grads = core.take_gradients() if push else None
        staging = None
        if fetch:
            staging, self._spare = self._spare, None
            core.fetch_issued()
        self._sync_done = trio.Event()
        self._nursery.start_soon(self._sync, grads, staging, step)

    async def _sync(self, grads, staging, step: int) -> None:
        done = self._sync_done
        try:
            if grads is not None:
                await self.client.push({self.block: grads}, pusher=self.job.pusher, seq=step,
                                       fetch_into=None if staging is None else {self.block: staging})
            elif staging is not None:
                await self.client.pull({self.block: staging})
            if staging is not None:
                self._ready = staging
        except Exception as exc:
            self._sync_error = exc
        finally:
            if grads is not None:
                self.core.release(grads)
            if staging is not None and self._ready is not staging:
                self._spare = staging
            done.set()

    def _install_ready(self) -> None:
        if self._ready is not None:
            self._spare = self.core.install(self._ready)
            self._ready = None

    def _raise_sync_error(self) -> None:
        if self._sync_error is not None:
            raise self._sync_error


# --------------------------------------------------------------------- node


class Node:
    """The services of one node process, and the dispatch of requests to them.

    ``nursery`` runs the node's background tasks (partitions, outgoing
    channels); ``address`` is where the node is reachable.
    """

    def __init__(self, secret: bytes, nursery: trio.Nursery, name: str = "",
                 address: Address = ("127.0.0.1", 0), snapshot_dir: str | Path | None = None,
                 shard: ParameterShard | None = None, spin: float = 0.0):
        self.secret = secret
        self.name = name
        self.address = address
        self.nursery = nursery
        self.peers = Peers(nursery, secret, name=name, handler=self.handle, spin=spin)
        self.shard = shard if shard is not None else ParameterShard()
        self.partitions: dict[int, PartitionRunner] = {}
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None

    async def send(self, target: tuple[str, int, int], kind: MessageKind, step: int,
                   array: np.ndarray) -> None:
        """Send activations or deltas to partition ``target`` (host, port,
        uid): straight into its inbox when it lives here, else over TCP."""
        host, port, uid = target
        local = self.partitions.get(uid)
        if local is not None and (host, int(port)) == self.address:
            # Copied: the sender reuses its buffer on the next step.
            frame = Frame(kind=kind, request_id=0, key=uid, seq=step, flags=0,
                          array=array.copy(), meta={})
            await local.inbox_send.send(frame)
            return
        ch = await self.peers.get((host, int(port)))
        await ch.notify(kind, key=uid, seq=step, array=array)

    def handle_inline(self, frame: Frame) -> Reply | None | object:
        """Answer a parameter shard request at once, in the connection's reader
        (the transport's inline handler: synchronous, in arrival order);
        ``DEFER`` the others to :meth:`handle`."""
        handler = self._shard_handlers.get(frame.kind)
        if handler is None:
            return DEFER
        try:
            return handler(self, frame)
        except ShardError as exc:
            raise RequestError(exc.code, str(exc)) from None

    async def handle(self, frame: Frame) -> Reply | None:
        """Answer one request frame (the transport's handler)."""
        reply = self.handle_inline(frame)
        if reply is not DEFER:
            return reply
        try:
            handler = self._handlers[MessageKind(frame.kind)]
        except (KeyError, ValueError):
            raise RequestError(ErrorCode.BAD_REQUEST, f"{frame.kind}: not a request a node serves") from None
        try:
            return await handler(self, frame)
        except ShardError as exc:
            raise RequestError(exc.code, str(exc)) from None

    # -- parameter shard ------------------------------------------------------------

    def _init(self, frame: Frame) -> Reply:
        meta = frame.meta
        version = self.shard.init(frame.key, meta.get("name"), frame.array,
                                  optimizer=meta.get("optimizer"))
        return Reply(seq=version)

    def _pinned(self, key: int) -> Reply:
        (value, version), unpin = self.shard.pin(key)
        return Reply(array=value, seq=version, release=unpin)

    def _pull(self, frame: Frame) -> Reply:
        return self._pinned(frame.key)

    def _apply(self, frame: Frame) -> int:
        pusher = frame.meta.get("pusher")
        return self.shard.push(frame.key, frame.array, pusher=pusher,
                               seq=frame.seq if pusher is not None else None)

    def _push(self, frame: Frame) -> Reply:
        return Reply(seq=self._apply(frame))

    def _push_pull(self, frame: Frame) -> Reply:
        self._apply(frame)
        return self._pinned(frame.key)

    def _stats(self, frame: Frame) -> Reply:
        return Reply(meta=self.shard.stats())

    def _snapshot_path(self, frame: Frame) -> Path:
        """The file a SNAPSHOT or restore names: a plain file name inside the
        node's snapshot directory, so that no peer can make it write or read
        anywhere else."""
        name = frame.meta.get("name")
        if self.snapshot_dir is None:
            raise RequestError(ErrorCode.BAD_REQUEST, "this node was started without --snapshot-dir")
        if not isinstance(name, str) or not name or Path(name).name != name or name.startswith("."):
            raise RequestError(ErrorCode.BAD_REQUEST, f"snapshot name {name!r} is not a plain file name")
        return self.snapshot_dir / name

    async def _snapshot(self, frame: Frame) -> Reply:
        path = self._snapshot_path(frame)
        path.parent.mkdir(parents=True, exist_ok=True)
        written = self.shard.snapshot(path)
        return Reply(meta={"path": str(written)})

    # -- partitions -------------------------------------------------------------------

    async def _deliver(self, frame: Frame) -> None:
        runner = self.partitions.get(frame.key)
        if runner is None:
            raise RequestError(ErrorCode.UNKNOWN_KEY, f"no partition {frame.key} on this node")
        await runner.inbox_send.send(frame)

    async def _control(self, frame: Frame) -> Reply:
        op = frame.meta.get("op")
        handler = self._ops.get(op)
        if handler is None:
            raise RequestError(ErrorCode.BAD_REQUEST, f"unknown control op {op!r}")
        return await handler(self, frame)

    async def _op_info(self, frame: Frame) -> Reply:
        return Reply(meta={"name": self.name, "version": version("dbnode"), "pid": os.getpid(),
                           "cores": os.cpu_count(), "address": list(self.address)})

    async def _op_start(self, frame: Frame) -> Reply:
        job = PartitionJob.from_meta(frame.meta)
        if job.uid in self.partitions:
            raise RequestError(ErrorCode.BAD_REQUEST, f"partition {job.uid} already exists")
        self.partitions[job.uid] = PartitionRunner(job, self)
        return Reply()

    async def _op_data(self, frame: Frame) -> Reply:
        runner = self.partitions.get(frame.key)
        role = frame.meta.get("role")
        if runner is None:
            raise RequestError(ErrorCode.UNKNOWN_KEY, f"no partition {frame.key} on this node")
        if role not in ("x", "y") or frame.array is None:
            raise RequestError(ErrorCode.BAD_REQUEST, "data needs meta.role 'x' or 'y' and an array")
        spec, n = runner.job.spec, runner.job.n_examples
        if len(frame.array) != n:
            raise RequestError(ErrorCode.SHAPE_MISMATCH, f"{role}: {len(frame.array)} examples, "
                               f"the partition was started for {n}")
        if role == "x":
            if not runner.core.is_first or frame.array.ndim != 2 or frame.array.shape[1] != spec.layers[0]:
                raise RequestError(ErrorCode.SHAPE_MISMATCH, f"inputs of shape {frame.array.shape} for "
                                   f"partition {frame.key}: only a first partition takes inputs, "
                                   f"of {spec.layers[0]} features")
            runner.x = frame.array.astype(spec.np_dtype, copy=False)
        else:
            if not runner.core.is_last:
                raise RequestError(ErrorCode.BAD_REQUEST, f"partition {frame.key} is not a last partition")
            runner.y = runner.core.loss.targets(frame.array)
            if spec.loss == "cross_entropy" and (runner.y.min() < 0 or runner.y.max() >= spec.layers[-1]):
                raise RequestError(ErrorCode.BAD_REQUEST, f"labels must be classes in [0, {spec.layers[-1]})")
            if spec.loss == "squared_error" and runner.y.shape[1] != spec.layers[-1]:
                raise RequestError(ErrorCode.SHAPE_MISMATCH, f"targets of shape {frame.array.shape}, "
                                   f"the model has {spec.layers[-1]} outputs")
        return Reply()

    async def _op_run(self, frame: Frame) -> Reply:
        uids = frame.meta.get("uids") or list(self.partitions)
        for uid in uids:
            runner = self.partitions.get(uid)
            if runner is None:
                raise RequestError(ErrorCode.UNKNOWN_KEY, f"no partition {uid} on this node")
            self.nursery.start_soon(runner.run)
        return Reply()

    async def _op_stop(self, frame: Frame) -> Reply:
        """Cancel and forget partitions (of a replica being restarted elsewhere)."""
        for uid in frame.meta.get("uids", []):
            runner = self.partitions.pop(int(uid), None)
            if runner is not None:
                runner.stop()
        return Reply()

    async def _op_status(self, frame: Frame) -> Reply:
        return Reply(meta={"partitions": {str(uid): r.status.report()
                                          for uid, r in self.partitions.items()}})

    async def _op_restore(self, frame: Frame) -> Reply:
        try:
            self.shard = ParameterShard.restore(self._snapshot_path(frame))
        except SnapshotError as exc:
            raise RequestError(ErrorCode.BAD_REQUEST, str(exc)) from None
        return Reply(meta={"keys": len(self.shard)})

    async def _op_export(self, frame: Frame) -> Reply:
        """The snapshot of some keys, as bytes: what the driver checkpoints."""
        with tempfile.TemporaryDirectory(prefix="dbnode-export-") as tmp:
            path = self.shard.snapshot(Path(tmp) / "export.npz", keys=frame.meta.get("keys"))
            data = np.frombuffer(path.read_bytes(), np.uint8)
        return Reply(array=data, meta={"keys": len(frame.meta.get("keys") or self.shard.keys())})

    async def _op_import(self, frame: Frame) -> Reply:
        """Take over the keys of an exported snapshot (a dead node's pieces,
        from the driver's newest checkpoint)."""
        if frame.array is None or frame.array.dtype != np.uint8:
            raise RequestError(ErrorCode.BAD_REQUEST, "import needs the snapshot's bytes as uint8")
        with tempfile.TemporaryDirectory(prefix="dbnode-import-") as tmp:
            path = Path(tmp) / "import.npz"
            path.write_bytes(frame.array.tobytes())
            try:
                pieces = ParameterShard.restore(path)
            except SnapshotError as exc:
                raise RequestError(ErrorCode.BAD_REQUEST, str(exc)) from None
        self.shard.merge(pieces)
        return Reply(meta={"keys": len(pieces)})

    async def _op_reset(self, frame: Frame) -> Reply:
        busy = [uid for uid, r in self.partitions.items()
                if not (r.status.done or r.status.error) and r.status.step]
        if busy and not frame.meta.get("force"):
            raise RequestError(ErrorCode.BAD_REQUEST, f"partitions {busy} are still running")
        for runner in self.partitions.values():
            runner.stop()
        self.partitions.clear()
        self.shard = ParameterShard()
        return Reply()

    _shard_handlers: dict[MessageKind, Callable] = {
        MessageKind.INIT: _init, MessageKind.PULL: _pull, MessageKind.PUSH: _push,
        MessageKind.PUSH_PULL: _push_pull, MessageKind.STATS: _stats,
    }
    _handlers: dict[MessageKind, Callable] = {
        MessageKind.SNAPSHOT: _snapshot, MessageKind.FORWARD: _deliver,
        MessageKind.BACKWARD: _deliver, MessageKind.CONTROL: _control,
    }
    _ops: dict[str, Callable] = {
        "info": _op_info, "start": _op_start, "data": _op_data, "run": _op_run,
        "status": _op_status, "reset": _op_reset, "restore": _op_restore, "stop": _op_stop,
        "export": _op_export, "import": _op_import,
    }


async def run_node(host: str, port: int, secret: bytes, *, name: str = "",
                   snapshot_dir: str | Path | None = None, restore: str | Path | None = None,
                   spin: float = 0.0, task_status=trio.TASK_STATUS_IGNORED,
                   **serve_options) -> None:
    """Serve a node until cancelled; reports its bound ``(host, port)``.
    ``restore`` starts its parameter shard from a snapshot file; ``spin``
    (seconds) busy-polls sockets before sleeping, on its server side and on
    its channels to other nodes (the transport's latency option)."""
    shard = ParameterShard.restore(restore) if restore else None
    async with trio.open_nursery() as nursery:
        node = Node(secret, nursery, name=name or f"node-{os.getpid()}", snapshot_dir=snapshot_dir,
                    shard=shard, spin=spin)
        bound = await nursery.start(partial(serve, node.handle, host, port, secret=secret,
                                            inline=node.handle_inline, name=node.name, spin=spin,
                                            **serve_options))
        node.address = (bound[0], int(bound[1]))
        task_status.started(node.address)
